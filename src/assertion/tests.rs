use std::{cell::Cell, io::Write as _};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

use super::*;

// Test-only keys.
const ED_A: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIAGfyG3AtW/aB6C7uycUyDAFu0SdTzo2GK/VTglpgRoi
-----END PRIVATE KEY-----
";
const ED_A_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAhSvn4NNIr25doNk6Ty7DLFO5PCHczJz4QspXcQV67RI=
-----END PUBLIC KEY-----
";
const ED_B: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIGCBo3J9hp6kGIMbcYeMm8GYCyvfZWNAietdCsi6gSew
-----END PRIVATE KEY-----
";
const P256: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgqarbRMRICdgg5s64
fuyJTWfDhz8EA4aYoq9TaYXIkZ6hRANCAAT6e8o7Yfd1+tpTiPw8pUK0LreM3gwR
5WMVbKXbldqS8CFxxYT3IdJfhwWL7gU691gUygcMbcpfGlzmR20vygV0
-----END PRIVATE KEY-----
";
const P256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE+nvKO2H3dfraU4j8PKVCtC63jN4M
EeVjFWyl25XakvAhccWE9yHSX4cFi+4FOvdYFMoHDG3KXxpc5kdtL8oFdA==
-----END PUBLIC KEY-----
";
/// A P-256 PKCS#8 key exported without its public point (`openssl ec -no_public`).
const P256_NO_PUBLIC: &str = "-----BEGIN PRIVATE KEY-----
MEECAQAwEwYHKoZIzj0CAQYIKoZIzj0DAQcEJzAlAgEBBCA/QT7mcR8X2Hkb0fUx
PnOqCCutHFe0Cwya/8/1B2sCeA==
-----END PRIVATE KEY-----
";
const P256_NO_PUBLIC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEpAWqT6/bjW+tcWH+iV3KP5Vo/Wv4
KTn8Z8fuD0MbLBB4nQCCDiS4twwyv8R/8X7/10YYMsQU82HdC+LeMhdZSw==
-----END PUBLIC KEY-----
";
/// Public keys on curves other than P-256 (secp256k1, P-384).
const K1_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFYwEAYHKoZIzj0CAQYFK4EEAAoDQgAEgUnJrDH3bCoHesGwP7IeSU5y7rWsEGhH
jzZteHziBMbIzae8iqQMWeBTvt/Ae80BZZMRTqT8TBqGC64K8bQLbw==
-----END PUBLIC KEY-----
";
const P384_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEO5Jk5pLJ0g60mapmBbYmjSphT7Mx84hj
Pm98yJ5/meMkB94EFAgN25Ynl5Wkf/YmiE3mLM9Kx65Tz7Yq4mp6k5omaYjO3P/Y
4YViMA99YHI1t8NnU5fYyEBaI/c4dDjY
-----END PUBLIC KEY-----
";
const P384: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDB4CGMLO+5CVcLrPBzK
boxWTVwfYrUh8+eWcUBkb9HEaHm+ZVwAFaHBj7Shw5z2jRehZANiAAQtPGzyoMw4
hQ4og3EB+Iv2KkXyLNVqsYWpCjgGdP7vBhWKlyxEmjGvivkCFP06eNqmc/FKqTTg
p5GE01kEs/WrDrXGWzwyCG2bpnPAxoG0jl2/rHkJ0jOPVvwwOBelpV0=
-----END PRIVATE KEY-----
";

/// A PEM in a temporary file, kept alive with its path.
fn pem_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn path(f: &tempfile::NamedTempFile) -> &str {
    f.path().to_str().unwrap()
}

fn settings(lifetime: u64, renew_before: u64) -> Settings {
    Settings {
        audience: "api".into(),
        issuer: "knoxgate".into(),
        lifetime: Duration::from_secs(lifetime),
        renew_before: Duration::from_secs(renew_before),
        header_name: HeaderName::from_static("x-auth-assertion"),
    }
}

fn signer(pem: &str, published: &[&str]) -> Signer {
    let f = pem_file(pem);
    let key = load_signing_key(path(&f), None).unwrap();
    let published = published
        .iter()
        .map(|p| load_published_key(path(&pem_file(p))).unwrap())
        .collect();
    Signer::new(key, published, settings(60, 15)).unwrap()
}

#[derive(Debug, serde::Deserialize, PartialEq)]
struct Seen {
    iss: String,
    sub: String,
    aud: String,
    iat: i64,
    exp: i64,
    username: Option<String>,
    email: Option<String>,
    is_staff: Option<bool>,
    is_superuser: Option<bool>,
}

/// Verifies `jws` with the key of the signer's JWKS its `kid` names, as a relying party does.
fn verify_with_jwks(jwks: &JwkSet, jws: &str) -> Seen {
    let header = decode_header(jws).unwrap();
    let kid = header.kid.expect("a kid");
    let jwk = jwks.find(&kid).expect("the kid is published");
    let key = DecodingKey::from_jwk(jwk).unwrap();
    let mut v = Validation::new(header.alg);
    v.set_audience(&["api"]);
    v.set_issuer(&["knoxgate"]);
    v.set_required_spec_claims(&["exp", "iat", "sub", "aud", "iss"]);
    // The tests sign at fixed instants in the past; the signature and claims are what count.
    v.validate_exp = false;
    decode::<Seen>(jws, &key, &v).unwrap().claims
}

const NOW_MS: i64 = 1_800_000_000_500;

fn sign_once(s: &Signer, user_id: &str, now_ms: i64) -> String {
    let slot = Slot::default();
    let v = s
        .assertion(&slot, 0, &Subject::id(user_id), None, now_ms, || {})
        .unwrap();
    v.to_str().unwrap().to_owned()
}

#[test]
fn ed25519_assertion_verifies_with_the_published_key_and_says_who() {
    let s = signer(ED_A, &[]);
    let jws = sign_once(&s, "42", NOW_MS);
    let header = decode_header(&jws).unwrap();
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), Some(s.kid()));
    assert_eq!(
        verify_with_jwks(s.jwks(), &jws),
        Seen {
            iss: "knoxgate".into(),
            sub: "42".into(),
            aud: "api".into(),
            iat: 1_800_000_000,
            exp: 1_800_000_060,
            username: None,
            email: None,
            is_staff: None,
            is_superuser: None,
        }
    );
}

#[test]
fn es256_assertion_verifies_with_the_published_key() {
    let s = signer(P256, &[]);
    let jws = sign_once(&s, "7", NOW_MS);
    assert_eq!(decode_header(&jws).unwrap().alg, Algorithm::ES256);
    assert_eq!(verify_with_jwks(s.jwks(), &jws).sub, "7");
}

#[test]
fn an_es256_signature_is_r_and_s_and_the_header_names_alg_kid_and_typ() {
    let s = signer(P256, &[]);
    let jws = sign_once(&s, "7", NOW_MS);
    let segments: Vec<&str> = jws.split('.').collect();
    assert_eq!(segments.len(), 3, "{jws}");
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(segments[0])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        header,
        serde_json::json!({"typ": "JWT", "alg": "ES256", "kid": s.kid()})
    );
    let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segments[2])
        .unwrap();
    // RFC 7518 §3.4: the fixed-width r ‖ s, not DER.
    assert_eq!(signature.len(), 64);
    // ECDSA draws a fresh nonce: two signatures of one message differ and both verify.
    let again = sign_once(&s, "7", NOW_MS);
    assert_ne!(again, jws);
    assert_eq!(verify_with_jwks(s.jwks(), &again).sub, "7");
}

#[test]
fn a_p256_key_without_its_public_point_signs_what_its_published_key_verifies() {
    let s = signer(P256_NO_PUBLIC, &[]);
    let public = load_published_key(path(&pem_file(P256_NO_PUBLIC_PUBLIC))).unwrap();
    assert_eq!(s.kid(), public.common.key_id.as_deref().unwrap());
    let jws = sign_once(&s, "11", NOW_MS);
    assert_eq!(
        verify_with_jwks(&JwkSet { keys: vec![public] }, &jws).sub,
        "11"
    );
}

#[test]
fn a_signature_from_another_key_does_not_verify() {
    let a = signer(ED_A, &[]);
    let b = signer(ED_B, &[]);
    let jws = sign_once(&b, "1", NOW_MS);
    let jwk = &a.jwks().keys[0];
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&["api"]);
    v.validate_exp = false;
    assert!(decode::<Seen>(&jws, &DecodingKey::from_jwk(jwk).unwrap(), &v).is_err());
}

#[test]
fn the_jwks_publishes_only_public_halves_with_kid_alg_and_use() {
    let s = signer(P256, &[ED_A]);
    let doc: serde_json::Value = serde_json::from_slice(&s.jwks_json()).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["crv"], "P-256");
    assert_eq!(keys[0]["alg"], "ES256");
    assert_eq!(keys[0]["use"], "sig");
    assert_eq!(keys[0]["kid"], s.kid());
    assert_eq!(keys[1]["kty"], "OKP");
    assert_eq!(keys[1]["crv"], "Ed25519");
    assert_eq!(keys[1]["alg"], "EdDSA");
    for k in keys {
        assert!(k.get("d").is_none(), "no private part: {k}");
    }
}

#[test]
fn the_default_key_id_is_the_rfc7638_thumbprint() {
    // RFC 8037 appendix A.3: this Ed25519 public key's SHA-256 thumbprint.
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
        .unwrap();
    let mut spki = hex::decode("302a300506032b6570032100").unwrap();
    spki.extend_from_slice(&x);
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    let jwk = load_published_key(path(&pem_file(&pem))).unwrap();
    assert_eq!(
        jwk.common.key_id.as_deref(),
        Some("kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k")
    );
}

#[test]
fn a_public_and_a_private_pem_of_one_key_publish_the_same_jwk() {
    for (private, public) in [(ED_A, ED_A_PUBLIC), (P256, P256_PUBLIC)] {
        let from_private = load_published_key(path(&pem_file(private))).unwrap();
        let from_public = load_published_key(path(&pem_file(public))).unwrap();
        assert_eq!(from_private, from_public);
        let active = load_signing_key(path(&pem_file(private)), None).unwrap();
        assert_eq!(active.kid(), from_public.common.key_id.as_deref().unwrap());
    }
}

#[test]
fn a_configured_key_id_replaces_the_thumbprint() {
    let key = load_signing_key(path(&pem_file(ED_A)), Some("2026-11")).unwrap();
    let s = Signer::new(key, vec![], settings(60, 15)).unwrap();
    let jws = sign_once(&s, "1", NOW_MS);
    assert_eq!(decode_header(&jws).unwrap().kid.as_deref(), Some("2026-11"));
    assert_eq!(verify_with_jwks(s.jwks(), &jws).sub, "1");
}

#[test]
fn unusable_keys_are_refused_with_the_file_named() {
    for bad in [P384, "not a pem", ED_A_PUBLIC] {
        let f = pem_file(bad);
        let e = load_signing_key(path(&f), None).unwrap_err().to_string();
        assert!(e.contains(path(&f)), "{e}");
        assert!(e.contains("Ed25519 or P-256"), "{e}");
    }
    for bad in [P384, "not a pem", K1_PUBLIC, P384_PUBLIC] {
        let f = pem_file(bad);
        let e = load_published_key(path(&f)).unwrap_err().to_string();
        assert!(e.contains(path(&f)), "{e}");
    }
    let e = load_signing_key("/nonexistent/key.pem", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/key.pem"), "{e}");
}

#[test]
fn a_key_published_twice_is_refused() {
    let key = load_signing_key(path(&pem_file(ED_A)), None).unwrap();
    let same = load_published_key(path(&pem_file(ED_A_PUBLIC))).unwrap();
    let e = Signer::new(key, vec![same], settings(60, 15)).unwrap_err();
    assert!(matches!(e, SignerError::SigningKeyListed(_)), "{e}");
    assert!(
        e.to_string()
            .contains("remove it from verify_only_key_files"),
        "{e}"
    );
    // Two different keys under one configured id.
    let key = load_signing_key(path(&pem_file(ED_A)), Some("k")).unwrap();
    let other = signer(ED_B, &[]).jwks().keys[0].clone();
    let mut other = other;
    other.common.key_id = Some("k".into());
    let e = Signer::new(key, vec![other], settings(60, 15)).unwrap_err();
    assert!(matches!(e, SignerError::DuplicateKid(_)), "{e}");
}

#[test]
fn rotation_keeps_the_previous_key_verifiable() {
    let old = signer(ED_A, &[]);
    let before = sign_once(&old, "5", NOW_MS);
    // The new key signs; the old one is still published under its own id.
    let new = signer(P256, &[ED_A_PUBLIC]);
    assert_ne!(new.kid(), old.kid());
    assert_eq!(verify_with_jwks(new.jwks(), &before).sub, "5");
    let after = sign_once(&new, "5", NOW_MS);
    assert_eq!(
        decode_header(&after).unwrap().kid.as_deref(),
        Some(new.kid())
    );
    assert_eq!(verify_with_jwks(new.jwks(), &after).sub, "5");
}

#[test]
fn a_kept_assertion_is_reused_until_renew_before_its_expiry() {
    let s = signer(ED_A, &[]);
    let slot = Slot::default();
    let signatures = Cell::new(0);
    let at = |now_ms| {
        s.assertion(&slot, 0, &Subject::id("9"), None, now_ms, || {
            signatures.set(signatures.get() + 1)
        })
        .unwrap()
    };
    let first = at(NOW_MS);
    // Lifetime 60 s from iat 1_800_000_000, renewed 15 s before: reused up to 1_800_000_045.
    assert_eq!(at(NOW_MS + 1_000), first);
    assert_eq!(at(1_800_000_044_999), first);
    assert_eq!(signatures.get(), 1);
    let renewed = at(1_800_000_045_000);
    assert_ne!(renewed, first);
    assert_eq!(signatures.get(), 2);
    let seen = verify_with_jwks(s.jwks(), renewed.to_str().unwrap());
    assert_eq!((seen.iat, seen.exp), (1_800_000_045, 1_800_000_105));
    assert_eq!(at(1_800_000_046_000), renewed);
    assert_eq!(signatures.get(), 2);
}

#[test]
fn a_kept_assertion_is_not_served_before_its_iat_after_the_clock_steps_back() {
    let s = signer(ED_A, &[]);
    let slot = Slot::default();
    let at = |now_ms| {
        s.assertion(&slot, 0, &Subject::id("9"), None, now_ms, || {})
            .unwrap()
    };
    // Signed while the clock was 10 minutes ahead, then asked again once it was put right.
    let ahead = at(NOW_MS + 600_000);
    let now = at(NOW_MS);
    assert_ne!(
        now, ahead,
        "an assertion issued in the future is not served"
    );
    let seen = verify_with_jwks(s.jwks(), now.to_str().unwrap());
    assert_eq!(seen.iat, NOW_MS / 1000);
    // Within the second it was issued in, it is still that one.
    assert_eq!(at(NOW_MS + 999), now);
}

#[test]
fn the_attributes_sent_as_headers_are_signed_beside_the_id() {
    let s = signer(ED_A, &[]);
    let subject = Subject {
        user_id: "7",
        username: Some("ålice"),
        email: Some("alice@example.com"),
        is_staff: Some(true),
        is_superuser: Some(false),
    };
    let jws = s
        .assertion(&Slot::default(), 0, &subject, None, NOW_MS, || {})
        .unwrap();
    let seen = verify_with_jwks(s.jwks(), jws.to_str().unwrap());
    assert_eq!(seen.sub, "7");
    assert_eq!(seen.username.as_deref(), Some("ålice"));
    assert_eq!(seen.email.as_deref(), Some("alice@example.com"));
    assert_eq!(
        (seen.is_staff, seen.is_superuser),
        (Some(true), Some(false))
    );

    // Attributes not sent are not signed either: the registered claims only.
    let bare = sign_once(&s, "7", NOW_MS);
    let payload = bare.split('.').nth(1).unwrap();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&payload).unwrap();
    let mut names: Vec<&str> = claims.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["aud", "exp", "iat", "iss", "sub"]);
}

#[test]
fn another_row_of_the_entry_gets_its_own_assertion() {
    let s = signer(ED_A, &[]);
    let slot = Slot::default();
    let a = s
        .assertion(&slot, 0, &Subject::id("1"), None, NOW_MS, || {})
        .unwrap();
    let b = s
        .assertion(&slot, 1, &Subject::id("2"), None, NOW_MS, || {})
        .unwrap();
    assert_eq!(verify_with_jwks(s.jwks(), a.to_str().unwrap()).sub, "1");
    assert_eq!(verify_with_jwks(s.jwks(), b.to_str().unwrap()).sub, "2");
}

#[test]
fn an_assertion_never_outlives_its_token() {
    let s = signer(ED_A, &[]);
    let slot = Slot::default();
    let token_expiry = time::OffsetDateTime::from_unix_timestamp(1_800_000_010).unwrap();
    let signatures = Cell::new(0);
    let at = |now_ms| {
        s.assertion(
            &slot,
            0,
            &Subject::id("3"),
            Some(token_expiry),
            now_ms,
            || signatures.set(signatures.get() + 1),
        )
        .unwrap()
    };
    let first = at(NOW_MS);
    assert_eq!(
        verify_with_jwks(s.jwks(), first.to_str().unwrap()).exp,
        1_800_000_010
    );
    // Reused for as long as the token lasts, not re-signed on every request near its end.
    assert_eq!(at(1_800_000_009_000), first);
    assert_eq!(signatures.get(), 1);
}
