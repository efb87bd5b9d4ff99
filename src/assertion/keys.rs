//! Loading the assertion keys from PEM files: the active signing key (a PKCS#8 private key,
//! Ed25519 or P-256) and the keys published for verification only (public or private PEM).
//!
//! `jsonwebtoken` reads the PEM and makes the published JWK. The signatures themselves are
//! made by `ring` with a key pair built once here: `jsonwebtoken::encode` rebuilds the private
//! key from its DER for every signature (for P-256 that derives the public point, a scalar
//! multiplication), which made a P-256 signature cost about eight times what `ring` takes
//! (`cargo run --release --example sign`).

use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Validation,
    jwk::{Jwk, KeyAlgorithm, PublicKeyUse, ThumbprintHash},
};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair},
};

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "key file {path}: not a PEM Ed25519 or P-256 {what} key ({detail}); make one with \
         `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem`"
    )]
    Unusable {
        path: String,
        what: &'static str,
        detail: String,
    },
    #[error("key file {path}: the key cannot sign: {detail}")]
    CannotSign { path: String, detail: String },
}

/// A signature could not be made: `ring` found no randomness for an ECDSA nonce.
#[derive(Debug, thiserror::Error)]
#[error("the system's random number generator failed")]
pub struct SignError;

/// The private key, parsed once and ready to sign.
enum KeyPair {
    Ed25519(Ed25519KeyPair),
    /// ECDSA signatures need a fresh random nonce each.
    P256(EcdsaKeyPair, SystemRandom),
}

/// The active key: what signs, and its public half as published.
pub struct SigningKey {
    pub(super) algorithm: Algorithm,
    pair: KeyPair,
    /// The public key with `kid`, `alg` and `use` set, as served in the JWKS.
    pub(super) jwk: Jwk,
}

impl std::fmt::Debug for SigningKey {
    // Never prints key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.jwk.common.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn kid(&self) -> &str {
        self.jwk.common.key_id.as_deref().unwrap_or_default()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The JWS signature of `message`: Ed25519's 64 bytes, or ES256's `r ‖ s` (RFC 7518 §3.4).
    pub(super) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        Ok(match &self.pair {
            KeyPair::Ed25519(pair) => pair.sign(message).as_ref().to_vec(),
            KeyPair::P256(pair, rng) => pair
                .sign(rng, message)
                .map_err(|_| SignError)?
                .as_ref()
                .to_vec(),
        })
    }
}

/// The `ring` key pair of a private key `jsonwebtoken` accepted (PKCS#8 DER). The public half
/// is derived from the private one, so a PKCS#8 document without its public key (v1 Ed25519,
/// an EC key exported without it) works too.
fn key_pair(algorithm: Algorithm, key: &EncodingKey) -> Result<KeyPair, String> {
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;
    use p256::elliptic_curve::sec1::ToSec1Point as _;
    let der = key.as_bytes();
    match algorithm {
        Algorithm::EdDSA => {
            let key = ed25519_dalek::SigningKey::from_pkcs8_der(der).map_err(|e| e.to_string())?;
            Ed25519KeyPair::from_seed_and_public_key(key.as_bytes(), key.verifying_key().as_bytes())
                .map(KeyPair::Ed25519)
                .map_err(|e| e.to_string())
        }
        _ => {
            let key = p256::SecretKey::from_pkcs8_der(der).map_err(|e| e.to_string())?;
            let public = key.public_key().to_sec1_point(false);
            let rng = SystemRandom::new();
            EcdsaKeyPair::from_private_key_and_public_key(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &key.to_bytes(),
                public.as_bytes(),
                &rng,
            )
            .map(|pair| KeyPair::P256(pair, rng))
            .map_err(|e| e.to_string())
        }
    }
}

fn read(path: &str) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Fills in what a published key says besides its numbers: id, algorithm, use.
fn publish(mut jwk: Jwk, algorithm: Algorithm, kid: Option<&str>) -> Result<Jwk, String> {
    let kid = match kid {
        Some(k) => k.to_owned(),
        None => jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| e.to_string())?,
    };
    jwk.common.key_id = Some(kid);
    jwk.common.key_algorithm = Some(match algorithm {
        Algorithm::EdDSA => KeyAlgorithm::EdDSA,
        _ => KeyAlgorithm::ES256,
    });
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    Ok(jwk)
}

/// A private key from PEM, with its algorithm and public JWK (no `kid` yet).
fn private_key(pem: &[u8]) -> Result<(Algorithm, EncodingKey, Jwk), String> {
    let mut errors = Vec::new();
    for algorithm in [Algorithm::EdDSA, Algorithm::ES256] {
        let key = match algorithm {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
            _ => EncodingKey::from_ec_pem(pem),
        };
        // The JWK conversion is also what rejects an EC key on another curve than P-256.
        match key.and_then(|k| Jwk::from_encoding_key(&k, algorithm).map(|jwk| (k, jwk))) {
            Ok((key, jwk)) => return Ok((algorithm, key, jwk)),
            Err(e) => errors.push(format!("{algorithm:?}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// Whether `pem` is a SubjectPublicKeyInfo of a point on P-256.
fn is_p256_public_key(pem: &[u8]) -> bool {
    use p256::pkcs8::DecodePublicKey as _;
    pem::parse(pem).is_ok_and(|doc| p256::PublicKey::from_public_key_der(doc.contents()).is_ok())
}

/// A public key from PEM (SubjectPublicKeyInfo), as a JWK without `kid`.
fn public_key(pem: &[u8]) -> Result<(Algorithm, Jwk), String> {
    let mut errors = Vec::new();
    for algorithm in [Algorithm::EdDSA, Algorithm::ES256] {
        let key = match algorithm {
            Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
            _ => DecodingKey::from_ec_pem(pem),
        };
        match key.and_then(|k| Jwk::from_decoding_key(&k, Some(algorithm))) {
            Ok(jwk) => {
                // jsonwebtoken labels any EC public key P-256: the key itself must say so.
                let on_p256 = algorithm != Algorithm::ES256 || is_p256_public_key(pem);
                if on_p256 {
                    return Ok((algorithm, jwk));
                }
                errors.push(format!(
                    "{algorithm:?}: an EC key on another curve than P-256"
                ));
            }
            Err(e) => errors.push(format!("{algorithm:?}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// Loads the active signing key from `path`; `kid` overrides its RFC 7638 thumbprint.
///
/// The key signs once here and the signature is checked with the published JWK, so that a
/// key the signer cannot use, or whose published half would not verify what it signs, fails
/// at startup rather than on the first request.
pub fn load_signing_key(path: &str, kid: Option<&str>) -> Result<SigningKey, KeyError> {
    let pem = read(path)?;
    let (algorithm, key, jwk) = private_key(&pem).map_err(|detail| KeyError::Unusable {
        path: path.to_owned(),
        what: "private (PKCS#8)",
        detail,
    })?;
    let cannot_sign = |detail: String| KeyError::CannotSign {
        path: path.to_owned(),
        detail,
    };
    let jwk = publish(jwk, algorithm, kid).map_err(cannot_sign)?;
    let key = SigningKey {
        algorithm,
        pair: key_pair(algorithm, &key).map_err(cannot_sign)?,
        jwk,
    };
    self_check(&key).map_err(cannot_sign)?;
    Ok(key)
}

/// Signs a probe and verifies it with the published JWK, through `jsonwebtoken`.
fn self_check(key: &SigningKey) -> Result<(), String> {
    let header = super::header_segment(key);
    let message = format!("{header}.e30"); // `{}`
    let signature = key.sign(message.as_bytes()).map_err(|e| e.to_string())?;
    let jws = super::compact(message, &signature);
    let decoding = DecodingKey::from_jwk(&key.jwk).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(key.algorithm);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<serde_json::Value>(&jws, &decoding, &validation)
        .map(drop)
        .map_err(|e| format!("the published key does not verify its signature: {e}"))
}

/// Loads a key published for verification only (a previous or next key), public or private
/// PEM; its `kid` is its RFC 7638 thumbprint.
pub fn load_published_key(path: &str) -> Result<Jwk, KeyError> {
    let pem = read(path)?;
    let unusable = |detail| KeyError::Unusable {
        path: path.to_owned(),
        what: "public or private",
        detail,
    };
    let (algorithm, jwk) = match public_key(&pem) {
        Ok(found) => found,
        Err(public) => match private_key(&pem) {
            Ok((algorithm, _, jwk)) => (algorithm, jwk),
            Err(private) => return Err(unusable(format!("{public}; {private}"))),
        },
    };
    publish(jwk, algorithm, None).map_err(unusable)
}
