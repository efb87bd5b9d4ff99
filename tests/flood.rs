//! A flood of random tokens reaches neither Postgres nor Redis past the budget of unknown-key
//! lookups (`cache.unknown_key_lookups_per_second`), while every valid token keeps working —
//! including tokens created during the flood, by SQL as Django writes them or by knoxgate's own
//! login. When the change feed is down the filter cannot be trusted and every key is asked again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use knoxgate::auth::generate_token;

use crate::support::*;

const LOOKUPS: &str = "knoxgate_sql_statements_total{statement=\"lookup\"}";
const REFUSED: &str = "knoxgate_cache_lookups_total{tier=\"key_filter\"";

/// Waits until `server` holds a current key filter (its bit array is exported once loaded).
async fn filter_loaded(server: &TestServer) {
    let loaded = eventually(Duration::from_secs(10), || async {
        server.metric("knoxgate_key_filter_bytes").await > 0.0
    })
    .await;
    assert!(loaded.is_some(), "the key filter was never loaded");
}

/// `clients` keep-alive connections sending a fresh random token per request until `stop`;
/// returns the answers counted by status: (401, other).
fn flood(
    server: &TestServer,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    let addr = server.addr();
    tokio::spawn(async move {
        let refused = Arc::new(AtomicU64::new(0));
        let other = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (stop, refused, other) = (stop.clone(), refused.clone(), other.clone());
            tasks.push(tokio::spawn(async move {
                let mut client = Client::connect(addr).await.expect("connect");
                while !stop.load(Ordering::Relaxed) {
                    let auth = format!("Token {}", generate_token("", 64));
                    let r = client
                        .request("GET", "/verify", &[("Authorization", &auth)], b"")
                        .await
                        .expect("flood request");
                    let counter = if r.status == 401 { &refused } else { &other };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.expect("flood client");
        }
        (
            refused.load(Ordering::Relaxed),
            other.load(Ordering::Relaxed),
        )
    })
}

#[tokio::test]
async fn random_tokens_past_the_budget_cost_no_query_and_valid_tokens_keep_working() {
    let db = TestDb::migrated().await;
    let hot = user_with_token(&db, "alice").await;
    let client = db.client().await;
    let budget = 10.0;
    let s = TestServer::start(&db, "[cache]\nunknown_key_lookups_per_second = 10").await;
    s.wait_ready().await;
    filter_loaded(&s).await;
    assert_eq!(s.verify(&hot.token).await.status, 200);

    let lookups_before = s.metric(LOOKUPS).await;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = flood(&s, 8, stop.clone());

    // During the flood: tokens inserted as Django does and first used 50 ms after the commit,
    // a token from knoxgate's own login used at once, and the hot token: never refused.
    let mut wrong = Vec::new();
    for round in 0..15 {
        let fresh = insert_default_token(&client, hot.user_id).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let status = s.verify(&fresh.token).await.status;
        if status != 200 {
            wrong.push(format!(
                "round {round}: token inserted 50 ms before answered {status}"
            ));
        }
        let status = s.verify(&hot.token).await.status;
        if status != 200 {
            wrong.push(format!("round {round}: hot token answered {status}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = login(&s, "alice", "pw").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    let (_, logged_in) = parse_login_body(&r.body_text());
    let status = s.verify(&logged_in).await.status;
    if status != 200 {
        wrong.push(format!("token from knoxgate's login answered {status}"));
    }

    stop.store(true, Ordering::Relaxed);
    let (refused, other) = flooding.await.expect("flood");
    let elapsed = started.elapsed().as_secs_f64();
    let lookups = s.metric(LOOKUPS).await - lookups_before;
    let filtered = s.metric(REFUSED).await;
    assert!(
        wrong.is_empty(),
        "valid tokens refused during the flood: {wrong:?}"
    );
    assert_eq!(
        other, 0,
        "random tokens must be answered 401, never anything else"
    );
    assert!(
        refused > 500,
        "the flood was too thin to test anything: {refused} requests"
    );
    // The budget's burst plus its rate over the run; the fresh tokens are known to the filter
    // (heard from the feed) and so take nothing from it, but may cost a lookup each.
    let allowed = budget + budget * elapsed + 16.0;
    assert!(
        lookups <= allowed,
        "{lookups} lookup statements for {refused} random tokens in {elapsed:.1} s (allowed {allowed:.0})"
    );
    assert!(
        filtered >= refused as f64 - allowed,
        "only {filtered} of {refused} random tokens were refused by the key filter"
    );
    s.stop().await;
}

#[tokio::test]
async fn without_the_filter_every_random_token_costs_a_lookup() {
    let db = TestDb::migrated().await;
    let hot = user_with_token(&db, "bob").await;
    let s = TestServer::start(&db, "[cache]\nkey_filter = false").await;
    s.wait_ready().await;
    assert_eq!(s.verify(&hot.token).await.status, 200);
    let before = s.metric(LOOKUPS).await;
    for _ in 0..50 {
        assert_eq!(s.verify(&generate_token("", 64)).await.status, 401);
    }
    assert_eq!(s.metric(LOOKUPS).await - before, 50.0);
    assert_eq!(s.metric("knoxgate_key_filter_bytes").await, 0.0);
    s.stop().await;
}

#[tokio::test]
async fn while_the_feed_is_down_unknown_keys_are_asked_of_postgres_again() {
    let db = TestDb::migrated().await;
    let hot = user_with_token(&db, "carol").await;
    // No budget: with a current filter, an unknown key never costs a lookup.
    let s = TestServer::start(
        &db,
        "[cache]\nunknown_key_lookups_per_second = 0\nfeed_reconnect_delay = \"3s\"",
    )
    .await;
    s.wait_ready().await;
    filter_loaded(&s).await;
    assert_eq!(s.verify(&hot.token).await.status, 200);
    let before = s.metric(LOOKUPS).await;
    for _ in 0..20 {
        assert_eq!(s.verify(&generate_token("", 64)).await.status, 401);
    }
    assert_eq!(s.metric(LOOKUPS).await, before, "refused without a query");

    // Cut the feed's connection: until it is back and the filter reloaded, INSERTs may go
    // unheard, so unknown keys are asked again.
    let admin = db.client().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'knoxgate-feed'",
            &[&db.name],
        )
        .await
        .expect("terminate the feed");
    let down = eventually(Duration::from_secs(5), || async {
        s.metric("knoxgate_key_filter_bytes").await == 0.0
    })
    .await;
    assert!(down.is_some(), "the filter outlived the feed");
    // A token inserted while the feed is down is not in the filter, and must still work.
    let client = db.client().await;
    let unheard = insert_default_token(&client, hot.user_id).await;
    assert_eq!(s.verify(&unheard.token).await.status, 200);
    let before = s.metric(LOOKUPS).await;
    for _ in 0..10 {
        assert_eq!(s.verify(&generate_token("", 64)).await.status, 401);
    }
    assert!(
        s.metric(LOOKUPS).await - before >= 10.0,
        "unknown keys were not asked of postgres while the feed was down"
    );

    // Back: reloaded, with the token inserted meanwhile in it.
    filter_loaded(&s).await;
    let before = s.metric(LOOKUPS).await;
    for _ in 0..20 {
        assert_eq!(s.verify(&generate_token("", 64)).await.status, 401);
    }
    assert_eq!(
        s.metric(LOOKUPS).await,
        before,
        "refused again once reloaded"
    );
    let keys = s.metric("knoxgate_key_filter_keys").await;
    assert!(keys >= 2.0, "the reload holds both tokens: {keys}");
    s.stop().await;
}

/// A token row given another key by SQL is, for the key filter, a new token: the trigger reports
/// its new key as inserted, so it is not refused as unknown once the budget is spent.
#[tokio::test]
async fn a_token_moved_to_another_key_is_known_to_the_filter() {
    let db = TestDb::migrated().await;
    let moved = user_with_token(&db, "carol").await;
    let s = TestServer::start(&db, "[cache]\nunknown_key_lookups_per_second = 0").await;
    s.wait_ready().await;
    filter_loaded(&s).await;
    // The row now holds another token: its digest and key.
    let token = generate_token("", 64);
    let digest = knoxgate::auth::HashAlgorithm::Sha512.hex_digest(token.as_bytes());
    db.client()
        .await
        .execute(
            "UPDATE knox_authtoken SET digest = $1, token_key = $2 WHERE digest = $3",
            &[
                &digest,
                &knoxgate::auth::token_key_of(&token),
                &moved.digest,
            ],
        )
        .await
        .unwrap();
    let known = eventually(Duration::from_secs(3), || async {
        s.verify(&token).await.status == 200
    })
    .await;
    assert!(known.is_some(), "the moved token was refused as unknown");
    assert_eq!(s.verify(&moved.token).await.status, 401);
    s.stop().await;
}
