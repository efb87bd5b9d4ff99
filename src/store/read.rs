//! The read path: answer a presented token from the cheapest tier that can, confirming with
//! Postgres when the consistency mode or the feed's state asks for it.

use std::sync::Arc;

use time::OffsetDateTime;
use tracing::Instrument as _;

use super::{
    Lookup, Store, StoreError,
    epoch::Epoch,
    memory::{Entry, Rows},
};
use crate::{
    auth::{Outcome, TokenDigest, TokenRow, decide},
    config::Consistency,
    deadline::Deadline,
    metrics::{LookupResult, Tier},
    telemetry::SPAN_TARGET,
};

/// A child span of the request's for one question to a tier (see `crate::telemetry`).
fn tier_span(tier: &'static str) -> tracing::Span {
    tracing::info_span!(target: SPAN_TARGET, "store.lookup", tier, otel.kind = "client")
}

impl Store {
    /// The rows stored under `key`, from the cheapest tier that can answer for `digest`, for a
    /// request whose answer is due by `deadline`.
    pub async fn lookup(
        &self,
        key: &str,
        digest: &TokenDigest,
        deadline: Deadline,
    ) -> Result<Lookup, StoreError> {
        let cached = tier_span("memory").in_scope(|| self.memory.get(key));
        if let Some(entry) = cached {
            let matched = entry.rows.iter().any(|r| r.digest.matches(digest));
            if matched && self.must_confirm() {
                self.metrics.lookup(Tier::Memory, LookupResult::Hit);
                return Box::pin(self.confirm(key, digest, entry, deadline)).await;
            }
            // A feed outage may have hidden the INSERT that would have cleared a negative entry.
            let negative_in_doubt = !matched
                && self.settings.consistency == Consistency::Notify
                && !self.feed_current();
            if matched || (entry.complete && !negative_in_doubt) {
                let result = if entry.is_negative() {
                    LookupResult::NegativeHit
                } else {
                    LookupResult::Hit
                };
                self.metrics.lookup(Tier::Memory, result);
                return Ok(Lookup { entry });
            }
        }
        self.metrics.lookup(Tier::Memory, LookupResult::Miss);
        // The filter is kept current by the feed alone: once the feed is not live (a relay's
        // heartbeat overdue while its read still waits included), INSERTs may go unheard.
        if self.feed_live() && !self.known_keys.admit(key).asks_stores() {
            // A key no token has, past the budget of such lookups: a flood of random tokens
            // stops here, and leaves the in-process tier to the keys that exist.
            self.metrics
                .lookup(Tier::KeyFilter, LookupResult::NegativeHit);
            return Ok(Lookup {
                entry: Arc::clone(&self.no_such_key),
            });
        }
        // Boxed: the loads below are large state machines, and kept inline they would make
        // every request's future (hits included) that large to create and move.
        let entry = Box::pin(self.load_shared(key, digest, deadline)).await?;
        if !entry.complete && !entry.rows.iter().any(|r| r.digest.matches(digest)) {
            // Another request's load found a Redis entry for a different token under this key.
            let epoch = self.changes.current();
            let entry = Box::pin(self.load_from_postgres(key, digest, epoch)).await?;
            return Ok(Lookup { entry });
        }
        Ok(Lookup { entry })
    }

    /// Re-reads the row with this digest by primary key before a cached answer is used.
    async fn confirm(
        &self,
        key: &str,
        digest: &TokenDigest,
        cached: Arc<Entry>,
        deadline: Deadline,
    ) -> Result<Lookup, StoreError> {
        let epoch = self.changes.current();
        match self
            .confirm_row(digest, self.settings.stale_if_error, deadline)
            .await
        {
            Ok(fresh) => {
                let mut rows: Rows = cached
                    .rows
                    .iter()
                    .filter(|r| !r.digest.matches(digest))
                    .cloned()
                    .collect();
                rows.extend(fresh);
                // Confirmed as it was: the assertion kept for it still holds (otherwise every
                // confirmed hit, as in strict mode, would be signed afresh).
                let unchanged = rows == cached.rows;
                let entry = self.entry(rows, cached.complete);
                if unchanged {
                    entry.assertion.keep_from(&cached.assertion);
                }
                self.remember_confirmed(key, entry.clone(), epoch);
                Ok(Lookup { entry })
            }
            Err(e) if self.settings.stale_if_error => {
                self.metrics.stale_answers.inc();
                tracing::debug!(error = %e, "serving a cached answer while postgres is unreachable");
                Ok(Lookup { entry: cached })
            }
            Err(e) => Err(e),
        }
    }

    /// The row with this digest, read by primary key. With a cached answer to fall back on
    /// (`stale_allowed`), Postgres gets `cache.confirm_timeout`, or half the time left before
    /// the request's deadline when that is less (a gRPC caller's can be short), and no more:
    /// the fallback is worth something only if it comes before the deadline.
    async fn confirm_row(
        &self,
        digest: &TokenDigest,
        stale_allowed: bool,
        deadline: Deadline,
    ) -> Result<Option<TokenRow>, StoreError> {
        let hex = digest.to_hex();
        let span = tier_span("postgres");
        if stale_allowed {
            let limit = deadline.share(self.settings.confirm_timeout);
            self.pg.confirm_within(&hex, limit).instrument(span).await
        } else {
            self.pg.confirm(&hex).instrument(span).await
        }
    }

    /// Loads `key` below the in-process tier, sharing one load among concurrent callers (under
    /// the deadline of the caller that starts it, and never with a caller that comes after a
    /// removal the load may predate; see `flight`).
    async fn load_shared(
        &self,
        key: &str,
        digest: &TokenDigest,
        deadline: Deadline,
    ) -> Result<Arc<Entry>, StoreError> {
        self.flights
            .run(
                key,
                deadline,
                &self.changes,
                |epoch| self.load(key, digest, deadline, epoch),
                || {
                    self.metrics.coalesced_misses.inc();
                },
            )
            .await
    }

    /// Redis, then Postgres; `epoch` was read before either.
    async fn load(
        &self,
        key: &str,
        digest: &TokenDigest,
        deadline: Deadline,
        epoch: Epoch,
    ) -> Result<Arc<Entry>, StoreError> {
        if let Some(redis) = &self.redis {
            match redis.get(key).instrument(tier_span("redis")).await {
                Ok(Some(hit)) if hit.row.digest.matches(digest) => {
                    self.metrics.lookup(Tier::Redis, LookupResult::Hit);
                    let cached = hit.row;
                    // A revocation this instance knows of may not have reached Redis (a DEL
                    // refused, queued, or lost in a failover): then only Postgres can say.
                    let revoked_lately = !self.tombstones.clear(key, &cached.user_id);
                    // An answer taken from the entry itself lives no longer in process than the
                    // entry has left in Redis, so the bound stays max_cache_ttl from the write,
                    // not twice that. One confirmed with Postgres is as fresh as a load.
                    // knoxgate writes every entry for at most max_cache_ttl. One that has longer
                    // left, or no expiry at all, was not (or was, by a host whose clock ran
                    // ahead): it could outlive the tombstone of a revocation it missed.
                    let lives_as_written = hit
                        .remaining
                        .is_some_and(|left| left <= self.settings.max_cache_ttl);
                    let (row, cap) = match cached.into_row() {
                        // Written by knoxgate: carries the user's status.
                        Some(row)
                            if !revoked_lately && !self.must_confirm() && lives_as_written =>
                        {
                            (Some(row), hit.remaining)
                        }
                        // A revocation known, a mode that wants confirmation, or an entry that
                        // lives longer than knoxgate writes them: one primary-key query settles
                        // it.
                        Some(row) => match self
                            .confirm_row(
                                digest,
                                self.settings.stale_if_error && !revoked_lately,
                                deadline,
                            )
                            .await
                        {
                            Ok(fresh) => (fresh, None),
                            // Never stale when a revocation concerns it.
                            Err(e) if self.settings.stale_if_error && !revoked_lately => {
                                self.metrics.stale_answers.inc();
                                tracing::debug!(error = %e, "serving a redis entry while postgres is unreachable");
                                (Some(row), hit.remaining)
                            }
                            Err(e) => return Err(e),
                        },
                        None => (self.confirm_row(digest, false, deadline).await?, None),
                    };
                    match row {
                        Some(row) => {
                            let entry = self.entry_within(smallvec::smallvec![row], false, cap);
                            self.remember(key, entry.clone(), epoch);
                            return Ok(entry);
                        }
                        None => {
                            // The entry outlived its row: drop it and ask Postgres for the key.
                            self.forget_key(key).await;
                        }
                    }
                }
                Ok(_) => self.metrics.lookup(Tier::Redis, LookupResult::Miss),
                Err(_) => self.metrics.lookup(Tier::Redis, LookupResult::Error),
            }
        }
        self.load_from_postgres(key, digest, epoch).await
    }

    async fn load_from_postgres(
        &self,
        key: &str,
        digest: &TokenDigest,
        epoch: Epoch,
    ) -> Result<Arc<Entry>, StoreError> {
        let rows = self
            .pg
            .lookup(key)
            .instrument(tier_span("postgres"))
            .await?;
        let result = if rows.is_empty() {
            LookupResult::Miss
        } else {
            LookupResult::Hit
        };
        self.metrics.lookup(Tier::Postgres, result);
        let now = OffsetDateTime::now_utc();
        // Only a token that would be allowed is worth sharing through Redis.
        let usable = match decide(&rows, digest, now) {
            Outcome::Allow(row) => Some(row.clone()),
            _ => None,
        };
        let entry = self.entry(rows, true);
        self.remember(key, entry.clone(), epoch);
        // Not shared when a removal is already known to have overlapped the read.
        if let (Some(row), Some(redis)) = (usable, &self.redis)
            && redis.is_connected()
            && self.changes.nothing_removed_since(epoch)
            && redis.put(&row, now).await.is_ok()
            && !self.changes.nothing_removed_since(epoch)
        {
            // A removal landed while we were writing; our entry may predate it. (A token
            // inserted meanwhile cannot make a row we found wrong: epoch.rs.)
            self.forget_key(key).await;
        }
        Ok(entry)
    }
}
