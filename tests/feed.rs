//! Revocation through the Postgres change feed, the in-process tier and the consistency modes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use knoxgate::auth::{HashAlgorithm, generate_token, token_key_of};

use crate::support::*;

/// The bound the tests hold revocation to; the benchmark measures the real latency.
const BOUND: Duration = Duration::from_secs(2);

async fn refused_within(s: &TestServer, token: &str) -> Option<Duration> {
    eventually(BOUND, || async { s.verify(token).await.status == 401 }).await
}

#[tokio::test]
async fn raw_sql_delete_is_refused_by_both_instances_with_zero_sql_hits() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let a = TestServer::start(&db, "").await;
    let b = TestServer::start_with_prefix(&db, &a.prefix, "").await;
    for _ in 0..3 {
        assert_eq!(a.verify(&t.token).await.status, 200);
        assert_eq!(b.verify(&t.token).await.status, 200);
    }
    // Warm hits cost no SQL in notify mode.
    let sql_a = a.metric("knoxgate_sql_statements_total").await;
    for _ in 0..10 {
        assert_eq!(a.verify(&t.token).await.status, 200);
    }
    assert_eq!(a.metric("knoxgate_sql_statements_total").await, sql_a);
    db.client()
        .await
        .execute("DELETE FROM knox_authtoken", &[])
        .await
        .unwrap();
    assert!(refused_within(&a, &t.token).await.is_some());
    assert!(refused_within(&b, &t.token).await.is_some());
    assert_eq!(
        redis_cli(
            6379,
            &["EXISTS", &format!("{}:token:{}", a.prefix, &t.token[..15])]
        ),
        "0"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn user_deactivated_by_sql_is_refused() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "").await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    db.client()
        .await
        .execute("UPDATE auth_user SET is_active = false", &[])
        .await
        .unwrap();
    let refused = refused_within(&s, &t.token).await;
    assert!(
        refused.is_some(),
        "events {} answer {}",
        s.metric("knoxgate_feed_events_total").await,
        s.verify(&t.token).await.body_text()
    );
    assert_eq!(
        s.verify(&t.token).await.body_text(),
        r#"{"detail":"User inactive or deleted."}"#
    );
    s.stop().await;
}

#[tokio::test]
async fn listener_killed_loses_no_revocation_made_while_down() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "").await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    let key = format!("{}:token:{}", s.prefix, &t.token[..15]);
    assert_eq!(redis_cli(6379, &["EXISTS", &key]), "1");
    let admin = connect(PG_ADMIN).await;
    // Kill the listener and, in the same breath, revoke the token.
    let killed = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'knoxgate-feed'",
            &[&db.name],
        )
        .await
        .unwrap();
    assert_eq!(killed.len(), 1, "one listener connection");
    db.client()
        .await
        .execute("DELETE FROM knox_authtoken", &[])
        .await
        .unwrap();
    // Whatever the feed's state, the token is refused …
    assert!(refused_within(&s, &t.token).await.is_some());
    // … and once the feed is back it has replayed the log, deleting the Redis entry too.
    let live = eventually(Duration::from_secs(5), || async {
        s.running.ready() && redis_cli(6379, &["EXISTS", &key]) == "0"
    })
    .await;
    assert!(
        live.is_some(),
        "feed back and redis entry evicted by the replay"
    );
    assert_eq!(s.verify(&t.token).await.status, 401);
    assert!(s.metric("knoxgate_feed_connected").await == 1.0);
    s.stop().await;
}

#[tokio::test]
async fn negative_cache_does_not_hide_a_token_created_later() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let id = insert_user(&client, "alice", "pw", true).await;
    let s = TestServer::start(&db, "").await;
    let token = knoxgate::auth::generate_token("", 64);
    assert_eq!(s.verify(&token).await.status, 401);
    let lookups = s
        .metric("knoxgate_sql_statements_total{statement=\"lookup\"}")
        .await;
    for _ in 0..5 {
        assert_eq!(s.verify(&token).await.status, 401);
    }
    assert_eq!(
        s.metric("knoxgate_sql_statements_total{statement=\"lookup\"}")
            .await,
        lookups,
        "negative hits cost no SQL"
    );
    // Now Django creates exactly that token.
    client
        .execute(
            "INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) VALUES ($1, now(), $2, NULL, $3)",
            &[&HashAlgorithm::Sha512.hex_digest(token.as_bytes()), &id, &&token[..15]],
        )
        .await
        .unwrap();
    let took = eventually(BOUND, || async { s.verify(&token).await.status == 200 }).await;
    assert!(took.is_some_and(|d| d < Duration::from_secs(1)), "{took:?}");
    s.stop().await;
}

#[tokio::test]
async fn strict_mode_confirms_every_hit_with_one_query() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "[cache]\nconsistency = \"strict\"").await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    let before = s.metric("knoxgate_sql_statements_total").await;
    for _ in 0..10 {
        assert_eq!(s.verify(&t.token).await.status, 200);
    }
    assert_eq!(
        s.metric("knoxgate_sql_statements_total").await - before,
        10.0
    );
    db.client()
        .await
        .execute("DELETE FROM knox_authtoken", &[])
        .await
        .unwrap();
    assert_eq!(
        s.verify(&t.token).await.status,
        401,
        "strict sees the delete at once"
    );
    s.stop().await;
}

#[tokio::test]
async fn ttl_mode_runs_without_triggers_and_serves_stale_until_ttl() {
    let db = TestDb::new().await;
    let cfg = config_for(&db, "kgx", "");
    knoxgate::store::schema::migrate(&mut db.client().await, &cfg.postgres, false)
        .await
        .unwrap();
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(
        &db,
        "[cache]\nconsistency = \"ttl\"\n[redis]\nmax_cache_ttl = \"2s\"",
    )
    .await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    db.client()
        .await
        .execute("DELETE FROM knox_authtoken", &[])
        .await
        .unwrap();
    // Documented: ttl mode does not see raw SQL deletes until the entry expires.
    assert_eq!(s.verify(&t.token).await.status, 200);
    let took = eventually(Duration::from_secs(4), || async {
        s.verify(&t.token).await.status == 401
    })
    .await;
    assert!(took.is_some(), "refused once max_cache_ttl passed");
    s.stop().await;
}

#[tokio::test]
async fn strict_mode_refuses_a_token_new_under_a_key_in_use_no_longer_than_max_cache_ttl() {
    // With knox's TOKEN_PREFIX only the characters after it in a token's 15-character key are
    // random, so tokens share keys. A token made under the key of another that is cached
    // (a complete entry: every row of the key) is refused until that entry ends; in strict mode
    // each use of the other token confirms its row, and that must not keep the entry alive.
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let id = insert_user(&client, "erin", "pw", true).await;
    let used = insert_default_token(&client, id).await;
    let s = TestServer::start(
        &db,
        "[cache]\nconsistency = \"strict\"\n[redis]\nmax_cache_ttl = \"2s\"",
    )
    .await;
    assert_eq!(s.verify(&used.token).await.status, 200);
    let new = format!("{}{}", &used.token[..15], &generate_token("", 64)[15..]);
    assert_eq!(token_key_of(&new), token_key_of(&used.token));
    client
        .execute(
            "INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) \
             VALUES ($1, now(), $2, now() + interval '10 hours', $3)",
            &[
                &HashAlgorithm::Sha512.hex_digest(new.as_bytes()),
                &id,
                &token_key_of(&new),
            ],
        )
        .await
        .unwrap();
    // The documented exposure: the entry made before the new token answers for its key.
    assert_eq!(s.verify(&new).await.status, 401);
    let took = eventually(Duration::from_secs(6), || async {
        assert_eq!(s.verify(&used.token).await.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.verify(&new).await.status == 200
    })
    .await;
    let took = took.expect("the new token is still refused 6 s on, max_cache_ttl being 2 s");
    assert!(
        took < Duration::from_millis(3500),
        "accepted after {took:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn stale_if_error_serves_cached_tokens_while_postgres_is_gone() {
    // The feed goes down with Postgres, so hits want confirming; the confirmation fails and the
    // cached answer is served. An unknown token gets 503, never 401.
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "").await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    // Make Postgres unreachable for this database only.
    let admin = connect(PG_ADMIN).await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} WITH ALLOW_CONNECTIONS false",
            db.name
        ))
        .await
        .unwrap();
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&db.name],
        )
        .await
        .unwrap();
    let down = eventually(Duration::from_secs(5), || async {
        !s.readyz().await.contains(r#""feed":"live""#)
    })
    .await;
    assert!(down.is_some());
    assert_eq!(s.verify(&t.token).await.status, 200);
    assert!(s.metric("knoxgate_stale_answers_total").await >= 1.0);
    assert_eq!(s.verify(&"1".repeat(64)).await.status, 503);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} WITH ALLOW_CONNECTIONS true",
            db.name
        ))
        .await
        .unwrap();
    s.stop().await;
}

/// Hammers one token from 16 clients while it is revoked, so cache loads race the eviction
/// (one may read Redis between the in-process eviction and the Redis deletion). Afterwards no
/// tier may still hold the old answer.
async fn revocation_under_concurrent_hits(revoke: &str) {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "").await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (addr, auth, stop) = (s.addr(), format!("Token {}", t.token), stop.clone());
        clients.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                http(addr, "GET", "/verify", &[("Authorization", &auth)], b"").await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    db.client().await.execute(revoke, &[]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    clients.join_all().await;
    assert!(
        refused_within(&s, &t.token).await.is_some(),
        "still allowed after: {revoke}"
    );
    // And it stays refused: nothing stale was cached by a racing load.
    for _ in 0..20 {
        assert_eq!(s.verify(&t.token).await.status, 401, "{revoke}");
    }
    s.stop().await;
}

#[tokio::test]
async fn deactivation_under_concurrent_hits_sticks() {
    for _ in 0..3 {
        revocation_under_concurrent_hits("UPDATE auth_user SET is_active = false").await;
    }
}

#[tokio::test]
async fn deletion_under_concurrent_hits_sticks() {
    for _ in 0..3 {
        revocation_under_concurrent_hits("DELETE FROM knox_authtoken").await;
    }
}

#[tokio::test]
async fn concurrent_misses_for_one_token_share_one_query() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "[postgres]\nstatement_timeout = \"5s\"").await;
    // Hold the table so the first lookup waits, and every other request arrives meanwhile.
    let lock = db.client().await;
    lock.batch_execute("BEGIN; LOCK TABLE knox_authtoken IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (addr, auth) = (s.addr(), format!("Token {}", t.token));
        requests.spawn(async move {
            http(addr, "GET", "/verify", &[("Authorization", &auth)], b"")
                .await
                .status
        });
    }
    let waiting = eventually(Duration::from_secs(3), || async {
        s.metric("knoxgate_coalesced_misses_total").await >= 19.0
    })
    .await;
    assert!(
        waiting.is_some(),
        "19 requests joined the first one's lookup"
    );
    lock.batch_execute("ROLLBACK").await.unwrap();
    for status in requests.join_all().await {
        assert_eq!(status, 200);
    }
    assert_eq!(
        s.metric("knoxgate_sql_statements_total{statement=\"lookup\"}")
            .await,
        1.0
    );
    s.stop().await;
}

// Regression test for a race in src/store/mod.rs: the feed's user eviction cleared the
// in-process entries, then deleted the user's Redis entries (after an SMEMBERS round trip),
// having bumped the epoch only before both. A request in that window missed memory, read the
// still-present Redis entry (user active) and cached it under the new epoch, so the token kept
// verifying for up to redis.max_cache_ttl (300 s). Failed 20 of 20 runs before the epoch
// window (`Store::changing`) that now surrounds every change.
#[tokio::test]
async fn deactivating_a_user_under_concurrent_requests_refuses_their_tokens_within_two_seconds() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let s = TestServer::start(&db, "").await;
    insert_user(&client, "bob", "bob-pass", true).await;
    let token = login_ok(&s, "bob", "bob-pass").await;
    assert_eq!(s.verify(&token).await.status, 200);
    // Requests for the token keep arriving while Django deactivates the user.
    let addr = s.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let mut pollers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (auth, stop) = (format!("Token {token}"), stop.clone());
        pollers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                http(addr, "GET", "/verify", &[("Authorization", &auth)], b"").await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    client
        .execute(
            "UPDATE auth_user SET is_active = false WHERE username = 'bob'",
            &[],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    pollers.join_all().await;
    let refused = eventually(Duration::from_secs(2), || async {
        s.verify(&token).await.status == 401
    })
    .await;
    if refused.is_none() {
        let key = redis_key(&s, &token);
        panic!(
            "a deactivated user's token still verifies 2 s later: redis entry exists={} \
             memory hits={} redis hits={} postgres hits={} ready={} feed events={} \
             is_active in db={}",
            redis_cli(6379, &["EXISTS", &key]),
            s.metric("knoxgate_cache_lookups_total{tier=\"memory\",result=\"hit\"}")
                .await,
            s.metric("knoxgate_cache_lookups_total{tier=\"redis\",result=\"hit\"}")
                .await,
            s.metric("knoxgate_cache_lookups_total{tier=\"postgres\",result=\"hit\"}")
                .await,
            s.running.ready(),
            s.metric("knoxgate_feed_events_total").await,
            client
                .query_one("SELECT is_active FROM auth_user WHERE username='bob'", &[])
                .await
                .unwrap()
                .get::<_, bool>(0),
        );
    }
    assert_detail(&s.verify(&token).await, 401, "User inactive or deleted.");
    s.stop().await;
}

#[tokio::test]
async fn concurrent_misses_for_different_tokens_share_a_batch() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut tokens = Vec::new();
    for user in ["ann", "ben", "cid"] {
        let id = insert_user(&client, user, "pw", true).await;
        tokens.extend(insert_default_tokens(&client, id, 4).await);
    }
    // One connection: while the first lookup holds it, every other one waits for it.
    let s = TestServer::start(
        &db,
        "[postgres]\npool_size = 1\nstatement_timeout = \"5s\"\npool_wait_timeout = \"5s\"",
    )
    .await;
    s.wait_ready().await;
    let lock = db.client().await;
    lock.batch_execute("BEGIN; LOCK TABLE knox_authtoken IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut requests = tokio::task::JoinSet::new();
    let unknown = generate_token("", 64);
    let presented: Vec<(String, Option<String>)> = tokens
        .iter()
        .map(|t| (t.token.clone(), Some(t.user_id.to_string())))
        .chain([(unknown, None)])
        .collect();
    for (token, user_id) in presented.clone() {
        let (addr, auth) = (s.addr(), format!("Token {token}"));
        requests.spawn(async move {
            let r = http(addr, "GET", "/verify", &[("Authorization", &auth)], b"").await;
            (
                r.status,
                r.header("x-auth-user-id").map(str::to_owned),
                user_id,
            )
        });
    }
    // Every request is past Redis, on its way to Postgres.
    let arrived = eventually(Duration::from_secs(3), || async {
        s.metric("knoxgate_cache_lookups_total{tier=\"redis\",result=\"miss\"}")
            .await
            >= presented.len() as f64
    })
    .await;
    assert!(arrived.is_some(), "not every request reached the lookup");
    lock.batch_execute("ROLLBACK").await.unwrap();
    for (status, got, expected) in requests.join_all().await {
        match expected {
            Some(user_id) => {
                assert_eq!(status, 200);
                assert_eq!(got, Some(user_id), "each token answered with its own user");
            }
            None => assert_eq!((status, got), (401, None)),
        }
    }
    // The first lookup's query (alone, or with whatever joined before it had the connection),
    // and one for all that arrived while it held the connection: 13 lookups, at most 2 queries.
    let statements = s
        .metric("knoxgate_sql_statements_total{statement=\"lookup\"}")
        .await;
    assert!(
        (1.0..=2.0).contains(&statements),
        "{statements} queries for 13 lookups"
    );
    assert_eq!(
        s.metric("knoxgate_batched_lookups_total").await,
        presented.len() as f64 - statements
    );
    // Each answer was cached under its own key: asked again, no query.
    for t in &tokens {
        assert_eq!(s.verify(&t.token).await.status, 200);
    }
    assert_eq!(
        s.metric("knoxgate_sql_statements_total{statement=\"lookup\"}")
            .await,
        statements
    );
    s.stop().await;
}

/// A cold lookup that overlaps other tokens' creation (anyone's login, anywhere) keeps the
/// Redis entry it wrote: a token inserted meanwhile cannot make a row the lookup found wrong, so
/// only removals drop it (src/store/epoch.rs). Counting inserts too dropped the entry of nearly
/// every cold lookup in a fleet that logs users in all the time, and sent the next instance to
/// Postgres again.
#[tokio::test]
async fn cold_lookups_during_other_logins_keep_their_redis_entries() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let id = insert_user(&client, "dora", "pw", true).await;
    let tokens: Vec<String> = insert_default_tokens(&client, id, 40)
        .await
        .into_iter()
        .map(|t| t.token)
        .collect();
    let s = TestServer::start(&db, "").await;
    let inserts = || s.metric("knoxgate_feed_events_total{kind=\"insert\"}");
    let heard_before = inserts().await;

    // Tokens keep being created for another user, back to back, while the lookups run.
    let stop = Arc::new(AtomicBool::new(false));
    let inserter = {
        let (stop, other) = (stop.clone(), db.client().await);
        let other_id = insert_user(&other, "eli", "pw", true).await;
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                insert_default_token(&other, other_id).await;
            }
        })
    };
    let mut heard = heard_before;
    for t in &tokens {
        // Another insert heard since the last lookup: they keep arriving around every one.
        let next = eventually(Duration::from_secs(5), || async { inserts().await > heard }).await;
        assert!(next.is_some(), "the inserts stopped arriving");
        heard = inserts().await;
        assert_eq!(s.verify(t).await.status, 200);
    }
    stop.store(true, Ordering::Relaxed);
    inserter.await.unwrap();
    assert_eq!(
        s.metric("knoxgate_cache_lookups_total{tier=\"postgres\",result=\"hit\"}")
            .await,
        tokens.len() as f64,
        "each token looked up in Postgres once"
    );
    let missing: Vec<&String> = tokens
        .iter()
        .filter(|t| redis_cli(6379, &["EXISTS", &entry_key(&s.prefix, t)]) != "1")
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} cold lookups lost their Redis entry to inserts elsewhere",
        missing.len(),
        tokens.len()
    );
    s.stop().await;
}

/// A revocation log with a large backlog past `cache.feed_retention` (a bulk cleanup of tokens
/// logs a row per token) is pruned in short batches after the feed is live. One DELETE of the
/// whole backlog at every (re)connect ran into the session's statement timeout, failed the
/// session, and so on at every reconnect: the feed never came up.
#[tokio::test]
async fn a_large_log_backlog_is_pruned_in_batches_without_keeping_the_feed_down() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO knoxgate_revocation_log (logged_at, kind, user_id) \
             SELECT now() - interval '2 days', 'u', '0' FROM generate_series(1, 200000)",
            &[],
        )
        .await
        .unwrap();
    let s = TestServer::start(&db, "[postgres]\nstatement_timeout = \"20ms\"").await;
    let live = eventually(Duration::from_secs(10), || async {
        s.metric("knoxgate_feed_connected").await == 1.0
    })
    .await;
    assert!(live.is_some(), "the feed never came up");
    let pruned = eventually(Duration::from_secs(30), || async {
        let left: i64 = client
            .query_one("SELECT count(*) FROM knoxgate_revocation_log", &[])
            .await
            .unwrap()
            .get(0);
        left == 0
    })
    .await;
    assert!(pruned.is_some(), "the backlog was not pruned");
    // And the feed still works: a revocation by SQL reaches the cache.
    let t = user_with_token(&db, "alice").await;
    assert_eq!(s.verify(&t.token).await.status, 200);
    client
        .execute("DELETE FROM knox_authtoken", &[])
        .await
        .unwrap();
    assert!(refused_within(&s, &t.token).await.is_some());
    s.stop().await;
}

#[tokio::test]
async fn a_revocation_behind_a_burst_of_user_changes_is_not_held_up_by_it() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let t = user_with_token(&db, "alice").await;
    // Users enough that applying their changes one by one takes seconds.
    client
        .execute(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, \
             is_staff, is_active, date_joined) \
             SELECT '!', false, 'bulk' || n, '', '', '', false, true, now() \
             FROM generate_series(1, 20000) n",
            &[],
        )
        .await
        .unwrap();
    let s = TestServer::start(&db, "").await;
    let live = eventually(Duration::from_secs(10), || async {
        s.metric("knoxgate_feed_connected").await == 1.0
    })
    .await;
    assert!(live.is_some(), "the feed never came up");
    for _ in 0..3 {
        assert_eq!(s.verify(&t.token).await.status, 200);
    }
    let applied_before = s.metric("knoxgate_feed_events_total").await;
    // A bulk change of users (one change each, as a group renamed makes), then alice's logout
    // right behind it.
    client
        .execute(
            "UPDATE auth_user SET password = '!changed' WHERE username LIKE 'bulk%'",
            &[],
        )
        .await
        .unwrap();
    delete_token(&client, &t.token).await;
    let refused = refused_within(&s, &t.token).await;
    assert!(
        refused.is_some(),
        "still allowed {BOUND:?} after its deletion; feed events applied meanwhile: {}",
        s.metric("knoxgate_feed_events_total").await - applied_before
    );
    // And the burst is applied in full.
    let applied = eventually(Duration::from_secs(30), || async {
        s.metric("knoxgate_feed_events_total").await - applied_before >= 20_001.0
    })
    .await;
    assert!(applied.is_some(), "the burst was not applied");
    assert_eq!(s.verify(&t.token).await.status, 401);
    s.stop().await;
}

/// A revocation heard while the feed's loop waits on something else (here its prune, held by a
/// row lock; a slow health check or heartbeat likewise) is not applied until the wait ends, and
/// until then cached answers are confirmed: the token is refused at once, not once the loop
/// comes back to its notifications.
#[tokio::test]
async fn a_revocation_heard_while_the_feed_waits_on_a_query_is_refused_at_once() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let mut locker = db.client().await;
    // A log row past retention, for the first prune (as soon as the feed is live) to delete,
    // locked by an open transaction: the prune waits for it.
    locker
        .execute(
            "INSERT INTO knoxgate_revocation_log (logged_at, kind, user_id) \
             VALUES (now() - interval '30 days', 'u', '0')",
            &[],
        )
        .await
        .unwrap();
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM knoxgate_revocation_log WHERE logged_at < now() - interval '1 day' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    // The prune's own timeouts, far past the test.
    let s = TestServer::start(&db, "[postgres]\nstatement_timeout = \"30s\"").await;
    let client = db.client().await;
    let waiting = eventually(Duration::from_secs(10), || async {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'knoxgate-feed' \
                 AND wait_event_type = 'Lock' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
    assert!(
        waiting.is_some(),
        "the feed's prune never waited on the lock"
    );
    for _ in 0..3 {
        assert_eq!(s.verify(&t.token).await.status, 200);
    }
    delete_token(&client, &t.token).await;
    let refused = refused_within(&s, &t.token).await;
    lock.rollback().await.unwrap();
    assert!(
        refused.is_some(),
        "a revocation heard while the feed waited was allowed for {BOUND:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_new_username_or_email_reaches_the_identity_headers_within_the_bound() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "before-rename").await;
    let s = TestServer::start(
        &db,
        "[verify]\nusername_header = \"X-Auth-Username\"\nemail_header = \"X-Auth-Email\"",
    )
    .await;
    let r = s.verify(&t.token).await;
    assert_eq!(r.header("x-auth-username"), Some("before-rename"));
    let c = db.client().await;
    for (change, header, now) in [
        (
            "username = 'after-rename'",
            "x-auth-username",
            "after-rename",
        ),
        (
            "email = 'new@example.com'",
            "x-auth-email",
            "new@example.com",
        ),
    ] {
        // Cached now, for up to redis.max_cache_ttl (minutes) but for the feed.
        assert_eq!(s.verify(&t.token).await.status, 200);
        c.execute(
            &format!("UPDATE auth_user SET {change} WHERE id = $1"),
            &[&t.user_id],
        )
        .await
        .unwrap();
        let heard = eventually(BOUND, || async {
            s.verify(&t.token).await.header(header) == Some(now)
        })
        .await;
        assert!(
            heard.is_some(),
            "{header} still the old value after {BOUND:?}"
        );
    }
    s.stop().await;
}

/// The feed proves it hears by a NOTIFY sent through the pool. One that could not be sent
/// (the pool's Postgres refused while the feed's own connection was up, as after a restart
/// behind a PgBouncer still refusing logins) is sent again, with no request to prompt it: an
/// idle instance, or a relay, which serves none, goes live once the pool reaches Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_echo_that_could_not_be_sent_is_sent_again_with_no_request() {
    let db = TestDb::migrated().await;
    // A port with nothing on it yet: the pool's connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pool_url = db
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{port}"));
    let cfg = config_for(
        &db,
        &unique("kgecho"),
        &format!(
            "[postgres]\nurl = \"{pool_url}\"\nfeed_url = \"{}\"\nconnect_timeout = \"300ms\"",
            db.url
        ),
    );
    let running = knoxgate::app::start(cfg).await.expect("starts");
    let feed_live = || async { metric(running.admin_addr, "knoxgate_feed_connected").await == 1.0 };
    // The feed connects and catches up; its first echo cannot be sent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!feed_live().await, "live without proof that it hears");
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the same port");
    let _proxy = SlowProxy::start_on(listener, "127.0.0.1:5432".parse().unwrap());
    let live = eventually(Duration::from_secs(10), feed_live).await;
    assert!(
        live.is_some(),
        "the feed never went live with the pool reachable"
    );
    running.shutdown().await;
}
