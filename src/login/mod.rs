//! Logging in and issuing tokens: knox's `LoginView` without the HTTP. The HTTP handler
//! (`http::session`) and the operator CLI (`knoxgate token create`) both issue tokens here.
//!
//! A login is: attempt counted by the throttle → user lookup → one password check on the
//! low-priority hashing threads (a dummy one for unknown users, and padding up to the
//! configured cost for unusable or cheaper hashes, so timing does not reveal which names
//! exist or how they are stored) →
//! token row inserted within the per-user limit → the new token cached in every tier → the
//! user's expired tokens deleted.

pub mod client_ip;
pub mod hash_pool;
pub mod throttle;

use std::{net::IpAddr, sync::Arc, time::Instant};

use time::OffsetDateTime;

use crate::{
    auth::{LoginCredentials, TokenRow, generate_token, token_key_of},
    config::{Config, KnoxConfig},
    error::Error,
    metrics::{AlgorithmLabels, Metrics},
    password,
    store::{Committed, NewToken, NotCreated, Store, StoreError},
};
use hash_pool::{HashPool, HashPoolError};
use throttle::{CheckBegun, Throttle};

/// A token just issued: the only time its plain text exists.
#[derive(Debug)]
pub struct Issued {
    pub token: String,
    pub expiry: Option<OffsetDateTime>,
    /// What follows the commit and need not hold up the answer: writing the token to Redis and
    /// deleting the user's expired tokens. Runs on its own task, so that a request deadline
    /// reached after the commit cannot turn an issued token into a 503; a caller that exits
    /// right after (the CLI) awaits it.
    pub settled: tokio::task::JoinHandle<()>,
}

/// How a login attempt ended (errors aside).
#[derive(Debug)]
pub enum LoginOutcome {
    Issued(Issued),
    /// Unknown user, wrong password or inactive user: knox says the same for all three.
    Refused,
    /// Too many failures for this username or address; retry after this many seconds.
    Throttled {
        retry_after_secs: u64,
    },
    /// The user already holds `TOKEN_LIMIT_PER_USER` live tokens.
    TokenLimit,
    /// Right credentials, wrong method: DRF authenticates before it checks the method.
    MethodNotAllowed,
}

impl LoginOutcome {
    /// A bounded metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            LoginOutcome::Issued(_) => "ok",
            LoginOutcome::Refused => "refused",
            LoginOutcome::Throttled { .. } => "throttled",
            LoginOutcome::TokenLimit => "token_limit",
            LoginOutcome::MethodNotAllowed => "method_not_allowed",
        }
    }
}

/// The login machinery of a running knoxgate.
pub struct Login {
    config: Arc<Config>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    hashes: HashPool,
    throttle: Throttle,
    /// Checked for unknown usernames so that they take as long as wrong passwords.
    dummy_hash: String,
}

impl Login {
    /// Starts the hashing threads.
    pub fn new(
        config: Arc<Config>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Login> {
        let s = &config.sessions;
        Ok(Login {
            hashes: HashPool::new(s.hash_slots(), s.hash_nice)?,
            throttle: Throttle::new(
                s.throttle_failures,
                s.throttle_user_failures,
                s.throttle_address_failures,
                s.throttle_window,
            ),
            dummy_hash: password::timing_dummy(
                s.password_hashers
                    .first()
                    .copied()
                    .unwrap_or("pbkdf2_sha256"),
                s.password_iterations,
            ),
            config,
            store,
            metrics,
        })
    }

    /// Checks `creds` and, if they are right and `method_allowed`, issues a token.
    pub async fn log_in(
        &self,
        creds: LoginCredentials,
        client: IpAddr,
        method_allowed: bool,
    ) -> Result<LoginOutcome, Error> {
        // Counted before the password check, so concurrent guesses cannot all get past it.
        let attempt = match self.throttle.reserve(&creds.username, client) {
            Ok(attempt) => attempt,
            Err(wait) => {
                // Rounded up, as DRF does: a client that waits Retry-After seconds must get through.
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                return Ok(LoginOutcome::Throttled {
                    retry_after_secs: secs.max(1),
                });
            }
        };
        // Postgres text cannot hold NUL: no user has such a name, and asking would fail (503).
        let user = if creds.username.contains('\0') {
            None
        } else {
            match self.store.postgres().login_user(&creds.username).await {
                Ok(user) => user,
                Err(e) => {
                    // No password was checked: not a failure of the client's.
                    attempt.release();
                    return Err(e.into());
                }
            }
        };
        // An unknown user costs one hash too, so timing does not reveal which usernames exist.
        let encoded = user
            .as_ref()
            .map_or_else(|| self.dummy_hash.clone(), |u| u.password.clone());
        let begun = attempt.check_begun();
        let password_ok = match self
            .check_password(creds.password.clone(), encoded, begun)
            .await
        {
            Ok(ok) => ok,
            Err(Error::Overloaded) => {
                attempt.release();
                return Err(Error::Overloaded);
            }
            // Counted if the check began (a thread failed during or after it).
            Err(e) => return Err(e),
        };
        // The attempt stays counted as a failure.
        let Some(user) = user.filter(|_| password_ok) else {
            return Ok(LoginOutcome::Refused);
        };
        // Django re-hashes whenever the password is right (`check_password`'s setter): before
        // its ModelBackend refuses an inactive user, and before DRF answers 405 to a GET.
        if self.config.sessions.rehashes(&user.password) {
            self.rehash_later(
                creds.username.clone(),
                creds.password,
                user.password.clone(),
                self.config.sessions.password_iterations,
            );
        }
        // Django's ModelBackend refuses inactive users exactly like a wrong password.
        if !user.is_active {
            return Ok(LoginOutcome::Refused);
        }
        attempt.succeeded();
        // After the password check, as DRF: a wrong password on GET is a 401, not a 405.
        if !method_allowed {
            return Ok(LoginOutcome::MethodNotAllowed);
        }
        let now = OffsetDateTime::now_utc();
        Ok(
            match issue_token(&self.store, &self.config.knox, &creds.username, now).await? {
                Ok(issued) => LoginOutcome::Issued(issued),
                Err(NotCreated::LimitReached) => LoginOutcome::TokenLimit,
                // Deleted or renamed while its password was checked: as an unknown user.
                Err(NotCreated::NoSuchUser) => LoginOutcome::Refused,
            },
        )
    }

    /// Checks a password on the hashing threads, within the configured queueing time; marks
    /// `begun` as the check starts there.
    async fn check_password(
        &self,
        password: String,
        encoded: String,
        begun: CheckBegun,
    ) -> Result<bool, Error> {
        let started = Instant::now();
        let iterations = self.config.sessions.password_iterations;
        let caps = self.config.sessions.hash_cost_caps;
        // A hash of an algorithm the site does not list is refused, as Django refuses it.
        let accepted = self.config.sessions.accepts_hash(&encoded);
        let dummy = self.dummy_hash.clone();
        let (ok, over_cap) = self
            .hashes
            .run_within(self.config.sessions.hash_queue_timeout, move || {
                begun.mark();
                let ok = accepted && password::check_password_within(&password, &encoded, &caps);
                if ok {
                    return (true, None);
                }
                // Unlisted, unusable, malformed or cheaper hashes cost what a wrong password
                // costs.
                password::harden_runtime(&password, &encoded, accepted, iterations, &dummy, &caps);
                let over_cap = accepted
                    .then(|| caps.exceeded_by(&encoded))
                    .flatten()
                    .zip(password::algorithm_of(&encoded));
                (false, over_cap)
            })
            .await
            .map_err(|e| match e {
                HashPoolError::Busy => Error::Overloaded,
                HashPoolError::Failed => Error::Internal(e.to_string()),
            })?;
        self.metrics
            .password_check_duration
            .observe(started.elapsed().as_secs_f64());
        if let Some((setting, algorithm)) = over_cap {
            // Django may well accept this hash (a site that raised its hasher's cost): its
            // user cannot log in here until the cap is raised.
            self.metrics
                .password_hashes_over_cap
                .get_or_create(&AlgorithmLabels { algorithm })
                .inc();
            tracing::warn!(
                algorithm,
                setting,
                "a stored password hash asks for more work than {setting} allows; refused \
                 unchecked (raise the setting if the site's hashers use that cost)"
            );
        }
        Ok(ok)
    }

    /// Django re-hashes on login with its preferred hasher; so do we, off the request, when a
    /// hashing thread is free (otherwise the next login does it: a re-hash must not queue ahead
    /// of admitted password checks). `checked` is the hash the login verified: only it is
    /// replaced.
    fn rehash_later(&self, username: String, password: String, checked: String, iterations: u32) {
        let store = Arc::clone(&self.store);
        let hashes = self.hashes.clone();
        tokio::spawn(async move {
            let hashed = hashes
                .run_if_free(move || password::make_password(&password, iterations))
                .await;
            let Ok(encoded) = hashed else {
                tracing::debug!(
                    "no hashing thread free; the password is re-hashed at a later login"
                );
                return;
            };
            match store
                .postgres()
                .upgrade_password(&username, &checked, &encoded)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!("password changed since the login checked it; not re-hashed");
                }
                Err(e) => tracing::warn!(error = %e, "could not store the upgraded password hash"),
            }
        });
    }
}

/// Creates a token for `username` as knox's `AuthToken.objects.create` does (within
/// `TOKEN_LIMIT_PER_USER`) and caches it with its user as the insert found them; or why it
/// made none.
pub async fn issue_token(
    store: &Arc<Store>,
    knox: &KnoxConfig,
    username: &str,
    now: OffsetDateTime,
) -> Result<Result<Issued, NotCreated>, StoreError> {
    let token = generate_token(&knox.token_prefix, knox.token_character_length);
    let digest = knox.hash_algorithm.digest(token.as_bytes()).to_hex();
    let expiry = knox.token_ttl.map(|ttl| now + ttl);
    // Read before the insert: a change that lands while the row is being created (the user's
    // deactivation reaching the feed first) keeps it out of the caches.
    let epoch = store.changes_now();
    let new = NewToken {
        username: username.to_owned(),
        digest: digest.clone(),
        token_key: token_key_of(&token).to_owned(),
        created: now,
        expiry,
        limit: knox.token_limit_per_user,
    };
    let row = match create_token_unless_abandoned(store, new).await? {
        Ok(row) => row,
        Err(not_created) => return Ok(Err(not_created)),
    };
    store.remember_new(&row, epoch);
    let settling = Arc::clone(store);
    let settled = tokio::spawn(async move {
        settling.share_new(row, epoch).await;
        // Housekeeping: the token is issued whatever becomes of it.
        if let Err(e) = settling.delete_expired_after_login(&digest).await {
            tracing::warn!(error = %e, "could not delete the user's expired tokens after a login");
        }
    });
    Ok(Ok(Issued {
        token,
        expiry,
        settled,
    }))
}

/// Runs the token's transaction on a task of its own and hands its row to the caller. A caller
/// dropped meanwhile (its request deadline passed, and the client was answered 503) must not
/// leave a committed token behind: nobody received its plain text, yet under
/// `TOKEN_LIMIT_PER_USER` it would count against the client's retry. Until COMMIT the
/// transaction is then rolled back; a COMMIT already on its way runs to its end, and the token
/// is deleted: by the task when its caller is gone, or by the caller's [`Handover`] when the
/// row was handed over but never taken.
async fn create_token_unless_abandoned(
    store: &Arc<Store>,
    new: NewToken,
) -> Result<Result<TokenRow, NotCreated>, StoreError> {
    let (mut hand_over, taken) = tokio::sync::oneshot::channel();
    let creating = Arc::clone(store);
    store.postgres().spawn_login_work(async move {
        let made = creating
            .postgres()
            .create_token(&new, hand_over.closed())
            .await;
        if let Err(Ok(Ok(row))) = hand_over.send(made) {
            creating.postgres().discard_unreceived(
                row.digest.to_text().into_owned(),
                Committed::Yes,
                row.expiry,
            );
        }
    });
    let mut handover = Handover {
        store: Arc::clone(store),
        runtime: tokio::runtime::Handle::current(),
        taken,
    };
    (&mut handover.taken).await.map_err(|_| {
        StoreError::Query("create_token: the transaction's task ended without an answer".into())
    })?
}

/// The receiving end of a token's transaction. Dropped before it was read, it closes the
/// channel (so that the task, should it still be running, rolls back or deletes the token
/// itself) and deletes a row already handed over.
struct Handover {
    store: Arc<Store>,
    /// The runtime the login runs on: a handler dropped on the demoted lane's threads must not
    /// leave the delete to that lane.
    runtime: tokio::runtime::Handle,
    taken: tokio::sync::oneshot::Receiver<Result<Result<TokenRow, NotCreated>, StoreError>>,
}

impl Drop for Handover {
    fn drop(&mut self) {
        self.taken.close();
        if let Ok(Ok(Ok(row))) = self.taken.try_recv() {
            let _entered = self.runtime.enter();
            self.store.postgres().discard_unreceived(
                row.digest.to_text().into_owned(),
                Committed::Yes,
                row.expiry,
            );
        }
    }
}
