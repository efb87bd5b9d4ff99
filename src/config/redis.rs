//! `[redis]`: the shared Redis tier (django-rest-knox-redis's key layout), its client pool and
//! the deadlines and circuit breaker that keep a slow Redis from slowing `/verify`.

use std::{num::NonZeroUsize, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    value::{self, invalid, nonzero},
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
        }
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
        if file.max_cache_ttl < MIN_MAX_CACHE_TTL {
            return Err(invalid("redis.max_cache_ttl", "must be at least 1s"));
        }
        Ok(RedisConfig {
            url,
            key_prefix: file.key_prefix,
            max_cache_ttl: file.max_cache_ttl,
            command_timeout: file.command_timeout,
            connect_timeout: file.connect_timeout,
            pool_size: nonzero("redis.pool_size", file.pool_size)?,
            reconnect_max_delay: file.reconnect_max_delay,
            unresponsive_timeout: file.unresponsive_timeout,
            breaker_cooldown: file.breaker_cooldown,
        })
    }
}
