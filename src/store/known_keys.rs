//! The token keys that exist, so that a flood of random tokens costs no query.
//!
//! A Bloom filter of every `token_key` in the token table, loaded from Postgres each time the
//! change feed becomes live and kept current by the feed's INSERT events. A key the filter has
//! not seen is asked of Redis and Postgres only while a per-second budget of such lookups lasts
//! (`cache.unknown_key_lookups_per_second`); past it the answer is "no such token" without
//! touching either, and without filling the in-process tier with negative entries that would
//! evict live ones.
//!
//! Why it never refuses a valid token: a Bloom filter has no false negatives, every key
//! committed before a load started is in the load, and every key committed after it is heard by
//! the feed, which was already live (LISTENing, or reading the relays' stream) when the load
//! began. The filter is only consulted while it is current: loaded since the feed last became
//! live, and the feed still live. When the feed drops, the filter is dropped with it (INSERTs may
//! go unheard) and every key is asked again, as without a filter. The one window left is a
//! token presented, during a flood, before its INSERT's notification has arrived (SECURITY.md).
//!
//! A false positive (at most [`FALSE_POSITIVE_RATE`] while the filter is within its capacity) only
//! costs the lookup that every unknown key cost without a filter. Deleted keys stay in the filter
//! until the next load; the filter is reloaded, at a new size, once new keys have used its
//! headroom (a key heard again, as two relays and replays repeat them, uses none). The full one
//! goes on serving, and learning the keys heard, until the bigger one replaces it: it still has
//! no false negatives, only a rising false-positive rate, and without it a flood would reach
//! the stores for as long as the load takes.

use std::{
    sync::{
        Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use compact_str::CompactString;
use fastbloom::AtomicBloomFilter;
use tokio::{sync::Notify, time::Instant};

/// The share of unknown keys the filter takes for known while within its capacity.
pub const FALSE_POSITIVE_RATE: f64 = 0.01;
/// A filter is sized for this many times the keys it was loaded with, so that inserts between
/// loads do not raise its false-positive rate above [`FALSE_POSITIVE_RATE`].
const HEADROOM: usize = 2;
/// The smallest capacity a filter is built with (about 120 KB): a new table grows without
/// reloading at every login.
const MIN_CAPACITY: usize = 100_000;
/// Keys heard while a load runs are kept to join the new filter; past this many (a load that
/// keeps failing while logins go on), the load starts over instead of holding them all.
const MAX_HEARD_WHILE_LOADING: usize = 1_000_000;
/// Keys asked of Postgres per statement while loading: each page is one short index-only scan,
/// within the statement deadline and compatible with PgBouncer's transaction pooling.
pub const LOAD_PAGE: i64 = 10_000;

/// What [`KnownKeys::admit`] says about a key that is not in the in-process tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// No filter is current (disabled, not loaded yet, or the feed is down): ask the stores.
    NoFilter,
    /// The filter holds the key (or a false positive): ask the stores.
    Known,
    /// Unknown to the filter, and the budget of unknown-key lookups allows one: ask the stores.
    Budgeted,
    /// Unknown to the filter and the budget is spent: no such token, without asking.
    Refused,
}

impl Admission {
    /// Whether Redis and Postgres should be asked.
    pub fn asks_stores(self) -> bool {
        self != Admission::Refused
    }
}

enum State {
    /// No filter is current: every key is asked.
    Stale,
    /// A load is running (or is to be retried); keys heard meanwhile wait here. `serving`: a
    /// filter that is still current while it runs (one past its capacity), learning keys too.
    Loading {
        generation: u64,
        heard: Vec<CompactString>,
        serving: Option<Filter>,
    },
    Current(Filter),
}

impl State {
    /// The filter to consult, if one is current.
    fn serving(&self) -> Option<&Filter> {
        match self {
            State::Current(filter)
            | State::Loading {
                serving: Some(filter),
                ..
            } => Some(filter),
            State::Stale | State::Loading { serving: None, .. } => None,
        }
    }
}

/// Whether a load started keeps the filter in use serving until it replaces it: yes when the
/// filter only grew full (it still holds every key), no when keys may have gone unheard.
#[derive(Clone, Copy)]
enum Serving {
    Keep,
    Drop,
}

struct Filter {
    bloom: AtomicBloomFilter,
    capacity: usize,
    /// Keys loaded plus keys heard since.
    keys: AtomicUsize,
}

/// A filter being filled by a load, not yet consulted.
pub struct Load {
    generation: u64,
    bloom: AtomicBloomFilter,
    capacity: usize,
    keys: usize,
}

impl Load {
    pub fn add(&mut self, key: &str) {
        self.bloom.insert(key);
        self.keys += 1;
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// The filter of existing token keys and the budget of lookups for keys it does not hold.
pub struct KnownKeys {
    enabled: bool,
    state: RwLock<State>,
    budget: Budget,
    generation: AtomicU64,
    /// The size of the last complete load: the next one is sized from it when the table's
    /// statistics say less.
    last_loaded: AtomicUsize,
    /// Wakes the loader (see `Store::keep_known_keys`).
    load_wanted: Notify,
    /// Seeds the filter's hash, so that which random keys pass as false positives cannot be
    /// worked out in advance.
    seed: [u8; 16],
}

impl KnownKeys {
    /// `enabled`: `cache.key_filter`; `per_second`: `cache.unknown_key_lookups_per_second`.
    pub fn new(enabled: bool, per_second: u32) -> KnownKeys {
        let mut seed = [0u8; 16];
        rand::fill(&mut seed);
        KnownKeys {
            enabled,
            state: RwLock::new(State::Stale),
            budget: Budget::new(per_second),
            generation: AtomicU64::new(0),
            last_loaded: AtomicUsize::new(0),
            load_wanted: Notify::new(),
            seed,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the stores should be asked for `key`, which the in-process tier does not hold.
    pub fn admit(&self, key: &str) -> Admission {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        match state.serving() {
            Some(filter) if filter.bloom.contains(key) => Admission::Known,
            Some(_) if self.budget.take() => Admission::Budgeted,
            Some(_) => Admission::Refused,
            None => Admission::NoFilter,
        }
    }

    /// The change feed became live (load the keys afresh: INSERTs may have gone unheard while
    /// it was not) or stopped being live (the filter can no longer be kept current).
    pub fn feed_live_changed(&self, live: bool) {
        if !self.enabled {
            return;
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if live {
            self.start_loading(&mut state, Serving::Drop);
        } else {
            *state = State::Stale;
        }
    }

    /// The feed stayed live but INSERTs may have gone unheard (a relay's `LISTEN` came back
    /// within `cache.feed_relay_timeout`, or the relays' stream lost entries unread): load the
    /// keys afresh, as when the feed becomes live. A load already running may have paged past
    /// such a key before it was committed, so it is overtaken too. Without a filter (the feed
    /// is down) there is nothing to doubt: the load comes when the feed is live again.
    pub fn reload(&self) {
        if !self.enabled {
            return;
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if !matches!(*state, State::Stale) {
            self.start_loading(&mut state, Serving::Drop);
        }
    }

    /// The feed heard a token row inserted under `key`.
    pub fn heard(&self, key: &str) {
        if !self.enabled {
            return;
        }
        {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            if let State::Current(filter) = &*state {
                // A key heard again (two relays publish every change, a replay repeats what
                // was heard) sets no new bit: it does not use the filter's capacity.
                if filter.bloom.insert(key) {
                    return;
                }
                let keys = filter.keys.fetch_add(1, Ordering::Relaxed) + 1;
                if keys <= filter.capacity {
                    return;
                }
            }
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        match &mut *state {
            State::Loading { heard, serving, .. } => {
                if let Some(filter) = serving
                    && !filter.bloom.insert(key)
                {
                    filter.keys.fetch_add(1, Ordering::Relaxed);
                }
                if heard.len() < MAX_HEARD_WHILE_LOADING {
                    heard.push(key.into());
                } else {
                    self.start_loading(&mut state, Serving::Keep);
                }
            }
            // Over capacity: its false-positive rate is rising; load a bigger one. The full one
            // serves until then, and the key just heard is in it.
            State::Current(filter) if filter.keys.load(Ordering::Relaxed) > filter.capacity => {
                self.start_loading(&mut state, Serving::Keep);
            }
            State::Current(_) | State::Stale => {}
        }
    }

    /// Starts a load, keeping the filter in use serving meanwhile or not.
    fn start_loading(&self, state: &mut State, keep: Serving) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let serving = match (std::mem::replace(state, State::Stale), keep) {
            (State::Current(filter), Serving::Keep) => Some(filter),
            (State::Loading { serving, .. }, Serving::Keep) => serving,
            _ => None,
        };
        *state = State::Loading {
            generation,
            heard: Vec::new(),
            serving,
        };
        self.load_wanted.notify_one();
    }

    /// Waits until a load may be wanted (then see [`KnownKeys::pending_load`]).
    pub async fn load_wanted(&self) {
        self.load_wanted.notified().await;
    }

    /// The generation of the load to run, if one is wanted now.
    pub fn pending_load(&self) -> Option<u64> {
        match &*self.state.read().unwrap_or_else(|e| e.into_inner()) {
            State::Loading { generation, .. } => Some(*generation),
            _ => None,
        }
    }

    /// An empty filter for load `generation`, sized for `estimated_keys` or the last load.
    pub fn begin(&self, generation: u64, estimated_keys: usize) -> Load {
        let keys = estimated_keys.max(self.last_loaded.load(Ordering::Relaxed));
        let capacity = keys.saturating_mul(HEADROOM).max(MIN_CAPACITY);
        Load {
            generation,
            bloom: self.new_bloom(capacity),
            capacity,
            keys: 0,
        }
    }

    fn new_bloom(&self, capacity: usize) -> AtomicBloomFilter {
        AtomicBloomFilter::with_false_pos(FALSE_POSITIVE_RATE)
            .seed(&u128::from_le_bytes(self.seed))
            .expected_items(capacity)
    }

    /// Makes a completed load current, with the keys heard while it ran, unless a newer load
    /// was started (the feed dropped and came back) or the feed is down. Returns the keys it
    /// holds when it became current.
    pub fn finish(&self, load: Load) -> Option<usize> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let State::Loading {
            generation, heard, ..
        } = &mut *state
        else {
            return None;
        };
        if *generation != load.generation {
            return None;
        }
        let keys = load.keys + heard.len();
        for key in heard.drain(..) {
            load.bloom.insert(key.as_str());
        }
        self.last_loaded.store(load.keys, Ordering::Relaxed);
        let filter = Filter {
            bloom: load.bloom,
            capacity: load.capacity,
            keys: AtomicUsize::new(keys),
        };
        let over = keys > filter.capacity;
        *state = State::Current(filter);
        if over {
            // The statistics were far behind: the filter is already past its capacity.
            self.start_loading(&mut state, Serving::Keep);
        }
        Some(keys)
    }

    /// Keys in the current filter (0 while none is current), for the metrics.
    pub fn current_keys(&self) -> usize {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .serving()
            .map_or(0, |filter| filter.keys.load(Ordering::Relaxed))
    }

    /// Bytes of the current filter's bit array (0 while none is current).
    pub fn current_bytes(&self) -> usize {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .serving()
            .map_or(0, |filter| filter.bloom.num_bits() / 8)
    }

    /// Asks the loader to try again (after a failed load), if that load is still wanted.
    pub fn retry(&self) {
        self.load_wanted.notify_one();
    }
}

/// A token bucket: `per_second` lookups a second on average, bursts of up to a second's worth.
struct Budget {
    per_second: f64,
    bucket: Mutex<(f64, Instant)>,
    /// While the bucket is empty, when its next token is due (nanoseconds after `born`): a
    /// flood's requests are refused on this atomic read, without queueing on the lock.
    empty_until: AtomicU64,
    born: Instant,
}

impl Budget {
    fn new(per_second: u32) -> Budget {
        let per_second = f64::from(per_second);
        let born = Instant::now();
        Budget {
            per_second,
            bucket: Mutex::new((per_second, born)),
            empty_until: AtomicU64::new(0),
            born,
        }
    }

    fn take(&self) -> bool {
        if self.per_second == 0.0 {
            return false;
        }
        let now = Instant::now();
        let nanos = |at: Instant| {
            u64::try_from(at.saturating_duration_since(self.born).as_nanos()).unwrap_or(u64::MAX)
        };
        if nanos(now) < self.empty_until.load(Ordering::Relaxed) {
            return false;
        }
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *bucket;
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.per_second.max(1.0));
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            let due = now + Duration::from_secs_f64((1.0 - *tokens) / self.per_second);
            self.empty_until.store(nanos(due), Ordering::Relaxed);
            false
        }
    }
}

/// How long the loader waits before trying a failed load again.
pub const LOAD_RETRY_DELAY: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(keys: &[&str], per_second: u32) -> KnownKeys {
        let known = KnownKeys::new(true, per_second);
        known.feed_live_changed(true);
        let generation = known.pending_load().expect("a load is wanted");
        let mut load = known.begin(generation, keys.len());
        for key in keys {
            load.add(key);
        }
        assert_eq!(known.finish(load), Some(keys.len()));
        known
    }

    #[test]
    fn without_a_current_filter_every_key_is_asked() {
        let known = KnownKeys::new(true, 0);
        assert_eq!(known.admit("abc"), Admission::NoFilter);
        known.feed_live_changed(true);
        assert_eq!(known.admit("abc"), Admission::NoFilter, "still loading");
        let disabled = KnownKeys::new(false, 0);
        disabled.feed_live_changed(true);
        assert_eq!(disabled.pending_load(), None);
        assert_eq!(disabled.admit("abc"), Admission::NoFilter);
    }

    #[test]
    fn unknown_keys_are_asked_within_the_budget_only() {
        let known = loaded(&["0123456789abcde"], 3);
        assert_eq!(known.admit("0123456789abcde"), Admission::Known);
        // A burst of a second's worth, then refusals (the bucket refills at 3/s: a test that
        // took over a third of a second could see one more).
        let admitted: Vec<_> = (0..10).map(|i| known.admit(&format!("{i:015}"))).collect();
        assert_eq!(&admitted[..3], &[Admission::Budgeted; 3]);
        assert!(admitted[4..].iter().all(|a| *a == Admission::Refused));
        // Known keys are never refused, whatever the budget.
        assert_eq!(known.admit("0123456789abcde"), Admission::Known);
        let none = loaded(&[], 0);
        assert_eq!(none.admit("fffffffffffffff"), Admission::Refused);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_with_time() {
        let known = loaded(&[], 2);
        assert!(known.admit("a").asks_stores());
        assert!(known.admit("b").asks_stores());
        assert!(!known.admit("c").asks_stores());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(known.admit("d").asks_stores());
        assert!(!known.admit("e").asks_stores());
    }

    #[test]
    fn keys_heard_while_loading_or_after_are_known() {
        let known = KnownKeys::new(true, 0);
        known.feed_live_changed(true);
        let generation = known.pending_load().unwrap();
        let mut load = known.begin(generation, 0);
        load.add("loaded");
        known.heard("heard-while-loading");
        known.finish(load).unwrap();
        known.heard("heard-after");
        for key in ["loaded", "heard-while-loading", "heard-after"] {
            assert_eq!(known.admit(key), Admission::Known, "{key}");
        }
        assert_eq!(known.current_keys(), 3);
    }

    #[test]
    fn a_feed_outage_drops_the_filter_and_overtakes_a_running_load() {
        let known = KnownKeys::new(true, 0);
        known.feed_live_changed(true);
        let first = known.begin(known.pending_load().unwrap(), 0);
        // The feed drops and comes back while the first load runs: INSERTs may have been missed
        // in between, so the first load must not become current.
        known.feed_live_changed(false);
        known.feed_live_changed(true);
        assert_eq!(known.finish(first), None);
        assert_eq!(known.admit("x"), Admission::NoFilter);
        let second = known.begin(known.pending_load().unwrap(), 0);
        assert!(known.finish(second).is_some());
        assert_eq!(known.admit("x"), Admission::Refused);
        known.feed_live_changed(false);
        assert_eq!(known.admit("x"), Admission::NoFilter);
        assert_eq!(known.current_keys(), 0);
    }

    #[test]
    fn a_reload_stops_consulting_the_filter_and_overtakes_a_running_load() {
        let known = loaded(&["before"], 0);
        known.reload();
        // Keys committed while INSERTs went unheard are not in the filter: ask the stores.
        assert_eq!(known.admit("unheard"), Admission::NoFilter);
        let first = known.begin(known.pending_load().expect("a load is wanted"), 0);
        // Doubted again while that load runs: it may have paged past a key not yet committed.
        known.reload();
        assert_eq!(known.finish(first), None);
        let mut second = known.begin(known.pending_load().unwrap(), 0);
        second.add("before");
        second.add("unheard");
        assert!(known.finish(second).is_some());
        assert_eq!(known.admit("unheard"), Admission::Known);
        // While the feed is down there is no filter to reload.
        known.feed_live_changed(false);
        known.reload();
        assert_eq!(known.pending_load(), None);
        assert_eq!(known.admit("unheard"), Admission::NoFilter);
    }

    #[test]
    fn a_filter_past_its_capacity_is_reloaded_bigger() {
        let known = loaded(&[], 0);
        assert_eq!(known.pending_load(), None);
        // A tenth more, for the new keys that set no new bit (false positives) and so are not
        // counted.
        for i in 0..=MIN_CAPACITY + MIN_CAPACITY / 10 {
            known.heard(&format!("{i:015}"));
        }
        let generation = known.pending_load().expect("a bigger load is wanted");
        // Until the new load is current, the full filter serves, and learns the keys heard.
        assert_eq!(known.admit("000000000000000"), Admission::Known);
        assert_eq!(known.admit("fffffffffffffff"), Admission::Refused);
        known.heard("heard-while-loading");
        assert_eq!(known.admit("heard-while-loading"), Admission::Known);
        let mut load = known.begin(generation, MIN_CAPACITY + 1);
        assert!(load.capacity > MIN_CAPACITY * HEADROOM);
        load.add("000000000000000");
        known
            .finish(load)
            .expect("the bigger filter becomes current");
        assert_eq!(known.admit("heard-while-loading"), Admission::Known);
        assert_eq!(known.pending_load(), None, "the bigger filter is current");
        // Keys that may have gone unheard stop it serving, as any doubt does.
        known.heard("heard-while-loading");
        known.reload();
        assert_eq!(known.admit("000000000000000"), Admission::NoFilter);
    }

    #[test]
    fn keys_heard_again_do_not_use_the_capacity() {
        let known = loaded(&[], 0);
        // Two relays publish every INSERT, and replays repeat them: far past the capacity in
        // hearings, within it in keys.
        for _ in 0..3 {
            for i in 0..MIN_CAPACITY / 2 {
                known.heard(&format!("{i:015}"));
            }
        }
        assert_eq!(known.pending_load(), None);
    }

    #[test]
    fn false_positives_stay_near_the_rate_at_capacity() {
        let known = KnownKeys::new(true, 0);
        known.feed_live_changed(true);
        let mut load = known.begin(known.pending_load().unwrap(), MIN_CAPACITY / HEADROOM);
        for i in 0..MIN_CAPACITY {
            load.add(&format!("k{i:014}"));
        }
        known.finish(load).unwrap();
        let trials = 100_000;
        let passed = (0..trials)
            .filter(|i| known.admit(&format!("u{i:014}")) == Admission::Known)
            .count();
        let rate = passed as f64 / f64::from(trials);
        assert!(
            rate < FALSE_POSITIVE_RATE * 2.0,
            "false-positive rate {rate}"
        );
    }

    /// The memory figures stated in the README and SECURITY.md.
    #[test]
    fn memory_for_one_and_ten_million_tokens() {
        let known = KnownKeys::new(true, 0);
        let mib = |tokens: usize| known.begin(1, tokens).bloom.num_bits() as f64 / 8.0 / 1048576.0;
        let (one, ten) = (mib(1_000_000), mib(10_000_000));
        assert!((2.0..2.5).contains(&one), "1M tokens: {one:.2} MiB");
        assert!((20.0..25.0).contains(&ten), "10M tokens: {ten:.2} MiB");
    }
}
