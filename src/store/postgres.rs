//! The Postgres tier: the Django database, source of truth, through a deadpool of
//! tokio-postgres connections with every timeout set.
//!
//! All statements are prepared and cached per connection. Table names come from config (they
//! were checked to be plain identifiers) and are spliced in once, at startup.

use std::{sync::Arc, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Timeouts};
use time::OffsetDateTime;
use tokio_postgres::{Row, types::ToSql};

use super::StoreError;
use crate::{
    auth::{StoredDigest, TokenRow, UserInfo},
    config::{PostgresConfig, UserColumns},
    metrics::Metrics,
    store::memory::Rows,
};

/// A token removed from the database: its key and its owner, to evict from the caches.
pub type Removed = (String, String);

/// A user as needed to check a login.
#[derive(Debug, Clone)]
pub struct LoginUser {
    pub user_id: String,
    pub password: String,
    pub is_active: bool,
    pub email: String,
}

/// The SQL, with the configured table names.
struct Statements {
    lookup: String,
    confirm: String,
    delete_expired_of_user: String,
    delete_token: String,
    delete_all_of_user: String,
    refresh_expiry: String,
    login_user: String,
    lock_user: String,
    count_live: String,
    insert_token: String,
    /// `None` when the user model has no last-login column.
    set_last_login: Option<String>,
    set_password: String,
    set_active: String,
}

impl Statements {
    fn new(tok: &str, usr: &str, c: &UserColumns) -> Self {
        let (id, name, active, pw) = (&c.id, &c.username, &c.is_active, &c.password);
        let email = c
            .email
            .as_ref()
            .map_or_else(|| "''".to_owned(), |e| format!("u.{e}::text"));
        let row_cols = format!(
            "t.digest, t.token_key, t.user_id::text, t.created, t.expiry, \
             u.{active}, u.{name}::text, {email}"
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
                "SELECT u.{id}::text, u.{pw}, u.{active}, {email} FROM {usr} u WHERE u.{name} = $1"
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

/// Handle to the Postgres tier.
#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
    sql: Arc<Statements>,
    user_table: Arc<str>,
    /// Client-side bound on one statement: the server-side statement_timeout cannot fire when
    /// the server is unreachable, so we also stop waiting ourselves.
    statement_deadline: Duration,
    /// [`PostgresConfig::login_transaction_deadline`].
    login_deadline: Duration,
    metrics: Arc<Metrics>,
}

/// `application_name` of pooled connections, as seen in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "knoxgate";
/// `application_name` of the change-feed listener connection.
pub const FEED_APPLICATION_NAME: &str = "knoxgate-feed";

/// Connection settings shared by the pool and the change-feed listener.
pub fn pg_config(cfg: &PostgresConfig) -> Result<tokio_postgres::Config, StoreError> {
    let mut pg: tokio_postgres::Config = cfg
        .url
        .parse()
        .map_err(|e| StoreError::Postgres(format!("bad URL: {e}")))?;
    pg.connect_timeout(cfg.connect_timeout);
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    pg.tcp_user_timeout(cfg.tcp_user_timeout());
    pg.application_name(APPLICATION_NAME);
    let options = format!(
        "{} -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        pg.get_options().unwrap_or(""),
        cfg.statement_timeout.as_millis(),
        cfg.idle_in_transaction_timeout().as_millis(),
    );
    pg.options(options.trim());
    Ok(pg)
}

/// TLS for Postgres: rustls when the URL asks for it (`sslmode=require`), plain otherwise.
pub fn tls_connector(
    cfg: &PostgresConfig,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
    let pg = pg_config(cfg)?;
    if pg.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| StoreError::Postgres(format!("postgres.ca_file {path}: {e}")))?;
            for cert in certs {
                let cert = cert
                    .map_err(|e| StoreError::Postgres(format!("postgres.ca_file {path}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| StoreError::Postgres(format!("postgres.ca_file {path}: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Postgres(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

fn row_of(r: &Row) -> Result<TokenRow, tokio_postgres::Error> {
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
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        Ok(Self {
            pool,
            sql: Arc::new(Statements::new(
                &cfg.token_table,
                &cfg.user_table,
                &cfg.user_columns,
            )),
            user_table: cfg.user_table.as_str().into(),
            statement_deadline: cfg.query_deadline(),
            login_deadline: cfg.login_transaction_deadline(),
            metrics,
        })
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        self.metrics.postgres_errors.inc();
        tracing::warn!(what, error = %e, "postgres failure");
        StoreError::Postgres(format!("{what}: {e}"))
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| self.fail("connect", e))
    }

    /// Runs one statement with the client-side deadline. A connection that missed the deadline
    /// is taken out of the pool: it may still be stuck on the query.
    ///
    /// The pool and driver futures are large (tens of KB); boxed here, they cost an allocation
    /// on the Postgres path only, instead of inflating every future that might reach it,
    /// in-process and Redis hits included.
    async fn query(
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
                Err(self.fail(label, e))
            }
            Err(_) => {
                let _ = Object::take(client);
                Err(self.fail(label, "statement deadline exceeded"))
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
            .map_err(|e| self.fail("lookup", e))
    }

    /// The row with this digest (primary key), with its user.
    pub async fn confirm(&self, digest: &str) -> Result<Option<TokenRow>, StoreError> {
        let rows = self.query("confirm", &self.sql.confirm, &[&digest]).await?;
        rows.first()
            .map(row_of)
            .transpose()
            .map_err(|e| self.fail("confirm", e))
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
        removed_of(&rows).map_err(|e| self.fail("delete_expired", e))
    }

    /// Deletes one token (logout).
    pub async fn delete_token(&self, digest: &str) -> Result<Vec<Removed>, StoreError> {
        let rows = self
            .query("delete_token", &self.sql.delete_token, &[&digest])
            .await?;
        removed_of(&rows).map_err(|e| self.fail("delete_token", e))
    }

    /// Deletes every token of the user owning `digest` (logout-all).
    pub async fn delete_all_of_user(&self, digest: &str) -> Result<Vec<Removed>, StoreError> {
        let rows = self
            .query("delete_all", &self.sql.delete_all_of_user, &[&digest])
            .await?;
        removed_of(&rows).map_err(|e| self.fail("delete_all", e))
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

    /// The user a login names, if any.
    pub async fn login_user(&self, username: &str) -> Result<Option<LoginUser>, StoreError> {
        let rows = self
            .query("login_user", &self.sql.login_user, &[&username])
            .await?;
        rows.first()
            .map(|r| {
                Ok(LoginUser {
                    user_id: r.try_get(0)?,
                    password: r.try_get(1)?,
                    is_active: r.try_get(2)?,
                    email: r.try_get::<_, Option<String>>(3)?.unwrap_or_default(),
                })
            })
            .transpose()
            .map_err(|e: tokio_postgres::Error| self.fail("login_user", e))
    }

    /// Creates a token row for `username` as knox's `AuthToken.objects.create` does, after
    /// checking the per-user limit, and stamps `last_login`, in one transaction.
    /// Returns `Ok(None)` when the limit is reached.
    pub async fn create_token(&self, new: &NewToken<'_>) -> Result<Option<String>, StoreError> {
        let mut client = self.client().await?;
        let sql = &self.sql;
        let metrics = &self.metrics;
        let work = async {
            let tx = client.transaction().await?;
            metrics.sql("lock_user");
            let stmt = tx.prepare_cached(&sql.lock_user).await?;
            tx.query(&stmt, &[&new.username]).await?;
            if let Some(limit) = new.limit {
                metrics.sql("count_live");
                let stmt = tx.prepare_cached(&sql.count_live).await?;
                let live: i64 = tx.query_one(&stmt, &[&new.username]).await?.try_get(0)?;
                if live >= limit as i64 {
                    tx.rollback().await?;
                    return Ok(None);
                }
            }
            metrics.sql("insert_token");
            let stmt = tx.prepare_cached(&sql.insert_token).await?;
            let rows = tx
                .query(
                    &stmt,
                    &[
                        &new.digest,
                        &new.token_key,
                        &new.created,
                        &new.expiry,
                        &new.username,
                    ],
                )
                .await?;
            let Some(row) = rows.first() else {
                tx.rollback().await?;
                return Ok(None);
            };
            let user_id: String = row.try_get(0)?;
            if let Some(set_last_login) = &sql.set_last_login {
                metrics.sql("set_last_login");
                let stmt = tx.prepare_cached(set_last_login).await?;
                tx.execute(&stmt, &[&new.username, &new.created]).await?;
            }
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(Some(user_id))
        };
        match tokio::time::timeout(self.login_deadline, work).await {
            Ok(r) => r.map_err(|e| self.fail("create_token", e)),
            Err(_) => {
                let _ = Object::take(client);
                Err(self.fail("create_token", "deadline exceeded"))
            }
        }
    }

    /// Replaces a user's password hash (re-hash on login, `user set-password`).
    pub async fn set_password(&self, username: &str, encoded: &str) -> Result<(), StoreError> {
        self.query(
            "set_password",
            &self.sql.set_password,
            &[&username, &encoded],
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
                    &new.encoded_password,
                    &new.superuser,
                    &new.username,
                    &new.email,
                    &new.active,
                ],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Postgres("insert returned nothing".into()))?;
        row.try_get(0).map_err(|e| self.fail("create_user", e))
    }

    /// Sets `is_active`; returns whether the user exists.
    pub async fn set_active(&self, username: &str, active: bool) -> Result<bool, StoreError> {
        Ok(!self
            .query("set_active", &self.sql.set_active, &[&username, &active])
            .await?
            .is_empty())
    }

    /// A round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.query("ping", "SELECT 1", &[]).await.map(drop)
    }
}

/// The values of a token row to insert.
pub struct NewToken<'a> {
    pub username: &'a str,
    pub digest: &'a str,
    pub token_key: &'a str,
    pub created: OffsetDateTime,
    pub expiry: Option<OffsetDateTime>,
    pub limit: Option<u64>,
}

/// A user to create.
pub struct NewUser<'a> {
    pub username: &'a str,
    pub encoded_password: &'a str,
    pub email: &'a str,
    pub superuser: bool,
    pub active: bool,
}

/// One dedicated connection (migrations, the operator CLI), driven on its own task.
pub async fn connect_one(cfg: &PostgresConfig) -> Result<tokio_postgres::Client, StoreError> {
    let pg = pg_config(cfg)?;
    let fail = |e: tokio_postgres::Error| StoreError::Postgres(format!("connect: {e}"));
    match tls_connector(cfg)? {
        Some(tls) => {
            let (client, conn) = pg.connect(tls).await.map_err(fail)?;
            tokio::spawn(conn);
            Ok(client)
        }
        None => {
            let (client, conn) = pg.connect(tokio_postgres::NoTls).await.map_err(fail)?;
            tokio::spawn(conn);
            Ok(client)
        }
    }
}
