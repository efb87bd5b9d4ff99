//! HTTP routing. The main listener serves `/verify` and the session endpoints; the admin
//! listener serves metrics and health. Request-wide limits (in-flight cap, deadline) are
//! applied here, around every handler.

pub mod admin;
pub mod respond;
pub mod session;
pub mod verify;

use std::{net::SocketAddr, sync::Arc};

use hyper::{Request, Response, body::Incoming};

use tracing::Instrument as _;

use crate::{
    deadline::Deadline,
    error::Error,
    metrics::{Reason, Route, VerifyOutcome},
    state::App,
    telemetry::{SPAN_TARGET, continue_trace},
};
use respond::Body;
use session::Endpoint;

/// Entry point of the main listener. Every answer is counted here, by route, once.
pub async fn main_service(
    app: Arc<App>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let route = route_of(&app, req.uri().path());
    let response = answer(&app, route, req, peer).await;
    app.metrics.request(route, response.status());
    response
}

async fn answer(
    app: &Arc<App>,
    route: Route,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    // Shed load rather than queue: a forward-auth answer that comes late is worth nothing.
    // Session requests have a cap of their own: one can be held open by its client (a body sent
    // slowly), and those must not take the places of /verify requests.
    let (in_flight, shed) = match route {
        Route::Login | Route::Logout | Route::LogoutAll => {
            (&app.sessions_in_flight, &app.metrics.sessions_load_shed)
        }
        Route::Verify | Route::NotFound | Route::GrpcCheck => {
            (&app.in_flight, &app.metrics.load_shed)
        }
    };
    let Ok(_permit) = Arc::clone(in_flight).try_acquire_owned() else {
        shed.inc();
        return respond::error(&Error::Overloaded);
    };
    let budget = app.config.server.request_timeout;
    let deadline = Deadline::after(budget);
    match tokio::time::timeout(budget, handle(app, route, req, peer, deadline)).await {
        Ok(response) => response,
        Err(_) => {
            let e = Error::DeadlineExceeded;
            if route == Route::Verify {
                app.metrics
                    .verify_outcome(VerifyOutcome::Error, Reason::Failed(e.label()));
            }
            respond::error(&e)
        }
    }
}

/// Which endpoint `path` names.
fn route_of(app: &App, path: &str) -> Route {
    let verify_path = app.config.verify.path.as_str();
    if path
        .strip_prefix(verify_path)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    {
        return Route::Verify;
    }
    let sessions = &app.config.sessions;
    let endpoint = sessions
        .enabled
        .then(|| {
            path.strip_prefix(sessions.base_path.as_str())
                .and_then(Endpoint::from_path)
        })
        .flatten();
    match endpoint {
        Some(Endpoint::Login) => Route::Login,
        Some(Endpoint::Logout) => Route::Logout,
        Some(Endpoint::LogoutAll) => Route::LogoutAll,
        None => Route::NotFound,
    }
}

async fn handle(
    app: &Arc<App>,
    route: Route,
    req: Request<Incoming>,
    peer: SocketAddr,
    deadline: Deadline,
) -> Response<Body> {
    if route == Route::Verify {
        // Policy parameters count only on the exact verify URL, the one a proxy is configured
        // with; on a sub-path the query is the client's (`/verify/x?anonymous=allow`).
        let exact = req.uri().path() == app.config.verify.path;
        let policy_query = exact.then(|| req.uri().query().unwrap_or(""));
        let span = tracing::info_span!(target: SPAN_TARGET, "verify", otel.kind = "server");
        continue_trace(&span, req.headers());
        return verify::verify(app, req.method(), req.headers(), policy_query, deadline)
            .instrument(span)
            .await;
    }
    let (parts, body) = req.into_parts();
    // Boxed so that their large futures do not size (and slow) every `/verify` request's.
    let result = match route {
        Route::Login => {
            let span = tracing::info_span!(target: SPAN_TARGET, "login", otel.kind = "server");
            continue_trace(&span, &parts.headers);
            Box::pin(session::login(app, parts, body, peer.ip(), deadline).instrument(span)).await
        }
        Route::Logout => Box::pin(session::logout(app, &parts, false, deadline)).await,
        Route::LogoutAll => Box::pin(session::logout(app, &parts, true, deadline)).await,
        Route::Verify | Route::NotFound | Route::GrpcCheck => return respond::not_found(),
    };
    result.unwrap_or_else(|e| respond::error(&e))
}
