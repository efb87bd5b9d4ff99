//! The tiered token store: in-process cache → Redis → Postgres, and the writes that keep all
//! three consistent.
//!
//! Reads go down the tiers until one can answer; what a lower tier returns is cached in the tiers
//! above. Concurrent misses for one key share a single load. Writes (logout, expired cleanup,
//! login, refresh) go to Postgres first, then evict or fill the caches. Revocations made
//! elsewhere arrive through the change feed (`crate::feed`), which calls [`Store::apply`].

pub mod memory;
pub mod payload;
pub mod postgres;
pub mod redis;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use time::OffsetDateTime;
use tokio::sync::OnceCell;

use crate::{
    auth::{StoredDigest, TokenDigest, TokenRow},
    config::{Config, Consistency},
    metrics::Metrics,
};
use memory::{Entry, MemoryCache, Rows};
use postgres::{Postgres, Removed};
use redis::RedisTier;

/// The store could not answer: Postgres is unreachable or failed, and no cache could stand in.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Postgres(String),
}

/// The tiers could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Postgres(#[from] StoreError),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Redis,
    Postgres,
}

/// The rows for a token key, as far as the store could tell.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub entry: Arc<Entry>,
    pub tier: Tier,
    /// Served from cache because Postgres could not confirm it (stale-if-error).
    pub stale: bool,
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
    /// Events may have been missed: nothing cached can be trusted.
    Everything,
}

/// Store tunables taken from [`Config`].
#[derive(Debug, Clone)]
struct Settings {
    consistency: Consistency,
    stale_if_error: bool,
    max_cache_ttl: Duration,
    negative_ttl: Duration,
}

type Flight = Arc<OnceCell<Result<(Arc<Entry>, Tier), StoreError>>>;

/// Redis deletions that failed, retried until Redis answers. Older than the max cache TTL they
/// are moot: the entry they target has expired by itself.
#[derive(Default)]
struct PendingRedis {
    tokens: VecDeque<(Instant, Removed)>,
    keys: VecDeque<(Instant, String)>,
    users: VecDeque<(Instant, String)>,
}

/// Upper bound on remembered failed Redis deletions.
const MAX_PENDING_REDIS: usize = 100_000;

pub struct Store {
    memory: MemoryCache,
    redis: Option<RedisTier>,
    pg: Postgres,
    settings: Settings,
    metrics: Arc<Metrics>,
    inflight: Mutex<HashMap<Arc<str>, Flight>>,
    /// Bumped by every change applied; a load that sees it move evicts what it just cached, so
    /// a revocation that lands while a load is in flight cannot be overwritten by the load.
    epoch: AtomicU64,
    /// Changes being applied right now (see `Store::changing`).
    changes_in_flight: AtomicUsize,
    /// True while the change feed is connected and caught up.
    feed_live: AtomicBool,
    refreshing: Mutex<HashSet<StoredDigest>>,
    pending_redis: Mutex<PendingRedis>,
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
                max_cache_ttl: config.redis.max_cache_ttl,
                negative_ttl: config.cache.negative_ttl,
            },
            metrics,
            inflight: Mutex::default(),
            epoch: AtomicU64::new(0),
            changes_in_flight: AtomicUsize::new(0),
            feed_live: AtomicBool::new(false),
            refreshing: Mutex::default(),
            pending_redis: Mutex::default(),
        }
    }

    pub fn postgres(&self) -> &Postgres {
        &self.pg
    }

    pub fn redis(&self) -> Option<&RedisTier> {
        self.redis.as_ref()
    }

    /// Periodic upkeep: frees expired in-process entries and retries failed Redis deletions.
    pub async fn housekeeping(&self) {
        self.memory.purge_expired();
        self.retry_pending_redis().await;
    }

    pub fn memory_entries(&self) -> u64 {
        self.memory.entry_count()
    }

    /// Marks the change feed as live (connected and caught up) or not.
    pub fn set_feed_live(&self, live: bool) {
        self.feed_live.store(live, Ordering::SeqCst);
    }

    pub fn feed_live(&self) -> bool {
        self.feed_live.load(Ordering::SeqCst)
    }

    /// Whether a cached answer must be confirmed with Postgres before use.
    fn must_confirm(&self) -> bool {
        match self.settings.consistency {
            Consistency::Strict => true,
            Consistency::Notify => !self.feed_live(),
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
        let ttl = self.ttl_for(&rows, OffsetDateTime::now_utc());
        Arc::new(Entry {
            rows,
            complete,
            ttl,
        })
    }

    /// Caches `entry` unless a change landed since `epoch` or is under way, in which case it may
    /// be stale. Checked after inserting, so a change that starts meanwhile is seen too.
    fn remember(&self, key: &str, entry: Arc<Entry>, epoch: u64) {
        self.memory.insert(key, entry);
        if !self.unchanged_since(epoch) {
            self.memory.remove(key);
        }
    }

    // === Reads ===

    /// The rows stored under `key`, from the cheapest tier that can answer for `digest`.
    pub async fn lookup(&self, key: &str, digest: &TokenDigest) -> Result<Lookup, StoreError> {
        if let Some(entry) = self.memory.get(key) {
            let matched = entry.rows.iter().any(|r| r.digest.matches(digest));
            if matched && self.must_confirm() {
                self.metrics.lookup("memory", "hit");
                return Box::pin(self.confirm(key, digest, entry)).await;
            }
            // A feed outage may have hidden the INSERT that would have cleared a negative entry.
            let negative_in_doubt =
                !matched && self.settings.consistency == Consistency::Notify && !self.feed_live();
            if matched || (entry.complete && !negative_in_doubt) {
                let result = if entry.is_negative() {
                    "negative_hit"
                } else {
                    "hit"
                };
                self.metrics.lookup("memory", result);
                return Ok(Lookup {
                    entry,
                    tier: Tier::Memory,
                    stale: false,
                });
            }
        }
        self.metrics.lookup("memory", "miss");
        // Boxed: the loads below are large state machines, and kept inline they would make
        // every request's future (hits included) that large to create and move.
        let (entry, tier) = Box::pin(self.load_shared(key, digest)).await?;
        if !entry.complete && !entry.rows.iter().any(|r| r.digest.matches(digest)) {
            // Another request's load found a Redis entry for a different token under this key.
            let epoch = self.epoch.load(Ordering::SeqCst);
            let entry = Box::pin(self.load_from_postgres(key, digest, epoch)).await?;
            return Ok(Lookup {
                entry,
                tier: Tier::Postgres,
                stale: false,
            });
        }
        Ok(Lookup {
            entry,
            tier,
            stale: false,
        })
    }

    /// Re-reads the row with this digest by primary key before a cached answer is used.
    async fn confirm(
        &self,
        key: &str,
        digest: &TokenDigest,
        cached: Arc<Entry>,
    ) -> Result<Lookup, StoreError> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        match self.pg.confirm(&digest.to_hex()).await {
            Ok(fresh) => {
                let mut rows: Rows = cached
                    .rows
                    .iter()
                    .filter(|r| !r.digest.matches(digest))
                    .cloned()
                    .collect();
                rows.extend(fresh);
                let entry = self.entry(rows, cached.complete);
                self.remember(key, entry.clone(), epoch);
                Ok(Lookup {
                    entry,
                    tier: Tier::Postgres,
                    stale: false,
                })
            }
            Err(e) if self.settings.stale_if_error => {
                self.metrics.stale_answers.inc();
                tracing::debug!(error = %e, "serving a cached answer while postgres is unreachable");
                Ok(Lookup {
                    entry: cached,
                    tier: Tier::Memory,
                    stale: true,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Loads `key` below the in-process tier, sharing one load among concurrent callers.
    async fn load_shared(
        &self,
        key: &str,
        digest: &TokenDigest,
    ) -> Result<(Arc<Entry>, Tier), StoreError> {
        let (flight, leader) = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            match inflight.get(key) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Flight::default();
                    inflight.insert(Arc::from(key), f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            self.metrics.coalesced_misses.inc();
        }
        let _guard = FlightGuard {
            store: self,
            key,
            flight: &flight,
        };
        flight.get_or_init(|| self.load(key, digest)).await.clone()
    }

    /// Redis, then Postgres.
    async fn load(
        &self,
        key: &str,
        digest: &TokenDigest,
    ) -> Result<(Arc<Entry>, Tier), StoreError> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        if let Some(redis) = &self.redis {
            match redis.get(key).await {
                Ok(Some(cached)) if cached.digest.matches(digest) => {
                    self.metrics.lookup("redis", "hit");
                    let row = match cached.into_row() {
                        // Written by knoxgate: carries the user's status.
                        Some(row) if !self.must_confirm() => Some(row),
                        // Written by django-rest-knox-redis (no user status), or a mode that
                        // wants confirmation: one primary-key query settles it.
                        Some(row) => match self.pg.confirm(&digest.to_hex()).await {
                            Ok(fresh) => fresh,
                            Err(e) if self.settings.stale_if_error => {
                                self.metrics.stale_answers.inc();
                                tracing::debug!(error = %e, "serving a redis entry while postgres is unreachable");
                                Some(row)
                            }
                            Err(e) => return Err(e),
                        },
                        None => self.pg.confirm(&digest.to_hex()).await?,
                    };
                    match row {
                        Some(row) => {
                            let entry = self.entry(smallvec::smallvec![row], false);
                            self.remember(key, entry.clone(), epoch);
                            return Ok((entry, Tier::Redis));
                        }
                        None => {
                            // The entry outlived its row: drop it and ask Postgres for the key.
                            self.forget_key(key).await;
                        }
                    }
                }
                Ok(_) => self.metrics.lookup("redis", "miss"),
                Err(_) => self.metrics.lookup("redis", "error"),
            }
        }
        let entry = self.load_from_postgres(key, digest, epoch).await?;
        Ok((entry, Tier::Postgres))
    }

    async fn load_from_postgres(
        &self,
        key: &str,
        digest: &TokenDigest,
        epoch: u64,
    ) -> Result<Arc<Entry>, StoreError> {
        let rows = self.pg.lookup(key).await?;
        self.metrics
            .lookup("postgres", if rows.is_empty() { "miss" } else { "hit" });
        let now = OffsetDateTime::now_utc();
        let usable = rows
            .iter()
            .find(|r| r.digest.matches(digest) && !r.is_expired(now) && r.user.is_active)
            .cloned();
        let entry = self.entry(rows, true);
        self.remember(key, entry.clone(), epoch);
        if let (Some(row), Some(redis)) = (usable, &self.redis)
            && redis.is_connected()
            && redis.put(&row, now).await.is_ok()
            && !self.unchanged_since(epoch)
        {
            // A change landed while we were writing; our entry may predate it.
            self.forget_key(key).await;
        }
        Ok(entry)
    }

    // === Writes ===

    /// Evicts these tokens from every tier.
    pub async fn forget(&self, removed: &[Removed]) {
        for (key, _) in removed {
            self.memory.remove(key);
        }
        if let Some(redis) = &self.redis
            && redis.delete(removed).await.is_err()
        {
            let mut p = self.pending_redis.lock().expect("pending lock");
            for r in removed {
                push_bounded(&mut p.tokens, r.clone());
            }
        }
    }

    async fn forget_key(&self, key: &str) {
        self.memory.remove(key);
        if let Some(redis) = &self.redis
            && redis.delete_key(key).await.is_err()
        {
            push_bounded(
                &mut self.pending_redis.lock().expect("pending lock").keys,
                key.to_owned(),
            );
        }
    }

    async fn forget_user(&self, user_id: &str) {
        self.memory.remove_user(user_id);
        if let Some(redis) = &self.redis
            && redis.delete_user(user_id).await.is_err()
        {
            push_bounded(
                &mut self.pending_redis.lock().expect("pending lock").users,
                user_id.to_owned(),
            );
        }
    }

    /// Runs `change` between two epoch bumps. A load that overlaps any part of it — even one
    /// that read Redis after the in-process eviction but before the Redis deletion — sees the
    /// epoch move and drops what it read instead of caching it.
    async fn changing<T>(&self, change: impl Future<Output = T>) -> T {
        struct InFlight<'a>(&'a Store);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                // Bump again on the way out (even if cancelled), then leave the window.
                self.0.epoch.fetch_add(1, Ordering::SeqCst);
                self.0.changes_in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.changes_in_flight.fetch_add(1, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight(self);
        change.await
    }

    /// True when no change has started since `epoch` and none is under way: then what a load
    /// read after reading `epoch` may be cached.
    fn unchanged_since(&self, epoch: u64) -> bool {
        self.changes_in_flight.load(Ordering::SeqCst) == 0
            && self.epoch.load(Ordering::SeqCst) == epoch
    }

    /// Applies a change reported by the feed to every tier.
    pub async fn apply(&self, change: &Change) {
        self.changing(async {
            match change {
                Change::Token { token_key, user_id } => {
                    self.forget(&[(token_key.clone(), user_id.clone())]).await;
                }
                Change::Inserted { token_key } => self.memory.remove(token_key),
                Change::User { user_id } => self.forget_user(user_id).await,
                Change::Everything => self.memory.clear(),
            }
        })
        .await
    }

    /// Retries Redis deletions that failed earlier. Returns how many are still pending.
    pub async fn retry_pending_redis(&self) -> usize {
        let Some(redis) = &self.redis else { return 0 };
        let horizon = Instant::now().checked_sub(self.settings.max_cache_ttl);
        let (tokens, keys, users) = {
            let mut p = self.pending_redis.lock().expect("pending lock");
            let fresh = |at: &Instant| horizon.is_none_or(|h| *at > h);
            p.tokens.retain(|(at, _)| fresh(at));
            p.keys.retain(|(at, _)| fresh(at));
            p.users.retain(|(at, _)| fresh(at));
            if (p.tokens.is_empty() && p.keys.is_empty() && p.users.is_empty())
                || !redis.is_connected()
            {
                return p.tokens.len() + p.keys.len() + p.users.len();
            }
            (
                std::mem::take(&mut p.tokens),
                std::mem::take(&mut p.keys),
                std::mem::take(&mut p.users),
            )
        };
        let mut left = PendingRedis::default();
        for (at, r) in tokens {
            if redis.delete(std::slice::from_ref(&r)).await.is_err() {
                left.tokens.push_back((at, r));
            }
        }
        for (at, k) in keys {
            if redis.delete_key(&k).await.is_err() {
                left.keys.push_back((at, k));
            }
        }
        for (at, u) in users {
            if redis.delete_user(&u).await.is_err() {
                left.users.push_back((at, u));
            }
        }
        let mut p = self.pending_redis.lock().expect("pending lock");
        p.tokens.extend(left.tokens);
        p.keys.extend(left.keys);
        p.users.extend(left.users);
        p.tokens.len() + p.keys.len() + p.users.len()
    }

    /// Deletes the expired tokens of the presented token's user (knox deletes an expired token
    /// when it is presented, with the user's other expired tokens).
    pub async fn delete_expired(&self, key: &str, digest: &TokenDigest) -> Result<(), StoreError> {
        self.changing(async {
            self.memory.remove(key);
            let removed = self.pg.delete_expired_of_user(&digest.to_hex()).await?;
            self.forget(&removed).await;
            Ok(())
        })
        .await
    }

    /// Logout: deletes one token everywhere.
    pub async fn logout(&self, digest: &StoredDigest) -> Result<(), StoreError> {
        self.changing(async {
            let removed = self.pg.delete_token(&digest.to_text()).await?;
            self.forget(&removed).await;
            Ok(())
        })
        .await
    }

    /// Logout-all: deletes every token of the presented token's user, everywhere.
    pub async fn logout_all(&self, digest: &StoredDigest, user_id: &str) -> Result<(), StoreError> {
        self.changing(async {
            let removed = self.pg.delete_all_of_user(&digest.to_text()).await?;
            self.forget(&removed).await;
            self.memory.remove_user(user_id);
            Ok(())
        })
        .await
    }

    /// Caches a token just created (login), replacing any negative entry for its key.
    pub async fn remember_new(&self, row: TokenRow) {
        let key = row.token_key.clone();
        self.memory.remove(&key);
        if let Some(redis) = &self.redis
            && redis.is_connected()
        {
            let _ = redis.put(&row, OffsetDateTime::now_utc()).await;
        }
        // Only this row is known for the key, so the entry is partial.
        let entry = self.entry(smallvec::smallvec![row], false);
        self.memory.insert(&key, entry);
    }

    /// AUTO_REFRESH: moves a token's expiry in every tier, once per token at a time.
    pub fn refresh(self: &Arc<Self>, row: &TokenRow, new_expiry: OffsetDateTime) {
        if !self
            .refreshing
            .lock()
            .expect("refresh lock")
            .insert(row.digest.clone())
        {
            return; // another request is already writing this token's refresh
        }
        let mut updated = row.clone();
        updated.expiry = Some(new_expiry);
        // Update the in-process entry now, so requests arriving before the write lands see the
        // new expiry and do not schedule writes of their own.
        if let Some(entry) = self.memory.get(&row.token_key) {
            let rows = entry
                .rows
                .iter()
                .map(|r| {
                    if r.digest == row.digest {
                        updated.clone()
                    } else {
                        r.clone()
                    }
                })
                .collect();
            self.memory
                .insert(&row.token_key, self.entry(rows, entry.complete));
        }
        let store = Arc::clone(self);
        tokio::spawn(async move {
            if store
                .pg
                .refresh_expiry(&updated.digest.to_text(), new_expiry)
                .await
                .is_ok()
                && let Some(redis) = &store.redis
            {
                let _ = redis.put(&updated, OffsetDateTime::now_utc()).await;
            }
            store
                .refreshing
                .lock()
                .expect("refresh lock")
                .remove(&updated.digest);
        });
    }
}

fn push_bounded<T>(queue: &mut VecDeque<(Instant, T)>, item: T) {
    if queue.len() >= MAX_PENDING_REDIS {
        tracing::warn!("too many pending redis deletions; dropping the oldest (it expires by TTL)");
        queue.pop_front();
    }
    queue.push_back((Instant::now(), item));
}

/// Removes a finished or abandoned load from the in-flight map.
struct FlightGuard<'a> {
    store: &'a Store,
    key: &'a str,
    flight: &'a Flight,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut inflight = self.store.inflight.lock().expect("inflight lock");
        if inflight
            .get(self.key)
            .is_some_and(|f| Arc::ptr_eq(f, self.flight))
        {
            // A finished load must not be reused by later requests; an abandoned one (its
            // callers all cancelled) must not block them either.
            inflight.remove(self.key);
        }
    }
}
