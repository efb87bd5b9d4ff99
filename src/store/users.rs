//! User administration and login SQL, beside the token SQL of the Postgres tier: the user a
//! login names, token creation within the per-user limit, and the operator's user commands.

use deadpool_postgres::Object;
use time::OffsetDateTime;
use tokio_postgres::types::{ToSql, Type};

use super::{
    StoreError,
    postgres::{Param, Postgres, roles_of, row_of, run_statement},
};
use crate::auth::{Groups, TokenRow};

/// A user as needed to check a login.
#[derive(Debug, Clone)]
pub struct LoginUser {
    pub user_id: String,
    pub password: String,
    pub is_active: bool,
    pub email: String,
    pub is_staff: bool,
    pub is_superuser: bool,
    pub groups: Groups,
}

/// The values of a token row to insert.
pub struct NewToken {
    pub username: String,
    pub digest: String,
    pub token_key: String,
    pub created: OffsetDateTime,
    pub expiry: Option<OffsetDateTime>,
    pub limit: Option<u64>,
}

/// Why a login's transaction made no token (it rolled back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCreated {
    /// The user already holds `TOKEN_LIMIT_PER_USER` live tokens.
    LimitReached,
    /// No user of that name: deleted or renamed since its password was checked.
    NoSuchUser,
}

/// How a token's transaction ended without its row.
enum Failure {
    /// No connection from the pool: nothing was sent.
    Pool(StoreError),
    Postgres(tokio_postgres::Error),
    /// Its caller gave up before COMMIT.
    Abandoned,
    /// No answer within the transaction deadline, before COMMIT.
    Deadline,
    /// COMMIT was sent, and answered with an error (`Some`) or not within the transaction
    /// deadline: its outcome is unknown.
    Commit(Option<tokio_postgres::Error>),
}

/// What is known of the COMMIT that made a token nobody received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// It succeeded.
    Yes,
    /// It was sent and went unanswered: the transaction (its `txid_current()`) may yet end
    /// either way, and may take long to (a COMMIT waits for a synchronous standby for as long
    /// as the standby takes).
    Unknown(i64),
}

/// Longest pause between two attempts to delete a token nobody received
/// ([`Postgres::discard_unreceived`]): the first attempt is made at once, the first retry one
/// transaction deadline later, and each pause doubles up to this.
const UNRECEIVED_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(60);

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        Failure::Postgres(e)
    }
}

/// A user to create.
pub struct NewUser<'a> {
    pub username: &'a str,
    pub encoded_password: &'a str,
    pub email: &'a str,
    pub superuser: bool,
    pub active: bool,
}

impl Postgres {
    /// The user a login names, if any.
    pub async fn login_user(&self, username: &str) -> Result<Option<LoginUser>, StoreError> {
        let rows = self
            .query(
                "login_user",
                &self.sql.login_user,
                &[(&username, Type::TEXT)],
            )
            .await?;
        rows.first()
            .map(|r| {
                let (is_staff, is_superuser, groups) = roles_of(r, 4)?;
                Ok(LoginUser {
                    user_id: r.try_get(0)?,
                    password: r.try_get(1)?,
                    is_active: r.try_get(2)?,
                    email: r.try_get::<_, Option<String>>(3)?.unwrap_or_default(),
                    is_staff,
                    is_superuser,
                    groups,
                })
            })
            .transpose()
            .map_err(|e: tokio_postgres::Error| self.failed("login_user", &e))
    }

    /// Creates a token row for `username` as knox's `AuthToken.objects.create` does, after
    /// checking the per-user limit, and stamps `last_login`, in one transaction.
    /// Returns the new row with its user as the transaction saw it, or why there is none.
    ///
    /// `abandoned` completes when nobody waits for the answer any more (the login's request
    /// was answered 503): until COMMIT the transaction is then rolled back, its running
    /// statement cancelled ([`Postgres::abandon`]). COMMIT itself is never cancelled (a cancel
    /// would end a wait for a synchronous standby with the commit kept, unreplicated); when its
    /// outcome cannot be known (no answer within the deadline, or the connection lost
    /// meanwhile), the token, which nobody will receive, is deleted should it be committed
    /// ([`Postgres::discard_unreceived`]).
    pub async fn create_token(
        &self,
        new: &NewToken,
        abandoned: impl Future<Output = ()>,
    ) -> Result<Result<TokenRow, NotCreated>, StoreError> {
        self.note_request();
        let deadline = tokio::time::Instant::now() + self.login_deadline;
        let mut client = None;
        // The transaction ends in this block, so that its connection is ours again below.
        let failure = {
            let preparing = tokio::time::timeout_at(deadline, self.prepare_token(&mut client, new));
            let prepared = tokio::select! {
                biased;
                prepared = preparing => prepared.unwrap_or(Err(Failure::Deadline)),
                () = abandoned => Err(Failure::Abandoned),
            };
            match prepared {
                Ok(Ok((tx, row, xid))) => {
                    let committed = tokio::time::timeout_at(deadline, tx.commit()).await;
                    if let Ok(Ok(())) = committed {
                        return Ok(Ok(row));
                    }
                    // Any failure once COMMIT was sent leaves its outcome unknown: even an error
                    // answer may be PgBouncer's (its link to the server lost) rather than
                    // Postgres's rollback. Deleting a token nobody received is harmless anyway.
                    self.discard_unreceived(
                        new.digest.clone(),
                        Committed::Unknown(xid),
                        new.expiry,
                    );
                    Failure::Commit(committed.ok().and_then(Result::err))
                }
                Ok(Err(not_created)) => return Ok(Err(not_created)),
                Err(failure) => failure,
            }
        };
        const NO_ANSWER: &str = "create_token: no answer within the transaction deadline";
        // What becomes of the connection, then the error answered.
        Err(match failure {
            Failure::Pool(e) => e,
            // A standby's refusal (a failover this connection did not follow) takes it out of
            // the pool: put back, it would refuse every login for as long as it lives, and
            // lookups, which a standby answers, would never replace it.
            Failure::Postgres(e) => match client {
                Some(client) => self.failed_on("create_token", client, &e),
                None => self.failed("create_token", &e),
            },
            // A statement may still be in flight on it, or its session be inside the
            // transaction.
            Failure::Abandoned => {
                if let Some(client) = client {
                    self.abandon(client);
                }
                StoreError::Timeout(
                    "create_token: its caller gave up before COMMIT; rolled back".into(),
                )
            }
            Failure::Deadline => {
                if let Some(client) = client {
                    self.abandon(client);
                }
                self.fail(StoreError::Timeout(NO_ANSWER.into()))
            }
            // COMMIT runs to its end (a cancel could stop a wait for a synchronous standby
            // with the commit kept, unreplicated); only its connection leaves the pool, which
            // it must also when the error was PgBouncer's, about to close it.
            Failure::Commit(e) => {
                drop(client.map(Object::take));
                match e {
                    Some(e) => self.failed("create_token", &e),
                    None => self.fail(StoreError::Timeout(NO_ANSWER.into())),
                }
            }
        })
    }

    /// [`Postgres::create_token`] up to its COMMIT: the transaction, ready to commit, the row
    /// it inserted and the transaction's id; or, rolled back, why there is no row.
    /// The pool's connection is left in `slot`, for the caller to take out of the pool should
    /// it give up.
    async fn prepare_token<'c>(
        &self,
        slot: &'c mut Option<Object>,
        new: &NewToken,
    ) -> Result<Result<(deadpool_postgres::Transaction<'c>, TokenRow, i64), NotCreated>, Failure>
    {
        let (sql, metrics, pgbouncer) = (&self.sql, &self.metrics, self.pgbouncer);
        let client = slot.insert(self.client().await.map_err(Failure::Pool)?);
        let tx = client.transaction().await?;
        if pgbouncer {
            // No startup options behind PgBouncer: bound this transaction on the server
            // here, where the session it runs in is ours until COMMIT.
            tx.batch_execute(&format!(
                "SET LOCAL statement_timeout = {}; \
                 SET LOCAL idle_in_transaction_session_timeout = {}",
                self.statement_timeout.as_millis(),
                self.idle_in_transaction_timeout.as_millis()
            ))
            .await?;
        }
        metrics.sql("lock_user");
        run_statement!(
            pgbouncer,
            tx,
            &sql.lock_user,
            &[(&new.username, Type::TEXT)]
        )?;
        if let Some(limit) = new.limit {
            metrics.sql("count_live");
            let rows = run_statement!(
                pgbouncer,
                tx,
                &sql.count_live,
                &[(&new.username, Type::TEXT)]
            )?;
            let live: i64 = match rows.first() {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            if live >= limit as i64 {
                tx.rollback().await?;
                return Ok(Err(NotCreated::LimitReached));
            }
        }
        metrics.sql("insert_token");
        let rows = run_statement!(
            pgbouncer,
            tx,
            &sql.insert_token,
            &[
                (&new.digest, Type::TEXT),
                (&new.token_key, Type::TEXT),
                (&new.created, Type::TIMESTAMPTZ),
                (&new.expiry, Type::TIMESTAMPTZ),
                (&new.username, Type::TEXT),
            ]
        )?;
        let Some(row) = rows.first() else {
            // The user locked above was not there: deleted or renamed since its password was
            // checked.
            tx.rollback().await?;
            return Ok(Err(NotCreated::NoSuchUser));
        };
        let xid: i64 = row.try_get(row.len() - 1)?;
        let row = row_of(row)?;
        if let Some(set_last_login) = &sql.set_last_login {
            metrics.sql("set_last_login");
            run_statement!(
                pgbouncer,
                tx,
                set_last_login,
                &[
                    (&new.username, Type::TEXT),
                    (&new.created, Type::TIMESTAMPTZ)
                ]
            )?;
        }
        Ok(Ok((tx, row, xid)))
    }

    /// Deletes, on a task of its own ([`Postgres::spawn_login_work`]), the token (by its
    /// digest) of a login that was not answered with it. While its COMMIT's outcome is
    /// [`Committed::Unknown`], the transaction may still be running on the server (a COMMIT
    /// waiting for a synchronous standby keeps its row hidden from a DELETE until the standby
    /// confirms, however long that takes): the delete is tried again every transaction
    /// deadline while the transaction is seen running, until it removes the row, the
    /// transaction is seen to have ended without leaving one, or the token expires. A delete
    /// that fails is tried again at growing intervals (one transaction deadline, doubling up to
    /// [`UNRECEIVED_RETRY_MAX`]). Once the process is stopping, which waits for this only until
    /// a deadline, it is tried at every transaction deadline.
    pub fn discard_unreceived(
        &self,
        digest: String,
        committed: Committed,
        expiry: Option<OffsetDateTime>,
    ) {
        let pg = self.clone();
        self.spawn_login_work(async move {
            let mut pause = pg.login_deadline;
            let (mut warned, mut told_waiting) = (false, false);
            loop {
                // Seen still running, the transaction is looked at again one transaction
                // deadline later, not at growing intervals: once its COMMIT lands, the token
                // counts against `token_limit_per_user` until deleted, and would refuse the
                // client's retry.
                let still_running = match pg.delete_unreceived(&digest, committed).await {
                    Ok(true) => return,
                    Ok(false) => {
                        if !told_waiting {
                            told_waiting = true;
                            tracing::info!(
                                "a login's COMMIT went unanswered and its transaction is still \
                                 running (waiting for a synchronous standby?); its token, which \
                                 nobody received, is deleted once it ends"
                            );
                        }
                        true
                    }
                    Err(e) => {
                        if !warned {
                            warned = true;
                            tracing::warn!(
                                error = %e,
                                "a login was answered without its token, which could not be \
                                 deleted yet; trying again until it expires"
                            );
                        }
                        false
                    }
                };
                let stopping = pg.stopping.is_cancelled();
                let next = if stopping || still_running {
                    pg.login_deadline
                } else {
                    pause
                };
                if expiry.is_some_and(|at| at <= OffsetDateTime::now_utc() + next) {
                    // Expired by the next attempt: refused everywhere, and removed as any
                    // expired token is.
                    tracing::debug!("a token nobody received expired before it could be deleted");
                    return;
                }
                if stopping {
                    tokio::time::sleep(next).await;
                    continue;
                }
                tokio::select! {
                    () = tokio::time::sleep(next) => if !still_running {
                        pause = (pause * 2).min(UNRECEIVED_RETRY_MAX);
                    },
                    () = pg.stopping.cancelled() => {}
                }
            }
        });
    }

    /// One attempt of [`Postgres::discard_unreceived`]: whether it is over, the token deleted
    /// or never to be there.
    async fn delete_unreceived(
        &self,
        digest: &str,
        committed: Committed,
    ) -> Result<bool, StoreError> {
        let xid = match committed {
            Committed::Yes => None,
            Committed::Unknown(xid) => Some(xid),
        };
        let label = "delete_unreceived";
        let rows = self
            .query_in_background(
                label,
                &self.sql.delete_unreceived,
                &[(&digest, Type::TEXT), (&xid, Type::INT8)],
            )
            .await?;
        let (removed, ended) = rows
            .first()
            .map_or(Ok((None, None)), |r| {
                Ok((
                    r.try_get::<_, Option<&str>>(0)?,
                    r.try_get::<_, Option<bool>>(1)?,
                ))
            })
            .map_err(|e: tokio_postgres::Error| self.failed(label, &e))?;
        if removed.is_some() {
            tracing::info!("a login was answered without its token; the token is deleted");
            return Ok(true);
        }
        // A COMMIT known to have succeeded, or a transaction that had ended before the DELETE
        // looked: not committed, or deleted since (its user's logout-all, or expired and
        // cleaned up).
        let over = committed == Committed::Yes || ended == Some(true);
        if over {
            tracing::debug!("a token nobody received is not in the database");
        }
        Ok(over)
    }

    /// Re-hashes a password on login: replaces the hash `checked` with `encoded`, but only while
    /// `checked` is still stored, so a password changed meanwhile (the re-hash runs after the
    /// login's answer, behind other hashing work) is never overwritten with the old one.
    /// Whether it replaced it.
    pub async fn upgrade_password(
        &self,
        username: &str,
        checked: &str,
        encoded: &str,
    ) -> Result<bool, StoreError> {
        self.query(
            "upgrade_password",
            &self.sql.upgrade_password,
            &[
                (&username, Type::TEXT),
                (&checked, Type::TEXT),
                (&encoded, Type::TEXT),
            ],
        )
        .await
        .map(|rows| !rows.is_empty())
    }

    /// Replaces a user's password hash (`user set-password`).
    pub async fn set_password(&self, username: &str, encoded: &str) -> Result<(), StoreError> {
        self.query(
            "set_password",
            &self.sql.set_password,
            &[(&username, Type::TEXT), (&encoded, Type::TEXT)],
        )
        .await
        .map(drop)
    }

    /// Creates a user the way Django's `create_user` does (every NOT NULL column supplied).
    /// Django's default user table only: a custom user model's columns are not known here.
    pub async fn create_user(&self, new: &NewUser<'_>) -> Result<String, StoreError> {
        let sql = format!(
            "INSERT INTO {} (password, last_login, is_superuser, username, first_name, last_name, \
             email, is_staff, is_active, date_joined) \
             VALUES ($1, NULL, $2, $3, '', '', $4, $2, $5, now()) RETURNING id::text",
            self.user_table
        );
        let rows = self
            .query(
                "create_user",
                &sql,
                &[
                    (&new.encoded_password, Type::TEXT),
                    (&new.superuser, Type::BOOL),
                    (&new.username, Type::TEXT),
                    (&new.email, Type::TEXT),
                    (&new.active, Type::BOOL),
                ],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Query("create_user: the insert returned no row".into()))?;
        row.try_get(0).map_err(|e| self.failed("create_user", &e))
    }

    /// Sets `is_active`; returns whether the user exists.
    pub async fn set_active(&self, username: &str, active: bool) -> Result<bool, StoreError> {
        Ok(!self
            .query(
                "set_active",
                &self.sql.set_active,
                &[(&username, Type::TEXT), (&active, Type::BOOL)],
            )
            .await?
            .is_empty())
    }
}
