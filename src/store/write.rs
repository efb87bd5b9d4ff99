//! The write path: logout, logout-all, expired-token cleanup, new tokens, AUTO_REFRESH, and the
//! changes the feed reports. Postgres first, then every cache; each change runs inside the
//! change window (`epoch`), so a load that overlaps it cannot cache what the change removed.

use std::{collections::VecDeque, sync::Arc};

use time::OffsetDateTime;

use super::{
    Change, RedisTier, Store, StoreError, epoch::Epoch, outbox::RedisEviction, postgres::Removed,
};
use crate::auth::{StoredDigest, TokenDigest, TokenRow};

impl Store {
    /// Evicts these tokens from every tier.
    pub async fn forget(&self, removed: &[Removed]) {
        self.forget_in(removed, self.redis.as_ref()).await
    }

    /// Evicts these tokens from this process's tier and from `redis` when given.
    async fn forget_in(&self, removed: &[Removed], redis: Option<&RedisTier>) {
        for (key, _) in removed {
            self.tombstones.token(key);
            self.memory.remove(key);
        }
        if let Some(redis) = redis {
            let failed = redis.delete(removed).await;
            self.redis_outbox
                .push_all(failed.into_iter().map(RedisEviction::Token));
        }
    }

    pub(super) async fn forget_key(&self, key: &str) {
        self.memory.remove(key);
        if let Some(redis) = &self.redis
            && redis.delete_key(key).await.is_err()
        {
            self.redis_outbox.push(RedisEviction::Key(key.to_owned()));
        }
    }

    /// Evicts a user's tokens from this process's tier and from `redis` when given.
    async fn forget_user_in(&self, user_id: &str, redis: Option<&RedisTier>) {
        self.tombstones.user(user_id);
        self.memory.remove_user(user_id);
        if let Some(redis) = redis
            && redis.delete_user(user_id).await.is_err()
        {
            self.redis_outbox
                .push(RedisEviction::User(user_id.to_owned()));
        }
    }

    /// Applies a change heard from Postgres (this instance's feed, or a relay's) to every tier.
    pub async fn apply(&self, change: &Change) {
        self.apply_in(change, self.redis.as_ref()).await
    }

    /// Applies changes heard together, in order, to every tier. A run of removals (a bulk
    /// `DELETE`, a group renamed: one change per member, or a replay of either) is applied as
    /// one ([`Store::forget_all_in`]) rather than one by one, so the changes behind it are not
    /// held up for as long.
    pub async fn apply_all(&self, changes: &[Change]) {
        self.apply_all_in(changes, self.redis.as_ref()).await
    }

    /// [`Store::apply_all`] for changes read from the relays' stream: this process's tier only
    /// (see [`Store::apply_relayed`]).
    pub async fn apply_all_relayed(&self, changes: &[Change]) {
        self.apply_all_in(changes, None).await
    }

    async fn apply_all_in(&self, changes: &[Change], redis: Option<&RedisTier>) {
        let mut rest = changes;
        while let Some(first) = rest.first() {
            let run = rest
                .iter()
                .take_while(|change| matches!(change, Change::Token { .. } | Change::User { .. }))
                .count();
            if run == 0 {
                self.apply_in(first, redis).await;
                rest = &rest[1..];
            } else {
                let (removals, after) = rest.split_at(run);
                self.changes
                    .removing(self.forget_all_in(removals, redis))
                    .await;
                rest = after;
            }
        }
    }

    /// Evicts a run of token and user removals from this process's tier, then from `redis` when
    /// given. Evictions commute, so the order within the run does not matter. The in-process
    /// tier is walked once for all the users named (a user's tokens are found only by walking
    /// it), and every eviction there is done before the first Redis round trip.
    async fn forget_all_in(&self, removals: &[Change], redis: Option<&RedisTier>) {
        let mut tokens: Vec<Removed> = Vec::new();
        let mut users: Vec<String> = Vec::new();
        for change in removals {
            match change {
                Change::Token { token_key, user_id } => {
                    tokens.push((token_key.clone(), user_id.clone()))
                }
                Change::User { user_id } => users.push(user_id.clone()),
                // Not removals of tokens or users: apply_all_in keeps them out of a run.
                Change::Inserted { .. } | Change::Everything | Change::Truncated => {}
            }
        }
        for (key, _) in &tokens {
            self.tombstones.token(key);
            self.memory.remove(key);
        }
        for user_id in &users {
            self.tombstones.user(user_id);
        }
        self.memory
            .remove_users(&users.iter().map(String::as_str).collect());
        let Some(redis) = redis else { return };
        if !tokens.is_empty() {
            let failed = redis.delete(&tokens).await;
            self.redis_outbox
                .push_all(failed.into_iter().map(RedisEviction::Token));
        }
        if !users.is_empty() {
            let failed = redis.delete_users(&users).await;
            self.redis_outbox
                .push_all(failed.into_iter().map(RedisEviction::User));
        }
    }

    /// Applies a change read from the relays' stream to this process's tier. The relay that
    /// appended it evicts it from Redis (before appending a change it heard, right after
    /// appending one it replayed, and keeps retrying until Redis takes it), so a fleet does not
    /// repeat that DEL once per instance; the tombstones make a Redis entry that outlives the
    /// relay's DEL, or is read before it, go to Postgres.
    pub async fn apply_relayed(&self, change: &Change) {
        self.apply_in(change, None).await
    }

    /// Applies a change to this process's tier, and to `redis` when given, inside the change
    /// window: a removal as one, an insert as an arrival (epoch.rs says why they differ).
    async fn apply_in(&self, change: &Change, redis: Option<&RedisTier>) {
        let changes = &self.changes;
        match change {
            Change::Inserted { token_key } => {
                changes
                    .arriving(async {
                        self.known_keys.heard(token_key);
                        // Wrong now: an entry saying the key has no token, or claiming every
                        // token under it. One holding the rows it found (a login's own new
                        // token, whose INSERT this is) still answers right for them.
                        self.memory
                            .remove_if(token_key, |e| e.is_negative() || e.complete);
                    })
                    .await
            }
            Change::Token { token_key, user_id } => {
                let tokens = [(token_key.clone(), user_id.clone())];
                changes.removing(self.forget_in(&tokens, redis)).await
            }
            Change::User { user_id } => changes.removing(self.forget_user_in(user_id, redis)).await,
            Change::Everything => {
                changes
                    .removing(async {
                        self.memory.clear();
                        // Whatever went unheard may include INSERTs. (A feed that is not live
                        // yet, as at each connect, has no filter to reload.)
                        self.known_keys.reload();
                    })
                    .await
            }
            Change::Truncated => {
                changes
                    .removing(async {
                        // Which rows went is unknown, so no Redis entry written before now can
                        // be trusted; entries live at most the tombstone horizon.
                        self.tombstones.everything();
                        self.memory.clear();
                    })
                    .await
            }
        }
    }

    /// Retries Redis deletions that failed earlier. Returns how many are still pending.
    pub async fn retry_pending_redis(&self) -> usize {
        let Some(redis) = &self.redis else { return 0 };
        self.redis_outbox
            // Each batch is let through by the breaker (`RedisTier::delete`): while it is open,
            // once per cool-down, as the probe that closes it.
            .retry(redis.has_connection(), |due| async move {
                // Tokens in pipelined batches, as a bulk removal sends them the first time.
                let mut tokens = Vec::new();
                let mut others = VecDeque::new();
                for eviction in due {
                    match eviction {
                        RedisEviction::Token(removed) => tokens.push(removed),
                        other => others.push_back(other),
                    }
                }
                let mut failed: Vec<RedisEviction> = redis
                    .delete(&tokens)
                    .await
                    .into_iter()
                    .map(RedisEviction::Token)
                    .collect();
                // The others one at a time, until one fails: Redis is likely refusing them all,
                // so the rest wait for the next round, with the failed one behind them, where it
                // cannot hold them up if Redis refuses it alone.
                while let Some(eviction) = others.pop_front() {
                    let done = match &eviction {
                        RedisEviction::Key(key) => redis.delete_key(key).await.is_ok(),
                        RedisEviction::User(user) => redis.delete_user(user).await.is_ok(),
                        RedisEviction::Token(_) => unreachable!("tokens were sorted out above"),
                    };
                    if !done {
                        others.push_back(eviction);
                        break;
                    }
                }
                failed.extend(others);
                failed
            })
            .await
    }

    /// Deletes the expired tokens of the presented token's user (knox deletes an expired token
    /// when it is presented, with the user's other expired tokens).
    pub async fn delete_expired(&self, key: &str, digest: &TokenDigest) -> Result<(), StoreError> {
        self.changes
            .removing(async {
                self.memory.remove(key);
                let removed = self.pg.delete_expired_of_user(&digest.to_hex()).await?;
                self.forget(&removed).await;
                Ok(())
            })
            .await
    }

    /// Deletes expired tokens of the user who just logged in with the token of `digest`, at most
    /// [`LOGIN_CLEANUP_BATCH`](super::postgres::LOGIN_CLEANUP_BATCH). knox deletes a user's
    /// expired tokens at each of their authenticated requests; here a request costs no query,
    /// so a login does it, or nothing would remove the tokens clients drop unused. After the
    /// login's transaction, not in it: it takes token rows only, as knox's cleanup does.
    ///
    /// The delete runs outside a removal window, so that a login, which mostly removes nothing,
    /// does not keep concurrent fills from caching meanwhile; the tokens it removed are expired
    /// (refused from any cache), and are then evicted as the feed evicts what it hears.
    pub async fn delete_expired_after_login(&self, digest: &str) -> Result<(), StoreError> {
        let removed = self.pg.delete_some_expired_of_user(digest).await?;
        if !removed.is_empty() {
            self.changes.removing(self.forget(&removed)).await;
        }
        Ok(())
    }

    /// Logout: deletes one token everywhere. `false` when Postgres no longer held the token
    /// (deleted elsewhere, and a cache had not heard yet): knox, which reads Postgres, would have
    /// refused it, so the caller answers 401; the stale cache entries of its key go anyway.
    pub async fn logout(&self, key: &str, digest: &StoredDigest) -> Result<bool, StoreError> {
        self.changes
            .removing(async {
                let removed = self.pg.delete_token(&digest.to_text()).await?;
                if removed.is_empty() {
                    self.forget_key(key).await;
                    return Ok(false);
                }
                self.forget(&removed).await;
                Ok(true)
            })
            .await
    }

    /// Logout-all: deletes every token of the presented token's user, everywhere. `false`, as
    /// for [`Store::logout`], when Postgres no longer held the presented token: then nothing
    /// is deleted (knox would have refused the request), and the caller answers 401 so that the
    /// client does not take its other tokens for revoked.
    pub async fn logout_all(
        &self,
        key: &str,
        digest: &StoredDigest,
        user_id: &str,
    ) -> Result<bool, StoreError> {
        self.changes
            .removing(async {
                let removed = self.pg.delete_all_of_user(&digest.to_text()).await?;
                if removed.is_empty() {
                    self.forget_key(key).await;
                    return Ok(false);
                }
                self.forget(&removed).await;
                self.memory.remove_user(user_id);
                Ok(true)
            })
            .await
    }

    /// Caches a token just created (login) in this process, replacing any negative entry for
    /// its key; [`Store::share_new`] then writes it to Redis. `row` carries its user as the
    /// insert found them; `epoch` was read before the insert, so a removal that may predate
    /// what the row says keeps it out of every tier.
    pub fn remember_new(&self, row: &TokenRow, epoch: Epoch) {
        // Known at once here, before the feed brings its INSERT back.
        self.known_keys.heard(&row.token_key);
        // Only this row is known for the key, so the entry is partial. It is dropped again if
        // a removal overlapped the insert.
        self.remember(
            &row.token_key,
            self.entry(smallvec::smallvec![row.clone()], false),
            epoch,
        );
    }

    /// Writes a token just created to Redis (after [`Store::remember_new`]), unless a removal
    /// overlapped its insert.
    pub async fn share_new(&self, row: TokenRow, epoch: Epoch) {
        let now = OffsetDateTime::now_utc();
        let usable = row.user.is_active && !row.is_expired(now);
        if usable
            && self.changes.nothing_removed_since(epoch)
            && let Some(redis) = &self.redis
            && redis.is_connected()
            && redis.put(&row, now).await.is_ok()
            && !self.changes.nothing_removed_since(epoch)
        {
            self.forget_key(&row.token_key).await;
        }
    }

    /// AUTO_REFRESH: moves a token's expiry in every tier, once per token at a time.
    ///
    /// A refresh never makes a cached answer live longer: the in-process entry keeps its
    /// deadline (`redis.max_cache_ttl` from when it was read), so a token revoked where this
    /// instance cannot hear it (`ttl` mode, Postgres unreachable) still ends within that bound
    /// however often it is used. Redis gets the row as the UPDATE left it, its user read in the
    /// same statement, never the cached one.
    pub fn refresh(self: &Arc<Self>, row: &TokenRow, new_expiry: OffsetDateTime) {
        if !self
            .refreshing
            .lock()
            .expect("refresh lock")
            .insert(row.digest.clone())
        {
            return; // another request is already writing this token's refresh
        }
        // Update the in-process entry now, so requests arriving before the write lands see the
        // new expiry and do not schedule writes of their own. Only the entry as it stands: one
        // evicted meanwhile (the feed's revocation) stays evicted.
        self.memory.update(&row.token_key, |entry| {
            let rows = entry
                .rows
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    if r.digest == row.digest {
                        r.expiry = Some(new_expiry);
                    }
                    r
                })
                .collect();
            self.entry(rows, entry.complete)
        });
        let store = Arc::clone(self);
        let key = row.token_key.to_string();
        let owner = row.user_id.to_string();
        let digest = row.digest.clone();
        tokio::spawn(async move {
            let epoch = store.changes.current();
            // What a refresh learns that this instance had not heard is a revocation like one
            // from the feed: applied inside the change window, with a tombstone.
            let user_gone = Change::User {
                user_id: owner.clone(),
            };
            let token_gone = Change::Token {
                token_key: key.clone(),
                user_id: owner,
            };
            match store.pg.refresh_expiry(&digest.to_text(), new_expiry).await {
                Ok(Some(fresh)) => {
                    let now = OffsetDateTime::now_utc();
                    if !fresh.user.is_active {
                        // Deactivated unheard: every token of the user goes.
                        store.apply(&user_gone).await;
                    } else if fresh.is_expired(now) {
                        store.apply(&token_gone).await;
                    } else if let Some(redis) = &store.redis
                        && redis.put(&fresh, now).await.is_ok()
                        && !store.changes.nothing_removed_since(epoch)
                    {
                        // A removal landed while we were writing: our entry may predate it.
                        store.forget_key(&key).await;
                    }
                }
                // The row is gone: whatever this instance or Redis still holds for it is wrong
                // (a revocation this instance did not hear).
                Ok(None) => store.apply(&token_gone).await,
                Err(e) => tracing::debug!(error = %e, "could not refresh a token's expiry"),
            }
            store
                .refreshing
                .lock()
                .expect("refresh lock")
                .remove(&digest);
        });
    }
}
