//! Bounded everything: in-flight cap with load shedding, connection cap, header read timeout.

use std::time::{Duration, Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::*;

/// Holds an ACCESS EXCLUSIVE lock on knox_authtoken so lookups wait for it.
async fn lock_tokens(db: &TestDb) -> tokio_postgres::Client {
    let c = db.client().await;
    c.batch_execute("BEGIN; LOCK TABLE knox_authtoken IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    c
}

#[tokio::test]
async fn requests_beyond_max_in_flight_are_shed_at_once_with_503() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(
        &db,
        "[server]\nmax_in_flight = 1\n[postgres]\nstatement_timeout = \"1500ms\"",
    )
    .await;
    let _lock = lock_tokens(&db).await;
    // One request waits on the lock…
    let addr = s.addr();
    let slow = tokio::spawn(async move {
        http(
            addr,
            "GET",
            "/verify",
            &[("Authorization", "Token 1111111111111111")],
            b"",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // …so the next one is refused immediately rather than queued.
    let started = Instant::now();
    let r = s.verify(&t.token).await;
    assert_eq!(r.status, 503);
    assert!(r.body_text().contains("overloaded"));
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(s.metric("knoxgate_load_shed_total").await, 1.0);
    // The stuck one fails closed when its statement times out: 503, never 401.
    assert_eq!(slow.await.unwrap().status, 503);
    s.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_and_admin_stays_reachable() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "[server]\nmax_connections = 4").await;
    // Four keep-alive connections, each served once (a connection yet to send a request
    // would be evicted to make room: tests/idle.rs).
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut conn = TcpStream::connect(s.addr()).await.unwrap();
        conn.write_all(
            format!(
                "GET /verify HTTP/1.1\r\nHost: x\r\nAuthorization: Token {}\r\n\r\n",
                t.token
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = [0u8; 12];
        conn.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        held.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The fifth is accepted by the kernel and closed by knoxgate without an answer.
    let mut extra = TcpStream::connect(s.addr()).await.unwrap();
    let _ = extra
        .write_all(b"GET /verify HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    // Probes are on their own cap.
    assert_eq!(
        http(s.admin(), "GET", "/healthz", &[], b"").await.status,
        200
    );
    // Freed slots serve again.
    held.clear();
    let ok = eventually(Duration::from_secs(2), || async {
        s.verify(&t.token).await.status == 200
    })
    .await;
    assert!(ok.is_some());
    s.stop().await;
}

#[tokio::test]
async fn slowloris_clients_are_cut_off_and_do_not_starve_others() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(
        &db,
        "[server]\nmax_connections = 40\nheader_read_timeout = \"500ms\"",
    )
    .await;
    // 30 clients that send half a request head and stall.
    let mut slow = Vec::new();
    for _ in 0..30 {
        let mut c = TcpStream::connect(s.addr()).await.unwrap();
        c.write_all(b"GET /verify HTTP/1.1\r\nHost: x\r\nAuthori")
            .await
            .unwrap();
        slow.push(c);
    }
    // Others are served meanwhile.
    for _ in 0..5 {
        assert_eq!(s.verify(&t.token).await.status, 200);
    }
    // The stalled ones are closed once the header read timeout passes.
    let started = Instant::now();
    for c in &mut slow {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut buf))
            .await
            .expect("closed by the server");
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    s.stop().await;
}

#[tokio::test]
async fn logins_held_open_by_slow_bodies_take_no_place_of_verify_and_get_408() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(
        &db,
        "[server]\nmax_in_flight = 4\nrequest_timeout = \"2s\"\n[sessions]\nmax_in_flight = 4",
    )
    .await;
    // Four logins whose bodies never come: as many as either cap.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(s.addr()).await.unwrap();
        c.write_all(
            b"POST /api/auth/login/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
        slow.push(c);
    }
    // Once the four hold the sessions' places, a fifth login is shed at once.
    let took = std::sync::Mutex::new(Duration::ZERO);
    let shed = eventually(Duration::from_secs(1), || async {
        let started = Instant::now();
        let r = http(s.addr(), "POST", "/api/auth/login/", &[], b"").await;
        *took.lock().unwrap() = started.elapsed();
        r.status == 503 && r.header("retry-after") == Some("1")
    })
    .await;
    assert!(
        shed.is_some(),
        "a login beyond sessions.max_in_flight was not shed"
    );
    let took = *took.lock().unwrap();
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(s.metric("knoxgate_sessions_load_shed_total").await, 1.0);
    // /verify keeps its own places.
    for _ in 0..4 {
        assert_eq!(s.verify(&t.token).await.status, 200);
    }
    assert_eq!(s.metric("knoxgate_load_shed_total").await, 0.0);
    // The slow ones get 408 for their own slowness after half the request's time (1 s), not
    // the 503 of an outage at the deadline.
    for c in &mut slow {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut buf))
            .await
            .expect("answered and closed");
        let answer = String::from_utf8_lossy(&buf);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(
            answer.contains("Request body not received in time."),
            "{answer}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn request_deadline_turns_a_stuck_lookup_into_503() {
    let db = TestDb::migrated().await;
    let s = TestServer::start(
        &db,
        "[server]\nrequest_timeout = \"300ms\"\n[postgres]\nstatement_timeout = \"5s\"\n\
         [sessions]\nhash_queue_timeout = \"100ms\"",
    )
    .await;
    let _lock = lock_tokens(&db).await;
    let started = Instant::now();
    let r = s.verify(&"2".repeat(64)).await;
    assert_eq!(r.status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    s.stop().await;
}
