//! `[redis]`: the shared Redis tier (django-rest-knox-redis's key layout), its client pool and
//! the deadlines and circuit breaker that keep a slow Redis from slowing `/verify`.

use std::{num::NonZeroUsize, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    value::{self, existing_file, invalid, nonzero_at_most, positive},
};

const DEFAULT_URL: &str = "redis://127.0.0.1:6379/0";
// django-rest-knox-redis's REDIS_KEY_PREFIX, so both sides share the keys unconfigured.
const DEFAULT_KEY_PREFIX: &str = "knox";
const DEFAULT_MAX_CACHE_TTL: Duration = Duration::from_secs(300);
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(250);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
// Each connection pipelines, so fewer connections mean fewer writes: on 2 cores one connection
// gave ~15% more Redis-tier throughput than two (bench/RESULTS.md).
const DEFAULT_POOL_SIZE: u64 = 1;
const DEFAULT_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
const DEFAULT_UNRESPONSIVE_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(1);
/// Redis expiries are whole seconds and entries with less than a second left are not written,
/// so below this the Redis tier would hold nothing.
const MIN_MAX_CACHE_TTL: Duration = Duration::from_secs(1);
/// Largest `redis.pool_size`: fred builds every client of the pool, and each opens its
/// connection, at startup; Redis's own default `maxclients` is 10,000 for the whole fleet.
pub const MAX_POOL_SIZE: u64 = 1_000;
/// Shortest `redis.entry_key`: HMAC-SHA256's own output size, so the key is not the weak part.
pub const MIN_ENTRY_KEY_BYTES: usize = 32;

/// URL schemes the Redis client understands: plain, TLS, Sentinel and Cluster.
const SCHEMES: &[&str] = &[
    "redis://",
    "rediss://",
    "redis-sentinel://",
    "rediss-sentinel://",
    "redis-cluster://",
    "rediss-cluster://",
];

/// `[redis]` as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisFile {
    pub url: String,
    pub key_prefix: String,
    #[serde(with = "value::duration")]
    pub max_cache_ttl: Duration,
    #[serde(with = "value::duration")]
    pub command_timeout: Duration,
    #[serde(with = "value::duration")]
    pub connect_timeout: Duration,
    pub pool_size: u64,
    #[serde(with = "value::duration")]
    pub reconnect_max_delay: Duration,
    #[serde(with = "value::duration")]
    pub unresponsive_timeout: Duration,
    #[serde(with = "value::duration")]
    pub breaker_cooldown: Duration,
    /// PEM file of the CA(s) that sign the server's certificate (`rediss://`); empty: the
    /// system's roots.
    pub ca_file: String,
    /// PEM client certificate chain and key, for servers that require client certificates.
    pub client_cert_file: String,
    pub client_key_file: String,
    /// Secret that authenticates knoxgate's field in Redis entries; usually set by the
    /// `KNOXGATE_REDIS_ENTRY_KEY` variable or read from `entry_key_file` rather than written here.
    pub entry_key: String,
    /// File holding `entry_key` (surrounding whitespace ignored).
    pub entry_key_file: String,
}

impl Default for RedisFile {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.into(),
            key_prefix: DEFAULT_KEY_PREFIX.into(),
            max_cache_ttl: DEFAULT_MAX_CACHE_TTL,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
            reconnect_max_delay: DEFAULT_RECONNECT_MAX_DELAY,
            unresponsive_timeout: DEFAULT_UNRESPONSIVE_TIMEOUT,
            breaker_cooldown: DEFAULT_BREAKER_COOLDOWN,
            ca_file: String::new(),
            client_cert_file: String::new(),
            client_key_file: String::new(),
            entry_key: String::new(),
            entry_key_file: String::new(),
        }
    }
}

/// The secret key of knoxgate's Redis entries. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct EntryKey(Vec<u8>);

impl EntryKey {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        EntryKey(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for EntryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EntryKey(<redacted>)")
    }
}

/// The Redis tier: where it is, how its keys are named, and how long to wait for it.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `None` runs without Redis.
    pub url: Option<String>,
    /// `REDIS_KEY_PREFIX`: keys are `<prefix>:token:<token_key>` and `<prefix>:user:<id>:tokens`.
    pub key_prefix: String,
    /// `MAX_TOKEN_CACHE_TTL`: no cached entry, in Redis or in process, outlives this.
    pub max_cache_ttl: Duration,
    /// Deadline of every command; a late answer counts as a miss, never as a denial.
    pub command_timeout: Duration,
    /// Deadline of a (re)connection, TLS handshake included.
    pub connect_timeout: Duration,
    /// Connections in the client pool.
    pub pool_size: NonZeroUsize,
    /// Cap on the reconnection backoff.
    pub reconnect_max_delay: Duration,
    /// A connection whose replies stall this long is dropped and reconnected.
    pub unresponsive_timeout: Duration,
    /// After a failure, Redis is skipped for this long.
    pub breaker_cooldown: Duration,
    /// TLS trust and client identity for `rediss://` URLs.
    pub tls: RedisTls,
    /// Authenticates the user status knoxgate stores in Redis entries. `None`: entries carrying
    /// that status are trusted as they are (whoever can write Redis can forge one).
    pub entry_key: Option<EntryKey>,
}

/// Files for TLS to Redis; all `None`: the system's roots, no client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    pub ca_file: Option<String>,
    /// Certificate chain and key, set together.
    pub client_cert: Option<(String, String)>,
}

impl RedisConfig {
    /// How often a connection is checked against `unresponsive_timeout`: a quarter of it, so a
    /// stall is noticed within 125% of the timeout, but not more often than every 10 ms.
    pub fn unresponsive_check_interval(&self) -> Duration {
        (self.unresponsive_timeout / 4).max(Duration::from_millis(10))
    }
}

impl TryFrom<RedisFile> for RedisConfig {
    type Error = ConfigError;

    fn try_from(file: RedisFile) -> Result<Self, ConfigError> {
        let url = if file.url.trim().is_empty() {
            None
        } else {
            if !SCHEMES.iter().any(|s| file.url.starts_with(s)) {
                return Err(invalid(
                    "redis.url",
                    format!("use one of {}", SCHEMES.join(", ")),
                ));
            }
            fred::types::config::Config::from_url(&file.url)
                .map_err(|e| invalid("redis.url", format!("not a Redis URL: {e}")))?;
            Some(file.url)
        };
        if file.key_prefix.is_empty() || file.key_prefix.contains(['{', '}']) {
            return Err(invalid(
                "redis.key_prefix",
                "must be non-empty, without braces",
            ));
        }
        let ca_file = existing_file("redis.ca_file", &file.ca_file)?;
        let client_cert = match (
            existing_file("redis.client_cert_file", &file.client_cert_file)?,
            existing_file("redis.client_key_file", &file.client_key_file)?,
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "redis.client_cert_file",
                    "set redis.client_cert_file and redis.client_key_file together",
                ));
            }
        };
        let tls_files = ca_file.is_some() || client_cert.is_some();
        if tls_files && !url.as_deref().is_some_and(|u| u.starts_with("rediss")) {
            return Err(invalid(
                "redis.ca_file",
                "TLS files need a TLS URL (rediss://, rediss-sentinel://, rediss-cluster://)",
            ));
        }
        if file.max_cache_ttl < MIN_MAX_CACHE_TTL {
            return Err(invalid("redis.max_cache_ttl", "must be at least 1s"));
        }
        let entry_key = entry_key(&file.entry_key, &file.entry_key_file)?;
        Ok(RedisConfig {
            url,
            key_prefix: file.key_prefix,
            max_cache_ttl: file.max_cache_ttl,
            // fred reads a zero timeout as "no timeout": a stalled Redis would then hold every
            // request until server.request_timeout instead of falling back to Postgres.
            command_timeout: positive("redis.command_timeout", file.command_timeout)?,
            connect_timeout: positive("redis.connect_timeout", file.connect_timeout)?,
            // fred builds (and connects) every client of the pool at startup.
            pool_size: nonzero_at_most("redis.pool_size", file.pool_size, MAX_POOL_SIZE)?,
            // Handed to fred in whole milliseconds: below 1 ms it would be 0, a reconnection
            // loop that spins a core for as long as Redis is down.
            reconnect_max_delay: {
                if file.reconnect_max_delay < Duration::from_millis(1) {
                    return Err(invalid("redis.reconnect_max_delay", "must be at least 1ms"));
                }
                file.reconnect_max_delay
            },
            unresponsive_timeout: positive(
                "redis.unresponsive_timeout",
                file.unresponsive_timeout,
            )?,
            breaker_cooldown: file.breaker_cooldown,
            tls: RedisTls {
                ca_file,
                client_cert,
            },
            entry_key,
        })
    }
}

/// `redis.entry_key`, given inline (usually by the environment) or in a file; not both.
fn entry_key(inline: &str, file: &str) -> Result<Option<EntryKey>, ConfigError> {
    let (key, text) = match (inline.trim(), file.trim()) {
        ("", "") => return Ok(None),
        (inline, "") => ("redis.entry_key", inline.to_owned()),
        ("", path) => (
            "redis.entry_key_file",
            std::fs::read_to_string(path)
                .map_err(|e| invalid("redis.entry_key_file", format!("`{path}`: {e}")))?,
        ),
        _ => {
            return Err(invalid(
                "redis.entry_key",
                "set redis.entry_key or redis.entry_key_file, not both",
            ));
        }
    };
    let text = text.trim();
    if text.len() < MIN_ENTRY_KEY_BYTES {
        return Err(invalid(
            key,
            format!(
                "must hold at least {MIN_ENTRY_KEY_BYTES} bytes (e.g. the output of `openssl rand -hex 32`)"
            ),
        ));
    }
    Ok(Some(EntryKey::new(text.as_bytes())))
}
