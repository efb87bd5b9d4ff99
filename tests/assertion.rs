//! The signed identity assertion (`[assertion]`): every 200 of `/verify` carries a compact JWS
//! that verifies against the JWKS the admin port serves, a hot token reuses its assertion until
//! it nears expiry, a rotated-out key stays published, and a bad key stops startup with 78.

use std::{path::Path, process::Command, time::Duration};

use jsonwebtoken::{DecodingKey, Validation, decode, decode_header, jwk::JwkSet};

use crate::support::*;

const SIGNED: &str = "knoxgate_assertions_signed_total";

/// A fresh key made by openssl (`ed25519` or `P-256`), written as PEM into `dir`; returns the
/// private and public key paths.
fn make_key(dir: &Path, name: &str, kind: &str) -> (String, String) {
    let (private, public) = (format!("{name}.pem"), format!("{name}.pub.pem"));
    let curve = format!("ec_paramgen_curve:{kind}");
    let algorithm: &[&str] = match kind {
        "ed25519" => &["-algorithm", "ed25519"],
        _ => &["-algorithm", "EC", "-pkeyopt", &curve],
    };
    openssl(
        dir,
        &[&["genpkey"], algorithm, &["-out", &private]].concat(),
    );
    openssl(dir, &["pkey", "-pubout", "-in", &private, "-out", &public]);
    let path = |file: &str| dir.join(file).to_string_lossy().into_owned();
    (path(&private), path(&public))
}

fn assertion_toml(key_file: &str, extra: &str) -> String {
    format!("[assertion]\nkey_file = \"{key_file}\"\naudience = \"api\"\n{extra}")
}

/// The JWKS the admin port serves.
async fn served_jwks(s: &TestServer) -> JwkSet {
    let r = http(s.admin(), "GET", "/.well-known/jwks.json", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/jwk-set+json"));
    assert!(
        r.header("cache-control")
            .is_some_and(|v| v.contains("max-age=")),
        "{:?}",
        r.headers
    );
    serde_json::from_slice(&r.body).expect("a JWKS document")
}

#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
    iat: i64,
    exp: i64,
    username: Option<String>,
}

/// Verifies `jws` as a relying party does: key by `kid` from `jwks`, audience, issuer, expiry.
fn verified(jwks: &JwkSet, jws: &str) -> Claims {
    let header = decode_header(jws).expect("a JWS header");
    let kid = header.kid.expect("a kid");
    let jwk = jwks.find(&kid).expect("the kid is published");
    let mut v = Validation::new(header.alg);
    v.set_audience(&["api"]);
    v.set_issuer(&["knoxgate"]);
    v.set_required_spec_claims(&["exp", "iat", "sub", "aud", "iss"]);
    v.leeway = 0;
    decode::<Claims>(jws, &DecodingKey::from_jwk(jwk).unwrap(), &v)
        .expect("the assertion verifies")
        .claims
}

fn assertion_of(r: &Response) -> String {
    assert_eq!(r.status, 200, "{}", r.body_text());
    r.header("x-auth-assertion")
        .expect("an assertion on a 200")
        .to_owned()
}

#[tokio::test]
async fn the_assertion_verifies_against_the_served_jwks_and_is_reused_while_hot() {
    let keys = tempfile::tempdir().unwrap();
    let (key, _) = make_key(keys.path(), "active", "ed25519");
    let db = TestDb::migrated().await;
    let s = TestServer::start(&db, &assertion_toml(&key, "")).await;
    let t = user_with_token(&db, "alice").await;
    let first = assertion_of(&s.verify(&t.token).await);
    let jwks = served_jwks(&s).await;
    let claims = verified(&jwks, &first);
    assert_eq!(claims.sub, t.user_id.to_string());
    assert_eq!(claims.exp - claims.iat, 60);
    // The token's first cache entry can be replaced once (the feed reports the token's INSERT
    // right after the first lookup); after that the entry, and its assertion, stay.
    for _ in 0..3 {
        assert_eq!(s.verify(&t.token).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept = assertion_of(&s.verify(&t.token).await);
    let signed = s.metric(SIGNED).await;
    assert!(
        (1.0..=3.0).contains(&signed),
        "{signed} signatures for one token"
    );
    // Hot: the same assertion every time, and no new signature. A client-sent assertion is
    // never echoed: the answer carries knoxgate's own.
    for _ in 0..50 {
        let r = http(
            s.addr(),
            "GET",
            "/verify",
            &[
                ("Authorization", &format!("Token {}", t.token)),
                ("X-Auth-Assertion", "forged.by.client"),
            ],
            b"",
        )
        .await;
        assert_eq!(assertion_of(&r), kept);
    }
    assert_eq!(s.metric(SIGNED).await, signed);
    // A refusal carries none.
    let r = s.verify("not-a-token").await;
    assert_eq!(r.status, 401);
    assert!(r.header("x-auth-assertion").is_none());
    // A revoked token's kept assertion goes with it.
    let out = http(
        s.addr(),
        "POST",
        LOGOUT,
        &[("Authorization", &format!("Token {}", t.token))],
        b"",
    )
    .await;
    assert_eq!(out.status, 204);
    let r = s.verify(&t.token).await;
    assert_eq!(r.status, 401);
    assert!(r.header("x-auth-assertion").is_none());
    s.stop().await;
}

/// The claims of `jws` after checking its signature, audience and issuer, as JSON.
fn claims_json(jwks: &JwkSet, jws: &str) -> serde_json::Value {
    let header = decode_header(jws).expect("a JWS header");
    let jwk = jwks.find(&header.kid.expect("a kid")).expect("published");
    let mut v = Validation::new(header.alg);
    v.set_audience(&["api"]);
    v.set_issuer(&["knoxgate"]);
    decode::<serde_json::Value>(jws, &DecodingKey::from_jwk(jwk).unwrap(), &v)
        .expect("the assertion verifies")
        .claims
}

#[tokio::test]
async fn the_attributes_sent_as_headers_are_signed_and_follow_a_staff_change() {
    let keys = tempfile::tempdir().unwrap();
    let (key, _) = make_key(keys.path(), "active", "P-256");
    let db = TestDb::migrated().await;
    let headers = "[verify]\nusername_header = \"X-Auth-Username\"\nemail_header = \"X-Auth-Email\"\n\
                   staff_header = \"X-Auth-User-Staff\"\nsuperuser_header = \"X-Auth-User-Superuser\"\n";
    let s = TestServer::start(&db, &format!("{headers}{}", assertion_toml(&key, ""))).await;
    let t = user_with_token(&db, "alice").await;
    let c = db.client().await;
    c.execute(
        "UPDATE auth_user SET email = 'alice@example.com' WHERE id = $1",
        &[&t.user_id],
    )
    .await
    .unwrap();
    let r = s.verify(&t.token).await;
    let jwks = served_jwks(&s).await;
    let claims = claims_json(&jwks, &assertion_of(&r));
    assert_eq!(claims["sub"], t.user_id.to_string());
    assert_eq!(claims["username"], "alice");
    assert_eq!(claims["email"], "alice@example.com");
    assert_eq!(claims["is_staff"], false);
    assert_eq!(claims["is_superuser"], false);
    // The signed values are the headers' values.
    assert_eq!(r.header("X-Auth-Username"), Some("alice"));
    assert_eq!(r.header("X-Auth-User-Staff"), Some("false"));

    // Made staff in the database: the change feed drops the cached entry and its assertion, so
    // the next one signs the new flag.
    c.execute(
        "UPDATE auth_user SET is_staff = true WHERE id = $1",
        &[&t.user_id],
    )
    .await
    .unwrap();
    let became_staff = eventually(Duration::from_secs(5), || async {
        let r = s.verify(&t.token).await;
        claims_json(&jwks, &assertion_of(&r))["is_staff"] == true
    })
    .await;
    assert!(became_staff.is_some(), "the assertion still says not staff");
    s.stop().await;
}

#[tokio::test]
async fn a_short_lived_assertion_is_renewed_before_it_expires() {
    let keys = tempfile::tempdir().unwrap();
    let (key, _) = make_key(keys.path(), "active", "prime256v1");
    let db = TestDb::migrated().await;
    // Reused until 4 s before expiry. `iat` is whole seconds, so that is at least 3 s and at
    // most 4 s after it is signed: room for a slow machine between the checks below, and the
    // assertion is still unexpired when checked with no leeway.
    let s = TestServer::start(
        &db,
        &assertion_toml(&key, "lifetime = \"8s\"\nrenew_before = \"4s\""),
    )
    .await;
    // The token's INSERT, heard after the first verify, would drop the entry that verify cached
    // (it cannot tell the new row from one it already holds) and with it the assertion: wait for
    // the feed to be live and to have applied it first.
    let live = eventually(Duration::from_secs(10), || async {
        s.metric("knoxgate_feed_connected").await == 1.0
    })
    .await;
    assert!(live.is_some(), "the feed never came up");
    let inserts = || s.metric("knoxgate_feed_events_total{kind=\"insert\"}");
    let before = inserts().await;
    let t = user_with_token(&db, "bob").await;
    let heard = eventually(Duration::from_secs(10), || async {
        inserts().await > before
    })
    .await;
    assert!(heard.is_some(), "the token's INSERT never reached the feed");
    let first = assertion_of(&s.verify(&t.token).await);
    assert_eq!(assertion_of(&s.verify(&t.token).await), first);
    let jwks = served_jwks(&s).await;
    let old = verified(&jwks, &first);
    let started = std::time::Instant::now();
    let renewed = loop {
        let now = assertion_of(&s.verify(&t.token).await);
        if now != first {
            break now;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never renewed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let new = verified(&jwks, &renewed);
    assert!(new.exp > old.exp);
    assert_eq!(new.sub, t.user_id.to_string());
    // Renewed, then reused again.
    let signed = s.metric(SIGNED).await;
    assert_eq!(assertion_of(&s.verify(&t.token).await), renewed);
    assert_eq!(s.metric(SIGNED).await, signed);
    s.stop().await;
}

#[tokio::test]
async fn after_a_rotation_the_old_key_stays_published_beside_the_new() {
    let keys = tempfile::tempdir().unwrap();
    let (old_key, old_public) = make_key(keys.path(), "old", "ed25519");
    let (new_key, _) = make_key(keys.path(), "new", "prime256v1");
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "carol").await;
    let before = TestServer::start(&db, &assertion_toml(&old_key, "")).await;
    let signed_before = assertion_of(&before.verify(&t.token).await);
    let old_kid = decode_header(&signed_before).unwrap().kid.unwrap();
    before.stop().await;
    // The new key signs; the old one is published for what it signed meanwhile.
    let after = TestServer::start(
        &db,
        &assertion_toml(
            &new_key,
            &format!("verify_only_key_files = [\"{old_public}\"]"),
        ),
    )
    .await;
    let jwks = served_jwks(&after).await;
    assert_eq!(jwks.keys.len(), 2);
    assert!(jwks.find(&old_kid).is_some());
    assert_eq!(verified(&jwks, &signed_before).sub, t.user_id.to_string());
    let signed_after = assertion_of(&after.verify(&t.token).await);
    let new_kid = decode_header(&signed_after).unwrap().kid.unwrap();
    assert_ne!(new_kid, old_kid);
    assert_eq!(verified(&jwks, &signed_after).sub, t.user_id.to_string());
    after.stop().await;
}

#[tokio::test]
async fn without_a_key_there_is_no_assertion_and_no_jwks() {
    let (_db, _client, s) = Fixture::new().start().await;
    let r = http(s.admin(), "GET", "/.well-known/jwks.json", &[], b"").await;
    assert_eq!(r.status, 404);
    s.stop().await;
}

/// `knoxgate check-config` with `env`: its exit code and standard error.
fn check_config(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_knoxgate"));
    cmd.arg("check-config");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_bad_assertion_key_or_setting_stops_startup_with_78() {
    let keys = tempfile::tempdir().unwrap();
    let (good, good_public) = make_key(keys.path(), "good", "ed25519");
    let (p384, _) = make_key(keys.path(), "p384", "secp384r1");
    let garbage = keys.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    let garbage = garbage.to_string_lossy().into_owned();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("KNOXGATE_ASSERTION_KEY_FILE", "/nonexistent/key.pem"),
                ("KNOXGATE_ASSERTION_AUDIENCE", "api"),
            ],
            "/nonexistent/key.pem",
        ),
        (
            &[
                ("KNOXGATE_ASSERTION_KEY_FILE", &p384),
                ("KNOXGATE_ASSERTION_AUDIENCE", "api"),
            ],
            "Ed25519 or P-256",
        ),
        (
            &[
                ("KNOXGATE_ASSERTION_KEY_FILE", &garbage),
                ("KNOXGATE_ASSERTION_AUDIENCE", "api"),
            ],
            "assertion.key_file",
        ),
        (
            &[("KNOXGATE_ASSERTION_KEY_FILE", &good)],
            "assertion.audience",
        ),
        (
            &[
                ("KNOXGATE_ASSERTION_KEY_FILE", &good),
                ("KNOXGATE_ASSERTION_AUDIENCE", "api"),
                ("KNOXGATE_ASSERTION_VERIFY_ONLY_KEY_FILES", &good_public),
            ],
            "remove it from verify_only_key_files",
        ),
        (
            &[
                ("KNOXGATE_ASSERTION_KEY_FILE", &good),
                ("KNOXGATE_ASSERTION_AUDIENCE", "api"),
                ("KNOXGATE_ASSERTION_RENEW_BEFORE", "60s"),
            ],
            "assertion.renew_before",
        ),
        (
            &[
                ("KNOXGATE_ASSERTION_KEY_FILE", &good),
                ("KNOXGATE_ASSERTION_AUDIENCE", "api"),
                ("KNOXGATE_ASSERTION_RENEW_BEFORE", "0s"),
            ],
            "assertion.renew_before",
        ),
        (
            &[
                ("KNOXGATE_ASSERTION_KEY_FILE", &good),
                ("KNOXGATE_ASSERTION_AUDIENCE", "api"),
                ("KNOXGATE_ASSERTION_LIFETIME", "36500d"),
            ],
            "assertion.lifetime",
        ),
    ];
    for (env, expected) in cases {
        let (code, stderr) = check_config(env);
        assert_eq!(code, Some(78), "{env:?}: {stderr}");
        assert!(stderr.contains(expected), "{env:?}: {stderr}");
    }
    let (code, stderr) = check_config(&[
        ("KNOXGATE_ASSERTION_KEY_FILE", &good),
        ("KNOXGATE_ASSERTION_AUDIENCE", "api"),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
}

/// A hit confirmed with Postgres (every hit in strict mode) that finds the row unchanged keeps
/// the assertion signed for it: the application is not handed a new one, to verify anew, at
/// every request. A row that changed gets a new one.
#[tokio::test]
async fn a_confirmed_hit_keeps_its_assertion_until_the_row_changes() {
    let keys = tempfile::tempdir().unwrap();
    let (key, _) = make_key(keys.path(), "active", "prime256v1");
    let db = TestDb::migrated().await;
    let s = TestServer::start(
        &db,
        &assertion_toml(
            &key,
            "[cache]\nconsistency = \"strict\"\n[verify]\nusername_header = \"X-Auth-Username\"",
        ),
    )
    .await;
    let t = user_with_token(&db, "carol").await;
    let first = assertion_of(&s.verify(&t.token).await);
    for _ in 0..19 {
        assert_eq!(assertion_of(&s.verify(&t.token).await), first);
    }
    assert_eq!(s.metric("knoxgate_assertions_signed_total").await, 1.0);
    db.client()
        .await
        .execute(
            "UPDATE auth_user SET username = 'caroline' WHERE id = $1",
            &[&t.user_id],
        )
        .await
        .unwrap();
    let renamed = eventually(Duration::from_secs(5), || async {
        let r = s.verify(&t.token).await;
        r.header("x-auth-username") == Some("caroline")
    })
    .await;
    assert!(renamed.is_some(), "the new name never reached the answer");
    let now = assertion_of(&s.verify(&t.token).await);
    assert_ne!(now, first);
    let seen = verified(&served_jwks(&s).await, &now);
    assert_eq!(seen.username.as_deref(), Some("caroline"));
    s.stop().await;
}
