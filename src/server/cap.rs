//! The connection cap: what a listener does when a new connection finds every slot taken.
//! It evicts a connection that may go ([`Evictable`]): the oldest that has not yet begun a
//! request and, on a listener that allows it ([`Evict::Idle`], the admin port), else the one
//! idle the longest between requests. When none may go, it closes the new one. [`Cap`] counts
//! both.

use std::{
    collections::VecDeque,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    task::AbortHandle,
};

use super::Activity;

/// A listener's connection cap, and the counts of what it did when a new connection found it
/// full.
pub struct Cap {
    /// The open connections allowed; may be shared between listeners.
    pub slots: Arc<Semaphore>,
    /// Which open connections a new one may take the place of.
    pub evict: Evict,
    /// Connections yet to send a request evicted to make room.
    pub evicted: Counter,
    /// New connections closed because every slot held one that had had a request.
    pub refused: Counter,
}

impl Cap {
    /// A slot for a new connection: a free one, else the one an evicted connection gives up
    /// (counted as evicted); `None` when no open connection may be evicted (counted as
    /// refused).
    pub(super) fn admit(&self, evictable: &mut Evictable) -> Option<Slot> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => Some(Slot::Free(permit)),
            Err(_) if evictable.evict_one() => {
                self.evicted.inc();
                Some(Slot::Freeing(Arc::clone(&self.slots)))
            }
            Err(_) => {
                self.refused.inc();
                None
            }
        }
    }
}

/// A new connection's slot, as [`Cap::admit`] found it.
pub(super) enum Slot {
    Free(OwnedSemaphorePermit),
    /// Being given back by an evicted connection.
    Freeing(Arc<Semaphore>),
}

impl Slot {
    /// The slot, once it is free. An evicted connection's slot is freed as its task is
    /// dropped, which the runtime does at once; semaphore waiters are served first come, first
    /// served, so no later accept takes it meanwhile. `None` if it is not free `within`.
    pub(super) async fn taken(self, within: Duration) -> Option<OwnedSemaphorePermit> {
        match self {
            Slot::Free(permit) => Some(permit),
            Slot::Freeing(slots) => tokio::time::timeout(within, slots.acquire_owned())
                .await
                .ok()?
                .ok(),
        }
    }
}

/// Which open connections a full listener may close to make room for a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evict {
    /// Only those that have not yet begun a request: silent sockets, and clients sending their
    /// first request's head slowly or not at all. A connection that has had a request keeps its
    /// slot until its idle timeout, since on the main port it is a proxy's pooled connection.
    Unheard,
    /// Those too, else the connection idle the longest between requests (never one with a
    /// request in flight). For the admin port, whose clients (probes, scrapes) reconnect when a
    /// kept-alive connection is closed: whoever reaches it cannot hold every slot with served
    /// connections and fail liveness probes until the idle timeout.
    Idle,
}

/// A listener's open connections that may be evicted when the cap is full, in accept order:
/// silent sockets, and clients sending their first request's head slowly or not at all, so
/// that sockets that send nothing cannot lock clients out until `header_read_timeout` ends
/// them (a client that sends its request as soon as it connects, a probe or a proxy, takes a
/// slot and keeps it); with [`Evict::Idle`], connections between requests as well.
pub(super) struct Evictable {
    policy: Evict,
    /// In accept order; entries whose connection has ended, or under [`Evict::Unheard`] has
    /// had a request, are dropped as they are met.
    queue: VecDeque<(Arc<Activity>, AbortHandle)>,
}

impl Evictable {
    /// Above this many entries, stale ones are swept from the whole queue, not only its
    /// front (bounds it when an old connection stays at the front).
    const SWEEP_ABOVE: usize = 1024;

    pub(super) fn new(policy: Evict) -> Evictable {
        Evictable {
            policy,
            queue: VecDeque::new(),
        }
    }

    /// Whether an entry's connection can no longer be evicted, ever.
    fn is_stale(policy: Evict, (activity, task): &(Arc<Activity>, AbortHandle)) -> bool {
        task.is_finished()
            || (policy == Evict::Unheard && activity.requested.load(Ordering::Relaxed))
    }

    /// An entry's connection, unless it has ended.
    fn live((activity, task): &(Arc<Activity>, AbortHandle)) -> Option<&Activity> {
        (!task.is_finished()).then_some(activity)
    }

    fn drop_stale_front(&mut self) {
        while self
            .queue
            .front()
            .is_some_and(|entry| Self::is_stale(self.policy, entry))
        {
            self.queue.pop_front();
        }
    }

    /// Records a new connection; `open` is how many connections the listener holds.
    pub(super) fn push(&mut self, activity: Arc<Activity>, task: AbortHandle, open: usize) {
        self.drop_stale_front();
        if self.queue.len() > Self::SWEEP_ABOVE.max(2 * open) {
            let policy = self.policy;
            self.queue.retain(|entry| !Self::is_stale(policy, entry));
        }
        self.queue.push_back((activity, task));
    }

    /// Ends one connection the policy allows to go: the oldest that has not begun a request,
    /// else (under [`Evict::Idle`]) the one idle the longest. False if there is none.
    pub(super) fn evict_one(&mut self) -> bool {
        self.drop_stale_front();
        // Under Evict::Unheard the front, now that stale entries have gone from it.
        let unheard = self.queue.iter().position(|entry| {
            Self::live(entry).is_some_and(|a| !a.requested.load(Ordering::Relaxed))
        });
        let chosen = unheard.or_else(|| match self.policy {
            Evict::Unheard => None,
            // A request that begins between this check and the abort is cut short, as is an
            // answer hyper is still writing (a connection counts as idle once its handler has
            // returned): a probe or a scrape, which its client retries. Such a connection has
            // been idle the shortest, so it goes only when every other has a request in flight.
            Evict::Idle => (self.queue.iter().enumerate())
                .filter_map(|(i, entry)| Some((i, Self::live(entry)?.idle_since()?)))
                .min_by_key(|&(_, since)| since)
                .map(|(i, _)| i),
        });
        let Some((activity, task)) = chosen.and_then(|i| self.queue.remove(i)) else {
            return false;
        };
        task.abort();
        tracing::debug!(
            requested = activity.requested.load(Ordering::Relaxed),
            "connection cap full: evicted a connection with no request in flight"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use std::future::pending;

    use tokio::task::JoinHandle;

    use super::*;

    /// A connection task that runs until aborted, with its activity.
    fn connection() -> (Arc<Activity>, JoinHandle<()>) {
        (Activity::new(), tokio::spawn(pending::<()>()))
    }

    /// A connection that has had one request and is now idle.
    async fn served() -> (Arc<Activity>, JoinHandle<()>) {
        let (activity, task) = connection();
        drop(activity.begin());
        // idle_since has millisecond resolution: the next one served is idle for less.
        tokio::time::sleep(Duration::from_millis(5)).await;
        (activity, task)
    }

    fn push(evictable: &mut Evictable, (activity, task): &(Arc<Activity>, JoinHandle<()>)) {
        evictable.push(Arc::clone(activity), task.abort_handle(), 4);
    }

    /// Whether `task` was aborted (it never ends otherwise).
    async fn aborted(task: JoinHandle<()>) -> bool {
        let ended = tokio::time::timeout(Duration::from_secs(1), task).await;
        ended.is_ok_and(|r| r.is_err_and(|e| e.is_cancelled()))
    }

    #[tokio::test]
    async fn the_main_port_evicts_only_connections_yet_to_send_a_request() {
        let mut evictable = Evictable::new(Evict::Unheard);
        let kept = served().await;
        let unheard = connection();
        push(&mut evictable, &kept);
        push(&mut evictable, &unheard);
        assert!(evictable.evict_one());
        assert!(aborted(unheard.1).await);
        assert!(!evictable.evict_one(), "a served connection was evicted");
        assert!(!kept.1.is_finished());
    }

    #[tokio::test]
    async fn the_admin_port_evicts_the_unheard_then_the_longest_idle_never_one_in_flight() {
        let mut evictable = Evictable::new(Evict::Idle);
        let idle_longest = served().await;
        let busy = connection();
        let _in_flight = busy.0.begin();
        let idle_shorter = served().await;
        let unheard = connection();
        for entry in [&idle_longest, &busy, &idle_shorter, &unheard] {
            push(&mut evictable, entry);
        }
        assert!(evictable.evict_one());
        assert!(
            aborted(unheard.1).await,
            "the unheard connection goes first"
        );
        assert!(evictable.evict_one());
        assert!(
            aborted(idle_longest.1).await,
            "then the one idle the longest"
        );
        assert!(evictable.evict_one());
        assert!(aborted(idle_shorter.1).await);
        assert!(
            !evictable.evict_one(),
            "a connection with a request in flight was evicted"
        );
        assert!(!busy.1.is_finished());
    }
}
