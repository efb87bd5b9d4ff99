//! Failed-login throttling (fixed windows), counted per (client address, username) and, at a
//! higher limit, per username from anywhere; and, when `sessions.throttle_address_failures`
//! turns it on, per client address across usernames (password spraying: one guess against
//! many accounts).
//!
//! Why these keys: behind a proxy whose address is not in `sessions.trusted_proxies`, every
//! client has the proxy's address, so a counter per address alone would let anyone lock
//! everyone out with a handful of failures. Keyed per (address, username), one client's guesses
//! lock only the account it guesses at, from that address; the per-username counter, with its
//! higher limit, still stops guessing one account from many addresses. The per-address counter
//! is off by default for that reason, and meant for deployments whose `trusted_proxies` make
//! addresses the clients' own.
//!
//! An attempt is counted *before* its password check ([`Throttle::reserve`]), under one lock,
//! so concurrent guesses cannot all pass the check before the first failure is recorded: at
//! most `limit` password checks run per key and window, however many arrive at once.
//!
//! Memory is bounded whatever the clients send: usernames are kept as a keyed 64-bit hash (a
//! username of any length costs the same), a counter back at 0 is dropped, and each map holds
//! at most `MAX_TRACKED_KEYS` counters: past that, closed windows go, then the older half of
//! the open ones (which lets a flood of distinct usernames forget failures early, rather than
//! grow the process until it is killed).

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// The most counters one map holds (see the module doc).
const MAX_TRACKED_KEYS: usize = 100_000;

/// A username, as the throttle keeps it: hashed with a key drawn per process, so that which
/// usernames share a counter cannot be worked out in advance.
type UserKey = u64;

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

#[derive(Default)]
struct Counters {
    /// (client address, username) → attempts not known to have succeeded.
    pairs: HashMap<(IpAddr, UserKey), Window>,
    /// username → attempts from any address.
    users: HashMap<UserKey, Window>,
    /// client address → attempts for any username (only with an address limit).
    addresses: HashMap<IpAddr, Window>,
}

/// Counts failed logins and refuses attempts over the limits until their window closes.
pub struct Throttle {
    /// Per (client, username); 0 disables the whole throttle.
    limit: u32,
    /// Per username from any address; 0 disables this counter alone.
    user_limit: u32,
    /// Per client address for any username; 0 (the default) disables this counter alone.
    address_limit: u32,
    window: Duration,
    /// How many counters one map may hold (`MAX_TRACKED_KEYS`; smaller in tests).
    max_keys: usize,
    hasher: RandomState,
    counters: Mutex<Counters>,
}

/// How long until `w` lets an attempt through, if it is at `limit` now.
fn remaining(w: Option<&Window>, limit: u32, window: Duration, now: Instant) -> Option<Duration> {
    let w = w?;
    let elapsed = now.saturating_duration_since(w.started);
    (limit > 0 && w.failures >= limit && elapsed < window).then(|| window - elapsed)
}

/// Adds one attempt to `key`'s window (opening a new window if the old one closed) and returns
/// the window's start, which identifies it for a later [`unbump`].
fn bump<K>(
    map: &mut HashMap<K, Window>,
    key: K,
    window: Duration,
    max_keys: usize,
    now: Instant,
) -> Instant
where
    K: std::hash::Hash + Eq,
{
    if map.len() >= max_keys && !map.contains_key(&key) {
        make_room(map, window, now);
    }
    let w = map.entry(key).or_insert(Window {
        started: now,
        failures: 0,
    });
    if now.saturating_duration_since(w.started) >= window {
        *w = Window {
            started: now,
            failures: 0,
        };
    }
    w.failures = w.failures.saturating_add(1);
    w.started
}

/// Drops the closed windows and, if that frees less than a quarter of the map, the older half
/// of the open ones: each such pass pays for many inserts, so a full map does not cost a scan
/// per attempt.
fn make_room<K>(map: &mut HashMap<K, Window>, window: Duration, now: Instant)
where
    K: std::hash::Hash + Eq,
{
    let full = map.len();
    map.retain(|_, w| now.saturating_duration_since(w.started) < window);
    if map.len() > full - full / 4 {
        let mut starts: Vec<Instant> = map.values().map(|w| w.started).collect();
        let middle = starts.len() / 2;
        let (_, newest_of_older_half, _) = starts.select_nth_unstable(middle);
        let keep_from = *newest_of_older_half;
        map.retain(|_, w| w.started > keep_from);
    }
}

/// Takes back one attempt from `key`, if its window is still the one it was added to; a
/// counter back at 0 holds nothing worth its memory.
fn unbump<K>(map: &mut HashMap<K, Window>, key: &K, started: Instant)
where
    K: std::hash::Hash + Eq,
{
    if let Some(w) = map.get_mut(key)
        && w.started == started
    {
        w.failures = w.failures.saturating_sub(1);
        if w.failures == 0 {
            map.remove(key);
        }
    }
}

/// One login attempt, already counted as a failure. [`Attempt::succeeded`] and
/// [`Attempt::release`] settle it. Dropped unsettled, it stays counted once its password check
/// has begun (a wrong password, or a request given up while its hash ran: a guess was
/// checked, and a client that walks away from each one must not get unthrottled hashing), and
/// is given back before that (a request given up by its deadline or its client while it
/// waited for Postgres or a hashing thread: an outage, not a guess, so it must never add up
/// to a 429 for the right password).
#[must_use = "an attempt counts as a failure unless it is settled"]
pub struct Attempt<'a> {
    throttle: &'a Throttle,
    /// `None` when the throttle is off.
    key: Option<Counted>,
    begun: CheckBegun,
}

/// Marked by the hashing thread as an [`Attempt`]'s password check begins.
#[derive(Clone, Default)]
pub struct CheckBegun(Arc<AtomicBool>);

impl CheckBegun {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn marked(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The keys an attempt was counted under, and the windows it was added to.
struct Counted {
    addr: IpAddr,
    username: UserKey,
    pair_started: Instant,
    user_started: Instant,
    address_started: Instant,
}

impl Attempt<'_> {
    fn new(throttle: &Throttle, key: Option<Counted>) -> Attempt<'_> {
        Attempt {
            throttle,
            key,
            begun: CheckBegun::default(),
        }
    }

    /// What the password check marks as it begins (see [`Attempt`]).
    pub fn check_begun(&self) -> CheckBegun {
        self.begun.clone()
    }

    /// The password was right: clears this client's failures for the username and the
    /// username's failures from anywhere (not other clients' failures for it). The address's
    /// count only loses this attempt: one right guess must not reset a spray.
    pub fn succeeded(mut self) {
        if let Some(k) = self.key.take() {
            let mut c = self.throttle.lock();
            unbump(&mut c.addresses, &k.addr, k.address_started);
            c.users.remove(&k.username);
            c.pairs.remove(&(k.addr, k.username));
        }
    }

    /// No password was checked (Postgres unreachable, no hashing thread free): the attempt
    /// does not count.
    pub fn release(mut self) {
        self.give_back();
    }

    fn give_back(&mut self) {
        if let Some(k) = self.key.take() {
            let mut c = self.throttle.lock();
            unbump(&mut c.addresses, &k.addr, k.address_started);
            unbump(&mut c.users, &k.username, k.user_started);
            unbump(&mut c.pairs, &(k.addr, k.username), k.pair_started);
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.begun.marked() {
            self.give_back();
        }
    }
}

impl Throttle {
    /// `limit` failures per (client, username), `user_limit` per username and `address_limit`
    /// per client address within `window`. A `limit` of 0 disables throttling; a `user_limit` or
    /// `address_limit` of 0 only that counter.
    pub fn new(limit: u32, user_limit: u32, address_limit: u32, window: Duration) -> Self {
        Throttle {
            limit,
            user_limit,
            address_limit,
            window,
            max_keys: MAX_TRACKED_KEYS,
            hasher: RandomState::new(),
            counters: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an attempt by `username` from `addr`, or says how long to wait if either key is
    /// at its limit (then nothing is counted).
    pub fn reserve(&self, username: &str, addr: IpAddr) -> Result<Attempt<'_>, Duration> {
        self.reserve_at(username, addr, Instant::now())
    }

    fn reserve_at(
        &self,
        username: &str,
        addr: IpAddr,
        now: Instant,
    ) -> Result<Attempt<'_>, Duration> {
        if self.limit == 0 {
            return Ok(Attempt::new(self, None));
        }
        let username = self.hasher.hash_one(username);
        let mut c = self.lock();
        let pair = (addr, username);
        let by_pair = remaining(c.pairs.get(&pair), self.limit, self.window, now);
        let by_user = remaining(c.users.get(&username), self.user_limit, self.window, now);
        let by_address = remaining(c.addresses.get(&addr), self.address_limit, self.window, now);
        if let Some(wait) = by_pair.into_iter().chain(by_user).chain(by_address).max() {
            return Err(wait);
        }
        let (window, max_keys) = (self.window, self.max_keys);
        let pair_started = bump(&mut c.pairs, pair, window, max_keys, now);
        let user_started = bump(&mut c.users, username, window, max_keys, now);
        // Counted only when limited, so that the map stays empty when the counter is off.
        let address_started = if self.address_limit > 0 {
            bump(&mut c.addresses, addr, window, max_keys, now)
        } else {
            now
        };
        Ok(Attempt::new(
            self,
            Some(Counted {
                addr,
                username,
                pair_started,
                user_started,
                address_started,
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    /// A wrong password: the check began, and the attempt is dropped unsettled.
    fn fail(t: &Throttle, user: &str, addr: IpAddr, now: Instant) {
        let attempt = t.reserve_at(user, addr, now).expect("not blocked");
        attempt.check_begun().mark();
        drop(attempt);
    }

    #[test]
    fn blocks_a_client_and_username_after_limit_until_window_closes() {
        let t = Throttle::new(3, 5, 0, Duration::from_secs(60));
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&t, "alice", A, t0);
        }
        let wait = t
            .reserve_at("alice", A, t0 + Duration::from_secs(10))
            .err()
            .unwrap();
        assert_eq!(wait, Duration::from_secs(50));
        // Only that pair: alice from elsewhere and bob from A still get through.
        assert!(t.reserve_at("alice", B, t0).is_ok());
        assert!(t.reserve_at("bob", A, t0).is_ok());
        assert!(
            t.reserve_at("alice", A, t0 + Duration::from_secs(60))
                .is_ok()
        );
    }

    #[test]
    fn many_usernames_from_one_address_lock_nobody_else_out() {
        // Behind an untrusted proxy every client has the same address.
        let t = Throttle::new(3, 5, 0, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..100 {
            fail(&t, &format!("random{i}"), A, t0);
        }
        assert!(t.reserve_at("bob", A, t0).is_ok());
    }

    #[test]
    fn the_username_limit_counts_failures_from_every_address() {
        let t = Throttle::new(3, 5, 0, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..5u8 {
            fail(&t, "alice", IpAddr::from([10, 1, 0, i]), t0);
        }
        assert!(t.reserve_at("alice", B, t0).is_err());
        assert!(t.reserve_at("bob", B, t0).is_ok());
    }

    #[test]
    fn attempts_are_counted_before_they_finish() {
        // Held attempts (password checks still running) count against the limit.
        let t = Throttle::new(3, 10, 0, Duration::from_secs(60));
        let t0 = Instant::now();
        let mut held: Vec<_> = (0..3)
            .map(|_| t.reserve_at("alice", A, t0).expect("under the limit"))
            .collect();
        assert!(t.reserve_at("alice", A, t0).is_err());
        // A released attempt (no password checked) is given back.
        held.pop().unwrap().release();
        assert!(t.reserve_at("alice", A, t0).is_ok());
        drop(held);
    }

    #[test]
    fn an_attempt_given_up_counts_only_once_its_check_began() {
        let t = Throttle::new(2, 10, 0, Duration::from_secs(60));
        let t0 = Instant::now();
        // Given up while waiting for Postgres or a hashing thread, any number of times.
        for _ in 0..5 {
            drop(t.reserve_at("alice", A, t0).expect("nothing counted"));
        }
        // Given up while its hash ran: a guess, counted.
        fail(&t, "alice", A, t0);
        fail(&t, "alice", A, t0);
        assert!(t.reserve_at("alice", A, t0).is_err());
    }

    #[test]
    fn success_clears_the_usernames_failures() {
        let t = Throttle::new(2, 10, 0, Duration::from_secs(60));
        let t0 = Instant::now();
        fail(&t, "alice", A, t0);
        fail(&t, "alice", B, t0);
        t.reserve_at("alice", A, t0).unwrap().succeeded();
        // A's pair and the username's count are cleared; B's pair keeps its one failure.
        fail(&t, "alice", A, t0);
        fail(&t, "alice", A, t0);
        fail(&t, "alice", B, t0);
        assert!(t.reserve_at("alice", B, t0).is_err());
    }

    #[test]
    fn an_address_limit_stops_one_guess_against_many_usernames() {
        // Off by default (0); on, it counts failures from one address across usernames.
        let t = Throttle::new(3, 5, 4, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..4 {
            fail(&t, &format!("user{i}"), A, t0);
        }
        let wait = t
            .reserve_at("user9", A, t0 + Duration::from_secs(15))
            .err()
            .unwrap();
        assert_eq!(wait, Duration::from_secs(45));
        assert!(t.reserve_at("user9", B, t0).is_ok());
        assert!(
            t.reserve_at("user9", A, t0 + Duration::from_secs(60))
                .is_ok()
        );
        // A right password takes back its own attempt only: the spray's count stands.
        let t = Throttle::new(3, 5, 2, Duration::from_secs(60));
        fail(&t, "user1", A, t0);
        t.reserve_at("alice", A, t0).unwrap().succeeded();
        fail(&t, "user2", A, t0);
        assert!(t.reserve_at("user3", A, t0).is_err());
    }

    #[test]
    fn attempts_given_back_leave_no_counter_behind() {
        // Logins answered 503 before any password check (no hashing thread free) release their
        // attempts: a flood of them, each with a new username, must not grow the maps.
        let t = Throttle::new(3, 5, 4, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..1_000 {
            t.reserve_at(&format!("user{i}{}", "x".repeat(8_000)), A, t0)
                .expect("under the limit")
                .release();
        }
        let c = t.lock();
        assert_eq!((c.pairs.len(), c.users.len(), c.addresses.len()), (0, 0, 0));
    }

    #[test]
    fn a_flood_of_usernames_in_open_windows_stays_within_the_cap() {
        let mut t = Throttle::new(1, 5, 0, Duration::from_secs(60));
        t.max_keys = 100;
        let t0 = Instant::now();
        for i in 0..1_000u64 {
            fail(&t, &format!("user{i}"), A, t0 + Duration::from_millis(i));
        }
        {
            let c = t.lock();
            assert!(c.pairs.len() <= 100, "{} pair counters", c.pairs.len());
            assert!(c.users.len() <= 100, "{} username counters", c.users.len());
        }
        // The newest failures are the ones kept.
        let late = t0 + Duration::from_millis(1_000);
        assert!(t.reserve_at("user999", A, late).is_err());
        assert!(t.reserve_at("user0", A, late).is_ok());
    }

    #[test]
    fn zero_disables() {
        let t = Throttle::new(0, 0, 0, Duration::from_secs(60));
        for _ in 0..100 {
            fail(&t, "alice", A, Instant::now());
        }
        assert!(t.reserve("alice", A).is_ok());
    }
}
