//! Gray failures: Redis and Postgres that answer, but slowly (a delaying TCP proxy in front of
//! each, `support::SlowProxy`), or over a link that loses packets (`support::LossyPath`).
//! `/verify` must stay bounded by the configured timeouts, fall back as for an outage, give only
//! right answers, and recover by itself once the store is fast again.

use std::time::{Duration, Instant};

use knoxgate::auth::HashAlgorithm;

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

/// Share of packets dropped, each way, while the loss is on: enough that a few hundred requests
/// meet many retransmissions.
const LOSS_PERCENT: u32 = 10;

/// Answers to waves of requests that may meet an unreachable store: `want`, or 503 while the
/// answer cannot be known; anything else is wrong.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    unavailable: usize,
    wrong: Vec<String>,
}

impl Tally {
    fn p(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        percentile(&sorted, q)
    }

    fn max(&self) -> Duration {
        self.latencies.iter().max().copied().unwrap_or_default()
    }

    /// Every answer right, none 503.
    fn is_clean(&self) -> bool {
        self.wrong.is_empty() && self.unavailable == 0
    }

    fn line(&self) -> String {
        format!(
            "{} requests, p50 {:?}, p99 {:?}, max {:?}, 503: {}, wrong: {}",
            self.latencies.len(),
            self.p(50.0),
            self.p(99.0),
            self.max(),
            self.unavailable,
            self.wrong.len()
        )
    }
}

/// `rounds` waves of `cases()`, tallied together.
async fn waves(
    s: &TestServer,
    rounds: usize,
    mut cases: impl FnMut() -> Vec<(String, u16, &'static str)>,
) -> Tally {
    let mut tally = Tally::default();
    for _ in 0..rounds {
        lossy_wave(s, cases(), &mut tally).await;
    }
    tally
}

/// One concurrent request per case; `want` is the right answer (200 valid, 401 revoked or
/// unknown).
async fn lossy_wave(s: &TestServer, cases: Vec<(String, u16, &'static str)>, tally: &mut Tally) {
    let requests: Vec<_> = cases
        .into_iter()
        .map(|(token, want, what)| {
            let addr = s.addr();
            async move {
                let started = Instant::now();
                let auth = format!("Token {token}");
                let r = http(addr, "GET", "/verify", &[("Authorization", &auth)], b"").await;
                (r.status, want, what, started.elapsed())
            }
        })
        .collect();
    for (status, want, what, took) in join_all(requests).await {
        tally.latencies.push(took);
        match status {
            s if s == want => {}
            503 => tally.unavailable += 1,
            s => tally
                .wrong
                .push(format!("{what}: {s} (want {want} or 503)")),
        }
    }
}

/// Most recovery attempts the Postgres test makes (one fresh token each).
const RECOVERY_PROBES: usize = 100;

fn unknown_token() -> String {
    knoxgate::auth::generate_token("", 64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn packet_loss_on_the_redis_path_costs_time_within_the_timeouts_never_a_wrong_answer() {
    let db = TestDb::migrated().await;
    let path = LossyPath::start("127.0.0.1:6379".parse().unwrap()).await;
    let mut valid = Vec::new();
    for i in 0..8 {
        valid.push(user_with_token(&db, &format!("loss{i}")).await);
    }
    let revoked = user_with_token(&db, "loss-revoked").await;
    // The in-process tier off: every answer asks Redis first, across the lossy link; the
    // request deadline is the test default (3 s).
    let s = TestServer::start(
        &db,
        &format!(
            "[redis]\nurl = \"redis://{}/0\"\ncommand_timeout = \"250ms\"\n\
             breaker_cooldown = \"500ms\"\n[cache]\nmemory_max_bytes = 1",
            path.addr()
        ),
    )
    .await;
    let cases = |revoked_want: u16| {
        let mut c: Vec<(String, u16, &'static str)> = valid
            .iter()
            .map(|t| (t.token.clone(), 200, "valid token"))
            .collect();
        c.push((revoked.token.clone(), revoked_want, "revoked token"));
        c.push((unknown_token(), 401, "unknown token"));
        c
    };
    let before = waves(&s, 5, || cases(200)).await;
    assert!(before.is_clean(), "{}", before.line());

    // Loss on; the revocation is committed while it lasts.
    path.set_loss(LOSS_PERCENT);
    let redis_errors = s.metric("knoxgate_redis_errors_total").await;
    let mut lossy = Tally::default();
    for _ in 0..5 {
        lossy_wave(&s, cases(200), &mut lossy).await;
    }
    db.client()
        .await
        .execute(
            "DELETE FROM knox_authtoken WHERE digest = $1",
            &[&revoked.digest],
        )
        .await
        .unwrap();
    // Revocation visible within the bound the change feed keeps (it listens on its own
    // connection); from then on the revoked token is never allowed.
    let seen = eventually(Duration::from_secs(2), || async {
        s.verify(&revoked.token).await.status == 401
    })
    .await;
    assert!(seen.is_some(), "revocation not seen within 2 s under loss");
    for _ in 0..25 {
        lossy_wave(&s, cases(401), &mut lossy).await;
    }
    let redis_errors = s.metric("knoxgate_redis_errors_total").await - redis_errors;
    path.set_loss(0);
    assert!(
        lossy.wrong.is_empty(),
        "wrong answers under loss: {:?}",
        lossy.wrong
    );
    // Each answer is bounded by the Redis command timeout plus a Postgres lookup, far under the
    // request deadline; generous for a loaded machine.
    assert!(
        lossy.p(99.0) < Duration::from_millis(1500),
        "p99 under loss: {}",
        lossy.line()
    );
    assert!(
        lossy.max() < Duration::from_millis(3500),
        "an answer past the request deadline: {}",
        lossy.line()
    );

    // Loss over: Redis answers again, without a restart, and every answer is exact.
    let hits = s.metric(REDIS_HITS).await;
    let recovered = eventually(Duration::from_secs(10), || async {
        let mut t = Tally::default();
        lossy_wave(&s, cases(401), &mut t).await;
        t.unavailable == 0 && t.wrong.is_empty() && s.metric(REDIS_HITS).await > hits
    })
    .await;
    assert!(
        recovered.is_some(),
        "no recovery within 10 s after the loss stopped"
    );
    let after = waves(&s, 5, || cases(401)).await;
    assert!(after.is_clean(), "{}", after.line());
    println!(
        "redis path, {LOSS_PERCENT}% loss each way, {}:\n  before: {}\n  loss:   {} \
         (redis errors {redis_errors}, revocation seen {:?} after commit)\n  after:  {} \
         (recovered {:?} after the loss stopped)",
        path.how(),
        before.line(),
        lossy.line(),
        seen.unwrap(),
        after.line(),
        recovered.unwrap()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn packet_loss_on_the_postgres_path_costs_time_within_the_timeouts_never_a_wrong_answer() {
    let db = TestDb::migrated().await;
    let path = LossyPath::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = db.url.replace("127.0.0.1:5432", &path.addr().to_string());
    assert_ne!(url, db.url, "the database URL goes through the lossy path");
    let client = db.client().await;
    let user = insert_user(&client, "loss-pg", "pw", true).await;
    let hot = insert_default_token(&client, user).await;
    // Fresh tokens for every wave: each one's first answer is a Postgres lookup.
    let mut cold = Vec::new();
    for _ in 0..8 * 33 + RECOVERY_PROBES {
        cold.push(insert_default_token(&client, user).await);
    }
    let revoked = insert_default_token(&client, user).await;
    client
        .execute(
            "DELETE FROM knox_authtoken WHERE digest = $1",
            &[&revoked.digest],
        )
        .await
        .unwrap();
    // Redis off: a cold token costs one Postgres lookup over the lossy link; the change feed
    // listens on a connection of its own, directly.
    let s = TestServer::start(
        &db,
        &format!(
            "[server]\nrequest_timeout = \"2s\"\n\
             [postgres]\nurl = \"{url}\"\nfeed_url = \"{}\"\nstatement_timeout = \"1s\"\n\
             [redis]\nurl = \"\"",
            db.url
        ),
    )
    .await;
    let fresh = std::sync::Mutex::new(cold.iter());
    let cases = |n: usize| {
        let mut c: Vec<(String, u16, &'static str)> = fresh
            .lock()
            .unwrap()
            .by_ref()
            .take(n)
            .map(|t| (t.token.clone(), 200, "cold valid token"))
            .collect();
        assert_eq!(c.len(), n, "out of cold tokens");
        c.push((hot.token.clone(), 200, "hot valid token"));
        c.push((revoked.token.clone(), 401, "revoked token"));
        c.push((unknown_token(), 401, "unknown token"));
        c
    };
    let before = waves(&s, 5, || cases(8)).await;
    assert!(before.is_clean(), "{}", before.line());

    path.set_loss(LOSS_PERCENT);
    let pg_errors = s.metric("knoxgate_postgres_errors_total").await;
    let mut lossy = Tally::default();
    for _ in 0..25 {
        lossy_wave(&s, cases(8), &mut lossy).await;
    }
    let pg_errors = s.metric("knoxgate_postgres_errors_total").await - pg_errors;
    path.set_loss(0);
    assert!(
        lossy.wrong.is_empty(),
        "wrong answers under loss: {:?}",
        lossy.wrong
    );
    // No answer later than the request deadline (2 s), whatever TCP is retransmitting.
    assert!(
        lossy.max() < Duration::from_millis(2500),
        "an answer past the request deadline: {}",
        lossy.line()
    );
    assert!(
        lossy.p(99.0) <= Duration::from_secs(2),
        "p99 under loss: {}",
        lossy.line()
    );

    // One fresh token per attempt, an attempt every 100 ms at most.
    let recovered = eventually(Duration::from_secs(10), || async {
        let mut t = Tally::default();
        lossy_wave(&s, cases(1), &mut t).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        t.unavailable == 0 && t.wrong.is_empty()
    })
    .await;
    assert!(
        recovered.is_some(),
        "no recovery within 10 s after the loss stopped"
    );
    let after = waves(&s, 3, || cases(8)).await;
    assert!(after.is_clean(), "{}", after.line());
    println!(
        "postgres path, {LOSS_PERCENT}% loss each way, {}:\n  before: {}\n  loss:   {} \
         (postgres errors {pg_errors})\n  after:  {} (recovered {:?} after the loss stopped)",
        path.how(),
        before.line(),
        lossy.line(),
        after.line(),
        recovered.unwrap()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_postgres_leaves_cached_tokens_served_before_the_deadline() {
    let db = TestDb::migrated().await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let cached = user_with_token(&db, "hung-cached").await;
    // Strict: every hit waits for Postgres to confirm it. The request deadline (1 s) is shorter
    // than Postgres's own timeouts (a statement gets 1 s + 250 ms, a connection 2 s), so only
    // cache.confirm_timeout (200 ms) leaves time for the cached answer.
    let strict = "[server]\nrequest_timeout = \"1s\"\n[sessions]\nhash_queue_timeout = \"500ms\"\n\
                  [cache]\nconsistency = \"strict\"\nconfirm_timeout = \"200ms\"";
    let s = server_behind_slow_postgres(&db, &proxy, strict).await;
    let fail_closed =
        server_behind_slow_postgres(&db, &proxy, &format!("{strict}\nstale_if_error = false"))
            .await;
    for server in [&s, &fail_closed] {
        assert_eq!(server.verify(&cached.token).await.status, 200);
    }

    proxy.set_delay(Duration::from_secs(10));
    let stale = s.metric("knoxgate_stale_answers_total").await;
    for _ in 0..3 {
        let started = Instant::now();
        let r = s.verify(&cached.token).await;
        let took = started.elapsed();
        assert_eq!(r.status, 200, "a cached token lost to a hung Postgres");
        assert!(
            took < Duration::from_millis(800),
            "{took:?}: the confirmation was not given up at cache.confirm_timeout"
        );
    }
    assert!(s.metric("knoxgate_stale_answers_total").await >= stale + 3.0);
    // Without stale_if_error the same token is an outage, never a denial.
    assert_eq!(fail_closed.verify(&cached.token).await.status, 503);

    proxy.set_delay(Duration::ZERO);
    s.stop().await;
    fail_closed.stop().await;
}

/// Envoy's check of a GET with this token, with the caller's deadline (`grpc-timeout`, as
/// Envoy sends its ext_authz timeout) when there is one.
fn grpc_check(
    token: &str,
    deadline: Option<Duration>,
) -> tonic::Request<envoy_types::ext_authz::v3::pb::CheckRequest> {
    use envoy_types::{
        ext_authz::v3::pb::CheckRequest,
        pb::envoy::service::auth::v3::{
            AttributeContext, attribute_context::HttpRequest, attribute_context::Request,
        },
    };
    let http = HttpRequest {
        method: "GET".into(),
        path: "/api/orders".into(),
        headers: [("authorization".to_owned(), format!("Token {token}"))].into(),
        ..HttpRequest::default()
    };
    let attributes = AttributeContext {
        request: Some(Request {
            http: Some(http),
            ..Request::default()
        }),
        ..AttributeContext::default()
    };
    let mut request = tonic::Request::new(CheckRequest {
        attributes: Some(attributes),
    });
    if let Some(d) = deadline {
        request.set_timeout(d);
    }
    request
}

/// The HTTP status of a check's answer (200 for an allow).
fn check_status(
    answer: Result<tonic::Response<envoy_types::ext_authz::v3::pb::CheckResponse>, tonic::Status>,
) -> Result<i32, tonic::Status> {
    use envoy_types::ext_authz::v3::pb::HttpResponse;
    match answer?.into_inner().http_response {
        Some(HttpResponse::OkResponse(_)) => Ok(200),
        Some(HttpResponse::DeniedResponse(d)) => Ok(d.status.map_or(0, |s| s.code)),
        other => panic!("neither an allow nor a denial: {other:?}"),
    }
}

type AuthorizationClient =
    envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient<
        tonic::transport::Channel,
    >;

async fn grpc_client(s: &TestServer) -> AuthorizationClient {
    AuthorizationClient::connect(format!("http://{}", s.grpc()))
        .await
        .expect("gRPC connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_check_is_answered_before_the_callers_deadline() {
    let db = TestDb::migrated().await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let cold = user_with_token(&db, "grpc-deadline").await;
    // A second one: a check of the first while its load is in flight would share that load.
    let other = user_with_token(&db, "grpc-no-deadline").await;
    // Postgres's own timeouts (connect 2 s, statement 2 s + 250 ms) well after the caller's
    // deadline less the margin (800 ms).
    let s = server_behind_slow_postgres(
        &db,
        &proxy,
        "[server]\ngrpc_listen = \"127.0.0.1:0\"\nrequest_timeout = \"3s\"\n\
         grpc_deadline_margin = \"400ms\"\n\
         [postgres]\nconnect_timeout = \"2s\"\nstatement_timeout = \"2s\"",
    )
    .await;
    let mut client = grpc_client(&s).await;

    // A token nobody has cached, and Postgres hangs: a caller's 1.2 s deadline gets knoxgate's
    // 503 (the margin, 400 ms, before it), not its own timeout, which Envoy would answer as
    // failure_mode_allow says.
    proxy.set_delay(Duration::from_secs(10));
    let started = Instant::now();
    let answer = client
        .check(grpc_check(&cold.token, Some(Duration::from_millis(1_200))))
        .await;
    let took = started.elapsed();
    let status = check_status(answer).expect("knoxgate's answer, not the caller's deadline");
    assert_eq!(status, 503);
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(1_200),
        "answered after {took:?}, want 800 ms"
    );
    // A caller without a deadline is answered as over HTTP: when Postgres's timeouts give up
    // (2 s or more). Once the first check's lookup has given up: a lookup still waiting for a
    // connection would be shared.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let started = Instant::now();
    let answer = client.check(grpc_check(&other.token, None)).await;
    let took = started.elapsed();
    assert_eq!(check_status(answer).expect("an answer"), 503);
    assert!(
        took >= Duration::from_millis(1_800),
        "answered after {took:?} without a caller deadline"
    );

    // Postgres back: the same check is allowed within the caller's deadline.
    proxy.set_delay(Duration::ZERO);
    let allowed = eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        let request = grpc_check(&cold.token, Some(Duration::from_millis(1_200)));
        async move { matches!(check_status(client.check(request).await), Ok(200)) }
    })
    .await;
    assert!(allowed.is_some(), "checks did not recover");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_deadline_shorter_than_confirm_timeout_still_gets_the_cached_answer() {
    let db = TestDb::migrated().await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let cached = user_with_token(&db, "short-caller-deadline").await;
    // Strict: every hit is confirmed. cache.confirm_timeout (600 ms) is longer than the time a
    // caller's 400 ms deadline leaves knoxgate (300 ms, with a margin of 100 ms).
    let s = server_behind_slow_postgres(
        &db,
        &proxy,
        "[server]\ngrpc_listen = \"127.0.0.1:0\"\nrequest_timeout = \"3s\"\n\
         grpc_deadline_margin = \"100ms\"\n\
         [cache]\nconsistency = \"strict\"\nconfirm_timeout = \"600ms\"",
    )
    .await;
    let mut client = grpc_client(&s).await;
    let check = || grpc_check(&cached.token, Some(Duration::from_millis(400)));
    assert_eq!(check_status(client.check(check()).await).unwrap(), 200);

    // Postgres hangs. The confirmation gets half of the 300 ms (not its 600 ms, which would
    // run past the deadline and lose the cached answer to a 503), then the cached answer is
    // served within the caller's deadline.
    proxy.set_delay(Duration::from_secs(10));
    let stale = s.metric("knoxgate_stale_answers_total").await;
    for _ in 0..3 {
        let started = Instant::now();
        let status = check_status(client.check(check()).await)
            .expect("knoxgate's answer, not the caller's deadline");
        let took = started.elapsed();
        assert_eq!(
            status, 200,
            "a cached token lost to a hung Postgres after {took:?}"
        );
        assert!(took < Duration::from_millis(300), "answered after {took:?}");
    }
    assert!(s.metric("knoxgate_stale_answers_total").await >= stale + 3.0);
    proxy.set_delay(Duration::ZERO);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statement_whose_caller_gave_up_leaves_no_connection_stuck_in_the_pool() {
    let db = TestDb::migrated().await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let cached = user_with_token(&db, "given-up").await;
    // One connection, strict mode without stale answers: every check confirms its token on
    // that connection, and a caller's 1 s deadline (800 ms with the margin) gives up before
    // the statement's own deadline (2 s + 250 ms).
    let s = server_behind_slow_postgres(
        &db,
        &proxy,
        "[server]\ngrpc_listen = \"127.0.0.1:0\"\nrequest_timeout = \"3s\"\n\
         grpc_deadline_margin = \"200ms\"\n\
         [postgres]\npool_size = 1\nstatement_timeout = \"2s\"\n\
         [cache]\nconsistency = \"strict\"\nstale_if_error = false",
    )
    .await;
    let mut client = grpc_client(&s).await;
    let check = || grpc_check(&cached.token, Some(Duration::from_secs(1)));
    assert_eq!(check_status(client.check(check()).await).unwrap(), 200);

    // The reply to the next confirmation is held 10 s; the caller gives up first.
    proxy.set_delay(Duration::from_secs(10));
    assert_eq!(check_status(client.check(check()).await).unwrap(), 503);
    // Postgres answers promptly again. The connection whose reply is still held must have left
    // the pool: put back, the next confirmation would queue behind that reply on it.
    proxy.set_delay(Duration::ZERO);
    let started = Instant::now();
    let r = s.verify(&cached.token).await;
    assert_eq!(
        r.status, 200,
        "the next request met the connection its predecessor gave up on"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connect_slower_than_confirm_timeout_is_finished_and_used_by_the_next_request() {
    let db = TestDb::migrated().await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let admin = connect(PG_ADMIN).await;
    let cached = user_with_token(&db, "slow-connect").await;
    // Strict: every hit is confirmed, given cache.confirm_timeout (200 ms) for it, connecting
    // included. Idle connections close after 2 s.
    let s = server_behind_slow_postgres(
        &db,
        &proxy,
        "[postgres]\nidle_timeout = \"2s\"\nconnect_timeout = \"3s\"\n\
         [cache]\nconsistency = \"strict\"\nconfirm_timeout = \"200ms\"",
    )
    .await;
    assert_eq!(s.verify(&cached.token).await.status, 200);
    let closed = eventually(Duration::from_secs(6), || async {
        backends(&admin, &db.name, "knoxgate").await == 0
    })
    .await;
    assert!(closed.is_some(), "the pool kept its connections");

    // Postgres now takes 600 ms to connect to, and answers at once once connected.
    proxy.set_connect_delay(Duration::from_millis(600));
    let stale = s.metric("knoxgate_stale_answers_total").await;
    assert_eq!(s.verify(&cached.token).await.status, 200);
    assert_eq!(
        s.metric("knoxgate_stale_answers_total").await,
        stale + 1.0,
        "no connection within confirm_timeout: the cached answer is served unconfirmed"
    );
    // That connection was still opened, and pooled: the next confirmation uses it (given up
    // with the request, it would be opened again, and missed again, by every request).
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(s.verify(&cached.token).await.status, 200);
    assert_eq!(
        s.metric("knoxgate_stale_answers_total").await,
        stale + 1.0,
        "the next request was not confirmed by Postgres"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_token_is_refused_before_the_deadline_while_its_delete_is_slow() {
    let db = TestDb::migrated().await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let client = db.client().await;
    let id = insert_user(&client, "expiring", "pw", true).await;
    let soon = Some(Duration::from_secs(2));
    let expiring = insert_token(&client, id, soon, "", HashAlgorithm::Sha512).await;
    // A 2 s deadline; Postgres answers each round trip 800 ms late: the lookup that finds the
    // expired row takes one, or two on a pooled connection that has not prepared it yet (the
    // pool hands out its least recently used one), knox's delete of it two (a statement not yet
    // prepared), so lookup and delete together outlast the deadline. `statement_timeout` 2 s:
    // two round trips fit a statement's own deadline (the default 1 s + 250 ms would not).
    let s = server_behind_slow_postgres(
        &db,
        &proxy,
        "[server]\nrequest_timeout = \"2s\"\n[sessions]\nhash_queue_timeout = \"500ms\"\n\
         [cache]\nconfirm_timeout = \"200ms\"\n[postgres]\nstatement_timeout = \"2s\"",
    )
    .await;
    assert_eq!(s.verify(&expiring.token).await.status, 200);
    tokio::time::sleep(Duration::from_millis(2_200)).await;

    proxy.set_delay(Duration::from_millis(800));
    let started = Instant::now();
    let r = s.verify(&expiring.token).await;
    let took = started.elapsed();
    assert_eq!(
        r.status, 401,
        "after {took:?}: an expired token lost to the deadline of its delete"
    );
    // The delete carried on without the request, as knox's own would have run.
    proxy.set_delay(Duration::ZERO);
    let deleted = eventually(Duration::from_secs(5), || async {
        rows_of_user(&client, id).await == 0
    })
    .await;
    assert!(deleted.is_some(), "the expired token was not deleted");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_feed_stuck_connecting_gives_up_and_does_not_hold_shutdown() {
    let db = TestDb::migrated().await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let feed_url = db
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    // The feed through the proxy; a session must be set up within connect_timeout +
    // statement_timeout (1 s).
    let s = TestServer::start(
        &db,
        &format!(
            "[server]\nshutdown_grace = \"1s\"\n\
             [postgres]\nfeed_url = \"{feed_url}\"\nconnect_timeout = \"500ms\"\n\
             statement_timeout = \"500ms\"\n[cache]\nfeed_reconnect_delay = \"100ms\""
        ),
    )
    .await;
    // From now on a new connection through the proxy is accepted at once but reaches Postgres
    // only after a minute: a server that never completes the startup exchange. The feed's
    // connection is cut, so it reconnects into that.
    proxy.set_connect_delay(Duration::from_secs(60));
    let admin = connect(PG_ADMIN).await;
    let cut = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'knoxgate-feed'",
            &[&db.name],
        )
        .await
        .unwrap();
    assert_eq!(cut, 1, "the feed's one connection");
    const TIMEOUTS: &str = r#"knoxgate_postgres_errors_total{kind="timeout"}"#;
    let before = s.metric(TIMEOUTS).await;
    // Each attempt gives up after 1 s and is counted; stuck, none would be.
    let gave_up = eventually(Duration::from_secs(5), || async {
        s.metric(TIMEOUTS).await >= before + 2.0
    })
    .await;
    assert!(gave_up.is_some(), "the feed's connect never gave up");
    assert!(!s.running.ready(), "not live while it cannot connect");

    // Told to stop in the middle of such a connect, it stops within shutdown_grace.
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), s.stop())
        .await
        .expect("shutdown held by the feed's connect");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "stopped after {took:?}");
}
