//! The connection cap: what a listener does when a new connection finds every slot taken.
//! It evicts the oldest connection that has not yet begun a request ([`Unheard`]), or, when
//! every slot holds one that has, closes the new one; [`Cap`] counts both.

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
    /// Connections yet to send a request evicted to make room.
    pub evicted: Counter,
    /// New connections closed because every slot held one that had had a request.
    pub refused: Counter,
}

impl Cap {
    /// A slot for a new connection: a free one, else the one the oldest connection yet to send
    /// a request gives up (counted as evicted); `None` when every slot holds a connection that
    /// has had a request (counted as refused).
    pub(super) fn admit(&self, unheard: &mut Unheard) -> Option<Slot> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => Some(Slot::Free(permit)),
            Err(_) if unheard.evict_oldest() => {
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

/// A listener's connections that have not yet begun a request, oldest first: silent sockets,
/// and clients sending their first request's head slowly or not at all. When the connection
/// cap is full, a new connection evicts the oldest of them instead of being turned away, so
/// sockets that send nothing cannot lock clients out until `header_read_timeout` ends them:
/// a client that sends its request as soon as it connects (a probe, a proxy) takes a slot
/// and, once its request has begun, keeps it. Connections that have had a request are never
/// evicted; their idle timeout ends them.
#[derive(Default)]
pub(super) struct Unheard {
    /// In accept order; entries whose connection has since had a request or ended are dropped
    /// as they are met.
    queue: VecDeque<(Arc<Activity>, AbortHandle)>,
}

impl Unheard {
    /// Above this many entries, stale ones are swept from the whole queue, not only its
    /// front (bounds it when an old unheard connection stays at the front).
    const SWEEP_ABOVE: usize = 1024;

    fn is_stale((activity, task): &(Arc<Activity>, AbortHandle)) -> bool {
        activity.requested.load(Ordering::Relaxed) || task.is_finished()
    }

    /// Records a new connection; `open` is how many connections the listener holds.
    pub(super) fn push(&mut self, activity: Arc<Activity>, task: AbortHandle, open: usize) {
        while self.queue.front().is_some_and(Self::is_stale) {
            self.queue.pop_front();
        }
        if self.queue.len() > Self::SWEEP_ABOVE.max(2 * open) {
            self.queue.retain(|entry| !Self::is_stale(entry));
        }
        self.queue.push_back((activity, task));
    }

    /// Ends the oldest connection that has not begun a request; false if there is none.
    pub(super) fn evict_oldest(&mut self) -> bool {
        while let Some(entry) = self.queue.pop_front() {
            if !Self::is_stale(&entry) {
                entry.1.abort();
                tracing::debug!(
                    "connection cap full: evicted the oldest connection yet to send a request"
                );
                return true;
            }
        }
        false
    }
}
