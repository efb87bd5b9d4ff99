//! knoxgate: a forward-auth sidecar that verifies django-rest-knox tokens.
//!
//! # Layout
//!
//! - [`auth`]: pure logic with no I/O — `Authorization` parsing exactly as knox does it, token
//!   digests, the allow/deny decision, knox's expiry formatting and refresh rule, Basic credentials.
//! - [`password`]: Django password hashes (verify every hasher Django ships, make pbkdf2_sha256).
//! - [`login`]: logging in and issuing tokens (password checks on low-priority threads, the
//!   failed-login throttle, the client-address rule), for the HTTP endpoints and the CLI.
//! - [`store`]: the tiered token lookup — in-process cache → Redis → Postgres — and the writes
//!   (login, logout, expired-token cleanup) that keep all tiers consistent; with the Postgres
//!   change feed (`store::feed`), its fan-out through a Redis stream (`store::relay`), the
//!   change format both carry (`store::change`) and `knoxgate migrate`'s tables and triggers
//!   (`store::schema`).
//! - [`assertion`]: the signed identity assertion — keys from PEM, signing, the JWKS, one
//!   signed assertion kept per cached token and reused until it nears expiry.
//! - [`http`]: routing and handlers; `http::respond` is the only place a status code is chosen.
//! - [`grpc`]: Envoy ext_authz over gRPC: `/verify`'s decision for a check request, and how
//!   Envoy is told `http::respond`'s answer.
//! - [`server`]: listeners, connection and in-flight limits, timeouts, graceful drain, and
//!   the demoted lane for connections whose answers keep being 401.
//! - [`priority`]: lowering a thread's CPU priority (password checks, the demoted lane).
//! - [`config`]: TOML file + `KNOXGATE_*` environment → validated, typed [`config::Config`].
//! - [`metrics`]: the Prometheus metric families, registered once.
//! - [`telemetry`]: the stderr log and, when configured, OpenTelemetry spans over OTLP.
//! - [`state`]: the shared state every handler reads (`App`).
//! - [`app`]: wiring — builds the state from a `Config`, runs the service, stops on a signal.
//! - [`cli`]: the command line: `serve`, `relay`, `migrate`, `check-config`, user and token
//!   commands.
//! - [`deadline`]: when a request's answer is due, and how much of it a wait with a fallback
//!   may take.
//! - [`error`]: failures and who is at fault (mapped to statuses in `http::respond`).

pub mod app;
pub mod assertion;
pub mod auth;
pub mod cli;
pub mod config;
pub mod deadline;
pub mod error;
pub mod grpc;
pub mod http;
pub mod login;
pub mod metrics;
pub mod password;
pub mod priority;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;

/// The knox-compat facts files (produced by the real Django/knox stack), for unit tests.
#[cfg(test)]
pub(crate) fn knox_compat(file: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/knox-compat")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}
