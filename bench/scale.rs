//! Scale benchmark, the measuring half of `bench/scale.sh`: many knoxgate instances (separate
//! processes the script started) in front of one Postgres with `max_connections = 100`, reached
//! through PgBouncer. Prints a markdown section for `bench/SCALE.md`.
//!
//!     scale --mode redis|listen --pg URL --instances FILE --relays PID,PID [--idle-wait SECS]
//!           [--revocations N] [--wave-tokens N] [--redis-port PORT]
//!
//! `--pg` is a direct connection to the private Postgres; `--instances` lists one instance a
//! line: `listen_port admin_port pid`. Steps:
//! * Idle: waits until every instance answers `/readyz` 200 (or 90 s), then `--idle-wait`
//!   seconds more (past `postgres.idle_timeout`), and counts client backends in
//!   `pg_stat_activity` (the bench's own connection excluded) and each instance's RSS.
//! * Wave: `--wave-tokens` cold tokens per instance, all instances at once, each token on a
//!   connection of its own; backends sampled every 10 ms meanwhile; every status and the
//!   instances' `knoxgate_postgres_errors_total` counted.
//! * Revocations (`redis` mode): `--revocations` tokens, each verified (cached) on every
//!   instance; then, one at a time, a raw-SQL `DELETE` on the direct connection. The clock
//!   starts when the `DELETE` is sent. Each instance stamps when it applied the change
//!   (`knoxgate_feed_last_change_timestamp_seconds`, the same machine's clock); the revocation
//!   has reached the fleet at the latest stamp. The bench stays quiet for 500 ms meanwhile,
//!   then checks the outcome: sweeps of one request to every instance still answering other
//!   than 401 (all at once, keep-alive connections) until all answer 401 or 5 s passed.
//! * Relays' CPU (`redis` mode): utime + stime of the relay processes over 1,000 single-row
//!   `DELETE`s (one change event each), and over the same wall time idle after.

#[path = "args.rs"]
mod args;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use knoxgate::auth::{HashAlgorithm, token_key_of};
use tokio::task::JoinSet;

use support::{Client, insert_token, insert_user, metric, percentile, redis_cli};

const BENCH_APP: &str = "knoxscale-bench";
const LOOKUP_STATEMENTS: &str = "knoxgate_sql_statements_total{statement=\"lookup\"}";
/// The change stream, under the prefix `bench/scale.sh` configures.
const STREAM: &str = "knoxscale:knoxgate:feed";
const READY_LIMIT: Duration = Duration::from_secs(90);
const REVOCATION_LIMIT: Duration = Duration::from_secs(5);
/// How long the bench stays quiet after each revocation's `DELETE` before checking the answers.
const SETTLE: Duration = Duration::from_millis(500);
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

struct Instance {
    addr: SocketAddr,
    admin: SocketAddr,
    pid: u32,
}

/// "met" or "NOT met", for a figure against its target.
fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn read_instances(path: &str) -> Vec<Instance> {
    let text = std::fs::read_to_string(path).expect("instances file");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Instance {
                addr: SocketAddr::from(([127, 0, 0, 1], f[0].parse().unwrap())),
                admin: SocketAddr::from(([127, 0, 0, 1], f[1].parse().unwrap())),
                pid: f[2].parse().unwrap(),
            }
        })
        .collect()
}

/// Client backends other than this bench's, by application_name.
async fn backends(pg: &tokio_postgres::Client) -> (i64, Vec<(String, i64)>) {
    let rows = pg
        .query(
            "SELECT coalesce(application_name, ''), count(*) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
             AND application_name <> $1 GROUP BY 1 ORDER BY 2 DESC",
            &[&BENCH_APP],
        )
        .await
        .expect("pg_stat_activity");
    let by_app: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    (by_app.iter().map(|(_, n)| n).sum(), by_app)
}

fn by_app_text(by_app: &[(String, i64)]) -> String {
    if by_app.is_empty() {
        return "none".into();
    }
    by_app
        .iter()
        .map(|(app, n)| {
            let app = if app.is_empty() { "(none)" } else { app };
            format!("{app}: {n}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

async fn ready(i: &Instance) -> bool {
    let Ok(mut c) = Client::connect(i.admin).await else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), c.get("/readyz", None)).await,
        Ok(Ok(r)) if r.status == 200
    )
}

/// Waits until every instance is ready or the limit passes; how many were, and when.
async fn wait_ready(instances: &Arc<Vec<Instance>>) -> (usize, Duration) {
    let start = Instant::now();
    let mut pending: Vec<usize> = (0..instances.len()).collect();
    while !pending.is_empty() && start.elapsed() < READY_LIMIT {
        let mut set = JoinSet::new();
        for &n in &pending {
            let instances = Arc::clone(instances);
            set.spawn(async move { (n, ready(&instances[n]).await) });
        }
        let mut still = Vec::new();
        while let Some(r) = set.join_next().await {
            let (n, ok) = r.expect("task");
            if !ok {
                still.push(n);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    (instances.len() - pending.len(), start.elapsed())
}

async fn sum_metric(instances: &[Instance], prefix: &str) -> f64 {
    let mut total = 0.0;
    for i in instances {
        total += metric(i.admin, prefix).await;
    }
    total
}

async fn new_tokens(pg: &tokio_postgres::Client, label: &str, n: usize) -> Vec<String> {
    let mut tokens = Vec::with_capacity(n);
    let mut user = 0;
    for k in 0..n {
        if k % 20 == 0 {
            user = insert_user(pg, &format!("{label}{k}"), "pw", true).await;
        }
        tokens.push(
            insert_token(
                pg,
                user,
                Some(Duration::from_secs(86_400)),
                "",
                HashAlgorithm::Sha512,
            )
            .await
            .token,
        );
    }
    tokens
}

/// One `/verify`; 0 when there was no answer.
async fn verify(c: &mut Client, token: &str) -> u16 {
    let auth = format!("Token {token}");
    match tokio::time::timeout(
        REQUEST_LIMIT,
        c.request("GET", "/verify", &[("Authorization", &auth)], b""),
    )
    .await
    {
        Ok(Ok(r)) => r.status,
        _ => 0,
    }
}

struct Wave {
    requests: usize,
    ok: usize,
    statuses: Vec<(u16, usize)>,
    took: Duration,
    peak: i64,
    peak_by_app: Vec<(String, i64)>,
    pg_errors: f64,
    /// Lookup statements the instances sent for the wave.
    lookup_statements: f64,
}

/// Every instance verifies `per_instance` cold tokens at once.
async fn wave(
    pg: &tokio_postgres::Client,
    instances: &Arc<Vec<Instance>>,
    label: &str,
    per_instance: usize,
) -> Wave {
    let tokens = new_tokens(pg, label, instances.len() * per_instance).await;
    let errors_before = sum_metric(instances, "knoxgate_postgres_errors_total").await;
    let lookups_before = sum_metric(instances, LOOKUP_STATEMENTS).await;
    // Connections first, so the wave itself is only the lookups.
    let mut clients = Vec::new();
    for (n, i) in instances.iter().enumerate() {
        for k in 0..per_instance {
            let c = Client::connect(i.addr).await.expect("connect");
            clients.push((c, tokens[n * per_instance + k].clone()));
        }
    }
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicI64::new(0));
    let peak_by_app = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = {
        let (sampling, peak, peak_by_app) = (
            Arc::clone(&sampling),
            Arc::clone(&peak),
            Arc::clone(&peak_by_app),
        );
        let url = args::string("--pg").unwrap();
        tokio::spawn(async move {
            let pg = bench_connection(&url).await;
            while sampling.load(Ordering::Relaxed) {
                let (n, by_app) = backends(&pg).await;
                if n > peak.load(Ordering::Relaxed) {
                    peak.store(n, Ordering::Relaxed);
                    *peak_by_app.lock().unwrap() = by_app;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (mut c, t) in clients {
        set.spawn(async move { verify(&mut c, &t).await });
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    while let Some(s) = set.join_next().await {
        *statuses.entry(s.expect("task")).or_default() += 1;
    }
    let took = start.elapsed();
    tokio::time::sleep(Duration::from_millis(100)).await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await.expect("sampler");
    let pg_errors = sum_metric(instances, "knoxgate_postgres_errors_total").await - errors_before;
    let lookup_statements = sum_metric(instances, LOOKUP_STATEMENTS).await - lookups_before;
    let peak_by_app = peak_by_app.lock().unwrap().clone();
    Wave {
        requests: tokens.len(),
        ok: statuses.get(&200).copied().unwrap_or(0),
        statuses: statuses.into_iter().collect(),
        took,
        peak: peak.load(Ordering::Relaxed),
        peak_by_app,
        pg_errors,
        lookup_statements,
    }
}

async fn bench_connection(url: &str) -> tokio_postgres::Client {
    let mut cfg: tokio_postgres::Config = url.parse().expect("--pg URL");
    cfg.application_name(BENCH_APP);
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect --pg");
    tokio::spawn(conn);
    client
}

struct Revocations {
    /// Per revocation: from sending the `DELETE` until the last instance applied it.
    everywhere: Vec<Duration>,
    /// Per instance and revocation: from sending the `DELETE` until that instance applied it.
    each: Vec<Duration>,
    /// Per revocation: from sending the `DELETE` until the first relay appended it to the
    /// stream (the entry id's time, Redis's clock).
    appended: Vec<Duration>,
    /// Revocations some instance did not stamp (its last change predates the `DELETE`).
    unstamped: usize,
    /// Revocations confirmed by the first sweep (every instance answered 401).
    first_sweep_401: usize,
    /// Revocations some instance still answered other than 401 after `REVOCATION_LIMIT`.
    missed: usize,
    sweeps: Vec<Duration>,
}

/// Unix time now, in seconds (the instances stamp `knoxgate_feed_last_change_timestamp_seconds`
/// with the same clock: everything runs on this machine).
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// One sweep: every instance in `pending` verifies `token`, all at once over keep-alive
/// connections; returns those that did not answer 401.
async fn sweep(
    clients: &mut [Option<Client>],
    instances: &Arc<Vec<Instance>>,
    pending: &[usize],
    token: &str,
) -> Vec<usize> {
    let mut set = JoinSet::new();
    for &n in pending {
        let mut c = clients[n].take().unwrap();
        let t = token.to_owned();
        let addr = instances[n].addr;
        set.spawn(async move {
            let mut status = verify(&mut c, &t).await;
            if c.closed {
                c = Client::connect(addr).await.expect("reconnect");
                if status == 0 {
                    status = verify(&mut c, &t).await;
                }
            }
            (n, c, status)
        });
    }
    let mut still = Vec::new();
    while let Some(r) = set.join_next().await {
        let (n, c, status) = r.expect("task");
        clients[n] = Some(c);
        if status != 401 {
            still.push(n);
        }
    }
    still
}

/// When the relays appended the change for `token_key` to the stream: the times (Unix seconds,
/// from the entry ids) of its entries among the stream's newest.
fn appended_at(redis_port: u16, token_key: &str) -> Vec<f64> {
    let newest = redis_cli(redis_port, &["XREVRANGE", STREAM, "+", "-", "COUNT", "20"]);
    let lines: Vec<&str> = newest.lines().collect();
    let mut at: Vec<f64> = lines
        .chunks(3)
        .filter(|entry| {
            entry.len() == 3 && entry[2].starts_with("t|") && entry[2].ends_with(token_key)
        })
        .filter_map(|entry| entry[0].split('-').next()?.parse::<f64>().ok())
        .map(|ms| ms / 1e3)
        .collect();
    at.sort_by(f64::total_cmp);
    at
}

/// Raw-SQL revocations of tokens cached on every instance: when each instance applied each
/// one (its own stamp), and a check that all then answer 401.
async fn revocations(
    pg: &tokio_postgres::Client,
    instances: &Arc<Vec<Instance>>,
    count: usize,
    redis_port: u16,
) -> Revocations {
    let tokens = new_tokens(pg, "revoke", count).await;
    let mut clients: Vec<Option<Client>> = Vec::new();
    for i in instances.iter() {
        clients.push(Some(Client::connect(i.addr).await.expect("connect")));
    }
    // Warm: every token verified on every instance (instances in parallel).
    let tokens = Arc::new(tokens);
    let mut set = JoinSet::new();
    for (n, c) in clients.iter_mut().enumerate() {
        let mut c = c.take().unwrap();
        let tokens = Arc::clone(&tokens);
        set.spawn(async move {
            let mut bad = 0;
            for t in tokens.iter() {
                if verify(&mut c, t).await != 200 {
                    bad += 1;
                }
            }
            (n, c, bad)
        });
    }
    let mut warm_failures = 0;
    while let Some(r) = set.join_next().await {
        let (n, c, bad) = r.expect("task");
        clients[n] = Some(c);
        warm_failures += bad;
    }
    assert_eq!(warm_failures, 0, "warm-up verifies that did not answer 200");
    // Let warm-up confirmations settle (none should be pending: every answer was a 200).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut out = Revocations {
        everywhere: Vec::new(),
        each: Vec::new(),
        appended: Vec::new(),
        unstamped: 0,
        first_sweep_401: 0,
        missed: 0,
        sweeps: Vec::new(),
    };
    for token in tokens.iter() {
        let sent = unix_now();
        let t0 = Instant::now();
        pg.execute(
            "DELETE FROM knox_authtoken WHERE token_key = $1",
            &[&token_key_of(token)],
        )
        .await
        .expect("delete");
        // Quiet while the change travels, so that the measuring client's own requests do not
        // compete with it for the shared cores.
        tokio::time::sleep(SETTLE).await;
        let mut pending: Vec<usize> = (0..instances.len()).collect();
        let mut first = true;
        while !pending.is_empty() && t0.elapsed() < REVOCATION_LIMIT {
            let started = Instant::now();
            pending = sweep(&mut clients, instances, &pending, token).await;
            out.sweeps.push(started.elapsed());
            if first && pending.is_empty() {
                out.first_sweep_401 += 1;
            }
            first = false;
        }
        if !pending.is_empty() {
            out.missed += 1;
        }
        // When each instance applied it, by its own stamp.
        let mut stamps = JoinSet::new();
        for i in instances.iter() {
            let admin = i.admin;
            stamps.spawn(async move {
                metric(admin, "knoxgate_feed_last_change_timestamp_seconds").await
            });
        }
        let stamps = stamps.join_all().await;
        let unstamped = stamps.iter().any(|&stamp| stamp < sent);
        let delays: Vec<Duration> = stamps
            .iter()
            .filter(|&&stamp| stamp >= sent)
            .map(|&stamp| Duration::from_secs_f64(stamp - sent))
            .collect();
        let latest = delays.iter().max().copied().unwrap_or_default();
        let appends = appended_at(redis_port, token_key_of(token));
        if let Some(first) = appends.first() {
            out.appended
                .push(Duration::from_secs_f64((first - sent).max(0.0)));
        }
        if unstamped {
            out.unstamped += 1;
        } else {
            out.everywhere.push(latest);
        }
        if unstamped || latest > Duration::from_millis(200) {
            let late = delays
                .iter()
                .filter(|d| **d > Duration::from_millis(200))
                .count();
            eprintln!(
                "bench: slow revocation: last stamp {} after the DELETE; appended by the relays \
                 at {:?} ms; instances stamped > 200 ms: {late}; unstamped: {unstamped}",
                ms(latest),
                appends
                    .iter()
                    .map(|t| ((t - sent) * 1e3).round())
                    .collect::<Vec<_>>(),
            );
        }
        out.each.extend(delays);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out
}

/// The relays' CPU over 1,000 change events, and over the same wall time idle before.
async fn relay_cpu(pg: &tokio_postgres::Client, relays: &[u32]) -> String {
    let tokens = new_tokens(pg, "events", 1000).await;
    let ticks = || relays.iter().map(|&p| cpu_ticks(p)).sum::<u64>();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let before = ticks();
    for t in &tokens {
        pg.execute(
            "DELETE FROM knox_authtoken WHERE token_key = $1",
            &[&token_key_of(t)],
        )
        .await
        .expect("delete");
    }
    // Time for the relays to append the last events.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy = ticks() - before;
    let wall = start.elapsed();
    let idle_before = ticks();
    tokio::time::sleep(wall).await;
    let idle = ticks() - idle_before;
    format!(
        "- Relays' CPU (both relays, utime + stime, 10 ms ticks): **{} ms per 1,000 events** \
         (1,000 single-row `DELETE`s in {}, incl. 1 s drain); the same wall time idle: {} ms \
         (heartbeats); net ≈ {} ms per 1,000 events.\n",
        busy * 10,
        ms(wall),
        idle * 10,
        busy.saturating_sub(idle) * 10,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mode = args::string("--mode").expect("--mode redis|listen");
    let url = args::string("--pg").expect("--pg URL");
    let instances = Arc::new(read_instances(
        &args::string("--instances").expect("--instances FILE"),
    ));
    let relays: Vec<u32> = args::string("--relays")
        .unwrap_or_default()
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let idle_wait = Duration::from_secs(args::number::<u64>("--idle-wait", 35));
    let per_instance = args::number::<usize>("--wave-tokens", 5);
    let revocation_count = args::number::<usize>("--revocations", 60);
    let pg = bench_connection(&url).await;
    let n = instances.len();
    let mut out = String::new();
    out.push_str(&format!("### `cache.feed = \"{mode}\"`, {n} instances\n\n"));

    let (ready, took) = wait_ready(&instances).await;
    out.push_str(&format!(
        "- Ready (`/readyz` 200): **{ready} of {n}**, {:.1} s after the last start{}.\n",
        took.as_secs_f64(),
        if ready < n {
            " (then the 90 s limit)"
        } else {
            ""
        },
    ));
    if mode == "listen" {
        let feeds = sum_metric(&instances, "knoxgate_feed_connected").await;
        out.push_str(&format!(
            "- Feeds connected (`knoxgate_feed_connected` summed): **{feeds}** of {n}.\n"
        ));
    }
    tokio::time::sleep(idle_wait).await;
    let (idle, idle_by_app) = backends(&pg).await;
    out.push_str(&format!(
        "- Postgres backends, all idle ({} s after ready): **{idle}** ({}){}\n",
        idle_wait.as_secs(),
        by_app_text(&idle_by_app),
        if mode == "redis" {
            format!("; target ≤ 10: {}", verdict(idle <= 10))
        } else {
            String::new()
        }
    ));
    let mut rss: Vec<u64> = instances.iter().filter_map(|i| rss_kib(i.pid)).collect();
    rss.sort_unstable();
    if !rss.is_empty() {
        let total: u64 = rss.iter().sum();
        out.push_str(&format!(
            "- RSS per idle instance: median **{:.1} MiB**, max {:.1} MiB, all {} instances {:.0} MiB\n",
            rss[rss.len() / 2] as f64 / 1024.0,
            rss[rss.len() - 1] as f64 / 1024.0,
            rss.len(),
            total as f64 / 1024.0,
        ));
    }
    if !relays.is_empty() {
        let relay_rss: Vec<String> = relays
            .iter()
            .filter_map(|&p| rss_kib(p))
            .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .collect();
        out.push_str(&format!("- RSS per relay: {}\n", relay_rss.join(", ")));
    }

    let w = wave(&pg, &instances, &format!("wave{mode}"), per_instance).await;
    out.push_str(&format!(
        "- Cold wave ({} instances × {per_instance} cold tokens = {} lookups at once, through \
         PgBouncer): peak Postgres backends **{}** ({}); {} answered 200 in {}; statuses {:?}; \
         `knoxgate_postgres_errors_total` +{}; {} lookup statements (batched){}\n",
        n,
        w.requests,
        w.peak,
        by_app_text(&w.peak_by_app),
        w.ok,
        ms(w.took),
        w.statuses,
        w.pg_errors,
        w.lookup_statements,
        if mode == "redis" {
            format!(
                "; target ≤ 25 backends and 0 errors: {}",
                verdict(w.peak <= 25 && w.ok == w.requests && w.pg_errors == 0.0)
            )
        } else {
            String::new()
        }
    ));
    let (after, after_by_app) = backends(&pg).await;
    out.push_str(&format!(
        "- Right after the wave: {after} backends ({})\n",
        by_app_text(&after_by_app)
    ));

    if mode == "redis" {
        let redis_port: u16 = args::string("--redis-port")
            .and_then(|p| p.parse().ok())
            .expect("--redis-port PORT");
        let r = revocations(&pg, &instances, revocation_count, redis_port).await;
        let mut appended = r.appended.clone();
        appended.sort_unstable();
        let mut everywhere = r.everywhere.clone();
        everywhere.sort_unstable();
        let mut each = r.each.clone();
        each.sort_unstable();
        let mut sweeps = r.sweeps.clone();
        sweeps.sort_unstable();
        let max = everywhere.last().copied().unwrap_or_default();
        out.push_str(&format!(
            "- Raw-SQL `DELETE` of a token cached on all {n} instances → applied by all {n} \
             (their own stamps; {} revocations, {} with an instance that never stamped it): \
             p50 **{}**, p99 **{}**, max **{}**; per instance p50 {}, p99 {}; target p99 ≤ \
             100 ms and max ≤ 1 s: {}\n",
            everywhere.len() + r.unstamped,
            r.unstamped,
            ms(percentile(&everywhere, 50.0)),
            ms(percentile(&everywhere, 99.0)),
            ms(max),
            ms(percentile(&each, 50.0)),
            ms(percentile(&each, 99.0)),
            verdict(
                r.unstamped == 0
                    && r.missed == 0
                    && percentile(&everywhere, 99.0) <= Duration::from_millis(100)
                    && max <= Duration::from_secs(1)
            ),
        ));
        out.push_str(&format!(
            "- Of which: from the `DELETE` to the first relay's append to the stream (the entry \
             id's time): p50 {}, p99 {}, max {}\n",
            ms(percentile(&appended, 50.0)),
            ms(percentile(&appended, 99.0)),
            ms(appended.last().copied().unwrap_or_default()),
        ));
        out.push_str(&format!(
            "- Checked by requests {} ms after each `DELETE`: all {n} answered 401 at the first \
             sweep for **{} of {}** revocations; {} still had an instance answering otherwise \
             after {} s; a sweep of {n} requests took p50 {}, max {}\n",
            SETTLE.as_millis(),
            r.first_sweep_401,
            everywhere.len() + r.unstamped,
            r.missed,
            REVOCATION_LIMIT.as_secs(),
            ms(percentile(&sweeps, 50.0)),
            ms(sweeps.last().copied().unwrap_or_default()),
        ));
        out.push_str(&relay_cpu(&pg, &relays).await);
    }
    println!("{out}");
}
