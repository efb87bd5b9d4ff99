//! `[postgres]`: the Django database, its pool and deadlines, and the table and column names of
//! the token and user models; also the deadlines derived from them.

use std::{num::NonZeroUsize, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    value::{
        self, column, existing_file, invalid, nonzero, nonzero_at_most, optional_column, positive,
        sql_identifier,
    },
};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
// A sidecar's share of the database: see config/knoxgate.toml for the fleet arithmetic.
const DEFAULT_POOL_SIZE: u64 = 4;
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_POOL_RECYCLE_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(1);
// Keys per batched lookup: a burst's worth, small enough that one slow query holds few requests.
const DEFAULT_MAX_LOOKUP_BATCH: u64 = 64;
// Django's names for knox's token model and the stock user model.
const DEFAULT_TOKEN_TABLE: &str = "knox_authtoken";
const DEFAULT_USER_TABLE: &str = "auth_user";
const DEFAULT_USER_ID_COLUMN: &str = "id";
const DEFAULT_USERNAME_COLUMN: &str = "username";
const DEFAULT_EMAIL_COLUMN: &str = "email";
const DEFAULT_IS_ACTIVE_COLUMN: &str = "is_active";
const DEFAULT_PASSWORD_COLUMN: &str = "password";
const DEFAULT_LAST_LOGIN_COLUMN: &str = "last_login";
// Per-route policies: the flags of Django's PermissionsMixin and the stock group tables.
const DEFAULT_IS_STAFF_COLUMN: &str = "is_staff";
const DEFAULT_IS_SUPERUSER_COLUMN: &str = "is_superuser";
const DEFAULT_GROUP_TABLE: &str = "auth_group";
const DEFAULT_USER_GROUPS_TABLE: &str = "auth_user_groups";
const DEFAULT_USER_GROUPS_USER_COLUMN: &str = "user_id";

/// `[postgres]` as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresFile {
    pub url: String,
    pub pool_size: u64,
    #[serde(with = "value::duration")]
    pub idle_timeout: Duration,
    /// `true`, `false`, or `"detect"` (also when unset).
    #[serde(with = "pgbouncer_setting")]
    pub pgbouncer: Option<bool>,
    pub feed_url: String,
    #[serde(with = "value::duration")]
    pub connect_timeout: Duration,
    #[serde(with = "value::duration")]
    pub pool_wait_timeout: Duration,
    #[serde(with = "value::duration")]
    pub pool_recycle_timeout: Duration,
    #[serde(with = "value::duration")]
    pub statement_timeout: Duration,
    pub max_lookup_batch: u64,
    pub ca_file: String,
    pub token_table: String,
    pub user_table: String,
    pub user_id_column: String,
    pub username_column: String,
    pub email_column: String,
    pub is_active_column: String,
    pub password_column: String,
    pub last_login_column: String,
    pub is_staff_column: String,
    pub is_superuser_column: String,
    pub group_table: String,
    pub user_groups_table: String,
    pub user_groups_user_column: String,
}

impl Default for PostgresFile {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.into(),
            pool_size: DEFAULT_POOL_SIZE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            pgbouncer: None,
            feed_url: String::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_wait_timeout: DEFAULT_POOL_WAIT_TIMEOUT,
            pool_recycle_timeout: DEFAULT_POOL_RECYCLE_TIMEOUT,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            max_lookup_batch: DEFAULT_MAX_LOOKUP_BATCH,
            ca_file: String::new(),
            token_table: DEFAULT_TOKEN_TABLE.into(),
            user_table: DEFAULT_USER_TABLE.into(),
            user_id_column: DEFAULT_USER_ID_COLUMN.into(),
            username_column: DEFAULT_USERNAME_COLUMN.into(),
            email_column: DEFAULT_EMAIL_COLUMN.into(),
            is_active_column: DEFAULT_IS_ACTIVE_COLUMN.into(),
            password_column: DEFAULT_PASSWORD_COLUMN.into(),
            last_login_column: DEFAULT_LAST_LOGIN_COLUMN.into(),
            is_staff_column: DEFAULT_IS_STAFF_COLUMN.into(),
            is_superuser_column: DEFAULT_IS_SUPERUSER_COLUMN.into(),
            group_table: DEFAULT_GROUP_TABLE.into(),
            user_groups_table: DEFAULT_USER_GROUPS_TABLE.into(),
            user_groups_user_column: DEFAULT_USER_GROUPS_USER_COLUMN.into(),
        }
    }
}

/// The Django database: how to reach it, how long to wait for it, and where the tables are.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// Connection URL; `sslmode=require` turns on TLS.
    pub url: String,
    /// Connections in the pool.
    pub pool_size: NonZeroUsize,
    /// Pooled connections unused this long are closed.
    pub idle_timeout: Duration,
    /// `url` is a PgBouncer in transaction mode: no startup options, no named statements.
    /// When `detect_pgbouncer` is set this is only known after the startup probe
    /// ([`crate::store::pg::settle_pgbouncer`]), which sets it.
    pub pgbouncer: bool,
    /// `postgres.pgbouncer` was not set (or `"detect"`): probe `url` at startup.
    pub detect_pgbouncer: bool,
    /// The change feed's connection (direct to the primary), also used by migrations and the
    /// startup trigger check; `url` when not set.
    pub feed_url: String,
    /// Time to open a connection.
    pub connect_timeout: Duration,
    /// Time to wait for a free pooled connection.
    pub pool_wait_timeout: Duration,
    /// Time to check a pooled connection before reuse.
    pub pool_recycle_timeout: Duration,
    /// Server-side `statement_timeout` of every statement knoxgate sends.
    pub statement_timeout: Duration,
    /// Most token keys one batched lookup asks for (`store::lookup_batch`).
    pub max_lookup_batch: NonZeroUsize,
    /// PEM file of CA certificates for TLS; `None`: the bundled web PKI roots.
    pub ca_file: Option<String>,
    /// knox's token table, optionally schema-qualified.
    pub token_table: String,
    /// The user model's table, optionally schema-qualified.
    pub user_table: String,
    /// Column names of the user table.
    pub user_columns: UserColumns,
    /// `None`: the user model has no groups (policies naming a group then never pass).
    pub groups: Option<GroupTables>,
}

/// Where a user's groups are: Django's `auth_group` and the user model's M2M table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupTables {
    pub group_table: String,
    pub user_groups_table: String,
    /// The M2M table's column naming the user (`user_id`; `<model>_id` for custom models).
    pub user_column: String,
}

impl GroupTables {
    /// Django's default tables.
    pub fn is_default(&self) -> bool {
        self.group_table == DEFAULT_GROUP_TABLE
            && self.user_groups_table == DEFAULT_USER_GROUPS_TABLE
            && self.user_column == DEFAULT_USER_GROUPS_USER_COLUMN
    }
}

impl PostgresConfig {
    /// Client-side bound on one statement. The server's `statement_timeout` cannot fire when the
    /// server is unreachable, so we also stop waiting ourselves; 250 ms later than the server,
    /// so that a reachable server's own cancellation arrives first.
    pub fn query_deadline(&self) -> Duration {
        self.statement_timeout + Duration::from_millis(250)
    }

    /// Client-side bound on the login transaction, which sends up to four statements (lock the
    /// user, count live tokens, insert the token, stamp `last_login`).
    pub fn login_transaction_deadline(&self) -> Duration {
        self.query_deadline() * 4
    }

    /// Server-side `idle_in_transaction_session_timeout`: a session left open inside a
    /// transaction by a client that went away gives up its locks after a few statements' time.
    pub fn idle_in_transaction_timeout(&self) -> Duration {
        self.statement_timeout * 5
    }

    /// `TCP_USER_TIMEOUT`: a connection whose peer vanished without a reset fails after this
    /// instead of after the kernel's retransmission limit (minutes). At least 5 s, so that a short
    /// `connect_timeout` does not cut a slow but live link.
    pub fn tcp_user_timeout(&self) -> Duration {
        self.connect_timeout.max(Duration::from_secs(5))
    }

    /// Bound on a one-off check at startup: open a connection, then ask one question.
    pub fn connect_and_query_deadline(&self) -> Duration {
        self.connect_timeout + self.statement_timeout
    }

    /// Bound on one statement of the change-feed listener. Its connection is its own, outside the
    /// pool, and no request waits on it, so it is allowed a whole second past the server's timeout.
    pub fn feed_query_deadline(&self) -> Duration {
        self.statement_timeout + Duration::from_secs(1)
    }

    /// Bound on the listener's replay and prune, which read or delete many log rows, not one.
    pub fn feed_bulk_deadline(&self) -> Duration {
        self.feed_query_deadline() * 5
    }
}

/// Column names of the user table, for custom `AUTH_USER_MODEL`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserColumns {
    /// Primary key.
    pub id: String,
    /// `USERNAME_FIELD`.
    pub username: String,
    /// `None`: the model has no email column.
    pub email: Option<String>,
    /// Inactive users are denied.
    pub is_active: String,
    /// The Django password hash.
    pub password: String,
    /// `None`: the model has no last-login column; logins then stamp nothing.
    pub last_login: Option<String>,
    /// `None`: the model has no such flag; it then counts as false for policies.
    pub is_staff: Option<String>,
    pub is_superuser: Option<String>,
}

impl Default for UserColumns {
    fn default() -> Self {
        UserColumns {
            id: DEFAULT_USER_ID_COLUMN.into(),
            username: DEFAULT_USERNAME_COLUMN.into(),
            email: Some(DEFAULT_EMAIL_COLUMN.into()),
            is_active: DEFAULT_IS_ACTIVE_COLUMN.into(),
            password: DEFAULT_PASSWORD_COLUMN.into(),
            last_login: Some(DEFAULT_LAST_LOGIN_COLUMN.into()),
            is_staff: Some(DEFAULT_IS_STAFF_COLUMN.into()),
            is_superuser: Some(DEFAULT_IS_SUPERUSER_COLUMN.into()),
        }
    }
}

impl TryFrom<PostgresFile> for PostgresConfig {
    type Error = ConfigError;

    fn try_from(file: PostgresFile) -> Result<Self, ConfigError> {
        let groups = group_tables(&file)?;
        Ok(PostgresConfig {
            feed_url: match file.feed_url.trim() {
                "" => postgres_url("postgres.url", &file.url)?,
                url => postgres_url("postgres.feed_url", url)?,
            },
            url: postgres_url("postgres.url", &file.url)?,
            // deadpool sizes its slot queue and semaphore for the whole pool up front.
            pool_size: nonzero_at_most("postgres.pool_size", file.pool_size, MAX_POOL_SIZE)?,
            idle_timeout: file.idle_timeout,
            pgbouncer: file.pgbouncer.unwrap_or(false),
            detect_pgbouncer: file.pgbouncer.is_none(),
            connect_timeout: positive("postgres.connect_timeout", file.connect_timeout)?,
            pool_wait_timeout: file.pool_wait_timeout,
            pool_recycle_timeout: file.pool_recycle_timeout,
            statement_timeout: statement_timeout(file.statement_timeout)?,
            max_lookup_batch: nonzero("postgres.max_lookup_batch", file.max_lookup_batch)?,
            ca_file: existing_file("postgres.ca_file", &file.ca_file)?,
            token_table: sql_identifier("postgres.token_table", &file.token_table)?,
            user_table: sql_identifier("postgres.user_table", &file.user_table)?,
            user_columns: UserColumns {
                id: column("postgres.user_id_column", &file.user_id_column)?,
                username: column("postgres.username_column", &file.username_column)?,
                email: optional_column("postgres.email_column", &file.email_column)?,
                is_active: column("postgres.is_active_column", &file.is_active_column)?,
                password: column("postgres.password_column", &file.password_column)?,
                last_login: optional_column("postgres.last_login_column", &file.last_login_column)?,
                is_staff: optional_column("postgres.is_staff_column", &file.is_staff_column)?,
                is_superuser: optional_column(
                    "postgres.is_superuser_column",
                    &file.is_superuser_column,
                )?,
            },
            groups,
        })
    }
}

/// Largest `postgres.pool_size`: far beyond any server's `max_connections`, and small enough
/// that the pool's up-front allocations stay trivial.
pub const MAX_POOL_SIZE: u64 = 10_000;

/// Postgres's cap on its millisecond timeout settings (an `int`).
const MAX_PG_TIMEOUT_MS: u128 = i32::MAX as u128;

/// The longest `postgres.statement_timeout` whose derived settings Postgres still accepts: the
/// largest one sent is the feed's bulk deadline, `(statement_timeout + 1s) × 5`, as
/// `statement_timeout` of its connection (`idle_in_transaction_session_timeout`,
/// `statement_timeout × 5`, is smaller).
pub const MAX_STATEMENT_TIMEOUT: Duration =
    Duration::from_millis((MAX_PG_TIMEOUT_MS / 5) as u64 - 1_000);

/// `postgres.statement_timeout`: sent in whole milliseconds, where 0 would turn Postgres's
/// timeouts off, and multiplied into settings Postgres caps at `i32::MAX` ms.
fn statement_timeout(d: Duration) -> Result<Duration, ConfigError> {
    const KEY: &str = "postgres.statement_timeout";
    if d < Duration::from_millis(1) {
        return Err(invalid(
            KEY,
            "must be at least 1ms (Postgres reads 0 as no timeout)",
        ));
    }
    if d > MAX_STATEMENT_TIMEOUT {
        return Err(invalid(
            KEY,
            format!(
                "must be at most {}ms (about 4.9 days): knoxgate sends Postgres \
                 idle_in_transaction_session_timeout = 5 × statement_timeout and, on the change \
                 feed's bulk connection, statement_timeout = 5 × (statement_timeout + 1s), and \
                 Postgres refuses either above {MAX_PG_TIMEOUT_MS}ms",
                MAX_STATEMENT_TIMEOUT.as_millis()
            ),
        ));
    }
    Ok(d)
}

/// A Postgres URL (one host or several, `host1:5432,host2:5432`), checked but kept as written.
fn postgres_url(key: &str, s: &str) -> Result<String, ConfigError> {
    if let Err(e) = s.parse::<tokio_postgres::Config>() {
        // libpq's strictest modes, common in Django settings, are what `require` does here.
        if ["sslmode=verify-full", "sslmode=verify-ca"]
            .iter()
            .any(|m| s.contains(m))
        {
            return Err(invalid(
                key,
                "sslmode=verify-full and verify-ca are not accepted: use sslmode=require, with \
                 which knoxgate always checks the server's certificate and name (against the \
                 public roots, or postgres.ca_file)",
            ));
        }
        return Err(invalid(key, format!("not a Postgres URL: {e}")));
    }
    Ok(s.to_owned())
}

/// Serde glue for `postgres.pgbouncer`: a boolean, or `"detect"` for `None`. Strings
/// `"true"`/`"false"` are accepted too, as `KNOXGATE_POSTGRES_PGBOUNCER` arrives typed like the
/// default, a string.
mod pgbouncer_setting {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    const DETECT: &str = "detect";

    pub fn serialize<S: Serializer>(v: &Option<bool>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_bool(*b),
            None => s.serialize_str(DETECT),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Bool(bool),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        match Written::deserialize(d)? {
            Written::Bool(b) => Ok(Some(b)),
            Written::Text(t) => match t.trim() {
                DETECT | "" => Ok(None),
                "true" | "1" | "yes" | "on" => Ok(Some(true)),
                "false" | "0" | "no" | "off" => Ok(Some(false)),
                other => Err(D::Error::custom(format!(
                    "expects true, false or \"detect\", not {other:?}"
                ))),
            },
        }
    }
}

/// The group tables, unless `user_groups_table` is empty.
fn group_tables(file: &PostgresFile) -> Result<Option<GroupTables>, ConfigError> {
    if file.user_groups_table.is_empty() {
        return Ok(None);
    }
    if file.user_table != DEFAULT_USER_TABLE && file.user_groups_table == DEFAULT_USER_GROUPS_TABLE
    {
        // Django names a custom model's M2M table after the model; the default would be the
        // wrong table (and every lookup an SQL error).
        return Err(invalid(
            "postgres.user_groups_table",
            "with a custom user_table, name its groups table (<app>_<model>_groups) and \
             user_groups_user_column (<model>_id), or set it to \"\" for no groups",
        ));
    }
    Ok(Some(GroupTables {
        group_table: sql_identifier("postgres.group_table", &file.group_table)?,
        user_groups_table: sql_identifier("postgres.user_groups_table", &file.user_groups_table)?,
        user_column: column(
            "postgres.user_groups_user_column",
            &file.user_groups_user_column,
        )?,
    }))
}
