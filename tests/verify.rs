//! `/verify` end to end: one test per outcome, faults included.

use std::time::Duration;

use knoxgate::auth::{HashAlgorithm, format_isoformat};

use crate::support::*;

const TEN_HOURS: Option<Duration> = Some(Duration::from_secs(36_000));

#[tokio::test]
async fn valid_django_token_is_200_with_user_id() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "").await;
    let r = s.verify(&t.token).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-auth-user-id"),
        Some(t.user_id.to_string().as_str())
    );
    assert!(r.body.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn any_method_and_any_subpath_is_verified_and_body_is_ignored() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "").await;
    let auth = format!("Token {}", t.token);
    for (method, path) in [
        ("GET", "/verify"),
        ("HEAD", "/verify"),
        ("POST", "/verify/api/orders?x=1"),
        ("PUT", "/verify/a/b/c"),
        ("DELETE", "/verify/"),
        ("PATCH", "/verify?anonymous=allow"),
        ("OPTIONS", "/verify/x"),
    ] {
        let r = http(
            s.addr(),
            method,
            path,
            &[("Authorization", &auth)],
            b"{\"ignored\": true}",
        )
        .await;
        assert_eq!(r.status, 200, "{method} {path}");
        assert_eq!(
            r.header("x-auth-user-id"),
            Some(t.user_id.to_string().as_str()),
            "{method} {path}"
        );
    }
    // Not a verify path.
    let r = http(
        s.addr(),
        "GET",
        "/verifyx",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(r.status, 404);
    s.stop().await;
}

#[tokio::test]
async fn refusals_match_knox_word_for_word() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "").await;
    let long = "a".repeat(300);
    let last = if t.token.ends_with('0') { '1' } else { '0' };
    let wrong_tail = format!("{}{last}", &t.token[..63]);
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "Authentication credentials were not provided."),
        (
            Some(format!("Bearer {}", t.token)),
            "Authentication credentials were not provided.",
        ),
        (
            Some("Token".into()),
            "Invalid token header. No credentials provided.",
        ),
        (
            Some("Token a b".into()),
            "Invalid token header. Token string should not contain spaces.",
        ),
        (Some(format!("Token {}", "0".repeat(64))), "Invalid token."),
        (Some("Token not-a-hex-token!".into()), "Invalid token."),
        (Some(format!("Token {wrong_tail}")), "Invalid token."),
        (Some(format!("Token {long}")), "Invalid token."),
        (
            Some(format!("Token {}", t.token.to_uppercase())),
            "Invalid token.",
        ),
    ];
    for (header, detail) in cases {
        let headers: Vec<(&str, &str)> = header
            .iter()
            .map(|h| ("Authorization", h.as_str()))
            .collect();
        let r = http(s.addr(), "GET", "/verify", &headers, b"").await;
        assert_eq!(r.status, 401, "{header:?}");
        assert_eq!(r.header("www-authenticate"), Some("Token"), "{header:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.body_text(),
            serde_json::json!({ "detail": detail }).to_string(),
            "{header:?}"
        );
        assert_eq!(r.header("x-auth-user-id"), None);
    }
    s.stop().await;
}

#[tokio::test]
async fn non_utf8_and_duplicate_headers_are_401_not_500() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "").await;
    let r = raw(s.addr(), b"GET /verify HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Token \xff\xfe\xfd\r\n\r\n").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body_text(), r#"{"detail":"Invalid token."}"#);
    let dup = format!(
        "GET /verify HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Token {0}\r\nAuthorization: Token {0}\r\n\r\n",
        t.token
    );
    let r = raw(s.addr(), dup.as_bytes()).await;
    assert_eq!(
        r.status, 401,
        "two Authorization headers must not be merged into an allow"
    );
    // A head larger than max_header_bytes is refused by the HTTP layer, never allowed.
    let big = format!(
        "GET /verify HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Token {}\r\nX-Pad: {}\r\n\r\n",
        t.token,
        "p".repeat(64 * 1024)
    );
    let r = raw(s.addr(), big.as_bytes()).await;
    assert_eq!(r.status, 431);
    s.stop().await;
}

#[tokio::test]
async fn configured_keyword_and_extra_identity_headers() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(
        &db,
        "[knox]\nauth_header_prefix = \"Bearer\"\n[verify]\nusername_header = \"X-Auth-Username\"\nemail_header = \"X-Auth-Email\"\nexpiry_header = \"X-Auth-Expiry\"",
    )
    .await;
    let r = http(
        s.addr(),
        "GET",
        "/verify",
        &[("Authorization", &format!("bearer {}", t.token))],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-auth-username"), Some("alice"));
    assert_eq!(r.header("x-auth-email"), Some("alice@example.com"));
    assert!(r.header("x-auth-expiry").is_some_and(|e| e.ends_with('Z')));
    let r = s.verify(&t.token).await; // "Token …" is another scheme now
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    s.stop().await;
}

#[tokio::test]
async fn prefixed_and_sha256_tokens_verify_under_matching_settings() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let id = insert_user(&client, "bob", "pw", true).await;
    let prefixed = insert_token(&client, id, TEN_HOURS, "myapp_", HashAlgorithm::Sha512).await;
    let sha256 = insert_token(&client, id, TEN_HOURS, "", HashAlgorithm::Sha256).await;
    let s = TestServer::start(&db, "").await;
    assert_eq!(s.verify(&prefixed.token).await.status, 200);
    assert_eq!(
        s.verify(&sha256.token).await.status,
        401,
        "sha256 digest under sha512 settings"
    );
    s.stop().await;
    let s = TestServer::start(&db, "[knox]\nhash_algorithm = \"hashlib.sha256\"").await;
    assert_eq!(s.verify(&sha256.token).await.status, 200);
    assert_eq!(s.verify(&prefixed.token).await.status, 401);
    s.stop().await;
}

#[tokio::test]
async fn expired_token_is_401_and_deleted_with_expired_siblings() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let id = insert_user(&client, "carol", "pw", true).await;
    let valid = insert_token(&client, id, TEN_HOURS, "", HashAlgorithm::Sha512).await;
    let expired = insert_token(&client, id, TEN_HOURS, "", HashAlgorithm::Sha512).await;
    let _sibling = insert_token(&client, id, TEN_HOURS, "", HashAlgorithm::Sha512).await;
    client
        .execute(
            "UPDATE knox_authtoken SET expiry = now() - interval '1 second' WHERE digest <> $1",
            &[&HashAlgorithm::Sha512.hex_digest(valid.token.as_bytes())],
        )
        .await
        .unwrap();
    let s = TestServer::start(&db, "").await;
    let r = s.verify(&expired.token).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body_text(), r#"{"detail":"Invalid token."}"#);
    let left: i64 = client
        .query_one("SELECT count(*) FROM knox_authtoken", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        left, 1,
        "the expired token and its expired sibling are deleted, as knox does"
    );
    assert_eq!(s.verify(&valid.token).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn inactive_user_is_refused() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let id = insert_user(&client, "dave", "pw", false).await;
    let t = insert_token(&client, id, TEN_HOURS, "", HashAlgorithm::Sha512).await;
    let s = TestServer::start(&db, "").await;
    let r = s.verify(&t.token).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body_text(), r#"{"detail":"User inactive or deleted."}"#);
    s.stop().await;
}

#[tokio::test]
async fn token_without_expiry_verifies() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let id = insert_user(&client, "erin", "pw", true).await;
    let t = insert_token(&client, id, None, "", HashAlgorithm::Sha512).await;
    let s = TestServer::start(&db, "").await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn tiers_fill_and_metrics_count_hits_and_misses() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "").await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    assert_eq!(
        s.metric("knoxgate_cache_lookups_total{tier=\"memory\",result=\"miss\"}")
            .await,
        1.0
    );
    assert_eq!(
        s.metric("knoxgate_cache_lookups_total{tier=\"postgres\",result=\"hit\"}")
            .await,
        1.0
    );
    // The miss wrote the knox-redis entry and the user index.
    let key = format!("{}:token:{}", s.prefix, &t.token[..15]);
    let entry = redis_cli(6379, &["GET", &key]);
    assert!(
        entry.starts_with("{\"schema_version\": 2, \"digest\": \""),
        "{entry}"
    );
    let ttl: i64 = redis_cli(6379, &["TTL", &key]).parse().unwrap();
    assert!((290..=300).contains(&ttl), "ttl {ttl}");
    assert_eq!(
        redis_cli(
            6379,
            &[
                "SISMEMBER",
                &format!("{}:user:{}:tokens", s.prefix, t.user_id),
                &t.token[..15]
            ]
        ),
        "1"
    );
    for _ in 0..5 {
        assert_eq!(s.verify(&t.token).await.status, 200);
    }
    assert_eq!(
        s.metric("knoxgate_cache_lookups_total{tier=\"memory\",result=\"hit\"}")
            .await,
        5.0
    );
    assert_eq!(
        s.metric("knoxgate_sql_statements_total{statement=\"lookup\"}")
            .await,
        1.0
    );
    assert_eq!(
        s.metric("knoxgate_verify_total{outcome=\"allow\",reason=\"valid\"}")
            .await,
        6.0
    );
    assert_eq!(
        s.metric("knoxgate_verify_duration_seconds_count").await,
        6.0
    );
    s.stop().await;

    // A second instance (cold memory) is served by Redis without SQL.
    let s2 = TestServer::start_with_prefix(&db, &s_prefix(&key), "").await;
    assert_eq!(s2.verify(&t.token).await.status, 200);
    assert_eq!(
        s2.metric("knoxgate_cache_lookups_total{tier=\"redis\",result=\"hit\"}")
            .await,
        1.0
    );
    assert_eq!(
        s2.metric("knoxgate_sql_statements_total{statement=\"lookup\"}")
            .await,
        0.0
    );
    s2.stop().await;
}

fn s_prefix(key: &str) -> String {
    key.split(":token:").next().unwrap().to_owned()
}

#[tokio::test]
async fn entries_written_by_django_rest_knox_redis_are_used() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let client = db.client().await;
    let row = client
        .query_one("SELECT digest, created, expiry FROM knox_authtoken", &[])
        .await
        .unwrap();
    let (digest, created, expiry): (String, time::OffsetDateTime, time::OffsetDateTime) =
        (row.get(0), row.get(1), row.get(2));
    let prefix = format!("kgdj{}", rand_suffix());
    // Exactly what knox-redis's json.dumps writes (no user status in it).
    let payload = format!(
        "{{\"schema_version\": 2, \"digest\": \"{digest}\", \"user_id\": {}, \"created\": \"{}\", \"expiry\": \"{}\", \"token_key\": \"{}\"}}",
        t.user_id,
        format_isoformat(created),
        format_isoformat(expiry),
        &t.token[..15]
    );
    redis_cli(
        6379,
        &[
            "SET",
            &format!("{prefix}:token:{}", &t.token[..15]),
            &payload,
            "EX",
            "300",
        ],
    );
    let s = TestServer::start_with_prefix(&db, &prefix, "").await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    assert_eq!(
        s.metric("knoxgate_cache_lookups_total{tier=\"redis\",result=\"hit\"}")
            .await,
        1.0
    );
    // The user's status is not in the entry: one primary-key query, no token_key scan.
    assert_eq!(
        s.metric("knoxgate_sql_statements_total{statement=\"confirm\"}")
            .await,
        1.0
    );
    assert_eq!(
        s.metric("knoxgate_sql_statements_total{statement=\"lookup\"}")
            .await,
        0.0
    );
    s.stop().await;
}

#[tokio::test]
async fn hostile_redis_entry_is_a_miss_never_an_allow() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let prefix = format!("kgbad{}", rand_suffix());
    let key = format!("{prefix}:token:{}", &t.token[..15]);
    let s = TestServer::start_with_prefix(&db, &prefix, "").await;
    // Garbage, and an entry claiming a token that does not exist in the database.
    let forged_token = format!("{}{}", &t.token[..15], "f".repeat(49));
    let forged = format!(
        "{{\"schema_version\": 2, \"digest\": \"{}\", \"user_id\": 1, \"created\": \"2026-01-01T00:00:00+00:00\", \"expiry\": null, \"token_key\": \"{}\", \"knoxgate\": {{\"is_active\": true, \"username\": \"x\", \"email\": \"\"}}}}",
        HashAlgorithm::Sha512.hex_digest(forged_token.as_bytes()),
        &t.token[..15]
    );
    redis_cli(6379, &["SET", &key, "{not json", "EX", "300"]);
    assert_eq!(
        s.verify(&t.token).await.status,
        200,
        "garbage entry falls back to postgres"
    );
    s.stop().await;
    // Not UTF-8 (redis-cli unescapes "\xff" in commands read from stdin), read by a fresh
    // instance so that nothing is cached in-process.
    let mut cli = std::process::Command::new("redis-cli")
        .args(["-p", "6379"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-cli on PATH");
    std::io::Write::write_all(
        cli.stdin.as_mut().unwrap(),
        format!("SET {key} \"{{\\xff\\xfe\" EX 300\n").as_bytes(),
    )
    .unwrap();
    drop(cli.stdin.take());
    assert!(cli.wait().unwrap().success());
    assert_eq!(redis_cli(6379, &["STRLEN", &key]), "3");
    let s = TestServer::start_with_prefix(&db, &prefix, "").await;
    assert_eq!(
        s.verify(&t.token).await.status,
        200,
        "a non-UTF-8 entry falls back to postgres"
    );
    assert_eq!(
        s.metric("knoxgate_cache_lookups_total{tier=\"redis\",result=\"miss\"}")
            .await,
        1.0
    );
    s.stop().await;
    // A forged entry in strict mode is confirmed against Postgres and refused.
    redis_cli(6379, &["SET", &key, &forged, "EX", "300"]);
    let s = TestServer::start_with_prefix(&db, &prefix, "[cache]\nconsistency = \"strict\"").await;
    assert_eq!(s.verify(&forged_token).await.status, 401);
    assert_eq!(s.verify(&t.token).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn postgres_unreachable_and_cache_empty_is_503() {
    let db = TestDb::migrated().await;
    let port = free_port();
    let s = TestServer::start(
        &db,
        &format!("[postgres]\nurl = \"postgres://postgres@127.0.0.1:{port}/x\"\n[cache]\nconsistency = \"ttl\""),
    )
    .await;
    let r = s.verify(&"0".repeat(64)).await;
    assert_eq!(r.status, 503);
    assert!(r.body_text().contains("unavailable"));
    assert_eq!(r.header("x-auth-user-id"), None);
    // Header problems are still decided without the database.
    assert_eq!(http(s.addr(), "GET", "/verify", &[], b"").await.status, 401);
    let ready = http(s.admin(), "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503);
    assert!(ready.body_text().contains("\"postgres\":\"unreachable\""));
    assert_eq!(
        http(s.admin(), "GET", "/healthz", &[], b"").await.status,
        200
    );
    s.stop().await;
}

#[tokio::test]
async fn redis_down_falls_back_to_postgres_without_stalling_and_recovers() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let mut redis = PrivateRedis::start().await;
    let port = redis.port;
    let s = TestServer::start(
        &db,
        &format!(
            "[redis]\nurl = \"{}\"\nbreaker_cooldown = \"3s\"",
            redis.url()
        ),
    )
    .await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    redis.kill();
    // Tokens the in-process tier has never seen go to Redis, fail, and are answered by Postgres,
    // quickly: no per-request stall.
    for _ in 0..20 {
        let unknown = knoxgate::auth::generate_token("", 64);
        let started = std::time::Instant::now();
        let r = s.verify(&unknown).await;
        assert_eq!(r.status, 401);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "stalled {:?}",
            started.elapsed()
        );
    }
    assert_eq!(s.verify(&t.token).await.status, 200);
    let ready = http(s.admin(), "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "postgres is enough to be ready");
    assert!(
        ready.body_text().contains("\"redis\":\"disconnected\""),
        "{}",
        ready.body_text()
    );
    // Redis back on the same port: caching resumes by itself.
    let _redis = PrivateRedis::start_on(port).await;
    let back = eventually(Duration::from_secs(10), || async {
        s.readyz().await.contains(r#""redis":"connected""#)
    })
    .await;
    assert!(back.is_some(), "reconnected");
    let client = db.client().await;
    let t2 = insert_token(&client, t.user_id, TEN_HOURS, "", HashAlgorithm::Sha512).await;
    let key = format!("{}:token:{}", s.prefix, &t2.token[..15]);
    let cached = eventually(Duration::from_secs(5), || async {
        assert_eq!(s.verify(&t2.token).await.status, 200);
        !redis_cli(port, &["GET", &key]).is_empty()
    })
    .await;
    assert!(cached.is_some(), "entry written again after reconnect");
    s.stop().await;
}

#[tokio::test]
async fn readyz_reports_dependencies_and_metrics_parse() {
    let db = TestDb::migrated().await;
    let s = TestServer::start(&db, "").await;
    let r = http(s.admin(), "GET", "/readyz", &[], b"").await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"postgres": "ok", "redis": "connected", "feed": "live"})
    );
    assert_eq!(s.verify(&"0".repeat(64)).await.status, 401);
    let m = http(s.admin(), "GET", "/metrics", &[], b"").await;
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = m.body_text();
    for family in [
        "knoxgate_cache_lookups_total",
        "knoxgate_verify_total",
        "knoxgate_verify_duration_seconds",
        "knoxgate_sql_statements_total",
        "knoxgate_feed_connected",
        "knoxgate_redis_connected",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family}"))
                || text.contains(&format!("# TYPE {}", family.trim_end_matches("_total"))),
            "{family} missing in {text}"
        );
    }
    assert!(
        text.contains("knoxgate_verify_total{outcome=\"deny\",reason=\"invalid_token\"} 1"),
        "{text}"
    );
    assert!(!text.contains(&"0".repeat(64)), "no secrets in metrics");
    s.stop().await;
}
