//! login/ end to end against knox's recorded behaviour (FACTS.md §3, http.json): Basic and JSON
//! credentials, refusals word for word, the token limit, token settings, and re-hashing a
//! password stored with other iterations.

use std::time::Duration;

use base64::Engine;

use time::OffsetDateTime;

use crate::support::*;

const TEN_HOURS: time::Duration = time::Duration::hours(10);

#[tokio::test]
async fn basic_login_returns_knox_body_and_stores_the_row_as_knox_does() {
    let (_db, client, s) = Fixture::new().user("alice").start().await;
    let id = user_id(&client, "alice").await;
    let before = OffsetDateTime::now_utc();
    let r = login(&s, "alice", "alice-pass").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_drf_view_headers(&r);
    assert_eq!(r.header("www-authenticate"), None);
    let (expiry, token) = parse_login_body(&r.body_text());
    assert_eq!(token.len(), 64, "{token}");
    assert!(is_lower_hex(&token), "{token}");
    let expiry = expiry.expect("TOKEN_TTL is 10h: expiry is not null");
    assert_drf_expiry_format(&expiry);
    // The expiry equals the row's, to the microsecond.
    assert_eq!(Some(expiry.clone()), db_expiry_text(&client, &token).await);
    assert_eq!(rows_matching(&client, &token).await, 1);
    assert_eq!(rows_of_user(&client, id).await, 1);
    let row = client
        .query_one(
            "SELECT t.created, t.expiry, u.last_login FROM knox_authtoken t \
             JOIN auth_user u ON u.id = t.user_id WHERE t.token_key = $1",
            &[&&token[..15]],
        )
        .await
        .unwrap();
    let created: OffsetDateTime = row.get(0);
    let db_expiry: OffsetDateTime = row.get(1);
    let last_login: Option<OffsetDateTime> = row.get(2);
    let after = OffsetDateTime::now_utc();
    let slack = time::Duration::milliseconds(5);
    assert!(created >= before - slack && created <= after + slack);
    assert!(within(
        db_expiry,
        created + TEN_HOURS,
        time::Duration::SECOND
    ));
    let last_login = last_login.expect("login sets auth_user.last_login");
    assert!(last_login >= before - slack && last_login <= after + slack);
    // In Redis at once, and accepted at once.
    assert_eq!(redis_cli(6379, &["EXISTS", &redis_key(&s, &token)]), "1");
    let v = s.verify(&token).await;
    assert_eq!(v.status, 200);
    assert_eq!(v.header("x-auth-user-id"), Some(id.to_string().as_str()));
    s.stop().await;
}

#[tokio::test]
async fn the_expiry_is_shown_in_the_sites_time_zone_as_drf_shows_it() {
    // One zone east of Greenwich with summer time, one west with a half hour, and one at
    // Greenwich in winter, which DRF writes with `Z` like UTC. Postgres, from its own zone
    // data, says what each expiry looks like there.
    for zone in ["Europe/Berlin", "America/St_Johns", "Atlantic/Reykjavik"] {
        let (_db, client, s) = Fixture::new()
            .user("alice")
            .config(&format!("[sessions]\ntime_zone = \"{zone}\""))
            .start()
            .await;
        let r = login(&s, "alice", "alice-pass").await;
        assert_eq!(r.status, 200, "{}", r.body_text());
        let (expiry, token) = parse_login_body(&r.body_text());
        let expiry = expiry.expect("TOKEN_TTL is 10h: expiry is not null");
        assert_eq!(
            Some(expiry.clone()),
            db_expiry_text_in(&client, &token, zone).await,
            "{zone}"
        );
        let shown = knoxgate::auth::parse_isoformat(&expiry).expect("an offset, or Z");
        assert_eq!(Some(shown), db_expiry(&client, &token).await, "{zone}");
        assert_eq!(
            expiry.ends_with('Z'),
            zone == "Atlantic/Reykjavik",
            "{expiry}"
        );
        s.stop().await;
    }
}

#[tokio::test]
async fn login_without_the_trailing_slash_works_too() {
    let (_db, _client, s) = Fixture::new().user("alice").start().await;
    let r = http(
        s.addr(),
        "POST",
        "/api/auth/login",
        &[("Authorization", &basic("alice", "alice-pass"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    s.stop().await;
}

#[tokio::test]
async fn json_body_login_works_and_bad_bodies_are_4xx() {
    let (_db, client, s) = Fixture::new().user("alice").start().await;
    let id = user_id(&client, "alice").await;
    for content_type in ["application/json", "application/json; charset=utf-8"] {
        let r = http(
            s.addr(),
            "POST",
            LOGIN,
            &[("Content-Type", content_type)],
            br#"{"username":"alice","password":"alice-pass"}"#,
        )
        .await;
        assert_eq!(r.status, 200, "{content_type}: {}", r.body_text());
        let (expiry, token) = parse_login_body(&r.body_text());
        assert_eq!(expiry, db_expiry_text(&client, &token).await);
        assert_eq!(s.verify(&token).await.status, 200);
    }
    assert_eq!(rows_of_user(&client, id).await, 2);

    let wrong = http(
        s.addr(),
        "POST",
        LOGIN,
        &[("Content-Type", "application/json")],
        br#"{"username":"alice","password":"nope"}"#,
    )
    .await;
    assert_login_refused(&wrong, "Invalid username/password.");

    let text_plain = http(
        s.addr(),
        "POST",
        LOGIN,
        &[("Content-Type", "text/plain")],
        br#"{"username":"alice","password":"alice-pass"}"#,
    )
    .await;
    assert_eq!(text_plain.status, 415, "{}", text_plain.body_text());

    let mut big = br#"{"username":"alice","password":"alice-pass","pad":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 9000));
    big.extend_from_slice(b"\"}");
    let oversized = http(
        s.addr(),
        "POST",
        LOGIN,
        &[("Content-Type", "application/json")],
        &big,
    )
    .await;
    assert_eq!(oversized.status, 413, "{}", oversized.body_text());
    // Without a Content-Length (chunked), the limit holds while reading.
    let mut chunked = format!(
        "POST {LOGIN} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        big.len()
    )
    .into_bytes();
    chunked.extend_from_slice(&big);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let oversized = raw(s.addr(), &chunked).await;
    assert_eq!(oversized.status, 413, "{}", oversized.body_text());

    for body in [
        &b"{\"username\":\"alice\",\"password\":"[..],
        b"not json",
        b"[\"alice\",\"alice-pass\"]",
        b"{\"username\":\"alice\",\"password\":1}",
        b"{\"username\":\"alice\"}",
    ] {
        let r = http(
            s.addr(),
            "POST",
            LOGIN,
            &[("Content-Type", "application/json")],
            body,
        )
        .await;
        assert_eq!(
            r.status,
            400,
            "{}: {}",
            String::from_utf8_lossy(body),
            r.body_text()
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    // None of the refused bodies created a token.
    assert_eq!(rows_of_user(&client, id).await, 2);
    s.stop().await;
}

#[tokio::test]
async fn utf8_password_in_basic_credentials_logs_in() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    insert_user(&client, "dora", "pässwörd✓", true).await;
    let s = TestServer::start(&db, "").await;
    // http.json login_success_utf8_password: base64 of UTF-8 "dora:pässwörd✓".
    let header = "Basic ZG9yYTpww6Rzc3fDtnJk4pyT";
    assert_eq!(header, basic("dora", "pässwörd✓"));
    let r = http(s.addr(), "POST", LOGIN, &[("Authorization", header)], b"").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    let (_, token) = parse_login_body(&r.body_text());
    assert_eq!(s.verify(&token).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn latin1_basic_credentials_are_decoded_as_drf_falls_back_to_latin1() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    insert_user(&client, "dora", "pässwörd", true).await;
    let s = TestServer::start(&db, "").await;
    // "dora:pässwörd" in latin-1: not valid UTF-8.
    let latin1: Vec<u8> = "dora:pässwörd".chars().map(|c| c as u8).collect();
    assert!(std::str::from_utf8(&latin1).is_err());
    let header = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(&latin1)
    );
    let r = http(s.addr(), "POST", LOGIN, &[("Authorization", &header)], b"").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    s.stop().await;
}

#[tokio::test]
async fn login_refusals_match_knox_word_for_word() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let alice = insert_user(&client, "alice", "alice-pass", true).await;
    let bob = insert_user(&client, "bob_inactive", "bob-pass", false).await;
    let s = TestServer::start(&db, "").await;
    let invalid = "Invalid username/password.";
    assert_login_refused(&login(&s, "alice", "wrong").await, invalid);
    assert_login_refused(&login(&s, "nobody", "x").await, invalid);
    assert_login_refused(&login(&s, "bob_inactive", "bob-pass").await, invalid);
    let none = http(s.addr(), "POST", LOGIN, &[], b"").await;
    assert_login_refused(&none, "Authentication credentials were not provided.");
    let bad = http(
        s.addr(),
        "POST",
        LOGIN,
        &[("Authorization", "Basic !!!notbase64")],
        b"",
    )
    .await;
    assert_login_refused(
        &bad,
        "Invalid basic header. Credentials not correctly base64 encoded.",
    );
    // The rest of DRF's BasicAuthentication parsing.
    let no_colon = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice")
    );
    for (header, detail) in [
        ("Basic", "Invalid basic header. No credentials provided."),
        (
            "Basic YWxpY2U6YWxpY2UtcGFzcw== x",
            "Invalid basic header. Credentials string should not contain spaces.",
        ),
        (
            "Basic YWxpY2U6YWxpY2UtcGFzcw",
            "Invalid basic header. Credentials not correctly base64 encoded.",
        ),
        (
            no_colon.as_str(),
            "Invalid basic header. Credentials not correctly base64 encoded.",
        ),
        // Another scheme is not Basic: no credentials at all.
        (
            "Token 0123456789abcdef",
            "Authentication credentials were not provided.",
        ),
    ] {
        let r = http(s.addr(), "POST", LOGIN, &[("Authorization", header)], b"").await;
        assert_login_refused(&r, detail);
    }
    // Two Authorization headers: Django reads them joined with ", ", and DRF then refuses the
    // three-word value; knoxgate never logs in with the first one alone.
    let alice_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:alice-pass")
    );
    let headers = [
        ("Authorization", alice_basic.as_str()),
        ("Authorization", alice_basic.as_str()),
    ];
    let r = http(s.addr(), "POST", LOGIN, &headers, b"").await;
    assert_login_refused(
        &r,
        "Invalid basic header. Credentials string should not contain spaces.",
    );
    // A JSON content type with an empty body carries no credentials either.
    let r = http(
        s.addr(),
        "POST",
        LOGIN,
        &[("Content-Type", "application/json")],
        b"",
    )
    .await;
    assert_login_refused(&r, "Authentication credentials were not provided.");
    assert_eq!(rows_of_user(&client, alice).await, 0);
    assert_eq!(rows_of_user(&client, bob).await, 0);
    let last_login: Option<OffsetDateTime> = client
        .query_one("SELECT last_login FROM auth_user WHERE id = $1", &[&alice])
        .await
        .unwrap()
        .get(0);
    assert_eq!(last_login, None, "a refused login does not set last_login");
    s.stop().await;
}

#[tokio::test]
async fn a_nul_character_in_the_credentials_is_a_refusal_not_an_outage() {
    let (_db, _client, s) = Fixture::new().user("alice").start().await;
    // Postgres text cannot hold NUL, so no such user exists: 401, never 5xx.
    let r = login(&s, "ali\0ce", "alice-pass").await;
    assert_login_refused(&r, "Invalid username/password.");
    let r = http(
        s.addr(),
        "POST",
        LOGIN,
        &[("Content-Type", "application/json")],
        br#"{"username":"alice\u0000","password":"alice-pass"}"#,
    )
    .await;
    assert_login_refused(&r, "Invalid username/password.");
    assert_eq!(s.metric("knoxgate_postgres_errors_total").await, 0.0);
    login_ok(&s, "alice", "alice-pass").await;
    s.stop().await;
}

#[tokio::test]
async fn authenticated_get_on_login_is_405_and_creates_nothing() {
    let (_db, client, s) = Fixture::new().user("alice").start().await;
    let id = user_id(&client, "alice").await;
    let r = http(
        s.addr(),
        "GET",
        LOGIN,
        &[("Authorization", &basic("alice", "alice-pass"))],
        b"",
    )
    .await;
    assert_detail(&r, 405, "Method \"GET\" not allowed.");
    assert_drf_view_headers(&r);
    // Authentication comes first: without credentials GET is 401, not 405.
    let r = http(s.addr(), "GET", LOGIN, &[], b"").await;
    assert_login_refused(&r, "Authentication credentials were not provided.");
    assert_eq!(rows_of_user(&client, id).await, 0);
    s.stop().await;
}

/// Waits (up to 5 s) for `user_id` to hold `rows` tokens: a login deletes the user's expired
/// tokens after it has answered.
async fn assert_rows_become(client: &tokio_postgres::Client, user_id: i32, rows: i64, what: &str) {
    let reached = eventually(Duration::from_secs(5), || async {
        rows_of_user(client, user_id).await == rows
    })
    .await;
    assert!(
        reached.is_some(),
        "{what}: {} rows, not {rows}",
        rows_of_user(client, user_id).await
    );
}

#[tokio::test]
async fn token_limit_per_user_refuses_the_second_login_and_ignores_expired_rows() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let id = insert_user(&client, "carol", "carol-pass", true).await;
    // An expired row: knox's count only includes unexpired tokens.
    client
        .execute(
            "INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) \
             VALUES (repeat('e', 128), now() - interval '11 hours', $1, \
                     now() - interval '1 hour', 'eeeeeeeeeeeeeee')",
            &[&id],
        )
        .await
        .unwrap();
    let s = TestServer::start(&db, "[knox]\ntoken_limit_per_user = 1").await;
    let first = login_ok(&s, "carol", "carol-pass").await;
    // The expired row did not count, and the login deleted it (after answering).
    assert_rows_become(&client, id, 1, "the expired row deleted").await;
    let r = login(&s, "carol", "carol-pass").await;
    assert_eq!(r.status, 403, "{}", r.body_text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_drf_view_headers(&r);
    assert_eq!(
        r.body_text(),
        r#"{"error":"Maximum amount of tokens allowed per user exceeded."}"#
    );
    assert_eq!(rows_of_user(&client, id).await, 1, "no row added");
    assert_eq!(s.verify(&first).await.status, 200);
    // Once the live token is gone, login works again.
    assert_eq!(post_with_token(&s, LOGOUT, &first).await.status, 204);
    login_ok(&s, "carol", "carol-pass").await;
    s.stop().await;
}

#[tokio::test]
async fn a_login_deletes_the_users_expired_tokens_and_nothing_else() {
    use knoxgate::store::postgres::LOGIN_CLEANUP_BATCH;
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let carol = insert_user(&client, "carol", "carol-pass", true).await;
    let dave = insert_user(&client, "dave", "dave-pass", true).await;
    let sha512 = knoxgate::auth::HashAlgorithm::Sha512;
    let live = insert_token(&client, carol, Some(Duration::from_secs(3600)), "", sha512).await;
    let forever = insert_token(&client, carol, None, "", sha512).await;
    // knox deletes a user's expired tokens whenever the user authenticates; behind knoxgate
    // Django no longer does, so a login must, or dropped tokens would pile up for ever. More
    // than one login clears at a time for carol.
    let expired = |user: i32, n: u32| {
        format!(
            "INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) \
             SELECT md5('{user}-' || g) || md5('{user}+' || g), now() - interval '11 hours', \
                    {user}, now() - interval '1 hour', substr(md5('{user}-' || g), 1, 15) \
             FROM generate_series(1, {n}) g"
        )
    };
    let extra = 5;
    client
        .batch_execute(&expired(carol, LOGIN_CLEANUP_BATCH + extra))
        .await
        .unwrap();
    client.batch_execute(&expired(dave, 2)).await.unwrap();
    let s = TestServer::start(&db, "").await;
    let first = login_ok(&s, "carol", "carol-pass").await;
    assert_rows_become(
        &client,
        carol,
        3 + i64::from(extra),
        "one batch deleted; live, never-expiring and new kept",
    )
    .await;
    // Cached all the same (its own deletions' notifications do not undo that).
    let cached = eventually(Duration::from_secs(5), || async {
        redis_cli(6379, &["EXISTS", &redis_key(&s, &first)]) == "1"
    })
    .await;
    assert!(cached.is_some(), "the new token was not written to Redis");
    let second = login_ok(&s, "carol", "carol-pass").await;
    assert_rows_become(&client, carol, 4, "the rest deleted").await;
    assert_eq!(
        rows_of_user(&client, dave).await,
        2,
        "another user's rows are theirs to lose"
    );
    for token in [&live.token, &forever.token, &first, &second] {
        assert_eq!(s.verify(token).await.status, 200);
    }
    s.stop().await;
}

#[tokio::test]
async fn token_limit_counts_tokens_without_expiry_as_knox_does() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let id = insert_user(&client, "carol", "carol-pass", true).await;
    // knox 5.1 counts `Q(expiry__gt=now) | Q(expiry__isnull=True)`.
    insert_token(&client, id, None, "", knoxgate::auth::HashAlgorithm::Sha512).await;
    let s = TestServer::start(&db, "[knox]\ntoken_limit_per_user = 1").await;
    let r = login(&s, "carol", "carol-pass").await;
    assert_eq!(r.status, 403, "{}", r.body_text());
    assert_eq!(rows_of_user(&client, id).await, 1);
    s.stop().await;
}

#[tokio::test]
async fn concurrent_logins_never_exceed_the_token_limit() {
    let (_db, client, s) = Fixture::new()
        .user("carol")
        .config("[knox]\ntoken_limit_per_user = 2\n[sessions]\nhash_concurrency = 8")
        .start()
        .await;
    let id = user_id(&client, "carol").await;
    // Eight logins at once; the per-user row lock must serialise the count and the insert.
    let addr = s.addr();
    let auth = basic("carol", "carol-pass");
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let auth = auth.clone();
        set.spawn(async move { http(addr, "POST", LOGIN, &[("Authorization", &auth)], b"").await });
    }
    let responses = set.join_all().await;
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    let ok = statuses.iter().filter(|&&st| st == 200).count();
    let refused = statuses.iter().filter(|&&st| st == 403).count();
    assert_eq!((ok, refused), (2, 6), "{statuses:?}");
    assert_eq!(rows_of_user(&client, id).await, 2);
    // Each login cached its token, whatever the other logins did meanwhile.
    for r in responses.iter().filter(|r| r.status == 200) {
        let (_, token) = parse_login_body(&r.body_text());
        assert_eq!(redis_cli(6379, &["EXISTS", &redis_key(&s, &token)]), "1");
    }
    s.stop().await;
}

#[tokio::test]
async fn token_ttl_none_gives_null_expiry_and_a_null_row_expiry() {
    let (_db, client, s) = Fixture::new()
        .user("erin")
        .config("[knox]\ntoken_ttl = \"none\"")
        .start()
        .await;
    let r = login(&s, "erin", "erin-pass").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert!(r.body_text().starts_with("{\"expiry\":null,\"token\":\""));
    let (expiry, token) = parse_login_body(&r.body_text());
    assert_eq!(expiry, None);
    assert_eq!(db_expiry(&client, &token).await, None);
    assert_eq!(s.verify(&token).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn token_prefix_is_prepended_to_new_tokens() {
    let (_db, client, s) = Fixture::new()
        .user("alice")
        .config("[knox]\ntoken_prefix = \"myapp_\"")
        .start()
        .await;
    let token = login_ok(&s, "alice", "alice-pass").await;
    assert_eq!(token.len(), 70, "{token}");
    let random = token
        .strip_prefix("myapp_")
        .expect("token starts with the prefix");
    assert!(is_lower_hex(random), "{token}");
    // token_key is the first 15 characters, prefix included; digest covers the whole token.
    assert_eq!(rows_matching(&client, &token).await, 1);
    assert_eq!(s.verify(&token).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn login_rehashes_a_password_stored_with_other_iterations() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    insert_user(&client, "alice", "alice-pass", true).await;
    let old = knoxgate::password::make_password("alice-pass", 500);
    assert!(old.starts_with("pbkdf2_sha256$500$"), "{old}");
    client
        .execute(
            "UPDATE auth_user SET password = $1 WHERE username = 'alice'",
            &[&old],
        )
        .await
        .unwrap();
    let s = TestServer::start(&db, "").await;
    // A wrong password changes nothing.
    assert_eq!(login(&s, "alice", "wrong").await.status, 401);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored_password(&client, "alice").await, old);
    // The right one logs in and the hash is rewritten with the configured 1000 iterations.
    let token = login_ok(&s, "alice", "alice-pass").await;
    let rewritten = eventually(Duration::from_secs(3), || async {
        stored_password(&client, "alice").await != old
    })
    .await;
    assert!(rewritten.is_some(), "password was not re-hashed");
    let new = stored_password(&client, "alice").await;
    assert!(new.starts_with("pbkdf2_sha256$1000$"), "{new}");
    assert!(knoxgate::password::check_password("alice-pass", &new));
    assert!(!knoxgate::password::must_update(&new, 1000));
    // The re-hash revokes nothing and the new hash logs in (without another rewrite).
    assert_eq!(s.verify(&token).await.status, 200);
    login_ok(&s, "alice", "alice-pass").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored_password(&client, "alice").await, new);
    s.stop().await;
}

/// Django re-hashes whenever the password is right: an inactive user's login (refused as a
/// wrong password) and a GET with the right credentials (405) rewrite an old hash too.
#[tokio::test]
async fn a_right_password_is_rehashed_even_when_the_login_is_refused_after_it() {
    let (_db, client, s) = Fixture::new().user("inactive").user("getter").start().await;
    client
        .execute(
            "UPDATE auth_user SET is_active = false WHERE username = 'inactive'",
            &[],
        )
        .await
        .unwrap();
    let mut old = Vec::new();
    for user in ["inactive", "getter"] {
        let hash = knoxgate::password::make_password(&format!("{user}-pass"), 500);
        client
            .execute(
                "UPDATE auth_user SET password = $1 WHERE username = $2",
                &[&hash, &user],
            )
            .await
            .unwrap();
        old.push(hash);
    }
    assert_login_refused(
        &login(&s, "inactive", "inactive-pass").await,
        "Invalid username/password.",
    );
    let auth = basic("getter", "getter-pass");
    let got = http(s.addr(), "GET", LOGIN, &[("Authorization", &auth)], b"").await;
    assert_eq!(got.status, 405, "{}", got.body_text());
    for (user, old) in ["inactive", "getter"].into_iter().zip(old) {
        let rewritten = eventually(Duration::from_secs(3), || async {
            stored_password(&client, user).await != old
        })
        .await;
        assert!(rewritten.is_some(), "{user}: password was not re-hashed");
        let new = stored_password(&client, user).await;
        assert!(new.starts_with("pbkdf2_sha256$1000$"), "{user}: {new}");
    }
    s.stop().await;
}

/// A stored hash asking for more work than a `sessions.max_*` cap allows is refused unchecked
/// and counted (the operator's cue to raise the cap); with the cap raised it logs in.
#[tokio::test]
async fn a_hash_over_a_cost_cap_is_counted_and_logs_in_once_the_cap_is_raised() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    insert_user(&client, "costly", "costly-pass", true).await;
    let costly = knoxgate::password::make_password("costly-pass", 3_000);
    client
        .execute(
            "UPDATE auth_user SET password = $1 WHERE username = 'costly'",
            &[&costly],
        )
        .await
        .unwrap();
    let capped = TestServer::start(&db, "[sessions]\nmax_pbkdf2_iterations = 2000").await;
    assert_login_refused(
        &login(&capped, "costly", "costly-pass").await,
        "Invalid username/password.",
    );
    let counted = "knoxgate_password_hashes_over_cap_total{algorithm=\"pbkdf2_sha256\"}";
    assert_eq!(capped.metric(counted).await, 1.0);
    // A wrong password for a user within the caps is not counted.
    insert_user(&client, "cheap", "cheap-pass", true).await;
    assert_eq!(login(&capped, "cheap", "wrong").await.status, 401);
    assert_eq!(capped.metric(counted).await, 1.0);
    capped.stop().await;
    let raised = TestServer::start(&db, "[sessions]\nmax_pbkdf2_iterations = 3000").await;
    login_ok(&raised, "costly", "costly-pass").await;
    assert_eq!(raised.metric(counted).await, 0.0);
    raised.stop().await;
}

/// Median wall time of `n` refused logins as `username`.
/// How long a refused login of `username` takes.
async fn refused_login_time(s: &TestServer, username: &str) -> Duration {
    let started = std::time::Instant::now();
    let r = login(s, username, "wrong-password").await;
    let took = started.elapsed();
    assert_eq!(r.status, 401, "{username}: {}", r.body_text());
    took
}

#[tokio::test]
async fn refused_logins_take_as_long_whatever_the_users_hash() {
    // A wrong password for a user stored at the configured cost is the reference. Unknown
    // users, unusable passwords ("!…", Django's set_unusable_password), unknown algorithms
    // and cheaper hashes must not answer visibly faster (timing would reveal them).
    const ITERATIONS: u32 = 300_000;
    let (_db, client, s) = Fixture::new()
        .user("full")
        .user("cheap")
        .user("unusable")
        .user("alien")
        .config(&format!(
            "[sessions]\npassword_iterations = {ITERATIONS}\n[server]\nrequest_timeout = \"10s\""
        ))
        .start()
        .await;
    let set = |user: &'static str, encoded: String| {
        let client = &client;
        async move {
            client
                .execute(
                    "UPDATE auth_user SET password = $1 WHERE username = $2",
                    &[&encoded, &user],
                )
                .await
                .unwrap();
        }
    };
    set(
        "full",
        knoxgate::password::make_password("full-pass", ITERATIONS),
    )
    .await;
    // "cheap" keeps its 1,000-iteration hash.
    set("unusable", "!Zq1x8sd0unusablepasswordmarker".into()).await;
    set(
        "alien",
        "sha1$salt$0123456789abcdef0123456789abcdef01234567".into(),
    )
    .await;
    // Warm up connections and threads.
    refused_login_time(&s, "full").await;
    for user in ["cheap", "unusable", "alien", "no-such-user"] {
        // The quickest of five, each beside a reference login: the work itself, whatever else
        // the machine was doing during the others (other load only ever adds time).
        let (mut t, mut reference) = (Duration::MAX, Duration::MAX);
        for _ in 0..5 {
            reference = reference.min(refused_login_time(&s, "full").await);
            t = t.min(refused_login_time(&s, user).await);
        }
        eprintln!("refused login: {user} {t:?}, reference {reference:?}");
        // Without the padding these answer in well under 1 % of the reference; a quarter leaves
        // room for a loaded machine (the exact work is pinned by password's unit tests).
        assert!(
            t * 4 >= reference,
            "{user}: {t:?} against {reference:?} for a wrong password at the configured cost"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn a_rehash_never_overwrites_a_password_changed_since_the_login_checked_it() {
    // The re-hash on login runs after the answer, behind other hashing work; an admin's reset
    // in between must stand.
    let db = TestDb::migrated().await;
    let client = db.client().await;
    insert_user(&client, "alice", "alice-pass", true).await;
    let checked = stored_password(&client, "alice").await;
    let s = TestServer::start(&db, "").await;
    let pg = s.running.app.store.postgres();
    let reset = knoxgate::password::make_password("new-pass", 1000);
    client
        .execute(
            "UPDATE auth_user SET password = $1 WHERE username = 'alice'",
            &[&reset],
        )
        .await
        .unwrap();
    let upgraded = knoxgate::password::make_password("alice-pass", 1000);
    assert!(
        !pg.upgrade_password("alice", &checked, &upgraded)
            .await
            .unwrap()
    );
    assert_eq!(stored_password(&client, "alice").await, reset);
    // Still the hash the login checked: replaced.
    assert!(
        pg.upgrade_password("alice", &reset, &upgraded)
            .await
            .unwrap()
    );
    assert_eq!(stored_password(&client, "alice").await, upgraded);
    s.stop().await;
}

/// A login caches its new token with the user as the insert found them, not as they were read
/// before the password check: a deactivation or a lost `is_staff` during the check (a looping
/// attacker with stolen credentials against an admin's action) is what the first `/verify`
/// sees, as knox, which reads the user per request, would.
#[tokio::test]
async fn a_user_changed_during_the_password_check_is_cached_as_changed() {
    // The slow hash's own iterations: no re-hash after a login, so each round checks it anew
    // (and no password change, which the feed reports, evicts what the login cached).
    let (_db, client, s) = Fixture::new()
        .user("erin")
        .config("[sessions]\npassword_iterations = 1000000")
        .start()
        .await;
    // A slow hash (~0.2 s or more here) leaves time to change the user while it is checked.
    let slow = knoxgate::password::make_password("erin-pass", 1_000_000);
    client
        .execute(
            "UPDATE auth_user SET password = $1, is_staff = true WHERE username = 'erin'",
            &[&slow],
        )
        .await
        .unwrap();
    for (change, then, refused) in [
        (
            "UPDATE auth_user SET is_staff = false WHERE username = 'erin'",
            "/verify?require=staff",
            403,
        ),
        (
            "UPDATE auth_user SET is_active = false WHERE username = 'erin'",
            "/verify",
            401,
        ),
    ] {
        let (r, _) = tokio::join!(login(&s, "erin", "erin-pass"), async {
            // Well after the login read the user, well before its ~0.3 s or more of hashing ends.
            tokio::time::sleep(Duration::from_millis(120)).await;
            client.execute(change, &[]).await.unwrap();
        });
        // knox issues the token (the user was checked before the change) ...
        assert_eq!(r.status, 200, "{}", r.body_text());
        let token = parse_login_body(&r.body_text()).1;
        // ... and refuses it on first use.
        let auth = format!("Token {token}");
        let v = http(
            s.addr(),
            "GET",
            then,
            &[("Authorization", auth.as_str())],
            b"",
        )
        .await;
        assert_eq!(v.status, refused, "{change}: {}", v.body_text());
    }
    s.stop().await;
}

/// What follows the commit (writing the token to Redis, deleting the user's expired tokens)
/// does not hold up the answer: with Redis stopped, so that the write waits its whole
/// `redis.command_timeout` (here longer than the 3-s request deadline), a login is still
/// answered 200 at once, rather than 503 with its token already committed (and, under
/// `TOKEN_LIMIT_PER_USER`, counted against the client's retry).
#[tokio::test]
async fn a_login_is_answered_once_its_token_is_committed() {
    let redis = PrivateRedis::start().await;
    let (_db, client, s) = Fixture::new()
        .user("alice")
        .config(&format!(
            "[redis]\nurl = \"{}\"\ncommand_timeout = \"10s\"\nunresponsive_timeout = \"10s\"",
            redis.url()
        ))
        .start()
        .await;
    assert_eq!(login(&s, "alice", "alice-pass").await.status, 200);
    redis.sigstop();
    let started = std::time::Instant::now();
    let r = login(&s, "alice", "alice-pass").await;
    let took = started.elapsed();
    redis.sigcont();
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert!(
        took < Duration::from_secs(1),
        "the login waited {took:?} on Redis after its commit"
    );
    let id = user_id(&client, "alice").await;
    let tokens: i64 = client
        .query_one(
            "SELECT count(*) FROM knox_authtoken WHERE user_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tokens, 2);
    s.stop().await;
}

/// With COMMITs fast again, the client's retry gets its token: the limit of one token a user
/// holds nothing left of the failed login.
async fn assert_retry_logs_in(client: &tokio_postgres::Client, s: &TestServer) {
    client
        .batch_execute("DROP TRIGGER slow_commit ON knox_authtoken")
        .await
        .unwrap();
    let retry = login(s, "alice", "alice-pass").await;
    assert_eq!(retry.status, 200, "{}", retry.body_text());
}

/// A 1-s request deadline, the login's transaction given far longer, and one token a user.
const LOGIN_OUTLIVES_ITS_REQUEST: &str = "[server]\nrequest_timeout = \"1s\"\n\
     [sessions]\nhash_queue_timeout = \"500ms\"\n[knox]\ntoken_limit_per_user = 1";

/// User alice, and a server whose logins outlive their requests by far (`statement_timeout`
/// 5 s: a transaction deadline of 21 s).
async fn alice_with_logins_outliving_requests() -> (TestDb, tokio_postgres::Client, TestServer) {
    Fixture::new()
        .user("alice")
        .config(&format!(
            "{LOGIN_OUTLIVES_ITS_REQUEST}\n[postgres]\nstatement_timeout = \"5s\""
        ))
        .start()
        .await
}

/// A login whose request deadline passes while its COMMIT is on its way (here a deferred
/// trigger holds the COMMIT 2 s; the deadline is 1 s) is answered 503, and the token that
/// COMMIT makes is deleted: nobody received it, and under `TOKEN_LIMIT_PER_USER` it would
/// refuse the client's retry.
#[tokio::test]
async fn a_login_answered_503_leaves_no_token_behind() {
    let (_db, client, s) = alice_with_logins_outliving_requests().await;
    let alice = user_id(&client, "alice").await;
    slow_commits(&client, 2.0).await;
    let r = login(&s, "alice", "alice-pass").await;
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert_committed(&client).await;
    assert_rows_become(&client, alice, 0, "the unreceived token deleted").await;
    assert_retry_logs_in(&client, &s).await;
    s.stop().await;
}

/// A login answered 503 before its COMMIT (here it waits for a lock the test holds) rolls its
/// transaction back and cancels the statement it was waiting in: the lock wait ends long before
/// `statement_timeout` (5 s), and once the lock is free, no token is inserted for a client that
/// is gone.
#[tokio::test]
async fn a_login_answered_503_before_its_commit_is_rolled_back() {
    // A 2-s request deadline: time enough to reach the lock on a loaded machine.
    let (db, client, s) = Fixture::new()
        .user("alice")
        .config(
            "[server]\nrequest_timeout = \"2s\"\n[sessions]\nhash_queue_timeout = \"500ms\"\n\
             [knox]\ntoken_limit_per_user = 1\n[postgres]\nstatement_timeout = \"5s\"",
        )
        .start()
        .await;
    let alice = user_id(&client, "alice").await;
    slow_commits(&client, 0.0).await;
    let login = login(&s, "alice", "alice-pass");
    let holder =
        assert_abandoned_login_lets_go_of_the_lock(&db, &client, "alice", login, String::new).await;
    holder.batch_execute("COMMIT").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let committed = count(&client, "SELECT count(*) FROM committed").await;
    assert_eq!(committed, 0, "a token was committed after its login's 503");
    assert_eq!(rows_of_user(&client, alice).await, 0);
    assert_retry_logs_in(&client, &s).await;
    s.stop().await;
}

/// Abandoned logins are cancelled at most four at a time (`store::cancel`'s cap): beyond it, a
/// login's connection is closed without a cancel, and its statement runs on until
/// `statement_timeout`, rather than each cancel adding a connection to a server that is slow
/// already. Six logins wait for a lock the test holds; once they are waiting, new connections
/// to Postgres take 3 s to get through (so the first cancels still hold their places when the
/// last logins are given up); all six are answered 503, and of their six lock waits, the four
/// cancelled end and two go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_logins_are_cancelled_at_most_four_at_a_time() {
    const LOGINS: i64 = 6;
    const CANCELS_AT_ONCE: i64 = 4;
    let db = TestDb::migrated().await;
    let client = db.client().await;
    insert_user(&client, "alice", "alice-pass", true).await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let s = server_behind_slow_postgres(
        &db,
        &proxy,
        "[server]\nrequest_timeout = \"4s\"\n[sessions]\nhash_queue_timeout = \"3s\"\n\
         [postgres]\npool_size = 8\nstatement_timeout = \"30s\"",
    )
    .await;
    let holder = db.client().await;
    holder.execute("BEGIN", &[]).await.unwrap();
    holder
        .execute(
            "SELECT 1 FROM auth_user WHERE username = 'alice' FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    let logins =
        futures_util::future::join_all((0..LOGINS).map(|_| login(&s, "alice", "alice-pass")));
    let (answers, ()) = tokio::join!(logins, async {
        let waiting = eventually(Duration::from_millis(3500), || async {
            count(&client, LOCK_WAITS).await == LOGINS
        })
        .await;
        assert!(
            waiting.is_some(),
            "the logins were not all seen waiting for the lock"
        );
        proxy.set_connect_delay(Duration::from_secs(3));
    });
    for r in &answers {
        assert_eq!(r.status, 503, "{}", r.body_text());
    }
    let left = LOGINS - CANCELS_AT_ONCE;
    let cancelled = eventually(Duration::from_secs(8), || async {
        count(&client, LOCK_WAITS).await == left
    })
    .await;
    assert!(
        cancelled.is_some(),
        "not {left} lock waits left after the cancels: {}",
        count(&client, LOCK_WAITS).await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count(&client, LOCK_WAITS).await,
        left,
        "a login beyond the cap was cancelled after all"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    s.stop().await;
}

/// `postgres.url` may list several hosts, and the pool does not say which one a connection
/// reached: an abandoned login's cancel goes to each. Here the URL lists a port that refuses
/// connections, then Postgres, then one that accepts connections and never answers (a proxy
/// that holds each one 60 s): the pool's connections are Postgres's, and the lock wait of an
/// abandoned login ends long before `statement_timeout`, the silent host notwithstanding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_login_is_cancelled_on_whichever_listed_host_has_it() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    insert_user(&client, "alice", "alice-pass", true).await;
    let silent = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    silent.set_connect_delay(Duration::from_secs(60));
    let refused = free_port();
    let hosts = format!(
        "127.0.0.1:{refused},127.0.0.1:5432,127.0.0.1:{}",
        silent.port
    );
    let url = db.url.replace("127.0.0.1:5432", &hosts);
    assert_ne!(url, db.url, "the URL lists three hosts");
    let config = format!(
        "[postgres]\nurl = \"{url}\"\nfeed_url = \"{}\"\nstatement_timeout = \"5s\"\n\
         [redis]\nurl = \"\"\n[server]\nrequest_timeout = \"2s\"\n\
         [sessions]\nhash_queue_timeout = \"500ms\"\n[knox]\ntoken_limit_per_user = 1",
        db.url
    );
    let s = TestServer::start(&db, &config).await;
    let abandoned = login(&s, "alice", "alice-pass");
    let holder =
        assert_abandoned_login_lets_go_of_the_lock(&db, &client, "alice", abandoned, || {
            format!(" (URL hosts {hosts})")
        })
        .await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    let retry = login(&s, "alice", "alice-pass").await;
    assert_eq!(retry.status, 200, "{}", retry.body_text());
    s.stop().await;
}

/// A COMMIT whose answer never comes (Postgres committed; the reply is held by a proxy until
/// after the transaction's deadline) leaves the login's outcome unknown to knoxgate: it answers
/// 503 and deletes the token in case it was committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_left_unanswered_is_undone() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let alice = insert_user(&client, "alice", "alice-pass", true).await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    // statement_timeout 2 s: the transaction's deadline is 4 x 2.25 s.
    let s = server_behind_slow_postgres(
        &db,
        &proxy,
        &format!("{LOGIN_OUTLIVES_ITS_REQUEST}\n[postgres]\nstatement_timeout = \"2s\""),
    )
    .await;
    // Longer than the request's deadline: the answer is 503 however late the delay below.
    slow_commits(&client, 1.5).await;
    let started = std::time::Instant::now();
    let (r, ()) = tokio::join!(login(&s, "alice", "alice-pass"), async {
        // Once the COMMIT is running, its answer is held for far longer than the deadline.
        let committing = eventually(Duration::from_millis(1400), || async {
            let sql = "SELECT count(*) FROM pg_stat_activity \
                       WHERE datname = current_database() AND query = 'COMMIT' \
                         AND state = 'active'";
            count(&client, sql).await == 1
        })
        .await;
        assert!(committing.is_some(), "no COMMIT seen running");
        proxy.set_delay(Duration::from_secs(60));
    });
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert_committed(&client).await;
    // The COMMIT's answer has reached the proxy, to be held for 60 s; what is sent from now on
    // goes through at once, so the delete can reach Postgres.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_delay(Duration::ZERO);
    let deleted = eventually(Duration::from_secs(15), || async {
        rows_of_user(&client, alice).await == 0
    })
    .await;
    assert!(
        deleted.is_some(),
        "the token of the unanswered COMMIT stays"
    );
    // Deleted as an unknown outcome, at the transaction's deadline (9 s after it began), not
    // as a row committed for a caller that had gone.
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "deleted after {:?}, before the deadline",
        started.elapsed()
    );
    assert_retry_logs_in(&client, &s).await;
    s.stop().await;
}

/// A COMMIT answered with an error (a deferred trigger raises in it) has an outcome knoxgate
/// cannot know, as has any failure once COMMIT was sent (the error may be PgBouncer's). Its
/// token is looked for once: the same statement sees that the login's transaction had ended,
/// so nothing will ever be there, and it is not looked for again. (Postgres sends the error
/// just before it ends the transaction: a look that came in between would be a retry here.
/// The 1 s `statement_timeout` leaves the first look plenty of time, and a failed one would
/// show in the error count.)
#[tokio::test]
async fn a_commit_that_failed_has_its_token_looked_for_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let alice = insert_user(&client, "alice", "alice-pass", true).await;
    client
        .batch_execute(
            "CREATE FUNCTION failing_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'refused at COMMIT'; END $$;
             CREATE CONSTRAINT TRIGGER failing_commit AFTER INSERT ON knox_authtoken
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION failing_commit();",
        )
        .await
        .unwrap();
    // A transaction deadline of 4 x 1.25 s: a second attempt would come 5 s after the first.
    let s = TestServer::start(&db, "[postgres]\nstatement_timeout = \"1s\"").await;
    let errors = "knoxgate_postgres_errors_total";
    let errors_before = s.metric(errors).await;
    let r = login(&s, "alice", "alice-pass").await;
    assert!(r.status >= 500, "{} {}", r.status, r.body_text());
    let looked_for = "knoxgate_sql_statements_total{statement=\"delete_unreceived\"}";
    let once = eventually(Duration::from_secs(2), || async {
        s.metric(looked_for).await == 1.0
    })
    .await;
    assert!(once.is_some(), "the token was not looked for");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(s.metric(looked_for).await, 1.0, "looked for again");
    assert_eq!(
        s.metric(errors).await - errors_before,
        1.0,
        "Postgres failures other than the COMMIT's"
    );
    assert_eq!(rows_of_user(&client, alice).await, 0);
    s.stop().await;
}

/// A login whose transaction outlives its request is awaited when the process is told to stop:
/// SIGTERM right after the 503 (the COMMIT takes 3 s; the request deadline is 2 s), and the
/// process exits only once that COMMIT has ended and the token it made, which nobody received,
/// is deleted.
#[tokio::test]
async fn sigterm_waits_for_a_login_left_running_and_deletes_its_token() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let alice = insert_user(&client, "alice", "alice-pass", true).await;
    slow_commits(&client, 3.0).await;
    let b = Binary::spawn(
        &db.url,
        &[
            ("KNOXGATE_REQUEST_TIMEOUT", "2s".into()),
            ("KNOXGATE_SESSIONS_HASH_QUEUE_TIMEOUT", "500ms".into()),
            ("KNOXGATE_KNOX_TOKEN_LIMIT_PER_USER", "1".into()),
            ("KNOXGATE_POSTGRES_STATEMENT_TIMEOUT", "5s".into()),
        ],
    );
    assert!(b.wait_up(Duration::from_secs(30)).await, "{}", b.log());
    let auth = basic("alice", "alice-pass");
    let (r, committing) = while_watching(
        &client,
        COMMITS_RUNNING,
        http(b.addr, "POST", LOGIN, &[("Authorization", &auth)], b""),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert!(committing, "the login's COMMIT was not running at its 503");
    let status = tokio::time::timeout(Duration::from_secs(30), b.terminate())
        .await
        .expect("the process exits within its shutdown grace");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM committed").await,
        1,
        "the process exited before the login's COMMIT had ended"
    );
    assert_eq!(
        rows_of_user(&client, alice).await,
        0,
        "the token nobody received outlived the process"
    );
}

/// The backend pids of knoxgate's pooled connections to `database`.
async fn pooled_backends(client: &tokio_postgres::Client, database: &str) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            &[&database, &knoxgate::store::pg::APPLICATION_NAME],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// User alice, logged in once, and a server with one pooled connection (which that login
/// used).
async fn alice_logged_in_on_one_connection() -> (TestDb, tokio_postgres::Client, TestServer) {
    let (db, client, s) = Fixture::new()
        .user("alice")
        .config("[postgres]\npool_size = 1")
        .start()
        .await;
    login_ok(&s, "alice", "alice-pass").await;
    (db, client, s)
}

/// A login refused with a standby's error (here a trigger answers the INSERT with the code a
/// demoted primary gives, `read_only_sql_transaction`) takes its connection out of the pool, as
/// every other statement's does: put back, that connection would refuse every login for as long
/// as it lives, since lookups, which a standby answers, never replace it.
#[tokio::test]
async fn a_login_refused_as_by_a_standby_leaves_its_connection_out_of_the_pool() {
    let (db, client, s) = alice_logged_in_on_one_connection().await;
    let pooled = pooled_backends(&client, &db.name).await;
    assert_eq!(pooled.len(), 1, "{pooled:?}");
    client
        .batch_execute(
            "CREATE FUNCTION refuse_as_a_standby() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'cannot execute INSERT in a read-only transaction' \
             USING ERRCODE = 'read_only_sql_transaction'; END $$; \
             CREATE TRIGGER refuse_as_a_standby BEFORE INSERT ON knox_authtoken \
             FOR EACH ROW EXECUTE FUNCTION refuse_as_a_standby()",
        )
        .await
        .unwrap();
    let r = login(&s, "alice", "alice-pass").await;
    assert_eq!(r.status, 503, "{}", r.body_text());
    let closed = eventually(Duration::from_secs(5), || async {
        !pooled_backends(&client, &db.name)
            .await
            .contains(&pooled[0])
    })
    .await;
    assert!(
        closed.is_some(),
        "the refused login's connection went back to the pool"
    );
    client
        .batch_execute("DROP TRIGGER refuse_as_a_standby ON knox_authtoken")
        .await
        .unwrap();
    login_ok(&s, "alice", "alice-pass").await;
    s.stop().await;
}

/// A migration that changes the type of a column a login's statements return ("cached plan
/// must not change result type") costs one login, not every login on that connection: the
/// statement cache of the connection is cleared, as every other statement's error does.
#[tokio::test]
async fn a_login_after_a_column_type_change_fails_once_then_logs_in() {
    let (_db, client, s) = alice_logged_in_on_one_connection().await;
    client
        .batch_execute(
            "ALTER TABLE knox_authtoken ALTER COLUMN created TYPE timestamp(3) with time zone",
        )
        .await
        .unwrap();
    let first = login(&s, "alice", "alice-pass").await;
    assert_eq!(first.status, 503, "{}", first.body_text());
    let second = login(&s, "alice", "alice-pass").await;
    assert_eq!(second.status, 200, "{}", second.body_text());
    s.stop().await;
}

/// A user deleted while their login waits for their row (here the test holds its lock, and
/// deletes the user under it) is refused as an unknown user, not told that they hold too many
/// tokens, and no token is made.
#[tokio::test]
async fn a_user_deleted_during_their_login_is_refused_as_unknown() {
    let (db, client, s) = Fixture::new().user("frank").start().await;
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT 1 FROM auth_user WHERE username = 'frank' FOR UPDATE")
        .await
        .unwrap();
    let (r, ()) = tokio::join!(login(&s, "frank", "frank-pass"), async {
        let waiting = eventually(Duration::from_secs(5), || async {
            count(&client, LOCK_WAITS).await > 0
        })
        .await;
        assert!(
            waiting.is_some(),
            "the login never waited for the user's row"
        );
        holder
            .batch_execute("DELETE FROM auth_user WHERE username = 'frank'; COMMIT")
            .await
            .unwrap();
    });
    assert_login_refused(&r, "Invalid username/password.");
    assert_eq!(
        count(&client, "SELECT count(*) FROM knox_authtoken").await,
        0
    );
    s.stop().await;
}
