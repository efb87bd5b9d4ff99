//! Per-route policy over HTTP: the query parameters of the verify URL, DRF's semantics, the
//! identity headers, injection attempts on sub-paths, and flag and group changes reaching
//! every instance through the change feed.

use std::time::Duration;

use crate::support::*;

/// The bound the tests hold propagation to, as for revocations (tests/integration/feed.rs).
const BOUND: Duration = Duration::from_secs(2);

const FORBIDDEN: &str = r#"{"detail":"You do not have permission to perform this action."}"#;

const POLICY_HEADERS: &str = r#"
[verify]
staff_header = "X-Auth-User-Staff"
superuser_header = "X-Auth-User-Superuser"
groups_header = "X-Auth-User-Groups"
"#;

async fn get(s: &TestServer, path: &str, token: Option<&str>) -> Response {
    let auth = token.map(|t| format!("Token {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http(s.addr(), "GET", path, &headers, b"").await
}

async fn status(s: &TestServer, path: &str, token: Option<&str>) -> u16 {
    get(s, path, token).await.status
}

#[tokio::test]
async fn every_policy_over_http() {
    let db = TestDb::migrated().await;
    let cast = PolicyCast::new(&db).await;
    let s = TestServer::start(&db, POLICY_HEADERS).await;
    let [p, st, ro, op, te] = cast.tokens();
    let cases = [
        // No parameters: the default rule.
        ("/verify", p, 200),
        ("/verify?", p, 200),
        ("/verify", None, 401),
        // anonymous=allow: strangers in, tokens still checked.
        ("/verify?anonymous=allow", None, 200),
        ("/verify?anonymous=allow", p, 200),
        ("/verify?anonymous=allow", Some("not-a-token"), 401),
        // IsAdminUser: is_staff only.
        ("/verify?require=staff", st, 200),
        ("/verify?require=staff", te, 200),
        ("/verify?require=staff", p, 403),
        ("/verify?require=staff", ro, 403),
        ("/verify?require=staff", None, 401),
        ("/verify?require=staff", Some("not-a-token"), 401),
        ("/verify?require=superuser", ro, 200),
        ("/verify?require=superuser", st, 403),
        ("/verify?require=staff&require=staff", st, 200),
        // Groups: any of them, exact names, form-decoded.
        ("/verify?group=ops", op, 200),
        ("/verify?group=ops", te, 403),
        ("/verify?group=ops&group=Team%20A", op, 200),
        ("/verify?group=ops&group=Team%20A", te, 200),
        ("/verify?group=Team+A", te, 200),
        ("/verify?group=team+a", te, 403),
        ("/verify?group=a%2Cb", te, 200),
        ("/verify?group=a", te, 403),
        ("/verify?group=ops", st, 403),
        ("/verify?group=ops", None, 401),
        // require and group: both.
        ("/verify?require=staff&group=Team%20A", te, 200),
        ("/verify?require=staff&group=ops", op, 403),
        ("/verify?require=staff&group=ops", st, 403),
        // Configuration errors: 500, never an allow or a denial.
        ("/verify?anonymous=yes", None, 500),
        ("/verify?anonymous=yes", p, 500),
        ("/verify?require=admin", st, 500),
        ("/verify?require=staff&require=superuser", ro, 500),
        ("/verify?group=", op, 500),
        ("/verify?allowed_groups=ops", op, 500),
        ("/verify?anonymous=allow&require=staff", None, 500),
        ("/verify?anonymous=allow&group=ops", op, 500),
    ];
    let count = |want: u16, anonymous: bool| {
        cases
            .iter()
            .filter(|(_, t, w)| *w == want && (!anonymous || t.is_none()))
            .count() as f64
    };
    for (path, token, want) in cases {
        let r = get(&s, path, token).await;
        assert_eq!(r.status, want, "{path} {token:?}: {}", r.body_text());
        match want {
            403 => {
                assert_eq!(r.body_text(), FORBIDDEN, "{path}");
                assert_eq!(r.header("WWW-Authenticate"), None, "{path}");
                assert_eq!(r.header("X-Auth-User-Id"), None, "{path}");
            }
            200 if token.is_none() => {
                for h in ["X-Auth-User-Id", "X-Auth-User-Staff", "X-Auth-User-Groups"] {
                    assert_eq!(r.header(h), None, "{path}: {h}");
                }
            }
            200 => assert!(r.header("X-Auth-User-Id").is_some(), "{path}"),
            401 => assert_eq!(r.header("WWW-Authenticate"), Some("Token"), "{path}"),
            _ => assert_eq!(r.body_text(), r#"{"detail":"Internal error."}"#),
        }
    }
    // DRF: another scheme is no knox credentials, so an anonymous user...
    for (scheme, want) in [("Bearer abc", 200), ("Basic Zm9vOmJhcg==", 200)] {
        let r = http(
            s.addr(),
            "GET",
            "/verify?anonymous=allow",
            &[("Authorization", scheme)],
            b"",
        )
        .await;
        assert_eq!(r.status, want, "{scheme}");
        assert_eq!(r.header("X-Auth-User-Id"), None);
    }
    // ...but knox's keyword with bad credentials fails authentication.
    for bad in ["Token", "Token a b"] {
        let r = http(
            s.addr(),
            "GET",
            "/verify?anonymous=allow",
            &[("Authorization", bad)],
            b"",
        )
        .await;
        assert_eq!(r.status, 401, "{bad}");
    }
    // The identity headers.
    let r = get(&s, "/verify", te).await;
    assert_eq!(r.header("X-Auth-User-Staff"), Some("true"));
    assert_eq!(r.header("X-Auth-User-Superuser"), Some("false"));
    assert_eq!(r.header("X-Auth-User-Groups"), Some("Team A,a%2Cb"));
    let r = get(&s, "/verify?require=superuser", ro).await;
    assert_eq!(r.header("X-Auth-User-Staff"), Some("false"));
    assert_eq!(r.header("X-Auth-User-Superuser"), Some("true"));
    assert_eq!(r.header("X-Auth-User-Groups"), Some(""));
    // Outcomes are counted under bounded labels.
    assert_eq!(
        s.metric("knoxgate_verify_total{outcome=\"deny\",reason=\"forbidden\"}")
            .await,
        count(403, false)
    );
    // The anonymous cases of the table, and the two other schemes.
    assert_eq!(
        s.metric("knoxgate_verify_total{outcome=\"allow\",reason=\"anonymous\"}")
            .await,
        count(200, true) + 2.0
    );
    assert_eq!(
        s.metric("knoxgate_verify_total{outcome=\"error\",reason=\"bad_policy\"}")
            .await,
        count(500, false)
    );
    s.stop().await;
}

/// A 200 that carries no identity (an anonymous request on an `anonymous=allow` route, a CORS
/// preflight) names every identity header knoxgate owns, in every spelling, in
/// `x-envoy-auth-headers-to-remove`: Envoy's HTTP ext_authz overwrites only the headers an
/// answer carries, so a client's own `X-Auth-User-Id` would otherwise reach the upstream. An
/// answer with an identity carries its headers instead, and no list.
#[tokio::test]
async fn a_200_without_identity_has_envoy_remove_client_identity_headers() {
    let db = TestDb::migrated().await;
    let t = member(&db, "envoy", false, false, &[]).await;
    let s = TestServer::start(&db, "[verify]\nallow_cors_preflight = true").await;
    let anonymous = get(&s, "/verify?anonymous=allow", None).await;
    let preflight = http(
        s.addr(),
        "OPTIONS",
        "/verify",
        &[("Access-Control-Request-Method", "POST")],
        b"",
    )
    .await;
    for (what, r) in [("anonymous", &anonymous), ("preflight", &preflight)] {
        assert_eq!(r.status, 200, "{what}");
        assert_eq!(r.header("X-Auth-User-Id"), None, "{what}");
        let listed: Vec<&str> = r
            .header("x-envoy-auth-headers-to-remove")
            .unwrap_or_else(|| panic!("{what}: no x-envoy-auth-headers-to-remove"))
            .split(", ")
            .collect();
        for name in [
            "x-auth-user-id",
            "x_auth_user_id",
            "x-auth_user-id",
            "x-auth-username",
            "x-auth-assertion",
        ] {
            assert!(listed.contains(&name), "{what}: {name} not in {listed:?}");
        }
    }
    let allowed = get(&s, "/verify", Some(&t.token)).await;
    assert_eq!(allowed.status, 200);
    assert!(allowed.header("X-Auth-User-Id").is_some());
    assert_eq!(allowed.header("x-envoy-auth-headers-to-remove"), None);
    s.stop().await;
}

#[tokio::test]
async fn default_identity_headers_are_off() {
    let db = TestDb::migrated().await;
    let t = member(&db, "staff", true, true, &["ops"]).await;
    let s = TestServer::start(&db, "").await;
    let r = get(&s, "/verify?require=staff&group=ops", Some(&t.token)).await;
    assert_eq!(r.status, 200);
    for h in [
        "X-Auth-User-Staff",
        "X-Auth-User-Superuser",
        "X-Auth-User-Groups",
    ] {
        assert_eq!(r.header(h), None, "{h}");
    }
    s.stop().await;
}

#[tokio::test]
async fn a_client_cannot_choose_its_policy_on_sub_paths() {
    let db = TestDb::migrated().await;
    let plain = member(&db, "plain", false, false, &[]).await;
    let s = TestServer::start(&db, "").await;
    // Envoy's path_prefix form: everything after /verify is the client's request. Without a
    // token each must be 401 (or 404 off the verify path), never 200.
    for path in [
        "/verify/api/x?anonymous=allow",
        "/verify/?anonymous=allow",
        "/verify/api?anonymous=allow&anonymous=allow",
        "/verify/api?x=1&anonymous=allow",
        "/verify/api%3Fanonymous=allow",
        "/verify/api%3fanonymous%3dallow",
        "/verify/api;anonymous=allow",
        "/verify/;anonymous=allow",
        "/verify/anonymous=allow",
        "/verify/anonymous/allow",
        "/verify//?anonymous=allow",
        "/verify/%2F?anonymous=allow",
        "/verify/..%2Fverify?anonymous=allow",
    ] {
        let r = get(&s, path, None).await;
        assert_eq!(r.status, 401, "{path}: {}", r.body_text());
    }
    // Not the verify path at all: an encoded `?` or a `;` does not end the path.
    for path in [
        "/verify%3Fanonymous=allow",
        "/verify;anonymous=allow",
        "/verify;?anonymous=allow",
        "/verifyx?anonymous=allow",
    ] {
        assert_eq!(status(&s, path, None).await, 404, "{path}");
    }
    // Nor can a client loosen or break a rule: on sub-paths the default rule holds, so bad
    // parameters are not even read.
    for path in [
        "/verify/x?require=staff",
        "/verify/x?anonymous=yes",
        "/verify/x?group=",
    ] {
        assert_eq!(status(&s, path, Some(&plain.token)).await, 200, "{path}");
    }
    assert_eq!(status(&s, "/verify/x", None).await, 401);
    s.stop().await;
}

#[tokio::test]
async fn hot_hits_with_a_policy_cost_no_sql() {
    let db = TestDb::migrated().await;
    let t = member(&db, "staff", true, false, &["ops"]).await;
    let s = TestServer::start(&db, "").await;
    assert_eq!(
        status(&s, "/verify?require=staff&group=ops", Some(&t.token)).await,
        200
    );
    let sql = s.metric("knoxgate_sql_statements_total").await;
    for path in [
        "/verify?require=staff",
        "/verify?group=ops",
        "/verify?require=superuser",
        "/verify",
    ] {
        for _ in 0..5 {
            let want = if path.contains("superuser") { 403 } else { 200 };
            assert_eq!(status(&s, path, Some(&t.token)).await, want, "{path}");
        }
    }
    assert_eq!(s.metric("knoxgate_sql_statements_total").await, sql);
    s.stop().await;
}

/// Waits until `path` answers `want` for `token` on every server.
async fn all_answer(servers: &[&TestServer], path: &str, token: &str, want: u16) {
    for s in servers {
        let seen = eventually(BOUND, || async {
            status(s, path, Some(token)).await == want
        })
        .await;
        let last = get(s, path, Some(token)).await;
        assert!(
            seen.is_some(),
            "{path}: wanted {want} within {BOUND:?}, still {} {}",
            last.status,
            last.body_text()
        );
    }
}

#[tokio::test]
async fn flag_and_group_changes_reach_a_second_instance() {
    let db = TestDb::migrated().await;
    let staff = member(&db, "staff", true, false, &[]).await;
    let ops = member(&db, "ops", false, false, &["ops", "other"]).await;
    let a = TestServer::start(&db, "").await;
    let b = TestServer::start_with_prefix(&db, &a.prefix, "").await;
    let both = [&a, &b];
    // Warm both instances (memory and Redis).
    for s in both {
        for _ in 0..2 {
            assert_eq!(
                status(s, "/verify?require=staff", Some(&staff.token)).await,
                200
            );
            assert_eq!(status(s, "/verify?group=ops", Some(&ops.token)).await, 200);
        }
    }
    let c = db.client().await;
    // Staff demotion.
    c.execute(
        "UPDATE auth_user SET is_staff = false WHERE username = 'staff'",
        &[],
    )
    .await
    .unwrap();
    all_answer(&both, "/verify?require=staff", &staff.token, 403).await;
    // The token itself stays valid.
    all_answer(&both, "/verify", &staff.token, 200).await;
    // Promotion to superuser travels the same way.
    c.execute(
        "UPDATE auth_user SET is_superuser = true WHERE username = 'staff'",
        &[],
    )
    .await
    .unwrap();
    all_answer(&both, "/verify?require=superuser", &staff.token, 200).await;
    // Group removal, as Django's user.groups.remove() does it.
    c.execute(
        "DELETE FROM auth_user_groups WHERE user_id = $1 AND group_id = \
         (SELECT id FROM auth_group WHERE name = 'ops')",
        &[&ops.user_id],
    )
    .await
    .unwrap();
    all_answer(&both, "/verify?group=ops", &ops.token, 403).await;
    all_answer(&both, "/verify?group=other", &ops.token, 200).await;
    // Added back.
    join_group(&db, ops.user_id, "ops").await;
    all_answer(&both, "/verify?group=ops", &ops.token, 200).await;
    // A group renamed: every member's groups change.
    c.execute(
        "UPDATE auth_group SET name = 'ops2' WHERE name = 'ops'",
        &[],
    )
    .await
    .unwrap();
    all_answer(&both, "/verify?group=ops", &ops.token, 403).await;
    all_answer(&both, "/verify?group=ops2", &ops.token, 200).await;
    // A group deleted with SQL while it has members (the memberships go at commit, as the
    // foreign key is deferred): the members are evicted too.
    c.batch_execute(
        "BEGIN; DELETE FROM auth_group WHERE name = 'other'; \
         DELETE FROM auth_user_groups WHERE group_id NOT IN (SELECT id FROM auth_group); COMMIT;",
    )
    .await
    .unwrap();
    all_answer(&both, "/verify?group=other", &ops.token, 403).await;
    all_answer(&both, "/verify?group=ops2", &ops.token, 200).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_group_rename_alone_reaches_members_through_its_own_trigger() {
    // Only the auth_group trigger fires here (no membership row changes).
    let db = TestDb::migrated().await;
    let ops = member(&db, "ops", false, false, &["ops"]).await;
    let s = TestServer::start(&db, "").await;
    assert_eq!(status(&s, "/verify?group=ops", Some(&ops.token)).await, 200);
    let events = s.metric("knoxgate_feed_events_total").await;
    db.client()
        .await
        .execute("UPDATE auth_group SET name = 'renamed'", &[])
        .await
        .unwrap();
    all_answer(&[&s], "/verify?group=ops", &ops.token, 403).await;
    assert!(s.metric("knoxgate_feed_events_total").await > events);
    s.stop().await;
}

#[tokio::test]
async fn redis_entries_without_flags_are_confirmed_not_read_as_unprivileged() {
    let db = TestDb::migrated().await;
    let staff = member(&db, "staff", true, false, &["ops"]).await;
    let a = TestServer::start(&db, "").await;
    assert_eq!(status(&a, "/verify", Some(&staff.token)).await, 200);
    let prefix = a.prefix.clone();
    a.stop().await;
    // Rewrite the Redis entry as a knoxgate without policies wrote it: status only.
    let key = format!("{prefix}:token:{}", &staff.token[..15]);
    let entry = redis_cli(6379, &["GET", &key]);
    let old = entry.replace(
        ", \"is_staff\": true, \"is_superuser\": false, \"groups\": [\"ops\"]",
        "",
    );
    assert_ne!(old, entry, "{entry}");
    assert_eq!(redis_cli(6379, &["SET", &key, &old, "KEEPTTL"]), "OK");
    let b = TestServer::start_with_prefix(&db, &prefix, "").await;
    let sql = b.metric("knoxgate_sql_statements_total").await;
    assert_eq!(
        status(&b, "/verify?require=staff&group=ops", Some(&staff.token)).await,
        200
    );
    // Confirmed with one primary-key query, then answered from memory.
    assert_eq!(
        b.metric("knoxgate_sql_statements_total{statement=\"confirm\"}")
            .await,
        1.0
    );
    assert!(b.metric("knoxgate_sql_statements_total").await > sql);
    b.stop().await;
}

#[tokio::test]
async fn login_caches_the_users_flags_and_groups() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let id = insert_user(&c, "boss", "pw", true).await;
    c.execute("UPDATE auth_user SET is_staff = true WHERE id = $1", &[&id])
        .await
        .unwrap();
    join_group(&db, id, "ops").await;
    let s = TestServer::start(&db, POLICY_HEADERS).await;
    let r = http(
        s.addr(),
        "POST",
        "/api/auth/login/",
        &[("Authorization", "Basic Ym9zczpwdw==")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let token = body["token"].as_str().unwrap();
    // The login deletes the user's expired tokens after its answer: counted before the snapshot.
    // Its INSERT's notification applied too: until then a cached answer is confirmed with SQL.
    let cleaned = eventually(Duration::from_secs(5), || async {
        s.metric("knoxgate_sql_statements_total{statement=\"delete_expired_after_login\"}")
            .await
            == 1.0
            && s.metric("knoxgate_feed_events_total{kind=\"insert\"}")
                .await
                >= 1.0
    })
    .await;
    assert!(
        cleaned.is_some(),
        "the login's cleanup or its notification never came"
    );
    let sql = s.metric("knoxgate_sql_statements_total").await;
    let r = get(&s, "/verify?require=staff&group=ops", Some(token)).await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.header("X-Auth-User-Groups"), Some("ops"));
    // Answered from what the login cached.
    assert_eq!(s.metric("knoxgate_sql_statements_total").await, sql);
    s.stop().await;
}

#[tokio::test]
async fn migrate_creates_the_group_tables_and_checks_every_trigger() {
    let db = TestDb::new().await;
    let cfg = config_for(&db, "kgx", "");
    let mut client = db.client().await;
    let report = knoxgate::store::schema::migrate(&mut client, &cfg.postgres, true)
        .await
        .unwrap();
    assert!(
        report.created_tables.iter().any(|t| t == "auth_group")
            && report
                .created_tables
                .iter()
                .any(|t| t == "auth_user_groups"),
        "{:?}",
        report.created_tables
    );
    assert!(installed(&client, &cfg.postgres).await);
    // Django's own constraints: one membership per pair, and deferred foreign keys.
    let dup = client
        .batch_execute(
            "INSERT INTO auth_group (name) VALUES ('g');
             INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email,
                 is_staff, is_active, date_joined) VALUES ('', false, 'u', '', '', '', false, true, now());
             INSERT INTO auth_user_groups (user_id, group_id) SELECT u.id, g.id FROM auth_user u, auth_group g;
             INSERT INTO auth_user_groups (user_id, group_id) SELECT u.id, g.id FROM auth_user u, auth_group g;",
        )
        .await;
    assert!(dup.is_err());
    // An install from before policies: no group triggers.
    client
        .batch_execute("DROP TRIGGER knoxgate_membership_changed ON auth_user_groups")
        .await
        .unwrap();
    assert!(!installed(&client, &cfg.postgres).await);
    knoxgate::store::schema::migrate(&mut client, &cfg.postgres, true)
        .await
        .unwrap();
    assert!(installed(&client, &cfg.postgres).await);
    // ...and a user trigger that does not watch the staff flag.
    client
        .batch_execute(
            "DROP TRIGGER knoxgate_user_changed ON auth_user;
             CREATE TRIGGER knoxgate_user_changed AFTER UPDATE OF is_active, password ON auth_user
                 FOR EACH ROW EXECUTE FUNCTION knoxgate_user_changed();",
        )
        .await
        .unwrap();
    assert!(!installed(&client, &cfg.postgres).await);
    knoxgate::store::schema::migrate(&mut client, &cfg.postgres, true)
        .await
        .unwrap();
    assert!(installed(&client, &cfg.postgres).await);
    // ...and one from before the username and email were watched: enough for a configuration
    // whose answers do not carry them, not for one whose answers do.
    client
        .batch_execute(
            "DROP TRIGGER knoxgate_user_changed ON auth_user;
             CREATE TRIGGER knoxgate_user_changed
                 AFTER UPDATE OF is_active, password, is_staff, is_superuser ON auth_user
                 FOR EACH ROW EXECUTE FUNCTION knoxgate_user_changed();
             ALTER TABLE auth_user ENABLE ALWAYS TRIGGER knoxgate_user_changed;",
        )
        .await
        .unwrap();
    assert!(!installed(&client, &cfg.postgres).await);
    assert!(
        knoxgate::store::schema::triggers_installed(&client, &cfg.postgres, false)
            .await
            .unwrap()
    );
    knoxgate::store::schema::migrate(&mut client, &cfg.postgres, true)
        .await
        .unwrap();
    assert!(installed(&client, &cfg.postgres).await);
    // The printed SQL is what migrate runs, group triggers included.
    let sql = knoxgate::store::schema::install_triggers_sql(&cfg.postgres);
    for needle in [
        "knoxgate_membership_changed",
        "knoxgate_group_renamed",
        "knoxgate_group_deleted",
        "AFTER UPDATE OF is_active, password, is_staff, is_superuser, username, email ON auth_user",
    ] {
        assert!(sql.contains(needle), "{needle}");
    }
    knoxgate::store::schema::uninstall_triggers(&mut client, &cfg.postgres)
        .await
        .unwrap();
    assert!(!installed(&client, &cfg.postgres).await);
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'knoxgate_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// Installed for a configuration whose answers carry the username and email (the most a
/// configuration requires).
async fn installed(c: &tokio_postgres::Client, cfg: &knoxgate::config::PostgresConfig) -> bool {
    knoxgate::store::schema::triggers_installed(c, cfg, true)
        .await
        .unwrap()
}
