//! Helpers for the chaos test: private redis-server and Postgres processes that are killed on
//! drop, a keep-alive HTTP/1.1 client, Django-style row inserts. Kept apart from
//! `tests/integration/support.rs` because these processes must also survive SIGSTOP, restarts on
//! the same port and a private Postgres cluster, which the integration tests never need.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use knoxgate::auth::{HashAlgorithm, generate_token, token_key_of};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_postgres::NoTls;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts TCP connections on `port` (at most `limit`).
pub async fn wait_accepting(port: u16, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(200),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

// === Redis ===

/// A private redis-server on a fixed loopback port; killed (SIGKILL) on drop, even if stopped.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// A server object with no process yet.
    pub fn new(port: u16) -> PrivateRedis {
        PrivateRedis { port, child: None }
    }

    /// Spawns redis-server (no persistence) and waits until it accepts.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        assert!(
            wait_accepting(self.port, Duration::from_secs(5)).await,
            "private redis-server did not start"
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let st = Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .expect("kill(1)");
            assert!(st.success(), "kill {sig} {pid} failed");
        }
    }

    /// SIGSTOP: the kernel still accepts connections, nothing answers.
    pub fn sigstop(&self) {
        self.signal("-STOP");
    }

    pub fn sigcont(&self) {
        self.signal("-CONT");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill9();
    }
}

// === Postgres ===

/// A private Postgres 15 cluster in a temp dir, run as the `postgres` OS user on a spare
/// loopback port with trust auth and fsync off. Stopped (immediate, then SIGKILL) on drop.
pub struct PrivatePg {
    pub port: u16,
    dir: tempfile::TempDir,
}

fn runuser_pg(args: &[&str]) -> std::process::Output {
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
            &format!("{PG_BIN}/initdb"),
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

    fn options(&self) -> String {
        format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
             -c full_page_writes=off -c synchronous_commit=off",
            self.port,
            self.dir.path().display()
        )
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        let data = self.data();
        let log = self.log_path();
        let mut full = vec![
            format!("{PG_BIN}/pg_ctl"),
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

pub async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Connects, retrying until `limit` passes.
pub async fn pg_connect_retry(url: &str, limit: Duration) -> tokio_postgres::Client {
    let start = std::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), pg_connect(url)).await {
            Ok(Ok(c)) => return c,
            other => {
                if start.elapsed() > limit {
                    panic!("cannot connect to private postgres: {other:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

// === Django rows ===

/// Inserts a user (Django column set) and returns its id.
pub async fn insert_user(client: &tokio_postgres::Client, username: &str) -> i32 {
    let encoded = knoxgate::password::make_password("pw", 1000);
    client
        .query_one(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, \
             is_staff, is_active, date_joined) VALUES ($1, false, $2, '', '', $3, false, true, now()) \
             RETURNING id",
            &[&encoded, &username, &format!("{username}@example.com")],
        )
        .await
        .expect("insert user")
        .get(0)
}

/// A token and its sha512 digest, not yet inserted.
pub struct NewToken {
    pub token: String,
    pub digest: String,
}

pub fn new_token() -> NewToken {
    let token = generate_token("", 64);
    let digest = HashAlgorithm::Sha512.hex_digest(token.as_bytes());
    NewToken { token, digest }
}

/// Inserts a knox token row like Django/knox: expiry now()+10h, token_key = token[:15].
pub async fn insert_token(client: &tokio_postgres::Client, user_id: i32, t: &NewToken) {
    let expiry = time::OffsetDateTime::now_utc() + Duration::from_secs(36000);
    client
        .execute(
            "INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) \
             VALUES ($1, now(), $2, $3, $4)",
            &[&t.digest, &user_id, &expiry, &token_key_of(&t.token)],
        )
        .await
        .expect("insert token");
}

// === HTTP ===

/// A keep-alive HTTP/1.1 connection speaking just enough of the protocol for GET requests.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The server said `Connection: close`.
    pub closed: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(1024),
            closed: false,
        })
    }

    /// Sends `GET path` with an optional Authorization header; returns (status, body).
    pub async fn get(
        &mut self,
        path: &str,
        authorization: Option<&str>,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: knoxgate\r\n");
        if let Some(a) = authorization {
            req.push_str("Authorization: ");
            req.push_str(a);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        self.stream.write_all(req.as_bytes()).await?;
        let mut tmp = [0u8; 4096];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let mut lines = head.split("\r\n");
                let status: u16 = lines
                    .next()
                    .and_then(|l| l.split(' ').nth(1))
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "bad status line")
                    })?;
                let mut len = 0usize;
                for l in lines {
                    if let Some((k, v)) = l.split_once(':') {
                        let (k, v) = (k.trim(), v.trim());
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.parse().unwrap_or(0);
                        } else if k.eq_ignore_ascii_case("connection")
                            && v.eq_ignore_ascii_case("close")
                        {
                            self.closed = true;
                        } else if k.eq_ignore_ascii_case("transfer-encoding") {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                "chunked response not expected",
                            ));
                        }
                    }
                }
                while self.buf.len() < end + 4 + len {
                    let n = self.stream.read(&mut tmp).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    self.buf.extend_from_slice(&tmp[..n]);
                }
                let body = self.buf[end + 4..end + 4 + len].to_vec();
                self.buf.drain(..end + 4 + len);
                return Ok((status, body));
            }
            let n = self.stream.read(&mut tmp).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

/// One request on a fresh connection (for admin endpoints and probes).
pub async fn get_once(
    addr: SocketAddr,
    path: &str,
    authorization: Option<&str>,
    limit: Duration,
) -> std::io::Result<(u16, Vec<u8>)> {
    tokio::time::timeout(limit, async {
        let mut c = Conn::connect(addr).await?;
        c.get(path, authorization).await
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Path of a file in this crate's target directory.
pub fn target_file(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name)
}
