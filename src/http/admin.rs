//! The admin listener: `/metrics`, `/healthz` (process alive), `/readyz` (able to answer), and,
//! when `[assertion]` is on, `/.well-known/jwks.json` (the assertion's public keys).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header};

use super::respond::Body;
use crate::{config::Consistency, state::App};

/// The last Postgres probe, shared by every `/readyz` call. `/readyz` is unauthenticated and
/// shares the Postgres pool with `/verify`: one query per call would let a flood of probes
/// starve `/verify` (and fail readiness itself). One probe runs at a time; callers that arrive
/// meanwhile wait for its result, and a result younger than `server.readiness_interval` is
/// reused.
pub struct PostgresProbe {
    interval: Duration,
    /// A probe unanswered by then counts as failed (`server.readiness_timeout`): a Postgres
    /// that does not answer (packets dropped) must not hold `/readyz` past the orchestrator's
    /// own probe timeout, which would fail readiness whatever `rides_out_outage` says.
    timeout: Duration,
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
    /// Whether an outage leaves this instance ready (`cache.stale_if_error`: it serves what it
    /// has cached meanwhile).
    rides_out_outages: bool,
    /// Whether Postgres has answered a probe since the start.
    reached: AtomicBool,
}

impl PostgresProbe {
    pub fn new(interval: Duration, timeout: Duration, rides_out_outages: bool) -> PostgresProbe {
        PostgresProbe {
            interval,
            timeout,
            last: tokio::sync::Mutex::new(None),
            rides_out_outages,
            reached: AtomicBool::new(false),
        }
    }

    /// Whether this instance stays ready while Postgres does not answer: it has answered since
    /// the start, and cached answers are served meanwhile. Every instance shares the one
    /// Postgres, so an outage would take them all out of their Service at once, cached tokens
    /// and routes without auth with them. Never reached (a wrong URL, a new instance during an
    /// outage): not ready, so that a rollout stops there.
    fn rides_out_outage(&self) -> bool {
        self.rides_out_outages && self.reached.load(Ordering::Relaxed)
    }

    /// Whether Postgres answered the latest probe, probing first if that one is too old.
    async fn postgres_ok(&self, app: &App) -> bool {
        // Held across the probe: that is what makes it single-flight.
        let mut last = self.last.lock().await;
        if let Some((at, ok)) = *last
            && at.elapsed() < self.interval
        {
            return ok;
        }
        let ping = tokio::time::timeout(self.timeout, app.store.postgres().ping()).await;
        let ok = matches!(ping, Ok(Ok(_)));
        *last = Some((Instant::now(), ok));
        if ok {
            self.reached.store(true, Ordering::Relaxed);
        }
        ok
    }
}

pub async fn admin_service(
    app: Arc<App>,
    probe: Arc<PostgresProbe>,
    req: Request<Incoming>,
) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => {
            app.metrics
                .memory_entries
                .set(app.store.memory_entries() as i64);
            let (keys, bytes) = app.store.key_filter_size();
            app.metrics.key_filter_keys.set(keys as i64);
            app.metrics.key_filter_bytes.set(bytes as i64);
            // Read at the scrape, as /readyz does: a relay's heartbeat can go overdue while
            // nothing in the feed task runs to say so.
            app.metrics
                .feed_connected
                .set(i64::from(app.store.feed_live()));
            let redis_up = app.store.redis().is_some_and(|r| r.is_connected());
            app.metrics.redis_connected.set(i64::from(redis_up));
            let mut r = Response::new(Full::new(Bytes::from(app.metrics.encode())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readiness(&app, &probe).await,
        JWKS_PATH => jwks(&app),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Where the assertion's public keys are served.
const JWKS_PATH: &str = "/.well-known/jwks.json";

/// How long a relying party may cache the JWKS. A new key is published (in
/// `verify_only_key_files`) before it signs, so a cached copy only needs to be younger than
/// the wait between publishing and switching; a relying party that meets an unknown `kid`
/// refetches at once anyway.
const JWKS_MAX_AGE_SECS: u32 = 300;

/// The JWKS document, or 404 when assertions are off.
fn jwks(app: &App) -> Response<Body> {
    let Some(signer) = &app.config.assertion.signer else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let mut r = Response::new(Full::new(signer.jwks_json()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/jwk-set+json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_str(&format!("public, max-age={JWKS_MAX_AGE_SECS}"))
            .expect("a valid header value"),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// 200 when Postgres answers (or, with `cache.stale_if_error`, has answered since the start)
/// and the change feed is not deaf; the body reports each dependency.
async fn readiness(app: &App, probe: &PostgresProbe) -> Response<Body> {
    let postgres_ok = probe.postgres_ok(app).await;
    let serving = postgres_ok || probe.rides_out_outage();
    let redis = match app.store.redis() {
        None => "disabled",
        Some(r) if r.is_connected() => "connected",
        Some(_) => "disconnected",
    };
    let deaf = app.store.feed_deaf();
    let feed = match app.config.cache.consistency {
        Consistency::Notify if app.store.feed_live() => "live",
        // Connected but not hearing its own notifications: a configuration fault (the feed
        // behind a transaction pooler) that will not heal by itself, so not ready. Answers
        // stay correct meanwhile: cached ones are confirmed with Postgres.
        Consistency::Notify if deaf => "deaf",
        // Answers stay correct (cached ones are confirmed with Postgres) but cost SQL.
        Consistency::Notify => "down",
        _ => "off",
    };
    let body = serde_json::json!({
        "postgres": if postgres_ok { "ok" } else { "unreachable" },
        "redis": redis,
        "feed": feed,
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = if serving && !deaf {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}
