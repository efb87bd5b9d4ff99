//! `[knox]`: django-rest-knox's `REST_KNOX` settings, which must equal Django's for tokens to be
//! read and written alike on both sides.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    value::{self, invalid},
};
use crate::auth::{ExpiryFormat, HashAlgorithm};

/// knox's `MAXIMUM_TOKEN_PREFIX_LENGTH`.
pub const MAX_TOKEN_PREFIX_CHARS: usize = 10;

// The defaults are knox's own, so that an unconfigured knoxgate agrees with an unconfigured
// Django project.
const DEFAULT_AUTH_HEADER_PREFIX: &str = "Token";
const DEFAULT_HASH_ALGORITHM: &str = "sha512";
const DEFAULT_TOKEN_CHARACTER_LENGTH: u64 = 64;
const DEFAULT_TOKEN_TTL: Option<Duration> = Some(Duration::from_secs(10 * 3600));
const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
// DRF's default DATETIME_FORMAT: knox's EXPIRY_DATETIME_FORMAT defaults to the site's
// DATETIME_FORMAT, which defaults to this.
const DEFAULT_EXPIRY_DATETIME_FORMAT: &str = "iso-8601";

/// `[knox]` as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KnoxFile {
    pub auth_header_prefix: String,
    pub hash_algorithm: String,
    pub token_prefix: String,
    pub token_character_length: u64,
    #[serde(with = "value::optional_duration")]
    pub token_ttl: Option<Duration>,
    pub token_limit_per_user: u64,
    pub auto_refresh: bool,
    #[serde(with = "value::optional_duration")]
    pub auto_refresh_max_ttl: Option<Duration>,
    #[serde(with = "value::duration")]
    pub min_refresh_interval: Duration,
    pub expiry_datetime_format: String,
}

impl Default for KnoxFile {
    fn default() -> Self {
        Self {
            auth_header_prefix: DEFAULT_AUTH_HEADER_PREFIX.into(),
            hash_algorithm: DEFAULT_HASH_ALGORITHM.into(),
            token_prefix: String::new(),
            token_character_length: DEFAULT_TOKEN_CHARACTER_LENGTH,
            token_ttl: DEFAULT_TOKEN_TTL,
            token_limit_per_user: 0,
            auto_refresh: false,
            auto_refresh_max_ttl: None,
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            expiry_datetime_format: DEFAULT_EXPIRY_DATETIME_FORMAT.into(),
        }
    }
}

/// How tokens are presented, hashed, minted and refreshed, as knox does it.
#[derive(Debug, Clone)]
pub struct KnoxConfig {
    /// `AUTH_HEADER_PREFIX`: the keyword before the token in `Authorization`.
    pub auth_header_prefix: String,
    /// `SECURE_HASH_ALGORITHM`: how token digests are computed.
    pub hash_algorithm: HashAlgorithm,
    /// `TOKEN_PREFIX` for tokens knoxgate creates.
    pub token_prefix: String,
    /// `AUTH_TOKEN_CHARACTER_LENGTH`: hex characters of a new token's random part.
    pub token_character_length: usize,
    /// `TOKEN_TTL`: lifetime of new tokens; `None`: they never expire.
    pub token_ttl: Option<Duration>,
    /// `TOKEN_LIMIT_PER_USER`: unexpired tokens a user may hold; `None`: no limit.
    pub token_limit_per_user: Option<u64>,
    /// `AUTO_REFRESH`: extend a token's expiry when it is used.
    pub auto_refresh: bool,
    /// `AUTO_REFRESH_MAX_TTL`: cap on a refreshed expiry, counted from creation.
    pub auto_refresh_max_ttl: Option<Duration>,
    /// `MIN_REFRESH_INTERVAL`: a refresh is written only when it moves expiry by more than this.
    pub min_refresh_interval: Duration,
    /// `EXPIRY_DATETIME_FORMAT`: how the login response shows the expiry.
    pub expiry_format: ExpiryFormat,
}

impl KnoxConfig {
    /// Characters of the tokens knoxgate issues: the prefix, then the random part's hex
    /// (`token_character_length` rounded down to even, as knox does).
    pub fn issued_token_chars(&self) -> usize {
        self.token_prefix.chars().count() + self.token_character_length / 2 * 2
    }
}

impl TryFrom<KnoxFile> for KnoxConfig {
    type Error = ConfigError;

    fn try_from(file: KnoxFile) -> Result<Self, ConfigError> {
        let hash_algorithm = HashAlgorithm::parse(&file.hash_algorithm).ok_or_else(|| {
            invalid(
                "knox.hash_algorithm",
                "use sha512 (knox's default), sha384, sha256 or sha3_512",
            )
        })?;
        if file.token_prefix.chars().count() > MAX_TOKEN_PREFIX_CHARS {
            return Err(invalid(
                "knox.token_prefix",
                "knox allows at most 10 characters",
            ));
        }
        // /verify splits the Authorization header at whitespace (as knox does): a token holding
        // some would be refused, and a control character cannot go in a header at all.
        if file
            .token_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "knox.token_prefix",
                "must hold no whitespace or control characters: tokens carrying them would be \
                 refused by /verify",
            ));
        }
        if file.auth_header_prefix.is_empty()
            || file
                .auth_header_prefix
                .bytes()
                .any(|b| b.is_ascii_whitespace() || !b.is_ascii_graphic())
        {
            return Err(invalid(
                "knox.auth_header_prefix",
                "must be one printable ASCII word",
            ));
        }
        if !(2..=128).contains(&file.token_character_length) {
            return Err(invalid(
                "knox.token_character_length",
                "must be between 2 and 128",
            ));
        }
        Ok(KnoxConfig {
            auth_header_prefix: file.auth_header_prefix,
            hash_algorithm,
            token_prefix: file.token_prefix,
            token_character_length: file.token_character_length as usize,
            token_ttl: match file.token_ttl {
                // Tokens would be expired as they are issued; "none" is knox's TOKEN_TTL = None.
                Some(ttl) if ttl.is_zero() => {
                    return Err(invalid(
                        "knox.token_ttl",
                        "must be greater than 0 (\"none\" for tokens that never expire)",
                    ));
                }
                ttl => ttl,
            },
            token_limit_per_user: (file.token_limit_per_user > 0)
                .then_some(file.token_limit_per_user),
            auto_refresh: file.auto_refresh,
            auto_refresh_max_ttl: file.auto_refresh_max_ttl,
            min_refresh_interval: file.min_refresh_interval,
            expiry_format: ExpiryFormat::parse(&file.expiry_datetime_format)
                .map_err(|e| invalid("knox.expiry_datetime_format", e))?,
        })
    }
}
