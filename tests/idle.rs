//! Connections that send nothing hold no connection slot for long: at the connection cap a new
//! connection evicts the oldest that has not yet sent a request (on the admin port, else the
//! one idle the longest), a socket that never sends a
//! byte is closed after `server.header_read_timeout`, and an HTTP/2 connection with no request
//! in flight after `server.idle_timeout`, even when it answers every ping, and then ends within
//! `server.request_timeout` + `server.header_read_timeout` even when its answers cannot be sent;
//! so does an HTTP/1 connection whose client does not read its answers.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{io::AsyncReadExt, net::TcpStream};

use crate::support::*;

/// Silent sockets opened by the cap test: `KNOXGATE_SILENT_CONNECTIONS` (e.g. 1000 to show the
/// behaviour at a bench's scale; mind `ulimit -n`), else 50.
fn silent_count() -> usize {
    std::env::var("KNOXGATE_SILENT_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// Asserts that the server closes `sock` within `limit`: a read gives end-of-file or a reset.
async fn assert_closed_within(mut sock: TcpStream, limit: Duration, what: &str) {
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(limit, sock.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "{what} socket still open"
    );
}

/// Opens `count` sockets to `addr` that send nothing, and waits until the accept loop has
/// taken them all.
async fn silent_sockets(addr: std::net::SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut silent = Vec::with_capacity(count);
    for _ in 0..count {
        silent.push(TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    silent
}

/// New connections the main listener `evicted` for or `refused` at its connection cap.
async fn at_main_cap(s: &TestServer, action: &str) -> f64 {
    s.metric(&format!(
        r#"knoxgate_connections_at_cap_total{{listener="main",action="{action}"}}"#
    ))
    .await
}

/// How many of `socks` the server has closed (a read gives end-of-file or a reset).
fn closed_count(socks: &[TcpStream]) -> usize {
    let mut buf = [0u8; 1];
    socks
        .iter()
        .filter(|sock| match sock.try_read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        })
        .count()
}

#[tokio::test]
async fn silent_sockets_at_the_connection_cap_make_room_for_real_clients() {
    let cap = silent_count();
    let (_db, _client, s) = Fixture::new()
        .config(&format!(
            "[server]\nmax_connections = {cap}\nheader_read_timeout = \"5s\""
        ))
        .start()
        .await;
    let opened = Instant::now();
    let silent = silent_sockets(s.addr(), cap).await;
    assert_eq!(
        closed_count(&silent),
        0,
        "silent sockets closed under the cap"
    );
    // The cap is full of sockets that never sent a byte: each real client evicts the oldest
    // of them and is served at once, long before the head timeout would have freed a slot.
    for i in 0..3 {
        let r = get_once(s.addr(), "/verify", None, Duration::from_millis(1000))
            .await
            .unwrap_or_else(|e| panic!("real client {i} turned away at the cap: {e}"));
        assert_eq!(r.status, 401);
    }
    assert!(
        opened.elapsed() < Duration::from_secs(3),
        "served only after {:?}",
        opened.elapsed()
    );
    // Oldest first, at most one per client (a client that finds the slot its predecessor
    // left evicts nothing): the sockets that went are the first opened.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let evicted = closed_count(&silent);
    assert!(
        (1..=3).contains(&evicted),
        "{evicted} silent sockets evicted for 3 clients"
    );
    assert_eq!(
        closed_count(&silent[..evicted]),
        evicted,
        "the oldest were not the ones evicted"
    );
    assert_eq!(at_main_cap(&s, "evicted").await, evicted as f64);
    // The rest are closed by the head timeout: each reads end-of-file (or a reset).
    for sock in silent {
        assert_closed_within(sock, Duration::from_secs(6), "silent").await;
    }
    s.stop().await;
}

/// The status of a `/verify` with `token` sent on an open HTTP/1 connection.
async fn verify_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    token: &str,
) -> u16 {
    let req = hyper::Request::get("/verify")
        .header("host", "knoxgate")
        .header("authorization", format!("Token {token}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    sender
        .send_request(req)
        .await
        .expect("answer")
        .status()
        .as_u16()
}

#[tokio::test]
async fn connections_that_have_had_a_request_are_never_evicted() {
    let cap = 4;
    let (db, _client, s) = Fixture::new()
        .config(&format!("[server]\nmax_connections = {cap}"))
        .start()
        .await;
    let token = user_with_token(&db, "kept-at-cap").await;
    let mut kept = Vec::new();
    for _ in 0..cap {
        let stream = TcpStream::connect(s.addr()).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        assert_eq!(verify_on(&mut sender, &token.token).await, 200);
        kept.push(sender);
    }
    // Every slot holds a keep-alive connection that has been served: a newcomer is turned
    // away rather than taking one of them.
    let refused = get_once(s.addr(), "/verify", None, Duration::from_millis(500)).await;
    assert!(
        refused.is_err(),
        "served past a cap of served connections: {refused:?}"
    );
    assert_eq!(at_main_cap(&s, "refused").await, 1.0);
    assert_eq!(at_main_cap(&s, "evicted").await, 0.0);
    for sender in &mut kept {
        sender
            .ready()
            .await
            .expect("a served connection was evicted");
        assert_eq!(verify_on(sender, &token.token).await, 200);
    }
    s.stop().await;
}

#[tokio::test]
async fn silent_sockets_filling_the_admin_port_do_not_fail_liveness() {
    // The admin port's cap is 64 and its head timeout the main port's: before eviction, 64
    // silent sockets failed /healthz for as long.
    let (_db, _client, s) = Fixture::new()
        .config("[server]\nheader_read_timeout = \"10s\"")
        .start()
        .await;
    let silent = silent_sockets(s.admin(), 64).await;
    for _ in 0..5 {
        let r = get_once(s.admin(), "/healthz", None, Duration::from_millis(1000))
            .await
            .expect("liveness probe turned away by silent sockets");
        assert_eq!(r.status, 200);
    }
    let evicted = closed_count(&silent);
    assert!(
        (1..=5).contains(&evicted),
        "{evicted} silent sockets evicted for 5 probes"
    );
    s.stop().await;
}

#[tokio::test]
async fn kept_alive_connections_filling_the_admin_port_do_not_fail_liveness() {
    // 64 clients served once that keep their connections open: on the main port they would
    // keep their slots (a proxy's pool); on the admin port the one idle the longest makes room.
    let (_db, _client, s) = Fixture::new().start().await;
    let mut kept = Vec::new();
    for _ in 0..64 {
        let mut client = Client::connect(s.admin()).await.expect("connect");
        let r = client.get("/healthz", None).await.expect("served");
        assert_eq!(r.status, 200);
        assert!(
            !client.closed,
            "the admin port did not keep the connection alive"
        );
        kept.push(client);
    }
    for _ in 0..5 {
        let r = get_once(s.admin(), "/healthz", None, Duration::from_millis(1000))
            .await
            .expect("liveness probe turned away by kept-alive connections");
        assert_eq!(r.status, 200);
    }
    // Read on the connection served last, which is not idle the longest: a scrape on a new
    // connection could evict one more.
    let scrape = kept.last_mut().unwrap().get("/metrics", None).await;
    let metrics = scrape.expect("scrape on a kept connection").body_text();
    let at_cap = |action: &str| {
        let line =
            format!(r#"knoxgate_connections_at_cap_total{{listener="admin",action="{action}"}} "#);
        let value = metrics.lines().find_map(|l| l.strip_prefix(line.as_str()));
        value.map_or(0, |v| v.parse::<usize>().expect("a count"))
    };
    let evicted = at_cap("evicted");
    assert!(
        (1..=5).contains(&evicted),
        "{evicted} kept-alive connections evicted for 5 probes"
    );
    assert_eq!(at_cap("refused"), 0);
    // The ones that went are those served first (idle the longest); the rest still serve.
    for (i, client) in kept.iter_mut().enumerate() {
        let served = client.get("/healthz", None).await.map(|r| r.status);
        if i < evicted {
            assert!(served.is_err(), "connection {i} was not the one evicted");
        } else {
            assert_eq!(
                served.expect("a later connection was evicted"),
                200,
                "connection {i}"
            );
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn an_idle_http2_connection_that_answers_pings_is_closed() {
    let (_db, _client, s) = Fixture::new()
        .config("[server]\nidle_timeout = \"1s\"")
        .start()
        .await;
    let stream = TcpStream::connect(s.addr()).await.unwrap();
    // hyper's HTTP/2 client answers the server's pings by itself.
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let started = Instant::now();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://{}/verify", s.addr()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = sender.send_request(req).await.expect("h2 response");
    assert_eq!(r.status(), 401);
    drop(r);
    // Nothing more is sent: the server closes the connection after the idle timeout.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the idle HTTP/2 connection is still open");
    assert!(started.elapsed() >= Duration::from_millis(900));
    s.stop().await;
}

#[tokio::test]
async fn an_http2_connection_is_told_its_stream_limit() {
    let (_db, _client, s) = Fixture::new()
        .config("[server]\nhttp2_max_streams = 3")
        .start()
        .await;
    let stream = TcpStream::connect(s.addr()).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = hyper::Request::get(format!("http://{}/verify", s.addr()))
        .body(())
        .unwrap();
    // An answer comes after the server's SETTINGS.
    let (answer, _) = client.send_request(req, true).unwrap();
    assert_eq!(answer.await.unwrap().status(), 401);
    assert_eq!(client.current_max_send_streams(), 3);
    drop(client);
    conn.abort();
    s.stop().await;
}

#[tokio::test]
async fn an_http2_client_that_never_takes_its_answers_is_closed() {
    let (_db, _client, s) = Fixture::new()
        .config("[server]\nidle_timeout = \"1s\"\nheader_read_timeout = \"1s\"")
        .start()
        .await;
    let stream = TcpStream::connect(s.addr()).await.unwrap();
    // A flow-control window of 0: the server may send no byte of any answer's body until the
    // client opens it, which this one never does (it still answers pings).
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut answers = Vec::new();
    for _ in 0..3 {
        let req = hyper::Request::get(format!("http://{}/verify", s.addr()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        // The heads come (they are not flow-controlled); the 401 bodies stay unsent.
        let r = sender.send_request(req).await.expect("h2 response head");
        assert_eq!(r.status(), 401);
        answers.push(r);
    }
    // Idle (every handler is done) after 1 s, then 3 s to end (request_timeout, 2 s, and
    // header_read_timeout): the connection and its slot are given up, not held by answers that
    // can never be sent.
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(8), conn).await;
    assert!(
        ended.is_ok(),
        "the connection is still open after {:?}",
        started.elapsed()
    );
    drop(answers);
    s.stop().await;
}

/// An HTTP/1 client that sends requests without ever reading the answers: once the server's
/// writes are blocked, the connection has no request in flight, is closed after
/// `idle_timeout`, and given up `request_timeout` + `header_read_timeout` later rather than
/// waited on for ever, so such clients cannot keep the connection cap full.
#[tokio::test]
async fn http1_clients_that_never_read_their_answers_do_not_keep_the_connection_cap() {
    const CAP: usize = 4;
    let (_db, _client, s) = Fixture::new()
        .config(&format!(
            "[server]\nmax_connections = {CAP}\nidle_timeout = \"1s\"\n\
             header_read_timeout = \"1s\"\nrequest_timeout = \"2s\""
        ))
        .start()
        .await;
    // Pipelined requests whose 401s add up to far more than the socket buffers hold.
    let pipelined = b"GET /verify HTTP/1.1\r\nHost: knoxgate\r\n\r\n".repeat(50_000);
    let mut writers = Vec::new();
    for _ in 0..CAP {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(1024).unwrap();
        let mut stream = socket.connect(s.addr()).await.unwrap();
        let pipelined = pipelined.clone();
        writers.push(tokio::spawn(async move {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &pipelined).await;
            // Held open, never read, until the test ends.
            std::future::pending::<()>().await;
        }));
    }
    // Let the connections take the cap and their writes block.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let served = eventually(Duration::from_secs(10), || async {
        get_once(s.addr(), "/verify", None, Duration::from_secs(1))
            .await
            .is_ok_and(|r| r.status == 401)
    })
    .await;
    for w in writers {
        w.abort();
    }
    assert!(
        served.is_some(),
        "no fresh connection was served for {:?} while clients that do not read held the cap",
        started.elapsed()
    );
    s.stop().await;
}

/// Silent connections against the default caps: the figure in bench/CHAOS.md.
const SILENT_AT_DEFAULTS: usize = 1_000;

/// Raises this process's open-file limit to at least `needed` (up to the hard limit).
fn ensure_open_files(needed: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|soft| soft < needed) {
        let raised = limit.maximum.map_or(needed, |hard| hard.min(needed));
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(raised),
                maximum: limit.maximum,
            },
        )
        .expect("raise the open-file limit");
    }
    let now = getrlimit(Resource::Nofile).current;
    assert!(
        now.is_none_or(|soft| soft >= needed),
        "open-file limit {now:?} < {needed}: raise `ulimit -n`"
    );
}

/// `count` requests, one after another, each on a fresh connection; every answer must be 200.
async fn served(s: &TestServer, token: &str, count: usize) -> Vec<Duration> {
    let auth = format!("Token {token}");
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let r = get_once(s.addr(), "/verify", Some(&auth), Duration::from_secs(5))
            .await
            .expect("a real client's answer within 5 s");
        assert_eq!(r.status, 200);
        latencies.push(started.elapsed());
    }
    latencies.sort();
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_connections_under_the_default_caps_do_not_delay_a_real_client() {
    // Both ends of every connection are in this process, beside the other tests' sockets.
    ensure_open_files(4 * SILENT_AT_DEFAULTS as u64 + 1024);
    let (db, _client, s) = Fixture::new().start().await;
    let defaults = config_for(&db, "defaults", "");
    assert!(
        defaults.server.max_connections.get() > SILENT_AT_DEFAULTS,
        "the default connection cap is what this test is about"
    );
    let header_read_timeout = defaults.server.header_read_timeout;
    let token = user_with_token(&db, "silent-real").await;
    let alone = served(&s, &token.token, 20).await;

    let opened = Instant::now();
    let mut silent = Vec::with_capacity(SILENT_AT_DEFAULTS);
    for _ in 0..SILENT_AT_DEFAULTS {
        silent.push(TcpStream::connect(s.addr()).await.expect("connect"));
    }
    // Give the accept loop time to take every one of them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let beside = served(&s, &token.token, 20).await;
    // The figures count only while every silent socket is still held open by the server.
    let held_for = opened.elapsed();
    if held_for < header_read_timeout / 2 {
        let mut open = 0;
        for sock in &silent {
            let mut buf = [0u8; 1];
            if matches!(sock.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                open += 1;
            }
        }
        assert_eq!(
            open, SILENT_AT_DEFAULTS,
            "silent sockets closed before the head timeout"
        );
    }
    let (p50, max) = (percentile(&beside, 50.0), *beside.last().unwrap());
    println!(
        "{SILENT_AT_DEFAULTS} silent connections (default caps: max_connections {}, \
         header_read_timeout {header_read_timeout:?}): a real client's /verify p50 {p50:?}, \
         max {max:?} (alone: p50 {:?}, max {:?}); sockets held {held_for:?}",
        defaults.server.max_connections,
        percentile(&alone, 50.0),
        alone.last().unwrap()
    );
    // The figure is a few milliseconds; the bound is generous for a loaded machine.
    assert!(
        max < Duration::from_millis(1000),
        "a real client waited {max:?}"
    );
    drop(silent);
    s.stop().await;
}

/// CPU time this thread has run, from the scheduler's own count (nanoseconds). A
/// `#[tokio::test]` runtime has one thread, and the server's connections run on it.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns = stat.split_whitespace().next().unwrap().parse().unwrap();
    Duration::from_nanos(ns)
}

/// Sockets that stop halfway through the HTTP/2 preface wait for the rest without costing CPU
/// (each used to be polled every 5 ms until `server.header_read_timeout`), and are closed at it.
#[tokio::test]
async fn connections_stalled_in_the_http2_preface_cost_no_cpu_while_they_wait() {
    const STALLED: usize = 500;
    ensure_open_files(STALLED as u64 + 256);
    let (_db, _client, s) = Fixture::new()
        .config(&format!(
            "[server]\nmax_connections = {}\nheader_read_timeout = \"4s\"",
            STALLED + 10
        ))
        .start()
        .await;
    let mut stalled = Vec::with_capacity(STALLED);
    for _ in 0..STALLED {
        let mut sock = TcpStream::connect(s.addr()).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut sock, b"PRI * HTTP/2.0\r\n")
            .await
            .unwrap();
        stalled.push(sock);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu, wall) = (thread_cpu(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = thread_cpu() - cpu;
    assert!(
        spent < Duration::from_millis(50),
        "{STALLED} connections stalled in the preface cost {spent:?} of CPU in {:?}",
        wall.elapsed()
    );
    // Still bounded by the head timeout: each is closed once it has passed.
    for sock in stalled {
        assert_closed_within(sock, Duration::from_secs(4), "stalled").await;
    }
    s.stop().await;
}
