//! The fault script: private Redis and Postgres processes that it kills, freezes, restarts and
//! locks at fixed offsets from the load's start, revoking tokens in between, and the recovery
//! probes started after each fault.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
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

pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
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
        blocking(move || pg.restart_fast()).await;
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
    redis.lock().await.restart().await;
    {
        let pg = Arc::clone(&pg);
        blocking(move || pg.start()).await;
    }
    let _ = connect_retry(&pg.url(), s(10)).await;
    tl.outage_end = c.log(format!(
        "redis and postgres accepting again {}",
        ctx.state()
    ));
    rec.push(ctx.recovery("total outage", tl.outage_end));
    (tl, rec)
}

/// The newest Postgres server binaries installed the Debian way.
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres installed in /usr/lib/postgresql")
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("initdb in /usr/lib/postgresql/<version>/bin")
        .1
}

/// A private Postgres cluster in a temp dir, run as the `postgres` OS user on a spare
/// loopback port with trust auth and fsync off. Stopped (immediate, then SIGKILL) on drop.
pub struct PrivatePg {
    pub port: u16,
    pub dir: tempfile::TempDir,
}

pub fn runuser_pg(args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("runuser")
}

impl PrivatePg {
    /// initdb + start. Blocking: call from `spawn_blocking`.
    pub fn init_and_start() -> PrivatePg {
        let dir = tempfile::Builder::new()
            .prefix("knoxgate-chaos-pg")
            .tempdir()
            .expect("tempdir");
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(st.success(), "chown failed");
        let pg = PrivatePg {
            port: free_port(),
            dir,
        };
        let data = pg.data();
        let out = runuser_pg(&[
            &format!("{}/initdb", pg_bin().display()),
            "-D",
            data.to_str().unwrap(),
            "--auth=trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start();
        pg
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn options(&self) -> String {
        format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
             -c full_page_writes=off -c synchronous_commit=off",
            self.port,
            self.dir.path().display()
        )
    }

    pub fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        let data = self.data();
        let log = self.log_path();
        let mut full = vec![
            format!("{}/pg_ctl", pg_bin().display()),
            "-D".into(),
            data.to_str().unwrap().into(),
            "-l".into(),
            log.to_str().unwrap().into(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        runuser_pg(&refs)
    }

    /// Starts and waits (pg_ctl -w) until it accepts connections. Blocking.
    pub fn start(&self) {
        let opts = self.options();
        let out = self.pg_ctl(&["-w", "-t", "30", "-o", &opts, "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// pg_ctl restart -m fast, waiting for it to accept. Blocking.
    pub fn restart_fast(&self) {
        let opts = self.options();
        let out = self.pg_ctl(&["-w", "-t", "30", "-m", "fast", "-o", &opts, "restart"]);
        assert!(
            out.status.success(),
            "pg_ctl restart failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// pg_ctl stop -m immediate. Blocking.
    pub fn stop_immediate(&self) -> bool {
        self.pg_ctl(&["-w", "-t", "10", "-m", "immediate", "stop"])
            .status
            .success()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.stop_immediate();
        }
        // The temp dir goes away with us; keep the server log for post-mortems.
        let _ = std::fs::copy(self.log_path(), target_file("chaos-postgres.log"));
        if let Some(pid) = self.postmaster_pid() {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}
