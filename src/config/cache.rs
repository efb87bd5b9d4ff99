//! `[cache]`: how cached answers are kept in step with Postgres, and the bounds of the in-process
//! tier and of the change feed that keeps it fresh.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    value::{self, invalid},
};

const DEFAULT_CONSISTENCY: &str = "notify";
// An entry is estimated at about 370 bytes (integer user id, no identity headers), so 64 MiB
// holds ~180,000 tokens: the byte bound is the one that binds first.
const DEFAULT_MEMORY_MAX_ENTRIES: u64 = 200_000;
const DEFAULT_MEMORY_MAX_BYTES: u64 = 64 * 1024 * 1024;
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
const DEFAULT_FEED_RETENTION: Duration = Duration::from_secs(86_400);
const DEFAULT_FEED_RECONNECT_DELAY: Duration = Duration::from_millis(500);
const DEFAULT_FEED_HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// `[cache]` as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheFile {
    pub consistency: String,
    pub memory_max_entries: u64,
    pub memory_max_bytes: u64,
    #[serde(with = "value::duration")]
    pub negative_ttl: Duration,
    pub stale_if_error: bool,
    #[serde(with = "value::duration")]
    pub feed_retention: Duration,
    #[serde(with = "value::duration")]
    pub feed_reconnect_delay: Duration,
    #[serde(with = "value::duration")]
    pub feed_health_interval: Duration,
}

impl Default for CacheFile {
    fn default() -> Self {
        Self {
            consistency: DEFAULT_CONSISTENCY.into(),
            memory_max_entries: DEFAULT_MEMORY_MAX_ENTRIES,
            memory_max_bytes: DEFAULT_MEMORY_MAX_BYTES,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            stale_if_error: true,
            feed_retention: DEFAULT_FEED_RETENTION,
            feed_reconnect_delay: DEFAULT_FEED_RECONNECT_DELAY,
            feed_health_interval: DEFAULT_FEED_HEALTH_INTERVAL,
        }
    }
}

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

/// The caches' consistency mode and bounds, and the change feed's timings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// How cached answers are kept in step with Postgres.
    pub consistency: Consistency,
    /// Entries the in-process tier holds at most.
    pub memory_max_entries: u64,
    /// Estimated bytes the in-process tier holds at most; 1 turns the tier off.
    pub memory_max_bytes: u64,
    /// How long an unknown token key is remembered as unknown.
    pub negative_ttl: Duration,
    /// Keep serving cached entries while Postgres cannot be reached.
    pub stale_if_error: bool,
    /// Revocation log rows older than this are pruned.
    pub feed_retention: Duration,
    /// Delay before the change-feed listener reconnects.
    pub feed_reconnect_delay: Duration,
    /// How often the listener connection is checked.
    pub feed_health_interval: Duration,
}

impl TryFrom<CacheFile> for CacheConfig {
    type Error = ConfigError;

    fn try_from(file: CacheFile) -> Result<Self, ConfigError> {
        let consistency = match file.consistency.as_str() {
            "notify" => Consistency::Notify,
            "strict" => Consistency::Strict,
            "ttl" => Consistency::Ttl,
            other => {
                return Err(invalid(
                    "cache.consistency",
                    format!("`{other}`: use notify, strict or ttl"),
                ));
            }
        };
        Ok(CacheConfig {
            consistency,
            memory_max_entries: file.memory_max_entries,
            memory_max_bytes: file.memory_max_bytes,
            negative_ttl: file.negative_ttl,
            stale_if_error: file.stale_if_error,
            feed_retention: file.feed_retention,
            feed_reconnect_delay: file.feed_reconnect_delay,
            feed_health_interval: file.feed_health_interval,
        })
    }
}
