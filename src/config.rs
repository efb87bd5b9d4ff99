//! Configuration: one TOML file, overridden by `KNOXGATE_*` environment variables, validated into
//! a typed [`Config`] at startup.
//!
//! Every key lives in a section (`[server]`, `[verify]`, `[knox]`, `[sessions]`, `[postgres]`,
//! `[redis]`, `[cache]`, `[log]`, `[tracing]`, `[assertion]`). Its environment variable is
//! `KNOXGATE_<SECTION>_<KEY>` upper-cased, except `[server]` keys, which drop the section (`KNOXGATE_LISTEN`). Durations
//! carry units (`250ms`, `5s`, `10m`, `10h`, `1d`); optional ones accept `none`. Unknown keys,
//! unknown variables and bad values fail with a message naming the key.
//! `config/knoxgate.toml` documents every key with its default.
//!
//! Each section has a module holding its defaults, the section as written (`*File`, durations
//! already typed) and as used (`*Config`), and the conversion between them. Adding a key touches
//! that module and `config/knoxgate.toml`, nothing else.

mod assertion;
mod cache;
mod env;
mod knox;
mod log;
mod postgres;
mod redis;
mod server;
mod sessions;
mod tracing;
mod value;
mod verify;

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};

pub use assertion::{AssertionConfig, AssertionFile};
pub use cache::{CacheConfig, CacheFile, Consistency, FeedSource, MIN_FEED_STREAM_MAX_LEN};
pub use knox::{KnoxConfig, KnoxFile, MAX_TOKEN_PREFIX_CHARS};
pub use log::{LogConfig, LogFile, LogFormat};
pub use postgres::{GroupTables, PostgresConfig, PostgresFile, UserColumns};
pub use redis::{EntryKey, RedisConfig, RedisFile, RedisTls};
pub use server::{ServerConfig, ServerFile};
pub use sessions::{SessionsConfig, SessionsFile};
pub use tracing::{TracingConfig, TracingFile};
pub use value::parse_duration;
pub use verify::{SUGGESTED_IDENTITY_HEADERS, VerifyConfig, VerifyFile};

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
    pub tracing: TracingFile,
    pub assertion: AssertionFile,
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
    pub tracing: TracingConfig,
    pub assertion: AssertionConfig,
}

impl TryFrom<FileConfig> for Config {
    type Error = ConfigError;

    /// Turns the file's values into typed ones, naming the key of the first bad value.
    fn try_from(file: FileConfig) -> Result<Config, ConfigError> {
        let config = Config {
            server: file.server.try_into()?,
            verify: file.verify.try_into()?,
            knox: file.knox.try_into()?,
            sessions: file.sessions.try_into()?,
            postgres: file.postgres.try_into()?,
            redis: file.redis.try_into()?,
            cache: file.cache.try_into()?,
            log: file.log.try_into()?,
            tracing: file.tracing.try_into()?,
            assertion: file.assertion.try_into()?,
        };
        if config.cache.feed == FeedSource::Redis {
            if config.redis.url.is_none() {
                return Err(value::invalid(
                    "cache.feed",
                    "`redis` needs redis.url: the relays publish changes there",
                ));
            }
            if config.cache.consistency != Consistency::Notify {
                return Err(value::invalid(
                    "cache.feed",
                    "`redis` is a change feed: it goes with cache.consistency = \"notify\"",
                ));
            }
        }
        config.check_deadlines()?;
        config.check_names()?;
        config.check_token_length()?;
        config.check_groups()?;
        // The replay at each (re)connect reads the log back over the cache window: rows pruned
        // before that would be changes a reconnecting instance never hears of.
        let replayed = config.log_read_window();
        if config.cache.feed_retention < replayed {
            return Err(value::invalid(
                "cache.feed_retention",
                format!(
                    "must be at least the larger of redis.max_cache_ttl and \
                     cache.feed_relay_timeout, plus 60s ({replayed:?}): the feed's replay reads \
                     the revocation log back that far"
                ),
            ));
        }
        Ok(config)
    }
}

/// How far before the cache window (`redis.max_cache_ttl`) the feed's replay reaches, for
/// transactions whose trigger ran well before their COMMIT (the log stamps trigger time).
const REPLAY_SLACK: Duration = Duration::from_secs(60);

impl Config {
    /// How far back the change feed replays the revocation log's removals at each (re)connect,
    /// and how long a revocation keeps Redis entries from being trusted: every entry written
    /// before it has expired by then.
    pub fn replay_window(&self) -> Duration {
        self.redis.max_cache_ttl + REPLAY_SLACK
    }
    /// How far back a relay's replay reads the log's INSERTs (which only key filters need),
    /// a relay having last heartbeated on the stream `quiet` ago (`None`: unknown). A relay
    /// appends what it hears as it hears it and heartbeats only while it hears, so an INSERT
    /// logged before a heartbeat is already on the stream (the slack covers transactions
    /// committed well after their trigger ran, and changes still queued behind the heartbeat):
    /// a relay back from a gap of any length replays only those since. Capped at the longer of
    /// the removals' window and `cache.feed_relay_timeout`, plus the slack: instances see a
    /// longer silence (their feeds go down, and come back with the key filter reloaded); an
    /// unknown `quiet` gets the cap.
    pub fn insert_replay_window(&self, quiet: Option<Duration>) -> Duration {
        let cap = self.log_read_window();
        quiet.map_or(cap, |quiet| quiet.saturating_add(REPLAY_SLACK).min(cap))
    }
    /// How far back a replay reads the log at all, which `cache.feed_retention` must cover:
    /// the longer of the removals' window and `cache.feed_relay_timeout` plus the slack (see
    /// [`Config::insert_replay_window`]).
    pub fn log_read_window(&self) -> Duration {
        self.replay_window()
            .max(self.cache.feed_relay_timeout + REPLAY_SLACK)
    }
    /// Limits that only make sense against each other.
    fn check_deadlines(&self) -> Result<(), ConfigError> {
        // The request deadline cancels a login first: a longer queueing time could never fire,
        // and a flood of logins would end in deadline 503s instead of prompt "busy" ones.
        if self.sessions.hash_queue_timeout >= self.server.request_timeout {
            return Err(value::invalid(
                "sessions.hash_queue_timeout",
                format!(
                    "must be less than server.request_timeout ({:?}), the whole budget of a login",
                    self.server.request_timeout
                ),
            ));
        }
        // A confirmation that may run to the deadline would turn the stale answer it guards
        // into a 503.
        if self.cache.confirm_timeout >= self.server.request_timeout {
            return Err(value::invalid(
                "cache.confirm_timeout",
                format!(
                    "must be less than server.request_timeout ({:?}), or a Postgres that hangs \
                     turns cached answers into deadline 503s before stale_if_error can serve them",
                    self.server.request_timeout
                ),
            ));
        }
        // A margin as long as knoxgate's own deadline is a deadline misread as the room kept
        // before the caller's.
        if self.server.grpc_deadline_margin >= self.server.request_timeout {
            return Err(value::invalid(
                "server.grpc_deadline_margin",
                format!(
                    "must be less than server.request_timeout ({:?}): it is the room kept \
                     before the caller's deadline, not a deadline",
                    self.server.request_timeout
                ),
            ));
        }
        Ok(())
    }

    /// Names that must not collide: each identity header carries one thing (two of them under
    /// one name would send the last one set as the other, a username as a user id), none is a
    /// header HTTP or knoxgate's own answers need, and no session endpoint is the verify path or
    /// under it (the verify path is matched first, so a logout there would be a `/verify` that
    /// revokes nothing).
    fn check_names(&self) -> Result<(), ConfigError> {
        const RESERVED: &[&str] = &[
            "authorization",
            "connection",
            "content-length",
            "content-type",
            "date",
            "host",
            "keep-alive",
            "retry-after",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "www-authenticate",
        ];
        let v = &self.verify;
        let named = [
            ("verify.user_id_header", Some(&v.user_id_header)),
            ("verify.username_header", v.username_header.as_ref()),
            ("verify.email_header", v.email_header.as_ref()),
            ("verify.expiry_header", v.expiry_header.as_ref()),
            ("verify.staff_header", v.staff_header.as_ref()),
            ("verify.superuser_header", v.superuser_header.as_ref()),
            ("verify.groups_header", v.groups_header.as_ref()),
            ("assertion.header", Some(&self.assertion.header)),
        ];
        let named: Vec<_> = named
            .into_iter()
            .filter_map(|(key, name)| Some((key, name?)))
            .collect();
        for (i, (key, name)) in named.iter().enumerate() {
            if RESERVED.contains(&name.as_str()) {
                return Err(value::invalid(
                    key,
                    format!("`{name}` is a header HTTP or knoxgate's answers already use"),
                ));
            }
            if let Some((other, _)) = named[..i].iter().find(|(_, n)| n == name) {
                return Err(value::invalid(
                    key,
                    format!("`{name}` is {other} already: each identity header needs its own name"),
                ));
            }
        }
        // The verify route takes the verify path and everything under it; a session endpoint
        // takes `base_path` + its name, with any number of trailing `/`.
        let under_verify = format!("{}/", v.path);
        let verify_takes = |p: &str| p == v.path || p.starts_with(&under_verify);
        if self.sessions.enabled && self.sessions.base_path.starts_with(&under_verify) {
            return Err(value::invalid(
                "sessions.base_path",
                format!(
                    "`{}` is under verify.path (`{}`), which is matched first: login and \
                     logout would never be reached",
                    self.sessions.base_path, v.path
                ),
            ));
        }
        if self.sessions.enabled {
            for name in ["login", "logout", "logoutall"] {
                let endpoint = format!("{}{name}", self.sessions.base_path);
                if verify_takes(&endpoint) || verify_takes(&format!("{endpoint}/")) {
                    return Err(value::invalid(
                        "verify.path",
                        format!(
                            "`{}` takes the session endpoint `{endpoint}/` (sessions.base_path \
                             + {name}), and verify.path is matched first: a {name} there would \
                             be a /verify that does nothing",
                            v.path
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A groups header with groups not read would send every user's groups as none.
    fn check_groups(&self) -> Result<(), ConfigError> {
        if self.verify.groups_header.is_some() && self.postgres.groups.is_none() {
            return Err(value::invalid(
                "verify.groups_header",
                "needs groups, which are not read (postgres.user_groups_table is empty)",
            ));
        }
        Ok(())
    }

    /// The tokens knoxgate issues (and Django, with the same `[knox]` settings) must pass
    /// `/verify`'s length cap.
    fn check_token_length(&self) -> Result<(), ConfigError> {
        let issued = self.knox.issued_token_chars();
        if self.verify.max_token_chars.get() < issued {
            return Err(value::invalid(
                "verify.max_token_chars",
                format!(
                    "must be at least {issued}, the length of the tokens knox issues \
                     (knox.token_prefix + knox.token_character_length): shorter, every token \
                     would be refused"
                ),
            ));
        }
        Ok(())
    }

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
        env::apply(&mut table, env)?;
        // The path tracker names the key when a typed value (a duration, say) does not parse.
        let file: FileConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                let message = e.into_inner().message().to_owned();
                ConfigError::Invalid { key, message }
            })?;
        file.try_into()
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
        Self::from_toml_and_env(&text, env::utf8_vars(std::env::vars_os())?)
    }
}

#[cfg(test)]
mod tests;
