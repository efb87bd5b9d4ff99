//! `[cache]`: how cached answers are kept in step with Postgres, and the bounds of the in-process
//! tier and of the change feed that keeps it fresh.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    value::{self, invalid, positive},
};

const DEFAULT_CONSISTENCY: &str = "notify";
// An entry is estimated at about 370 bytes (integer user id, no identity headers), so 64 MiB
// holds ~180,000 tokens: the byte bound is the one that binds first.
const DEFAULT_MEMORY_MAX_ENTRIES: u64 = 200_000;
const DEFAULT_MEMORY_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Far above a primary-key query's usual milliseconds, and well inside the 0.5 s that the
/// shipped Envoy, Istio and Contour configurations give a check.
const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_millis(250);
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
const DEFAULT_FEED_RETENTION: Duration = Duration::from_secs(86_400);
const DEFAULT_FEED_RECONNECT_DELAY: Duration = Duration::from_millis(500);
const DEFAULT_FEED_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_FEED_ECHO_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_FEED: &str = "listen";
const DEFAULT_FEED_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_FEED_RELAY_TIMEOUT: Duration = Duration::from_secs(3);
// At a few hundred bytes an entry, ~30 MB of Redis memory; at 1,000 revocations a second, over a
// minute and a half of events for a subscriber that reconnects.
const DEFAULT_FEED_STREAM_MAX_LEN: u64 = 100_000;
/// The stream must hold two reads' worth (an instance reads 512 entries at once): an instance
/// tells a read that skipped trimmed entries by the full batch it returns, and one relay's batch
/// of appends (512 at most) never trims past an instance that is caught up.
pub const MIN_FEED_STREAM_MAX_LEN: u64 = 1024;
// Well above what tokens presented in the few milliseconds before their INSERT is heard cost,
// and a small load on Postgres per instance (×instances for a fleet).
const DEFAULT_UNKNOWN_KEY_LOOKUPS_PER_SECOND: u32 = 50;

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
    pub confirm_timeout: Duration,
    #[serde(with = "value::duration")]
    pub feed_retention: Duration,
    #[serde(with = "value::duration")]
    pub feed_reconnect_delay: Duration,
    #[serde(with = "value::duration")]
    pub feed_health_interval: Duration,
    #[serde(with = "value::duration")]
    pub feed_echo_timeout: Duration,
    pub feed: String,
    #[serde(with = "value::duration")]
    pub feed_heartbeat_interval: Duration,
    #[serde(with = "value::duration")]
    pub feed_relay_timeout: Duration,
    pub feed_stream_max_len: u64,
    pub key_filter: bool,
    pub unknown_key_lookups_per_second: u32,
}

impl Default for CacheFile {
    fn default() -> Self {
        Self {
            consistency: DEFAULT_CONSISTENCY.into(),
            memory_max_entries: DEFAULT_MEMORY_MAX_ENTRIES,
            memory_max_bytes: DEFAULT_MEMORY_MAX_BYTES,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            stale_if_error: true,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            feed_retention: DEFAULT_FEED_RETENTION,
            feed_reconnect_delay: DEFAULT_FEED_RECONNECT_DELAY,
            feed_health_interval: DEFAULT_FEED_HEALTH_INTERVAL,
            feed_echo_timeout: DEFAULT_FEED_ECHO_TIMEOUT,
            feed: DEFAULT_FEED.into(),
            feed_heartbeat_interval: DEFAULT_FEED_HEARTBEAT_INTERVAL,
            feed_relay_timeout: DEFAULT_FEED_RELAY_TIMEOUT,
            feed_stream_max_len: DEFAULT_FEED_STREAM_MAX_LEN,
            key_filter: true,
            unknown_key_lookups_per_second: DEFAULT_UNKNOWN_KEY_LOOKUPS_PER_SECOND,
        }
    }
}

/// Where an instance hears about changes (with `consistency = "notify"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedSource {
    /// Its own `LISTEN` connection to Postgres (`postgres.feed_url`).
    Listen,
    /// The Redis stream that `knoxgate relay` processes fill from their `LISTEN` connections.
    Redis,
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
    /// How long a request whose answer is already known waits for Postgres: with
    /// `stale_if_error`, a cached answer's confirmation (then served unconfirmed); an expired
    /// token's deletion (the 401 is sent, the delete carries on). A Postgres that hangs would
    /// otherwise hold the request past its deadline, and the answer would be lost to a 503.
    /// A request with less than twice this left waits half of what it has left
    /// (`crate::deadline`).
    pub confirm_timeout: Duration,
    /// Revocation log rows older than this are pruned.
    pub feed_retention: Duration,
    /// Delay before the change-feed listener reconnects.
    pub feed_reconnect_delay: Duration,
    /// How often the listener connection is checked.
    pub feed_health_interval: Duration,
    /// How long the feed's own NOTIFY may take to come back before it is reported deaf.
    pub feed_echo_timeout: Duration,
    /// Where this instance hears about changes.
    pub feed: FeedSource,
    /// How often a live relay says so on the stream (each time once its listener connection has
    /// answered a query).
    pub feed_heartbeat_interval: Duration,
    /// With `feed = "redis"`: how long without a relay's heartbeat before cached answers are
    /// confirmed with Postgres (the longest a change can go unheard when every relay is gone).
    pub feed_relay_timeout: Duration,
    /// Entries the relays keep in the stream (approximate trim): how far back a subscriber that
    /// reconnects can resume. At least [`MIN_FEED_STREAM_MAX_LEN`].
    pub feed_stream_max_len: u64,
    /// Keep a filter of the token keys that exist while the feed is live, and refuse keys it
    /// does not hold without a query once `unknown_key_lookups_per_second` is spent.
    pub key_filter: bool,
    /// Lookups per second (per instance) of keys the filter does not hold that still go to
    /// Redis and Postgres; bursts of a second's worth.
    pub unknown_key_lookups_per_second: u32,
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
        let feed = match file.feed.as_str() {
            "listen" => FeedSource::Listen,
            "redis" => FeedSource::Redis,
            other => {
                return Err(invalid(
                    "cache.feed",
                    format!("`{other}`: use listen or redis"),
                ));
            }
        };
        if file.feed_heartbeat_interval.is_zero() {
            return Err(invalid(
                "cache.feed_heartbeat_interval",
                "must be greater than 0",
            ));
        }
        if file.feed_relay_timeout <= file.feed_heartbeat_interval {
            return Err(invalid(
                "cache.feed_relay_timeout",
                format!(
                    "{:?} must be longer than cache.feed_heartbeat_interval ({:?}), or every \
                     instance would take the relays for gone between two heartbeats",
                    file.feed_relay_timeout, file.feed_heartbeat_interval
                ),
            ));
        }
        if file.feed_stream_max_len < MIN_FEED_STREAM_MAX_LEN {
            return Err(invalid(
                "cache.feed_stream_max_len",
                format!("must be at least {MIN_FEED_STREAM_MAX_LEN}"),
            ));
        }
        Ok(CacheConfig {
            consistency,
            memory_max_entries: file.memory_max_entries,
            memory_max_bytes: file.memory_max_bytes,
            negative_ttl: file.negative_ttl,
            stale_if_error: file.stale_if_error,
            confirm_timeout: positive("cache.confirm_timeout", file.confirm_timeout)?,
            feed_retention: positive("cache.feed_retention", file.feed_retention)?,
            feed_reconnect_delay: positive(
                "cache.feed_reconnect_delay",
                file.feed_reconnect_delay,
            )?,
            feed_health_interval: positive(
                "cache.feed_health_interval",
                file.feed_health_interval,
            )?,
            feed_echo_timeout: positive("cache.feed_echo_timeout", file.feed_echo_timeout)?,
            feed,
            feed_heartbeat_interval: file.feed_heartbeat_interval,
            feed_relay_timeout: file.feed_relay_timeout,
            feed_stream_max_len: file.feed_stream_max_len,
            key_filter: file.key_filter,
            unknown_key_lookups_per_second: file.unknown_key_lookups_per_second,
        })
    }
}
