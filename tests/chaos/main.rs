//! Chaos under load: knoxgate in-process against a private Redis and a private Postgres, 16
//! keep-alive clients hammering `/verify` while a fault script kills, freezes, restarts and
//! locks the dependencies and revokes tokens mid-run. Every answer is checked against the truth;
//! latency per phase and time to recover after each fault are reported (stdout and
//! `target/chaos-report.md`).
//!
//! This file is the scenario and its assertions; `faults.rs` is the fault script and the private
//! processes, `load.rs` the clients, `truth.rs` what counts as a wrong answer, `report.rs` the
//! report. It is a test binary of its own so that its latency figures are not shared with the
//! integration tests running in parallel.
//!
//! Run: `cargo test --test chaos -- --nocapture`. Needs root (Postgres runs as the `postgres`
//! OS user via runuser), redis-server on PATH and Postgres in /usr/lib/postgresql/<version>/bin.
//! knoxgate's own log goes to `target/chaos-knoxgate.log` (filter: env `CHAOS_LOG`).

#[path = "../support/mod.rs"]
mod support;

mod faults;
mod load;
mod report;
mod truth;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use knoxgate::{app, config::Config};

use crate::{
    faults::{Ctx, fault_script},
    load::{Clock, client_task, final_check},
    report::Run,
    support::*,
};

const USERS: usize = 50;
const VALID: usize = 200;
const REVOKED: usize = 100;
/// Valid tokens never used by the load: each one's first answer needs a store.
const PROBES: usize = 16;
const CLIENTS: usize = 16;
/// Pause between two requests of one client, so the 2-core box is not saturated.
const PACE: Duration = Duration::from_millis(1);
/// How late after the revocation COMMIT a revoked token may still be allowed.
const BOUND: Duration = Duration::from_secs(2);
/// No answer within this is a failure (the server promises 503 after request_timeout = 2 s).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
const LOAD: Duration = Duration::from_secs(30);
/// Longest the whole test may run (setup, load, checks, teardown).
const TEST_LIMIT: Duration = Duration::from_secs(90);
/// Longest a recovery measurement waits.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);
/// Requests slower than this are listed per phase (a stall, not just noise).
const SLOW: Duration = Duration::from_millis(100);

/// Pseudo status codes for requests that got no HTTP answer.
const NO_ANSWER_IO: u16 = 0;
const NO_ANSWER_TIMEOUT: u16 = 1;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Class {
    Valid,
    Revoked,
    Unknown,
    Probe,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    class: Class,
    idx: u32,
    status: u16,
    /// Since t0.
    sent: Duration,
    recv: Duration,
}

impl Sample {
    fn latency(&self) -> Duration {
        self.recv.saturating_sub(self.sent)
    }
}

struct Tokens {
    valid: Vec<Token>,
    revoked: Vec<Token>,
    probes: Vec<Token>,
}

fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn init_logging() {
    let Ok(file) = std::fs::File::create(target_file("chaos-knoxgate.log")) else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHAOS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("knoxgate=info,warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_under_load() {
    tokio::time::timeout(TEST_LIMIT, run())
        .await
        .expect("chaos test exceeded its 90 s limit");
}

async fn run() {
    init_logging();
    let setup_started = Instant::now();

    // --- Dependencies ---
    let redis = PrivateRedis::start().await;
    let pg = Arc::new(
        run_blocking(|| {
            PrivatePg::init_and_start("").keep_log_at(target_file("chaos-postgres.log"))
        })
        .await,
    );
    println!(
        "[chaos] private redis on :{}, private postgres on :{} (its log is copied to {} at the end)",
        redis.port,
        pg.port,
        target_file("chaos-postgres.log").display()
    );

    let cfg = Config::from_toml_str(&format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
request_timeout = "2s"
shutdown_grace = "2s"
[postgres]
url = "{pg_url}"
connect_timeout = "500ms"
statement_timeout = "500ms"
[redis]
url = "{redis_url}"
key_prefix = "chaos"
breaker_cooldown = "500ms"
[sessions]
password_iterations = 1000
[cache]
consistency = "notify"
feed_reconnect_delay = "100ms"
feed_health_interval = "250ms"
"#,
        pg_url = pg.url(),
        redis_url = redis.url()
    ))
    .expect("config");

    // --- Schema and seed ---
    let mut client = connect_retry(&pg.url(), Duration::from_secs(5)).await;
    knoxgate::store::schema::migrate(&mut client, &cfg.postgres, true)
        .await
        .expect("migrate");
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(insert_user(&client, &format!("chaos_user_{i}"), "pw", true).await);
    }
    // Tokens go to the users in turn: valid ones first, then revoked ones, then probes.
    let mut seeded = Vec::with_capacity(VALID + REVOKED + PROBES);
    for i in 0..VALID + REVOKED + PROBES {
        seeded.push(insert_default_token(&client, users[i % USERS]).await);
    }
    let probes = seeded.split_off(VALID + REVOKED);
    let revoked = seeded.split_off(VALID);
    let tokens = Tokens {
        valid: seeded,
        revoked,
        probes,
    };
    drop(client);
    let tokens = Arc::new(tokens);

    // --- knoxgate in-process ---
    let running = Arc::new(app::start(cfg).await.expect("knoxgate starts"));
    let (addr, admin) = (running.addr, running.admin_addr);
    // Notify mode with Redis: ready means the feed is live and Redis connected.
    wait_ready(&running, Duration::from_secs(10)).await;
    // Warm every tier with the tokens under load, so the baseline is the steady state.
    {
        let mut conn = Client::connect(addr).await.expect("connect");
        for t in tokens.valid.iter().chain(&tokens.revoked) {
            let r = conn
                .get("/verify", Some(&format!("Token {}", t.token)))
                .await
                .expect("warm-up request");
            assert_eq!(r.status, 200, "warm-up: a seeded token was not accepted");
        }
    }
    println!(
        "[chaos] setup done in {} — knoxgate on {addr}, admin {admin}",
        secs(setup_started.elapsed())
    );

    // --- Load + faults ---
    let clock = Clock {
        t0: Instant::now(),
        events: Arc::default(),
    };
    clock.log(format!(
        "load starts: {CLIENTS} clients, V={VALID} R={REVOKED} probes={PROBES}"
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client_task(
                id,
                addr,
                Arc::clone(&tokens),
                Arc::clone(&stop),
                clock.clone(),
            ))
        })
        .collect();
    let redis = Arc::new(tokio::sync::Mutex::new(redis));
    let ctx = Ctx {
        clock: clock.clone(),
        addr,
        admin,
        tokens: Arc::clone(&tokens),
        next_probe: Arc::default(),
        probe_samples: Arc::default(),
        running: Arc::clone(&running),
    };
    let script = tokio::spawn(fault_script(
        ctx.clone(),
        Arc::clone(&redis),
        Arc::clone(&pg),
    ));
    clock.at(LOAD).await;
    stop.store(true, Ordering::SeqCst);
    let load_end = clock.log("load stops");
    let mut samples = Vec::new();
    let mut connect_errors = 0;
    for c in clients {
        let (s, e) = c.await.expect("client task");
        samples.extend(s);
        connect_errors += e;
    }
    let (tl, recoveries) = script.await.expect("fault script");
    let mut recovered = Vec::new();
    for r in recoveries {
        recovered.push(r.await.expect("recovery probe"));
    }
    samples.extend(ctx.probe_samples.lock().unwrap().iter().copied());
    samples.sort_by_key(|s| s.sent);

    // --- Final check ---
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ready = async {
        for _ in 0..100 {
            if let Ok(Response { status: 200, .. }) =
                get_once(admin, "/readyz", None, Duration::from_secs(2)).await
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
    .await;
    clock.log(format!("final check (readyz 200: {ready})"));
    let (checked, final_failures, final_retried) = final_check(addr, &tokens).await;
    clock.log(format!(
        "final check done: {checked} tokens, {} failures, {final_retried} 503 retries",
        final_failures.len()
    ));
    let metrics = get_once(admin, "/metrics", None, Duration::from_secs(3))
        .await
        .map(|r| r.body_text())
        .unwrap_or_default();

    // --- Analysis and report ---
    let analysis = truth::analyse(&tl, load_end, &samples);
    let events = clock.events.lock().unwrap().clone();
    let outcome = Run {
        events: &events,
        samples: &samples,
        connect_errors,
        load_end,
        timeline: &tl,
        tokens: &tokens,
        analysis: &analysis,
        recovered: &recovered,
        ready,
        checked,
        final_failures: &final_failures,
        final_retried,
        metrics: &metrics,
    };
    let r = report::render(&outcome);
    println!("\n{r}");
    let path = target_file("chaos-report.md");
    std::fs::write(&path, &r).expect("write report");
    println!("[chaos] report written to {}", path.display());

    // --- Teardown (bounded) and assertions ---
    drop(ctx);
    if let Ok(running) = Arc::try_unwrap(running) {
        let _ = tokio::time::timeout(Duration::from_secs(5), running.shutdown()).await;
    }
    assert_eq!(
        analysis.total_wrong, 0,
        "wrong answers: see the report above"
    );
    assert!(
        analysis.redis_killed().p99 <= analysis.p99_limit,
        "per-request stall while Redis was killed: p99 {} > {}",
        ms(analysis.redis_killed().p99),
        ms(analysis.p99_limit)
    );
    assert!(ready, "/readyz not 200 after the run");
    assert!(
        final_failures.is_empty(),
        "final check failed: {final_failures:?}"
    );
    for x in &recovered {
        assert!(
            x.first_store_200.is_some() && x.readyz_200.is_some(),
            "no recovery within 10 s after {}: {x:?}",
            x.fault
        );
    }
    drop(redis);
    drop(pg);
}
