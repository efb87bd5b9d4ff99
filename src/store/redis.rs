//! The Redis tier: django-rest-knox-redis's keys, read and written through a fred pool that
//! never stalls a request.
//!
//! fred's defaults would hang (no command timeout) or never reconnect; every one is set here
//! from config. Reads use `fail_fast`, so while Redis is down they fail in microseconds and the
//! request goes on to Postgres; the pool reconnects in the background. No command touches two
//! keys at once and nothing uses MULTI, so the same code runs on Redis Cluster.
//!
//! A read fetches the entry and its remaining lifetime (`GET` and `PTTL`, pipelined: one round
//! trip), so that an entry copied into the in-process tier does not outlive its Redis key.
//!
//! On Redis Cluster a read goes straight to the master that owns its key's slot, over a
//! connection of its own with a breaker of its own ([`NodeReads`]): fred's cluster client stops
//! answering altogether while any one master is unreachable (it reconnects as a whole), and one
//! breaker for the whole cluster would do the same. So a dead master costs only the reads of
//! the keys it owns; those go to Postgres until a replica has taken over its slots.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

// tokio's clock (std's outside a runtime) so that the breaker's tests can pause time.
use fred::{
    interfaces::{ClientLike, ClusterInterface, EventInterface, KeysInterface, SetsInterface},
    prelude::{Builder, Client, Pool},
    types::{
        Expiration,
        config::{
            Config as FredConfig, Options, ReconnectPolicy, Server, ServerConfig,
            UnresponsiveConfig,
        },
    },
    util::redis_keyslot,
};
use futures_util::future::join_all;
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{
    payload::{self, CachedRow, Seal, Verifier},
    postgres::Removed,
};
use crate::{
    auth::TokenRow,
    config::{EntryKey, RedisConfig},
    metrics::Metrics,
};

/// The writes return boxed futures: fred's command futures are several KB each, and a caller
/// holding one inline grows by that much, even on paths that never write (the request path
/// reaches these writes only on a cache miss or a revocation).
pub type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Tokens whose eviction commands are in flight at once in [`RedisTier::delete`]: enough to
/// make a bulk removal one round trip per batch, few enough that the batch's command futures
/// (a few KB each) stay within a megabyte.
pub const DELETES_IN_FLIGHT: usize = 128;

/// Whether a command failed for want of a connection (rather than being refused by Redis).
fn connection_lost(e: &fred::error::Error) -> bool {
    matches!(
        e.kind(),
        fred::error::ErrorKind::IO
            | fred::error::ErrorKind::Timeout
            | fred::error::ErrorKind::Canceled
    )
}

/// The results of one batch of evictions ([`RedisTier::delete`]), counted per command and
/// reported once: hundreds of commands in flight fail together, and a line each (or a breaker
/// flipping at each) would say nothing more.
#[derive(Default)]
struct BatchOutcome {
    succeeded: usize,
    refused: usize,
    lost: usize,
    first_error: Option<fred::error::Error>,
}

impl BatchOutcome {
    /// Counts one command's result; whether it succeeded.
    fn count(
        &mut self,
        metrics: &Metrics,
        op: &'static str,
        r: Result<(), fred::error::Error>,
    ) -> bool {
        metrics.redis_command(op);
        match r {
            Ok(()) => {
                self.succeeded += 1;
                true
            }
            Err(e) => {
                metrics.redis_error(op);
                if connection_lost(&e) {
                    self.lost += 1;
                } else {
                    self.refused += 1;
                }
                self.first_error.get_or_insert(e);
                false
            }
        }
    }

    /// Moves the breaker and logs, once for the batch; whether the next batch is worth sending
    /// (something in this one succeeded).
    fn report(self, breaker: &Breaker, tokens: usize) -> bool {
        let error = self.first_error.map(|e| e.to_string()).unwrap_or_default();
        if self.lost > 0 {
            if breaker.trip() {
                tracing::warn!(op = "del", %error, "redis unavailable; answering from Postgres until it is back");
            }
        } else if self.succeeded > 0 && breaker.close() {
            tracing::info!(op = "del", "redis answers again");
        }
        if self.refused > 0 {
            tracing::warn!(
                tokens,
                refused = self.refused,
                %error,
                "redis refused evictions; they are retried until it takes them"
            );
        }
        self.succeeded > 0
    }
}

/// A Redis failure. Never a reason to deny: callers fall back to Postgres.
#[derive(Debug, Clone, thiserror::Error)]
#[error("redis: {0}")]
pub struct RedisError(String);

impl From<fred::error::Error> for RedisError {
    fn from(e: fred::error::Error) -> Self {
        RedisError(e.to_string())
    }
}

/// Handle to the Redis tier.
#[derive(Clone)]
pub struct RedisTier {
    pool: Pool,
    prefix: Arc<str>,
    max_ttl: Duration,
    read_options: Options,
    write_options: Options,
    metrics: Arc<Metrics>,
    breaker: Arc<Breaker>,
    /// Redis Cluster: reads go to their slot's master directly (`None` otherwise).
    node_reads: Option<Arc<NodeReads>>,
    /// Identity headers are configured: entries carry username and email.
    with_identity: bool,
    /// Seals the entries written and checks those read (`redis.entry_key`).
    entry_key: Option<Arc<EntryKey>>,
}

/// An entry read from Redis, with how long its key has left to live (`None`: no expiry set).
#[derive(Debug, Clone)]
pub struct Hit {
    pub row: CachedRow,
    pub remaining: Option<Duration>,
}

/// Reads a `PTTL` reply: milliseconds left, `-1` for a key without expiry, `-2` for a key gone
/// (expired between the `GET` and the `PTTL`: nothing left).
pub fn remaining_from_pttl(pttl: i64) -> Option<Duration> {
    match pttl {
        -1 => None,
        ms if ms < 0 => Some(Duration::ZERO),
        ms => Some(Duration::from_millis(ms as u64)),
    }
}

/// A circuit breaker. After a failure Redis is skipped for a cool-down; then one request probes
/// it (half-open) while the others keep skipping, and a success closes the breaker. A dead Redis
/// therefore costs one failed command per cool-down (one batch of evictions, for a bulk
/// removal), not one per request. fred's connection events trip and close it too, because fred's
/// own connection state lags behind a dead peer.
struct Breaker {
    epoch: Instant,
    tripped: AtomicBool,
    /// Milliseconds since `epoch` before which no request may probe.
    next_probe_ms: AtomicU64,
    cooldown: Duration,
}

impl Breaker {
    fn new(cooldown: Duration) -> Self {
        Breaker {
            epoch: Instant::now(),
            tripped: AtomicBool::new(false),
            next_probe_ms: AtomicU64::new(0),
            cooldown,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether this request may use Redis: always while closed; once per cool-down while open.
    fn admit(&self) -> bool {
        if !self.tripped.load(Ordering::Acquire) {
            return true;
        }
        let now = self.now_ms();
        let next = self.next_probe_ms.load(Ordering::Acquire);
        now >= next
            && self
                .next_probe_ms
                .compare_exchange(
                    next,
                    now + self.cooldown.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    fn is_closed(&self) -> bool {
        !self.tripped.load(Ordering::Acquire)
    }

    /// Opens the breaker; true when it was closed (a change of state worth logging).
    fn trip(&self) -> bool {
        self.next_probe_ms.store(
            self.now_ms() + self.cooldown.as_millis() as u64,
            Ordering::Release,
        );
        !self.tripped.swap(true, Ordering::AcqRel)
    }

    /// Closes the breaker; true when it was open.
    fn close(&self) -> bool {
        self.tripped.swap(false, Ordering::AcqRel)
    }
}

/// Redis Cluster reads, one master at a time: a connection and a breaker per master, found by
/// the slot of the key in the routing table that the cluster client keeps (`CLUSTER SLOTS`).
/// Every master that owns slots gets its connection as soon as the cluster client learns of it
/// (it connects, or follows a failover), and a master that lost its slots loses its connection.
struct NodeReads {
    /// A client of the cluster pool, whose routing table says which master owns a slot.
    routing: Client,
    /// The cluster client's builder: every node connection gets the same timeouts, reconnect
    /// policy, credentials and TLS.
    builder: Builder,
    cooldown: Duration,
    nodes: RwLock<HashMap<Server, Arc<Node>>>,
}

struct Node {
    client: Client,
    breaker: Arc<Breaker>,
}

impl NodeReads {
    /// The connection to the master that owns `key`'s slot; `None` while the routing table is
    /// unknown (the cluster client has never connected).
    fn node_for(&self, key: &str) -> Option<Arc<Node>> {
        let state = self.routing.cached_cluster_state()?;
        let owner = state.get_server(redis_keyslot(key.as_bytes()))?;
        if let Some(node) = self.nodes.read().expect("node map").get(owner) {
            return Some(Arc::clone(node));
        }
        self.follow(state.unique_primary_nodes());
        self.nodes.read().expect("node map").get(owner).cloned()
    }

    /// Brings the connections in line with the cluster client's routing table.
    fn refresh(&self) {
        if let Some(state) = self.routing.cached_cluster_state() {
            self.follow(state.unique_primary_nodes());
        }
    }

    /// Opens a connection to every master in `owners` that has none, and closes those of the
    /// servers that are no longer masters owning slots (failed over, removed).
    fn follow(&self, owners: Vec<Server>) {
        {
            let nodes = self.nodes.read().expect("node map");
            if nodes.len() == owners.len() && owners.iter().all(|o| nodes.contains_key(o)) {
                return;
            }
        }
        let mut nodes = self.nodes.write().expect("node map");
        nodes.retain(|server, node| {
            let keep = owners.contains(server);
            if !keep {
                let client = node.client.clone();
                tokio::spawn(async move {
                    let _ = client.quit().await;
                });
            }
            keep
        });
        for server in owners {
            if !nodes.contains_key(&server)
                && let Some(node) = self.open(&server)
            {
                nodes.insert(server, Arc::new(node));
            }
        }
    }

    fn open(&self, server: &Server) -> Option<Node> {
        let mut config = self.builder.get_config()?.clone();
        config.server = ServerConfig::Centralized {
            server: server.clone(),
        };
        let mut builder = self.builder.clone();
        builder.set_config(config);
        let client = builder
            .build()
            .inspect_err(|e| tracing::warn!(%server, error = %e, "redis cluster node client"))
            .ok()?;
        let breaker = Arc::new(Breaker::new(self.cooldown));
        watch_connection(&client, &breaker);
        // The connection task runs (and reconnects) on its own; nothing waits for its handle.
        drop(client.connect());
        Some(Node { client, breaker })
    }

    /// Closes every node connection.
    async fn quit(&self) {
        let clients: Vec<Client> = self
            .nodes
            .read()
            .expect("node map")
            .values()
            .map(|n| n.client.clone())
            .collect();
        for client in clients {
            let _ = client.quit().await;
        }
    }
}

/// Trips `breaker` when `client`'s connection drops or stalls, before any request has to wait
/// out a command timeout to find out, and closes it on reconnection. Logged once per change of
/// state, with the cause (a refused TLS certificate, a refused connection, an authentication
/// error), at the default level.
fn watch_connection(client: &Client, breaker: &Arc<Breaker>) {
    let b = Arc::clone(breaker);
    client.on_error(move |(error, server)| {
        if b.trip() {
            let server = server.map(|s| s.to_string()).unwrap_or_default();
            tracing::warn!(%error, %server, "redis unavailable; answering from Postgres until it is back");
        }
        std::future::ready(Ok(()))
    });
    let b = Arc::clone(breaker);
    client.on_unresponsive(move |server| {
        if b.trip() {
            tracing::warn!(%server, "redis stopped answering; answering from Postgres until it is back");
        }
        std::future::ready(Ok(()))
    });
    let b = Arc::clone(breaker);
    client.on_reconnect(move |server| {
        if b.close() {
            tracing::info!(%server, "redis connection re-established");
        }
        std::future::ready(Ok(()))
    });
}

/// A fred builder for `url` with every timeout, the reconnect policy and TLS taken from
/// `[redis]`: the pool's, and the change-feed stream client's (`store::relay`).
pub(super) fn fred_builder(cfg: &RedisConfig, url: &str) -> Result<Builder, RedisError> {
    let mut config = FredConfig::from_url(url)?;
    let tls = &cfg.tls;
    if config.tls.is_some() && (tls.ca_file.is_some() || tls.client_cert.is_some()) {
        let client = crate::store::tls::client_config(
            tls.ca_file.as_deref(),
            tls.client_cert
                .as_ref()
                .map(|(c, k)| (c.as_str(), k.as_str())),
        )
        .map_err(|e| RedisError(format!("redis TLS files: {e}")))?;
        config.tls = Some(fred::types::config::TlsConfig::from(client));
    }
    // Start even while Redis is down; the reconnect policy brings it in later.
    config.fail_fast = false;
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = cfg.connect_timeout;
            c.internal_command_timeout = cfg.connect_timeout;
            c.max_command_attempts = 1;
            c.unresponsive = UnresponsiveConfig {
                max_timeout: Some(cfg.unresponsive_timeout),
                interval: cfg.unresponsive_check_interval(),
            };
            c.tcp.nodelay = Some(true);
        })
        .with_performance_config(|p| {
            p.default_command_timeout = cfg.command_timeout;
        })
        .set_policy(ReconnectPolicy::new_exponential(
            0, // retry forever
            100,
            cfg.reconnect_max_delay
                .as_millis()
                .min(u128::from(u32::MAX)) as u32,
            2,
        ));
    Ok(builder)
}

impl RedisTier {
    /// Builds the pool and starts connecting in the background; never waits for Redis.
    pub fn connect(
        cfg: &RedisConfig,
        url: &str,
        with_identity: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RedisError> {
        let builder = fred_builder(cfg, url)?;
        let pool = builder.build_pool(cfg.pool_size.get())?;
        if cfg.entry_key.is_none() {
            tracing::warn!(
                "redis.entry_key is not set: whoever can write to Redis can forge an entry that \
                 knoxgate accepts for any user id without asking Postgres. Set the same \
                 KNOXGATE_REDIS_ENTRY_KEY (or redis.entry_key_file) on every instance"
            );
        }
        let breaker = Arc::new(Breaker::new(cfg.breaker_cooldown));
        for client in pool.clients() {
            watch_connection(client, &breaker);
        }
        let node_reads = builder
            .get_config()
            .is_some_and(|c| c.server.is_clustered())
            .then(|| {
                let nodes = Arc::new(NodeReads {
                    routing: pool.next().clone(),
                    builder: builder.clone(),
                    cooldown: cfg.breaker_cooldown,
                    nodes: RwLock::default(),
                });
                for client in pool.clients() {
                    // Weak: the handler lives as long as the client, which NodeReads holds.
                    let nodes = Arc::downgrade(&nodes);
                    client.on_reconnect(move |_| {
                        if let Some(nodes) = nodes.upgrade() {
                            nodes.refresh();
                        }
                        std::future::ready(Ok(()))
                    });
                }
                nodes
            });
        let _ = pool.connect_pool();
        let read_options = Options {
            fail_fast: true,
            timeout: Some(cfg.command_timeout),
            max_attempts: Some(1),
            ..Default::default()
        };
        let write_options = read_options.clone();
        Ok(Self {
            pool,
            prefix: cfg.key_prefix.as_str().into(),
            max_ttl: cfg.max_cache_ttl,
            read_options,
            write_options,
            metrics,
            with_identity,
            breaker,
            node_reads,
            entry_key: cfg.entry_key.clone().map(Arc::new),
        })
    }

    /// Whether Redis is up as far as we know: a pooled connection is up and the breaker closed.
    pub fn is_connected(&self) -> bool {
        self.breaker.is_closed() && self.pool.clients().iter().any(|c| c.is_connected())
    }

    /// Whether a pooled connection is up, whatever the breaker says. A command that timed out
    /// on a connection that stays up opens the breaker with no reconnection to close it: only
    /// a probe does, and the retry queue of failed evictions sends one even where no request
    /// would (a quiet instance, a relay).
    pub fn has_connection(&self) -> bool {
        self.pool.clients().iter().any(|c| c.is_connected())
    }

    /// Fails at once while Redis is known to be unusable (no connection, or the breaker open and
    /// this request not its probe); such calls are never sent.
    fn ensure_available(&self) -> Result<(), RedisError> {
        if self.has_connection() && self.breaker.admit() {
            Ok(())
        } else {
            Err(RedisError("unavailable".into()))
        }
    }

    fn token_key(&self, token_key: &str) -> String {
        format!("{}:token:{}", self.prefix, token_key)
    }

    fn user_key(&self, user_id: &str) -> String {
        format!("{}:user:{}:tokens", self.prefix, user_id)
    }

    fn record<T>(
        &self,
        op: &'static str,
        r: Result<T, fred::error::Error>,
    ) -> Result<T, RedisError> {
        self.record_with(&self.breaker, op, r)
    }

    /// [`record`](Self::record) against the breaker of the connection that answered.
    fn record_with<T>(
        &self,
        breaker: &Breaker,
        op: &'static str,
        r: Result<T, fred::error::Error>,
    ) -> Result<T, RedisError> {
        self.metrics.redis_command(op);
        if r.is_ok() && breaker.close() {
            tracing::info!(op, "redis answers again");
        }
        r.map_err(|e| {
            self.metrics.redis_error(op);
            let connection_lost = connection_lost(&e);
            if connection_lost && breaker.trip() {
                tracing::warn!(op, error = %e, "redis unavailable; answering from Postgres until it is back");
            } else if !matches!(op, "get" | "smembers") {
                // A refused write (READONLY, MISCONF, NOREPLICAS, OOM) leaves Redis behind a
                // revocation or a login: worth a line each, and they are rare.
                tracing::warn!(op, error = %e, "redis refused a write");
            } else {
                tracing::debug!(op, error = %e, "redis command failed");
            }
            RedisError::from(e)
        })
    }

    /// Reads the entry for `token_key` and its remaining lifetime: `Ok(None)` on a miss or an
    /// unreadable entry.
    ///
    /// Not boxed, unlike the writes below: this is the Redis-tier hit path.
    pub async fn get(&self, token_key: &str) -> Result<Option<Hit>, RedisError> {
        let key = self.token_key(token_key);
        let (value, pttl) = match &self.node_reads {
            Some(nodes) => {
                // Only the master owning this key's slot has to be up.
                let node = nodes
                    .node_for(&key)
                    .filter(|n| n.client.is_connected() && n.breaker.admit())
                    .ok_or_else(|| RedisError("unavailable".into()))?;
                let queued = self.read_entry(&node.client, &key).await;
                self.record_with(&node.breaker, "get", queued)?
            }
            None => {
                self.ensure_available()?;
                let queued = self.read_entry(self.pool.next_connected(), &key).await;
                self.record("get", queued)?
            }
        };
        let verifier = self.entry_key.as_ref().map(|k| Verifier {
            key: k.as_bytes(),
            now: OffsetDateTime::now_utc().unix_timestamp(),
        });
        Ok(value.and_then(|v| {
            // Read in place from the reply buffer; not UTF-8 is unreadable like any garbage.
            let row = std::str::from_utf8(&v)
                .ok()
                .and_then(|v| payload::decode_with(token_key, v, self.with_identity, verifier));
            if row.is_none() {
                tracing::warn!(
                    token_key_len = token_key.len(),
                    "unreadable cache entry treated as a miss"
                );
            }
            row.map(|row| Hit {
                row,
                remaining: remaining_from_pttl(pttl),
            })
        }))
    }

    /// `GET` and `PTTL` of `key`, pipelined.
    async fn read_entry(
        &self,
        client: &Client,
        key: &str,
    ) -> Result<(Option<bytes::Bytes>, i64), fred::error::Error> {
        let pipeline = client.pipeline().with_options(&self.read_options);
        pipeline.get::<(), _>(key).await?;
        pipeline.pttl::<(), _>(key).await?;
        pipeline.all::<(Option<bytes::Bytes>, i64)>().await
    }

    /// Writes `row` as knox-redis does: the entry expires at the token's expiry or after the max
    /// cache TTL, whichever is sooner; nothing is written with less than a second left.
    pub fn put<'a>(
        &'a self,
        row: &'a TokenRow,
        now: OffsetDateTime,
    ) -> Boxed<'a, Result<(), RedisError>> {
        Box::pin(async move {
            self.ensure_available()?;
            let cap = now + self.max_ttl;
            let until = row.expiry.map_or(cap, |e| e.min(cap));
            let exat = until.unix_timestamp();
            if until - now < time::Duration::SECOND || exat <= now.unix_timestamp() {
                return Ok(());
            }
            // A lifetime relative to Redis's own clock, not an instant of this host's: a host
            // whose clock runs ahead would otherwise write entries that outlive max_cache_ttl,
            // and the tombstones of revocations that went unheard in Redis with them.
            let lifetime_ms = (until - now).whole_milliseconds() as i64;
            let client = self.pool.with_options(&self.write_options);
            let set = client.set::<(), _, _>(
                self.token_key(&row.token_key),
                payload::encode_with(
                    row,
                    self.with_identity,
                    self.entry_key.as_ref().map(|k| Seal {
                        key: k.as_bytes(),
                        until: exat,
                    }),
                ),
                Some(Expiration::PX(lifetime_ms)),
                None,
                false,
            );
            let user_key = self.user_key(&row.user_id);
            let sadd = client.sadd::<(), _, _>(user_key.as_str(), row.token_key.as_str());
            let (set, sadd) = tokio::join!(set, sadd);
            self.record("set", set)?;
            self.record("sadd", sadd)?;
            // On Redis's clock too: an index that expired before its entries would hide them
            // from a user's revocation.
            let max_ttl_ms = self.max_ttl.as_millis() as i64;
            let r = client
                .pexpire::<(), _>(user_key.as_str(), max_ttl_ms, None)
                .await;
            self.record("pexpire", r)
        })
    }

    /// Removes the entries of these tokens (and their user-index members). The commands for
    /// up to [`DELETES_IN_FLIGHT`] tokens are sent together (fred pipelines concurrent commands
    /// on a connection), so a bulk removal costs a round trip per batch, not per token. Returns
    /// the tokens whose removal failed or was not tried: one refused command costs its own token
    /// a retry, not the whole run; a batch of which nothing succeeded (Redis refusing writes,
    /// or gone) stops the rest from being sent. Each batch is logged, and moves the breaker,
    /// once.
    pub fn delete<'a>(&'a self, tokens: &'a [Removed]) -> Boxed<'a, Vec<Removed>> {
        Box::pin(async move {
            let client = self.pool.with_options(&self.write_options);
            let mut failed = Vec::new();
            let mut batches = tokens.chunks(DELETES_IN_FLIGHT);
            for batch in batches.by_ref() {
                if self.ensure_available().is_err() {
                    failed.extend_from_slice(batch);
                    break;
                }
                let sent = batch.iter().map(|(token_key, user_id)| {
                    let del = client.del::<(), _>(self.token_key(token_key));
                    let srem = client.srem::<(), _, _>(self.user_key(user_id), token_key.as_str());
                    async move { tokio::join!(del, srem) }
                });
                let mut outcome = BatchOutcome::default();
                for (token, (del, srem)) in batch.iter().zip(join_all(sent).await) {
                    let deleted = outcome.count(&self.metrics, "del", del);
                    if !(outcome.count(&self.metrics, "srem", srem) && deleted) {
                        failed.push(token.clone());
                    }
                }
                if !outcome.report(&self.breaker, batch.len()) {
                    break;
                }
            }
            for batch in batches {
                failed.extend_from_slice(batch);
            }
            failed
        })
    }

    /// Removes the entry of one token key (whoever it belongs to).
    pub fn delete_key<'a>(&'a self, token_key: &'a str) -> Boxed<'a, Result<(), RedisError>> {
        Box::pin(async move {
            self.ensure_available()?;
            let r = self
                .pool
                .with_options(&self.write_options)
                .del::<(), _>(self.token_key(token_key))
                .await;
            self.record("del", r)
        })
    }

    /// Removes every entry of `user_id`, found through its user index
    /// ([`delete_users`](Self::delete_users)).
    pub fn delete_user<'a>(&'a self, user_id: &'a str) -> Boxed<'a, Result<(), RedisError>> {
        Box::pin(async move {
            let users = [user_id.to_owned()];
            match self.delete_users(&users).await.is_empty() {
                true => Ok(()),
                false => Err(RedisError(format!("entries of user {user_id} remain"))),
            }
        })
    }

    /// Removes the entries of these users' tokens, found through their user indexes, and then
    /// the indexes, in batches of up to [`DELETES_IN_FLIGHT`] users. Within a batch, the
    /// indexes are read together and the entries they name deleted [`DELETES_IN_FLIGHT`] at a
    /// time (one DEL per key: keys of one user can live in different slots of a cluster, where
    /// one DEL naming them all would be refused), so a user with thousands of tokens costs
    /// round trips, not thousands of commands at once. An index goes only once every entry it
    /// named has, so a retry finds whatever remains. Returns the users whose entries may
    /// remain: those a command failed for, and every one after a round of commands in which
    /// none succeeded (Redis is down or refusing writes: the rest would only wait for their
    /// timeouts). Each round is logged, and moves the breaker, once.
    pub fn delete_users<'a>(&'a self, users: &'a [String]) -> Boxed<'a, Vec<String>> {
        Box::pin(async move {
            let mut failed = Vec::new();
            let mut batches = users.chunks(DELETES_IN_FLIGHT);
            for batch in batches.by_ref() {
                let (batch_failed, go_on) = self.delete_user_batch(batch).await;
                failed.extend(batch_failed.into_iter().cloned());
                if !go_on {
                    break;
                }
            }
            for batch in batches {
                failed.extend_from_slice(batch);
            }
            failed
        })
    }

    /// One batch of [`delete_users`](Self::delete_users): the users it may have left entries
    /// of, and whether the next batch is worth sending.
    async fn delete_user_batch<'u>(&self, users: &'u [String]) -> (Vec<&'u String>, bool) {
        if self.ensure_available().is_err() {
            return (users.iter().collect(), false);
        }
        let client = self.pool.with_options(&self.write_options);
        // Whether each user's entries have all gone so far.
        let mut whole = vec![true; users.len()];
        // The users some of whose entries may remain.
        let not_whole = |whole: &[bool]| -> Vec<&'u String> {
            users
                .iter()
                .zip(whole)
                .filter(|(_, ok)| !**ok)
                .map(|(user, _)| user)
                .collect()
        };

        let indexes = join_all(
            users
                .iter()
                .map(|user_id| client.smembers::<Vec<String>, _>(self.user_key(user_id))),
        )
        .await;
        // Each token key named, with its user's place in `users`.
        let mut entries: Vec<(usize, String)> = Vec::new();
        let mut outcome = BatchOutcome::default();
        for (i, members) in indexes.into_iter().enumerate() {
            let members = members.map(|keys| entries.extend(keys.into_iter().map(|k| (i, k))));
            whole[i] = outcome.count(&self.metrics, "smembers", members);
        }
        if !outcome.report(&self.breaker, users.len()) {
            return (users.iter().collect(), false);
        }

        let mut rounds = entries.chunks(DELETES_IN_FLIGHT);
        for round in rounds.by_ref() {
            let deleted = join_all(
                round
                    .iter()
                    .map(|(_, token_key)| client.del::<(), _>(self.token_key(token_key))),
            )
            .await;
            let mut outcome = BatchOutcome::default();
            for ((i, _), r) in round.iter().zip(deleted) {
                if !outcome.count(&self.metrics, "del", r) {
                    whole[*i] = false;
                }
            }
            if !outcome.report(&self.breaker, round.len()) {
                for (i, _) in rounds.flatten() {
                    whole[*i] = false;
                }
                return (not_whole(&whole), false);
            }
        }

        let emptied: Vec<usize> = (0..users.len()).filter(|i| whole[*i]).collect();
        let deleted = join_all(
            emptied
                .iter()
                .map(|i| client.del::<(), _>(self.user_key(&users[*i]))),
        )
        .await;
        let mut outcome = BatchOutcome::default();
        for (i, r) in emptied.iter().zip(deleted) {
            if !outcome.count(&self.metrics, "del", r) {
                whole[*i] = false;
            }
        }
        let go_on = emptied.is_empty() || outcome.report(&self.breaker, emptied.len());
        (not_whole(&whole), go_on)
    }

    /// Closes the connections.
    pub async fn quit(&self) {
        if let Some(nodes) = &self.node_reads {
            nodes.quit().await;
        }
        let _ = self.pool.quit().await;
    }
}

#[cfg(test)]
mod breaker_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn closed_admits_everyone_open_admits_one_probe_per_cooldown() {
        let b = Breaker::new(Duration::from_millis(50));
        assert!(b.admit() && b.admit(), "closed: every request");
        assert!(b.trip(), "a change of state");
        assert!(!b.trip(), "already open");
        assert!(!b.admit(), "open: nobody during the cool-down");
        tokio::time::advance(Duration::from_millis(49)).await;
        assert!(!b.admit(), "still cooling down");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.admit(), "one probe after the cool-down");
        assert!(!b.admit(), "and only one");
        assert!(b.close(), "a change of state");
        assert!(!b.close());
        assert!(b.is_closed() && b.admit());
    }
}
