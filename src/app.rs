//! Wiring: builds the runtime handles from a [`Config`], binds the listeners and runs the
//! background tasks (change feed, Redis retry) until shutdown.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinHandle,
};

use crate::{
    config::{Config, Consistency},
    feed,
    hash_pool::HashPool,
    http::{self, throttle::Throttle},
    metrics::Metrics,
    schema,
    server::{self, Limits},
    store::{Store, StoreError},
};

/// Shared state of a running knoxgate.
pub struct App {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// Caps requests in flight on the main listener.
    pub in_flight: Arc<Semaphore>,
    /// Caps password checks admitted at once (and so how long a login may queue).
    pub hash_slots: Arc<Semaphore>,
    /// Where password hashes are computed: low-priority threads, one per slot.
    pub hash_pool: HashPool,
    pub login_throttle: Throttle,
    /// A well-formed hash with the configured cost, checked for unknown usernames so that they
    /// take as long as wrong passwords.
    pub dummy_hash: String,
}

/// Why knoxgate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the password hashing threads: {0}")]
    Threads(std::io::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Build(#[from] crate::store::BuildError),
    #[error(
        "cache.consistency = \"notify\" needs the change-feed triggers, which are not installed. \
         Run `knoxgate migrate` to install them, or set cache.consistency to \"ttl\" \
         (KNOXGATE_CACHE_CONSISTENCY=ttl) to run without them"
    )]
    TriggersMissing,
}

impl App {
    pub fn new(config: Config) -> Result<Arc<App>, StartError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(Store::connect(&config, Arc::clone(&metrics))?);
        let s = &config.sessions;
        Ok(Arc::new(App {
            in_flight: Arc::new(Semaphore::new(config.server.max_in_flight)),
            hash_slots: Arc::new(Semaphore::new(s.hash_slots())),
            hash_pool: HashPool::new(s.hash_slots(), s.hash_nice).map_err(StartError::Threads)?,
            login_throttle: Throttle::new(s.throttle_failures, s.throttle_window),
            // Well-formed, so checking it runs the full derivation; computing a real one here
            // would cost a hash at every startup for nothing.
            dummy_hash: format!(
                "pbkdf2_sha256${}$knoxgatetimingsalt0000${}=",
                s.password_iterations,
                "A".repeat(43)
            ),
            config,
            store,
            metrics,
        }))
    }
}

/// A running knoxgate, as returned by [`start`].
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub app: Arc<App>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, drains in-flight requests (bounded by the grace period) and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(redis) = self.app.store.redis() {
            redis.quit().await;
        }
    }

    /// Whether the service is ready: Redis connected (if configured) and, in notify mode, the
    /// change feed live.
    pub fn ready(&self) -> bool {
        let store = &self.app.store;
        let redis_ok = store.redis().is_none_or(|r| r.is_connected());
        let notify = self.app.config.cache.consistency == Consistency::Notify;
        redis_ok && (!notify || store.feed_live())
    }
}

/// In notify mode, refuses to start against a reachable database without the triggers. An
/// unreachable database is not a reason to refuse: the feed retries, and answers meanwhile are
/// confirmed with Postgres.
async fn check_triggers(config: &Config) -> Result<(), StartError> {
    if config.cache.consistency != Consistency::Notify {
        return Ok(());
    }
    let attempt = async {
        let client = crate::store::postgres::connect_one(&config.postgres).await?;
        schema::triggers_installed(&client, &config.postgres)
            .await
            .map_err(|e| StoreError::Postgres(e.to_string()))
    };
    match tokio::time::timeout(
        config.postgres.connect_timeout + config.postgres.statement_timeout,
        attempt,
    )
    .await
    {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(StartError::TriggersMissing),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "postgres unreachable at startup; serving anyway, not ready until it answers");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(
                "postgres did not answer at startup; serving anyway, not ready until it answers"
            );
            Ok(())
        }
    }
}

/// Open connections allowed on the admin listener (probes and scrapes only).
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// How often expired in-process entries are freed and failed Redis deletions retried.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Binds both listeners and starts serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    check_triggers(&config).await?;
    let app = App::new(config)?;
    let cfg = Arc::clone(&app.config);
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let main_listener = bind(cfg.server.listen).await?;
    let admin_listener = bind(cfg.server.admin_listen).await?;
    let addr = main_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: cfg.server.listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: cfg.server.admin_listen,
            source,
        })?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let connections = Arc::new(Semaphore::new(cfg.server.max_connections));
    let limits = Limits::from(&cfg.server);
    let mut tasks = Vec::new();

    let main_app = Arc::clone(&app);
    tasks.push(tokio::spawn(server::serve(
        main_listener,
        limits.clone(),
        Arc::clone(&connections),
        move |req, peer| http::main_service(Arc::clone(&main_app), req, peer),
        shutdown_rx.clone(),
    )));
    let admin_app = Arc::clone(&app);
    tasks.push(tokio::spawn(server::serve(
        admin_listener,
        limits,
        // Its own cap: a flood on the main port must not starve probes and scrapes.
        Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS)),
        move |req, _peer| http::admin::admin_service(Arc::clone(&admin_app), req),
        shutdown_rx.clone(),
    )));
    if cfg.cache.consistency == Consistency::Notify {
        tasks.push(tokio::spawn(feed::run(
            Arc::clone(&app.store),
            Arc::clone(&cfg),
            Arc::clone(&app.metrics),
            shutdown_rx.clone(),
        )));
    }
    let store = Arc::clone(&app.store);
    let mut stop = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => store.housekeeping().await,
                _ = stop.changed() => return,
            }
        }
    }));
    tracing::info!(%addr, %admin_addr, consistency = ?cfg.cache.consistency, "knoxgate serving");
    Ok(Running {
        addr,
        admin_addr,
        app,
        shutdown,
        tasks,
    })
}
