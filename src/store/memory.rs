//! The in-process tier: a bounded cache from `token_key` to the rows stored under it.
//!
//! It holds digests and the user's status, never raw tokens. Each entry lives no longer than
//! its own time-to-live (the max cache TTL, the negative TTL, or the soonest token expiry).
//!
//! A plain sharded map rather than a general-purpose cache crate: a hit is one short lock and
//! one hash lookup, an entry costs a few hundred bytes, and the bounds are what the operator set.
//! Entries are laid out for size, since 100,000 of them must fit in a sidecar's memory: the
//! key and short strings inline, digests in binary, and the usual single row inside the
//! entry's own allocation, so a cached token costs two heap blocks and a map slot.
//! Beyond a bound, a shard drops expired entries and then an arbitrary eighth of its entries at
//! once (hash order is random), so eviction work is amortised over many inserts.

use std::{
    collections::{HashMap, HashSet},
    hash::BuildHasher,
    sync::{Arc, Mutex},
    time::Duration,
};

use compact_str::CompactString;
use smallvec::SmallVec;
// tokio's clock (std's outside a runtime) so that the tests can pause and advance time.
use tokio::time::Instant;

use crate::auth::{StoredDigest, TokenRow};

/// The rows stored under one `token_key`: nearly always one, held inline.
pub type Rows = SmallVec<[TokenRow; 1]>;

/// What is cached for one `token_key`.
#[derive(Debug)]
pub struct Entry {
    /// The rows stored under the key (empty: the key is unknown).
    pub rows: Rows,
    /// True when `rows` came from Postgres and so is every row under the key; false when it came
    /// from a Redis entry, which holds one row only.
    pub complete: bool,
    /// How long this entry may be used.
    pub ttl: Duration,
    /// The signed identity assertion kept for this entry's token (`[assertion]`), dropped
    /// with the entry.
    pub assertion: crate::assertion::Slot,
}

/// Bytes the allocator hands out for a request of `n` bytes (16-byte classes plus a header).
fn heap(n: usize) -> usize {
    if n == 0 { 0 } else { n.div_ceil(16) * 16 + 16 }
}

impl Entry {
    pub fn is_negative(&self) -> bool {
        self.rows.is_empty()
    }

    /// Estimated memory held for this entry under `key`, map slot included, for the byte bound.
    fn weight(&self, key: &str) -> usize {
        fn text(s: &CompactString) -> usize {
            if s.is_heap_allocated() {
                heap(s.capacity())
            } else {
                0
            }
        }
        let strings: usize = self
            .rows
            .iter()
            .map(|r| {
                let digest = match &r.digest {
                    StoredDigest::Hex(_) => 0,
                    StoredDigest::Other(text) => heap(text.len()),
                };
                digest
                    + text(&r.token_key)
                    + text(&r.user_id)
                    + text(&r.user.username)
                    + text(&r.user.email)
                    + heap(r.user.groups.len() * std::mem::size_of::<CompactString>())
                    + r.user.groups.iter().map(text).sum::<usize>()
            })
            .sum();
        // A `CompactString` holds up to its own size inline.
        let key = if key.len() > std::mem::size_of::<CompactString>() {
            heap(key.len())
        } else {
            0
        };
        // Map slots are kept at most 7/8 full and tables double, so a slot costs up to twice
        // its size; count one and a half, plus the control byte.
        let slot = std::mem::size_of::<(CompactString, Slot)>() * 3 / 2 + 1;
        let spilled = if self.rows.spilled() {
            heap(self.rows.capacity() * std::mem::size_of::<TokenRow>())
        } else {
            0
        };
        // The Arc's two counters sit in front of the entry.
        slot + key + heap(std::mem::size_of::<Entry>() + 16) + spilled + strings
    }
}

#[derive(Debug)]
struct Slot {
    entry: Arc<Entry>,
    expires: Instant,
    weight: usize,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<CompactString, Slot>,
    bytes: usize,
}

impl Shard {
    fn remove(&mut self, key: &str) {
        if let Some(old) = self.map.remove(key) {
            self.bytes -= old.weight;
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&Slot) -> bool) {
        let mut freed = 0;
        self.map.retain(|_, slot| {
            let k = keep(slot);
            if !k {
                freed += slot.weight;
            }
            k
        });
        self.bytes -= freed;
    }
}

/// Number of independently locked shards.
const SHARDS: usize = 16;

/// The bounded in-process cache.
pub struct MemoryCache {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::hash::RandomState,
    max_entries_per_shard: usize,
    max_bytes_per_shard: usize,
}

impl MemoryCache {
    /// A cache of at most about `max_entries` entries and `max_bytes` bytes. The bounds hold per
    /// shard, so they are rounded up to a multiple of 16.
    pub fn new(max_entries: u64, max_bytes: u64) -> Self {
        MemoryCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::hash::RandomState::new(),
            max_entries_per_shard: (max_entries as usize).div_ceil(SHARDS),
            max_bytes_per_shard: (max_bytes as usize).div_ceil(SHARDS),
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Shard> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        // A panic while holding a shard lock cannot leave a map half-updated in a way that
        // matters here, so a poisoned lock is still usable.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        let mut shard = self.shard(key);
        let slot = shard.map.get(key)?;
        if slot.expires > Instant::now() {
            return Some(Arc::clone(&slot.entry));
        }
        shard.remove(key);
        None
    }

    pub fn insert(&self, key: &str, entry: Arc<Entry>) {
        let weight = entry.weight(key);
        if entry.ttl.is_zero()
            || weight > self.max_bytes_per_shard
            || self.max_entries_per_shard == 0
        {
            return;
        }
        let expires = Instant::now() + entry.ttl;
        let mut shard = self.shard(key);
        shard.remove(key);
        if shard.map.len() >= self.max_entries_per_shard
            || shard.bytes + weight > self.max_bytes_per_shard
        {
            let now = Instant::now();
            shard.retain(|s| s.expires > now);
            if shard.map.len() >= self.max_entries_per_shard
                || shard.bytes + weight > self.max_bytes_per_shard
            {
                // Drop an arbitrary eighth (at least what makes room) in one pass.
                let mut drop = (shard.map.len() / 8).max(1);
                let target_bytes = self.max_bytes_per_shard.saturating_sub(weight);
                let mut bytes = shard.bytes;
                shard.retain(|s| {
                    if drop > 0 || bytes > target_bytes {
                        drop = drop.saturating_sub(1);
                        bytes -= s.weight;
                        false
                    } else {
                        true
                    }
                });
            }
        }
        shard.bytes += weight;
        shard.map.insert(
            key.into(),
            Slot {
                entry,
                expires,
                weight,
            },
        );
    }

    pub fn remove(&self, key: &str) {
        self.shard(key).remove(key);
    }

    /// Removes the entry under `key` if `stale` says so of it.
    pub fn remove_if(&self, key: &str, stale: impl FnOnce(&Entry) -> bool) {
        let mut shard = self.shard(key);
        if shard.map.get(key).is_some_and(|slot| stale(&slot.entry)) {
            shard.remove(key);
        }
    }

    /// Replaces the live entry under `key` with what `with` makes of it, keeping its deadline:
    /// an update of what an entry says never lets it answer for longer. Nothing happens when no
    /// live entry is there (evicted meanwhile, say by a revocation: it stays evicted).
    pub fn update(&self, key: &str, with: impl FnOnce(&Entry) -> Arc<Entry>) {
        self.update_within(key, with, None);
    }

    /// Puts `entry` in place of the live entry under `key`, as `update` does, and ends it
    /// sooner if `entry.ttl` from now comes first (a rebuilt entry whose rows say it should not
    /// be cached that long).
    pub fn replace(&self, key: &str, entry: Arc<Entry>) {
        let ttl = entry.ttl;
        self.update_within(key, |_| entry, Some(ttl));
    }

    fn update_within(
        &self,
        key: &str,
        with: impl FnOnce(&Entry) -> Arc<Entry>,
        cap: Option<Duration>,
    ) {
        let mut shard = self.shard(key);
        let Some(slot) = shard.map.get_mut(key) else {
            return;
        };
        let now = Instant::now();
        if let Some(cap) = cap {
            slot.expires = slot.expires.min(now + cap);
        }
        if slot.expires <= now {
            shard.remove(key);
            return;
        }
        let old_weight = slot.weight;
        slot.entry = with(&slot.entry);
        slot.weight = slot.entry.weight(key);
        let weight = slot.weight;
        shard.bytes = shard.bytes - old_weight + weight;
    }

    /// Evicts every entry holding a token of `user_id`. Walks every shard: user-level changes
    /// (deactivation, password change) are rare.
    pub fn remove_user(&self, user_id: &str) {
        self.remove_users(&HashSet::from([user_id]));
    }

    /// Evicts every entry holding a token of any of `user_ids`, in one walk of every shard
    /// (changes to many users at once, a group renamed, come as one change per user).
    pub fn remove_users(&self, user_ids: &HashSet<&str>) {
        if user_ids.is_empty() {
            return;
        }
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|s| {
                !s.entry
                    .rows
                    .iter()
                    .any(|r| user_ids.contains(r.user_id.as_str()))
            });
        }
    }

    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.map.clear();
            shard.bytes = 0;
        }
    }

    /// Drops every expired entry. Run periodically so that short-lived entries (negative ones
    /// above all) free their memory when they expire, not when the cache next fills up.
    pub fn purge_expired(&self) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|s| s.expires > now);
        }
    }

    pub fn entry_count(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len() as u64)
            .sum()
    }

    /// Estimated bytes held.
    pub fn weighted_size(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).bytes as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::UserInfo;

    fn entry(user: &str, ttl: Duration) -> Arc<Entry> {
        Arc::new(Entry {
            rows: smallvec::smallvec![TokenRow {
                digest: StoredDigest::parse(&"a".repeat(128)),
                token_key: "k".repeat(15).into(),
                user_id: user.into(),
                created: time::OffsetDateTime::UNIX_EPOCH,
                expiry: None,
                user: UserInfo {
                    is_active: true,
                    ..UserInfo::default()
                },
            }],
            complete: true,
            ttl,
            assertion: Default::default(),
        })
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn get_insert_remove() {
        let c = MemoryCache::new(1000, 1 << 20);
        assert!(c.get("a").is_none());
        c.insert("a", entry("1", MIN));
        assert_eq!(c.get("a").unwrap().rows[0].user_id, "1");
        c.insert("a", entry("2", MIN));
        assert_eq!(c.get("a").unwrap().rows[0].user_id, "2");
        assert_eq!(c.entry_count(), 1);
        c.remove("a");
        assert!(c.get("a").is_none());
        assert_eq!(c.weighted_size(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_update_keeps_the_deadline_and_never_brings_back_an_evicted_entry() {
        let c = MemoryCache::new(1000, 1 << 20);
        c.insert("a", entry("1", Duration::from_millis(30)));
        tokio::time::advance(Duration::from_millis(20)).await;
        // The new entry would live a minute on its own; in place of the old one it may not.
        c.update("a", |_| entry("2", MIN));
        assert_eq!(c.get("a").unwrap().rows[0].user_id, "2");
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(c.get("a").is_none());
        c.update("a", |_| entry("3", MIN));
        assert!(c.get("a").is_none());
        assert_eq!(c.weighted_size(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replacement_keeps_the_deadline_or_ends_sooner_by_its_own_ttl() {
        let c = MemoryCache::new(1000, 1 << 20);
        c.insert("a", entry("1", Duration::from_millis(30)));
        tokio::time::advance(Duration::from_millis(20)).await;
        c.replace("a", entry("2", MIN));
        assert_eq!(c.get("a").unwrap().rows[0].user_id, "2");
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(
            c.get("a").is_none(),
            "a minute of its own does not renew it"
        );
        c.replace("a", entry("3", MIN));
        assert!(c.get("a").is_none(), "nothing to replace: nothing inserted");

        c.insert("b", entry("1", MIN));
        c.replace("b", entry("2", Duration::from_millis(5)));
        tokio::time::advance(Duration::from_millis(5)).await;
        assert!(c.get("b").is_none(), "its own ttl came first");
        c.insert("c", entry("1", MIN));
        c.replace("c", entry("2", Duration::ZERO));
        assert!(c.get("c").is_none());
        assert_eq!(c.weighted_size(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire() {
        let c = MemoryCache::new(1000, 1 << 20);
        c.insert("a", entry("1", Duration::from_millis(30)));
        tokio::time::advance(Duration::from_millis(29)).await;
        assert!(c.get("a").is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(c.get("a").is_none());
        c.insert("z", entry("1", Duration::ZERO));
        assert!(c.get("z").is_none());
    }

    #[test]
    fn bounds_hold() {
        let c = MemoryCache::new(160, 1 << 30);
        for i in 0..10_000 {
            c.insert(&format!("key{i}"), entry("1", MIN));
        }
        assert!(c.entry_count() <= 160, "{}", c.entry_count());
        assert!(
            c.entry_count() >= 80,
            "eviction is not wholesale: {}",
            c.entry_count()
        );
        let w = entry("1", MIN).weight("key0");
        let c = MemoryCache::new(1_000_000, (w * 16 * 10) as u64);
        for i in 0..10_000 {
            c.insert(&format!("key{i}"), entry("1", MIN));
        }
        assert!(c.weighted_size() <= (w * 16 * 10) as u64);
        // A bound below one entry disables the tier.
        let c = MemoryCache::new(1, 1);
        c.insert("a", entry("1", MIN));
        assert!(c.get("a").is_none());
    }

    #[test]
    fn a_typical_entry_stays_small() {
        // One sha512 row, a 15-character key, an integer user id, no identity headers: the
        // estimate must let the default byte bound (64 MiB) hold well over 100,000 of these.
        let e = entry("123456", MIN);
        let w = e.weight("0123456789abcde");
        assert!(w <= 400, "{w} bytes per entry");
        assert!(!e.rows.spilled());
        // Long strings (a UUID user id, an email) are counted where they spill to the heap.
        let mut row = e.rows[0].clone();
        row.user_id = "0b5cfc2a-6d55-4b0e-9b55-2d0f3c8f6b1e".into();
        let long = Entry {
            rows: smallvec::smallvec![row],
            complete: true,
            ttl: MIN,
            assertion: Default::default(),
        };
        assert!(long.weight("0123456789abcde") > w);
    }

    #[tokio::test(start_paused = true)]
    async fn purge_frees_expired_entries() {
        let c = MemoryCache::new(1000, 1 << 20);
        c.insert("short", entry("1", Duration::from_millis(20)));
        c.insert("long", entry("1", MIN));
        tokio::time::advance(Duration::from_millis(20)).await;
        c.purge_expired();
        assert_eq!(c.entry_count(), 1);
        assert_eq!(c.weighted_size() as usize, entry("1", MIN).weight("long"));
    }

    #[test]
    fn remove_users_evicts_every_named_user_in_one_walk() {
        let c = MemoryCache::new(1000, 1 << 20);
        c.insert("a", entry("1", MIN));
        c.insert("b", entry("2", MIN));
        c.insert("c", entry("3", MIN));
        c.remove_users(&HashSet::from(["1", "3", "4"]));
        assert!(c.get("a").is_none() && c.get("c").is_none());
        assert!(c.get("b").is_some());
        c.remove_users(&HashSet::new());
        assert!(c.get("b").is_some());
    }

    #[test]
    fn remove_user_and_clear() {
        let c = MemoryCache::new(1000, 1 << 20);
        c.insert("a", entry("1", MIN));
        c.insert("b", entry("2", MIN));
        c.remove_user("1");
        assert!(c.get("a").is_none() && c.get("b").is_some());
        c.clear();
        assert_eq!(c.entry_count(), 0);
    }
}
