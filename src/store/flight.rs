//! Single-flight: concurrent misses for one key share one load instead of each querying the
//! lower tiers. A finished load is removed at once, so later requests start a fresh one rather
//! than reuse an answer that may be stale. A caller that joined a load and gives up leaves it
//! to the others and to callers still to come; the caller that started it giving up takes it
//! out of the map, since whoever runs it on does so under another deadline (below).
//!
//! A load runs under the deadline of the caller that started it (a confirmation with a cached
//! answer to fall back on takes a share of it, `crate::deadline`). A caller whose own deadline
//! comes sooner does not join it, which could answer after that caller must: it loads alone.
//!
//! A load reads the change window's epoch (`epoch`) before it reads any tier. A caller that
//! arrives after a removal finished (a logout answered, a revocation applied) does not join a
//! load that started before: that load may have read the row the removal took away, and its
//! answer, right for the callers that came before the removal, is not for one that comes after.
//! Such a caller starts a fresh load, which later callers join instead. A removal still under
//! way does not stop callers joining: it has not been answered, so they are concurrent with it.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
};

use tokio::sync::OnceCell;

use super::epoch::{ChangeWindow, Epoch};
use crate::deadline::Deadline;

type Flight<T> = Arc<OnceCell<T>>;

/// A load in flight.
struct Running<T> {
    flight: Flight<T>,
    /// The deadline it runs under.
    deadline: Deadline,
    /// The change window's epoch, read before it started.
    epoch: Epoch,
    /// How many removals had finished when it started.
    removals_finished: u64,
}

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
    /// its result, unless that one runs under a later deadline or started before a removal in
    /// `changes` finished. `load` is given the epoch to check its result against (read before it runs).
    /// `on_join` is called when the caller joins another's load.
    pub async fn run<F>(
        &self,
        key: &str,
        deadline: Deadline,
        changes: &ChangeWindow,
        load: impl FnOnce(Epoch) -> F,
        on_join: impl FnOnce(),
    ) -> T
    where
        F: Future<Output = T>,
    {
        let shared = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            let finished = changes.removals_finished();
            match inflight.get(key) {
                Some(running) if running.deadline > deadline => None,
                Some(running) if running.removals_finished == finished => {
                    Some((running.flight.clone(), running.epoch, false))
                }
                // None, or a load that started before a removal finished: a fresh one, in its
                // place. The callers of the one it replaces still wait for theirs.
                _ => {
                    let flight = Flight::default();
                    let epoch = changes.current();
                    let running = Running {
                        flight: flight.clone(),
                        deadline,
                        epoch,
                        removals_finished: finished,
                    };
                    inflight.insert(Arc::from(key), running);
                    Some((flight, epoch, true))
                }
            }
        };
        let Some((flight, epoch, leader)) = shared else {
            return load(changes.current()).await;
        };
        if !leader {
            on_join();
        }
        let _guard = FlightGuard {
            flights: self,
            key,
            flight: &flight,
            leader,
        };
        flight.get_or_init(|| load(epoch)).await.clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inflight.lock().expect("inflight lock").len()
    }
}

/// Removes a load from the in-flight map once it has finished, or once the caller that started
/// it gives up.
struct FlightGuard<'a, T> {
    flights: &'a Flights<T>,
    key: &'a str,
    flight: &'a Flight<T>,
    /// Whether this caller started the load (and so runs it).
    leader: bool,
}

impl<T> Drop for FlightGuard<'_, T> {
    fn drop(&mut self) {
        // A joiner giving up leaves the load to the others and to callers still to come.
        if !self.leader && !self.flight.initialized() {
            return;
        }
        // A finished load must not be reused by later requests. An abandoned one must not be
        // joined either: if its joiners still wait, tokio's `OnceCell` hands the load to one of
        // them, which runs it under its own, later deadline, and a caller that came now might
        // have to answer before that.
        let mut inflight = self.flights.inflight.lock().expect("inflight lock");
        if inflight
            .get(self.key)
            .is_some_and(|running| Arc::ptr_eq(&running.flight, self.flight))
        {
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

    /// The change window of the tests that make no change.
    static NO_CHANGES: std::sync::LazyLock<ChangeWindow> =
        std::sync::LazyLock::new(ChangeWindow::default);

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
                        &NO_CHANGES,
                        |_| async move {
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
        assert_eq!(
            flights
                .run("k", later(), &NO_CHANGES, |_| async { 1 }, || ())
                .await,
            1
        );
        // A later request loads afresh.
        assert_eq!(
            flights
                .run("k", later(), &NO_CHANGES, |_| async { 2 }, || ())
                .await,
            2
        );
        // A load whose only caller is cancelled leaves nothing behind.
        let abandoned = flights.run(
            "k",
            later(),
            &NO_CHANGES,
            |_| std::future::pending::<u32>(),
            || (),
        );
        let _ = tokio::time::timeout(std::time::Duration::from_millis(1), abandoned).await;
        assert_eq!(flights.len(), 0);
        assert_eq!(
            flights
                .run("k", later(), &NO_CHANGES, |_| async { 3 }, || ())
                .await,
            3
        );
    }

    /// A caller, spawned, whose load signals `started` and answers `value` once `gate` opens.
    struct Stalled {
        gate: Arc<Notify>,
        started: Arc<Notify>,
        caller: tokio::task::JoinHandle<u32>,
    }

    fn stalled(
        flights: &Arc<Flights<u32>>,
        changes: &Arc<ChangeWindow>,
        deadline: Deadline,
        value: u32,
    ) -> Stalled {
        let (gate, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (flights, changes) = (Arc::clone(flights), Arc::clone(changes));
        let (load_gate, load_started) = (Arc::clone(&gate), Arc::clone(&started));
        let caller = tokio::spawn(async move {
            let load = |_| async move {
                load_started.notify_one();
                load_gate.notified().await;
                value
            };
            flights.run("k", deadline, &changes, load, || ()).await
        });
        Stalled {
            gate,
            started,
            caller,
        }
    }

    /// A caller, spawned, under a later deadline than any other here, once it has joined
    /// another's load (within 5 s; its own load would answer `value`).
    async fn joined(
        flights: &Arc<Flights<u32>>,
        changes: &Arc<ChangeWindow>,
        value: u32,
    ) -> tokio::task::JoinHandle<u32> {
        let joins = Arc::new(AtomicUsize::new(0));
        let caller = {
            let (flights, changes, joins) =
                (Arc::clone(flights), Arc::clone(changes), Arc::clone(&joins));
            tokio::spawn(async move {
                let join = || {
                    joins.fetch_add(1, Ordering::SeqCst);
                };
                flights
                    .run("k", later(), &changes, |_| async move { value }, join)
                    .await
            })
        };
        let joining = async {
            while joins.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), joining)
            .await
            .expect("the caller joins the load in flight");
        caller
    }

    #[tokio::test]
    async fn a_caller_with_a_sooner_deadline_loads_alone_and_a_later_one_joins() {
        let flights = Arc::new(Flights::<u32>::default());
        let changes = Arc::new(ChangeWindow::default());
        let leader = stalled(
            &flights,
            &changes,
            Deadline::after(std::time::Duration::from_secs(30)),
            1,
        );
        leader.started.notified().await;
        // Sooner than the leader's: its own load, at once, while the leader's is still running.
        let sooner = Deadline::after(std::time::Duration::from_secs(1));
        let mut joined_it = false;
        let own = flights
            .run("k", sooner, &changes, |_| async { 2 }, || joined_it = true)
            .await;
        assert_eq!((own, joined_it), (2, false));
        // Later than the leader's: shares its load.
        let follower = joined(&flights, &changes, 3).await;
        leader.gate.notify_one();
        assert_eq!(leader.caller.await.unwrap(), 1);
        assert_eq!(follower.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_joiner_giving_up_leaves_the_load_to_later_callers() {
        let flights = Arc::new(Flights::<u32>::default());
        let changes = Arc::new(ChangeWindow::default());
        let leader = stalled(&flights, &changes, later(), 1);
        leader.started.notified().await;
        let gives_up = joined(&flights, &changes, 2).await;
        gives_up.abort();
        assert!(gives_up.await.unwrap_err().is_cancelled());
        // Still the leader's load: a later caller joins it rather than load again.
        let follower = joined(&flights, &changes, 3).await;
        leader.gate.notify_one();
        assert_eq!(leader.caller.await.unwrap(), 1);
        assert_eq!(follower.await.unwrap(), 1);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_load_its_starter_gave_up_is_run_on_by_a_joiner_and_joined_by_no_one_new() {
        let flights = Arc::new(Flights::<u32>::default());
        let changes = Arc::new(ChangeWindow::default());
        let leader = stalled(&flights, &changes, later(), 1);
        leader.started.notified().await;
        let (joins, follower_started, follower_gate) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
        );
        let follower = {
            let (flights, changes) = (Arc::clone(&flights), Arc::clone(&changes));
            let (joins, started, gate) = (
                Arc::clone(&joins),
                Arc::clone(&follower_started),
                Arc::clone(&follower_gate),
            );
            tokio::spawn(async move {
                let load = |_| async move {
                    started.notify_one();
                    gate.notified().await;
                    2
                };
                let join = || {
                    joins.fetch_add(1, Ordering::SeqCst);
                };
                flights.run("k", later(), &changes, load, join).await
            })
        };
        while joins.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        leader.caller.abort();
        assert!(leader.caller.await.unwrap_err().is_cancelled());
        // The joiner runs the load on, under its own deadline: a caller now loads afresh.
        follower_started.notified().await;
        let mut joined_it = false;
        let now = flights.run("k", later(), &changes, |_| async { 3 }, || joined_it = true);
        let now = tokio::time::timeout(std::time::Duration::from_secs(5), now)
            .await
            .expect("answered without waiting for the abandoned load");
        assert_eq!((now, joined_it), (3, false));
        follower_gate.notify_one();
        assert_eq!(follower.await.unwrap(), 2);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_caller_after_a_removal_does_not_join_a_load_that_started_before_it() {
        let flights = Arc::new(Flights::<u32>::default());
        let changes = Arc::new(ChangeWindow::default());
        // Reads the row the removal below takes away, then stalls before answering.
        let before = stalled(&flights, &changes, later(), 1);
        before.started.notified().await;
        // A logout answered while that load is still out.
        changes.removing(async {}).await;
        let mut joined_it = false;
        let after = flights.run("k", later(), &changes, |_| async { 2 }, || joined_it = true);
        // Joining the stalled load would wait for it: a bounded wait fails instead of hanging.
        let after = tokio::time::timeout(std::time::Duration::from_secs(5), after)
            .await
            .expect("answered without waiting for the load that predates the removal");
        assert_eq!(
            (after, joined_it),
            (2, false),
            "a fresh load, not the stale one's answer"
        );
        // The stale load still answers its own caller, who came before the removal.
        before.gate.notify_one();
        assert_eq!(before.caller.await.unwrap(), 1);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_fresh_load_started_after_a_removal_is_the_one_later_callers_join() {
        let flights = Arc::new(Flights::<u32>::default());
        let changes = Arc::new(ChangeWindow::default());
        let stale = stalled(&flights, &changes, later(), 1);
        stale.started.notified().await;
        changes.removing(async {}).await;
        let fresh = stalled(&flights, &changes, later(), 2);
        tokio::time::timeout(std::time::Duration::from_secs(5), fresh.started.notified())
            .await
            .expect("a caller after the removal starts a load of its own");
        let follower = joined(&flights, &changes, 3).await;
        // The stale load ending must not take the fresh one out of the map.
        stale.gate.notify_one();
        assert_eq!(stale.caller.await.unwrap(), 1);
        fresh.gate.notify_one();
        assert_eq!(fresh.caller.await.unwrap(), 2);
        assert_eq!(follower.await.unwrap(), 2, "joined the fresh load");
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_removal_still_under_way_does_not_stop_callers_joining() {
        let flights = Arc::new(Flights::<u32>::default());
        let changes = Arc::new(ChangeWindow::default());
        let leader = stalled(&flights, &changes, later(), 1);
        leader.started.notified().await;
        // A logout not answered yet: a caller now is concurrent with it, and shares the load.
        let logout_done = Arc::new(Notify::new());
        let logout = {
            let (changes, logout_done) = (Arc::clone(&changes), Arc::clone(&logout_done));
            tokio::spawn(async move { changes.removing(logout_done.notified()).await })
        };
        while changes.nothing_removed_since(changes.current()) {
            tokio::task::yield_now().await;
        }
        let follower = joined(&flights, &changes, 2).await;
        leader.gate.notify_one();
        assert_eq!(leader.caller.await.unwrap(), 1);
        assert_eq!(follower.await.unwrap(), 1);
        logout_done.notify_one();
        logout.await.unwrap();
    }
}
