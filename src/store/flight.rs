//! Single-flight: concurrent misses for one key share one load instead of each querying the
//! lower tiers. A finished or abandoned load is removed at once, so later requests start a
//! fresh one rather than reuse an answer that may be stale.
//!
//! A load runs under the deadline of the caller that started it (a confirmation with a cached
//! answer to fall back on takes a share of it, `crate::deadline`). A caller whose own deadline
//! comes sooner does not join it, which could answer after that caller must: it loads alone.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
};

use tokio::sync::OnceCell;

use crate::deadline::Deadline;

type Flight<T> = Arc<OnceCell<T>>;

/// A load in flight, and the deadline it runs under.
type Running<T> = (Flight<T>, Deadline);

/// The loads in flight, by key.
pub struct Flights<T> {
    inflight: Mutex<HashMap<Arc<str>, Running<T>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            inflight: Mutex::default(),
        }
    }
}

impl<T: Clone> Flights<T> {
    /// Runs `load` for `key` under `deadline`, or waits for the one already running and shares
    /// its result, unless that one runs under a later deadline. `on_join` is called when the
    /// caller joins another's load.
    pub async fn run<F>(
        &self,
        key: &str,
        deadline: Deadline,
        load: impl FnOnce() -> F,
        on_join: impl FnOnce(),
    ) -> T
    where
        F: Future<Output = T>,
    {
        let shared = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            match inflight.get(key) {
                Some((_, theirs)) if *theirs > deadline => None,
                Some((f, _)) => Some((f.clone(), false)),
                None => {
                    let f = Flight::default();
                    inflight.insert(Arc::from(key), (f.clone(), deadline));
                    Some((f, true))
                }
            }
        };
        let Some((flight, leader)) = shared else {
            return load().await;
        };
        if !leader {
            on_join();
        }
        let _guard = FlightGuard {
            flights: self,
            key,
            flight: &flight,
        };
        flight.get_or_init(load).await.clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inflight.lock().expect("inflight lock").len()
    }
}

/// Removes a finished or abandoned load from the in-flight map.
struct FlightGuard<'a, T> {
    flights: &'a Flights<T>,
    key: &'a str,
    flight: &'a Flight<T>,
}

impl<T> Drop for FlightGuard<'_, T> {
    fn drop(&mut self) {
        let mut inflight = self.flights.inflight.lock().expect("inflight lock");
        if inflight
            .get(self.key)
            .is_some_and(|(f, _)| Arc::ptr_eq(f, self.flight))
        {
            // A finished load must not be reused by later requests; an abandoned one (its
            // callers all cancelled) must not block them either.
            inflight.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Notify;

    use super::*;

    /// A deadline well after any in these tests.
    fn later() -> Deadline {
        Deadline::after(std::time::Duration::from_secs(60))
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let flights = Arc::new(Flights::<u32>::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let joined = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (flights, loads, joined, gate) = (
                Arc::clone(&flights),
                Arc::clone(&loads),
                Arc::clone(&joined),
                Arc::clone(&gate),
            );
            tasks.push(tokio::spawn(async move {
                flights
                    .run(
                        "k",
                        later(),
                        || async move {
                            loads.fetch_add(1, Ordering::SeqCst);
                            gate.notified().await;
                            42
                        },
                        || {
                            joined.fetch_add(1, Ordering::SeqCst);
                        },
                    )
                    .await
            }));
        }
        // Let every task reach the flight, then release the one load.
        while joined.load(Ordering::SeqCst) < 7 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 42);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0, "a finished load is not kept");
    }

    #[tokio::test]
    async fn a_finished_load_is_not_reused_and_an_abandoned_one_does_not_block() {
        let flights = Flights::<u32>::default();
        assert_eq!(flights.run("k", later(), || async { 1 }, || ()).await, 1);
        // A later request loads afresh.
        assert_eq!(flights.run("k", later(), || async { 2 }, || ()).await, 2);
        // A load whose only caller is cancelled leaves nothing behind.
        let abandoned = flights.run("k", later(), std::future::pending::<u32>, || ());
        let _ = tokio::time::timeout(std::time::Duration::from_millis(1), abandoned).await;
        assert_eq!(flights.len(), 0);
        assert_eq!(flights.run("k", later(), || async { 3 }, || ()).await, 3);
    }

    #[tokio::test]
    async fn a_caller_with_a_sooner_deadline_loads_alone_and_a_later_one_joins() {
        let flights = Arc::new(Flights::<u32>::default());
        let gate = Arc::new(Notify::new());
        let started = Arc::new(Notify::new());
        let leader = {
            let (flights, gate, started) = (
                Arc::clone(&flights),
                Arc::clone(&gate),
                Arc::clone(&started),
            );
            tokio::spawn(async move {
                let deadline = Deadline::after(std::time::Duration::from_secs(30));
                let load = || async move {
                    started.notify_one();
                    gate.notified().await;
                    1
                };
                flights.run("k", deadline, load, || ()).await
            })
        };
        started.notified().await;
        // Sooner than the leader's: its own load, at once, while the leader's is still running.
        let sooner = Deadline::after(std::time::Duration::from_secs(1));
        let mut joined = false;
        let own = flights
            .run("k", sooner, || async { 2 }, || joined = true)
            .await;
        assert_eq!((own, joined), (2, false));
        // Later than the leader's: shares its load.
        let follower_joined = Arc::new(AtomicUsize::new(0));
        let follower = {
            let (flights, follower_joined) = (Arc::clone(&flights), Arc::clone(&follower_joined));
            tokio::spawn(async move {
                let join = || {
                    follower_joined.fetch_add(1, Ordering::SeqCst);
                };
                flights.run("k", later(), || async { 3 }, join).await
            })
        };
        while follower_joined.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert_eq!(leader.await.unwrap(), 1);
        assert_eq!(follower.await.unwrap(), 1);
    }
}
