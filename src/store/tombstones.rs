//! Revocations remembered in-process, so that a Redis entry they concern is never trusted.
//!
//! Redis can keep serving what a revocation deleted: a DEL that Redis refused (READONLY after a
//! failover, MISCONF, NOREPLICAS) and only queued; a DEL acknowledged by a master that died
//! before replicating it; a user whose index key (`knox:user:<id>:tokens`) was evicted, so that
//! deactivating them deleted none of their entries. Every revocation the change feed reports —
//! live, or replayed from the revocation log when the feed (re)connects or an instance starts —
//! leaves a tombstone here for as long as a Redis entry could outlive it (`redis.max_cache_ttl`
//! plus the feed's replay slack). A Redis entry whose token key or user has a tombstone is
//! confirmed with Postgres before use, and never served stale when Postgres cannot answer.
//! A TRUNCATE names no rows, so it distrusts every entry for the same horizon.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use compact_str::CompactString;

/// Tombstones kept per kind before the oldest are dropped; past it every Redis entry is
/// distrusted until the horizon passes, so an overflow costs queries, never correctness.
const MAX_TOMBSTONES: usize = 200_000;

/// The revocations of the last `horizon`.
pub struct Tombstones {
    horizon: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    keys: HashMap<CompactString, Instant>,
    users: HashMap<CompactString, Instant>,
    /// Until then, no Redis entry is trusted (everything was revoked, or tombstones overflowed).
    distrust_all_until: Option<Instant>,
}

impl Tombstones {
    pub fn new(horizon: Duration) -> Self {
        Tombstones {
            horizon,
            inner: Mutex::default(),
        }
    }

    /// How long a tombstone lasts: the age past which no Redis entry it guards can exist.
    pub fn horizon(&self) -> Duration {
        self.horizon
    }

    /// A token key's row was deleted or changed.
    pub fn token(&self, token_key: &str) {
        self.token_at(token_key, Instant::now());
    }

    /// A user was deactivated, deleted or changed password.
    pub fn user(&self, user_id: &str) {
        self.user_at(user_id, Instant::now());
    }

    /// Every token may have been revoked at once (a TRUNCATE), or changes may have been
    /// missed: distrust every Redis entry for a horizon, by which time every entry written
    /// before now has expired.
    pub fn everything(&self) {
        self.everything_at(Instant::now());
    }

    /// Whether a Redis entry for this key and user may be trusted without asking Postgres.
    pub fn clear(&self, token_key: &str, user_id: &str) -> bool {
        self.clear_at(token_key, user_id, Instant::now())
    }

    fn token_at(&self, token_key: &str, now: Instant) {
        let mut inner = self.inner.lock().expect("tombstones lock");
        self.make_room(&mut inner, now, |i| &mut i.keys);
        inner.keys.insert(token_key.into(), now + self.horizon);
    }

    fn user_at(&self, user_id: &str, now: Instant) {
        let mut inner = self.inner.lock().expect("tombstones lock");
        self.make_room(&mut inner, now, |i| &mut i.users);
        inner.users.insert(user_id.into(), now + self.horizon);
    }

    fn everything_at(&self, now: Instant) {
        let until = now + self.horizon;
        let mut inner = self.inner.lock().expect("tombstones lock");
        inner.distrust_all_until = Some(inner.distrust_all_until.map_or(until, |u| u.max(until)));
    }

    fn clear_at(&self, token_key: &str, user_id: &str, now: Instant) -> bool {
        let inner = self.inner.lock().expect("tombstones lock");
        let live = |until: Option<&Instant>| until.is_some_and(|u| *u > now);
        !(live(inner.distrust_all_until.as_ref())
            || live(inner.keys.get(token_key))
            || live(inner.users.get(user_id)))
    }

    /// Drops expired tombstones when a map is full; if it is still full, distrusts everything
    /// instead of remembering more.
    fn make_room(
        &self,
        inner: &mut Inner,
        now: Instant,
        map: impl Fn(&mut Inner) -> &mut HashMap<CompactString, Instant>,
    ) {
        if map(inner).len() < MAX_TOMBSTONES {
            return;
        }
        map(inner).retain(|_, until| *until > now);
        if map(inner).len() >= MAX_TOMBSTONES {
            tracing::warn!(
                "too many recent revocations to remember one by one; every Redis entry is confirmed with Postgres for a while"
            );
            map(inner).clear();
            let until = now + self.horizon;
            inner.distrust_all_until =
                Some(inner.distrust_all_until.map_or(until, |u| u.max(until)));
        }
    }

    /// Frees expired tombstones (housekeeping).
    pub fn purge_expired(&self) {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("tombstones lock");
        inner.keys.retain(|_, until| *until > now);
        inner.users.retain(|_, until| *until > now);
        if inner.distrust_all_until.is_some_and(|u| u <= now) {
            inner.distrust_all_until = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HORIZON: Duration = Duration::from_secs(300);

    #[test]
    fn a_revoked_key_or_user_is_not_trusted_until_the_horizon_passes() {
        let t = Tombstones::new(HORIZON);
        let now = Instant::now();
        assert!(t.clear_at("k1", "7", now));
        t.token_at("k1", now);
        assert!(!t.clear_at("k1", "8", now));
        assert!(t.clear_at("k2", "7", now), "other keys are unaffected");
        t.user_at("7", now);
        assert!(!t.clear_at("k2", "7", now), "every key of the user");
        assert!(t.clear_at("k2", "8", now));
        let later = now + HORIZON + Duration::from_millis(1);
        assert!(t.clear_at("k1", "7", later));
    }

    #[test]
    fn everything_distrusts_every_entry_for_the_horizon() {
        let t = Tombstones::new(HORIZON);
        let now = Instant::now();
        t.everything_at(now);
        assert!(!t.clear_at("any", "1", now + Duration::from_secs(299)));
        assert!(t.clear_at("any", "1", now + Duration::from_secs(301)));
    }

    #[test]
    fn an_overflow_distrusts_everything_rather_than_forgetting() {
        let t = Tombstones::new(HORIZON);
        let now = Instant::now();
        for i in 0..MAX_TOMBSTONES {
            t.token_at(&i.to_string(), now);
        }
        t.token_at("one more", now);
        // The individual tombstones are gone, but nothing is trusted meanwhile.
        assert!(!t.clear_at("never revoked", "1", now));
        assert!(!t.clear_at("0", "1", now));
        t.purge_expired();
    }
}
