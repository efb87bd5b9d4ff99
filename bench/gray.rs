//! Gray-failure figures: knoxgate under steady load while its Redis, then its Postgres, answers
//! 100 ms late (a delaying TCP proxy in front of each store, `SlowProxy`), every answer checked
//! against the truth.
//!
//!     cargo run --release --example gray [-- --phase-secs 8 --rate 1000 --delay-ms 100]
//!
//! Needs Postgres on 127.0.0.1:5432 (trust) and Redis on 127.0.0.1:6379. Creates and drops its
//! own database, uses a fresh Redis key prefix; all traffic stays on 127.0.0.1. Prints a markdown
//! report (also written to `target/gray-report.md`).
//!
//! Method:
//! * The instance under test reaches both stores through the proxies (its pool and its change
//!   feed alike) with the default timeouts (Redis command 250 ms, statement 1 s, request 2 s).
//!   A second instance, direct to the stores and on the same key prefix, stands for the rest of
//!   a fleet: tokens it verified are in Redis but not in the first instance's memory.
//! * 16 keep-alive clients send `/verify` at a fixed total rate. Mix: 60% hot tokens (in memory),
//!   15% warm (in Redis only, each sent once), 15% cold (in Postgres only, each sent once), 5%
//!   revoked before the run (cached everywhere, then deleted), 5% random unknown tokens.
//! * Four phases of equal length: baseline, Redis +delay, Postgres +delay, after. Requests are
//!   assigned to the phase they were sent in. Per phase: latency, 5xx, wrong answers (valid → not
//!   200/503, revoked or unknown → 200, other statuses, no answer within 5 s) and where the
//!   lookups that missed the in-process tier were answered, from the deltas of
//!   `knoxgate_cache_lookups_total{tier,result}`: Redis (hit or miss), Postgres, and "fallback":
//!   Redis failed (`result="error"`) and Postgres answered instead.

#[path = "args.rs"]
mod args;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use knoxgate::{
    app,
    auth::{HashAlgorithm, generate_token, token_key_of},
    config::Config,
};

use support::{
    Client, SlowProxy, TestDb, config_from, get_once, insert_user, merge_toml, percentile,
    target_file, wait_ready,
};

const CLIENTS: usize = 16;
const HOT: usize = 200;
const REVOKED: usize = 50;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
const PHASES: [&str; 4] = [
    "baseline",
    "Redis +delay",
    "Postgres +delay",
    "after (delay removed)",
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Class {
    Hot,
    Warm,
    Cold,
    Revoked,
    Unknown,
}

struct Sample {
    class: Class,
    status: u16,
    sent: Duration,
    latency: Duration,
}

struct Pools {
    hot: Vec<String>,
    warm: Vec<String>,
    cold: Vec<String>,
    revoked: Vec<String>,
    next_warm: AtomicUsize,
    next_cold: AtomicUsize,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn config(pg_url: &str, redis_url: &str, prefix: &str) -> Config {
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [postgres]\nurl = \"{pg_url}\"\n[redis]\nurl = \"{redis_url}\"\n\
         key_prefix = \"{prefix}\"\n[sessions]\npassword_iterations = 1000\n\
         [log]\nlevel = \"warn\"\n"
    );
    config_from(&merge_toml(&base, ""))
}

/// Inserts `n` knox-default tokens (SHA-512, ten hours) in batches; returns the tokens.
async fn insert_tokens(client: &tokio_postgres::Client, user_ids: &[i32], n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = (n - out.len()).min(1000);
        let tokens: Vec<String> = (0..batch).map(|_| generate_token("", 64)).collect();
        let digests: Vec<String> = tokens
            .iter()
            .map(|t| HashAlgorithm::Sha512.hex_digest(t.as_bytes()))
            .collect();
        let keys: Vec<String> = tokens.iter().map(|t| token_key_of(t).to_owned()).collect();
        let users: Vec<i32> = (0..batch)
            .map(|i| user_ids[(out.len() + i) % user_ids.len()])
            .collect();
        client
            .execute(
                "INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) \
                 SELECT d, now(), u, now() + interval '10 hours', k \
                 FROM unnest($1::text[], $2::int[], $3::text[]) AS t(d, u, k)",
                &[&digests, &users, &keys],
            )
            .await
            .expect("insert tokens");
        out.extend(tokens);
    }
    out
}

/// Every token once through `addr` over one keep-alive connection; each must be `want`.
async fn warm(addr: SocketAddr, tokens: &[String], want: u16) {
    let mut c = Client::connect(addr).await.expect("connect");
    for t in tokens {
        let r = c
            .get("/verify", Some(&format!("Token {t}")))
            .await
            .expect("warm-up request");
        assert_eq!(r.status, want, "warm-up");
        if c.closed {
            c = Client::connect(addr).await.expect("reconnect");
        }
    }
}

/// The `knoxgate_cache_lookups_total` counters (and a few others) at one moment.
async fn counters(admin: SocketAddr) -> BTreeMap<String, f64> {
    let text = get_once(admin, "/metrics", None, Duration::from_secs(3))
        .await
        .expect("metrics")
        .body_text();
    text.lines()
        .filter(|l| {
            l.starts_with("knoxgate_cache_lookups_total")
                || l.starts_with("knoxgate_stale_answers_total")
                || l.starts_with("knoxgate_postgres_errors_total")
                || l.starts_with("knoxgate_redis_errors_total")
        })
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn lookups(c: &BTreeMap<String, f64>, tier: &str, result: &str) -> f64 {
    c.get(&format!(
        "knoxgate_cache_lookups_total{{tier=\"{tier}\",result=\"{result}\"}}"
    ))
    .copied()
    .unwrap_or(0.0)
}

fn sum_of(c: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    c.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// xorshift64: enough randomness for picking tokens.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x % n as u64) as usize
    }
}

async fn client_task(
    id: usize,
    addr: SocketAddr,
    pools: Arc<Pools>,
    stop: Arc<AtomicBool>,
    t0: Instant,
    interval: Duration,
) -> Vec<Sample> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(id as u64 + 1) | 1);
    let mut conn: Option<Client> = None;
    let mut out = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next.into()).await;
        next = (next + interval).max(Instant::now());
        let r = rng.below(100);
        let (class, token) = if r < 60 {
            (Class::Hot, pools.hot[rng.below(HOT)].clone())
        } else if r < 75 {
            let i = pools.next_warm.fetch_add(1, Ordering::Relaxed);
            (
                Class::Warm,
                pools.warm.get(i).expect("warm pool exhausted").clone(),
            )
        } else if r < 90 {
            let i = pools.next_cold.fetch_add(1, Ordering::Relaxed);
            (
                Class::Cold,
                pools.cold.get(i).expect("cold pool exhausted").clone(),
            )
        } else if r < 95 {
            (Class::Revoked, pools.revoked[rng.below(REVOKED)].clone())
        } else {
            (Class::Unknown, generate_token("", 64))
        };
        if conn.is_none() {
            match tokio::time::timeout(CLIENT_TIMEOUT, Client::connect(addr)).await {
                Ok(Ok(c)) => conn = Some(c),
                _ => continue,
            }
        }
        let c = conn.as_mut().unwrap();
        let auth = format!("Token {token}");
        let started = Instant::now();
        let status = match tokio::time::timeout(CLIENT_TIMEOUT, c.get("/verify", Some(&auth))).await
        {
            Ok(Ok(r)) => r.status,
            // No answer: 0 (connection error) or 1 (timeout), both wrong.
            Ok(Err(_)) => 0,
            Err(_) => 1,
        };
        if status <= 1 || c.closed {
            conn = None;
        }
        out.push(Sample {
            class,
            status,
            sent: started - t0,
            latency: started.elapsed(),
        });
    }
    out
}

/// A valid token must get 200 (or 503 while unknowable), a revoked or unknown one 401 (or 503).
fn wrong(s: &Sample) -> bool {
    !matches!(
        (s.class, s.status),
        (Class::Hot | Class::Warm | Class::Cold, 200 | 503)
            | (Class::Revoked | Class::Unknown, 401 | 503)
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let phase = Duration::from_secs(args::number::<u64>("--phase-secs", 8));
    let rate = args::number::<usize>("--rate", 1000);
    let delay = Duration::from_millis(args::number::<u64>("--delay-ms", 100));
    let per_phase = rate as f64 * phase.as_secs_f64();
    // 15% each, over four phases, with room for the dice.
    let pool = (per_phase * 0.15 * 4.0 * 1.3) as usize + 200;

    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut users = Vec::new();
    for i in 0..50 {
        users.push(insert_user(&client, &format!("gray{i}"), "pw", true).await);
    }
    let hot = insert_tokens(&client, &users, HOT).await;
    let warm_pool = insert_tokens(&client, &users, pool).await;
    let cold_pool = insert_tokens(&client, &users, pool).await;
    let revoked = insert_tokens(&client, &users, REVOKED).await;

    let redis_proxy = SlowProxy::start("127.0.0.1:6379".parse().unwrap()).await;
    let pg_proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let slow_pg_url = db
        .url
        .replace("127.0.0.1:5432", &pg_proxy.addr().to_string());
    let prefix = format!("kgg{}", generate_token("", 8));
    let under_test = app::start(config(
        &slow_pg_url,
        &format!("redis://{}/0", redis_proxy.addr()),
        &prefix,
    ))
    .await
    .expect("start");
    let fleet = app::start(config(&db.url, "redis://127.0.0.1:6379/0", &prefix))
        .await
        .expect("start the second instance");
    wait_ready(&under_test, Duration::from_secs(10)).await;
    wait_ready(&fleet, Duration::from_secs(10)).await;

    // Hot and revoked tokens cached in both instances and Redis; the warm pool in Redis only.
    warm(under_test.addr, &hot, 200).await;
    warm(under_test.addr, &revoked, 200).await;
    warm(fleet.addr, &revoked, 200).await;
    warm(fleet.addr, &warm_pool, 200).await;
    let n = client
        .execute(
            "DELETE FROM knox_authtoken WHERE token_key = ANY($1)",
            &[&revoked
                .iter()
                .map(|t| token_key_of(t).to_owned())
                .collect::<Vec<_>>()],
        )
        .await
        .expect("revoke");
    assert_eq!(n as usize, REVOKED);
    // The change feed evicts them from both instances and Redis.
    tokio::time::sleep(Duration::from_secs(1)).await;
    warm(under_test.addr, &revoked, 401).await;

    let pools = Arc::new(Pools {
        hot,
        warm: warm_pool,
        cold: cold_pool,
        revoked,
        next_warm: AtomicUsize::new(0),
        next_cold: AtomicUsize::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let interval = Duration::from_secs_f64(CLIENTS as f64 / rate as f64);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client_task(
                id,
                under_test.addr,
                Arc::clone(&pools),
                Arc::clone(&stop),
                t0,
                interval,
            ))
        })
        .collect();
    let mut snapshots = vec![counters(under_test.admin_addr).await];
    for (i, _) in PHASES.iter().enumerate() {
        match i {
            1 => redis_proxy.set_delay(delay),
            2 => {
                redis_proxy.set_delay(Duration::ZERO);
                pg_proxy.set_delay(delay);
            }
            3 => pg_proxy.set_delay(Duration::ZERO),
            _ => {}
        }
        tokio::time::sleep_until((t0 + phase * (i as u32 + 1)).into()).await;
        snapshots.push(counters(under_test.admin_addr).await);
    }
    stop.store(true, Ordering::SeqCst);
    let mut samples = Vec::new();
    for c in clients {
        samples.extend(c.await.expect("client"));
    }

    let mut r = String::new();
    let _ = writeln!(r, "# knoxgate gray-failure figures\n");
    let _ = writeln!(
        r,
        "{CLIENTS} keep-alive clients at {rate} requests/s in all, {} phases of {} s; \
         +{} on the store's replies (`SlowProxy`); default timeouts (Redis command 250 ms, \
         statement 1 s, request 2 s). Mix: 60% hot, 15% warm (Redis only), 15% cold (Postgres \
         only), 5% revoked before the run, 5% unknown.\n",
        PHASES.len(),
        phase.as_secs(),
        ms(delay)
    );
    let _ = writeln!(
        r,
        "| phase | requests | p50 | p99 | max | 5xx | wrong | lookups past memory | Redis answered | \
         Postgres answered | fallback (Redis failed → Postgres) | stale answers |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut total_wrong = 0;
    for (i, name) in PHASES.iter().enumerate() {
        let from = phase * i as u32;
        let to = from + phase;
        let inside: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.sent >= from && s.sent < to)
            .collect();
        let mut lat: Vec<Duration> = inside.iter().map(|s| s.latency).collect();
        lat.sort();
        let errors = inside.iter().filter(|s| s.status >= 500).count();
        let bad = inside.iter().filter(|s| wrong(s)).count();
        total_wrong += bad;
        let (a, b) = (&snapshots[i], &snapshots[i + 1]);
        let d = |tier: &str, result: &str| lookups(b, tier, result) - lookups(a, tier, result);
        let past_memory = d("memory", "miss");
        let redis = d("redis", "hit") + d("redis", "miss");
        let fallback = d("redis", "error");
        let postgres = d("postgres", "hit") + d("postgres", "miss");
        let stale =
            sum_of(b, "knoxgate_stale_answers_total") - sum_of(a, "knoxgate_stale_answers_total");
        let share = |x: f64| {
            if past_memory > 0.0 {
                format!("{:.1}%", 100.0 * x / past_memory)
            } else {
                "–".to_owned()
            }
        };
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} | {} | {errors} | {bad} | {past_memory:.0} | {} | {} | {} | {stale:.0} |",
            name.replace("+delay", &format!("+{}", ms(delay))),
            inside.len(),
            ms(percentile(&lat, 50.0)),
            ms(percentile(&lat, 99.0)),
            ms(lat.last().copied().unwrap_or_default()),
            share(redis),
            share(postgres),
            share(fallback),
        );
    }
    let mut by_class: BTreeMap<(Class, u16), usize> = BTreeMap::new();
    for s in &samples {
        *by_class.entry((s.class, s.status)).or_insert(0) += 1;
    }
    let _ = writeln!(
        r,
        "\nAnswers by class and status (whole run): {by_class:?}\n"
    );
    let _ = writeln!(
        r,
        "Wrong answers: **{total_wrong}** (valid → 401, revoked or unknown → 200, other status, \
         no answer within 5 s)."
    );
    println!("{r}");
    let _ = std::fs::write(target_file("gray-report.md"), &r);
    under_test.shutdown().await;
    fleet.shutdown().await;
    drop(client);
    drop(db);
    assert_eq!(total_wrong, 0, "wrong answers");
}
