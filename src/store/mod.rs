//! The tiered token store: in-process cache → Redis → Postgres, and the writes that keep all
//! three consistent.
//!
//! Reads go down the tiers until one can answer; what a lower tier returns is cached in the tiers
//! above. Concurrent misses for one key share a single load. Writes (logout, expired cleanup,
//! login, refresh) go to Postgres first, then evict or fill the caches. Revocations made
//! elsewhere arrive through the change feed ([`feed`]), which calls [`Store::apply`].
//!
//! The [`Store`] facade is defined here; each mechanism has a file of its own:
//!
//! - [`read`](self::read): the read path (`lookup`, confirmation, loads from Redis and Postgres);
//! - [`write`](self::write): logout, expired cleanup, new tokens, refresh, applying changes;
//! - [`flight`]: single-flight for concurrent misses;
//! - [`lookup_batch`]: cold lookups of different keys that arrive together share one query;
//! - [`epoch`]: the change window that keeps a load from caching over a revocation;
//! - [`outbox`]: Redis deletions that failed, retried until Redis answers;
//! - [`tombstones`]: recent revocations, so a Redis entry that outlived one is not trusted;
//! - [`known_keys`]: the token keys that exist, so a flood of random tokens costs no query;
//! - the tiers: [`memory`], [`redis`] (with [`payload`], knox-redis's format), [`postgres`]
//!   (token SQL) with `users` (login and user SQL) and [`pg`] (connection set-up);
//! - [`feed`] and [`schema`]: the Postgres change feed and the triggers that feed it; [`relay`]:
//!   the same changes fanned out to a fleet through a Redis stream.

mod cancel;
pub mod change;
pub mod epoch;
pub mod feed;
pub mod flight;
pub mod known_keys;
pub mod lookup_batch;
pub mod memory;
pub mod outbox;
pub mod payload;
pub mod pg;
pub mod postgres;
mod read;
pub mod redis;
pub mod relay;
pub mod schema;
pub mod tls;
pub mod tombstones;
mod users;
mod write;

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use time::OffsetDateTime;

use crate::{
    auth::{StoredDigest, TokenRow},
    config::{Config, Consistency},
    metrics::Metrics,
};
use epoch::{ChangeWindow, Epoch};
use flight::Flights;
use known_keys::KnownKeys;
use memory::{Entry, MemoryCache, Rows};
use outbox::Outbox;
use postgres::Postgres;
use redis::RedisTier;
use tombstones::Tombstones;
pub use users::{Committed, LoginUser, NewToken, NewUser, NotCreated};

/// The store could not answer: Postgres is unreachable or failed, and no cache could stand in.
/// Each variant keeps the cause as Postgres or the driver told it (server message and SQLSTATE).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Postgres did not answer within a deadline (statement, pool wait, connect).
    #[error("postgres timed out: {0}")]
    Timeout(String),
    /// Postgres could not be reached, or refused the connection (down, "too many clients",
    /// authentication, shutting down).
    #[error("postgres unavailable: {0}")]
    Unavailable(String),
    /// Postgres answered a statement with an error, or knoxgate could not read the answer.
    #[error("postgres error: {0}")]
    Query(String),
}

impl StoreError {
    /// A bounded metrics label for the kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Query(_) => "query",
        }
    }
}

/// The tiers could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Postgres(#[from] StoreError),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// The rows stored under a token key, as far as the store could tell, shared with the cache
/// entry they came from (no copy on the hot path).
#[derive(Debug, Clone)]
pub struct Lookup {
    entry: Arc<Entry>,
}

impl Lookup {
    /// The candidate rows, for `auth::decide`.
    pub fn rows(&self) -> &[TokenRow] {
        &self.entry.rows
    }

    /// Keeps `row` (one of [`Lookup::rows`], as `decide` returned it) for the caller to hold.
    pub fn keep(&self, row: &TokenRow) -> Option<KeptRow> {
        let index = self.entry.rows.iter().position(|r| std::ptr::eq(r, row))?;
        Some(KeptRow {
            entry: Arc::clone(&self.entry),
            index,
        })
    }
}

/// One row of a [`Lookup`], still shared with its cache entry.
#[derive(Debug, Clone)]
pub struct KeptRow {
    entry: Arc<Entry>,
    index: usize,
}

impl KeptRow {
    pub fn row(&self) -> &TokenRow {
        &self.entry.rows[self.index]
    }

    /// Where the signed assertion for this row is kept, and the row's place in its entry.
    pub fn assertion_slot(&self) -> (&crate::assertion::Slot, usize) {
        (&self.entry.assertion, self.index)
    }
}

/// A change made in Postgres by anyone, as reported by the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A token row was deleted or changed.
    Token { token_key: String, user_id: String },
    /// A token row was inserted: any negative entry for its key is now wrong.
    Inserted { token_key: String },
    /// A user was deactivated, deleted, or changed password.
    User { user_id: String },
    /// Events may have been missed: nothing cached in process can be trusted, nor the key
    /// filter's account of which keys exist.
    Everything,
    /// A table was truncated: every token may be gone, and no Redis entry is trusted until
    /// every entry written before it has expired.
    Truncated,
}

/// Store tunables taken from [`Config`].
#[derive(Debug, Clone)]
struct Settings {
    consistency: Consistency,
    stale_if_error: bool,
    confirm_timeout: Duration,
    max_cache_ttl: Duration,
    negative_ttl: Duration,
}

pub struct Store {
    memory: MemoryCache,
    redis: Option<RedisTier>,
    pg: Postgres,
    settings: Settings,
    metrics: Arc<Metrics>,
    flights: Flights<Result<Arc<Entry>, StoreError>>,
    changes: ChangeWindow,
    /// True while the change feed is connected and caught up.
    feed_live: AtomicBool,
    /// True while the feed's connection is up but its own NOTIFY does not come back.
    feed_deaf: AtomicBool,
    /// Notifications the feed's connection has heard and its loop has not applied yet, counted
    /// as they arrive, and statements of the feed's own running on that connection, during
    /// which Postgres holds notifications back (`feed::session`): while it is not 0, changes
    /// may be waiting.
    feed_unapplied: Arc<AtomicUsize>,
    /// When the feed stops being live unless it is heard from again (`relay::subscribe`: the
    /// last relay heartbeat plus `cache.feed_relay_timeout`), as nanoseconds after `started`;
    /// 0: no such limit. Checked at each use, so that the bound holds while the reader is
    /// still waiting on the stream.
    feed_live_until: AtomicU64,
    started: Instant,
    refreshing: Mutex<HashSet<StoredDigest>>,
    redis_outbox: Outbox,
    tombstones: Tombstones,
    known_keys: KnownKeys,
    /// The answer for a key refused by [`KnownKeys`]: no rows, shared, never cached.
    no_such_key: Arc<Entry>,
}

impl Store {
    /// Builds every tier from the configuration. Never waits for Postgres or Redis: both are
    /// connected lazily, so knoxgate starts while they are down.
    pub fn connect(config: &Config, metrics: Arc<Metrics>) -> Result<Store, BuildError> {
        let pg = Postgres::new(&config.postgres, Arc::clone(&metrics))?;
        let redis = match &config.redis.url {
            Some(url) => Some(RedisTier::connect(
                &config.redis,
                url,
                config.verify.needs_identity(),
                Arc::clone(&metrics),
            )?),
            None => None,
        };
        Ok(Store::new(config, pg, redis, metrics))
    }

    pub fn new(
        config: &Config,
        pg: Postgres,
        redis: Option<RedisTier>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Store {
            memory: MemoryCache::new(
                config.cache.memory_max_entries,
                config.cache.memory_max_bytes,
            ),
            redis,
            pg,
            settings: Settings {
                consistency: config.cache.consistency,
                stale_if_error: config.cache.stale_if_error,
                confirm_timeout: config.cache.confirm_timeout,
                max_cache_ttl: config.redis.max_cache_ttl,
                negative_ttl: config.cache.negative_ttl,
            },
            metrics,
            flights: Flights::default(),
            changes: ChangeWindow::default(),
            feed_live: AtomicBool::new(false),
            feed_deaf: AtomicBool::new(false),
            feed_unapplied: Arc::new(AtomicUsize::new(0)),
            feed_live_until: AtomicU64::new(0),
            started: Instant::now(),
            refreshing: Mutex::default(),
            redis_outbox: Outbox::new(config.redis.max_cache_ttl),
            // As long as a Redis entry could outlive the revocation, replays included.
            tombstones: Tombstones::new(config.replay_window()),
            known_keys: KnownKeys::new(
                config.cache.key_filter,
                config.cache.unknown_key_lookups_per_second,
            ),
            no_such_key: Arc::new(Entry {
                rows: Rows::new(),
                complete: true,
                ttl: Duration::ZERO,
                assertion: Default::default(),
            }),
        }
    }

    /// The change window's position, for a caller that reads Postgres itself and then hands
    /// what it read to the store to cache (a login's new token).
    pub fn changes_now(&self) -> epoch::Epoch {
        self.changes.current()
    }

    pub fn postgres(&self) -> &Postgres {
        &self.pg
    }

    pub fn redis(&self) -> Option<&RedisTier> {
        self.redis.as_ref()
    }

    /// Periodic upkeep: frees expired in-process entries, retries failed Redis deletions and
    /// closes pooled Postgres connections idle for `postgres.idle_timeout`.
    pub async fn housekeeping(&self) {
        self.memory.purge_expired();
        self.tombstones.purge_expired();
        self.retry_pending_redis().await;
        let closed = self.pg.close_idle();
        if closed > 0 {
            tracing::debug!(closed, "idle postgres connections closed");
        }
    }

    /// Keeps the filter of existing token keys ([`known_keys`]) loaded while the change feed is
    /// live: a load each time the feed becomes live, may have missed INSERTs while live (see
    /// [`Store::reload_key_filter`]), or the filter outgrows its size. Runs for
    /// the life of the server.
    pub async fn keep_known_keys(&self) {
        if !self.known_keys.enabled() {
            return;
        }
        loop {
            self.known_keys.load_wanted().await;
            while let Some(generation) = self.known_keys.pending_load() {
                let started = tokio::time::Instant::now();
                match self.load_known_keys(generation).await {
                    Ok(Some(keys)) => {
                        self.metrics.key_filter_loads.inc();
                        tracing::info!(
                            keys,
                            bytes = self.known_keys.current_bytes(),
                            elapsed = ?started.elapsed(),
                            "token key filter loaded: unknown keys past cache.unknown_key_lookups_per_second are refused without a query"
                        );
                    }
                    // Overtaken by a newer load, or the feed dropped meanwhile.
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "token key filter: load failed; every unknown key is asked of postgres until one succeeds");
                        tokio::time::sleep(known_keys::LOAD_RETRY_DELAY).await;
                    }
                }
            }
        }
    }

    /// Reads every token key, a page at a time; `None` if another load overtook this one.
    async fn load_known_keys(&self, generation: u64) -> Result<Option<usize>, StoreError> {
        let estimate = self.pg.estimated_tokens().await?;
        let mut load = self.known_keys.begin(generation, estimate);
        let mut after = String::new();
        loop {
            if self.known_keys.pending_load() != Some(load.generation()) {
                return Ok(None);
            }
            let page = self
                .pg
                .token_keys_after(&after, known_keys::LOAD_PAGE)
                .await?;
            for key in &page {
                load.add(key);
            }
            match page.last() {
                Some(last) if page.len() as i64 == known_keys::LOAD_PAGE => after.clone_from(last),
                _ => break,
            }
        }
        Ok(self.known_keys.finish(load))
    }

    /// The feed stayed live but may have missed INSERTs: the key filter is loaded afresh (see
    /// [`KnownKeys::reload`]).
    pub fn reload_key_filter(&self) {
        self.known_keys.reload();
    }

    /// Keys in the current key filter and its bytes (both 0 while none is current).
    pub fn key_filter_size(&self) -> (usize, usize) {
        (
            self.known_keys.current_keys(),
            self.known_keys.current_bytes(),
        )
    }

    pub fn memory_entries(&self) -> u64 {
        self.memory.entry_count()
    }

    /// Marks the change feed as live (connected and caught up) or not.
    pub fn set_feed_live(&self, live: bool) {
        if self.feed_live.swap(live, Ordering::SeqCst) != live {
            self.known_keys.feed_live_changed(live);
        }
    }

    pub fn feed_live(&self) -> bool {
        if !self.feed_live.load(Ordering::SeqCst) {
            return false;
        }
        match self.feed_live_until.load(Ordering::SeqCst) {
            0 => true,
            until => (Instant::now() - self.started).as_nanos() < u128::from(until),
        }
    }

    /// Sets when the feed stops being live unless heard from again; `None`: no limit. Set it
    /// before [`set_feed_live`](Self::set_feed_live)`(true)`.
    pub fn set_feed_live_until(&self, until: Option<Instant>) {
        let nanos = until.map_or(0, |until| {
            // At least 1: 0 means no limit.
            (until.saturating_duration_since(self.started).as_nanos() as u64).max(1)
        });
        self.feed_live_until.store(nanos, Ordering::SeqCst);
    }

    /// Marks the change feed as deaf (connected, but not hearing its own notifications) or not.
    pub fn set_feed_deaf(&self, deaf: bool) {
        self.feed_deaf.store(deaf, Ordering::SeqCst);
    }

    pub fn feed_deaf(&self) -> bool {
        self.feed_deaf.load(Ordering::SeqCst)
    }

    /// The count of notifications heard and not yet applied, for the task that hears them to
    /// add to as each arrives (and the feed's statements to hold while they run).
    pub fn feed_heard(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.feed_unapplied)
    }

    /// `n` heard notifications were applied.
    pub fn feed_applied(&self, n: usize) {
        self.feed_unapplied.fetch_sub(n, Ordering::SeqCst);
    }

    /// Nothing heard is waiting: the connection that heard it is gone, and its task stopped.
    pub fn feed_unapplied_dropped(&self) {
        self.feed_unapplied.store(0, Ordering::SeqCst);
    }

    /// Whether every change the feed has heard is applied: live, and nothing queued. A burst of
    /// changes (a group renamed: one per member) queues whatever comes behind it, a revocation
    /// too, for as long as it takes to apply.
    fn feed_current(&self) -> bool {
        self.feed_live() && self.feed_unapplied.load(Ordering::SeqCst) == 0
    }

    /// Whether a cached answer must be confirmed with Postgres before use.
    fn must_confirm(&self) -> bool {
        match self.settings.consistency {
            Consistency::Strict => true,
            Consistency::Notify => !self.feed_current(),
            Consistency::Ttl => false,
        }
    }

    /// How long an entry with these rows may be cached: never past the soonest expiry.
    fn ttl_for(&self, rows: &[TokenRow], now: OffsetDateTime) -> Duration {
        if rows.is_empty() {
            return self.settings.negative_ttl;
        }
        rows.iter()
            .filter_map(|r| r.expiry)
            .filter(|e| *e > now)
            .map(|e| Duration::try_from(e - now).unwrap_or(Duration::ZERO))
            .fold(self.settings.max_cache_ttl, Duration::min)
    }

    fn entry(&self, rows: Rows, complete: bool) -> Arc<Entry> {
        self.entry_within(rows, complete, None)
    }

    /// An entry that lives no longer than `cap` either (what its source has left to live).
    fn entry_within(&self, rows: Rows, complete: bool, cap: Option<Duration>) -> Arc<Entry> {
        let ttl = self.ttl_for(&rows, OffsetDateTime::now_utc());
        Arc::new(Entry {
            rows,
            complete,
            ttl: cap.map_or(ttl, |cap| ttl.min(cap)),
            assertion: Default::default(),
        })
    }

    /// Caches `entry` unless a change landed since `epoch` or is under way, in which case it may
    /// be stale (and then drops whatever the tier holds for the key). Checked before inserting,
    /// so that an entry already known to be stale is never seen, and after, so that a change
    /// that starts meanwhile is seen too. An entry that does
    /// not claim every row of its key answers only for the rows it holds, so a token inserted
    /// meanwhile cannot make it wrong: only removals count for it (epoch.rs).
    fn remember(&self, key: &str, entry: Arc<Entry>, epoch: Epoch) {
        self.remember_by(key, entry, epoch, MemoryCache::insert);
    }

    /// As `remember`, for an entry rebuilt from the one the tier holds (a hit confirmed with
    /// Postgres): it takes that entry's place and keeps its deadline. Confirming one row says
    /// nothing of rows added under the key since, so it must not renew an entry's claim to
    /// hold every row of its key, which only a load makes: a token made under the key of one
    /// in steady use would otherwise be refused for as long as that one is used.
    fn remember_confirmed(&self, key: &str, entry: Arc<Entry>, epoch: Epoch) {
        self.remember_by(key, entry, epoch, MemoryCache::replace);
    }

    fn remember_by(
        &self,
        key: &str,
        entry: Arc<Entry>,
        epoch: Epoch,
        put: fn(&MemoryCache, &str, Arc<Entry>),
    ) {
        let still_true = || {
            if entry.complete {
                self.changes.unchanged_since(epoch)
            } else {
                self.changes.nothing_removed_since(epoch)
            }
        };
        if !still_true() {
            // Whatever the tier holds for the key may predate the change too.
            self.memory.remove(key);
            return;
        }
        put(&self.memory, key, Arc::clone(&entry));
        if !still_true() {
            self.memory.remove(key);
        }
    }
}
