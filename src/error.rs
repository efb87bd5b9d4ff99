//! Failures: what went wrong and who is at fault. Denials are not errors (see `auth::DenyReason`);
//! `http::respond` turns each variant into its status code, in one place.

use crate::{auth::PolicyError, store::StoreError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Neither the caches nor Postgres could settle the question.
    #[error("token store unavailable: {0}")]
    StoreUnavailable(#[from] StoreError),
    /// The request took longer than `server.request_timeout`.
    #[error("request deadline exceeded")]
    DeadlineExceeded,
    /// More requests than `server.max_in_flight`, or no password-hashing slot in time.
    #[error("overloaded")]
    Overloaded,
    /// The client sent something we cannot accept (bad body, wrong content type, too large).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// A login body that is not JSON.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// A request body larger than the configured limit.
    #[error("payload too large")]
    PayloadTooLarge,
    /// The client did not send its request body in time (half of `server.request_timeout`).
    /// Its own slowness, not an outage.
    #[error("request body not received in time")]
    BodyTimeout,
    /// The verify URL's policy parameters are wrong: the proxy is misconfigured. Never a
    /// denial, so a broken rule cannot pass for a refused user.
    #[error(transparent)]
    BadPolicy(#[from] PolicyError),
    /// A bug or an impossible state; details go to the log, never to the client.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A bounded metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Error::StoreUnavailable(_) => "store_unavailable",
            Error::DeadlineExceeded => "deadline_exceeded",
            Error::Overloaded => "overloaded",
            Error::BadRequest(_) => "bad_request",
            Error::PayloadTooLarge => "payload_too_large",
            Error::BodyTimeout => "body_timeout",
            Error::UnsupportedMediaType => "unsupported_media_type",
            Error::BadPolicy(_) => "bad_policy",
            Error::Internal(_) => "internal",
        }
    }
}
