//! Wiring: builds the runtime handles from a [`Config`], binds the listeners and runs the
//! background tasks (change feed, Redis retry) until shutdown.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tonic::codegen::Service as _;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinHandle,
};

pub use crate::state::{App, StartError};
use crate::{
    config::{Config, Consistency, FeedSource},
    grpc, http,
    metrics::{AtCap, CapLabels, Listener, Metrics},
    server::{self, Limits},
    store::{Store, feed, relay, schema},
};

/// A running knoxgate, as returned by [`start`].
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The gRPC ext_authz listener's address, when `server.grpc_listen` is set.
    pub grpc_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, drains in-flight requests and the work logins left running (the
    /// whole bounded by the grace period) and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.app.store.postgres().begin_stopping();
        let deadline = tokio::time::Instant::now() + self.app.config.server.shutdown_grace;
        join_within(self.tasks, deadline).await;
        self.app.store.postgres().finish_login_work(deadline).await;
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

/// Waits for the tasks told to stop until `deadline` (`server.shutdown_grace` from the stop),
/// then stops the ones still running (a listener still draining, a task waiting on a server
/// that does not answer): a process told to stop exits within its grace period whatever
/// Postgres and Redis are doing.
async fn join_within(tasks: Vec<JoinHandle<()>>, deadline: tokio::time::Instant) {
    for mut task in tasks {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            tracing::warn!("a task was still running at the end of server.shutdown_grace; stopped");
            task.abort();
        }
    }
}

/// Waits for SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// In notify mode, refuses to start against a reachable database without the triggers. An
/// unreachable database is not a reason to refuse: the feed retries, and answers meanwhile are
/// confirmed with Postgres.
async fn check_triggers(config: &Config) -> Result<(), StartError> {
    if config.cache.consistency != Consistency::Notify {
        return Ok(());
    }
    let attempt = async {
        let client = crate::store::pg::connect_one(&config.postgres).await?;
        schema::triggers_installed(&client, &config.postgres, config.verify.needs_identity())
            .await
            .map_err(|e| crate::store::pg::classify("trigger check", &e))
    };
    match tokio::time::timeout(config.postgres.connect_and_query_deadline(), attempt).await {
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

/// Says at start-up when the Postgres URLs will connect without TLS to a remote host.
fn warn_plaintext_postgres(config: &Config) {
    use crate::store::pg;
    let pool = pg::pg_config(&config.postgres).ok();
    let direct = pg::direct_config(&config.postgres).ok();
    let warnings: std::collections::BTreeSet<String> = [pool, direct]
        .iter()
        .flatten()
        .filter_map(pg::plaintext_warning)
        .collect();
    for w in warnings {
        tracing::warn!("{w}");
    }
}

/// Open connections allowed on the admin listener (probes and scrapes only).
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// How often expired in-process entries are freed and failed Redis deletions retried.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// `listener`'s connection cap over `slots`, counting in `metrics` what it does when full.
fn cap(metrics: &Metrics, slots: Arc<Semaphore>, listener: Listener) -> server::Cap {
    let counter = |action| {
        metrics
            .connections_at_cap
            .get_or_create(&CapLabels { listener, action })
            .clone()
    };
    server::Cap {
        slots,
        // Only the admin port's clients (probes, scrapes) may lose a kept-alive connection.
        evict: match listener {
            Listener::Admin => server::Evict::Idle,
            Listener::Main | Listener::Grpc => server::Evict::Unheard,
        },
        evicted: counter(AtCap::Evicted),
        refused: counter(AtCap::Refused),
    }
}

/// Binds `addr`; returns the listener and the address it got (port 0 picks one).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let bound = async {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok((listener, local))
    };
    bound
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Serves `/healthz`, `/readyz` (a cached probe) and `/metrics` (and the JWKS) on `listener`.
fn serve_admin(
    app: &Arc<App>,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    // Fixed for the process's life (`server.worker_threads`), so set once rather than at each
    // scrape.
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    app.metrics.runtime_worker_threads.set(workers as i64);
    let app = Arc::clone(app);
    let probe = Arc::new(http::admin::PostgresProbe::new(
        app.config.server.readiness_interval,
        app.config.server.readiness_timeout,
        app.config.cache.stale_if_error,
    ));
    tokio::spawn(server::serve(
        listener,
        Limits::from(&app.config.server),
        // Its own cap: a flood on the main port must not starve probes and scrapes.
        cap(
            &app.metrics,
            Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS)),
            Listener::Admin,
        ),
        move |req, _peer| http::admin::admin_service(Arc::clone(&app), Arc::clone(&probe), req),
        shutdown,
        None,
    ))
}

/// Loads the filter of existing token keys whenever the change feed becomes live.
fn keep_known_keys(store: Arc<Store>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = store.keep_known_keys() => {}
            _ = stop.changed() => {}
        }
    })
}

/// Frees expired in-process entries, retries failed Redis deletions, closes idle connections.
fn housekeeping(store: Arc<Store>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => store.housekeeping().await,
                _ = stop.changed() => return,
            }
        }
    })
}

/// A running `knoxgate relay`: the Postgres change feed republished to the Redis stream, and
/// the admin listener (`/healthz`; `/readyz`, 200 while Postgres answers and the feed is not
/// deaf, its body naming the feed's and Redis's state; `/metrics`).
pub struct RunningRelay {
    pub admin_addr: SocketAddr,
    pub store: Arc<Store>,
    publisher: Arc<relay::Publisher>,
    shutdown: watch::Sender<bool>,
    shutdown_grace: Duration,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningRelay {
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        join_within(
            self.tasks,
            tokio::time::Instant::now() + self.shutdown_grace,
        )
        .await;
        self.publisher.quit().await;
        if let Some(redis) = self.store.redis() {
            redis.quit().await;
        }
    }
}

/// Starts a relay (`knoxgate relay`). It evicts from Redis what it hears, as every instance
/// with its own listener does, and keeps no in-process tier: it answers no tokens.
pub async fn start_relay(mut config: Config) -> Result<RunningRelay, StartError> {
    config.cache.consistency = Consistency::Notify;
    config.cache.memory_max_bytes = 1;
    config.cache.key_filter = false;
    // It serves no cached answers: a Postgres it cannot reach makes it not ready (`/readyz`).
    config.cache.stale_if_error = false;
    let (pooler, triggers) = tokio::join!(
        crate::store::pg::probe_pooler(&config.postgres),
        check_triggers(&config)
    );
    triggers?;
    crate::store::pg::settle_pgbouncer(&mut config.postgres, pooler);
    let app = App::new(config)?;
    let cfg = Arc::clone(&app.config);
    let (admin_listener, admin_addr) = bind(cfg.server.admin_listen).await?;
    let publisher = Arc::new(relay::Publisher::connect(&cfg)?);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let tasks = vec![
        serve_admin(&app, admin_listener, shutdown_rx.clone()),
        tokio::spawn(feed::run(
            Arc::clone(&app.store),
            Arc::clone(&cfg),
            Arc::clone(&app.metrics),
            Some(Arc::clone(&publisher)),
            shutdown_rx.clone(),
        )),
        housekeeping(Arc::clone(&app.store), shutdown_rx),
    ];
    tracing::info!(%admin_addr, stream = %relay::stream_key(&cfg.redis.key_prefix), "knoxgate relay running");
    Ok(RunningRelay {
        admin_addr,
        store: Arc::clone(&app.store),
        publisher,
        shutdown,
        shutdown_grace: cfg.server.shutdown_grace,
        tasks,
    })
}

/// Binds both listeners and starts serving.
pub async fn start(mut config: Config) -> Result<Running, StartError> {
    warn_plaintext_postgres(&config);
    let (pooler, triggers) = tokio::join!(
        crate::store::pg::probe_pooler(&config.postgres),
        check_triggers(&config)
    );
    triggers?;
    crate::store::pg::settle_pgbouncer(&mut config.postgres, pooler);
    let app = App::new(config)?;
    let cfg = Arc::clone(&app.config);
    let (main_listener, addr) = bind(cfg.server.listen).await?;
    let (admin_listener, admin_addr) = bind(cfg.server.admin_listen).await?;
    let (grpc_listener, grpc_addr) = match cfg.server.grpc_listen {
        Some(addr) => {
            let (listener, bound) = bind(addr).await?;
            (Some(listener), Some(bound))
        }
        None => (None, None),
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let connections = Arc::new(Semaphore::new(cfg.server.max_connections.get()));
    let limits = Limits::from(&cfg.server);
    let mut tasks = Vec::new();

    let lane = match cfg.server.demote_after_refusals {
        Some(after) => Some(
            server::Lane::start(
                cfg.server.demoted_threads.get(),
                after,
                app.metrics.connections_demoted.clone(),
                app.metrics.connections_released.clone(),
            )
            .map_err(StartError::LaneThreads)?,
        ),
        None => None,
    };
    let main_app = Arc::clone(&app);
    tasks.push(tokio::spawn(server::serve(
        main_listener,
        limits.clone(),
        cap(&app.metrics, Arc::clone(&connections), Listener::Main),
        move |req, peer| http::main_service(Arc::clone(&main_app), req, peer),
        shutdown_rx.clone(),
        lane,
    )));
    if let Some(listener) = grpc_listener {
        // The main listener's connection cap, limits and drain; tonic's generated service
        // decodes the check and encodes the answer.
        let service = AuthorizationServer::new(grpc::Check::new(Arc::clone(&app)))
            .max_decoding_message_size(cfg.server.grpc_max_message_bytes);
        let grpc_app = Arc::clone(&app);
        tasks.push(tokio::spawn(server::serve(
            listener,
            limits.clone(),
            cap(&app.metrics, Arc::clone(&connections), Listener::Grpc),
            move |req, _peer| {
                let (mut service, app) = (service.clone(), Arc::clone(&grpc_app));
                async move {
                    let call = async {
                        match service.call(req).await {
                            Ok(response) => grpc::answer_refusals_as_denials(&app, response).await,
                            Err(never) => match never {},
                        }
                    };
                    grpc::within_request_timeout(&app, call).await
                }
            },
            shutdown_rx.clone(),
            // HTTP/2 multiplexes many clients over Envoy's connections: never demoted.
            None,
        )));
    }
    tasks.push(serve_admin(&app, admin_listener, shutdown_rx.clone()));
    if cfg.cache.consistency == Consistency::Notify {
        let (store, config, metrics) = (
            Arc::clone(&app.store),
            Arc::clone(&cfg),
            Arc::clone(&app.metrics),
        );
        tasks.push(match cfg.cache.feed {
            FeedSource::Listen => {
                tokio::spawn(feed::run(store, config, metrics, None, shutdown_rx.clone()))
            }
            FeedSource::Redis => tokio::spawn(relay::subscribe(
                store,
                config,
                metrics,
                shutdown_rx.clone(),
            )),
        });
    }
    tasks.push(housekeeping(Arc::clone(&app.store), shutdown_rx.clone()));
    if cfg.cache.consistency == Consistency::Notify {
        tasks.push(keep_known_keys(Arc::clone(&app.store), shutdown_rx.clone()));
    }
    tracing::info!(%addr, %admin_addr, grpc_addr = ?grpc_addr, consistency = ?cfg.cache.consistency, feed = ?cfg.cache.feed, "knoxgate serving");
    Ok(Running {
        addr,
        admin_addr,
        grpc_addr,
        app,
        shutdown,
        tasks,
    })
}
