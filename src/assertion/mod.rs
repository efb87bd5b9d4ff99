//! The signed identity assertion: a short-lived compact JWS (EdDSA or ES256) naming the user a
//! `/verify` answer lets through, so that the application behind the proxy can tell an identity
//! knoxgate vouched for from a header someone else set.
//!
//! Pure logic, no I/O after startup: loading the keys ([`keys`]), signing the claims, building
//! the JWKS document served on the admin port, and reusing one signed assertion per cached
//! token. A hot `/verify` must not sign: the assertion is kept in a [`Slot`] beside the cache
//! entry the token came from and reused until `renew_before` of its expiry. It goes when the
//! entry goes (revocation, eviction, expiry), so a revoked token's assertion is never served
//! again. A kept assertion holds about 400 bytes beside its entry; `cache.memory_max_entries`
//! bounds how many there are (the entry's byte estimate does not include it).

pub mod keys;

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwapOption;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hyper::header::{HeaderName, HeaderValue};
use jsonwebtoken::{Header, jwk::JwkSet};
use serde::Serialize;

pub use keys::{KeyError, SignError, SigningKey, load_published_key, load_signing_key};

/// What signs assertions, and the JWKS it publishes.
#[derive(Debug)]
pub struct Signer {
    key: SigningKey,
    /// `{"alg":…,"kid":…,"typ":"JWT"}` as its JWS segment: the same for every assertion.
    header_segment: String,
    audience: String,
    issuer: String,
    lifetime: Duration,
    renew_before: Duration,
    /// Where the assertion goes on a 200.
    pub header_name: HeaderName,
    /// The active key first, then the verify-only ones.
    jwks: JwkSet,
    /// The JWKS document as served.
    jwks_json: bytes::Bytes,
}

/// Settings of a [`Signer`] besides its keys.
#[derive(Debug, Clone)]
pub struct Settings {
    pub audience: String,
    pub issuer: String,
    /// How long an assertion is valid (whole seconds, at least one).
    pub lifetime: Duration,
    /// A kept assertion is replaced once it is this close to its expiry (below `lifetime`).
    pub renew_before: Duration,
    pub header_name: HeaderName,
}

/// Why the signer cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("key id `{0}` is used by two keys; every published key needs its own id")]
    DuplicateKid(String),
    #[error(
        "key `{0}` is listed twice: once signing (key_file) and once in verify_only_key_files; \
         the signing key is published anyway, so remove it from verify_only_key_files"
    )]
    SigningKeyListed(String),
}

/// Whom an assertion names: the user id (`sub`) and, signed beside it, the attributes `[verify]`
/// also sends as headers, so that the application can believe those without reading its
/// database (`None`: not sent, so not signed either).
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Subject<'a> {
    #[serde(rename = "sub")]
    pub user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_staff: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_superuser: Option<bool>,
}

impl<'a> Subject<'a> {
    /// A subject with the user id only.
    pub fn id(user_id: &'a str) -> Self {
        Subject {
            user_id,
            ..Subject::default()
        }
    }
}

/// The claims of an assertion: the registered ones and the subject's attributes.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    iss: &'a str,
    #[serde(flatten)]
    subject: &'a Subject<'a>,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

/// A signed assertion and when to stop reusing it.
#[derive(Debug)]
struct Signed {
    /// The row of the cache entry it names (entries nearly always hold one).
    row: usize,
    /// Unix time in milliseconds from which it is signed afresh.
    renew_at_ms: i64,
    /// Its `iat`, in milliseconds: before it (the clock stepped back) it is not served, as its
    /// verifiers would take it for one issued in the future.
    issued_at_ms: i64,
    value: HeaderValue,
}

/// The assertion kept for one cache entry. Read without a lock; replaced whole.
#[derive(Default)]
pub struct Slot(ArcSwapOption<Signed>);

impl Slot {
    /// Keeps what `other` keeps: for an entry that replaces another with the same rows (a
    /// hit confirmed with Postgres), whose assertion still says what it says.
    pub fn keep_from(&self, other: &Slot) {
        self.0.store(other.0.load_full());
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl Signer {
    /// A signer with `key` active and `published` served beside it for verification only.
    pub fn new(
        key: SigningKey,
        published: Vec<jsonwebtoken::jwk::Jwk>,
        settings: Settings,
    ) -> Result<Signer, SignerError> {
        let mut keys = vec![key.jwk.clone()];
        for jwk in published {
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            if let Some(same_id) = keys
                .iter()
                .find(|k| k.common.key_id.as_deref() == Some(&kid))
            {
                // The next key made active without taking it out of the verify-only list.
                return Err(if same_id.algorithm == jwk.algorithm {
                    SignerError::SigningKeyListed(kid)
                } else {
                    SignerError::DuplicateKid(kid)
                });
            }
            keys.push(jwk);
        }
        let jwks = JwkSet { keys };
        let jwks_json = serde_json::to_vec(&jwks).expect("a JWKS serialises").into();
        Ok(Signer {
            header_segment: header_segment(&key),
            key,
            audience: settings.audience,
            issuer: settings.issuer,
            lifetime: settings.lifetime,
            renew_before: settings.renew_before,
            header_name: settings.header_name,
            jwks,
            jwks_json,
        })
    }

    /// The id of the key that signs.
    pub fn kid(&self) -> &str {
        self.key.kid()
    }

    /// The published keys.
    pub fn jwks(&self) -> &JwkSet {
        &self.jwks
    }

    /// The JWKS document served at `/.well-known/jwks.json`.
    pub fn jwks_json(&self) -> bytes::Bytes {
        self.jwks_json.clone()
    }

    /// Signs a fresh assertion for `subject` at `now_ms` (Unix milliseconds), valid for the
    /// configured lifetime but never past the token's own expiry (Unix seconds). Returns the
    /// compact JWS and the time from which it should be renewed.
    fn sign(
        &self,
        subject: &Subject<'_>,
        token_expiry: Option<i64>,
        now_ms: i64,
    ) -> Result<(String, i64), SignError> {
        let iat = now_ms.div_euclid(1000);
        let lifetime = self.lifetime.as_secs() as i64;
        let exp = token_expiry.map_or(iat + lifetime, |t| t.min(iat + lifetime));
        let claims = Claims {
            iss: &self.issuer,
            subject,
            aud: &self.audience,
            iat,
            exp,
        };
        let claims = serde_json::to_vec(&claims).expect("the claims serialise");
        let mut message = String::with_capacity(self.header_segment.len() + 2 * claims.len());
        message.push_str(&self.header_segment);
        message.push('.');
        URL_SAFE_NO_PAD.encode_string(&claims, &mut message);
        let signature = self.key.sign(message.as_bytes())?;
        let jws = compact(message, &signature);
        let renew_at_ms = (iat + lifetime) * 1000 - self.renew_before.as_millis() as i64;
        // A token that expires first: the assertion lasts as long as the token can be used.
        Ok((jws, renew_at_ms.min(exp * 1000)))
    }

    /// The assertion for row `row` of the cache entry holding `slot`: the kept one while it
    /// is not due for renewal, else a new one (kept for the next request). `signed` is called
    /// once per signature made. The subject's attributes come from the entry's row, so a kept
    /// assertion names the same ones until the entry goes.
    pub fn assertion(
        &self,
        slot: &Slot,
        row: usize,
        subject: &Subject<'_>,
        token_expiry: Option<time::OffsetDateTime>,
        now_ms: i64,
        signed: impl FnOnce(),
    ) -> Result<HeaderValue, SignError> {
        if let Some(kept) = &*slot.0.load()
            && kept.row == row
            && (kept.issued_at_ms..kept.renew_at_ms).contains(&now_ms)
        {
            return Ok(kept.value.clone());
        }
        let (jws, renew_at_ms) = self.sign(
            subject,
            token_expiry.map(time::OffsetDateTime::unix_timestamp),
            now_ms,
        )?;
        signed();
        // base64url and dots only: always a valid header value.
        let value = HeaderValue::from_str(&jws).expect("a compact JWS is a valid header value");
        slot.0.store(Some(Arc::new(Signed {
            row,
            renew_at_ms,
            issued_at_ms: now_ms.div_euclid(1000) * 1000,
            value: value.clone(),
        })));
        Ok(value)
    }
}

/// The JWS header segment of every assertion `key` signs: `{"typ":"JWT","alg":…,"kid":…}`.
fn header_segment(key: &SigningKey) -> String {
    let mut header = Header::new(key.algorithm);
    header.kid = Some(key.kid().to_owned());
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("a JWS header serialises"))
}

/// The compact serialisation (RFC 7515 §7.1) of a signed `header.payload` message.
fn compact(mut message: String, signature: &[u8]) -> String {
    message.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut message);
    message
}

/// The current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_millis() as i64
}

#[cfg(test)]
mod tests;
