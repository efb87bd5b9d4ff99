//! What an instance costs the database: no pooled connection once idle for
//! `postgres.idle_timeout`, and refusals ("too many clients") logged with the server's message
//! and counted, from the pool and from the change feed alike.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use crate::support::{
    KillOnDrop, PrivatePg, TestDb, TestServer, backends, connect, eventually, free_port, http,
    insert_default_token, insert_user, run_blocking, with_each_token,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_instance_holds_no_pooled_connection_after_idle_timeout() {
    let db = TestDb::migrated().await;
    let s = TestServer::start(
        &db,
        "[postgres]\npool_size = 4\nidle_timeout = \"1s\"\n[redis]\nurl = \"\"",
    )
    .await;
    let client = db.client().await;
    let admin = connect(crate::support::PG_ADMIN).await;
    let mut tokens = Vec::new();
    for i in 0..16 {
        let id = insert_user(&client, &format!("idle{i}"), "pw", true).await;
        let t = insert_default_token(&client, id).await;
        tokens.push(t.token);
    }
    let addr = s.addr();
    let wave = with_each_token(addr, "GET", "/verify", &tokens).await;
    assert!(wave.iter().all(|s| *s == 200));
    let busy = backends(&admin, &db.name, "knoxgate").await;
    assert!(
        (1..=4).contains(&busy),
        "pooled backends after a cold wave: {busy}"
    );
    assert_eq!(backends(&admin, &db.name, "knoxgate-feed").await, 1);

    // idle_timeout (1 s) + one housekeeping tick (1 s) + the backends' exit.
    let closed = eventually(Duration::from_secs(4), || async {
        backends(&admin, &db.name, "knoxgate").await == 0
    })
    .await;
    assert!(
        closed.is_some(),
        "pooled connections still open after idle_timeout"
    );
    println!("idle: {busy} pooled backends closed {closed:?} after the wave");
    // The feed keeps its one connection, and the pool opens again on demand.
    assert_eq!(backends(&admin, &db.name, "knoxgate-feed").await, 1);
    let id = insert_user(&client, "idle-late", "pw", true).await;
    let late = insert_default_token(&client, id).await;
    assert_eq!(s.verify(&late.token).await.status, 200);
    s.stop().await;
}

/// Opens connections to `url` until Postgres refuses one; returns those it accepted.
async fn fill(url: &str, held: &mut Vec<tokio_postgres::Client>) -> String {
    for _ in 0..50 {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                held.push(client);
            }
            Err(e) => {
                return e
                    .as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_else(|| e.to_string());
            }
        }
    }
    panic!("max_connections never reached");
}

/// Sums the `/metrics` lines starting with `prefix` at `admin`.
async fn metric(admin: std::net::SocketAddr, prefix: &str) -> f64 {
    http(admin, "GET", "/metrics", &[], b"")
        .await
        .body_text()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_many_clients_is_logged_with_the_server_message_and_counted() {
    // Superusers count too: nothing is reserved.
    let pg = run_blocking(|| {
        PrivatePg::init_and_start("-c max_connections=6 -c superuser_reserved_connections=0")
    })
    .await;
    let url = pg.url();
    let cfg =
        knoxgate::config::Config::from_toml_str(&format!("[postgres]\nurl = \"{url}\"")).unwrap();
    {
        let mut client = connect(&url).await;
        knoxgate::store::schema::migrate(&mut client, &cfg.postgres, true)
            .await
            .expect("migrate");
    }
    let client = connect(&url).await;
    let id = insert_user(&client, "crowd", "pw", true).await;
    let token = insert_default_token(&client, id).await;
    drop(client);

    // The real binary, so that its log is what an operator reads.
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let config = dir.path().join("knoxgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
             [postgres]\nurl = \"{url}\"\npool_size = 2\nconnect_timeout = \"1s\"\n\
             [redis]\nurl = \"\"\n\
             [cache]\nfeed_health_interval = \"200ms\"\nfeed_reconnect_delay = \"1s\"\n"
        ),
    )
    .unwrap();
    let log_path = dir.path().join("knoxgate.log");
    let _knoxgate = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_knoxgate"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .expect("knoxgate binary"),
    );
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let ready = eventually(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(admin).await.is_ok()
            && metric(admin, "knoxgate_feed_connected").await == 1.0
    })
    .await;
    assert!(ready.is_some(), "knoxgate did not start");
    let before = metric(
        admin,
        "knoxgate_postgres_errors_total{kind=\"unavailable\"}",
    )
    .await;

    // Take every connection, then knoxgate's own, and take those slots too.
    let mut held = Vec::new();
    let refused = fill(&url, &mut held).await;
    assert!(refused.contains("too many clients"), "{refused}");
    held[0]
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name LIKE 'knoxgate%'",
            &[],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fill(&url, &mut held).await;

    // A cold lookup cannot be answered: 503, never 401.
    assert_eq!(
        http(
            addr,
            "GET",
            "/verify",
            &[("Authorization", &format!("Token {}", token.token))],
            b""
        )
        .await
        .status,
        503
    );
    // The feed reconnects (1 s) and is refused too.
    let log = eventually(Duration::from_secs(5), || async {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        log.lines()
            .any(|l| l.contains("change feed disconnected") && l.contains("too many clients"))
    })
    .await;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(log.is_some(), "feed refusal not logged:\n{text}");
    let pool_line = text
        .lines()
        .find(|l| l.contains("postgres failure") && l.contains("too many clients"))
        .unwrap_or_else(|| panic!("pool refusal not logged:\n{text}"));
    assert!(pool_line.contains("53300"), "{pool_line}");
    let after = metric(
        admin,
        "knoxgate_postgres_errors_total{kind=\"unavailable\"}",
    )
    .await;
    assert!(
        after >= before + 2.0,
        "refusals not counted: {before} -> {after}"
    );
    println!("refusal logged: {pool_line}");

    // Room again: knoxgate recovers by itself.
    held.clear();
    let back = eventually(Duration::from_secs(5), || async {
        http(
            addr,
            "GET",
            "/verify",
            &[("Authorization", &format!("Token {}", token.token))],
            b"",
        )
        .await
        .status
            == 200
    })
    .await;
    assert!(back.is_some(), "no recovery after connections were freed");
}
