//! knox's LoginView, LogoutView and LogoutAllView: same statuses, headers and bodies.

use std::{net::IpAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{HeaderMap, Method, Response, body::Incoming, header, http::request::Parts};
use ipnet::IpNet;
use time::OffsetDateTime;

use super::{
    respond::{self, Body},
    throttle::Throttle,
    verify::authenticate,
};
use crate::{
    app::App,
    auth::{
        BasicError, LoginCredentials, TokenRow, UserInfo, generate_token, parse_basic, token_key_of,
    },
    error::Error,
    metrics::{KindLabels, ResultLabels},
    password,
    store::postgres::NewToken,
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

/// The client's address: the peer, or what a trusted proxy in front of us says it is.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip.to_canonical()));
    if !is_trusted(peer) {
        return peer;
    }
    // Walk X-Forwarded-For from the right: the first hop we do not trust is the client.
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if let Some(ip) = forwarded.iter().rev().find(|ip| !is_trusted(**ip)) {
        return *ip;
    }
    headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(peer)
}

fn count_login(app: &App, result: &'static str) {
    app.metrics
        .logins
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// Reads the credentials: HTTP Basic first (knox's documented pattern), else a JSON body.
async fn credentials(
    app: &App,
    parts: &Parts,
    body: Incoming,
) -> Result<Result<LoginCredentials, BasicError>, Error> {
    let basic = parse_basic(
        parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    );
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
    let bytes: Bytes = match Limited::new(body, limit).collect().await {
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

/// Checks a password off the async workers, within the configured concurrency.
async fn check_password(app: &App, password: String, encoded: String) -> Result<bool, Error> {
    let permit = tokio::time::timeout(
        app.config.sessions.hash_queue_timeout,
        Arc::clone(&app.hash_slots).acquire_owned(),
    )
    .await
    .map_err(|_| Error::Overloaded)?
    .map_err(|_| Error::Internal("hash semaphore closed".into()))?;
    let started = Instant::now();
    let ok = app
        .hash_pool
        .run(move || {
            let _permit = permit;
            password::check_password(&password, &encoded)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    app.metrics
        .password_check_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(ok)
}

/// POST login/.
pub async fn login(
    app: &Arc<App>,
    parts: Parts,
    body: Incoming,
    peer: IpAddr,
) -> Result<Response<Body>, Error> {
    let creds = match credentials(app, &parts, body).await? {
        Ok(c) => c,
        Err(e) => {
            count_login(app, "malformed");
            return Ok(respond::login_refused(e.detail()));
        }
    };
    let ip = client_ip(peer, &parts.headers, &app.config.sessions.trusted_proxies);
    let throttle: &Throttle = &app.login_throttle;
    if let Some(wait) = throttle.blocked(&creds.username, ip) {
        count_login(app, "throttled");
        // Rounded up, as DRF does: a client that waits Retry-After seconds must get through.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return Ok(respond::throttled(secs.max(1)));
    }
    // Postgres text cannot hold NUL: no user has such a name, and asking would fail (503).
    let user = if creds.username.contains('\0') {
        None
    } else {
        app.store.postgres().login_user(&creds.username).await?
    };
    let iterations = app.config.sessions.password_iterations;
    // An unknown user costs one hash too, so timing does not reveal which usernames exist.
    let encoded = user
        .as_ref()
        .map_or_else(|| app.dummy_hash.clone(), |u| u.password.clone());
    let password_ok = check_password(app, creds.password.clone(), encoded).await?;
    let user = match user {
        // Django's ModelBackend refuses inactive users exactly like a wrong password.
        Some(u) if password_ok && u.is_active => u,
        _ => {
            throttle.record_failure(&creds.username, ip);
            count_login(app, "refused");
            return Ok(respond::login_refused("Invalid username/password."));
        }
    };
    if parts.method != Method::POST {
        return Ok(respond::method_not_allowed(&parts.method));
    }
    if password::must_update(&user.password, iterations) {
        // Django re-hashes on login with its preferred hasher; so do we, off the workers.
        let app2 = Arc::clone(app);
        let (username, pw) = (creds.username.clone(), creds.password.clone());
        tokio::spawn(async move {
            let encoded = app2
                .hash_pool
                .run(move || password::make_password(&pw, iterations))
                .await;
            if let Ok(encoded) = encoded
                && let Err(e) = app2
                    .store
                    .postgres()
                    .set_password(&username, &encoded)
                    .await
            {
                tracing::warn!(error = %e, "could not store the upgraded password hash");
            }
        });
    }
    let knox = &app.config.knox;
    let token = generate_token(&knox.token_prefix, knox.token_character_length);
    let digest = knox.hash_algorithm.digest(token.as_bytes());
    let token_key = token_key_of(&token);
    let now = OffsetDateTime::now_utc();
    let expiry = knox.token_ttl.map(|ttl| now + ttl);
    let created = OffsetDateTime::now_utc();
    let new = NewToken {
        username: &creds.username,
        digest: &digest.to_hex(),
        token_key,
        created,
        expiry,
        limit: knox.token_limit_per_user,
    };
    let Some(user_id) = app.store.postgres().create_token(&new).await? else {
        count_login(app, "token_limit");
        return Ok(respond::token_limit_reached());
    };
    throttle.record_success(&creds.username);
    app.store
        .remember_new(TokenRow {
            digest: digest.into(),
            token_key: token_key.into(),
            user_id: user_id.into(),
            created,
            expiry,
            user: UserInfo {
                is_active: true,
                username: creds.username.as_str().into(),
                email: user.email.into(),
            },
        })
        .await;
    count_login(app, "ok");
    Ok(respond::login_ok(expiry, &token))
}

/// POST logout/ and logoutall/.
pub async fn logout(app: &Arc<App>, parts: &Parts, all: bool) -> Result<Response<Body>, Error> {
    let auth = match authenticate(app, &parts.headers).await? {
        Ok(auth) => auth,
        Err(reason) => {
            let mut r = respond::deny(reason, &app.config.knox.auth_header_prefix);
            // DRF adds these to every response of knox's views, refusals included.
            r.headers_mut()
                .insert(header::VARY, header::HeaderValue::from_static("Accept"));
            r.headers_mut().insert(
                header::ALLOW,
                header::HeaderValue::from_static("POST, OPTIONS"),
            );
            return Ok(r);
        }
    };
    if parts.method != Method::POST {
        return Ok(respond::method_not_allowed(&parts.method));
    }
    let row = auth.row();
    if all {
        app.store.logout_all(&row.digest, &row.user_id).await?;
    } else {
        app.store.logout(&row.digest).await?;
    }
    let kind = if all { "logoutall" } else { "logout" };
    app.metrics
        .logouts
        .get_or_create(&KindLabels { kind })
        .inc();
    Ok(respond::no_content())
}
