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
//! * Revocation behind a bulk DELETE: `--bulk` (20,000) tokens of one user are inserted by SQL,
//!   then one statement deletes them all (as a cleanup job or a deleted user would) and, on
//!   another connection right after its COMMIT, a token B holds in process is deleted; the clock
//!   starts at that second COMMIT and stops at B's first 401. B's feed hears the bulk first and
//!   evicts each of its tokens from every tier (Redis included) before it reaches the second.
//!   `--bulk-rounds` (3) rounds.

#[path = "args.rs"]
mod args;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{time::Duration, time::Instant};

use knoxgate::{app, auth::generate_token, config::Config};

use support::{
    Client, TestDb, config_from, insert_default_token, insert_user, merge_toml, metric, percentile,
    wait_ready,
};

/// One request over a keep-alive connection with `Authorization: Token <token>`; the status.
async fn request(c: &mut Client, method: &str, path: &str, token: &str) -> u16 {
    c.request(
        method,
        path,
        &[("Authorization", &format!("Token {token}"))],
        b"",
    )
    .await
    .expect("request")
    .status
}

fn config(db_url: &str, prefix: &str, extra: &str) -> Config {
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [postgres]\nurl = \"{db_url}\"\n[redis]\nkey_prefix = \"{prefix}\"\n\
         [sessions]\npassword_iterations = 1000\n[log]\nlevel = \"warn\"\n"
    );
    config_from(&merge_toml(&base, extra))
}

const READY_LIMIT: Duration = Duration::from_secs(5);

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let revocations = args::number::<usize>("--revocations", 200);
    let hits = args::number::<usize>("--hits", 10_000);
    let bulk = args::number::<i64>("--bulk", 20_000);
    let bulk_rounds = args::number::<usize>("--bulk-rounds", 3);
    let db = TestDb::migrated().await;
    let db_url = db.url.clone();
    let client = db.client().await;
    let mut ids = Vec::new();
    for i in 1..=50 {
        ids.push(insert_user(&client, &format!("u{i}"), "pw", true).await);
    }
    let insert_tokens = async |n: usize| -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push(
                insert_default_token(&client, ids[i % ids.len()])
                    .await
                    .token,
            );
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
        wait_ready(&r, READY_LIMIT).await;
        let mut c = Client::connect(r.addr).await.expect("connect");
        for t in &warm {
            assert_eq!(request(&mut c, "GET", "/verify", t).await, 200);
        }
        let sql0 = metric(r.admin_addr, "knoxgate_sql_statements_total").await;
        let redis0 = metric(r.admin_addr, "knoxgate_redis_commands_total").await;
        let mut lat = Vec::with_capacity(hits);
        for i in 0..hits {
            let started = Instant::now();
            let status = request(&mut c, "GET", "/verify", &warm[i % warm.len()]).await;
            lat.push(started.elapsed());
            assert_eq!(status, 200);
        }
        lat.sort();
        let sql = metric(r.admin_addr, "knoxgate_sql_statements_total").await - sql0;
        let redis = metric(r.admin_addr, "knoxgate_redis_commands_total").await - redis0;
        println!(
            "| {label} | {sql} | {:.2} | {} | {} |",
            redis / hits as f64,
            ms(percentile(&lat, 50.0)),
            ms(percentile(&lat, 99.0))
        );
        r.shutdown().await;
    }

    // Revocation latency: A and B share everything; revoke, then time until B refuses.
    let prefix = format!("kgr{}", generate_token("", 8));
    let a = app::start(config(&db_url, &prefix, "")).await.unwrap();
    let b = app::start(config(&db_url, &prefix, "")).await.unwrap();
    wait_ready(&a, READY_LIMIT).await;
    wait_ready(&b, READY_LIMIT).await;
    let tokens = insert_tokens(revocations).await;
    let mut ca = Client::connect(a.addr).await.expect("connect");
    let mut cb = Client::connect(b.addr).await.expect("connect");
    for t in &tokens {
        assert_eq!(request(&mut ca, "GET", "/verify", t).await, 200);
        assert_eq!(request(&mut cb, "GET", "/verify", t).await, 200);
    }
    let (mut by_sql, mut by_logout) = (Vec::new(), Vec::new());
    let mut polls = 0usize;
    for (i, t) in tokens.iter().enumerate() {
        // Both instances hold the token in their in-process tier: a hit, right before.
        assert_eq!(request(&mut cb, "GET", "/verify", t).await, 200);
        let committed = if i % 2 == 0 {
            client
                .execute(
                    "DELETE FROM knox_authtoken WHERE digest = $1",
                    &[&knoxgate::auth::HashAlgorithm::Sha512.hex_digest(t.as_bytes())],
                )
                .await
                .unwrap();
            Instant::now()
        } else {
            // The 204 is sent after the row is deleted (committed).
            assert_eq!(request(&mut ca, "POST", "/api/auth/logout/", t).await, 204);
            Instant::now()
        };
        loop {
            polls += 1;
            let status = request(&mut cb, "GET", "/verify", t).await;
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
            ms(percentile(v, 50.0)),
            ms(percentile(v, 99.0)),
            ms(*v.last().unwrap())
        );
    }
    println!("\n({polls} polls of B in total; a poll is one keep-alive /verify round trip.)");

    // A revocation committed right behind a bulk DELETE.
    let bulk_user = insert_user(&client, "bulk", "pw", true).await;
    let mut behind_bulk = Vec::new();
    for _ in 0..bulk_rounds {
        client
            .execute(
                "INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) \
                 SELECT encode(sha512(convert_to(k, 'UTF8')), 'hex'), now(), $1, \
                        now() + interval '1 day', k \
                 FROM (SELECT substr(md5(random()::text), 1, 15) AS k \
                       FROM generate_series(1, $2::bigint)) AS keys",
                &[&bulk_user, &bulk],
            )
            .await
            .expect("bulk insert");
        let victim = insert_tokens(1).await.remove(0);
        assert_eq!(request(&mut cb, "GET", "/verify", &victim).await, 200);
        let other = db.client().await;
        client
            .execute(
                "DELETE FROM knox_authtoken WHERE user_id = $1",
                &[&bulk_user],
            )
            .await
            .unwrap();
        other
            .execute(
                "DELETE FROM knox_authtoken WHERE digest = $1",
                &[&knoxgate::auth::HashAlgorithm::Sha512.hex_digest(victim.as_bytes())],
            )
            .await
            .unwrap();
        let committed = Instant::now();
        loop {
            let status = request(&mut cb, "GET", "/verify", &victim).await;
            if status == 401 {
                break;
            }
            assert_eq!(status, 200);
            assert!(
                committed.elapsed() < Duration::from_secs(120),
                "revocation never arrived"
            );
        }
        behind_bulk.push(committed.elapsed());
    }
    println!(
        "\n| revocation reaching instance B right after a DELETE of {bulk} tokens | rounds |\n| --- | --- |\n| {} | {} |",
        behind_bulk
            .iter()
            .map(|d| ms(*d))
            .collect::<Vec<_>>()
            .join(", "),
        behind_bulk.len()
    );
    a.shutdown().await;
    b.shutdown().await;
    drop(client);
    drop(db);
}
