//! The real server in-process: a test configuration (TOML, merged per key), start-up, and a
//! wait until it is ready.

use std::{net::SocketAddr, time::Duration};

use knoxgate::{
    app::{self, Running},
    config::Config,
};

use super::{Response, SlowProxy, TestDb, http, unique};

/// A configuration for tests: loopback listeners on port 0, this database, a fresh Redis key
/// prefix, cheap password hashing, short timeouts. `extra_toml` overrides single keys.
pub fn config_for(db: &TestDb, prefix: &str, extra_toml: &str) -> Config {
    config_for_url(&db.url, prefix, extra_toml)
}

pub fn config_for_url(url: &str, prefix: &str, extra_toml: &str) -> Config {
    let base = format!(
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
"#
    );
    config_from(&merge_toml(&base, extra_toml))
}

/// Parses a configuration, panicking with the reason if it is invalid.
pub fn config_from(toml_text: &str) -> Config {
    Config::from_toml_str(toml_text).expect("test config")
}

/// `base` with every key of `overrides` set, section by section.
pub fn merge_toml(base: &str, overrides: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (key, value) in from {
            match (into.get_mut(&key), value) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, value) => {
                    into.insert(key, value);
                }
            }
        }
    }
    let mut table: toml::Table = base.parse().expect("base TOML");
    merge(&mut table, overrides.parse().expect("override TOML"));
    table.to_string()
}

/// Waits until `running` is ready (see [`Running::ready`]), at most `limit`.
pub async fn wait_ready(running: &Running, limit: Duration) {
    let start = std::time::Instant::now();
    while !running.ready() {
        assert!(
            start.elapsed() < limit,
            "server not ready within {limit:?} (redis connected, feed live in notify mode)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sums the values of every `/metrics` line starting with `line_prefix`.
pub async fn metric(admin: SocketAddr, line_prefix: &str) -> f64 {
    let body = http(admin, "GET", "/metrics", &[], b"").await.body_text();
    body.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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

    /// The gRPC ext_authz listener (start with `server.grpc_listen = "127.0.0.1:0"`).
    pub fn grpc(&self) -> SocketAddr {
        self.running.grpc_addr.expect("server.grpc_listen is set")
    }

    /// Waits until Redis (if configured) is connected and, in notify mode, the feed is live.
    pub async fn wait_ready(&self) {
        wait_ready(&self.running, Duration::from_secs(4)).await;
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

    /// The `/readyz` body (it names the state of Redis and of the feed).
    pub async fn readyz(&self) -> String {
        http(self.admin(), "GET", "/readyz", &[], b"")
            .await
            .body_text()
    }

    pub async fn metric(&self, line_prefix: &str) -> f64 {
        metric(self.admin(), line_prefix).await
    }

    pub async fn stop(self) {
        self.running.shutdown().await;
    }
}

/// Postgres through a proxy that can be made to hang, the feed straight to it, Redis off.
pub async fn server_behind_slow_postgres(
    db: &TestDb,
    proxy: &SlowProxy,
    extra: &str,
) -> TestServer {
    let url = db
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(url, db.url, "the database URL goes through the proxy");
    let through_proxy = format!(
        "[postgres]\nurl = \"{url}\"\nfeed_url = \"{}\"\n[redis]\nurl = \"\"",
        db.url
    );
    TestServer::start(db, &merge_toml(&through_proxy, extra)).await
}
