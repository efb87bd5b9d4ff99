//! knoxgate: a forward-auth sidecar that verifies django-rest-knox tokens.
//!
//! # Layout
//!
//! - [`auth`]: pure logic with no I/O — `Authorization` parsing exactly as knox does it, token
//!   digests, the allow/deny decision, knox's expiry formatting and refresh rule, Basic credentials.
//! - [`password`]: Django password hashes (verify every hasher Django ships, make pbkdf2_sha256).
//! - [`hash_pool`]: the low-priority threads those hashes are computed on.
//! - [`store`]: the tiered token lookup — in-process cache → Redis → Postgres — and the writes
//!   (login, logout, expired-token cleanup) that keep all tiers consistent.
//! - [`feed`]: the Postgres change feed (LISTEN + revocation log) that evicts revoked tokens.
//! - [`http`]: routing and handlers; `http::respond` is the only place a status code is chosen.
//! - [`server`]: listeners, connection and in-flight limits, timeouts, graceful drain.
//! - [`config`]: TOML file + `KNOXGATE_*` environment → validated, typed [`config::Config`].
//! - [`metrics`]: the Prometheus metric families, registered once.
//! - [`schema`]: `knoxgate migrate`: Django-compatible tables and the revocation triggers.
//! - [`app`]: wiring — builds the runtime handles from a `Config` and runs the service.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod feed;
pub mod hash_pool;
pub mod http;
pub mod metrics;
pub mod password;
pub mod schema;
pub mod server;
pub mod store;

/// The knox-compat facts files (produced by the real Django/knox stack), for unit tests.
#[cfg(test)]
pub(crate) fn knox_compat(file: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/knox-compat")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}
