//! PgBouncer in transaction mode in front of Postgres (`postgres.pgbouncer = true`, or left
//! unset and detected at startup): cold lookups, logins, logouts and auto-refresh without a
//! single Postgres error; the feed through a direct `feed_url` hears revocations; a feed
//! pointed at PgBouncer is reported deaf and answers are confirmed with Postgres.

use std::time::Duration;

use base64::Engine as _;
use knoxgate::auth::HashAlgorithm;

use crate::support::{
    PgBouncer, TestDb, assert_abandoned_login_lets_go_of_the_lock, delete_token, eventually,
    fleet_config, http, insert_default_token, insert_default_tokens, insert_token, insert_user,
    join_all, readyz_status, rows_of_user, start_unready, with_each_token,
};

const ERRORS: &str = "knoxgate_postgres_errors_total";

fn basic(username: &str, password: &str) -> String {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    format!("Basic {encoded}")
}

/// The body's `"token":"…"`.
fn token_of(body: &str) -> String {
    let start = body.find("\"token\":\"").expect("token in body") + 9;
    body[start..].split('"').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transaction_pooling_serves_cold_lookups_logins_logouts_and_refresh_without_errors() {
    let db = TestDb::migrated().await;
    let bouncer = PgBouncer::start(5432, &db.name, "transaction", 2).await;
    let cfg = fleet_config(
        &bouncer.url(&db.name),
        &format!("pgbouncer = true\nfeed_url = \"{}\"\npool_size = 8", db.url),
        "",
        "auto_refresh = true\ntoken_limit_per_user = 50",
    );
    let s = start_unready(cfg).await;
    s.wait_ready().await;
    let (status, body) = readyz_status(&s).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"feed\":\"live\""), "{body}");

    // 200 cold lookups of distinct tokens, 50 at a time.
    let client = db.client().await;
    let mut tokens = Vec::new();
    for i in 0..40 {
        let id = insert_user(&client, &format!("cold{i}"), "pw", true).await;
        for _ in 0..5 {
            // An hour to live: auto_refresh writes a new expiry through PgBouncer on verify.
            let t = insert_token(
                &client,
                id,
                Some(Duration::from_secs(3600)),
                "",
                HashAlgorithm::Sha512,
            )
            .await;
            tokens.push(t.token);
        }
    }
    let addr = s.addr();
    let mut statuses = Vec::new();
    for chunk in tokens.chunks(50) {
        statuses.extend(with_each_token(addr, "GET", "/verify", chunk).await);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        ok,
        tokens.len(),
        "cold lookups through PgBouncer: {statuses:?}"
    );

    // 20 concurrent logins (5 users, 4 each: the per-user lock and limit in one transaction).
    for i in 0..5 {
        insert_user(&client, &format!("login{i}"), "secret", true).await;
    }
    let logins: Vec<_> = (0..20)
        .map(|n| {
            let auth = basic(&format!("login{}", n % 5), "secret");
            async move {
                let r = http(
                    addr,
                    "POST",
                    "/api/auth/login/",
                    &[("Authorization", &auth)],
                    b"",
                )
                .await;
                (r.status, r.body_text())
            }
        })
        .collect();
    let logins = join_all(logins).await;
    for (status, body) in &logins {
        assert_eq!(*status, 200, "login through PgBouncer: {body}");
    }
    let issued: Vec<String> = logins.iter().map(|(_, b)| token_of(b)).collect();
    let live: i64 = client
        .query_one(
            "SELECT count(*) FROM knox_authtoken t JOIN auth_user u ON u.id = t.user_id \
             WHERE u.username LIKE 'login%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(live, 20);

    // Auto-refresh: expiries moved back by SQL (the feed evicts), then each issued token
    // verified at once: one refresh write each.
    client
        .execute(
            "UPDATE knox_authtoken t SET expiry = now() + interval '1 hour' FROM auth_user u \
             WHERE u.id = t.user_id AND u.username LIKE 'login%'",
            &[],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refreshes_before = s
        .metric("knoxgate_sql_statements_total{statement=\"refresh_expiry\"}")
        .await;
    let verifies = with_each_token(addr, "GET", "/verify", &issued).await;
    assert!(verifies.iter().all(|s| *s == 200));
    let refreshed = eventually(Duration::from_secs(5), || async {
        let moved: i64 = client
            .query_one(
                "SELECT count(*) FROM knox_authtoken t JOIN auth_user u ON u.id = t.user_id \
                 WHERE u.username LIKE 'login%' AND t.expiry > now() + interval '9 hours'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        moved == 20
    })
    .await;
    assert!(
        refreshed.is_some(),
        "auto-refresh did not move every expiry"
    );
    let refreshes = s
        .metric("knoxgate_sql_statements_total{statement=\"refresh_expiry\"}")
        .await
        - refreshes_before;
    assert!(refreshes >= 20.0, "refresh writes: {refreshes}");

    // Concurrent logouts of half the issued tokens; then they are refused.
    let logouts = with_each_token(addr, "POST", "/api/auth/logout/", &issued[..10]).await;
    assert!(logouts.iter().all(|s| *s == 204), "logouts: {logouts:?}");
    for t in &issued[..10] {
        assert_eq!(s.verify(t).await.status, 401);
    }

    // A raw-SQL revocation reaches the feed through feed_url, with no request's help.
    let victim = tokens[0].clone();
    assert_eq!(s.verify(&victim).await.status, 200);
    delete_token(&client, &victim).await;
    let seen = eventually(Duration::from_secs(2), || async {
        s.verify(&victim).await.status == 401
    })
    .await;
    assert!(seen.is_some(), "raw-SQL revocation not seen within 2 s");
    println!("pgbouncer: raw-SQL revocation seen after {seen:?}");

    assert_eq!(
        s.metric(ERRORS).await,
        0.0,
        "postgres errors through PgBouncer"
    );
    assert_eq!(s.metric("knoxgate_feed_connected").await, 1.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_feed_behind_transaction_pooling_is_reported_deaf_and_answers_are_confirmed() {
    let db = TestDb::migrated().await;
    let bouncer = PgBouncer::start(5432, &db.name, "transaction", 2).await;
    // No feed_url: the feed's LISTEN goes through PgBouncer too.
    let cfg = fleet_config(
        &bouncer.url(&db.name),
        "pgbouncer = true",
        "feed_echo_timeout = \"500ms\"",
        "",
    );
    let s = start_unready(cfg).await;
    let client = db.client().await;
    let id = insert_user(&client, "deaf", "pw", true).await;
    let t = insert_default_token(&client, id).await;

    let deaf = eventually(Duration::from_secs(5), || async {
        let (status, body) = readyz_status(&s).await;
        status == 503 && body.contains("\"feed\":\"deaf\"")
    })
    .await;
    assert!(
        deaf.is_some(),
        "feed not reported deaf: {:?}",
        readyz_status(&s).await
    );
    assert!(!s.running.app.store.feed_live());
    assert_eq!(s.metric("knoxgate_feed_connected").await, 0.0);
    // Postgres itself is fine: the feed connected, and it did LISTEN.
    assert!(readyz_status(&s).await.1.contains("\"postgres\":\"ok\""));

    // Cached, then revoked by raw SQL: the deaf feed never tells, the confirmation does.
    assert_eq!(s.verify(&t.token).await.status, 200);
    assert_eq!(s.verify(&t.token).await.status, 200);
    delete_token(&client, &t.token).await;
    assert_eq!(s.verify(&t.token).await.status, 401);
    // Still deaf a few ticks later: it never flips back to live on its own.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!s.running.app.store.feed_live());
    assert_eq!(readyz_status(&s).await.0, 503);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unset_pgbouncer_key_is_settled_by_probing_the_url() {
    use knoxgate::store::pg::{Pooler, probe_pooler};

    let db = TestDb::migrated().await;
    let bouncer = PgBouncer::start(5432, &db.name, "transaction", 2).await;

    // The probe, against the real PgBouncer and the real Postgres behind it.
    let via_bouncer = fleet_config(
        &bouncer.url(&db.name),
        &format!("feed_url = \"{}\"", db.url),
        "",
        "",
    );
    assert!(via_bouncer.postgres.detect_pgbouncer);
    assert_eq!(
        probe_pooler(&via_bouncer.postgres).await,
        Pooler::PgBouncer("it refused the startup options")
    );
    let direct = fleet_config(&db.url, "", "", "");
    assert!(direct.postgres.detect_pgbouncer);
    assert_eq!(probe_pooler(&direct.postgres).await, Pooler::Postgres);
    // Nothing listening: no verdict.
    let nowhere = fleet_config(
        &format!(
            "postgres://postgres@127.0.0.1:{}/x",
            crate::support::free_port()
        ),
        "connect_timeout = \"500ms\"",
        "",
        "",
    );
    assert!(matches!(
        probe_pooler(&nowhere.postgres).await,
        Pooler::Unknown(_)
    ));
    // Set explicitly: not asked.
    let set = fleet_config(&db.url, "pgbouncer = false", "", "");
    assert_eq!(probe_pooler(&set.postgres).await, Pooler::NotAsked);

    // knoxgate started without the key behind PgBouncer takes the PgBouncer way: cold lookups
    // (which fail on startup options or named statements otherwise) answer without errors.
    let client = db.client().await;
    let mut tokens = Vec::new();
    for i in 0..10 {
        let id = insert_user(&client, &format!("probe{i}"), "pw", true).await;
        tokens.extend(
            insert_default_tokens(&client, id, 3)
                .await
                .into_iter()
                .map(|t| t.token),
        );
    }
    let s = start_unready(via_bouncer).await;
    s.wait_ready().await;
    assert!(s.running.app.config.postgres.pgbouncer);
    assert!(!s.running.app.config.postgres.detect_pgbouncer);
    let statuses = with_each_token(s.addr(), "GET", "/verify", &tokens).await;
    assert!(
        statuses.iter().all(|st| *st == 200),
        "cold lookups through a detected PgBouncer: {statuses:?}"
    );
    assert_eq!(s.metric(ERRORS).await, 0.0);
    s.stop().await;

    // And started against Postgres itself, it keeps prepared statements.
    let s = start_unready(direct).await;
    s.wait_ready().await;
    assert!(!s.running.app.config.postgres.pgbouncer);
    let statuses = with_each_token(s.addr(), "GET", "/verify", &tokens[..5]).await;
    assert!(statuses.iter().all(|st| *st == 200), "{statuses:?}");
    s.stop().await;
}

/// A login whose request gives up while its statement waits for a lock has that statement
/// cancelled through PgBouncer too (PgBouncer passes the cancel request on to the server
/// connection running it): the wait ends long before `statement_timeout` (5 s), while the lock
/// is still held, and no token is left once it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_logins_statement_is_cancelled_through_pgbouncer() {
    abandoned_login_through_pgbouncer(false).await;
}

/// The same with TLS between knoxgate and PgBouncer: the cancel request waits for PgBouncer to
/// close its connection, above TLS (a close_notify would end it as early as a close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_logins_statement_is_cancelled_through_pgbouncer_over_tls() {
    abandoned_login_through_pgbouncer(true).await;
}

async fn abandoned_login_through_pgbouncer(tls: bool) {
    let db = TestDb::migrated().await;
    let bouncer = PgBouncer::start_with(5432, &db.name, "transaction", 2, tls).await;
    let (url, ca) = if tls {
        let ca = bouncer.ca_file().display().to_string();
        (
            format!("{}?sslmode=require", bouncer.url(&db.name)),
            format!("ca_file = \"{ca}\""),
        )
    } else {
        (bouncer.url(&db.name), String::new())
    };
    let mut cfg = fleet_config(
        &url,
        &format!(
            "pgbouncer = true\nfeed_url = \"{}\"\nstatement_timeout = \"5s\"\n{ca}",
            db.url
        ),
        "",
        "token_limit_per_user = 1",
    );
    cfg.server.request_timeout = Duration::from_secs(2);
    cfg.sessions.hash_queue_timeout = Duration::from_millis(500);
    let s = start_unready(cfg).await;
    s.wait_ready().await;
    let client = db.client().await;
    let alice = insert_user(&client, "alice", "alice-pass", true).await;
    let auth = basic("alice", "alice-pass");
    let headers = [("Authorization", auth.as_str())];
    let login = http(s.addr(), "POST", "/api/auth/login/", &headers, b"");
    let holder = assert_abandoned_login_lets_go_of_the_lock(&db, &client, "alice", login, || {
        format!(": {}", bouncer.log())
    })
    .await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(rows_of_user(&client, alice).await, 0);
    s.stop().await;
}
