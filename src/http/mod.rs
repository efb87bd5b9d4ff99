//! HTTP routing. The main listener serves `/verify` and the session endpoints; the admin
//! listener serves metrics and health. Request-wide limits (in-flight cap, deadline) are
//! applied here, around every handler.

pub mod admin;
pub mod respond;
pub mod session;
pub mod verify;

use std::{net::SocketAddr, sync::Arc};

use hyper::{Request, Response, body::Incoming};

use crate::{error::Error, state::App};
use respond::Body;
use session::Endpoint;

/// Entry point of the main listener.
pub async fn main_service(
    app: Arc<App>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    // Shed load rather than queue: a forward-auth answer that comes late is worth nothing.
    let Ok(_permit) = Arc::clone(&app.in_flight).try_acquire_owned() else {
        app.metrics.load_shed.inc();
        return respond::error(&Error::Overloaded);
    };
    match tokio::time::timeout(app.config.server.request_timeout, route(&app, req, peer)).await {
        Ok(response) => response,
        Err(_) => {
            app.metrics.verify_outcome("error", "deadline_exceeded");
            respond::error(&Error::DeadlineExceeded)
        }
    }
}

async fn route(app: &Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path();
    let verify_path = app.config.verify.path.as_str();
    if let Some(rest) = path.strip_prefix(verify_path)
        && (rest.is_empty() || rest.starts_with('/'))
    {
        // Policy parameters count only on the exact verify URL, the one a proxy is configured
        // with; on a sub-path the query is the client's (`/verify/x?anonymous=allow`).
        let policy_query = if rest.is_empty() {
            Some(req.uri().query().unwrap_or(""))
        } else {
            None
        };
        return verify::verify(app, req.method(), req.headers(), policy_query).await;
    }
    let sessions = &app.config.sessions;
    let endpoint = sessions
        .enabled
        .then(|| {
            path.strip_prefix(sessions.base_path.as_str())
                .and_then(Endpoint::from_path)
        })
        .flatten();
    let Some(endpoint) = endpoint else {
        return respond::not_found();
    };
    let (parts, body) = req.into_parts();
    // Boxed so that their large futures do not size (and slow) every `/verify` request's.
    let result = match endpoint {
        Endpoint::Login => Box::pin(session::login(app, parts, body, peer.ip())).await,
        Endpoint::Logout => Box::pin(session::logout(app, &parts, false)).await,
        Endpoint::LogoutAll => Box::pin(session::logout(app, &parts, true)).await,
    };
    result.unwrap_or_else(|e| respond::error(&e))
}
