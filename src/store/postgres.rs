//! The Postgres tier: the Django database, source of truth, through a deadpool of
//! tokio-postgres connections with every timeout set.
//!
//! All statements are prepared and cached per connection. Table names come from config (they
//! were checked to be plain identifiers) and are spliced in once, at startup.

use std::{sync::Arc, time::Duration};

use compact_str::CompactString;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Timeouts};
use time::OffsetDateTime;
use tokio_postgres::{Row, types::ToSql};

use super::{
    StoreError,
    pg::{classify, classify_pool, pg_config, tls_connector},
};
use crate::{
    auth::{Groups, StoredDigest, TokenRow, UserInfo},
    config::{GroupTables, PostgresConfig, UserColumns},
    metrics::Metrics,
    store::memory::Rows,
};

/// A token removed from the database: its key and its owner, to evict from the caches.
pub type Removed = (String, String);

/// The SQL, with the configured table names.
pub(super) struct Statements {
    pub(super) lookup: String,
    pub(super) confirm: String,
    pub(super) delete_expired_of_user: String,
    pub(super) delete_token: String,
    pub(super) delete_all_of_user: String,
    pub(super) refresh_expiry: String,
    pub(super) login_user: String,
    pub(super) lock_user: String,
    pub(super) count_live: String,
    pub(super) insert_token: String,
    /// `None` when the user model has no last-login column.
    pub(super) set_last_login: Option<String>,
    pub(super) set_password: String,
    pub(super) set_active: String,
}

impl Statements {
    fn new(tok: &str, usr: &str, c: &UserColumns, groups: Option<&GroupTables>) -> Self {
        let (id, name, active, pw) = (&c.id, &c.username, &c.is_active, &c.password);
        let email = c
            .email
            .as_ref()
            .map_or_else(|| "''".to_owned(), |e| format!("u.{e}::text"));
        let roles = roles_sql(c, groups);
        let row_cols = format!(
            "t.digest, t.token_key, t.user_id::text, t.created, t.expiry, \
             u.{active}, u.{name}::text, {email}, {roles}"
        );
        Statements {
            lookup: format!(
                "SELECT {row_cols} FROM {tok} t JOIN {usr} u ON u.{id} = t.user_id WHERE t.token_key = $1"
            ),
            confirm: format!(
                "SELECT {row_cols} FROM {tok} t JOIN {usr} u ON u.{id} = t.user_id WHERE t.digest = $1"
            ),
            // knox's _cleanup_token: every expired token of the presented token's user.
            delete_expired_of_user: format!(
                "DELETE FROM {tok} WHERE user_id = (SELECT user_id FROM {tok} WHERE digest = $1) \
                 AND expiry < now() RETURNING token_key, user_id::text"
            ),
            delete_token: format!(
                "DELETE FROM {tok} WHERE digest = $1 RETURNING token_key, user_id::text"
            ),
            delete_all_of_user: format!(
                "DELETE FROM {tok} WHERE user_id = (SELECT user_id FROM {tok} WHERE digest = $1) \
                 RETURNING token_key, user_id::text"
            ),
            refresh_expiry: format!("UPDATE {tok} SET expiry = $2 WHERE digest = $1"),
            login_user: format!(
                "SELECT u.{id}::text, u.{pw}, u.{active}, {email}, {roles} FROM {usr} u WHERE u.{name} = $1"
            ),
            // Serialises concurrent logins of one user so TOKEN_LIMIT_PER_USER holds exactly.
            lock_user: format!("SELECT {id} FROM {usr} WHERE {name} = $1 FOR UPDATE"),
            count_live: format!(
                "SELECT count(*) FROM {tok} t JOIN {usr} u ON u.{id} = t.user_id \
                 WHERE u.{name} = $1 AND (t.expiry > now() OR t.expiry IS NULL)"
            ),
            insert_token: format!(
                "INSERT INTO {tok} (digest, token_key, created, expiry, user_id) \
                 SELECT $1, $2, $3, $4, u.{id} FROM {usr} u WHERE u.{name} = $5 \
                 RETURNING user_id::text"
            ),
            set_last_login: c
                .last_login
                .as_ref()
                .map(|ll| format!("UPDATE {usr} SET {ll} = $2 WHERE {name} = $1")),
            set_password: format!("UPDATE {usr} SET {pw} = $2 WHERE {name} = $1"),
            set_active: format!("UPDATE {usr} SET {active} = $2 WHERE {name} = $1 RETURNING {id}"),
        }
    }
}

/// The user's flags and group names, as three columns of a query on `{usr} u`: what per-route
/// policies need, loaded with every row so that a policy costs no query of its own. Groups come
/// from a correlated subquery (an index scan of the M2M table per user), sorted, never NULL.
fn roles_sql(c: &UserColumns, groups: Option<&GroupTables>) -> String {
    let flag = |col: &Option<String>| {
        col.as_ref()
            .map_or_else(|| "false".to_owned(), |f| format!("u.{f}"))
    };
    let groups = groups.map_or_else(
        || "ARRAY[]::text[]".to_owned(),
        |g| {
            format!(
                "ARRAY(SELECT g.name::text FROM {ug} ug JOIN {grp} g ON g.id = ug.group_id \
                 WHERE ug.{uc} = u.{id} ORDER BY g.name)",
                ug = g.user_groups_table,
                grp = g.group_table,
                uc = g.user_column,
                id = c.id,
            )
        },
    );
    format!("{}, {}, {groups}", flag(&c.is_staff), flag(&c.is_superuser))
}

/// Reads the three columns of [`roles_sql`] starting at `at`.
pub(super) fn roles_of(r: &Row, at: usize) -> Result<(bool, bool, Groups), tokio_postgres::Error> {
    let groups: Vec<&str> = r.try_get(at + 2)?;
    Ok((
        r.try_get(at)?,
        r.try_get(at + 1)?,
        groups.into_iter().map(CompactString::from).collect(),
    ))
}

/// Handle to the Postgres tier.
#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
    pub(super) sql: Arc<Statements>,
    pub(super) user_table: Arc<str>,
    /// Client-side bound on one statement: the server-side statement_timeout cannot fire when
    /// the server is unreachable, so we also stop waiting ourselves.
    pub(super) statement_deadline: Duration,
    /// [`PostgresConfig::login_transaction_deadline`].
    pub(super) login_deadline: Duration,
    pub(super) metrics: Arc<Metrics>,
}

fn row_of(r: &Row) -> Result<TokenRow, tokio_postgres::Error> {
    let (is_staff, is_superuser, groups) = roles_of(r, 8)?;
    Ok(TokenRow {
        digest: StoredDigest::parse(r.try_get(0)?),
        token_key: r.try_get::<_, &str>(1)?.into(),
        user_id: r.try_get::<_, &str>(2)?.into(),
        created: r.try_get(3)?,
        expiry: r.try_get(4)?,
        user: UserInfo {
            is_active: r.try_get(5)?,
            username: r.try_get::<_, Option<&str>>(6)?.unwrap_or_default().into(),
            email: r.try_get::<_, Option<&str>>(7)?.unwrap_or_default().into(),
            is_staff,
            is_superuser,
            groups,
        },
    })
}

fn removed_of(rows: &[Row]) -> Result<Vec<Removed>, tokio_postgres::Error> {
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

impl Postgres {
    /// Builds the pool; connections are opened on first use, so this never waits for Postgres.
    pub fn new(cfg: &PostgresConfig, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let pg = pg_config(cfg)?;
        let mgr_cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls_connector(cfg)? {
            Some(tls) => Manager::from_config(pg, tls, mgr_cfg),
            None => Manager::from_config(pg, tokio_postgres::NoTls, mgr_cfg),
        };
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size.get())
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(cfg.pool_wait_timeout),
                create: Some(cfg.connect_timeout),
                recycle: Some(cfg.pool_recycle_timeout),
            })
            .build()
            .map_err(|e| StoreError::Unavailable(format!("pool: {e}")))?;
        Ok(Self {
            pool,
            sql: Arc::new(Statements::new(
                &cfg.token_table,
                &cfg.user_table,
                &cfg.user_columns,
                cfg.groups.as_ref(),
            )),
            user_table: cfg.user_table.as_str().into(),
            statement_deadline: cfg.query_deadline(),
            login_deadline: cfg.login_transaction_deadline(),
            metrics,
        })
    }

    /// Counts and logs a failure, once, where it happened.
    pub(super) fn fail(&self, error: StoreError) -> StoreError {
        self.metrics.postgres_error(error.kind());
        tracing::warn!(error = %error, "postgres failure");
        error
    }

    /// A driver error met while doing `what`.
    pub(super) fn failed(&self, what: &str, e: &tokio_postgres::Error) -> StoreError {
        self.fail(classify(what, e))
    }

    pub(super) async fn client(&self) -> Result<Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| self.fail(classify_pool(&e)))
    }

    /// Runs one statement with the client-side deadline. A connection that missed the deadline
    /// is taken out of the pool: it may still be stuck on the query.
    ///
    /// The pool and driver futures are large (tens of KB); boxed here, they cost an allocation
    /// on the Postgres path only, instead of inflating every future that might reach it,
    /// in-process and Redis hits included.
    pub(super) async fn query(
        &self,
        label: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        Box::pin(self.query_unboxed(label, sql, params)).await
    }

    async fn query_unboxed(
        &self,
        label: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        self.metrics.sql(label);
        let result = tokio::time::timeout(self.statement_deadline, async {
            let stmt = client.prepare_cached(sql).await?;
            client.query(&stmt, params).await
        })
        .await;
        match result {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                if e.code()
                    .is_some_and(|c| c == &tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED)
                {
                    // "cached plan must not change result type" after a schema change.
                    client.statement_cache.clear();
                }
                Err(self.failed(label, &e))
            }
            Err(_) => {
                let _ = Object::take(client);
                Err(self.fail(StoreError::Timeout(format!(
                    "{label}: no answer within the statement deadline"
                ))))
            }
        }
    }

    /// All rows stored under `token_key`, with their users.
    pub async fn lookup(&self, token_key: &str) -> Result<Rows, StoreError> {
        let rows = self
            .query("lookup", &self.sql.lookup, &[&token_key])
            .await?;
        rows.iter()
            .map(row_of)
            .collect::<Result<_, _>>()
            .map_err(|e| self.failed("lookup", &e))
    }

    /// The row with this digest (primary key), with its user.
    pub async fn confirm(&self, digest: &str) -> Result<Option<TokenRow>, StoreError> {
        let rows = self.query("confirm", &self.sql.confirm, &[&digest]).await?;
        rows.first()
            .map(row_of)
            .transpose()
            .map_err(|e| self.failed("confirm", &e))
    }

    /// Deletes every expired token of the user owning `digest` (knox's `_cleanup_token`).
    pub async fn delete_expired_of_user(&self, digest: &str) -> Result<Vec<Removed>, StoreError> {
        let rows = self
            .query(
                "delete_expired",
                &self.sql.delete_expired_of_user,
                &[&digest],
            )
            .await?;
        removed_of(&rows).map_err(|e| self.failed("delete_expired", &e))
    }

    /// Deletes one token (logout).
    pub async fn delete_token(&self, digest: &str) -> Result<Vec<Removed>, StoreError> {
        let rows = self
            .query("delete_token", &self.sql.delete_token, &[&digest])
            .await?;
        removed_of(&rows).map_err(|e| self.failed("delete_token", &e))
    }

    /// Deletes every token of the user owning `digest` (logout-all).
    pub async fn delete_all_of_user(&self, digest: &str) -> Result<Vec<Removed>, StoreError> {
        let rows = self
            .query("delete_all", &self.sql.delete_all_of_user, &[&digest])
            .await?;
        removed_of(&rows).map_err(|e| self.failed("delete_all", &e))
    }

    /// Moves a token's expiry (AUTO_REFRESH).
    pub async fn refresh_expiry(
        &self,
        digest: &str,
        expiry: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.query(
            "refresh_expiry",
            &self.sql.refresh_expiry,
            &[&digest, &expiry],
        )
        .await
        .map(drop)
    }

    /// A round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.query("ping", "SELECT 1", &[]).await.map(drop)
    }
}
