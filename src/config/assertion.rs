//! `[assertion]`: the signed identity assertion added to every 200 of `/verify`. Off unless
//! `key_file` is set. The keys are loaded here, so a bad key fails `check-config` too.

use std::{sync::Arc, time::Duration};

use hyper::header::HeaderName;
use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    value::{self, header_name, invalid},
};
use crate::assertion::{self, Settings, Signer};

const DEFAULT_ISSUER: &str = "knoxgate";
const DEFAULT_HEADER: &str = "X-Auth-Assertion";
/// Short enough that a leaked assertion is soon worthless; long enough that a hot token is
/// signed about once a minute.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
/// An assertion is a bearer credential the application believes without asking: one captured
/// on the way is good for its whole lifetime, a revocation notwithstanding. An hour is far
/// past any reason to keep one (knoxgate renews them as they near expiry).
const MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// The least room left on an assertion handed to the application: one with less could lapse
/// before the application checks it.
const MIN_RENEW_BEFORE: Duration = Duration::from_secs(1);

/// `[assertion]` as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssertionFile {
    /// Empty: no assertions.
    pub key_file: String,
    pub verify_only_key_files: Vec<String>,
    /// Empty: the key's RFC 7638 thumbprint.
    pub key_id: String,
    pub audience: String,
    pub issuer: String,
    #[serde(with = "value::duration")]
    pub lifetime: Duration,
    /// Empty: a quarter of `lifetime`.
    pub renew_before: String,
    pub header: String,
}

impl Default for AssertionFile {
    fn default() -> Self {
        Self {
            key_file: String::new(),
            verify_only_key_files: Vec::new(),
            key_id: String::new(),
            audience: String::new(),
            issuer: DEFAULT_ISSUER.into(),
            lifetime: DEFAULT_LIFETIME,
            renew_before: String::new(),
            header: DEFAULT_HEADER.into(),
        }
    }
}

/// Whether and how `/verify` signs the identity it lets through.
#[derive(Debug, Clone)]
pub struct AssertionConfig {
    /// `None`: assertions are off.
    pub signer: Option<Arc<Signer>>,
    /// The assertion's header, known even with assertions off: a client's copy is never to
    /// reach the application as if knoxgate had signed it (gRPC checks remove it).
    pub header: HeaderName,
}

impl TryFrom<AssertionFile> for AssertionConfig {
    type Error = ConfigError;

    fn try_from(file: AssertionFile) -> Result<Self, ConfigError> {
        let header = header_name("assertion.header", &file.header)?
            .ok_or_else(|| invalid("assertion.header", "must not be empty"))?;
        let key_file = file.key_file.trim();
        if key_file.is_empty() {
            return Ok(AssertionConfig {
                signer: None,
                header,
            });
        }
        let audience = file.audience.trim();
        if audience.is_empty() {
            return Err(invalid(
                "assertion.audience",
                "must be set when assertion.key_file is (the application's ASSERTION_AUDIENCE)",
            ));
        }
        if file.issuer.trim().is_empty() {
            return Err(invalid("assertion.issuer", "must not be empty"));
        }
        let lifetime = file.lifetime;
        if lifetime < Duration::from_secs(1) || lifetime.subsec_nanos() != 0 {
            return Err(invalid(
                "assertion.lifetime",
                "must be a whole number of seconds, at least 1s (JWT times are in seconds)",
            ));
        }
        if lifetime > MAX_LIFETIME {
            return Err(invalid(
                "assertion.lifetime",
                "must be at most 1h: a captured assertion is good for its whole lifetime, \
                 whatever is revoked meanwhile",
            ));
        }
        let renew_before = match file.renew_before.trim() {
            "" => lifetime / 4,
            s => value::parse_duration("assertion.renew_before", s)?,
        };
        if renew_before >= lifetime || renew_before < MIN_RENEW_BEFORE {
            return Err(invalid(
                "assertion.renew_before",
                "must be at least 1s and shorter than assertion.lifetime",
            ));
        }
        let key_id = Some(file.key_id.trim()).filter(|k| !k.is_empty());
        let key = assertion::load_signing_key(key_file, key_id)
            .map_err(|e| invalid("assertion.key_file", e.to_string()))?;
        let published = file
            .verify_only_key_files
            .iter()
            .map(|path| assertion::load_published_key(path.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("assertion.verify_only_key_files", e.to_string()))?;
        let settings = Settings {
            audience: audience.to_owned(),
            issuer: file.issuer.trim().to_owned(),
            lifetime,
            renew_before,
            header_name: header.clone(),
        };
        let signer = Signer::new(key, published, settings)
            .map_err(|e| invalid("assertion.verify_only_key_files", e.to_string()))?;
        Ok(AssertionConfig {
            signer: Some(Arc::new(signer)),
            header,
        })
    }
}
