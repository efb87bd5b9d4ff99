//! Redis deletions that failed, kept and retried until Redis answers. A deletion older than the
//! longest a Redis entry can live (`redis.max_cache_ttl`) is moot: the entry it targets has
//! expired by itself, so it is dropped.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::postgres::Removed;

/// Upper bound on remembered failed Redis deletions.
const MAX_PENDING: usize = 100_000;

/// One deletion to make in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RedisEviction {
    /// A token row's entry and its membership of the user's index.
    Token(Removed),
    /// Whatever entry a token key holds.
    Key(String),
    /// Every entry of a user (through the user's index).
    User(String),
}

/// The queue of deletions still to make.
pub struct Outbox {
    pending: Mutex<VecDeque<(Instant, RedisEviction)>>,
    /// How long a deletion stays worth making.
    horizon: Duration,
}

impl Outbox {
    pub fn new(horizon: Duration) -> Self {
        Outbox {
            pending: Mutex::default(),
            horizon,
        }
    }

    /// Remembers a deletion that failed.
    pub fn push(&self, eviction: RedisEviction) {
        self.push_all_at(std::iter::once(eviction), Instant::now());
    }

    /// Remembers deletions that failed together (a batch of evictions).
    pub fn push_all(&self, evictions: impl IntoIterator<Item = RedisEviction>) {
        self.push_all_at(evictions, Instant::now());
    }

    #[cfg(test)]
    fn push_at(&self, eviction: RedisEviction, at: Instant) {
        self.push_all_at(std::iter::once(eviction), at);
    }

    fn push_all_at(&self, evictions: impl IntoIterator<Item = RedisEviction>, at: Instant) {
        let mut pending = self.pending.lock().expect("outbox lock");
        let mut dropped = 0usize;
        for eviction in evictions {
            if pending.len() >= MAX_PENDING {
                pending.pop_front();
                dropped += 1;
            }
            pending.push_back((at, eviction));
        }
        if dropped > 0 {
            // Once per batch, not per deletion: a bulk removal can overflow by thousands.
            tracing::warn!(
                dropped,
                "too many pending redis deletions; dropped the oldest (their entries expire by TTL)"
            );
        }
    }

    /// How many deletions are pending.
    pub fn len(&self) -> usize {
        self.pending.lock().expect("outbox lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops moot deletions, then, if `ready`, hands all the others to `delete` at once (so that
    /// tokens go to Redis in batches, not a round trip each) and keeps those it hands back as
    /// failed, in the order it hands them back (first in the next round). Returns how many are
    /// still pending.
    pub async fn retry<F, Fut>(&self, ready: bool, delete: F) -> usize
    where
        F: FnOnce(Vec<RedisEviction>) -> Fut,
        Fut: Future<Output = Vec<RedisEviction>>,
    {
        self.retry_at(Instant::now(), ready, delete).await
    }

    async fn retry_at<F, Fut>(&self, now: Instant, ready: bool, delete: F) -> usize
    where
        F: FnOnce(Vec<RedisEviction>) -> Fut,
        Fut: Future<Output = Vec<RedisEviction>>,
    {
        let due = {
            let mut pending = self.pending.lock().expect("outbox lock");
            let oldest_useful = now.checked_sub(self.horizon);
            pending.retain(|(at, _)| oldest_useful.is_none_or(|h| *at > h));
            if pending.is_empty() || !ready {
                return pending.len();
            }
            std::mem::take(&mut *pending)
        };
        // Each deletion once (the same one can fail again and again, each time pushed anew), with
        // the time it was last pushed: a failure keeps that time, and is dropped once it is moot.
        let mut pushed_at = HashMap::with_capacity(due.len());
        let mut evictions = Vec::with_capacity(due.len());
        for (at, eviction) in due {
            match pushed_at.entry(eviction) {
                std::collections::hash_map::Entry::Occupied(mut latest) => {
                    // Pushed in order, so the later push is the later time.
                    latest.insert(at);
                }
                std::collections::hash_map::Entry::Vacant(first) => {
                    evictions.push(first.key().clone());
                    first.insert(at);
                }
            }
        }
        let mut failed: VecDeque<(Instant, RedisEviction)> = delete(evictions)
            .await
            .into_iter()
            .map(|eviction| (pushed_at.get(&eviction).copied().unwrap_or(now), eviction))
            .collect();
        let mut pending = self.pending.lock().expect("outbox lock");
        // Failures first: they are older than anything pushed while we were retrying.
        failed.extend(pending.drain(..));
        *pending = failed;
        pending.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn key(k: &str) -> RedisEviction {
        RedisEviction::Key(k.to_owned())
    }

    /// The deletion the next round tries first.
    fn front(outbox: &Outbox) -> Option<RedisEviction> {
        let pending = outbox.pending.lock().unwrap();
        pending.front().map(|(_, e)| e.clone())
    }

    /// What is left after a round at `at` in which Redis is not ready (only moot ones go).
    async fn left_at(outbox: &Outbox, at: Instant) -> usize {
        outbox
            .retry_at(at, false, |_| async { unreachable!("not ready") })
            .await
    }

    #[tokio::test]
    async fn failed_deletions_are_kept_and_retried_until_they_succeed() {
        let outbox = Outbox::new(Duration::from_secs(60));
        outbox.push(key("a"));
        outbox.push(RedisEviction::User("7".into()));
        outbox.push(RedisEviction::Token(("b".into(), "7".into())));
        // Redis not ready: nothing is tried.
        let tried = Arc::new(Mutex::new(Vec::new()));
        let record = |fail: fn(&RedisEviction) -> bool| {
            let tried = Arc::clone(&tried);
            move |due: Vec<RedisEviction>| {
                tried.lock().unwrap().push(due.clone());
                async move { due.into_iter().filter(fail).collect() }
            }
        };
        assert_eq!(outbox.retry(false, record(|_| false)).await, 3);
        assert!(tried.lock().unwrap().is_empty());
        // Ready but failing: all handed over at once, all kept, in order.
        assert_eq!(outbox.retry(true, record(|_| true)).await, 3);
        assert_eq!(tried.lock().unwrap().len(), 1);
        assert_eq!(tried.lock().unwrap()[0].len(), 3);
        assert_eq!(tried.lock().unwrap()[0][0], key("a"));
        let kept: Vec<_> = outbox
            .pending
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect();
        assert_eq!(kept, tried.lock().unwrap()[0]);
        // One failing: only it is kept.
        assert_eq!(
            outbox
                .retry(true, record(|e| matches!(e, RedisEviction::User(_))))
                .await,
            1
        );
        assert_eq!(front(&outbox), Some(RedisEviction::User("7".into())));
        // Succeeding: the queue empties.
        assert_eq!(outbox.retry(true, record(|_| false)).await, 0);
        assert!(outbox.is_empty());
    }

    #[tokio::test]
    async fn a_deletion_pushed_twice_is_tried_once_and_kept_with_its_later_time() {
        let outbox = Outbox::new(Duration::from_secs(60));
        let now = Instant::now();
        let Some(earlier) = now.checked_sub(Duration::from_secs(50)) else {
            return; // a clock too close to its origin to go back 50 s
        };
        outbox.push_at(key("twice"), earlier);
        outbox.push_at(key("once"), earlier);
        outbox.push_at(key("twice"), now);
        let tried = Arc::new(Mutex::new(Vec::new()));
        let fail_all = {
            let tried = Arc::clone(&tried);
            move |due: Vec<RedisEviction>| {
                tried.lock().unwrap().extend(due.clone());
                async move { due }
            }
        };
        assert_eq!(outbox.retry_at(now, true, fail_all).await, 2);
        assert_eq!(*tried.lock().unwrap(), vec![key("twice"), key("once")]);
        // 11 s later the one pushed only long ago is moot; the one pushed again is not.
        assert_eq!(left_at(&outbox, now + Duration::from_secs(11)).await, 1);
        assert_eq!(front(&outbox), Some(key("twice")));
    }

    #[tokio::test]
    async fn a_failed_retry_keeps_the_time_it_was_pushed() {
        let outbox = Outbox::new(Duration::from_secs(60));
        let now = Instant::now();
        let Some(earlier) = now.checked_sub(Duration::from_secs(50)) else {
            return; // a clock too close to its origin to go back 50 s
        };
        outbox.push_at(key("early"), earlier);
        outbox.push_at(key("late"), now);
        let fail_all = |due: Vec<RedisEviction>| async move { due };
        assert_eq!(outbox.retry_at(now, true, fail_all).await, 2);
        // 11 s later the early one is moot (61 s old), the late one is not.
        assert_eq!(left_at(&outbox, now + Duration::from_secs(11)).await, 1);
        assert_eq!(front(&outbox), Some(key("late")));
    }

    #[tokio::test]
    async fn deletions_older_than_the_longest_entry_life_are_dropped() {
        let outbox = Outbox::new(Duration::from_secs(60));
        let now = Instant::now();
        if let Some(long_ago) = now.checked_sub(Duration::from_secs(61)) {
            outbox.push_at(key("old"), long_ago);
        }
        outbox.push_at(key("new"), now);
        assert_eq!(left_at(&outbox, now).await, 1);
    }

    #[test]
    fn the_queue_is_bounded_and_drops_the_oldest() {
        let outbox = Outbox::new(Duration::from_secs(60));
        for i in 0..MAX_PENDING + 5 {
            outbox.push(key(&i.to_string()));
        }
        assert_eq!(outbox.len(), MAX_PENDING);
        let first = outbox.pending.lock().unwrap().front().cloned();
        assert_eq!(first.map(|(_, e)| e), Some(key("5")));
    }
}
