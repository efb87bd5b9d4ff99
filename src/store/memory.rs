//! The in-process tier: a bounded cache from `token_key` to the rows stored under it.
//!
//! It holds digests and the user's status, never raw tokens. Each entry lives no longer than
//! its own time-to-live (the max cache TTL, the negative TTL, or the soonest token expiry).

use std::{sync::Arc, time::Duration};

use moka::sync::Cache;

use crate::auth::TokenRow;

/// What is cached for one `token_key`.
#[derive(Debug)]
pub struct Entry {
    /// The rows stored under the key (empty: the key is unknown).
    pub rows: Vec<TokenRow>,
    /// True when `rows` came from Postgres and so is every row under the key; false when it came
    /// from a Redis entry, which holds one row only.
    pub complete: bool,
    /// How long this entry may be used.
    pub ttl: Duration,
}

impl Entry {
    pub fn is_negative(&self) -> bool {
        self.rows.is_empty()
    }

    /// Approximate heap footprint, for the byte bound.
    fn weight(&self, key: &str) -> usize {
        let rows: usize = self
            .rows
            .iter()
            .map(|r| {
                std::mem::size_of::<TokenRow>()
                    + r.digest.len()
                    + r.token_key.len()
                    + r.user_id.len()
                    + r.user.username.len()
                    + r.user.email.len()
            })
            .sum();
        // Key, Arc and entry headers, plus moka's own bookkeeping per entry (~100 bytes).
        key.len() + std::mem::size_of::<Entry>() + rows + 160
    }
}

struct PerEntryTtl;

impl moka::Expiry<Arc<str>, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &Arc<str>,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &Arc<str>,
        value: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The bounded in-process cache.
#[derive(Clone)]
pub struct MemoryCache {
    cache: Cache<Arc<str>, Arc<Entry>>,
}

impl MemoryCache {
    /// A cache holding at most `max_entries` entries and about `max_bytes` bytes.
    pub fn new(max_entries: u64, max_bytes: u64) -> Self {
        // moka bounds one weight; giving each entry at least max_bytes/max_entries of weight
        // makes the byte bound imply the entry bound as well.
        let floor = (max_bytes / max_entries.max(1)).max(1);
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |k: &Arc<str>, v: &Arc<Entry>| {
                (v.weight(k) as u64).max(floor).min(u64::from(u32::MAX)) as u32
            })
            .expire_after(PerEntryTtl)
            .support_invalidation_closures()
            .build();
        Self { cache }
    }

    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.cache.get(key)
    }

    pub fn insert(&self, key: &str, entry: Arc<Entry>) {
        if entry.ttl.is_zero() {
            return;
        }
        self.cache.insert(Arc::from(key), entry);
    }

    pub fn remove(&self, key: &str) {
        self.cache.invalidate(key);
    }

    /// Evicts every entry holding a token of `user_id`.
    pub fn remove_user(&self, user_id: &str) {
        let user_id = user_id.to_owned();
        // Only fails when invalidation closures are not enabled, which `new` always does.
        let _ = self
            .cache
            .invalidate_entries_if(move |_, e| e.rows.iter().any(|r| r.user_id == user_id));
    }

    pub fn clear(&self) {
        self.cache.invalidate_all();
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}
