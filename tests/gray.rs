//! Gray failures: Redis and Postgres that answer, but slowly (a delaying TCP proxy in front of
//! each, `support::SlowProxy`). `/verify` must stay bounded by the configured timeouts, fall
//! back as for an outage, give only right answers, and recover by itself once the store is fast
//! again.

use std::time::{Duration, Instant};

use crate::support::*;

const REDIS_HITS: &str = "knoxgate_cache_lookups_total{tier=\"redis\",result=\"hit\"}";

/// Sends `rounds` waves of one concurrent request per token; returns the latencies, and
/// fails on any answer other than `want` (200 for valid tokens, 401 for revoked ones).
async fn wave(s: &TestServer, tokens: &[(&Token, u16)], rounds: usize) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for _ in 0..rounds {
        let requests: Vec<_> = tokens
            .iter()
            .map(|(t, want)| {
                let (addr, token, want) = (s.addr(), t.token.clone(), *want);
                async move {
                    let started = Instant::now();
                    let auth = format!("Token {token}");
                    let r = http(addr, "GET", "/verify", &[("Authorization", &auth)], b"").await;
                    assert_eq!(r.status, want, "a wrong answer from a slow store");
                    started.elapsed()
                }
            })
            .collect();
        latencies.extend(join_all(requests).await);
    }
    latencies.sort();
    latencies
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_redis_costs_at_most_its_command_timeout_and_recovers() {
    let db = TestDb::migrated().await;
    let proxy = SlowProxy::start("127.0.0.1:6379".parse().unwrap()).await;
    let mut valid = Vec::new();
    for i in 0..8 {
        valid.push(user_with_token(&db, &format!("gray{i}")).await);
    }
    let revoked = user_with_token(&db, "gray-revoked").await;
    // The in-process tier off: every answer asks Redis first.
    let s = TestServer::start(
        &db,
        &format!(
            "[redis]\nurl = \"redis://127.0.0.1:{}/0\"\ncommand_timeout = \"250ms\"\n\
             breaker_cooldown = \"500ms\"\n[cache]\nmemory_max_bytes = 1",
            proxy.port
        ),
    )
    .await;
    let mut cases: Vec<(&Token, u16)> = valid.iter().map(|t| (t, 200)).collect();
    cases.push((&revoked, 200));
    wave(&s, &cases, 1).await; // Redis now holds every entry
    let fast = wave(&s, &cases, 3).await;

    // +100 ms, under the command timeout: still answered from Redis, slower by the delay.
    proxy.set_delay(Duration::from_millis(100));
    let hits = s.metric(REDIS_HITS).await;
    let slow = wave(&s, &cases, 3).await;
    assert!(
        s.metric(REDIS_HITS).await > hits,
        "Redis still used at +100 ms"
    );
    assert!(
        p99(&slow) < Duration::from_millis(900),
        "p99 at +100 ms: {:?}",
        p99(&slow)
    );

    // +2 s, far past it: Postgres answers instead, within the command timeout plus a query.
    proxy.set_delay(Duration::from_secs(2));
    db.client()
        .await
        .execute(
            "DELETE FROM knox_authtoken WHERE digest = $1",
            &[&revoked.digest],
        )
        .await
        .unwrap();
    *cases.last_mut().unwrap() = (&revoked, 401);
    let stalled = wave(&s, &cases, 3).await;
    assert!(
        p99(&stalled) < Duration::from_millis(1200),
        "p99 with Redis 2 s late: {:?} (the delay must not reach the client)",
        p99(&stalled)
    );

    // Fast again: Redis answers again without a restart.
    proxy.set_delay(Duration::ZERO);
    let before = s.metric(REDIS_HITS).await;
    let recovered = eventually(Duration::from_secs(10), || async {
        wave(&s, &cases, 1).await;
        s.metric(REDIS_HITS).await > before
    })
    .await;
    assert!(recovered.is_some(), "Redis hits did not resume");
    let after = wave(&s, &cases, 3).await;
    println!(
        "slow redis p99: fast {:?}, +100ms {:?}, +2s {:?}, recovered {:?}",
        p99(&fast),
        p99(&slow),
        p99(&stalled),
        p99(&after)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_postgres_bounds_cold_lookups_by_its_deadline_and_never_denies_for_it() {
    let db = TestDb::migrated().await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = db
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(url, db.url, "the database URL goes through the proxy");
    let hot = user_with_token(&db, "pg-hot").await;
    let mut cold = Vec::new();
    for i in 0..8 {
        cold.push(user_with_token(&db, &format!("pg-cold{i}")).await);
    }
    // Redis off: a cold token costs one Postgres lookup; the feed listens directly.
    let s = TestServer::start(
        &db,
        &format!(
            "[postgres]\nurl = \"{url}\"\nfeed_url = \"{}\"\nstatement_timeout = \"1s\"\n\
             [redis]\nurl = \"\"",
            db.url
        ),
    )
    .await;
    assert_eq!(s.verify(&hot.token).await.status, 200);

    // +100 ms: cold lookups are slower by about the delay, hot hits are not touched, and every
    // answer is right.
    proxy.set_delay(Duration::from_millis(100));
    let cases: Vec<(&Token, u16)> = cold.iter().map(|t| (t, 200)).collect();
    let slow_cold = wave(&s, &cases, 1).await;
    assert!(
        p99(&slow_cold) < Duration::from_millis(1500),
        "cold p99 at +100 ms: {:?}",
        p99(&slow_cold)
    );
    let hot_cases = [(&hot, 200u16); 8];
    let hot_hits = wave(&s, &hot_cases, 3).await;

    // +3 s, past the statement deadline: a token nobody has cached gets 503 within the
    // request deadline, never 401; the cached one is still served.
    proxy.set_delay(Duration::from_secs(3));
    let stranger = user_with_token(&db, "pg-stranger").await;
    let started = Instant::now();
    let r = s.verify(&stranger.token).await;
    let waited = started.elapsed();
    assert_eq!(
        r.status, 503,
        "an unanswered lookup is an outage, not a denial"
    );
    assert!(
        waited < Duration::from_millis(3500),
        "{waited:?} past the request deadline"
    );
    assert_eq!(s.verify(&hot.token).await.status, 200);

    // Fast again: the same token is answered without a restart.
    proxy.set_delay(Duration::ZERO);
    let back = eventually(Duration::from_secs(10), || async {
        s.verify(&stranger.token).await.status == 200
    })
    .await;
    assert!(back.is_some(), "cold lookups did not recover");
    println!(
        "slow postgres: cold p99 at +100ms {:?}, hot p99 {:?}, 503 after {waited:?}",
        p99(&slow_cold),
        p99(&hot_hits)
    );
    s.stop().await;
}
