//! The shared state of a running knoxgate, which every handler reads: the configuration, the
//! token store, the metrics, the request limits and the login machinery. It sits below `http/`
//! (which reads it) and `app` (which builds and runs it).

use std::{net::SocketAddr, sync::Arc};

use hyper::header::{HeaderName, HeaderValue};
use tokio::sync::Semaphore;

use crate::{
    auth::owned,
    config::Config,
    login::Login,
    metrics::Metrics,
    store::{Store, StoreError},
};

/// Shared state of a running knoxgate.
pub struct App {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// Caps `/verify` requests and gRPC checks in flight (`server.max_in_flight`).
    pub in_flight: Arc<Semaphore>,
    /// Caps login, logout and logoutall requests in flight (`sessions.max_in_flight`).
    pub sessions_in_flight: Arc<Semaphore>,
    /// Logging in and issuing tokens (password checks, throttle).
    pub login: Login,
    /// The identity headers whose client copies an answer has Envoy remove
    /// (`auth::owned`), and the same as an `x-envoy-auth-headers-to-remove` value.
    pub owned_identity_headers: Arc<[HeaderName]>,
    pub envoy_headers_to_remove: HeaderValue,
}

/// Why knoxgate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    // The cause is the error's source, which the error chain prints after this.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the password hashing threads: {0}")]
    Threads(std::io::Error),
    #[error("cannot start the demoted-connection threads: {0}")]
    LaneThreads(std::io::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Build(#[from] crate::store::BuildError),
    #[error(
        "cache.consistency = \"notify\" needs the change-feed triggers, which are not installed \
         or are from an earlier version. Run `knoxgate migrate` (or Django's `migrate` with \
         knoxgate-django) to install them, or set cache.consistency to \"ttl\" \
         (KNOXGATE_CACHE_CONSISTENCY=ttl) to run without them"
    )]
    TriggersMissing,
}

impl App {
    pub fn new(config: Config) -> Result<Arc<App>, StartError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(Store::connect(&config, Arc::clone(&metrics))?);
        let owned = owned::owned_identity_headers(&config);
        Ok(Arc::new(App {
            envoy_headers_to_remove: owned::envoy_headers_to_remove(&owned),
            owned_identity_headers: owned.into(),
            in_flight: Arc::new(Semaphore::new(config.server.max_in_flight.get())),
            sessions_in_flight: Arc::new(Semaphore::new(config.sessions.max_in_flight.get())),
            login: Login::new(
                Arc::clone(&config),
                Arc::clone(&store),
                Arc::clone(&metrics),
            )
            .map_err(StartError::Threads)?,
            config,
            store,
            metrics,
        }))
    }
}
