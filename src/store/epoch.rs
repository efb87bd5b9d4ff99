//! The change window: how a load tells whether a change (logout, revocation from the feed)
//! overlapped it, so that what it read is not cached over the change.
//!
//! Every change runs between two bumps of an epoch counter and is counted while it runs. A load
//! reads the epoch before it reads any tier, and may cache what it read only if, after caching,
//! the epoch has not moved and no change is under way. A change that started after the load's
//! read — even one that evicted the in-process entry before the load wrote it — is therefore
//! always seen, and the load's entry is dropped.
//!
//! Removals (a token deleted, a user changed, a table truncated) and arrivals (a token
//! inserted) are counted apart. An arrival can make a load's *absence* of a row stale, or an
//! in-process entry that claims to hold every row of its key, but never a row the load found:
//! so a Redis entry, which holds one found row, need only survive removals. Counting arrivals
//! there too would drop the entry of every cold lookup that overlaps anyone's login.

use std::{
    future::Future,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
};

/// A position in the sequence of changes, read before a load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    removals: u64,
    arrivals: u64,
}

#[derive(Debug, Default)]
pub struct ChangeWindow {
    removals: Counter,
    arrivals: Counter,
}

/// One kind of change: how many have started or ended, how many are under way, and how many
/// have finished.
#[derive(Debug, Default)]
struct Counter {
    epoch: AtomicU64,
    in_flight: AtomicUsize,
    finished: AtomicU64,
}

impl Counter {
    fn quiet_since(&self, epoch: u64) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 && self.epoch.load(Ordering::SeqCst) == epoch
    }

    /// Runs `change` between two epoch bumps, counted as under way meanwhile (also when the
    /// future is cancelled).
    async fn around<T>(&self, change: impl Future<Output = T>) -> T {
        struct InFlight<'a>(&'a Counter);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                // Bump again on the way out (even if cancelled), then leave the window.
                self.0.epoch.fetch_add(1, Ordering::SeqCst);
                self.0.finished.fetch_add(1, Ordering::SeqCst);
                self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight(self);
        change.await
    }
}

impl ChangeWindow {
    /// The current position; read it before reading a tier.
    pub fn current(&self) -> Epoch {
        Epoch {
            removals: self.removals.epoch.load(Ordering::SeqCst),
            arrivals: self.arrivals.epoch.load(Ordering::SeqCst),
        }
    }

    /// True when no change of either kind has started since `epoch` and none is under way:
    /// then anything a load read after reading `epoch` may be cached, an absence included.
    pub fn unchanged_since(&self, epoch: Epoch) -> bool {
        self.removals.quiet_since(epoch.removals) && self.arrivals.quiet_since(epoch.arrivals)
    }

    /// True when no removal has started since `epoch` and none is under way: then a row a
    /// load found after reading `epoch` may be cached on its own (arrivals do not matter).
    pub fn nothing_removed_since(&self, epoch: Epoch) -> bool {
        self.removals.quiet_since(epoch.removals)
    }

    /// How many removals have finished (been answered, or applied) so far. A request that comes
    /// after one finished must not be answered with what a load read before it: the position a
    /// shared load is joined by (`flight`). One still under way has not been answered yet, so a
    /// request concurrent with it may be.
    pub fn removals_finished(&self) -> u64 {
        self.removals.finished.load(Ordering::SeqCst)
    }

    /// Runs a removal (a deletion, a user's change, a truncation) inside the window.
    pub async fn removing<T>(&self, change: impl Future<Output = T>) -> T {
        self.removals.around(change).await
    }

    /// Runs an arrival (a token inserted) inside the window.
    pub async fn arriving<T>(&self, change: impl Future<Output = T>) -> T {
        self.arrivals.around(change).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_load_with_no_change_since_may_cache() {
        let w = ChangeWindow::default();
        let e = w.current();
        assert!(w.unchanged_since(e));
    }

    #[tokio::test]
    async fn a_change_during_or_after_the_read_is_seen() {
        let w = ChangeWindow::default();
        let before = w.current();
        w.removing(async {
            // Under way: neither an old nor a fresh reading may cache.
            assert!(!w.unchanged_since(before));
            assert!(!w.unchanged_since(w.current()));
        })
        .await;
        // Finished: the old reading is stale, a fresh one is fine.
        assert!(!w.unchanged_since(before));
        assert!(w.unchanged_since(w.current()));
    }

    #[tokio::test]
    async fn a_cancelled_change_still_closes_the_window() {
        let w = ChangeWindow::default();
        let before = w.current();
        let change = w.removing(std::future::pending::<()>());
        // Polled once (enters the window), then dropped.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(1), change).await;
        assert!(!w.unchanged_since(before));
        assert!(w.unchanged_since(w.current()), "no change left under way");
    }

    #[tokio::test]
    async fn an_arrival_stales_absences_but_not_found_rows() {
        let w = ChangeWindow::default();
        let before = w.current();
        w.arriving(async {
            assert!(!w.unchanged_since(before));
            assert!(w.nothing_removed_since(before));
        })
        .await;
        assert!(
            !w.unchanged_since(before),
            "an absence read before it is stale"
        );
        assert!(
            w.nothing_removed_since(before),
            "a row found before it is not"
        );
        assert!(w.unchanged_since(w.current()));
    }

    #[tokio::test]
    async fn a_removal_stales_both() {
        let w = ChangeWindow::default();
        let before = w.current();
        w.removing(async {
            assert!(!w.nothing_removed_since(before));
            assert!(!w.nothing_removed_since(w.current()), "under way");
        })
        .await;
        assert!(!w.nothing_removed_since(before) && !w.unchanged_since(before));
        assert!(w.nothing_removed_since(w.current()));
    }
}
