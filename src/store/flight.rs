//! Single-flight: concurrent misses for one key share one load instead of each querying the
//! lower tiers. A finished or abandoned load is removed at once, so later requests start a
//! fresh one rather than reuse an answer that may be stale.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
};

use tokio::sync::OnceCell;

type Flight<T> = Arc<OnceCell<T>>;

/// The loads in flight, by key.
pub struct Flights<T> {
    inflight: Mutex<HashMap<Arc<str>, Flight<T>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            inflight: Mutex::default(),
        }
    }
}

impl<T: Clone> Flights<T> {
    /// Runs `load` for `key`, or waits for the one already running and shares its result.
    /// `on_join` is called when the caller joins another's load.
    pub async fn run<F>(&self, key: &str, load: impl FnOnce() -> F, on_join: impl FnOnce()) -> T
    where
        F: Future<Output = T>,
    {
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
            .is_some_and(|f| Arc::ptr_eq(f, self.flight))
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
        assert_eq!(flights.run("k", || async { 1 }, || ()).await, 1);
        // A later request loads afresh.
        assert_eq!(flights.run("k", || async { 2 }, || ()).await, 2);
        // A load whose only caller is cancelled leaves nothing behind.
        let abandoned = flights.run("k", std::future::pending::<u32>, || ());
        let _ = tokio::time::timeout(std::time::Duration::from_millis(1), abandoned).await;
        assert_eq!(flights.len(), 0);
        assert_eq!(flights.run("k", || async { 3 }, || ()).await, 3);
    }
}
