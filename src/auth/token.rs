//! Knox tokens: generation, `token_key`, digests and their constant-time comparison.

use sha2::Digest;
use subtle::ConstantTimeEq;

/// `knox.settings.CONSTANTS.TOKEN_KEY_LENGTH`: characters of the token stored in clear.
pub const TOKEN_KEY_LENGTH: usize = 15;

/// `SECURE_HASH_ALGORITHM`: the hash knox feeds the UTF-8 token to. Changing it invalidates
/// every existing token, exactly as in knox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    Sha512,
    Sha384,
    Sha256,
    Sha3_512,
}

impl HashAlgorithm {
    /// Accepts knox's dotted names (`hashlib.sha512`) and bare ones (`sha512`).
    pub fn parse(name: &str) -> Option<Self> {
        match name.strip_prefix("hashlib.").unwrap_or(name) {
            "sha512" => Some(Self::Sha512),
            "sha384" => Some(Self::Sha384),
            "sha256" => Some(Self::Sha256),
            "sha3_512" => Some(Self::Sha3_512),
            _ => None,
        }
    }

    /// Lowercase hex digest of `data`, as Python's `hexdigest()`.
    pub fn hex_digest(self, data: &[u8]) -> String {
        match self {
            Self::Sha512 => hex::encode(sha2::Sha512::digest(data)),
            Self::Sha384 => hex::encode(sha2::Sha384::digest(data)),
            Self::Sha256 => hex::encode(sha2::Sha256::digest(data)),
            Self::Sha3_512 => hex::encode(sha3::Sha3_512::digest(data)),
        }
    }
}

/// The first 15 characters (Unicode scalar values, as a Python `str` slice) of a token.
pub fn token_key_of(token: &str) -> &str {
    match token.char_indices().nth(TOKEN_KEY_LENGTH) {
        Some((end, _)) => &token[..end],
        None => token,
    }
}

/// A token taken from a request, with its lookup key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresentedToken<'a> {
    token: &'a str,
}

impl<'a> PresentedToken<'a> {
    pub fn new(token: &'a str) -> Self {
        Self { token }
    }

    /// The raw token. Never log it.
    pub fn as_str(&self) -> &'a str {
        self.token
    }

    /// The `knox_authtoken.token_key` this token is stored under.
    pub fn key(&self) -> &'a str {
        token_key_of(self.token)
    }

    /// The hex digest knox stores for this token.
    pub fn digest(&self, algorithm: HashAlgorithm) -> String {
        algorithm.hex_digest(self.token.as_bytes())
    }
}

/// Constant-time equality of two hex digests (knox uses `hmac.compare_digest`).
pub fn digests_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A new knox token: `prefix` + lowercase hex of `character_length / 2` bytes from the OS CSPRNG.
pub fn generate_token(prefix: &str, character_length: usize) -> String {
    let mut bytes = vec![0u8; character_length / 2];
    rand::fill(&mut bytes[..]);
    let mut token = String::with_capacity(prefix.len() + bytes.len() * 2);
    token.push_str(prefix);
    token.push_str(&hex::encode(bytes));
    token
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        crate::knox_compat("vectors.json")
    }

    #[test]
    fn generated_vectors_match_knox() {
        let v = vectors();
        let rows = v["generated"].as_array().unwrap();
        assert!(!rows.is_empty());
        for row in rows {
            let alg = HashAlgorithm::parse(row["SECURE_HASH_ALGORITHM"].as_str().unwrap()).unwrap();
            let token = PresentedToken::new(row["token"].as_str().unwrap());
            assert_eq!(token.key(), row["token_key"].as_str().unwrap());
            let digest = token.digest(alg);
            assert_eq!(digest, row["digest"].as_str().unwrap());
            assert!(digests_equal(&digest, row["digest"].as_str().unwrap()));
            if let Some(wrong) = row.get("same_token_key_wrong_tail") {
                let wrong = PresentedToken::new(wrong["token"].as_str().unwrap());
                assert_eq!(wrong.key(), token.key());
                assert!(!digests_equal(&wrong.digest(alg), &digest));
            }
        }
    }

    #[test]
    fn fixed_vectors_match_every_algorithm() {
        let v = vectors();
        let rows = v["fixed"].as_array().unwrap();
        assert!(!rows.is_empty());
        for row in rows {
            let token = PresentedToken::new(row["token"].as_str().unwrap());
            assert_eq!(
                token.key(),
                row["token_key"].as_str().unwrap(),
                "{}",
                row["case"]
            );
            for (name, alg) in [
                ("sha512", HashAlgorithm::Sha512),
                ("sha256", HashAlgorithm::Sha256),
                ("sha3_512", HashAlgorithm::Sha3_512),
            ] {
                assert_eq!(
                    token.digest(alg),
                    row[name].as_str().unwrap(),
                    "{} {name}",
                    row["case"]
                );
            }
        }
    }

    #[test]
    fn long_prefix_token_key_is_first_15_chars() {
        let v = vectors();
        let case = &v["edge_cases"]["TOKEN_PREFIX longer than 10 passed as AuthToken.objects.create(prefix=...)"];
        let token = PresentedToken::new(case["token"].as_str().unwrap());
        assert_eq!(token.key(), case["token_key_stored"].as_str().unwrap());
    }

    #[test]
    fn token_key_counts_characters_not_bytes() {
        assert_eq!(token_key_of("ääääääääääääääää"), "äääääääääääääää");
        assert_eq!(token_key_of("short"), "short");
        assert_eq!(token_key_of(""), "");
    }

    #[test]
    fn generated_tokens_have_knox_shape() {
        let v = vectors();
        for (len, example) in v["edge_cases"]
            ["AUTH_TOKEN_CHARACTER_LENGTH -> generated length (odd values round down)"]
            .as_object()
            .unwrap()
        {
            let len: usize = len.parse().unwrap();
            let t = generate_token("", len);
            assert_eq!(t.len(), example["len"].as_u64().unwrap() as usize);
            assert!(t.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        }
        let t = generate_token("myapp_", 64);
        assert!(t.starts_with("myapp_") && t.len() == 70);
        assert_ne!(generate_token("", 64), generate_token("", 64));
    }

    #[test]
    fn algorithm_names() {
        assert_eq!(
            HashAlgorithm::parse("hashlib.sha512"),
            Some(HashAlgorithm::Sha512)
        );
        assert_eq!(
            HashAlgorithm::parse("sha3_512"),
            Some(HashAlgorithm::Sha3_512)
        );
        assert_eq!(HashAlgorithm::parse("md5"), None);
    }

    #[test]
    fn digest_comparison_rejects_length_mismatch() {
        assert!(!digests_equal("ab", "abc"));
        assert!(digests_equal("", ""));
    }
}
