//! Generated hostile input for every parser that sees untrusted bytes: the `Authorization`
//! header, Basic credentials, Redis cache entries, change-feed payloads and password hashes.
//! Each must return an answer — never panic, never allow what it should not.

use knoxgate::{
    auth::{Credential, DenyReason, parse_authorization, parse_basic},
    password::check_password,
    store::change::parse_payload,
    store::payload,
};
use rand::RngExt;

/// Cases per parser; bounded so the suite stays fast.
const CASES: usize = 50_000;

const ALPHABET: &[u8] =
    b"Token BASICbasic token \t\r\n\x0b\x0c:=+/{}\"\\,|$!0123456789abcdef\xff\xfe\xc3\xa4";

fn hostile(rng: &mut impl rand::Rng, max: usize) -> Vec<u8> {
    let len = rng.random_range(0..max);
    (0..len)
        .map(|_| {
            if rng.random_bool(0.8) {
                ALPHABET[rng.random_range(0..ALPHABET.len())]
            } else {
                rng.random()
            }
        })
        .collect()
}

#[test]
fn authorization_parsing_never_panics_and_tokens_have_no_whitespace() {
    let mut rng = rand::rng();
    for _ in 0..CASES {
        let bytes = hostile(&mut rng, 120);
        match parse_authorization(&[&bytes], "Token") {
            Credential::Token(t) => {
                assert!(!t.is_empty());
                assert!(
                    !t.bytes()
                        .any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
                );
                // The word before it was the keyword, case-insensitively.
                let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
                assert!(text.trim_start().starts_with("token"));
            }
            Credential::Refused(r) => assert!(matches!(
                r,
                DenyReason::NoCredentials
                    | DenyReason::NoToken
                    | DenyReason::TokenHasSpaces
                    | DenyReason::InvalidToken
            )),
        }
    }
}

#[test]
fn basic_parsing_never_panics() {
    let mut rng = rand::rng();
    for _ in 0..CASES {
        let bytes = hostile(&mut rng, 120);
        if let Ok(c) = parse_basic(Some(&bytes)) {
            assert!(!c.username.contains(':'));
        }
    }
}

#[test]
fn cache_entries_never_panic_and_garbage_is_a_miss() {
    let mut rng = rand::rng();
    let valid = r#"{"schema_version": 2, "digest": "ab12", "user_id": 7, "created": "2026-11-25T04:05:50.083570+00:00", "expiry": null, "token_key": "0123456789abcde"}"#;
    assert!(payload::decode("0123456789abcde", valid, false).is_some());
    for _ in 0..CASES {
        // Mutate a valid entry: flip, insert or delete a few bytes.
        let mut bytes = valid.as_bytes().to_vec();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..bytes.len());
            match rng.random_range(0..3) {
                0 => bytes[i] = rng.random(),
                1 => bytes.insert(i, ALPHABET[rng.random_range(0..ALPHABET.len())]),
                _ => {
                    bytes.remove(i);
                }
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Some(row) = payload::decode("0123456789abcde", &text, false) {
            // Whatever was accepted still names this key and carries a hex digest.
            assert_eq!(row.token_key, "0123456789abcde");
            assert!(row.digest.to_text().bytes().all(|b| b.is_ascii_hexdigit()));
        }
        let _ = parse_payload(&text);
    }
}

#[test]
fn hostile_password_hashes_are_refused_quickly() {
    let mut rng = rand::rng();
    let started = std::time::Instant::now();
    for _ in 0..2_000 {
        let prefix = [
            "pbkdf2_sha256$",
            "argon2$argon2id$",
            "bcrypt_sha256$$2b$",
            "scrypt$",
            "md5$",
            "!",
            "",
        ][rng.random_range(0..7)];
        let tail = String::from_utf8_lossy(&hostile(&mut rng, 80)).into_owned();
        assert!(!check_password("password", &format!("{prefix}{tail}")));
    }
    // Absurd costs are refused before any work is done.
    assert!(!check_password("x", "pbkdf2_sha256$4000000000$salt$AAAA"));
    assert!(!check_password("x", "scrypt$1073741824$salt$8$1$AAAA"));
    assert!(!check_password(
        "x",
        "argon2$argon2id$v=19$m=4000000,t=2,p=8$c2FsdHNhbHQ$AAAA"
    ));
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}
