//! Test support shared by the integration tests, the chaos test and the consistency benchmark: a
//! private database per test, a key prefix per test, the real server on 127.0.0.1:0 with a wait
//! until it is ready, an HTTP client, Django/knox rows, and private redis-server processes for
//! fault tests.

#![allow(dead_code, unused_imports)]

#[cfg(test)]
mod binary;
mod certs;
mod cluster;
mod db;
mod django;
mod fixture;
mod http;
mod knox;
mod proxy;
mod redis;
mod redis_topology;
mod server;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

#[cfg(test)]
pub use binary::*;
pub use certs::*;
pub use cluster::*;
pub use db::*;
pub use django::*;
pub use fixture::*;
pub use http::*;
pub use knox::*;
pub use proxy::*;
pub use redis::*;
pub use redis_topology::*;
pub use server::*;

/// `prefix` plus 12 random hex digits: names that do not collide between parallel tests.
pub fn unique(prefix: &str) -> String {
    let mut b = [0u8; 6];
    rand::fill(&mut b[..]);
    format!("{prefix}_{}", hex::encode(b))
}

/// 8 random hex digits.
pub fn rand_suffix() -> String {
    let mut b = [0u8; 4];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

/// A loopback port nothing listens on (at the time of the call), and never handed out before
/// in this process: a port freed by one test (a Redis master killed in a failover) and given
/// to another would let the first test's sentinels, which still watch that address, take the
/// second test's server for their old master and reconfigure it.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on `port` (at most `limit`).
pub async fn wait_accepting(port: u16, limit: Duration) -> bool {
    eventually(limit, || async {
        matches!(
            tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(("127.0.0.1", port)),
            )
            .await,
            Ok(Ok(_))
        )
    })
    .await
    .is_some()
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

/// The nearest-rank `p`th percentile (0-100) of sorted durations; zero if there are none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Path of a file in this crate's target directory (reports and logs kept after a run).
pub fn target_file(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name)
}
