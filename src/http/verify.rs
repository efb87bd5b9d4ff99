//! `/verify`: policy → parse → tiered lookup → decide → permission → respond. Also the token
//! authentication that logout and logout-all share with it.

use std::sync::Arc;

use hyper::{
    HeaderMap, Method, Response,
    header::{self, HeaderName, HeaderValue},
};
use time::OffsetDateTime;

use super::respond::{self, Body};
use crate::{
    assertion::Subject,
    auth::{DenyReason, Outcome, Policy, decide, parse_authorization, permits, refreshed_expiry},
    deadline::Deadline,
    error::Error,
    metrics::{Reason, VerifyOutcome},
    state::App,
    store::KeptRow,
};

/// An allowed token: its row, shared with the cache entry it came from (no copy on the hot path).
pub type Authenticated = KeptRow;

/// Whether an allowed token's expiry is moved (AUTO_REFRESH) by this authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// `/verify`: knox's renew_token rule applies.
    AsKnox,
    /// Logout and logout-all, which delete the token: a refresh written to Postgres and Redis
    /// as the logout deletes it could bring its Redis entry back for other instances.
    Never,
}

/// The token row behind the request's `Authorization` header, or why it is refused.
pub async fn authenticate(
    app: &Arc<App>,
    headers: &HeaderMap,
    refresh: Refresh,
    deadline: Deadline,
) -> Result<Result<Authenticated, DenyReason>, Error> {
    let cfg = &app.config;
    // Nearly always one value: kept on the stack.
    let values: smallvec::SmallVec<[&[u8]; 2]> = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let presented = match parse_authorization(&values, &cfg.knox.auth_header_prefix)
        .into_presented(cfg.verify.max_token_chars.get())
    {
        Ok(p) => p,
        Err(reason) => return Ok(Err(reason)),
    };
    let digest = presented.digest(cfg.knox.hash_algorithm);
    let key = presented.key();
    let lookup = app.store.lookup(key, &digest, deadline).await?;
    let now = OffsetDateTime::now_utc();
    match decide(lookup.rows(), &digest, now) {
        Outcome::Allow(row) => {
            if cfg.knox.auto_refresh && refresh == Refresh::AsKnox {
                let k = &cfg.knox;
                let ttl = k.token_ttl.and_then(|d| time::Duration::try_from(d).ok());
                let max = k
                    .auto_refresh_max_ttl
                    .and_then(|d| time::Duration::try_from(d).ok());
                let min = time::Duration::try_from(k.min_refresh_interval)
                    .unwrap_or(time::Duration::MINUTE);
                if let Some(new_expiry) = refreshed_expiry(row, now, ttl, max, min) {
                    app.store.refresh(row, new_expiry);
                }
            }
            let kept = lookup.keep(row).ok_or_else(|| {
                Error::Internal("decided row is not among the looked-up rows".into())
            })?;
            Ok(Ok(kept))
        }
        Outcome::Expired(_) => {
            // knox deletes an expired token when it is presented. The answer is 401 either way:
            // it waits for the delete as knox's does, but no longer than cache.confirm_timeout
            // (or half the time left before the deadline), so a Postgres that hangs cannot turn
            // it into a deadline 503; the delete carries on by itself. A failed delete (Postgres
            // down) is only logged; the row stays refused.
            let (owner, key) = (Arc::clone(app), key.to_owned());
            let deleting = tokio::spawn(async move {
                if let Err(e) = Box::pin(owner.store.delete_expired(&key, &digest)).await {
                    tracing::debug!(error = %e, "could not delete an expired token");
                }
            });
            let _ = tokio::time::timeout(deadline.share(cfg.cache.confirm_timeout), deleting).await;
            Ok(Err(DenyReason::InvalidToken))
        }
        other => Ok(Err(other.deny_reason().unwrap_or(DenyReason::InvalidToken))),
    }
}

/// The signed identity assertion for an allowed token, when `[assertion]` is on: the one kept
/// beside the token's cache entry while it is fresh, else a new one.
fn assertion<'a>(
    app: &'a App,
    auth: &Authenticated,
) -> Result<Option<(&'a HeaderName, HeaderValue)>, Error> {
    let Some(signer) = &app.config.assertion.signer else {
        return Ok(None);
    };
    let (slot, index) = auth.assertion_slot();
    let row = auth.row();
    let sent = &app.config.verify;
    let subject = Subject {
        user_id: &row.user_id,
        username: sent
            .username_header
            .is_some()
            .then_some(&*row.user.username),
        email: sent.email_header.is_some().then_some(&*row.user.email),
        is_staff: sent.staff_header.is_some().then_some(row.user.is_staff),
        is_superuser: sent
            .superuser_header
            .is_some()
            .then_some(row.user.is_superuser),
    };
    let value = signer
        .assertion(
            slot,
            index,
            &subject,
            row.expiry,
            crate::assertion::now_ms(),
            || {
                app.metrics.assertions_signed.inc();
            },
        )
        .map_err(|e| Error::Internal(format!("cannot sign the identity assertion: {e}")))?;
    Ok(Some((&signer.header_name, value)))
}

/// Handles `/verify` and its sub-paths, any method. The body is never read.
///
/// `policy_query` is the query string of the exact verify URL, and `None` on sub-paths: there
/// (Envoy's `path_prefix` form) path and query are the client's own, and a client must never
/// choose its own policy.
pub async fn verify(
    app: &Arc<App>,
    method: &Method,
    headers: &HeaderMap,
    policy_query: Option<&str>,
    deadline: Deadline,
) -> Response<Body> {
    let started = std::time::Instant::now();
    let (mut response, outcome, reason) = match policy_query.map(Policy::from_query).transpose() {
        Ok(policy) => answer(app, method, headers, &policy.unwrap_or_default(), deadline).await,
        Err(e) => {
            let e = Error::from(e);
            (
                respond::error(&e),
                VerifyOutcome::Error,
                Reason::Failed(e.label()),
            )
        }
    };
    if matches!(reason, Reason::Anonymous | Reason::CorsPreflight) {
        // A 200 without identity: Envoy's HTTP ext_authz would otherwise let a client's own
        // identity headers through (`auth::owned`).
        response.headers_mut().insert(
            crate::auth::owned::ENVOY_HEADERS_TO_REMOVE,
            app.envoy_headers_to_remove.clone(),
        );
    }
    app.metrics.verify_outcome(outcome, reason);
    app.metrics
        .verify_duration
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The answer to one verify request under `policy`, with its metrics labels. Also the
/// decision of a gRPC check (`grpc`), from the headers it carries.
pub async fn answer(
    app: &Arc<App>,
    method: &Method,
    headers: &HeaderMap,
    policy: &Policy,
    deadline: Deadline,
) -> (Response<Body>, VerifyOutcome, Reason) {
    let cfg = &app.config;
    if let Err(e) = policy.check_applicable(cfg.postgres.groups.is_some()) {
        let e = Error::from(e);
        let reason = Reason::Failed(e.label());
        return (respond::error(&e), VerifyOutcome::Error, reason);
    }
    if cfg.verify.allow_cors_preflight
        && method == Method::OPTIONS
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return (
            respond::preflight(),
            VerifyOutcome::Allow,
            Reason::CorsPreflight,
        );
    }
    match authenticate(app, headers, Refresh::AsKnox, deadline).await {
        Ok(Ok(auth)) if permits(policy, &auth.row().user) => match assertion(app, &auth) {
            Ok(signed) => (
                respond::allow(auth.row(), &cfg.verify, signed),
                VerifyOutcome::Allow,
                Reason::Valid,
            ),
            Err(e) => (
                respond::error(&e),
                VerifyOutcome::Error,
                Reason::Failed(e.label()),
            ),
        },
        Ok(Ok(_)) => (respond::forbidden(), VerifyOutcome::Deny, Reason::Forbidden),
        // DRF: no knox credentials (no header, or another scheme) is an anonymous user, whom
        // AllowAny admits; credentials that are present but wrong still fail authentication.
        Ok(Err(DenyReason::NoCredentials)) if policy.anonymous => (
            respond::anonymous(),
            VerifyOutcome::Allow,
            Reason::Anonymous,
        ),
        Ok(Err(reason)) => (
            respond::deny(reason, &cfg.knox.auth_header_prefix),
            VerifyOutcome::Deny,
            Reason::Denied(reason),
        ),
        Err(e) => (
            respond::error(&e),
            VerifyOutcome::Error,
            Reason::Failed(e.label()),
        ),
    }
}
