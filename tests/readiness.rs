//! `/readyz` under a flood: it answers from the last Postgres probe (at most one probe per
//! `server.readiness_interval`, one at a time), so probes cannot starve `/verify` of the pool.

use std::time::{Duration, Instant};

use crate::support::*;

/// Transactions committed in `db` as Postgres counts them (every `SELECT 1` is one).
async fn commits(client: &tokio_postgres::Client, db: &TestDb) -> i64 {
    // Backends report their counts at most once a second, when idle: wait for them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client
        .simple_query("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    client
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_readyz_flood_costs_postgres_one_query_per_interval_and_verify_stays_served() {
    // ttl mode: no change feed, so nothing else talks to this database meanwhile.
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let uid = insert_user(&client, "alice", "pw", true).await;
    let tokens: Vec<String> = insert_default_tokens(&client, uid, 20)
        .await
        .into_iter()
        .map(|t| t.token)
        .collect();
    let s = TestServer::start(
        &db,
        "[cache]\nconsistency = \"ttl\"\n[server]\nreadiness_interval = \"1s\"",
    )
    .await;
    let admin = s.admin();
    let pings_before = s
        .metric("knoxgate_sql_statements_total{statement=\"ping\"}")
        .await;
    let commits_before = commits(&client, &db).await;

    // 48 keep-alive connections (under the admin cap of 64), 40 /readyz each, all at once.
    let started = std::time::Instant::now();
    let flood: Vec<_> = (0..48)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::connect(admin).await.expect("connect");
                let mut ok = 0;
                for _ in 0..40 {
                    let r = c.get("/readyz", None).await.expect("readyz");
                    ok += usize::from(r.status == 200);
                }
                ok
            })
        })
        .collect();
    // Meanwhile every uncached token is looked up in Postgres and answered.
    for t in &tokens {
        let r = s.verify(t).await;
        assert_eq!(r.status, 200, "/verify during the flood: {}", r.body_text());
    }
    let mut ready = 0;
    for f in flood {
        ready += f.await.unwrap();
    }
    let elapsed = started.elapsed();
    assert_eq!(ready, 48 * 40, "every /readyz answered 200");

    let pings = s
        .metric("knoxgate_sql_statements_total{statement=\"ping\"}")
        .await
        - pings_before;
    let commits = commits(&client, &db).await - commits_before;
    eprintln!("readyz flood: {pings} probes, {commits} transactions in {elapsed:?}");
    // One probe per started interval, plus the 20 lookups, the metric scrapes' nothing, and
    // this test's own statistics queries.
    let intervals = elapsed.as_secs_f64().ceil() + 1.0;
    assert!(
        pings <= intervals,
        "{pings} probes in {elapsed:?} for 1,920 /readyz"
    );
    assert!(
        (commits as f64) < 20.0 + intervals + 20.0,
        "{commits} transactions for 1,920 /readyz and 20 lookups"
    );
    s.stop().await;
}

/// Takes `db` away from under the server: no new connections, the open ones terminated.
async fn refuse_connections(db: &TestDb, refuse: bool) {
    let admin_client = connect(PG_ADMIN).await;
    admin_client
        .simple_query(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS {}",
            db.name, !refuse
        ))
        .await
        .unwrap();
    if refuse {
        admin_client
            .simple_query(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
                db.name
            ))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn readyz_still_notices_postgres_going_away() {
    // The cached result is refreshed: a database that disappears turns readiness to 503 within
    // an interval, when cached answers are not served without Postgres (stale_if_error off).
    let db = TestDb::migrated().await;
    let s = TestServer::start(
        &db,
        "[cache]\nconsistency = \"ttl\"\nstale_if_error = false\n\
         [server]\nreadiness_interval = \"200ms\"",
    )
    .await;
    let r = http(s.admin(), "GET", "/readyz", &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    refuse_connections(&db, true).await;
    let down = eventually(Duration::from_secs(5), || async {
        http(s.admin(), "GET", "/readyz", &[], b"").await.status == 503
    })
    .await;
    refuse_connections(&db, false).await;
    assert!(
        down.is_some(),
        "readiness never noticed Postgres refusing connections"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_instance_serving_cached_answers_stays_ready_through_a_postgres_outage() {
    // stale_if_error (the default): every instance shares the one Postgres, and one that has
    // reached it serves its cached tokens through an outage, so it stays in its Service; the
    // body says Postgres is unreachable.
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "outage-ready").await;
    let s = TestServer::start(
        &db,
        "[cache]\nconsistency = \"ttl\"\n[server]\nreadiness_interval = \"200ms\"",
    )
    .await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    assert_eq!(
        http(s.admin(), "GET", "/readyz", &[], b"").await.status,
        200
    );
    refuse_connections(&db, true).await;
    let noticed = eventually(Duration::from_secs(5), || async {
        s.readyz().await.contains(r#""postgres":"unreachable""#)
    })
    .await;
    let r = http(s.admin(), "GET", "/readyz", &[], b"").await;
    let cached = s.verify(&t.token).await.status;
    refuse_connections(&db, false).await;
    assert!(noticed.is_some(), "the outage was not reported");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(cached, 200, "the cached token is served meanwhile");
    s.stop().await;
}

#[tokio::test]
async fn a_postgres_that_does_not_answer_does_not_hold_readyz_past_its_timeout() {
    // A Postgres whose packets go unanswered (a partition, a firewall dropping them) leaves the
    // probe waiting for its connect or statement timeout; an orchestrator's probe timing out
    // first would take every instance out of its Service whatever stale_if_error says.
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "hung-ready").await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = db
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    let s = TestServer::start(
        &db,
        &format!(
            "[postgres]\nurl = \"{url}\"\n[cache]\nconsistency = \"ttl\"\n\
             [server]\nreadiness_interval = \"100ms\"\nreadiness_timeout = \"300ms\""
        ),
    )
    .await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    assert_eq!(
        http(s.admin(), "GET", "/readyz", &[], b"").await.status,
        200
    );
    proxy.set_delay(Duration::from_secs(60));
    proxy.set_connect_delay(Duration::from_secs(60));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let started = Instant::now();
        let r = http(s.admin(), "GET", "/readyz", &[], b"").await;
        let took = started.elapsed();
        assert!(took < Duration::from_millis(800), "/readyz took {took:?}");
        assert_eq!(r.status, 200, "{}", r.body_text());
    }
    assert!(s.readyz().await.contains(r#""postgres":"unreachable""#));
    assert_eq!(
        s.verify(&t.token).await.status,
        200,
        "the cached token is served meanwhile"
    );
    proxy.set_delay(Duration::ZERO);
    proxy.set_connect_delay(Duration::ZERO);
    s.stop().await;
}
