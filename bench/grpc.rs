//! gRPC ext_authz beside HTTP `/verify`, in one run: requests/s and latency of hot-token checks
//! over each protocol, with and without a per-route policy.
//!
//!     cargo run --release --example grpc [-- --seconds 5 --rounds 3 --workers 32]
//!
//! Needs Postgres on 127.0.0.1:5432 (trust) and Redis on 127.0.0.1:6379. Creates and drops its
//! own database; all traffic stays on 127.0.0.1. Prints a markdown report.
//!
//! Method: one knoxgate in this process with `server.grpc_listen` set; 500 users (all staff)
//! with one token each, every token verified once first (the in-process tier then answers).
//! Each mode runs `--workers` closed-loop workers for `--seconds`, each on its own connection
//! (HTTP/1.1 keep-alive, or one HTTP/2 connection per gRPC client) and picking a random token
//! per request; modes are interleaved in `--rounds` rounds so that the machine's drift hits
//! them alike. Modes: `GET /verify`, `GET /verify?require=staff`, `Check` with no
//! `context_extensions`, `Check` with `require: staff`. The load generator shares the cores with
//! the server, as in `bench/run.sh`, so figures are relative, not capacities.

#[path = "args.rs"]
mod args;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use envoy_types::{
    ext_authz::v3::pb::CheckRequest,
    pb::envoy::service::auth::v3::{
        AttributeContext, attribute_context::HttpRequest, attribute_context::Request,
        authorization_client::AuthorizationClient,
    },
};
use knoxgate::app;

use support::{Client, TestDb, config_for, insert_default_token, insert_user, percentile, unique};

const USERS: usize = 500;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Http,
    HttpPolicy,
    Grpc,
    GrpcPolicy,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Http => "HTTP GET /verify",
            Mode::HttpPolicy => "HTTP GET /verify?require=staff",
            Mode::Grpc => "gRPC Check",
            Mode::GrpcPolicy => "gRPC Check, context_extensions require=staff",
        }
    }
}

fn check_request(token: &str, policy: bool) -> CheckRequest {
    let mut extensions = HashMap::new();
    if policy {
        extensions.insert("require".to_owned(), "staff".to_owned());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/api/orders".into(),
                    headers: HashMap::from([(
                        "authorization".to_owned(),
                        format!("Token {token}"),
                    )]),
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            context_extensions: extensions,
            ..AttributeContext::default()
        }),
    }
}

/// One closed-loop worker: latencies of allowed answers, and the count of anything else.
async fn worker(
    mode: Mode,
    http: SocketAddr,
    grpc: SocketAddr,
    tokens: std::sync::Arc<Vec<String>>,
    until: Instant,
) -> (Vec<Duration>, u64) {
    let mut lat = Vec::with_capacity(100_000);
    let mut failed = 0;
    match mode {
        Mode::Http | Mode::HttpPolicy => {
            let path = if mode == Mode::Http {
                "/verify"
            } else {
                "/verify?require=staff"
            };
            let mut c = Client::connect(http).await.expect("connect");
            while Instant::now() < until {
                let t = &tokens[rand::random_range(0..tokens.len())];
                let auth = format!("Token {t}");
                let start = Instant::now();
                let r = c
                    .request("GET", path, &[("Authorization", &auth)], b"")
                    .await;
                match r {
                    Ok(r) if r.status == 200 => lat.push(start.elapsed()),
                    _ => failed += 1,
                }
            }
        }
        Mode::Grpc | Mode::GrpcPolicy => {
            let mut c = AuthorizationClient::connect(format!("http://{grpc}"))
                .await
                .expect("connect");
            while Instant::now() < until {
                let t = &tokens[rand::random_range(0..tokens.len())];
                let req = check_request(t, mode == Mode::GrpcPolicy);
                let start = Instant::now();
                match c.check(req).await {
                    Ok(r) if r.get_ref().status.as_ref().is_some_and(|s| s.code == 0) => {
                        lat.push(start.elapsed())
                    }
                    _ => failed += 1,
                }
            }
        }
    }
    (lat, failed)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = args::number::<u64>("--seconds", 5);
    let rounds = args::number::<u64>("--rounds", 3);
    let workers = args::number::<u64>("--workers", 32);
    let db = TestDb::migrated().await;
    let pg = db.client().await;
    let mut tokens = Vec::with_capacity(USERS);
    for i in 0..USERS {
        let id = insert_user(&pg, &format!("bench{i}"), "pw", true).await;
        tokens.push(insert_default_token(&pg, id).await.token);
    }
    pg.execute("UPDATE auth_user SET is_staff = true", &[])
        .await
        .unwrap();
    let cfg = config_for(
        &db,
        &unique("bench"),
        "[server]\ngrpc_listen = \"127.0.0.1:0\"\nmax_in_flight = 4096\n",
    );
    let running = app::start(cfg).await.expect("knoxgate starts");
    support::wait_ready(&running, Duration::from_secs(10)).await;
    let (http, grpc) = (running.addr, running.grpc_addr.expect("grpc listener"));
    let mut warm = Client::connect(http).await.unwrap();
    for t in &tokens {
        let r = warm
            .request(
                "GET",
                "/verify",
                &[("Authorization", &format!("Token {t}"))],
                b"",
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let tokens = std::sync::Arc::new(tokens);

    let modes = [Mode::Http, Mode::Grpc, Mode::HttpPolicy, Mode::GrpcPolicy];
    let mut all: HashMap<&str, (Vec<Duration>, u64, f64)> = HashMap::new();
    println!("| round | mode | req/s | p50 ms | p99 ms | not allowed |");
    println!("|---:|---|---:|---:|---:|---:|");
    for round in 1..=rounds {
        for mode in modes {
            let until = Instant::now() + Duration::from_secs(seconds);
            let start = Instant::now();
            let tasks: Vec<_> = (0..workers)
                .map(|_| tokio::spawn(worker(mode, http, grpc, tokens.clone(), until)))
                .collect();
            let mut lat = Vec::new();
            let mut failed = 0;
            for t in tasks {
                let (l, f) = t.await.unwrap();
                lat.extend(l);
                failed += f;
            }
            let secs = start.elapsed().as_secs_f64();
            lat.sort_unstable();
            let rate = lat.len() as f64 / secs;
            println!(
                "| {round} | {} | {:.0} | {:.2} | {:.2} | {failed} |",
                mode.label(),
                rate,
                percentile(&lat, 50.0).as_secs_f64() * 1e3,
                percentile(&lat, 99.0).as_secs_f64() * 1e3,
            );
            let e = all.entry(mode.label()).or_default();
            e.0.extend(lat);
            e.1 += failed;
            e.2 += rate;
        }
    }
    println!();
    println!("| mode (all rounds) | mean req/s | p50 ms | p99 ms | not allowed |");
    println!("|---|---:|---:|---:|---:|");
    for mode in modes {
        let (lat, failed, rate_sum) = all.get_mut(mode.label()).unwrap();
        lat.sort_unstable();
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {failed} |",
            mode.label(),
            *rate_sum / rounds as f64,
            percentile(lat, 50.0).as_secs_f64() * 1e3,
            percentile(lat, 99.0).as_secs_f64() * 1e3,
        );
    }
    running.shutdown().await;
}
