//! Test support: a private database per test, a key prefix per test, the real server on
//! 127.0.0.1:0, a raw HTTP client, and private redis-server processes for fault tests.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use knoxgate::{
    app::{self, Running},
    auth::{HashAlgorithm, generate_token, token_key_of},
    config::Config,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_postgres::NoTls;

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn unique(prefix: &str) -> String {
    let mut b = [0u8; 6];
    rand::fill(&mut b[..]);
    format!("{prefix}_{}", hex::encode(b))
}

/// A database of its own, dropped (with FORCE) when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = unique("knoxgate_test");
        let client = connect(PG_ADMIN).await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        TestDb { name, url }
    }

    /// A new database with the Django schema and the change-feed triggers.
    pub async fn migrated() -> TestDb {
        let db = TestDb::new().await;
        let cfg = config_for(&db, &unique("kg"), "");
        let mut client = connect(&db.url).await;
        knoxgate::store::schema::migrate(&mut client, &cfg.postgres, true)
            .await
            .expect("migrate");
        db
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-q", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(conn);
    client
}

/// A configuration for tests: loopback listeners on port 0, this database, a fresh Redis key
/// prefix, cheap password hashing, short timeouts.
pub fn config_for(db: &TestDb, prefix: &str, extra_toml: &str) -> Config {
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
request_timeout = "3s"
shutdown_grace = "2s"
[postgres]
url = "{url}"
pool_size = 4
connect_timeout = "1s"
statement_timeout = "1s"
[redis]
url = "redis://127.0.0.1:6379/0"
key_prefix = "{prefix}"
[sessions]
password_iterations = 1000
throttle_failures = 0
[cache]
feed_health_interval = "200ms"
feed_reconnect_delay = "100ms"
{extra_toml}
"#,
        url = db.url
    );
    Config::from_toml_str(&merge_sections(&toml)).expect("test config")
}

/// Lets `extra_toml` repeat a section header: later keys of a section are folded into the
/// first occurrence so tests can override single keys.
fn merge_sections(text: &str) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut sections: std::collections::HashMap<String, Vec<(String, String)>> = Default::default();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            current = line.to_owned();
            if !order.contains(&current) {
                order.push(current.clone());
            }
            continue;
        }
        let key = line.split('=').next().unwrap_or("").trim().to_owned();
        let entries = sections.entry(current.clone()).or_default();
        entries.retain(|(k, _)| *k != key);
        entries.push((key, line.to_owned()));
    }
    let mut out = String::new();
    for s in order {
        out.push_str(&s);
        out.push('\n');
        for (_, l) in sections.get(&s).into_iter().flatten() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// A running server with its database and Redis prefix.
pub struct TestServer {
    pub running: Running,
    pub prefix: String,
}

impl TestServer {
    pub async fn start(db: &TestDb, extra_toml: &str) -> TestServer {
        Self::start_with_prefix(db, &unique("kg"), extra_toml).await
    }

    pub async fn start_with_prefix(db: &TestDb, prefix: &str, extra_toml: &str) -> TestServer {
        let cfg = config_for(db, prefix, extra_toml);
        let running = app::start(cfg).await.expect("server starts");
        let server = TestServer {
            running,
            prefix: prefix.to_owned(),
        };
        server.wait_ready().await;
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    pub fn admin(&self) -> SocketAddr {
        self.running.admin_addr
    }

    /// Waits until Redis (if configured) is connected and, in notify mode, the feed is live.
    pub async fn wait_ready(&self) {
        let store = &self.running.app.store;
        let notify =
            self.running.app.config.cache.consistency == knoxgate::config::Consistency::Notify;
        for _ in 0..200 {
            let redis_ok = store.redis().is_none_or(|r| r.is_connected());
            if redis_ok && (!notify || store.feed_live()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("server not ready within 4 s");
    }

    pub async fn verify(&self, token: &str) -> Response {
        http(
            self.addr(),
            "GET",
            "/verify",
            &[("Authorization", &format!("Token {token}"))],
            b"",
        )
        .await
    }

    pub async fn metric(&self, line_prefix: &str) -> f64 {
        let body = http(self.admin(), "GET", "/metrics", &[], b"")
            .await
            .body_text();
        body.lines()
            .filter(|l| l.starts_with(line_prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn stop(self) {
        self.running.shutdown().await;
    }
}

/// A token row inserted the way Django/knox writes it.
pub struct Token {
    pub token: String,
    pub user_id: i32,
}

/// Inserts a user (Django column set) and returns its id.
pub async fn insert_user(
    client: &tokio_postgres::Client,
    username: &str,
    password: &str,
    active: bool,
) -> i32 {
    let encoded = knoxgate::password::make_password(password, 1000);
    client
        .query_one(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, \
             is_staff, is_active, date_joined) VALUES ($1, false, $2, '', '', $3, false, $4, now()) \
             RETURNING id",
            &[&encoded, &username, &format!("{username}@example.com"), &active],
        )
        .await
        .expect("insert user")
        .get(0)
}

/// Inserts a knox token row for `user_id` expiring `ttl` from now (`None`: never).
pub async fn insert_token(
    client: &tokio_postgres::Client,
    user_id: i32,
    ttl: Option<Duration>,
    prefix: &str,
    alg: HashAlgorithm,
) -> Token {
    let token = generate_token(prefix, 64);
    let digest = alg.hex_digest(token.as_bytes());
    let expiry = ttl.map(|t| time::OffsetDateTime::now_utc() + t);
    client
        .execute(
            "INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) \
             VALUES ($1, now(), $2, $3, $4)",
            &[&digest, &user_id, &expiry, &token_key_of(&token)],
        )
        .await
        .expect("insert token");
    Token { token, user_id }
}

pub async fn user_with_token(db: &TestDb, username: &str) -> Token {
    let client = db.client().await;
    let id = insert_user(&client, username, "pw", true).await;
    insert_token(
        &client,
        id,
        Some(Duration::from_secs(36000)),
        "",
        HashAlgorithm::Sha512,
    )
    .await
}

/// An HTTP response as read off the wire.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A minimal HTTP/1.1 client: raw bytes out, so tests can send what real clients would not.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n").into_bytes();
    for (k, v) in headers {
        head.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if !body.is_empty() {
        head.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(body);
    raw(addr, &head).await
}

/// Sends `request` bytes as they are and parses the answer.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("response within 10 s")
        .expect("read");
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> Response {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("complete response head");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..pos]).unwrap().trim(), 16)
                .unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[pos + 2..pos + 2 + size]);
            rest = &rest[pos + 2 + size + 2..];
        }
        body = out;
    }
    Response {
        status,
        headers,
        body,
    }
}

/// A private redis-server on a spare loopback port, killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    child: Child,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        Self::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
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
        // Owned by the guard from here on, so it is killed and reaped even if startup fails.
        let redis = PrivateRedis { port, child };
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return redis;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("private redis-server did not start");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a redis-cli command against the shared Redis (or `port`).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli on PATH");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Polls `check` every 10 ms until it returns true or `limit` passes; returns the time taken.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}
