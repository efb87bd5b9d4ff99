//! Cold lookups that arrive together share one query.
//!
//! A lookup by token key opens a batch and a task that waits for a pooled connection; every
//! lookup arriving meanwhile joins that batch instead of waiting for a connection of its own.
//! Once the task has its connection the batch closes and one `token_key = ANY($1)` query
//! answers all of its keys; the next lookup opens the next batch. A lone lookup therefore goes
//! out at once, as before, while a burst of first sights — a deploy, a cold fleet, a wave of
//! new tokens — costs one query per free connection instead of one per token, and no lookup
//! waits for a connection that a query for its neighbour already holds. A batch holds at most
//! `postgres.max_lookup_batch` keys; past that a new batch opens beside it.
//!
//! This module is the bookkeeping; [`super::postgres::Postgres::lookup`] does the I/O.

use std::{collections::HashMap, num::NonZeroUsize, sync::Mutex};

use compact_str::CompactString;
use tokio::sync::oneshot;

use super::{StoreError, memory::Rows};
use crate::auth::TokenRow;

/// Where a lookup's answer goes.
pub type Reply = oneshot::Sender<Result<Rows, StoreError>>;

/// Names one batch; handed to the task that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchId(u64);

/// One lookup waiting in a batch.
#[derive(Debug)]
pub struct Waiting {
    pub key: CompactString,
    pub reply: Reply,
}

/// The batches not yet sent.
#[derive(Debug)]
pub struct LookupBatches {
    max_keys: NonZeroUsize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// The batch new lookups join, while it has room.
    open: Option<BatchId>,
    /// Every batch whose task has not yet taken it (the open one and any that filled up).
    pending: HashMap<BatchId, Vec<Waiting>>,
}

impl LookupBatches {
    pub fn new(max_keys: NonZeroUsize) -> Self {
        Self {
            max_keys,
            state: Mutex::default(),
        }
    }

    /// Adds a lookup of `key` to the open batch; returns the id of a new batch when there was
    /// none with room, and the caller must then start the task that runs it.
    pub fn join(&self, key: &str, reply: Reply) -> Option<BatchId> {
        let mut state = self.lock();
        let waiting = Waiting {
            key: key.into(),
            reply,
        };
        if let Some(open) = state.open
            && let Some(batch) = state.pending.get_mut(&open)
            && batch.len() < self.max_keys.get()
        {
            batch.push(waiting);
            return None;
        }
        let id = BatchId(state.next_id);
        state.next_id += 1;
        state.open = Some(id);
        state.pending.insert(id, vec![waiting]);
        Some(id)
    }

    /// Closes batch `id` and hands over its lookups: its task has a connection and sends the
    /// query now. Lookups arriving from here on open the next batch.
    pub fn take(&self, id: BatchId) -> Vec<Waiting> {
        let mut state = self.lock();
        if state.open == Some(id) {
            state.open = None;
        }
        state.pending.remove(&id).unwrap_or_default()
    }

    /// Batches not yet taken by their task.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding the lock: every change
        // above is a single insert or remove.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The distinct keys of a batch, for the query's array parameter.
pub fn distinct_keys(waiting: &[Waiting]) -> Vec<&str> {
    let mut keys: Vec<&str> = waiting.iter().map(|w| w.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Answers every lookup of the batch from the query's rows (each gets the rows under its key,
/// none when there are none), or with the batch's error.
pub fn answer(waiting: Vec<Waiting>, result: Result<Vec<TokenRow>, StoreError>) {
    match result {
        Ok(rows) => {
            for w in waiting {
                let mine: Rows = rows
                    .iter()
                    .filter(|r| r.token_key == w.key)
                    .cloned()
                    .collect();
                // The request may have gone (its deadline passed): nothing to do then.
                let _ = w.reply.send(Ok(mine));
            }
        }
        Err(error) => {
            for w in waiting {
                let _ = w.reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{StoredDigest, UserInfo};

    fn batches(max: usize) -> LookupBatches {
        LookupBatches::new(NonZeroUsize::new(max).unwrap())
    }

    fn reply() -> (Reply, oneshot::Receiver<Result<Rows, StoreError>>) {
        oneshot::channel()
    }

    fn row(key: &str, digest: &str) -> TokenRow {
        TokenRow {
            digest: StoredDigest::parse(digest),
            token_key: key.into(),
            user_id: "7".into(),
            created: time::OffsetDateTime::UNIX_EPOCH,
            expiry: None,
            user: UserInfo::default(),
        }
    }

    #[test]
    fn a_lone_lookup_opens_a_batch_and_later_ones_join_it_until_it_is_taken() {
        let b = batches(64);
        let first = b
            .join("aaaa", reply().0)
            .expect("the first lookup opens a batch");
        assert_eq!(b.join("bbbb", reply().0), None);
        assert_eq!(b.join("aaaa", reply().0), None);
        let taken = b.take(first);
        let keys: Vec<&str> = taken.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["aaaa", "bbbb", "aaaa"]);
        assert_eq!(distinct_keys(&taken), ["aaaa", "bbbb"]);
        // Taken: the next lookup opens the next batch rather than joining a sent one.
        let second = b.join("cccc", reply().0).expect("a new batch");
        assert_ne!(second, first);
        assert_eq!(b.take(second).len(), 1);
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn a_full_batch_stays_pending_beside_the_next() {
        let b = batches(2);
        let first = b.join("k1", reply().0).unwrap();
        assert_eq!(b.join("k2", reply().0), None);
        let second = b.join("k3", reply().0).expect("the first is full");
        assert_eq!(b.pending(), 2);
        // Taking the full one leaves the open one open.
        assert_eq!(b.take(first).len(), 2);
        assert_eq!(b.join("k4", reply().0), None);
        assert_eq!(b.take(second).len(), 2);
        assert!(b.take(second).is_empty(), "taken once");
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn each_lookup_gets_the_rows_under_its_key_or_the_batch_error() {
        let b = batches(64);
        let (r1, a1) = reply();
        let (r2, a2) = reply();
        let (r3, a3) = reply();
        let id = b.join("k1", r1).unwrap();
        b.join("k2", r2);
        b.join("k3", r3);
        let rows = vec![row("k1", "d1"), row("k2", "d2"), row("k1", "d3")];
        answer(b.take(id), Ok(rows));
        let digests = |rows: Rows| -> Vec<String> {
            rows.iter()
                .map(|r| r.digest.to_text().into_owned())
                .collect()
        };
        assert_eq!(digests(a1.blocking_recv().unwrap().unwrap()), ["d1", "d3"]);
        assert_eq!(digests(a2.blocking_recv().unwrap().unwrap()), ["d2"]);
        assert!(
            a3.blocking_recv().unwrap().unwrap().is_empty(),
            "no such key"
        );

        let (r4, a4) = reply();
        let (r5, a5) = reply();
        let id = b.join("k4", r4).unwrap();
        b.join("k5", r5);
        drop(a5); // that request went away; the others are still answered
        let error = StoreError::Timeout("pool".into());
        answer(b.take(id), Err(error.clone()));
        assert_eq!(a4.blocking_recv().unwrap(), Err(error));
    }
}
