//! Private servers for the fleet tests (connections, failover, pgbouncer): Postgres clusters in temp dirs (a primary, a streaming
//! standby made with `pg_basebackup -R`, small `max_connections`), PgBouncer in front of one,
//! and a knoxgate configuration pointed at them. Each runs on a spare 127.0.0.1 port and is
//! stopped by PID when dropped. Postgres and PgBouncer run as the `postgres` OS user (both
//! refuse root); `scripts/ensure-tools.sh` installs PgBouncer.

#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use knoxgate::{app, config::Config};

use super::{TestServer, config_for_url, free_port, http, make_test_ca, unique};

/// The newest Postgres server binaries installed the Debian way (/usr/lib/postgresql/<v>/bin).
pub fn pg_bin() -> PathBuf {
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

fn runuser_pg(args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("runuser")
}

fn temp_dir_for_postgres(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir.path())
        .status()
        .expect("chown");
    assert!(st.success(), "chown failed");
    dir
}

fn check(out: std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private Postgres cluster in a temp dir: trust auth, fsync off, its own port. Stopped
/// (immediate, then SIGKILL of the postmaster) on drop.
pub struct PrivatePg {
    pub port: u16,
    dir: tempfile::TempDir,
    settings: String,
    /// Where the server log is copied on drop (the temp dir goes away with it).
    keep_log: Option<PathBuf>,
}

impl PrivatePg {
    /// initdb + start, with extra `-c name=value` server settings. Blocking.
    pub fn init_and_start(settings: &str) -> PrivatePg {
        let pg = PrivatePg {
            port: free_port(),
            dir: temp_dir_for_postgres("knoxgate-pg"),
            settings: settings.to_owned(),
            keep_log: None,
        };
        let data = pg.data();
        check(
            runuser_pg(&[
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
            ]),
            "initdb",
        );
        pg.start();
        pg
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`), started. Blocking.
    pub fn standby_of(primary: &PrivatePg) -> PrivatePg {
        let pg = PrivatePg {
            port: free_port(),
            dir: temp_dir_for_postgres("knoxgate-pg-standby"),
            settings: primary.settings.clone(),
            keep_log: None,
        };
        let data = pg.data();
        check(
            runuser_pg(&[
                &format!("{}/pg_basebackup", pg_bin().display()),
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                data.to_str().unwrap(),
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ]),
            "pg_basebackup",
        );
        pg.start();
        pg
    }

    /// Copies the server log to `path` when dropped, for post-mortems.
    pub fn keep_log_at(mut self, path: PathBuf) -> PrivatePg {
        self.keep_log = Some(path);
        self
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn options(&self) -> String {
        format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
             -c full_page_writes=off -c synchronous_commit=off {}",
            self.port,
            self.dir.path().display(),
            self.settings
        )
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
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
        check(
            self.pg_ctl(&["-w", "-t", "60", "-o", &opts, "start"]),
            "pg_ctl start",
        );
    }

    /// pg_ctl restart -m fast, waiting until it accepts connections. Blocking.
    pub fn restart_fast(&self) {
        let opts = self.options();
        check(
            self.pg_ctl(&["-w", "-t", "30", "-m", "fast", "-o", &opts, "restart"]),
            "pg_ctl restart",
        );
    }

    /// `pg_ctl promote`, waiting until the standby is a primary. Blocking.
    pub fn promote(&self) {
        check(
            self.pg_ctl(&["-w", "-t", "60", "promote"]),
            "pg_ctl promote",
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn postmaster_pid(&self) -> Option<u32> {
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
        if let Some(path) = &self.keep_log {
            let _ = std::fs::copy(self.log_path(), path);
        }
        if let Some(pid) = self.postmaster_pid() {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs blocking server management off the async runtime.
pub async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// The PgBouncer binary (Debian puts it in /usr/sbin, which a test's PATH may lack).
fn pgbouncer_bin() -> PathBuf {
    let sbin = Path::new("/usr/sbin/pgbouncer");
    if sbin.exists() {
        return sbin.to_owned();
    }
    let found = Command::new("sh")
        .args(["-c", "command -v pgbouncer"])
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    assert!(
        !path.is_empty(),
        "pgbouncer is not installed: run scripts/ensure-tools.sh"
    );
    PathBuf::from(path)
}

/// PgBouncer on a spare loopback port in front of one database, as the `postgres` OS user
/// (`-u`), killed by PID on drop.
pub struct PgBouncer {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl PgBouncer {
    /// `pool_mode` (transaction, session) with `pool_size` server connections for `database`
    /// on the Postgres at `pg_port`.
    pub async fn start(pg_port: u16, database: &str, pool_mode: &str, pool_size: u32) -> PgBouncer {
        Self::start_with(pg_port, database, pool_mode, pool_size, false).await
    }

    /// The same, with `tls`: clients must speak TLS, with a certificate for 127.0.0.1 signed by
    /// a CA of its own ([`PgBouncer::ca_file`]).
    pub async fn start_with(
        pg_port: u16,
        database: &str,
        pool_mode: &str,
        pool_size: u32,
        tls: bool,
    ) -> PgBouncer {
        let dir = temp_dir_for_postgres("knoxgate-pgbouncer");
        let port = free_port();
        let ini = dir.path().join("pgbouncer.ini");
        let client_tls = if tls {
            make_test_ca(dir.path());
            format!(
                "client_tls_sslmode = require\n\
                 client_tls_key_file = {key}\n\
                 client_tls_cert_file = {cert}\n",
                key = dir.path().join("server.key").display(),
                cert = dir.path().join("server.pem").display(),
            )
        } else {
            String::new()
        };
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 {database} = host=127.0.0.1 port={pg_port} dbname={database} user=postgres\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = any\n\
                 pool_mode = {pool_mode}\n\
                 default_pool_size = {pool_size}\n\
                 max_client_conn = 500\n\
                 logfile = {log}\n\
                 pidfile = {pid}\n\
                 {client_tls}",
                log = dir.path().join("pgbouncer.log").display(),
                pid = dir.path().join("pgbouncer.pid").display(),
            ),
        )
        .expect("write pgbouncer.ini");
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let child = Command::new(pgbouncer_bin())
            .args(["-u", "postgres"])
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let bouncer = PgBouncer { port, child, dir };
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return bouncer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("pgbouncer did not start: {}", bouncer.log());
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The CA that signed its certificate, when started with TLS.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test configuration (see [`config_for_url`]) with Postgres at `url` and extra lines for
/// the `[postgres]`, `[cache]` and `[knox]` sections.
pub fn fleet_config(url: &str, postgres: &str, cache: &str, knox: &str) -> Config {
    config_for_url(
        url,
        &unique("kgfleet"),
        &format!("[postgres]\n{postgres}\n[cache]\n{cache}\n[knox]\n{knox}\n"),
    )
}

/// Starts knoxgate in-process without waiting for the feed (it may be meant to stay deaf).
pub async fn start_unready(cfg: Config) -> TestServer {
    let prefix = cfg.redis.key_prefix.clone();
    let running = app::start(cfg).await.expect("server starts");
    TestServer { running, prefix }
}

/// `/readyz`: status and body.
pub async fn readyz_status(s: &TestServer) -> (u16, String) {
    let r = http(s.admin(), "GET", "/readyz", &[], b"").await;
    (r.status, r.body_text())
}

/// Backends of `database` whose application_name is exactly `app`, as Postgres sees them.
pub async fn backends(admin: &tokio_postgres::Client, database: &str, app: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            &[&database, &app],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Runs futures concurrently, each on a task of its own; their outputs in order.
pub async fn join_all<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// A child process killed (and reaped) when dropped, even if the test panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
