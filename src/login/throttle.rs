//! Failed-login throttling per username and per client address (fixed window).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Counters are dropped once this many keys are tracked and the oldest windows have closed.
const MAX_TRACKED_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// Counts failed logins; once a username or an address reaches the limit within the window,
/// further attempts are refused until the window closes.
pub struct Throttle {
    limit: u32,
    window: Duration,
    users: Mutex<HashMap<String, Window>>,
    addrs: Mutex<HashMap<IpAddr, Window>>,
}

fn remaining<K>(
    map: &Mutex<HashMap<K, Window>>,
    key: &K,
    limit: u32,
    window: Duration,
    now: Instant,
) -> Option<Duration>
where
    K: std::hash::Hash + Eq,
{
    let map = map.lock().expect("throttle lock");
    let w = map.get(key)?;
    let elapsed = now.saturating_duration_since(w.started);
    (w.failures >= limit && elapsed < window).then(|| window - elapsed)
}

fn bump<K>(map: &Mutex<HashMap<K, Window>>, key: K, window: Duration, now: Instant)
where
    K: std::hash::Hash + Eq,
{
    let mut map = map.lock().expect("throttle lock");
    if map.len() >= MAX_TRACKED_KEYS {
        map.retain(|_, w| now.saturating_duration_since(w.started) < window);
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
}

impl Throttle {
    /// `limit` failures per `window`; a limit of 0 disables throttling.
    pub fn new(limit: u32, window: Duration) -> Self {
        Throttle {
            limit,
            window,
            users: Mutex::default(),
            addrs: Mutex::default(),
        }
    }

    /// How long the caller must wait, if either key is over the limit.
    pub fn blocked(&self, username: &str, addr: IpAddr) -> Option<Duration> {
        self.blocked_at(username, addr, Instant::now())
    }

    fn blocked_at(&self, username: &str, addr: IpAddr, now: Instant) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        let by_user = remaining(
            &self.users,
            &username.to_owned(),
            self.limit,
            self.window,
            now,
        );
        let by_addr = remaining(&self.addrs, &addr, self.limit, self.window, now);
        by_user.into_iter().chain(by_addr).max()
    }

    pub fn record_failure(&self, username: &str, addr: IpAddr) {
        self.record_failure_at(username, addr, Instant::now());
    }

    fn record_failure_at(&self, username: &str, addr: IpAddr, now: Instant) {
        if self.limit == 0 {
            return;
        }
        bump(&self.users, username.to_owned(), self.window, now);
        bump(&self.addrs, addr, self.window, now);
    }

    /// A successful login clears the username's failures (not the address's).
    pub fn record_success(&self, username: &str) {
        self.users.lock().expect("throttle lock").remove(username);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn blocks_after_limit_until_window_closes() {
        let t = Throttle::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for _ in 0..2 {
            t.record_failure_at("alice", A, t0);
        }
        assert_eq!(t.blocked_at("alice", A, t0), None);
        t.record_failure_at("alice", A, t0);
        let wait = t
            .blocked_at("alice", A, t0 + Duration::from_secs(10))
            .unwrap();
        assert_eq!(wait, Duration::from_secs(50));
        // Per username: another address is blocked for alice too; per address: bob from A too.
        assert!(t.blocked_at("alice", B, t0).is_some());
        assert!(t.blocked_at("bob", A, t0).is_some());
        assert_eq!(t.blocked_at("bob", B, t0), None);
        assert_eq!(t.blocked_at("alice", A, t0 + Duration::from_secs(60)), None);
    }

    #[test]
    fn success_clears_the_username() {
        let t = Throttle::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        t.record_failure_at("alice", A, t0);
        t.record_success("alice");
        assert_eq!(t.blocked_at("alice", B, t0), None);
    }

    #[test]
    fn zero_disables() {
        let t = Throttle::new(0, Duration::from_secs(60));
        t.record_failure("alice", A);
        assert_eq!(t.blocked("alice", A), None);
    }
}
