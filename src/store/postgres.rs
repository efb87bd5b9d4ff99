//! The Postgres tier: the Django database, source of truth, through a deadpool of
//! tokio-postgres connections with every timeout set.
//!
//! Statements are prepared and cached per connection, except behind PgBouncer in transaction
//! mode (`postgres.pgbouncer`): there consecutive messages may reach different server
//! connections, so a named statement prepared on one is unknown on the next, and every
//! statement goes out unnamed in one Parse/Bind/Execute/Sync exchange instead
//! ([`tokio_postgres::Client::query_typed`]). Either way each call names its parameter types.
//! Table names come from config (they were checked to be plain identifiers) and are spliced in
//! once, at startup.
//!
//! Idle connections are closed after `postgres.idle_timeout` ([`Postgres::close_idle`]), so an
//! idle sidecar holds no pooled connection.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use compact_str::CompactString;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Timeouts};
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio_postgres::{
    Row,
    types::{ToSql, Type},
};

use super::{
    StoreError,
    cancel::Canceller,
    lookup_batch::{self, BatchId, LookupBatches},
    pg::{classify, classify_pool, pg_config, tls_connector},
};
use crate::{
    auth::{Groups, StoredDigest, TokenRow, UserInfo},
    config::{GroupTables, PostgresConfig, UserColumns},
    metrics::Metrics,
    store::memory::Rows,
};

/// Expired tokens one login deletes at most: each fires the triggers (a log row and a
/// notification), so a user with a large backlog has it cleared over several logins, each
/// quick, rather than one that runs into the statement timeout every time.
pub const LOGIN_CLEANUP_BATCH: u32 = 1000;

/// A token removed from the database: its key and its owner, to evict from the caches.
pub type Removed = (String, String);

/// The SQL, with the configured table names.
pub(super) struct Statements {
    pub(super) lookup: String,
    pub(super) confirm: String,
    pub(super) delete_expired_of_user: String,
    pub(super) delete_token: String,
    pub(super) delete_unreceived: String,
    pub(super) delete_all_of_user: String,
    pub(super) refresh_expiry: String,
    pub(super) login_user: String,
    pub(super) lock_user: String,
    pub(super) count_live: String,
    pub(super) delete_some_expired_of_user: String,
    pub(super) insert_token: String,
    /// `None` when the user model has no last-login column.
    pub(super) set_last_login: Option<String>,
    pub(super) set_password: String,
    /// Replaces a hash only while it is still the one a login checked.
    pub(super) upgrade_password: String,
    pub(super) set_active: String,
    pub(super) token_keys_after: String,
    pub(super) estimated_tokens: String,
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
                "SELECT {row_cols} FROM {tok} t JOIN {usr} u ON u.{id} = t.user_id \
                 WHERE t.token_key = ANY($1)"
            ),
            confirm: format!(
                "SELECT {row_cols} FROM {tok} t JOIN {usr} u ON u.{id} = t.user_id WHERE t.digest = $1"
            ),
            // knox's _cleanup_token: every expired token of the presented token's user.
            delete_expired_of_user: format!(
                "DELETE FROM {tok} WHERE user_id = (SELECT user_id FROM {tok} WHERE digest = $1) \
                 AND expiry < now() RETURNING token_key, user_id::text"
            ),
            // The same after a login, at most LOGIN_CLEANUP_BATCH rows at a time (see
            // `Store::delete_expired_after_login`).
            // Expired again in the outer WHERE: a row refreshed after the subquery read it is
            // rechecked there, not in the subquery. Rows another cleanup holds are skipped.
            delete_some_expired_of_user: format!(
                "DELETE FROM {tok} WHERE digest IN (SELECT o.digest FROM {tok} o \
                 WHERE o.user_id = (SELECT user_id FROM {tok} WHERE digest = $1) \
                 AND o.expiry < now() LIMIT {LOGIN_CLEANUP_BATCH} FOR UPDATE SKIP LOCKED) \
                 AND expiry < now() RETURNING token_key, user_id::text"
            ),
            delete_token: format!(
                "DELETE FROM {tok} WHERE digest = $1 RETURNING token_key, user_id::text"
            ),
            // The token of a login not answered with it, and whether the transaction $2 (the
            // login's txid, NULL when its COMMIT is known to have succeeded) had ended,
            // committed or not, as of the DELETE's own snapshot: if it had, a row it committed
            // was there to delete. A COMMIT waiting for a synchronous standby has not ended
            // (committed locally, its row stays hidden until the standby confirms). One row.
            delete_unreceived: format!(
                "WITH removed AS (DELETE FROM {tok} WHERE digest = $1 RETURNING token_key) \
                 SELECT r.token_key, txid_visible_in_snapshot($2, txid_current_snapshot()) \
                 FROM (SELECT) one LEFT JOIN removed r ON true"
            ),
            delete_all_of_user: format!(
                "DELETE FROM {tok} WHERE user_id = (SELECT user_id FROM {tok} WHERE digest = $1) \
                 RETURNING token_key, user_id::text"
            ),
            // The row as it stands once moved, its user read in the same statement: what a
            // refresh shares through Redis is never the status cached before it. Only a live
            // row moves: an expiry set into the past (or cleared) while the token sat in a
            // cache is the truth, and no row back means the cached token is wrong.
            refresh_expiry: format!(
                "WITH moved AS (UPDATE {tok} SET expiry = $2 WHERE digest = $1 AND expiry > now() \
                 RETURNING digest, token_key, user_id, created, expiry) \
                 SELECT {row_cols} FROM moved t JOIN {usr} u ON u.{id} = t.user_id"
            ),
            login_user: format!(
                "SELECT u.{id}::text, u.{pw}, u.{active}, {email}, {roles} FROM {usr} u WHERE u.{name} = $1"
            ),
            // Serialises concurrent logins of one user so TOKEN_LIMIT_PER_USER holds exactly.
            lock_user: format!("SELECT {id} FROM {usr} WHERE {name} = $1 FOR UPDATE"),
            count_live: format!(
                "SELECT count(*) FROM {tok} t JOIN {usr} u ON u.{id} = t.user_id \
                 WHERE u.{name} = $1 AND (t.expiry > now() OR t.expiry IS NULL)"
            ),
            // The new row with its user as it stands under the login's lock (lock_user), not
            // as it was read before the password check: a deactivation or a lost group during
            // the check is what gets cached. Last, the transaction's id: should its COMMIT go
            // unanswered, it tells when the outcome is settled (`Postgres::discard_unreceived`).
            insert_token: format!(
                "WITH created AS (INSERT INTO {tok} (digest, token_key, created, expiry, user_id) \
                 SELECT $1, $2, $3, $4, u.{id} FROM {usr} u WHERE u.{name} = $5 \
                 RETURNING digest, token_key, user_id, created, expiry) \
                 SELECT {row_cols}, txid_current() FROM created t JOIN {usr} u ON u.{id} = t.user_id"
            ),
            set_last_login: c
                .last_login
                .as_ref()
                .map(|ll| format!("UPDATE {usr} SET {ll} = $2 WHERE {name} = $1")),
            set_password: format!("UPDATE {usr} SET {pw} = $2 WHERE {name} = $1"),
            upgrade_password: format!(
                "UPDATE {usr} SET {pw} = $3 WHERE {name} = $1 AND {pw} = $2 RETURNING {id}"
            ),
            set_active: format!("UPDATE {usr} SET {active} = $2 WHERE {name} = $1 RETURNING {id}"),
            // Index-only scans of knox's token_key index, one page at a time (see known_keys).
            token_keys_after: format!(
                "SELECT token_key FROM {tok} WHERE token_key > $1 ORDER BY token_key LIMIT $2"
            ),
            estimated_tokens: format!(
                "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = '{tok}'::regclass"
            ),
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
    /// Unnamed statements only, no session state (PgBouncer transaction pooling).
    pub(super) pgbouncer: bool,
    /// Server-side bounds set per transaction when no startup options can carry them.
    pub(super) statement_timeout: Duration,
    pub(super) idle_in_transaction_timeout: Duration,
    idle_timeout: Duration,
    /// When a request last used the pool: milliseconds since `born`, plus one; 0 = never.
    /// Readiness probes, the feed's self-test and what logins leave to do after their answers
    /// do not count, so they cannot keep an otherwise idle instance's connections open.
    last_request: Arc<AtomicU64>,
    born: Instant,
    /// Lookups waiting for a connection, batched ([`super::lookup_batch`]).
    batches: Arc<LookupBatches>,
    /// What logins leave running past their answers: a transaction whose request gave up, the
    /// delete of a token nobody received. Awaited before the process exits
    /// ([`Postgres::finish_login_work`]).
    login_work: tokio_util::task::TaskTracker,
    /// Cancelled when the process begins to stop: that work then hurries, as it is waited for
    /// only until a deadline.
    pub(super) stopping: tokio_util::sync::CancellationToken,
    /// Sends the cancel request for an abandoned login's statement ([`Postgres::abandon`]).
    canceller: Canceller,
}

/// Why a statement is sent: it decides whether it is counted in
/// `knoxgate_sql_statements_total` and whether it keeps pooled connections open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A request's SQL: counted, and the pool is in use.
    Request,
    /// `/readyz`, and what a login leaves to do after its answer: counted, but not use.
    Background,
    /// The change feed's self-test: neither.
    Feed,
}

/// One statement parameter with its Postgres type.
pub(super) type Param<'a> = (&'a (dyn ToSql + Sync), Type);

/// Runs one statement on `client` (a pooled connection or a transaction): prepared and cached,
/// or unnamed behind PgBouncer.
macro_rules! run_statement {
    ($pgbouncer:expr, $client:expr, $sql:expr, $params:expr) => {{
        let params: &[Param<'_>] = $params;
        if $pgbouncer {
            $client.query_typed($sql, params).await
        } else {
            let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
            let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
            match $client.prepare_typed_cached($sql, &types).await {
                Ok(stmt) => $client.query(&stmt, &values).await,
                Err(e) => Err(e),
            }
        }
    }};
}
pub(super) use run_statement;

/// A pooled connection lent to one statement. Dropped before [`Lent::give_back`], because the
/// request gave up first (a caller's deadline shorter than the statement's), it takes the
/// connection out of the pool: the statement may still be in flight there, and the next
/// request on that connection would queue behind it, or behind a peer that is gone.
struct Lent(Option<Object>);

impl Lent {
    fn client(&self) -> &Object {
        self.0
            .as_ref()
            .expect("a connection is lent until it is given back")
    }

    /// The connection, its statement finished (or given up at its own deadline).
    fn give_back(mut self) -> Object {
        self.0.take().expect("a connection is given back once")
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            let _ = Object::take(client);
        }
    }
}

pub(super) fn row_of(r: &Row) -> Result<TokenRow, tokio_postgres::Error> {
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
        let tls = tls_connector(cfg, &pg)?;
        let canceller = Canceller::new(&pg, tls.clone(), cfg.connect_timeout);
        let manager = match tls {
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
            pgbouncer: cfg.pgbouncer,
            statement_timeout: cfg.statement_timeout,
            idle_in_transaction_timeout: cfg.idle_in_transaction_timeout(),
            idle_timeout: cfg.idle_timeout,
            last_request: Arc::default(),
            born: Instant::now(),
            batches: Arc::new(LookupBatches::new(cfg.max_lookup_batch)),
            login_work: tokio_util::task::TaskTracker::new(),
            stopping: tokio_util::sync::CancellationToken::new(),
            canceller,
        })
    }

    /// Runs `work` on a task of its own, awaited by [`Postgres::finish_login_work`]: a login's
    /// work that must end the same way whether or not anyone waits for it.
    pub fn spawn_login_work(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.login_work.spawn(work);
    }

    /// Tells the work logins left running that the process is stopping: it waits for that
    /// work only until a deadline, so retries no longer pause long.
    pub fn begin_stopping(&self) {
        self.stopping.cancel();
    }

    /// Waits, until `deadline`, for the work logins left running ([`Self::spawn_login_work`]),
    /// so that a process exiting does not leave behind a token nobody received. What is still
    /// running at the deadline is logged and left.
    pub async fn finish_login_work(&self, deadline: tokio::time::Instant) {
        self.begin_stopping();
        self.login_work.close();
        if tokio::time::timeout_at(deadline, self.login_work.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.login_work.len(),
                "a login's transaction or the delete of a token nobody received was still \
                 running at the deadline; a token may remain until it expires or its user logs \
                 out everywhere"
            );
        }
    }

    /// Takes a login's connection, which may be inside its transaction or running one of its
    /// statements, out of the pool for good: asks the server to cancel what it runs, as
    /// `pg_cancel_backend` would, rolls back, and closes it. A statement its caller gave up on
    /// would otherwise run on, holding or awaiting its locks (the user's row, which the user's
    /// next login needs), until `statement_timeout`.
    ///
    /// Done on a task of its own ([`Postgres::spawn_login_work`]). The cancel
    /// ([`Canceller`]) is best effort, cancels nothing once the statement is done, and is not
    /// sent when too many are in flight already: the connection is then closed at once. The
    /// connection is closed only once the ROLLBACK queued behind the statement is answered (or
    /// at the statement deadline), so that behind PgBouncer its server connection goes back
    /// to PgBouncer's pool rather than being closed. Not used for abandoned lookups, where a
    /// cancel per request would add connections to a server that is slow already.
    pub(super) fn abandon(&self, client: Object) {
        let token = client.cancel_token();
        let client = Object::take(client);
        let Some(place) = self.canceller.place() else {
            return;
        };
        let (canceller, ended) = (self.canceller.clone(), self.statement_deadline);
        self.spawn_login_work(async move {
            canceller.cancel(&token).await;
            let _ = tokio::time::timeout(ended, client.batch_execute("ROLLBACK")).await;
            drop(place);
        });
    }

    /// Records that a request used the pool.
    pub(super) fn note_request(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_request.store(ms + 1, Ordering::Relaxed);
    }

    /// True when no request has used the pool for `postgres.idle_timeout` (or ever).
    pub fn quiet(&self) -> bool {
        match self.last_request.load(Ordering::Relaxed) {
            0 => true,
            ms => {
                self.born
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1))
                    >= self.idle_timeout
            }
        }
    }

    /// Closes pooled connections unused for `postgres.idle_timeout`, and every idle one once
    /// no request has used the pool for that long (probes, the feed's self-test and a login's
    /// leftover work would otherwise keep one open); returns how many. deadpool never closes idle connections
    /// itself: without this a sidecar that served one burst would hold `pool_size` backends
    /// (or PgBouncer client slots) forever.
    pub fn close_idle(&self) -> usize {
        let idle_timeout = self.idle_timeout;
        let quiet = self.quiet();
        self.pool
            .retain(|_, m| !quiet && m.last_used() < idle_timeout)
            .removed
            .len()
    }

    /// Connections in the pool, in use or idle.
    pub fn pool_size(&self) -> usize {
        self.pool.status().size
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

    /// [`Postgres::failed`] for an error answered on `client`, and what it means for that
    /// connection: its statement cache cleared after a schema change ("cached plan must not
    /// change result type"), and the connection out of the pool when its server cannot serve
    /// it again (a standby, e.g. a demoted primary, or a dying server): a new connection finds
    /// the primary, this one never will.
    pub(super) fn failed_on(
        &self,
        what: &str,
        client: Object,
        e: &tokio_postgres::Error,
    ) -> StoreError {
        if e.code()
            .is_some_and(|c| c == &tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED)
        {
            client.statement_cache.clear();
        }
        let error = self.failed(what, e);
        if matches!(error, StoreError::Unavailable(_)) {
            let _ = Object::take(client);
        }
        error
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
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, StoreError> {
        Box::pin(self.query_unboxed(label, sql, params, Purpose::Request)).await
    }

    /// [`Postgres::query`] for work no request waits for: counted, but it does not keep the
    /// pool's connections open.
    pub(super) async fn query_in_background(
        &self,
        label: &'static str,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, StoreError> {
        Box::pin(self.query_unboxed(label, sql, params, Purpose::Background)).await
    }

    async fn query_unboxed(
        &self,
        label: &'static str,
        sql: &str,
        params: &[Param<'_>],
        purpose: Purpose,
    ) -> Result<Vec<Row>, StoreError> {
        if purpose == Purpose::Request {
            self.note_request();
        }
        let client = self.client().await?;
        // The feed's statements are not among the SQL that requests cost.
        if purpose != Purpose::Feed {
            self.metrics.sql(label);
        }
        self.run_on(client, label, sql, params, self.statement_deadline)
            .await
    }

    /// Runs one statement on a pooled connection with the client-side deadline. A connection
    /// that missed the deadline, or whose server is going away, is taken out of the pool, as is
    /// one whose caller gave up first ([`Lent`]).
    async fn run_on(
        &self,
        client: Object,
        label: &'static str,
        sql: &str,
        params: &[Param<'_>],
        deadline: Duration,
    ) -> Result<Vec<Row>, StoreError> {
        let lent = Lent(Some(client));
        let result = tokio::time::timeout(deadline, async {
            let client = lent.client();
            run_statement!(self.pgbouncer, client, sql, params)
        })
        .await;
        let client = lent.give_back();
        match result {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(self.failed_on(label, client, &e)),
            Err(_) => {
                let _ = Object::take(client);
                Err(self.fail(StoreError::Timeout(format!(
                    "{label}: no answer within the statement deadline"
                ))))
            }
        }
    }

    /// Up to `limit` token keys greater than `after`, in order: one page of the key filter's
    /// load. Not a request's SQL (not counted, and does not keep idle connections open).
    pub async fn token_keys_after(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = Box::pin(self.query_unboxed(
            "token_keys",
            &self.sql.token_keys_after,
            &[(&after, Type::TEXT), (&limit, Type::INT8)],
            Purpose::Feed,
        ))
        .await?;
        rows.iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(|e| self.failed("token_keys", &e))
    }

    /// The token table's row count as its statistics estimate it (0 when never analysed).
    pub async fn estimated_tokens(&self) -> Result<usize, StoreError> {
        let rows = Box::pin(self.query_unboxed(
            "estimated_tokens",
            &self.sql.estimated_tokens,
            &[],
            Purpose::Feed,
        ))
        .await?;
        let estimate: i64 = match rows.first() {
            Some(row) => row
                .try_get(0)
                .map_err(|e| self.failed("estimated_tokens", &e))?,
            None => 0,
        };
        Ok(usize::try_from(estimate).unwrap_or(0))
    }

    /// All rows stored under `token_key`, with their users. Lookups arriving while another
    /// waits for a connection share its query ([`super::lookup_batch`]).
    pub async fn lookup(&self, token_key: &str) -> Result<Rows, StoreError> {
        let (reply, answer) = oneshot::channel();
        if let Some(batch) = self.batches.join(token_key, reply) {
            // A task of its own: the batch is answered even if the request that opened it
            // goes away meanwhile.
            let pg = self.clone();
            tokio::spawn(async move { pg.run_lookup_batch(batch).await });
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "lookup: the batch was dropped (shutting down)".into(),
            ))
        })
    }

    /// Waits for a connection for `batch`, then answers every lookup that joined it meanwhile
    /// with one query.
    async fn run_lookup_batch(&self, batch: BatchId) {
        self.note_request();
        let client = self.client().await;
        let waiting = self.batches.take(batch);
        if let Some(joined) = waiting.len().checked_sub(1) {
            self.metrics.batched_lookups.inc_by(joined as u64);
        }
        let client = match client {
            Ok(client) => client,
            Err(error) => return lookup_batch::answer(waiting, Err(error)),
        };
        self.metrics.sql("lookup");
        let keys = lookup_batch::distinct_keys(&waiting);
        let rows = match self
            .run_on(
                client,
                "lookup",
                &self.sql.lookup,
                &[(&keys, Type::TEXT_ARRAY)],
                self.statement_deadline,
            )
            .await
        {
            Ok(rows) => rows
                .iter()
                .map(row_of)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.failed("lookup", &e)),
            Err(error) => Err(error),
        };
        lookup_batch::answer(waiting, rows);
    }

    /// The row with this digest (primary key), with its user.
    pub async fn confirm(&self, digest: &str) -> Result<Option<TokenRow>, StoreError> {
        let rows = self
            .query("confirm", &self.sql.confirm, &[(&digest, Type::TEXT)])
            .await?;
        self.confirmed(&rows)
    }

    /// [`Postgres::confirm`], given up after `limit` (pool wait, connect and statement
    /// together): for a caller with a cached answer to fall back on. A connection that missed
    /// it is taken out of the pool, as one that missed the statement deadline is.
    pub async fn confirm_within(
        &self,
        digest: &str,
        limit: Duration,
    ) -> Result<Option<TokenRow>, StoreError> {
        let rows = Box::pin(async {
            let started = Instant::now();
            self.note_request();
            // In a task of its own: a connection still being opened when the caller stops
            // waiting is finished and pooled for the next request, not abandoned (a Postgres
            // slower to connect to than the limit would otherwise never get a connection).
            let pool = self.pool.clone();
            let acquiring = tokio::spawn(async move { pool.get().await });
            let client = match tokio::time::timeout(limit, acquiring).await {
                Ok(Ok(Ok(client))) => client,
                Ok(Ok(Err(e))) => return Err(self.fail(classify_pool(&e))),
                Ok(Err(e)) => {
                    return Err(self.fail(StoreError::Unavailable(format!(
                        "confirm: the connection task failed: {e}"
                    ))));
                }
                Err(_) => {
                    return Err(self.fail(StoreError::Timeout(
                        "confirm: no connection within cache.confirm_timeout (or the request's share of its deadline)".into(),
                    )));
                }
            };
            let left = limit.saturating_sub(started.elapsed());
            if left.is_zero() {
                // Nothing sent yet: the connection goes back to the pool as it came.
                return Err(self.fail(StoreError::Timeout(
                    "confirm: no time left within cache.confirm_timeout (or the request's share of its deadline)".into(),
                )));
            }
            self.metrics.sql("confirm");
            let params: &[Param<'_>] = &[(&digest, Type::TEXT)];
            let deadline = left.min(self.statement_deadline);
            self.run_on(client, "confirm", &self.sql.confirm, params, deadline)
                .await
        })
        .await?;
        self.confirmed(&rows)
    }

    fn confirmed(&self, rows: &[Row]) -> Result<Option<TokenRow>, StoreError> {
        rows.first()
            .map(row_of)
            .transpose()
            .map_err(|e| self.failed("confirm", &e))
    }

    /// Deletes up to [`LOGIN_CLEANUP_BATCH`] expired tokens of the user owning `digest`.
    pub async fn delete_some_expired_of_user(
        &self,
        digest: &str,
    ) -> Result<Vec<Removed>, StoreError> {
        let sql = &self.sql.delete_some_expired_of_user;
        self.delete("delete_expired_after_login", sql, digest).await
    }

    /// Deletes every expired token of the user owning `digest` (knox's `_cleanup_token`).
    pub async fn delete_expired_of_user(&self, digest: &str) -> Result<Vec<Removed>, StoreError> {
        let sql = &self.sql.delete_expired_of_user;
        self.delete("delete_expired", sql, digest).await
    }

    /// Deletes one token (logout).
    pub async fn delete_token(&self, digest: &str) -> Result<Vec<Removed>, StoreError> {
        self.delete("delete_token", &self.sql.delete_token, digest)
            .await
    }

    /// Deletes every token of the user owning `digest` (logout-all).
    pub async fn delete_all_of_user(&self, digest: &str) -> Result<Vec<Removed>, StoreError> {
        self.delete("delete_all", &self.sql.delete_all_of_user, digest)
            .await
    }

    /// Runs one of the DELETE statements above, which take a digest and return what they removed.
    async fn delete(
        &self,
        label: &'static str,
        sql: &str,
        digest: &str,
    ) -> Result<Vec<Removed>, StoreError> {
        let rows = self.query(label, sql, &[(&digest, Type::TEXT)]).await?;
        removed_of(&rows).map_err(|e| self.failed(label, &e))
    }

    /// Moves a token's expiry (AUTO_REFRESH).
    /// The token's row with its new expiry and its user as they stand now; `None` when the
    /// token was no longer there to refresh.
    pub async fn refresh_expiry(
        &self,
        digest: &str,
        expiry: OffsetDateTime,
    ) -> Result<Option<TokenRow>, StoreError> {
        let rows = self
            .query(
                "refresh_expiry",
                &self.sql.refresh_expiry,
                &[(&digest, Type::TEXT), (&expiry, Type::TIMESTAMPTZ)],
            )
            .await?;
        rows.first()
            .map(row_of)
            .transpose()
            .map_err(|e| self.failed("refresh_expiry", &e))
    }

    /// Sends a notification through the pool (the change feed's self-test).
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        let params: &[Param<'_>] = &[(&channel, Type::TEXT), (&payload, Type::TEXT)];
        Box::pin(self.query_unboxed(
            "feed_echo",
            "SELECT pg_notify($1, $2)",
            params,
            Purpose::Feed,
        ))
        .await
        .map(drop)
    }

    /// A round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        Box::pin(self.query_unboxed("ping", "SELECT 1", &[], Purpose::Background))
            .await
            .map(drop)
    }
}
