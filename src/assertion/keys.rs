//! Loading the assertion keys from PEM files: the active signing key (a PKCS#8 private key,
//! Ed25519 or P-256) and the keys published for verification only (public or private PEM).

use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header,
    jwk::{Jwk, KeyAlgorithm, PublicKeyUse, ThumbprintHash},
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

/// The active key: what signs, and its public half as published.
pub struct SigningKey {
    pub(super) algorithm: Algorithm,
    pub(super) key: EncodingKey,
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
                let on_p256 = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(p) => {
                        p.curve == jsonwebtoken::jwk::EllipticCurve::P256
                    }
                    _ => true,
                };
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
/// The key signs once here, so that a key the signer cannot use fails at startup rather than
/// on the first request.
pub fn load_signing_key(path: &str, kid: Option<&str>) -> Result<SigningKey, KeyError> {
    let pem = read(path)?;
    let (algorithm, key, jwk) = private_key(&pem).map_err(|detail| KeyError::Unusable {
        path: path.to_owned(),
        what: "private (PKCS#8)",
        detail,
    })?;
    let jwk = publish(jwk, algorithm, kid).map_err(|detail| KeyError::CannotSign {
        path: path.to_owned(),
        detail,
    })?;
    jsonwebtoken::encode(&Header::new(algorithm), &serde_json::json!({}), &key).map_err(|e| {
        KeyError::CannotSign {
            path: path.to_owned(),
            detail: e.to_string(),
        }
    })?;
    Ok(SigningKey {
        algorithm,
        key,
        jwk,
    })
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
