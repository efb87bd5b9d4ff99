//! Configuration: one TOML file, overridden by `KNOXGATE_*` environment variables, validated into
//! a typed [`Config`] at startup.
//!
//! Every key lives in a section (`[server]`, `[verify]`, `[knox]`, `[sessions]`, `[postgres]`,
//! `[redis]`, `[cache]`, `[log]`). Its environment variable is `KNOXGATE_<SECTION>_<KEY>`
//! upper-cased, except `[server]` keys, which drop the section (`KNOXGATE_LISTEN`). Durations
//! carry units (`250ms`, `5s`, `10m`, `10h`, `1d`); optional ones accept `none`. Unknown keys,
//! unknown variables and bad values fail with a message naming the key.
//! `config/knoxgate.toml` documents every key with its default.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use crate::auth::HashAlgorithm;

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(String),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("unknown environment variable {0}: no such config key (see config/knoxgate.toml)")]
    UnknownEnv(String),
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

// === File format: every field a string/number/bool with its default ===

macro_rules! file_section {
    ($name:ident { $($field:ident : $ty:ty = $default:expr),* $(,)? }) => {
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name { $(pub $field: $ty),* }
        impl Default for $name {
            fn default() -> Self { Self { $($field: $default.into()),* } }
        }
    };
}

file_section!(ServerFile {
    listen: String = "0.0.0.0:8080",
    admin_listen: String = "0.0.0.0:9090",
    max_connections: u64 = 10_000u64,
    max_in_flight: u64 = 2_048u64,
    max_header_bytes: u64 = 16_384u64,
    header_read_timeout: String = "5s",
    request_timeout: String = "2s",
    shutdown_grace: String = "10s",
});

file_section!(VerifyFile {
    path: String = "/verify",
    user_id_header: String = "X-Auth-User-Id",
    username_header: String = "",
    email_header: String = "",
    expiry_header: String = "",
    staff_header: String = "",
    superuser_header: String = "",
    groups_header: String = "",
    allow_cors_preflight: bool = false,
    max_token_chars: u64 = 256u64,
});

file_section!(KnoxFile {
    auth_header_prefix: String = "Token",
    hash_algorithm: String = "sha512",
    token_prefix: String = "",
    token_character_length: u64 = 64u64,
    token_ttl: String = "10h",
    token_limit_per_user: u64 = 0u64,
    auto_refresh: bool = false,
    auto_refresh_max_ttl: String = "none",
    min_refresh_interval: String = "60s",
});

file_section!(SessionsFile {
    enabled: bool = true,
    base_path: String = "/api/auth/",
    password_iterations: u64 = 1_000_000u64,
    hash_concurrency: u64 = 0u64,
    hash_queue_timeout: String = "5s",
    hash_nice: u64 = 10u64,
    max_body_bytes: u64 = 8_192u64,
    throttle_failures: u64 = 10u64,
    throttle_window: String = "5m",
    trusted_proxies: Vec<String> = Vec::<String>::new(),
});

file_section!(PostgresFile {
    url: String = "postgres://postgres@127.0.0.1:5432/postgres",
    pool_size: u64 = 16u64,
    connect_timeout: String = "2s",
    pool_wait_timeout: String = "1s",
    pool_recycle_timeout: String = "1s",
    statement_timeout: String = "1s",
    ca_file: String = "",
    token_table: String = "knox_authtoken",
    user_table: String = "auth_user",
    user_id_column: String = "id",
    username_column: String = "username",
    email_column: String = "email",
    is_active_column: String = "is_active",
    password_column: String = "password",
    last_login_column: String = "last_login",
    is_staff_column: String = "is_staff",
    is_superuser_column: String = "is_superuser",
    group_table: String = "auth_group",
    user_groups_table: String = "auth_user_groups",
    user_groups_user_column: String = "user_id",
});

file_section!(RedisFile {
    url: String = "redis://127.0.0.1:6379/0",
    key_prefix: String = "knox",
    max_cache_ttl: String = "300s",
    command_timeout: String = "250ms",
    connect_timeout: String = "1s",
    pool_size: u64 = 1u64,
    reconnect_max_delay: String = "2s",
    unresponsive_timeout: String = "1s",
    breaker_cooldown: String = "1s",
});

file_section!(CacheFile {
    consistency: String = "notify",
    memory_max_entries: u64 = 200_000u64,
    memory_max_bytes: u64 = 64u64 * 1024 * 1024,
    negative_ttl: String = "5s",
    stale_if_error: bool = true,
    feed_retention: String = "1d",
    feed_reconnect_delay: String = "500ms",
    feed_health_interval: String = "5s",
});

file_section!(LogFile {
    format: String = "text",
    level: String = "info",
});

/// The file as written, before validation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub server: ServerFile,
    pub verify: VerifyFile,
    pub knox: KnoxFile,
    pub sessions: SessionsFile,
    pub postgres: PostgresFile,
    pub redis: RedisFile,
    pub cache: CacheFile,
    pub log: LogFile,
}

// === Validated configuration ===

/// How cached answers are kept in step with Postgres. See the README for the guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Hits cost no SQL; the trigger-fed change feed evicts revoked tokens.
    Notify,
    /// Every hit confirms the token row and user with one primary-key query.
    Strict,
    /// No feed: staleness is bounded by `redis.max_cache_ttl`.
    Ttl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Connections beyond this are closed at accept.
    pub max_connections: usize,
    /// Requests handled at once; beyond it requests get 503 at once instead of queueing.
    pub max_in_flight: usize,
    /// Cap on a request head (line + headers); larger heads get 431.
    pub max_header_bytes: usize,
    /// Time allowed for a request head to arrive; also closes idle keep-alive connections.
    pub header_read_timeout: Duration,
    /// The whole budget of one request; past it the answer is 503.
    pub request_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub path: String,
    pub user_id_header: hyper::header::HeaderName,
    pub username_header: Option<hyper::header::HeaderName>,
    pub email_header: Option<hyper::header::HeaderName>,
    pub expiry_header: Option<hyper::header::HeaderName>,
    /// Per-route policy identity headers: `true`/`false`, and the group names.
    pub staff_header: Option<hyper::header::HeaderName>,
    pub superuser_header: Option<hyper::header::HeaderName>,
    pub groups_header: Option<hyper::header::HeaderName>,
    pub allow_cors_preflight: bool,
    pub max_token_chars: usize,
}

impl VerifyConfig {
    /// Whether answers carry the username or email, which caches must then keep.
    pub fn needs_identity(&self) -> bool {
        self.username_header.is_some() || self.email_header.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct KnoxConfig {
    pub auth_header_prefix: String,
    pub hash_algorithm: HashAlgorithm,
    pub token_prefix: String,
    pub token_character_length: usize,
    pub token_ttl: Option<Duration>,
    pub token_limit_per_user: Option<u64>,
    pub auto_refresh: bool,
    pub auto_refresh_max_ttl: Option<Duration>,
    pub min_refresh_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct SessionsConfig {
    pub enabled: bool,
    pub base_path: String,
    pub password_iterations: u32,
    pub hash_concurrency: usize,
    pub hash_queue_timeout: Duration,
    /// Added to the nice value of the password-hashing threads (0–19).
    pub hash_nice: i32,
    pub max_body_bytes: usize,
    pub throttle_failures: u32,
    pub throttle_window: Duration,
    pub trusted_proxies: Vec<ipnet_lite::IpNet>,
}

impl SessionsConfig {
    /// Password checks allowed at once: `hash_concurrency`, or with 0 one core fewer than the
    /// machine has (at least 1), so that logins always leave a core to `/verify`.
    pub fn hash_slots(&self) -> usize {
        if self.hash_concurrency > 0 {
            return self.hash_concurrency;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
    }
}

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub url: String,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    pub pool_wait_timeout: Duration,
    pub pool_recycle_timeout: Duration,
    pub statement_timeout: Duration,
    pub ca_file: Option<String>,
    pub token_table: String,
    pub user_table: String,
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
        self.group_table == "auth_group"
            && self.user_groups_table == "auth_user_groups"
            && self.user_column == "user_id"
    }
}

/// Column names of the user table, for custom `AUTH_USER_MODEL`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserColumns {
    pub id: String,
    pub username: String,
    /// `None`: the model has no email column.
    pub email: Option<String>,
    pub is_active: String,
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
            id: "id".into(),
            username: "username".into(),
            email: Some("email".into()),
            is_active: "is_active".into(),
            password: "password".into(),
            last_login: Some("last_login".into()),
            is_staff: Some("is_staff".into()),
            is_superuser: Some("is_superuser".into()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `None` runs without Redis.
    pub url: Option<String>,
    pub key_prefix: String,
    pub max_cache_ttl: Duration,
    pub command_timeout: Duration,
    pub connect_timeout: Duration,
    pub pool_size: usize,
    pub reconnect_max_delay: Duration,
    pub unresponsive_timeout: Duration,
    pub breaker_cooldown: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub consistency: Consistency,
    pub memory_max_entries: u64,
    pub memory_max_bytes: u64,
    pub negative_ttl: Duration,
    pub stale_if_error: bool,
    pub feed_retention: Duration,
    pub feed_reconnect_delay: Duration,
    pub feed_health_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub verify: VerifyConfig,
    pub knox: KnoxConfig,
    pub sessions: SessionsConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
}

/// knox's `MAXIMUM_TOKEN_PREFIX_LENGTH`.
pub const MAX_TOKEN_PREFIX_CHARS: usize = 10;

/// Parses `250ms`, `5s`, `10m`, `10h`, `1d`.
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| {
            invalid(
                key,
                format!("`{s}` has no unit; write e.g. `{s}s` or `{s}ms`"),
            )
        })?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| invalid(key, format!("`{s}` is not a duration")))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => {
            return Err(invalid(
                key,
                format!("unknown unit `{unit}` (use ms, s, m, h or d)"),
            ));
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

fn parse_optional_duration(key: &str, s: &str) -> Result<Option<Duration>, ConfigError> {
    if s.trim().eq_ignore_ascii_case("none") {
        Ok(None)
    } else {
        parse_duration(key, s).map(Some)
    }
}

fn nonzero(key: &str, n: u64) -> Result<u64, ConfigError> {
    if n == 0 {
        Err(invalid(key, "must be greater than 0"))
    } else {
        Ok(n)
    }
}

fn header_name(key: &str, s: &str) -> Result<Option<hyper::header::HeaderName>, ConfigError> {
    if s.is_empty() {
        return Ok(None);
    }
    hyper::header::HeaderName::from_bytes(s.as_bytes())
        .map(Some)
        .map_err(|_| invalid(key, format!("`{s}` is not a valid header name")))
}

fn sql_identifier(key: &str, s: &str) -> Result<String, ConfigError> {
    // Table names are spliced into SQL, so only plain (optionally schema-qualified) identifiers.
    let ok = !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(invalid(key, format!("`{s}` is not a plain SQL identifier")))
    }
}

fn column(key: &str, s: &str) -> Result<String, ConfigError> {
    if s.contains('.') {
        return Err(invalid(key, "a column name, without a table"));
    }
    sql_identifier(key, s)
}

fn optional_column(key: &str, s: &str) -> Result<Option<String>, ConfigError> {
    if s.is_empty() {
        Ok(None)
    } else {
        column(key, s).map(Some)
    }
}

fn socket_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(key, format!("`{s}` is not an address like 0.0.0.0:8080")))
}

fn path_prefix(key: &str, s: &str) -> Result<String, ConfigError> {
    if s.starts_with('/') {
        Ok(s.to_owned())
    } else {
        Err(invalid(key, "must start with `/`"))
    }
}

impl Config {
    /// Parses and validates a TOML document with no environment overrides.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Self::from_toml_and_env(text, std::iter::empty())
    }

    /// Parses a TOML document, applies `KNOXGATE_*` variables from `env`, and validates.
    pub fn from_toml_and_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        apply_env(&mut table, env)?;
        let file: FileConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        file.validate()
    }

    /// Reads `path` (if any) and the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        Self::from_toml_and_env(&text, std::env::vars())
    }
}

/// Variables that belong to the CLI rather than to a config key.
const CLI_ENV: &[&str] = &["KNOXGATE_CONFIG"];

/// Kubernetes injects `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT`, `<SERVICE>_PORT_8080_TCP…` for
/// every Service in the namespace; a Service named `knoxgate` must not stop the pod.
fn is_service_link(var: &str) -> bool {
    var == "KNOXGATE_PORT"
        || var.starts_with("KNOXGATE_SERVICE_")
        || var.starts_with("KNOXGATE_PORT_")
}

/// Maps `KNOXGATE_*` variables onto the TOML table, typed like the key's default.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(FileConfig::default()).expect("defaults serialise");
    // KNOXGATE_<SECTION>_<KEY> (or KNOXGATE_<KEY> for [server]) → (section, key).
    let mut names = BTreeMap::new();
    for (section, keys) in &defaults {
        for key in keys.as_table().expect("sections are tables").keys() {
            let var = if section == "server" {
                format!("KNOXGATE_{}", key.to_uppercase())
            } else {
                format!("KNOXGATE_{}_{}", section.to_uppercase(), key.to_uppercase())
            };
            names.insert(var, (section.clone(), key.clone()));
        }
    }
    for (var, value) in env {
        if !var.starts_with("KNOXGATE_") || CLI_ENV.contains(&var.as_str()) || is_service_link(&var)
        {
            continue;
        }
        let Some((section, key)) = names.get(&var) else {
            return Err(ConfigError::UnknownEnv(var));
        };
        let typed = match &defaults[section][key] {
            toml::Value::Integer(_) => toml::Value::Integer(
                value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(&var, "expects a whole number"))?,
            ),
            toml::Value::Boolean(_) => toml::Value::Boolean(match value.trim() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => return Err(invalid(&var, "expects true or false")),
            }),
            toml::Value::Array(_) => toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_owned()))
                    .collect(),
            ),
            _ => toml::Value::String(value),
        };
        let section_table = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        let toml::Value::Table(section_table) = section_table else {
            return Err(invalid(section, "must be a table"));
        };
        section_table.insert(key.clone(), typed);
    }
    Ok(())
}

impl FileConfig {
    /// Turns the file's values into typed ones, naming the key of the first bad value.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let FileConfig {
            server,
            verify,
            knox,
            sessions,
            postgres,
            redis,
            cache,
            log,
        } = self;
        let server = ServerConfig {
            listen: socket_addr("server.listen", &server.listen)?,
            admin_listen: socket_addr("server.admin_listen", &server.admin_listen)?,
            max_connections: nonzero("server.max_connections", server.max_connections)? as usize,
            max_in_flight: nonzero("server.max_in_flight", server.max_in_flight)? as usize,
            max_header_bytes: {
                // hyper refuses buffers under 8 KiB.
                if server.max_header_bytes < 8192 {
                    return Err(invalid("server.max_header_bytes", "must be at least 8192"));
                }
                server.max_header_bytes as usize
            },
            header_read_timeout: parse_duration(
                "server.header_read_timeout",
                &server.header_read_timeout,
            )?,
            request_timeout: parse_duration("server.request_timeout", &server.request_timeout)?,
            shutdown_grace: parse_duration("server.shutdown_grace", &server.shutdown_grace)?,
        };
        let verify = VerifyConfig {
            path: path_prefix("verify.path", &verify.path)?
                .trim_end_matches('/')
                .to_owned(),
            user_id_header: header_name("verify.user_id_header", &verify.user_id_header)?
                .ok_or_else(|| invalid("verify.user_id_header", "must not be empty"))?,
            username_header: header_name("verify.username_header", &verify.username_header)?,
            email_header: header_name("verify.email_header", &verify.email_header)?,
            expiry_header: header_name("verify.expiry_header", &verify.expiry_header)?,
            staff_header: header_name("verify.staff_header", &verify.staff_header)?,
            superuser_header: header_name("verify.superuser_header", &verify.superuser_header)?,
            groups_header: header_name("verify.groups_header", &verify.groups_header)?,
            allow_cors_preflight: verify.allow_cors_preflight,
            max_token_chars: nonzero("verify.max_token_chars", verify.max_token_chars)? as usize,
        };
        if verify.path.is_empty() {
            return Err(invalid("verify.path", "must not be `/`"));
        }
        let hash_algorithm = HashAlgorithm::parse(&knox.hash_algorithm).ok_or_else(|| {
            invalid(
                "knox.hash_algorithm",
                "use sha512 (knox's default), sha384, sha256 or sha3_512",
            )
        })?;
        if knox.token_prefix.chars().count() > MAX_TOKEN_PREFIX_CHARS {
            return Err(invalid(
                "knox.token_prefix",
                "knox allows at most 10 characters",
            ));
        }
        if knox.auth_header_prefix.is_empty()
            || knox
                .auth_header_prefix
                .bytes()
                .any(|b| b.is_ascii_whitespace() || !b.is_ascii_graphic())
        {
            return Err(invalid(
                "knox.auth_header_prefix",
                "must be one printable ASCII word",
            ));
        }
        if !(2..=128).contains(&knox.token_character_length) {
            return Err(invalid(
                "knox.token_character_length",
                "must be between 2 and 128",
            ));
        }
        let knox = KnoxConfig {
            auth_header_prefix: knox.auth_header_prefix,
            hash_algorithm,
            token_prefix: knox.token_prefix,
            token_character_length: knox.token_character_length as usize,
            token_ttl: parse_optional_duration("knox.token_ttl", &knox.token_ttl)?,
            token_limit_per_user: (knox.token_limit_per_user > 0)
                .then_some(knox.token_limit_per_user),
            auto_refresh: knox.auto_refresh,
            auto_refresh_max_ttl: parse_optional_duration(
                "knox.auto_refresh_max_ttl",
                &knox.auto_refresh_max_ttl,
            )?,
            min_refresh_interval: parse_duration(
                "knox.min_refresh_interval",
                &knox.min_refresh_interval,
            )?,
        };
        let trusted_proxies = sessions
            .trusted_proxies
            .iter()
            .map(|s| {
                ipnet_lite::IpNet::parse(s).ok_or_else(|| {
                    invalid(
                        "sessions.trusted_proxies",
                        format!("`{s}` is not an address or CIDR"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let sessions = SessionsConfig {
            enabled: sessions.enabled,
            base_path: {
                let p = path_prefix("sessions.base_path", &sessions.base_path)?;
                if p.ends_with('/') { p } else { format!("{p}/") }
            },
            password_iterations: {
                let n = nonzero("sessions.password_iterations", sessions.password_iterations)?;
                // Above the verifier's cap our own hashes (and the timing dummy) would not verify.
                if n > u64::from(crate::password::MAX_PBKDF2_ITERATIONS) {
                    return Err(invalid(
                        "sessions.password_iterations",
                        format!("at most {}", crate::password::MAX_PBKDF2_ITERATIONS),
                    ));
                }
                n as u32
            },
            hash_concurrency: sessions.hash_concurrency as usize,
            hash_queue_timeout: parse_duration(
                "sessions.hash_queue_timeout",
                &sessions.hash_queue_timeout,
            )?,
            hash_nice: match sessions.hash_nice {
                n @ 0..=19 => n as i32,
                _ => {
                    return Err(invalid(
                        "sessions.hash_nice",
                        "a nice increment from 0 to 19",
                    ));
                }
            },
            max_body_bytes: nonzero("sessions.max_body_bytes", sessions.max_body_bytes)? as usize,
            throttle_failures: u32::try_from(sessions.throttle_failures)
                .map_err(|_| invalid("sessions.throttle_failures", "too large"))?,
            throttle_window: parse_duration("sessions.throttle_window", &sessions.throttle_window)?,
            trusted_proxies,
        };
        let postgres = PostgresConfig {
            url: {
                postgres
                    .url
                    .parse::<tokio_postgres::Config>()
                    .map_err(|e| invalid("postgres.url", format!("not a Postgres URL: {e}")))?;
                postgres.url
            },
            pool_size: nonzero("postgres.pool_size", postgres.pool_size)? as usize,
            connect_timeout: parse_duration("postgres.connect_timeout", &postgres.connect_timeout)?,
            pool_wait_timeout: parse_duration(
                "postgres.pool_wait_timeout",
                &postgres.pool_wait_timeout,
            )?,
            pool_recycle_timeout: parse_duration(
                "postgres.pool_recycle_timeout",
                &postgres.pool_recycle_timeout,
            )?,
            statement_timeout: parse_duration(
                "postgres.statement_timeout",
                &postgres.statement_timeout,
            )?,
            ca_file: (!postgres.ca_file.is_empty()).then_some(postgres.ca_file),
            token_table: sql_identifier("postgres.token_table", &postgres.token_table)?,
            user_table: sql_identifier("postgres.user_table", &postgres.user_table)?,
            user_columns: UserColumns {
                id: column("postgres.user_id_column", &postgres.user_id_column)?,
                username: column("postgres.username_column", &postgres.username_column)?,
                email: optional_column("postgres.email_column", &postgres.email_column)?,
                is_active: column("postgres.is_active_column", &postgres.is_active_column)?,
                password: column("postgres.password_column", &postgres.password_column)?,
                last_login: optional_column(
                    "postgres.last_login_column",
                    &postgres.last_login_column,
                )?,
                is_staff: optional_column("postgres.is_staff_column", &postgres.is_staff_column)?,
                is_superuser: optional_column(
                    "postgres.is_superuser_column",
                    &postgres.is_superuser_column,
                )?,
            },
            groups: if postgres.user_groups_table.is_empty() {
                None
            } else if postgres.user_table != "auth_user"
                && postgres.user_groups_table == "auth_user_groups"
            {
                // Django names a custom model's M2M table after the model; the default would be
                // the wrong table (and every lookup an SQL error).
                return Err(invalid(
                    "postgres.user_groups_table",
                    "with a custom user_table, name its groups table (<app>_<model>_groups) and \
                     user_groups_user_column (<model>_id), or set it to \"\" for no groups",
                ));
            } else {
                Some(GroupTables {
                    group_table: sql_identifier("postgres.group_table", &postgres.group_table)?,
                    user_groups_table: sql_identifier(
                        "postgres.user_groups_table",
                        &postgres.user_groups_table,
                    )?,
                    user_column: column(
                        "postgres.user_groups_user_column",
                        &postgres.user_groups_user_column,
                    )?,
                })
            },
        };
        let redis = RedisConfig {
            url: if redis.url.trim().is_empty() {
                None
            } else {
                const SCHEMES: &[&str] = &[
                    "redis://",
                    "rediss://",
                    "redis-sentinel://",
                    "rediss-sentinel://",
                    "redis-cluster://",
                    "rediss-cluster://",
                ];
                if !SCHEMES.iter().any(|s| redis.url.starts_with(s)) {
                    return Err(invalid(
                        "redis.url",
                        format!("use one of {}", SCHEMES.join(", ")),
                    ));
                }
                fred::types::config::Config::from_url(&redis.url)
                    .map_err(|e| invalid("redis.url", format!("not a Redis URL: {e}")))?;
                Some(redis.url)
            },
            key_prefix: {
                if redis.key_prefix.is_empty() || redis.key_prefix.contains(['{', '}']) {
                    return Err(invalid(
                        "redis.key_prefix",
                        "must be non-empty, without braces",
                    ));
                }
                redis.key_prefix
            },
            max_cache_ttl: {
                let d = parse_duration("redis.max_cache_ttl", &redis.max_cache_ttl)?;
                if d < Duration::from_secs(1) {
                    return Err(invalid("redis.max_cache_ttl", "must be at least 1s"));
                }
                d
            },
            command_timeout: parse_duration("redis.command_timeout", &redis.command_timeout)?,
            connect_timeout: parse_duration("redis.connect_timeout", &redis.connect_timeout)?,
            pool_size: nonzero("redis.pool_size", redis.pool_size)? as usize,
            reconnect_max_delay: parse_duration(
                "redis.reconnect_max_delay",
                &redis.reconnect_max_delay,
            )?,
            unresponsive_timeout: parse_duration(
                "redis.unresponsive_timeout",
                &redis.unresponsive_timeout,
            )?,
            breaker_cooldown: parse_duration("redis.breaker_cooldown", &redis.breaker_cooldown)?,
        };
        let cache = CacheConfig {
            consistency: match cache.consistency.as_str() {
                "notify" => Consistency::Notify,
                "strict" => Consistency::Strict,
                "ttl" => Consistency::Ttl,
                other => {
                    return Err(invalid(
                        "cache.consistency",
                        format!("`{other}`: use notify, strict or ttl"),
                    ));
                }
            },
            memory_max_entries: cache.memory_max_entries,
            memory_max_bytes: cache.memory_max_bytes,
            negative_ttl: parse_duration("cache.negative_ttl", &cache.negative_ttl)?,
            stale_if_error: cache.stale_if_error,
            feed_retention: parse_duration("cache.feed_retention", &cache.feed_retention)?,
            feed_reconnect_delay: parse_duration(
                "cache.feed_reconnect_delay",
                &cache.feed_reconnect_delay,
            )?,
            feed_health_interval: parse_duration(
                "cache.feed_health_interval",
                &cache.feed_health_interval,
            )?,
        };
        let log = LogConfig {
            format: match log.format.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(invalid(
                        "log.format",
                        format!("`{other}`: use text or json"),
                    ));
                }
            },
            level: {
                tracing_subscriber::EnvFilter::try_new(&log.level)
                    .map_err(|e| invalid("log.level", e.to_string()))?;
                log.level
            },
        };
        Ok(Config {
            server,
            verify,
            knox,
            sessions,
            postgres,
            redis,
            cache,
            log,
        })
    }
}

/// A tiny IP network type for the trusted-proxy list (address or CIDR).
pub mod ipnet_lite {
    use std::net::IpAddr;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct IpNet {
        addr: IpAddr,
        prefix: u8,
    }

    impl IpNet {
        pub fn parse(s: &str) -> Option<Self> {
            let (addr, prefix) = match s.split_once('/') {
                Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
                None => {
                    let a = s.parse::<IpAddr>().ok()?;
                    (a, if a.is_ipv4() { 32 } else { 128 })
                }
            };
            let max = if addr.is_ipv4() { 32 } else { 128 };
            (prefix <= max).then_some(Self { addr, prefix })
        }

        pub fn contains(&self, ip: IpAddr) -> bool {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
                v4 => v4,
            };
            match (self.addr, ip) {
                (IpAddr::V4(net), IpAddr::V4(ip)) => {
                    let mask = u32::MAX
                        .checked_shl(32 - u32::from(self.prefix))
                        .unwrap_or(0);
                    u32::from(net) & mask == u32::from(ip) & mask
                }
                (IpAddr::V6(net), IpAddr::V6(ip)) => {
                    let mask = u128::MAX
                        .checked_shl(128 - u32::from(self.prefix))
                        .unwrap_or(0);
                    u128::from(net) & mask == u128::from(ip) & mask
                }
                _ => false,
            }
        }
    }
}

#[cfg(test)]
mod tests;
