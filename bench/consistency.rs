//! Consistency benchmark: what a hit costs in each `cache.consistency` mode, and how long a
//! revocation takes to reach another instance.
//!
//!     cargo run --release --example consistency [-- --revocations 200 --hits 10000]
//!
//! Needs Postgres on 127.0.0.1:5432 (trust) and Redis on 127.0.0.1:6379. Creates and drops its
//! own database; all traffic stays on 127.0.0.1. Prints a markdown report.
//!
//! Method:
//! * Cost per hit: one instance per mode, 200 tokens warmed once, then N `/verify` requests over
//!   one keep-alive connection; SQL statements and Redis commands are the deltas of knoxgate's own
//!   counters (`knoxgate_sql_statements_total`, `knoxgate_redis_commands_total`). The "Redis tier"
//!   row runs `notify` with the in-process tier disabled (`memory_max_bytes = 1`).
//! * Revocation latency: instances A and B share the database and Redis, both warm on every
//!   token. For each token, a separate Postgres connection runs `DELETE … WHERE digest = $1`
//!   (autocommit); the clock starts when the statement returns (COMMIT done) and stops at the
//!   first 401 from B, polled over a keep-alive connection as fast as it answers. Half the
//!   revocations instead go through A's `/api/auth/logout/`.

use std::{net::SocketAddr, time::Duration, time::Instant};

use knoxgate::{
    app::{self, Running},
    auth::{HashAlgorithm, generate_token, token_key_of},
    config::Config,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};
use tokio_postgres::NoTls;

/// A keep-alive HTTP/1.1 client for `GET`/`POST` with an Authorization header.
struct Conn {
    stream: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).ok();
        Conn {
            stream: BufReader::new(s),
            addr,
        }
    }

    async fn request(&mut self, method: &str, path: &str, token: &str) -> (u16, String) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Token {token}\r\nContent-Length: 0\r\n\r\n",
            self.addr
        );
        self.stream
            .get_mut()
            .write_all(req.as_bytes())
            .await
            .expect("write");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let b = self.stream.read_u8().await.expect("read");
            head.push(b);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status = head[9..12].parse().unwrap();
        let len = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).await.expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

async fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn config(db_url: &str, prefix: &str, extra: &str) -> Config {
    Config::from_toml_str(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [postgres]\nurl = \"{db_url}\"\n[redis]\nkey_prefix = \"{prefix}\"\n\
         [sessions]\npassword_iterations = 1000\n[log]\nlevel = \"warn\"\n{extra}"
    ))
    .expect("config")
}

async fn ready(r: &Running) {
    for _ in 0..500 {
        let s = &r.app.store;
        let notify = r.app.config.cache.consistency == knoxgate::config::Consistency::Notify;
        if s.redis().is_none_or(|x| x.is_connected()) && (!notify || s.feed_live()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("instance not ready");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let revocations = arg("--revocations", 200);
    let hits = arg("--hits", 10_000);
    let db = format!("knoxgate_consistency_{}", std::process::id());
    let admin_url = "postgres://postgres@127.0.0.1:5432/postgres";
    let (admin, conn) = tokio_postgres::connect(admin_url, NoTls)
        .await
        .expect("postgres");
    tokio::spawn(conn);
    // Separate statements: a multi-statement string runs as one transaction, which
    // CREATE/DROP DATABASE refuse.
    for sql in [
        format!("DROP DATABASE IF EXISTS {db}"),
        format!("CREATE DATABASE {db}"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    let db_url = format!("postgres://postgres@127.0.0.1:5432/{db}");
    let (client, conn) = tokio_postgres::connect(&db_url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let base = config(&db_url, "x", "");
    let (mut mig, conn) = tokio_postgres::connect(&db_url, NoTls).await.unwrap();
    tokio::spawn(conn);
    knoxgate::store::schema::migrate(&mut mig, &base.postgres, true)
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, is_staff, is_active, date_joined) \
             SELECT '!', false, 'u' || i, '', '', '', false, true, now() FROM generate_series(1, 50) i",
        )
        .await
        .unwrap();
    let ids: Vec<i32> = client
        .query("SELECT id FROM auth_user", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let insert_tokens = async |n: usize| -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..n {
            let t = generate_token("", 64);
            client
                .execute(
                    "INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) VALUES ($1, now(), $2, now() + interval '10 hours', $3)",
                    &[&HashAlgorithm::Sha512.hex_digest(t.as_bytes()), &ids[i % ids.len()], &token_key_of(&t)],
                )
                .await
                .unwrap();
            out.push(t);
        }
        out
    };

    println!("# knoxgate consistency benchmark\n");
    println!(
        "{} /verify hits per mode after warming 200 tokens; {} revocations.\n",
        hits, revocations
    );
    println!(
        "| mode | SQL statements per {hits} hits | Redis commands per hit | hit p50 | hit p99 |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let warm = insert_tokens(200).await;
    for (label, extra) in [
        (
            "notify (in-process tier)",
            "[cache]\nconsistency = \"notify\"",
        ),
        (
            "notify, Redis tier only",
            "[cache]\nconsistency = \"notify\"\nmemory_max_entries = 1\nmemory_max_bytes = 1",
        ),
        ("strict", "[cache]\nconsistency = \"strict\""),
        ("ttl", "[cache]\nconsistency = \"ttl\""),
    ] {
        let prefix = format!("kgc{}", generate_token("", 8));
        let r = app::start(config(&db_url, &prefix, extra))
            .await
            .expect("start");
        ready(&r).await;
        let mut c = Conn::open(r.addr).await;
        for t in &warm {
            assert_eq!(c.request("GET", "/verify", t).await.0, 200);
        }
        let sql0 = metric(r.admin_addr, "knoxgate_sql_statements_total").await;
        let redis0 = metric(r.admin_addr, "knoxgate_redis_commands_total").await;
        let mut lat = Vec::with_capacity(hits);
        for i in 0..hits {
            let started = Instant::now();
            let (status, _) = c.request("GET", "/verify", &warm[i % warm.len()]).await;
            lat.push(started.elapsed());
            assert_eq!(status, 200);
        }
        lat.sort();
        let sql = metric(r.admin_addr, "knoxgate_sql_statements_total").await - sql0;
        let redis = metric(r.admin_addr, "knoxgate_redis_commands_total").await - redis0;
        println!(
            "| {label} | {sql} | {:.2} | {} | {} |",
            redis / hits as f64,
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99))
        );
        r.shutdown().await;
    }

    // Revocation latency: A and B share everything; revoke, then time until B refuses.
    let prefix = format!("kgr{}", generate_token("", 8));
    let a = app::start(config(&db_url, &prefix, "")).await.unwrap();
    let b = app::start(config(&db_url, &prefix, "")).await.unwrap();
    ready(&a).await;
    ready(&b).await;
    let tokens = insert_tokens(revocations).await;
    let (mut ca, mut cb) = (Conn::open(a.addr).await, Conn::open(b.addr).await);
    for t in &tokens {
        assert_eq!(ca.request("GET", "/verify", t).await.0, 200);
        assert_eq!(cb.request("GET", "/verify", t).await.0, 200);
    }
    let (mut by_sql, mut by_logout) = (Vec::new(), Vec::new());
    let mut polls = 0usize;
    for (i, t) in tokens.iter().enumerate() {
        // Both instances hold the token in their in-process tier: a hit, right before.
        assert_eq!(cb.request("GET", "/verify", t).await.0, 200);
        let committed = if i % 2 == 0 {
            client
                .execute(
                    "DELETE FROM knox_authtoken WHERE digest = $1",
                    &[&HashAlgorithm::Sha512.hex_digest(t.as_bytes())],
                )
                .await
                .unwrap();
            Instant::now()
        } else {
            // The 204 is sent after the row is deleted (committed).
            assert_eq!(ca.request("POST", "/api/auth/logout/", t).await.0, 204);
            Instant::now()
        };
        loop {
            polls += 1;
            let (status, _) = cb.request("GET", "/verify", t).await;
            if status == 401 {
                break;
            }
            assert_eq!(status, 200);
            assert!(
                committed.elapsed() < Duration::from_secs(10),
                "revocation never arrived"
            );
        }
        let took = committed.elapsed();
        if i % 2 == 0 {
            by_sql.push(took)
        } else {
            by_logout.push(took)
        }
    }
    println!("\n| revocation reaching instance B | n | p50 | p99 | max |");
    println!("| --- | --- | --- | --- | --- |");
    let mut all: Vec<Duration> = by_sql.iter().chain(&by_logout).copied().collect();
    for (label, v) in [
        ("raw SQL DELETE", &mut by_sql),
        ("logout on instance A", &mut by_logout),
        ("all", &mut all),
    ] {
        v.sort();
        println!(
            "| {label} | {} | {} | {} | {} |",
            v.len(),
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(*v.last().unwrap())
        );
    }
    println!("\n({polls} polls of B in total; a poll is one keep-alive /verify round trip.)");
    a.shutdown().await;
    b.shutdown().await;
    drop(client);
    drop(mig);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
}
