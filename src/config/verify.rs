//! `[verify]`: where the forward-auth endpoint listens and which identity headers it answers with.

use std::num::NonZeroUsize;

use hyper::header::HeaderName;
use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    value::{header_name, invalid, nonzero, path_prefix},
};

const DEFAULT_PATH: &str = "/verify";
const DEFAULT_USER_ID_HEADER: &str = "X-Auth-User-Id";
/// The names the documentation suggests for the optional identity headers (and the shipped
/// proxy configurations clear on every request, sent or not): an application may read them
/// while knoxgate is not configured to send them, so a client's copy must not reach it.
/// (Lowercase, as `HeaderName::from_static` wants them.)
pub const SUGGESTED_IDENTITY_HEADERS: [&str; 5] = [
    "x-auth-username",
    "x-auth-email",
    "x-auth-user-staff",
    "x-auth-user-superuser",
    "x-auth-user-groups",
];
// Above the longest token of the [knox] settings knoxgate accepts (a 10-character prefix,
// which knox's token_key column holds, and 128 hex characters), so a longer one is refused
// before it costs a hash; a site whose knox issues longer tokens raises it (checked at load
// against [knox]).
const DEFAULT_MAX_TOKEN_CHARS: u64 = 256;

/// `[verify]` as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyFile {
    pub path: String,
    pub user_id_header: String,
    pub username_header: String,
    pub email_header: String,
    pub expiry_header: String,
    pub staff_header: String,
    pub superuser_header: String,
    pub groups_header: String,
    pub allow_cors_preflight: bool,
    pub max_token_chars: u64,
}

impl Default for VerifyFile {
    fn default() -> Self {
        Self {
            path: DEFAULT_PATH.into(),
            user_id_header: DEFAULT_USER_ID_HEADER.into(),
            username_header: String::new(),
            email_header: String::new(),
            expiry_header: String::new(),
            staff_header: String::new(),
            superuser_header: String::new(),
            groups_header: String::new(),
            allow_cors_preflight: false,
            max_token_chars: DEFAULT_MAX_TOKEN_CHARS,
        }
    }
}

/// The forward-auth endpoint and what a 200 carries.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// Path of the endpoint, without a trailing `/`; it and every sub-path answer.
    pub path: String,
    /// Header carrying the user id on every 200.
    pub user_id_header: HeaderName,
    /// Header carrying the username on a 200; `None`: not sent.
    pub username_header: Option<HeaderName>,
    /// Header carrying the email on a 200; `None`: not sent.
    pub email_header: Option<HeaderName>,
    /// Header carrying the token expiry on a 200; `None`: not sent.
    pub expiry_header: Option<HeaderName>,
    /// Per-route policy headers on a 200 (`true`/`false`, and the group names); `None`: not sent.
    pub staff_header: Option<HeaderName>,
    pub superuser_header: Option<HeaderName>,
    pub groups_header: Option<HeaderName>,
    /// Answer CORS preflights with 200 without a token (and without identity headers).
    pub allow_cors_preflight: bool,
    /// Tokens longer than this (in characters) are refused without hashing.
    pub max_token_chars: NonZeroUsize,
}

impl VerifyConfig {
    /// Whether answers carry the username or email, which caches must then keep.
    pub fn needs_identity(&self) -> bool {
        self.username_header.is_some() || self.email_header.is_some()
    }
}

impl TryFrom<VerifyFile> for VerifyConfig {
    type Error = ConfigError;

    fn try_from(file: VerifyFile) -> Result<Self, ConfigError> {
        let path = path_prefix("verify.path", &file.path)?;
        if path == "/" {
            return Err(invalid("verify.path", "must not be `/`"));
        }
        if path.ends_with('/') {
            // Only the exact path reads the policy query: a proxy configured with this string
            // (`/verify/?require=staff`) would send a sub-path, whose query is the client's
            // and ignored, and every valid token would pass a route meant for staff.
            return Err(invalid(
                "verify.path",
                format!(
                    "`{path}`: write it without the trailing `/` (`{}`), and point the proxy \
                     at exactly that path",
                    path.trim_end_matches('/')
                ),
            ));
        }
        let verify = VerifyConfig {
            path,
            user_id_header: header_name("verify.user_id_header", &file.user_id_header)?
                .ok_or_else(|| invalid("verify.user_id_header", "must not be empty"))?,
            username_header: header_name("verify.username_header", &file.username_header)?,
            email_header: header_name("verify.email_header", &file.email_header)?,
            expiry_header: header_name("verify.expiry_header", &file.expiry_header)?,
            staff_header: header_name("verify.staff_header", &file.staff_header)?,
            superuser_header: header_name("verify.superuser_header", &file.superuser_header)?,
            groups_header: header_name("verify.groups_header", &file.groups_header)?,
            allow_cors_preflight: file.allow_cors_preflight,
            max_token_chars: nonzero("verify.max_token_chars", file.max_token_chars)?,
        };
        Ok(verify)
    }
}
