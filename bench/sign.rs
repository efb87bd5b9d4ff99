//! What one assertion signature costs knoxgate: `Signer::assertion` renewing an assertion (the
//! work of a `/verify` that finds its kept assertion due), against `jsonwebtoken::encode` of
//! the same claims with the same key, which is what signing cost before the key was prepared
//! once at startup.
//!
//!     cargo run --release --example sign [-- --signatures 2000 --rounds 3]
//!
//! Needs nothing but `openssl` (to make a P-256 and an Ed25519 key in a temporary directory).
//! Prints a markdown table.
//!
//! Method: for each key, `--rounds` interleaved rounds of `--signatures` signatures by each
//! way, one thread, wall time per signature (the loop does nothing else). Every renewal is
//! forced by advancing the clock past the kept assertion's renewal point; the last signature of
//! each way in each round must verify with the published JWK, so that neither way is measured
//! making something other than a valid assertion.

#[path = "args.rs"]
mod args;

use std::{process::Command, time::Instant};

use hyper::header::HeaderName;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use knoxgate::assertion::{Settings, Signer, Slot, Subject, load_signing_key};

fn settings() -> Settings {
    Settings {
        audience: "api".into(),
        issuer: "knoxgate".into(),
        lifetime: std::time::Duration::from_secs(60),
        renew_before: std::time::Duration::from_secs(15),
        header_name: HeaderName::from_static("x-auth-assertion"),
    }
}

/// Checks that `jws` verifies with the first key of the signer's JWKS.
fn check(signer: &Signer, jws: &str) {
    let key = DecodingKey::from_jwk(&signer.jwks().keys[0]).expect("a JWK");
    let header = jsonwebtoken::decode_header(jws).expect("a JWS header");
    let mut v = Validation::new(header.alg);
    v.set_audience(&["api"]);
    v.validate_exp = false;
    jsonwebtoken::decode::<serde_json::Value>(jws, &key, &v).expect("the signature verifies");
}

fn main() {
    let signatures = args::number::<usize>("--signatures", 2000).max(1);
    let rounds = args::number::<usize>("--rounds", 3).max(1);
    let dir = tempfile::tempdir().expect("a temporary directory");
    println!("| key | round | `Signer::assertion` µs | `jsonwebtoken::encode` µs | ratio |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (label, genpkey) in [
        (
            "P-256 (ES256)",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
        ),
        ("Ed25519 (EdDSA)", &["-algorithm", "ed25519"][..]),
    ] {
        let path = dir.path().join("key.pem");
        let status = Command::new("openssl")
            .arg("genpkey")
            .args(genpkey)
            .arg("-out")
            .arg(&path)
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl genpkey failed");
        let pem = std::fs::read(&path).expect("the key file");
        let path = path.to_str().expect("a UTF-8 path");
        let signer = Signer::new(
            load_signing_key(path, None).expect("a key"),
            vec![],
            settings(),
        )
        .expect("a signer");
        let algorithm = jsonwebtoken::decode_header(
            signer
                .assertion(&Slot::default(), 0, &Subject::id("1"), None, 0, || {})
                .expect("a signature")
                .to_str()
                .expect("ASCII"),
        )
        .expect("a header")
        .alg;
        let encoding = match algorithm {
            jsonwebtoken::Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_ec_pem(&pem),
        }
        .expect("the same key for jsonwebtoken");
        let mut header = Header::new(algorithm);
        header.kid = Some(signer.kid().to_owned());
        let (mut prepared, mut rebuilt) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            // Renewed every time: each call is 60 s after the previous one.
            let slot = Slot::default();
            let started = Instant::now();
            let mut last = None;
            for i in 0..signatures {
                let now_ms = 1_800_000_000_000 + i as i64 * 60_000;
                last = Some(signer.assertion(&slot, 0, &Subject::id("2179"), None, now_ms, || {}));
            }
            let a = started.elapsed().as_secs_f64() * 1e6 / signatures as f64;
            check(&signer, last.unwrap().unwrap().to_str().unwrap());

            let started = Instant::now();
            let mut last = String::new();
            for i in 0..signatures {
                let iat = 1_800_000_000 + i as i64 * 60;
                let claims = serde_json::json!({
                    "iss": "knoxgate", "sub": "2179", "aud": "api", "iat": iat, "exp": iat + 60,
                });
                last = jsonwebtoken::encode(&header, &claims, &encoding).expect("a JWS");
            }
            let b = started.elapsed().as_secs_f64() * 1e6 / signatures as f64;
            check(&signer, &last);
            println!("| {label} | {round} | {a:.1} | {b:.1} | {:.1}× |", b / a);
            prepared.push(a);
            rebuilt.push(b);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (a, b) = (median(&mut prepared), median(&mut rebuilt));
        println!("| {label} | median | {a:.1} | {b:.1} | {:.1}× |", b / a);
    }
}
