//! knox's LoginView, LogoutView and LogoutAllView over HTTP: same statuses, headers and
//! bodies. The login logic itself lives in `crate::login`; this file parses and responds.

use std::{net::IpAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{Method, Response, body::Incoming, header, http::request::Parts};

use super::{
    respond::{self, Body},
    verify::{Refresh, authenticate},
};
use crate::{
    auth::{BasicError, DenyReason, LoginCredentials, parse_basic},
    deadline::Deadline,
    error::Error,
    login::{LoginOutcome, client_ip},
    metrics::{KindLabels, ResultLabels},
    state::App,
};

/// Which session endpoint a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Login,
    Logout,
    LogoutAll,
}

impl Endpoint {
    /// Matches `rest` (the path after the base path), with or without the trailing slash.
    pub fn from_path(rest: &str) -> Option<Self> {
        match rest.trim_end_matches('/') {
            "login" => Some(Self::Login),
            "logout" => Some(Self::Logout),
            "logoutall" => Some(Self::LogoutAll),
            _ => None,
        }
    }
}

/// Reads the credentials: HTTP Basic first (knox's documented pattern), else a JSON body.
async fn credentials(
    app: &App,
    parts: &Parts,
    body: Incoming,
    deadline: Deadline,
) -> Result<Result<LoginCredentials, BasicError>, Error> {
    // Repeated headers reach Django joined with ", " (WSGI and ASGI servers join them), and
    // DRF reads the joined value: so does this, rather than taking the first credentials.
    let values: Vec<&[u8]> = parts
        .headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let joined = (values.len() > 1).then(|| values.join(&b", "[..]));
    let basic = parse_basic(joined.as_deref().or(values.first().copied()));
    if basic != Err(BasicError::NotProvided) {
        return Ok(basic);
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = app.config.sessions.max_body_bytes.get();
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Error::PayloadTooLarge);
    }
    // Half the request's time at most: a client sending its body slowly gets 408 for its own
    // slowness, with time left to say so, not the deadline's 503 of an outage.
    let reading = Limited::new(body, limit).collect();
    let read = tokio::time::timeout(deadline.share(app.config.server.request_timeout), reading)
        .await
        .map_err(|_| Error::BodyTimeout)?;
    let bytes: Bytes = match read {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(Error::PayloadTooLarge),
        Err(_) => return Err(Error::BadRequest("Could not read the request body.")),
    };
    if bytes.is_empty() {
        return Ok(Err(BasicError::NotProvided));
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("application/json")
    {
        return Err(Error::UnsupportedMediaType);
    }
    // An object only: serde would also accept a struct written as an array
    // (`["alice","pw"]`), which is not what the endpoint documents.
    let object = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes).ok();
    let field = |k: &str| Some(object.as_ref()?.get(k)?.as_str()?.to_owned());
    match (field("username"), field("password")) {
        (Some(username), Some(password)) => Ok(Ok(LoginCredentials { username, password })),
        _ => Err(Error::BadRequest(
            "Expected a JSON object with string fields username and password.",
        )),
    }
}

/// POST login/: parse → log in → respond.
pub async fn login(
    app: &Arc<App>,
    parts: Parts,
    body: Incoming,
    peer: IpAddr,
    deadline: Deadline,
) -> Result<Response<Body>, Error> {
    let creds = match credentials(app, &parts, body, deadline).await? {
        Ok(c) => c,
        Err(e) => {
            count_login(app, "malformed");
            return Ok(respond::login_refused(e.detail()));
        }
    };
    let sessions = &app.config.sessions;
    client_ip::warn_if_untrusted_proxy(&parts.headers, &sessions.trusted_proxies);
    let client = client_ip::client_ip(
        peer,
        &parts.headers,
        &sessions.trusted_proxies,
        sessions.trust_x_real_ip,
    );
    let outcome = app
        .login
        .log_in(creds, client, parts.method == Method::POST)
        .await?;
    count_login(app, outcome.label());
    Ok(match outcome {
        LoginOutcome::Issued(issued) => respond::login_ok(
            issued.expiry,
            &issued.token,
            &sessions.time_zone,
            &app.config.knox.expiry_format,
        ),
        LoginOutcome::Refused => respond::login_refused("Invalid username/password."),
        LoginOutcome::Throttled { retry_after_secs } => respond::throttled(retry_after_secs),
        LoginOutcome::TokenLimit => respond::token_limit_reached(),
        LoginOutcome::MethodNotAllowed => respond::method_not_allowed(&parts.method),
    })
}

fn count_login(app: &App, result: &'static str) {
    app.metrics
        .logins
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// A logout refused as knox's views refuse it: 401, with the headers DRF adds to every
/// response of those views.
fn refused(app: &App, reason: DenyReason) -> Response<Body> {
    let mut r = respond::deny(reason, &app.config.knox.auth_header_prefix);
    r.headers_mut()
        .insert(header::VARY, header::HeaderValue::from_static("Accept"));
    r.headers_mut().insert(
        header::ALLOW,
        header::HeaderValue::from_static("POST, OPTIONS"),
    );
    r
}

/// POST logout/ and logoutall/.
pub async fn logout(
    app: &Arc<App>,
    parts: &Parts,
    all: bool,
    deadline: Deadline,
) -> Result<Response<Body>, Error> {
    let auth = match authenticate(app, &parts.headers, Refresh::Never, deadline).await? {
        Ok(auth) => auth,
        Err(reason) => return Ok(refused(app, reason)),
    };
    if parts.method != Method::POST {
        return Ok(respond::method_not_allowed(&parts.method));
    }
    let row = auth.row();
    let store = Arc::clone(&app.store);
    let (key, digest, user_id) = (
        row.token_key.clone(),
        row.digest.clone(),
        row.user_id.clone(),
    );
    // A logout once begun runs to its end on a task of its own: a client that goes away, or the
    // request deadline, must not stop it between Postgres's DELETE and the evictions after it
    // (this instance's cache, Redis), which no feed would repair in `ttl` mode.
    let existed = tokio::spawn(async move {
        if all {
            store.logout_all(&key, &digest, &user_id).await
        } else {
            store.logout(&key, &digest).await
        }
    })
    .await
    .map_err(|e| Error::Internal(format!("logout task: {e}")))??;
    if !existed {
        // Gone from Postgres (a cache had not heard yet): knox, reading Postgres, refuses it.
        return Ok(refused(app, DenyReason::InvalidToken));
    }
    let kind = if all { "logoutall" } else { "logout" };
    app.metrics
        .logouts
        .get_or_create(&KindLabels { kind })
        .inc();
    Ok(respond::no_content())
}
