//! The fault script: private Redis and Postgres processes that it kills, freezes, restarts and
//! locks at fixed offsets from the load's start, revoking tokens in between, and the recovery
//! probes started after each fault.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use knoxgate::app::Running;
use tokio::task::JoinHandle;

use crate::{
    CLIENT_TIMEOUT, Class, NO_ANSWER_IO, NO_ANSWER_TIMEOUT, PROBES, RECOVERY_LIMIT, REVOKED,
    Sample, Tokens, load::Clock, support::*,
};

/// When each fault began and ended (since t0).
#[derive(Default, Debug, Clone)]
pub struct Timeline {
    pub redis_kill: Duration,
    pub redis_back: Duration,
    pub redis_stop: Duration,
    pub redis_cont: Duration,
    pub feed_kill: Duration,
    pub rev_start: Duration,
    pub rev_commit: Duration,
    pub pg_restart_begin: Duration,
    pub pg_restart_end: Duration,
    pub lock_begin: Duration,
    pub lock_end: Duration,
    pub outage_begin: Duration,
    pub outage_end: Duration,
}

#[derive(Debug, Clone)]
pub struct Recovery {
    pub fault: &'static str,
    pub fault_end: Duration,
    /// First 200 for a never-used valid token (its answer needed a store).
    pub first_store_200: Option<Duration>,
    /// First /readyz 200.
    pub readyz_200: Option<Duration>,
    /// First /readyz saying redis connected and feed live.
    pub fully_healthy: Option<Duration>,
}

/// Everything the fault script and the recovery probes need.
#[derive(Clone)]
pub struct Ctx {
    pub clock: Clock,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub tokens: Arc<Tokens>,
    pub next_probe: Arc<AtomicUsize>,
    pub probe_samples: Arc<Mutex<Vec<Sample>>>,
    pub running: Arc<Running>,
}

impl Ctx {
    pub fn state(&self) -> String {
        format!("(ready={})", self.running.ready())
    }

    /// Measures, from `fault_end`, the time to the first store-backed 200 and to readiness.
    pub fn recovery(&self, fault: &'static str, fault_end: Duration) -> JoinHandle<Recovery> {
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
                            Ok(r) => r.status,
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
                    if let Ok(Response {
                        status: s, body, ..
                    }) = get_once(ctx.admin, "/readyz", None, Duration::from_secs(3)).await
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

/// The fault script. Times are offsets from t0 (load start).
pub async fn fault_script(
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
    redis.lock().await.kill();
    c.log(format!("redis: kill -9 {}", ctx.state()));
    c.at(s(5)).await;
    c.log("redis: restarting on the same port");
    redis.lock().await.restart().await;
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
        let admin = connect_retry(&pg.url(), s(3)).await;
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
        let admin = connect_retry(&pg.url(), s(3)).await;
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
        run_blocking(move || pg.restart_fast()).await;
    }
    let _ = connect_retry(&pg.url(), s(10)).await;
    tl.pg_restart_end = c.log(format!("postgres: accepting again {}", ctx.state()));
    rec.push(ctx.recovery("postgres restart", tl.pg_restart_end));

    // Postgres slow: the token table locked.
    c.at(s(21)).await;
    {
        let locker = connect_retry(&pg.url(), s(3)).await;
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
    redis.lock().await.kill();
    c.log("redis: kill -9");
    {
        let pg = Arc::clone(&pg);
        let ok = run_blocking(move || pg.stop_immediate()).await;
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
    redis.lock().await.restart().await;
    {
        let pg = Arc::clone(&pg);
        run_blocking(move || pg.start()).await;
    }
    let _ = connect_retry(&pg.url(), s(10)).await;
    tl.outage_end = c.log(format!(
        "redis and postgres accepting again {}",
        ctx.state()
    ));
    rec.push(ctx.recovery("total outage", tl.outage_end));
    (tl, rec)
}
