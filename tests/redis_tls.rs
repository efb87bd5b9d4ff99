//! TLS to Redis with a private CA made here: with `redis.ca_file` the tier is used; without it
//! the certificate is refused and the log says why, at the default level.

use std::{path::Path, process::Command, time::Duration};

use crate::support::*;

/// redis-server speaking TLS only, on a spare port; killed on drop.
struct TlsRedis {
    port: u16,
    child: std::process::Child,
}

impl TlsRedis {
    async fn start(dir: &Path) -> TlsRedis {
        let port = free_port();
        let d = |f: &str| dir.join(f).display().to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                &d("server.pem"),
                "--tls-key-file",
                &d("server.key"),
            ])
            .args([
                "--tls-ca-cert-file",
                &d("ca.pem"),
                "--tls-auth-clients",
                "no",
            ])
            .args(["--save", "", "--appendonly", "no", "--dir", &d("")])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        assert!(
            wait_accepting(port, Duration::from_secs(5)).await,
            "TLS Redis did not start"
        );
        TlsRedis { port, child }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_private_ca_is_trusted_through_redis_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    make_test_ca(dir.path());
    let redis = TlsRedis::start(dir.path()).await;
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "tls").await;
    let ca = dir.path().join("ca.pem").display().to_string();
    let tls = format!("[redis]\nurl = \"{}\"\nca_file = \"{ca}\"", redis.url());
    let prefix = unique("kgtls");
    let a = TestServer::start_with_prefix(&db, &prefix, &tls).await;
    assert!(a.readyz().await.contains("redis"), "{}", a.readyz().await);
    assert_eq!(a.verify(&t.token).await.status, 200);
    // A second instance without an in-process tier finds the entry the first wrote over TLS.
    let b = TestServer::start_with_prefix(
        &db,
        &prefix,
        &format!("{tls}\n[cache]\nmemory_max_bytes = 1"),
    )
    .await;
    assert_eq!(b.verify(&t.token).await.status, 200);
    assert_eq!(
        b.metric("knoxgate_cache_lookups_total{tier=\"redis\",result=\"hit\"")
            .await,
        1.0
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_untrusted_certificate_is_logged_with_its_cause_and_answers_come_from_postgres() {
    let dir = tempfile::tempdir().unwrap();
    make_test_ca(dir.path());
    let redis = TlsRedis::start(dir.path()).await;
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "untrusted").await;
    let binary = Binary::spawn(&db.url, &[("KNOXGATE_REDIS_URL", redis.url())]);
    assert!(binary.wait_up(Duration::from_secs(10)).await);
    let answered = eventually(Duration::from_secs(10), || async {
        http(
            binary.addr,
            "GET",
            "/verify",
            &[("Authorization", &format!("Token {}", t.token))],
            b"",
        )
        .await
        .status
            == 200
    })
    .await;
    assert!(
        answered.is_some(),
        "Postgres answers while Redis is refused"
    );
    let logged = eventually(Duration::from_secs(10), || async {
        binary.log().contains("redis unavailable")
    })
    .await;
    let log = binary.log();
    assert!(
        logged.is_some(),
        "no warning about Redis in the log:\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("redis unavailable"))
        .unwrap();
    assert!(
        line.to_lowercase().contains("certificate"),
        "the warning does not give the cause: {line}"
    );
    assert_eq!(binary.terminate().await.code(), Some(0));
}
