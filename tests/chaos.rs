//! Chaos under load: knoxgate in-process against a private Redis and a private Postgres, 16
//! keep-alive clients hammering `/verify` while a fault script kills, freezes, restarts and
//! locks the dependencies and revokes tokens mid-run. Every answer is checked against the truth;
//! latency per phase and time to recover after each fault are reported (stdout and
//! `target/chaos-report.md`).
//!
//! Run: `cargo test --test chaos -- --nocapture`. Needs root (Postgres runs as the `postgres`
//! OS user via runuser), redis-server on PATH and Postgres 15 in /usr/lib/postgresql/15/bin.
//! knoxgate's own log goes to `target/chaos-knoxgate.log` (filter: env `CHAOS_LOG`).

#[path = "chaos/support.rs"]
mod support;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use knoxgate::{
    app::{self, Running},
    config::Config,
};
use support::*;
use tokio::task::JoinHandle;

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
    valid: Vec<NewToken>,
    revoked: Vec<NewToken>,
    probes: Vec<NewToken>,
}

/// xorshift64: enough randomness for picking tokens, no dependency on rand's API.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn hex64(&mut self) -> String {
        format!(
            "{:016x}{:016x}{:016x}{:016x}",
            self.next(),
            self.next(),
            self.next(),
            self.next()
        )
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Shared clock and event log.
#[derive(Clone)]
struct Clock {
    t0: Instant,
    events: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Clock {
    fn now(&self) -> Duration {
        self.t0.elapsed()
    }
    fn log(&self, what: impl Into<String>) -> Duration {
        let at = self.now();
        let what = what.into();
        println!("[chaos {:>8}] {what}", secs(at));
        self.events.lock().unwrap().push((at, what));
        at
    }
    async fn at(&self, offset: Duration) {
        tokio::time::sleep_until((self.t0 + offset).into()).await;
    }
}

/// When each fault began and ended (since t0).
#[derive(Default, Debug, Clone)]
struct Timeline {
    redis_kill: Duration,
    redis_back: Duration,
    redis_stop: Duration,
    redis_cont: Duration,
    feed_kill: Duration,
    rev_start: Duration,
    rev_commit: Duration,
    pg_restart_begin: Duration,
    pg_restart_end: Duration,
    lock_begin: Duration,
    lock_end: Duration,
    outage_begin: Duration,
    outage_end: Duration,
}

#[derive(Debug, Clone)]
struct Recovery {
    fault: &'static str,
    fault_end: Duration,
    /// First 200 for a never-used valid token (its answer needed a store).
    first_store_200: Option<Duration>,
    /// First /readyz 200.
    readyz_200: Option<Duration>,
    /// First /readyz saying redis connected and feed live.
    fully_healthy: Option<Duration>,
}

/// Everything the fault script and the recovery probes need.
#[derive(Clone)]
struct Ctx {
    clock: Clock,
    addr: SocketAddr,
    admin: SocketAddr,
    tokens: Arc<Tokens>,
    next_probe: Arc<AtomicUsize>,
    probe_samples: Arc<Mutex<Vec<Sample>>>,
    running: Arc<Running>,
}

impl Ctx {
    fn state(&self) -> String {
        let store = &self.running.app.store;
        format!(
            "(feed_live={}, redis_connected={})",
            store.feed_live(),
            store.redis().is_some_and(|r| r.is_connected())
        )
    }

    /// Measures, from `fault_end`, the time to the first store-backed 200 and to readiness.
    fn recovery(&self, fault: &'static str, fault_end: Duration) -> JoinHandle<Recovery> {
        let ctx = self.clone();
        tokio::spawn(async move {
            let i = ctx.next_probe.fetch_add(1, Ordering::SeqCst);
            let auth = format!("Token {}", ctx.tokens.probes[i % PROBES].token);
            let store = async {
                let deadline = ctx.clock.t0 + fault_end + RECOVERY_LIMIT;
                while Instant::now() < deadline {
                    let sent = ctx.clock.now();
                    let status =
                        match get_once(ctx.addr, "/verify", Some(&auth), CLIENT_TIMEOUT).await {
                            Ok((s, _)) => s,
                            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => NO_ANSWER_TIMEOUT,
                            Err(_) => NO_ANSWER_IO,
                        };
                    let recv = ctx.clock.now();
                    ctx.probe_samples.lock().unwrap().push(Sample {
                        class: Class::Probe,
                        idx: (i % PROBES) as u32,
                        status,
                        sent,
                        recv,
                    });
                    if status == 200 {
                        return Some(recv.saturating_sub(fault_end));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                None
            };
            let ready = async {
                let deadline = ctx.clock.t0 + fault_end + RECOVERY_LIMIT;
                let (mut ready, mut healthy) = (None, None);
                while Instant::now() < deadline {
                    if let Ok((s, body)) =
                        get_once(ctx.admin, "/readyz", None, Duration::from_secs(3)).await
                    {
                        let at = ctx.clock.now().saturating_sub(fault_end);
                        let body = String::from_utf8_lossy(&body);
                        if s == 200 && ready.is_none() {
                            ready = Some(at);
                        }
                        if s == 200
                            && body.contains(r#""redis":"connected""#)
                            && body.contains(r#""feed":"live""#)
                        {
                            healthy = Some(at);
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (ready, healthy)
            };
            let (first_store_200, (readyz_200, fully_healthy)) = tokio::join!(store, ready);
            Recovery {
                fault,
                fault_end,
                first_store_200,
                readyz_200,
                fully_healthy,
            }
        })
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// The fault script. Times are offsets from t0 (load start).
async fn fault_script(
    ctx: Ctx,
    redis: Arc<tokio::sync::Mutex<PrivateRedis>>,
    pg: Arc<PrivatePg>,
) -> (Timeline, Vec<JoinHandle<Recovery>>) {
    let c = &ctx.clock;
    let s = Duration::from_secs;
    let mut tl = Timeline::default();
    let mut rec = Vec::new();

    // Redis killed.
    c.at(s(2)).await;
    // A fault's phase starts when the action is issued, not when it is logged.
    tl.redis_kill = c.now();
    redis.lock().await.kill9();
    c.log(format!("redis: kill -9 {}", ctx.state()));
    c.at(s(5)).await;
    c.log("redis: restarting on the same port");
    redis.lock().await.start().await;
    tl.redis_back = c.log(format!("redis: accepting again {}", ctx.state()));
    rec.push(ctx.recovery("redis killed", tl.redis_back));

    // Redis black-holed.
    c.at(s(8)).await;
    tl.redis_stop = c.now();
    redis.lock().await.sigstop();
    c.log(format!("redis: SIGSTOP {}", ctx.state()));
    c.at(s(11)).await;
    redis.lock().await.sigcont();
    tl.redis_cont = c.log(format!("redis: SIGCONT {}", ctx.state()));
    rec.push(ctx.recovery("redis black-holed", tl.redis_cont));

    // Change-feed connection killed.
    c.at(s(13)).await;
    {
        let admin = pg_connect_retry(&pg.url(), s(3)).await;
        tl.feed_kill = c.now();
        let n: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = 'knoxgate-feed'",
                &[],
            )
            .await
            .expect("terminate feed")
            .get(0);
        c.log(format!(
            "postgres: pg_terminate_backend on {n} knoxgate-feed connection(s) {}",
            ctx.state()
        ));
        assert_eq!(n, 1, "expected exactly one LISTEN connection");
        rec.push(ctx.recovery("feed connection killed", tl.feed_kill));
    }

    // Revocation.
    c.at(s(15)).await;
    {
        let admin = pg_connect_retry(&pg.url(), s(3)).await;
        let digests: Vec<String> = ctx
            .tokens
            .revoked
            .iter()
            .map(|t| t.digest.clone())
            .collect();
        tl.rev_start = c.log(format!(
            "postgres: DELETE {} revoked tokens {}",
            digests.len(),
            ctx.state()
        ));
        let n = admin
            .execute(
                "DELETE FROM knox_authtoken WHERE digest = ANY($1)",
                &[&digests],
            )
            .await
            .expect("revoke");
        tl.rev_commit = c.log(format!("postgres: revocation committed ({n} rows) = T_rev"));
        assert_eq!(n as usize, REVOKED);
    }

    // Postgres restarted.
    c.at(s(17)).await;
    tl.pg_restart_begin = c.now();
    c.log(format!("postgres: pg_ctl restart -m fast {}", ctx.state()));
    {
        let pg = Arc::clone(&pg);
        blocking(move || pg.restart_fast()).await;
    }
    let _ = pg_connect_retry(&pg.url(), s(10)).await;
    tl.pg_restart_end = c.log(format!("postgres: accepting again {}", ctx.state()));
    rec.push(ctx.recovery("postgres restart", tl.pg_restart_end));

    // Postgres slow: the token table locked.
    c.at(s(21)).await;
    {
        let locker = pg_connect_retry(&pg.url(), s(3)).await;
        locker
            .batch_execute("BEGIN; LOCK TABLE knox_authtoken IN ACCESS EXCLUSIVE MODE;")
            .await
            .expect("lock");
        tl.lock_begin = c.log(format!(
            "postgres: knox_authtoken locked ACCESS EXCLUSIVE {}",
            ctx.state()
        ));
        tokio::time::sleep(s(2)).await;
        locker.batch_execute("ROLLBACK").await.expect("rollback");
        tl.lock_end = c.log(format!("postgres: lock released {}", ctx.state()));
        rec.push(ctx.recovery("postgres slow", tl.lock_end));
    }

    // Total outage: Redis and Postgres both gone.
    c.at(s(24)).await;
    redis.lock().await.kill9();
    c.log("redis: kill -9");
    {
        let pg = Arc::clone(&pg);
        let ok = blocking(move || pg.stop_immediate()).await;
        assert!(ok, "pg_ctl stop -m immediate failed");
    }
    tl.outage_begin = c.log(format!(
        "postgres: stopped (immediate) — total outage {}",
        ctx.state()
    ));
    c.at(tl.outage_begin + s(3)).await;
    c.log(format!(
        "outage over: starting redis and postgres {}",
        ctx.state()
    ));
    redis.lock().await.start().await;
    {
        let pg = Arc::clone(&pg);
        blocking(move || pg.start()).await;
    }
    let _ = pg_connect_retry(&pg.url(), s(10)).await;
    tl.outage_end = c.log(format!(
        "redis and postgres accepting again {}",
        ctx.state()
    ));
    rec.push(ctx.recovery("total outage", tl.outage_end));
    (tl, rec)
}

/// One load client: its own keep-alive connection, reconnecting after any error.
async fn client_task(
    id: usize,
    addr: SocketAddr,
    tokens: Arc<Tokens>,
    stop: Arc<AtomicBool>,
    clock: Clock,
) -> (Vec<Sample>, usize) {
    let mut rng = Rng::new(
        0x9E37_79B9_7F4A_7C15u64.wrapping_mul(id as u64 + 1)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
    );
    let mut conn: Option<Conn> = None;
    let mut out = Vec::with_capacity(40_000);
    let mut connect_errors = 0;
    while !stop.load(Ordering::Relaxed) {
        let r = rng.below(100);
        let (class, idx, token) = if r < 60 {
            let i = rng.below(VALID);
            (Class::Valid, i, tokens.valid[i].token.clone())
        } else if r < 90 {
            let i = rng.below(REVOKED);
            (Class::Revoked, i, tokens.revoked[i].token.clone())
        } else {
            (Class::Unknown, 0, rng.hex64())
        };
        if conn.is_none() {
            match tokio::time::timeout(CLIENT_TIMEOUT, Conn::connect(addr)).await {
                Ok(Ok(c)) => conn = Some(c),
                _ => {
                    connect_errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().unwrap();
        let auth = format!("Token {token}");
        let sent = clock.now();
        let res = tokio::time::timeout(CLIENT_TIMEOUT, c.get("/verify", Some(&auth))).await;
        let recv = clock.now();
        let status = match res {
            Ok(Ok((s, _))) => s,
            Ok(Err(_)) => NO_ANSWER_IO,
            Err(_) => NO_ANSWER_TIMEOUT,
        };
        if status <= NO_ANSWER_TIMEOUT || c.closed {
            conn = None;
        }
        out.push(Sample {
            class,
            idx: idx as u32,
            status,
            sent,
            recv,
        });
        tokio::time::sleep(PACE).await;
    }
    (out, connect_errors)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct PhaseStats {
    name: &'static str,
    from: Duration,
    to: Duration,
    n: usize,
    by_status: BTreeMap<u16, usize>,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// Requests slower than [`SLOW`].
    slow: Vec<Sample>,
}

fn phase_stats(name: &'static str, from: Duration, to: Duration, s: &[Sample]) -> PhaseStats {
    let inside: Vec<&Sample> = s.iter().filter(|x| x.sent >= from && x.sent < to).collect();
    let mut lat: Vec<Duration> = inside.iter().map(|x| x.latency()).collect();
    lat.sort();
    let mut by_status = BTreeMap::new();
    for x in &inside {
        *by_status.entry(x.status).or_insert(0) += 1;
    }
    PhaseStats {
        name,
        from,
        to,
        n: inside.len(),
        by_status,
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
        max: lat.last().copied().unwrap_or_default(),
        slow: inside
            .iter()
            .filter(|x| x.latency() > SLOW)
            .map(|x| **x)
            .collect(),
    }
}

fn status_name(s: u16) -> String {
    match s {
        NO_ANSWER_IO => "no answer (connection error)".into(),
        NO_ANSWER_TIMEOUT => "no answer within 5 s".into(),
        s => s.to_string(),
    }
}

fn statuses(m: &BTreeMap<u16, usize>) -> String {
    m.iter()
        .map(|(s, n)| format!("{}: {n}", status_name(*s)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What each fault phase is called and when it ran.
fn phases(tl: &Timeline, load_end: Duration) -> Vec<(&'static str, Duration, Duration)> {
    vec![
        ("baseline (before faults)", Duration::ZERO, tl.redis_kill),
        ("redis killed", tl.redis_kill, tl.redis_back),
        ("redis black-holed (SIGSTOP)", tl.redis_stop, tl.redis_cont),
        (
            "feed killed → revocation",
            tl.feed_kill,
            tl.pg_restart_begin,
        ),
        ("postgres restart", tl.pg_restart_begin, tl.pg_restart_end),
        ("postgres slow (table locked)", tl.lock_begin, tl.lock_end),
        (
            "total outage (redis + postgres down)",
            tl.outage_begin,
            tl.outage_end,
        ),
        ("after the last fault", tl.outage_end, load_end),
        ("whole run", Duration::ZERO, load_end),
    ]
}

fn phase_of(tl: &Timeline, load_end: Duration, at: Duration) -> &'static str {
    phases(tl, load_end)
        .into_iter()
        .filter(|(n, _, _)| *n != "whole run")
        .find(|(_, a, b)| at >= *a && at < *b)
        .map(|(n, _, _)| n)
        .unwrap_or("between faults")
}

/// The truth: which answers are wrong, by kind.
fn wrong_answers(tl: &Timeline, samples: &[Sample]) -> BTreeMap<&'static str, Vec<Sample>> {
    let mut wrong: BTreeMap<&'static str, Vec<Sample>> = BTreeMap::new();
    for kind in [
        "valid token answered 401",
        "revoked token answered 200 after T_rev + BOUND",
        "revoked token answered 401 before the revocation was sent",
        "unknown token answered 2xx",
        "status other than 200/401/503",
        "no answer within 5 s",
    ] {
        wrong.insert(kind, Vec::new());
    }
    for x in samples {
        let kind = match (x.class, x.status) {
            (Class::Valid | Class::Probe, 401) => Some("valid token answered 401"),
            (Class::Revoked, 200) if x.sent >= tl.rev_commit + BOUND => {
                Some("revoked token answered 200 after T_rev + BOUND")
            }
            (Class::Revoked, 401) if x.recv < tl.rev_start => {
                Some("revoked token answered 401 before the revocation was sent")
            }
            (Class::Unknown, 200..=299) => Some("unknown token answered 2xx"),
            (_, NO_ANSWER_TIMEOUT) => Some("no answer within 5 s"),
            (_, NO_ANSWER_IO | 200 | 401 | 503) => None,
            _ => Some("status other than 200/401/503"),
        };
        if let Some(k) = kind {
            wrong.get_mut(k).unwrap().push(*x);
        }
    }
    wrong
}

async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// After the run: every valid token 200, every revoked token 401 (503s retried briefly).
async fn final_check(addr: SocketAddr, tokens: &Tokens) -> (usize, Vec<String>, usize) {
    let mut conn = Conn::connect(addr).await.expect("connect");
    let mut failures = Vec::new();
    let mut retried = 0;
    let mut checked = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    let cases = tokens
        .valid
        .iter()
        .chain(&tokens.probes)
        .map(|t| (t, 200, "valid"))
        .chain(tokens.revoked.iter().map(|t| (t, 401, "revoked")));
    for (t, want, what) in cases {
        checked += 1;
        let auth = format!("Token {}", t.token);
        loop {
            let got = match tokio::time::timeout(CLIENT_TIMEOUT, conn.get("/verify", Some(&auth)))
                .await
            {
                Ok(Ok((s, _))) => s,
                _ => {
                    conn = Conn::connect(addr).await.expect("reconnect");
                    NO_ANSWER_IO
                }
            };
            if conn.closed {
                conn = Conn::connect(addr).await.expect("reconnect");
            }
            if got == want {
                break;
            }
            if (got == 503 || got == NO_ANSWER_IO) && Instant::now() < deadline {
                retried += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            failures.push(format!(
                "{what} token {}… answered {} (want {want})",
                &t.token[..15],
                status_name(got)
            ));
            break;
        }
    }
    (checked, failures, retried)
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
    let mut redis = PrivateRedis::new(free_port());
    redis.start().await;
    let pg = Arc::new(blocking(PrivatePg::init_and_start).await);
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
    let mut client = pg_connect_retry(&pg.url(), Duration::from_secs(5)).await;
    knoxgate::store::schema::migrate(&mut client, &cfg.postgres, true)
        .await
        .expect("migrate");
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(insert_user(&client, &format!("chaos_user_{i}")).await);
    }
    let tokens = Tokens {
        valid: (0..VALID).map(|_| new_token()).collect(),
        revoked: (0..REVOKED).map(|_| new_token()).collect(),
        probes: (0..PROBES).map(|_| new_token()).collect(),
    };
    for (i, t) in tokens
        .valid
        .iter()
        .chain(&tokens.revoked)
        .chain(&tokens.probes)
        .enumerate()
    {
        insert_token(&client, users[i % USERS], t).await;
    }
    drop(client);
    let tokens = Arc::new(tokens);

    // --- knoxgate in-process ---
    let running = Arc::new(app::start(cfg).await.expect("knoxgate starts"));
    let (addr, admin) = (running.addr, running.admin_addr);
    {
        let store = &running.app.store;
        assert!(
            wait_until(Duration::from_secs(10), || store.feed_live()
                && store.redis().is_some_and(|r| r.is_connected()))
            .await,
            "knoxgate not ready (feed live, redis connected) within 10 s"
        );
    }
    // Warm every tier with the tokens under load, so the baseline is the steady state.
    {
        let mut conn = Conn::connect(addr).await.expect("connect");
        for t in tokens.valid.iter().chain(&tokens.revoked) {
            let (s, _) = conn
                .get("/verify", Some(&format!("Token {}", t.token)))
                .await
                .expect("warm-up request");
            assert_eq!(s, 200, "warm-up: a seeded token was not accepted");
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
            if let Ok((200, _)) = get_once(admin, "/readyz", None, Duration::from_secs(2)).await {
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
        .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();

    // --- Analysis ---
    let wrong = wrong_answers(&tl, &samples);
    let total_wrong: usize = wrong.values().map(Vec::len).sum();
    let stats: Vec<PhaseStats> = phases(&tl, load_end)
        .into_iter()
        .map(|(n, a, b)| phase_stats(n, a, b, &samples))
        .collect();
    let baseline = &stats[0];
    let redis_killed = &stats[1];
    let p99_limit = baseline.p99.max(Duration::from_millis(5)) * 5;

    let mut by_class: BTreeMap<Class, BTreeMap<u16, usize>> = BTreeMap::new();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for x in &samples {
        *by_class
            .entry(x.class)
            .or_default()
            .entry(x.status)
            .or_insert(0) += 1;
        *by_status.entry(x.status).or_insert(0) += 1;
    }
    // Revocation visibility: the last revoked-token 200 sent after the COMMIT.
    let last_revoked_200 = samples
        .iter()
        .filter(|x| x.class == Class::Revoked && x.status == 200 && x.sent >= tl.rev_commit)
        .map(|x| x.sent - tl.rev_commit)
        .max();
    let revoked_after_bound: BTreeMap<u16, usize> = samples
        .iter()
        .filter(|x| x.class == Class::Revoked && x.sent >= tl.rev_commit + BOUND)
        .fold(BTreeMap::new(), |mut m, x| {
            *m.entry(x.status).or_insert(0) += 1;
            m
        });
    let revoked_in_outage: BTreeMap<u16, usize> = samples
        .iter()
        .filter(|x| {
            x.class == Class::Revoked && x.sent >= tl.outage_begin && x.sent < tl.outage_end
        })
        .fold(BTreeMap::new(), |mut m, x| {
            *m.entry(x.status).or_insert(0) += 1;
            m
        });

    // --- Report ---
    let mut r = String::new();
    let _ = writeln!(r, "# knoxgate chaos-under-load report\n");
    let _ = writeln!(
        r,
        "{CLIENTS} keep-alive clients, {} pause between requests; tokens: {VALID} valid, \
         {REVOKED} revoked mid-run, fresh random unknown ones, {PROBES} never-used valid probe \
         tokens for recovery timing. Mix: 60% valid / 30% revoked / 10% unknown. \
         Revocation bound checked: {}.\n",
        ms(PACE),
        secs(BOUND)
    );
    let _ = writeln!(r, "## Fault script (t since load start)\n");
    for (at, what) in clock.events.lock().unwrap().iter() {
        let _ = writeln!(r, "- `{:>8}` {what}", secs(*at));
    }
    let _ = writeln!(r, "\n## Answers\n");
    let _ = writeln!(
        r,
        "- requests: {} ({:.0}/s over {}), client connect errors: {connect_errors}",
        samples.len(),
        samples.len() as f64 / load_end.as_secs_f64(),
        secs(load_end)
    );
    let _ = writeln!(r, "- by status: {}", statuses(&by_status));
    for (class, m) in &by_class {
        let _ = writeln!(r, "- {class:?}: {}", statuses(m));
    }
    let _ = writeln!(
        r,
        "- revoked tokens sent ≥ T_rev + {}: {}",
        secs(BOUND),
        statuses(&revoked_after_bound)
    );
    let _ = writeln!(
        r,
        "- revoked tokens during the total outage: {}",
        statuses(&revoked_in_outage)
    );
    let _ = writeln!(
        r,
        "- last 200 for a revoked token, sent after T_rev: {}",
        last_revoked_200.map_or("none".into(), |d| format!("+{}", ms(d)))
    );
    let _ = writeln!(r, "\n## Wrong answers (all must be 0)\n");
    for (kind, v) in &wrong {
        let _ = writeln!(r, "- {kind}: **{}**", v.len());
        for x in v.iter().take(10) {
            let token = match x.class {
                Class::Valid => tokens.valid[x.idx as usize].token[..15].to_owned(),
                Class::Revoked => tokens.revoked[x.idx as usize].token[..15].to_owned(),
                Class::Probe => tokens.probes[x.idx as usize].token[..15].to_owned(),
                Class::Unknown => "(random)".into(),
            };
            let _ = writeln!(
                r,
                "  - {:?} #{} key {token}: {} sent {} answered {} (phase: {}; T_rev {})",
                x.class,
                x.idx,
                status_name(x.status),
                secs(x.sent),
                secs(x.recv),
                phase_of(&tl, load_end, x.sent),
                secs(tl.rev_commit)
            );
        }
    }
    let _ = writeln!(
        r,
        "- no answer (connection error, client reconnected): {}",
        by_status.get(&NO_ANSWER_IO).copied().unwrap_or(0)
    );
    let _ = writeln!(r, "\n## Latency by phase (by send time)\n");
    let _ = writeln!(
        r,
        "| phase | window | requests | p50 | p99 | max | >100 ms | answers |\n|---|---|---|---|---|---|---|---|"
    );
    for p in &stats {
        let _ = writeln!(
            r,
            "| {} | {}–{} | {} | {} | {} | {} | {} | {} |",
            p.name,
            secs(p.from),
            secs(p.to),
            p.n,
            ms(p.p50),
            ms(p.p99),
            ms(p.max),
            p.slow.len(),
            statuses(&p.by_status)
        );
    }
    let _ = writeln!(
        r,
        "\nRedis-killed p99 {} vs limit 5 × max(baseline p99 {}, 5 ms) = {}\n",
        ms(redis_killed.p99),
        ms(baseline.p99),
        ms(p99_limit)
    );
    let _ = writeln!(
        r,
        "Requests over 100 ms, grouped into bursts (by send time):\n"
    );
    for p in stats
        .iter()
        .filter(|p| p.name != "whole run" && !p.slow.is_empty())
    {
        let mut bursts: Vec<(Duration, Duration, usize, Duration)> = Vec::new();
        for x in &p.slow {
            match bursts.last_mut() {
                Some(b) if x.sent <= b.1 + Duration::from_millis(100) => {
                    b.1 = x.sent;
                    b.2 += 1;
                    b.3 = b.3.max(x.latency());
                }
                _ => bursts.push((x.sent, x.sent, 1, x.latency())),
            }
        }
        let list: Vec<String> = bursts
            .iter()
            .map(|(a, b, n, m)| format!("{}–{}: {n} (max {})", secs(*a), secs(*b), ms(*m)))
            .collect();
        let _ = writeln!(r, "- {}: {}", p.name, list.join("; "));
    }
    let _ = writeln!(r);
    let _ = writeln!(r, "## Recovery after each fault (from the fault's end)\n");
    let _ = writeln!(
        r,
        "| fault | fault ended | first store-backed 200 (fresh valid token) | /readyz 200 | \
         /readyz redis connected + feed live |\n|---|---|---|---|---|"
    );
    let show = |d: Option<Duration>| d.map_or("NOT within 10 s".into(), ms);
    for x in &recovered {
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} | {} |",
            x.fault,
            secs(x.fault_end),
            show(x.first_store_200),
            show(x.readyz_200),
            show(x.fully_healthy)
        );
    }
    let _ = writeln!(
        r,
        "\n## Final check (load stopped + 1 s)\n\n- readyz 200: {ready}\n- tokens checked: \
         {checked} ({} valid incl. probes → 200, {REVOKED} revoked → 401), 503 retries: \
         {final_retried}\n- failures: {}",
        VALID + PROBES,
        final_failures.len()
    );
    for f in &final_failures {
        let _ = writeln!(r, "  - {f}");
    }
    let _ = writeln!(r, "\n## knoxgate metrics at the end\n\n```");
    for l in metrics.lines().filter(|l| {
        !l.starts_with('#')
            && [
                "knoxgate_cache_lookups",
                "knoxgate_stale",
                "knoxgate_feed",
                "knoxgate_verify_total",
                "knoxgate_redis_errors",
                "knoxgate_postgres_errors",
                "knoxgate_coalesced",
                "knoxgate_load_shed",
            ]
            .iter()
            .any(|p| l.starts_with(p))
    }) {
        let _ = writeln!(r, "{l}");
    }
    let _ = writeln!(r, "```");
    let verdict = total_wrong == 0
        && redis_killed.p99 <= p99_limit
        && final_failures.is_empty()
        && ready
        && recovered
            .iter()
            .all(|x| x.first_store_200.is_some() && x.readyz_200.is_some());
    let _ = writeln!(r, "\n## Verdict: {}", if verdict { "PASS" } else { "FAIL" });
    println!("\n{r}");
    let path = target_file("chaos-report.md");
    std::fs::write(&path, &r).expect("write report");
    println!("[chaos] report written to {}", path.display());

    // --- Teardown (bounded) and assertions ---
    drop(ctx);
    if let Ok(running) = Arc::try_unwrap(running) {
        let _ = tokio::time::timeout(Duration::from_secs(5), running.shutdown()).await;
    }
    assert_eq!(total_wrong, 0, "wrong answers: see the report above");
    assert!(
        redis_killed.p99 <= p99_limit,
        "per-request stall while Redis was killed: p99 {} > {}",
        ms(redis_killed.p99),
        ms(p99_limit)
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
