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

    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> TokenDigest {
        match self {
            Self::Sha512 => TokenDigest::from_bytes(&sha2::Sha512::digest(data)),
            Self::Sha384 => TokenDigest::from_bytes(&sha2::Sha384::digest(data)),
            Self::Sha256 => TokenDigest::from_bytes(&sha2::Sha256::digest(data)),
            Self::Sha3_512 => TokenDigest::from_bytes(&sha3::Sha3_512::digest(data)),
        }
    }

    /// Lowercase hex digest of `data`, as Python's `hexdigest()`: what knox stores.
    pub fn hex_digest(self, data: &[u8]) -> String {
        self.digest(data).to_hex()
    }
}

/// Bytes in the longest supported digest (SHA-512, SHA3-512).
const MAX_DIGEST_BYTES: usize = 64;

/// A digest in binary: half the size of its hex text, and compared without encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenDigest {
    len: u8,
    bytes: [u8; MAX_DIGEST_BYTES],
}

impl TokenDigest {
    fn from_bytes(digest: &[u8]) -> Self {
        let mut bytes = [0; MAX_DIGEST_BYTES];
        bytes[..digest.len()].copy_from_slice(digest);
        Self {
            len: digest.len() as u8,
            bytes,
        }
    }

    /// Parses knox's text form: lowercase hex only, as `hexdigest()` writes it. Anything else
    /// (upper case, odd length, too long) is `None`, because knox would compare it as text
    /// and no computed digest could ever equal it.
    pub fn from_hex(text: &str) -> Option<Self> {
        fn nibble(c: u8) -> Option<u8> {
            match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            }
        }
        let text = text.as_bytes();
        if !text.len().is_multiple_of(2) || text.len() > 2 * MAX_DIGEST_BYTES {
            return None;
        }
        let mut bytes = [0; MAX_DIGEST_BYTES];
        for (out, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *out = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Self {
            len: (text.len() / 2) as u8,
            bytes,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Lowercase hex, as knox stores it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.as_bytes())
    }

    /// Constant-time equality (knox uses `hmac.compare_digest`).
    pub fn ct_eq(&self, other: &TokenDigest) -> bool {
        self.len == other.len && bool::from(self.as_bytes().ct_eq(other.as_bytes()))
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A `knox_authtoken.digest` value as read from Postgres or a Redis entry, held compactly.
///
/// Knox writes lowercase hex, kept here in binary. Any other text is kept verbatim so that it
/// round-trips unchanged, and it matches nothing, just as knox's text comparison against a
/// computed `hexdigest()` would.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum StoredDigest {
    Hex(TokenDigest),
    Other(Box<str>),
}

impl StoredDigest {
    pub fn parse(text: &str) -> Self {
        match TokenDigest::from_hex(text) {
            Some(d) => Self::Hex(d),
            None => Self::Other(text.into()),
        }
    }

    /// The stored text, exactly as read.
    pub fn to_text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Self::Hex(d) => d.to_hex().into(),
            Self::Other(text) => text.as_ref().into(),
        }
    }

    /// Whether a presented token's digest equals this one, in constant time.
    pub fn matches(&self, digest: &TokenDigest) -> bool {
        match self {
            Self::Hex(d) => d.ct_eq(digest),
            Self::Other(_) => false,
        }
    }
}

impl From<TokenDigest> for StoredDigest {
    fn from(digest: TokenDigest) -> Self {
        Self::Hex(digest)
    }
}

impl std::fmt::Debug for StoredDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hex(d) => d.fmt(f),
            Self::Other(text) => text.fmt(f),
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

    /// The digest knox stores (in hex) for this token.
    pub fn digest(&self, algorithm: HashAlgorithm) -> TokenDigest {
        algorithm.digest(self.token.as_bytes())
    }
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
            assert_eq!(digest.to_hex(), row["digest"].as_str().unwrap());
            let stored = StoredDigest::parse(row["digest"].as_str().unwrap());
            assert!(matches!(stored, StoredDigest::Hex(_)));
            assert_eq!(stored.to_text(), row["digest"].as_str().unwrap());
            assert!(stored.matches(&digest));
            if let Some(wrong) = row.get("same_token_key_wrong_tail") {
                let wrong = PresentedToken::new(wrong["token"].as_str().unwrap());
                assert_eq!(wrong.key(), token.key());
                assert!(!stored.matches(&wrong.digest(alg)));
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
                    token.digest(alg).to_hex(),
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
        let short = TokenDigest::from_hex("ab").unwrap();
        let long = TokenDigest::from_hex("ab00").unwrap();
        assert!(!short.ct_eq(&long) && !long.ct_eq(&short));
        assert!(short.ct_eq(&TokenDigest::from_hex("ab").unwrap()));
        let empty = TokenDigest::from_hex("").unwrap();
        assert!(empty.ct_eq(&empty) && !empty.ct_eq(&short));
    }

    #[test]
    fn stored_digests_other_than_lowercase_hex_round_trip_and_never_match() {
        let digest = HashAlgorithm::Sha512.digest(b"token");
        let upper = digest.to_hex().to_uppercase();
        let too_long = "a".repeat(130);
        for text in [upper.as_str(), "abc", "zz", too_long.as_str(), "é1"] {
            let stored = StoredDigest::parse(text);
            assert!(matches!(stored, StoredDigest::Other(_)), "{text}");
            assert_eq!(stored.to_text(), text);
            assert!(!stored.matches(&digest));
        }
        let stored = StoredDigest::parse(&digest.to_hex());
        assert!(stored.matches(&digest));
        assert_eq!(stored, StoredDigest::from(digest));
    }
}
