//! The demoted lane (`server.demote_after_refusals`): an HTTP/1 connection whose answers keep
//! being 401 moves, between two requests, to threads at nice 19 — and is answered exactly as
//! before there: valid tokens, tokens never looked up (a Postgres lookup), pipelined requests,
//! the idle timeout. Other connections stay where they are.

use std::time::Duration;

use knoxgate::auth::generate_token;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::*;

const DEMOTED: &str = "knoxgate_connections_demoted_total";
const RELEASED: &str = "knoxgate_connections_released_total";

/// `n` random tokens on `conn`, each answered 401.
async fn refuse(conn: &mut Client, n: usize) {
    for _ in 0..n {
        let auth = format!("Token {}", generate_token("", 64));
        let r = conn.get("/verify", Some(&auth)).await.expect("answer");
        assert_eq!(r.status, 401);
    }
}

async fn demoted_count_reaches(s: &TestServer, n: f64) {
    let reached = eventually(Duration::from_secs(5), || async {
        s.metric(DEMOTED).await == n
    })
    .await;
    assert!(
        reached.is_some(),
        "{DEMOTED} is {}, expected {n}",
        s.metric(DEMOTED).await
    );
}

/// The nice values of this process's demoted-lane threads (the kernel keeps 15 characters of a
/// thread's name).
fn lane_thread_nices() -> Vec<i32> {
    let mut nices = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let path = task.expect("task").path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if comm.trim_end() != "knoxgate-demote" {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        let after_name = &stat[stat.rfind(')').expect("stat has a name") + 2..];
        nices.push(after_name.split(' ').nth(16).unwrap().parse().unwrap());
    }
    nices
}

#[tokio::test]
async fn a_connection_refused_again_and_again_moves_to_the_lane_and_is_answered_right_there() {
    let db = TestDb::migrated().await;
    let alice = user_with_token(&db, "alice").await;
    let client = db.client().await;
    let s = TestServer::start(&db, "[server]\ndemote_after_refusals = 8").await;
    let alice_auth = format!("Token {}", alice.token);

    let mut conn = Client::connect(s.addr()).await.unwrap();
    // Seven refusals and then a valid token: the streak ends and nothing moves.
    refuse(&mut conn, 7).await;
    assert_eq!(
        conn.get("/verify", Some(&alice_auth)).await.unwrap().status,
        200
    );
    refuse(&mut conn, 7).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        s.metric(DEMOTED).await,
        0.0,
        "moved before 8 refusals in a row"
    );
    refuse(&mut conn, 1).await;
    demoted_count_reaches(&s, 1.0).await;

    // On the lane, over the same connection: the hot token, a token never looked up (Redis
    // and Postgres, from a lane thread), a refusal, and the hot token again.
    let r = conn.get("/verify", Some(&alice_auth)).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-auth-user-id"),
        Some(alice.user_id.to_string().as_str())
    );
    let cold = insert_default_token(&client, alice.user_id).await;
    let r = conn
        .get("/verify", Some(&format!("Token {}", cold.token)))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "a token first looked up on the lane");
    refuse(&mut conn, 1).await;
    assert_eq!(
        conn.get("/verify", Some(&alice_auth)).await.unwrap().status,
        200
    );
    assert!(!conn.closed, "the connection moved without being closed");

    // Other connections stay on the main runtime.
    let mut other = Client::connect(s.addr()).await.unwrap();
    refuse(&mut other, 3).await;
    assert_eq!(
        other
            .get("/verify", Some(&alice_auth))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(s.metric(DEMOTED).await, 1.0);

    // The lane's threads exist and run at the lowest priority.
    let nices = lane_thread_nices();
    assert!(!nices.is_empty(), "no demoted-lane threads found");
    assert!(
        nices.iter().all(|&n| n == 19),
        "lane thread nice values: {nices:?}"
    );

    // Shutdown drains the demoted connection too.
    tokio::time::timeout(Duration::from_secs(15), s.stop())
        .await
        .expect("shutdown with a demoted connection open");
}

#[tokio::test]
async fn a_demoted_connection_answered_as_many_times_in_a_row_without_a_401_is_let_go() {
    let db = TestDb::migrated().await;
    let alice = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "[server]\ndemote_after_refusals = 8").await;
    let alice_auth = format!("Token {}", alice.token);

    let mut conn = Client::connect(s.addr()).await.unwrap();
    refuse(&mut conn, 8).await;
    demoted_count_reaches(&s, 1.0).await;

    // Seven valid answers and a refusal: the streak of answers that were not 401 starts over.
    for _ in 0..7 {
        let r = conn.get("/verify", Some(&alice_auth)).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), None);
    }
    refuse(&mut conn, 1).await;
    for _ in 0..7 {
        assert_eq!(
            conn.get("/verify", Some(&alice_auth)).await.unwrap().status,
            200
        );
    }
    assert!(
        !conn.closed,
        "let go before 8 answers in a row that were not 401"
    );
    assert_eq!(s.metric(RELEASED).await, 0.0);

    // The eighth: answered, and the last on this connection.
    let r = conn.get("/verify", Some(&alice_auth)).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-auth-user-id"),
        Some(alice.user_id.to_string().as_str())
    );
    assert!(
        conn.closed,
        "the eighth answer did not close the connection"
    );
    assert!(
        conn.get("/verify", Some(&alice_auth)).await.is_err(),
        "a request was answered on a connection that was let go"
    );
    assert_eq!(s.metric(RELEASED).await, 1.0);

    // The client's new connection starts on the main threads: it takes another eight refusals
    // in a row to be demoted again.
    let mut again = Client::connect(s.addr()).await.unwrap();
    refuse(&mut again, 7).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.metric(DEMOTED).await, 1.0);
    refuse(&mut again, 1).await;
    demoted_count_reaches(&s, 2.0).await;
    s.stop().await;
}

/// Answers that were not 401 can pile up before the move: hyper answers on the main threads
/// every request it has read ahead, the demotion notwithstanding. A connection that reaches
/// the lane with more of them in a row than it took to demote it is let go at its first
/// answer there, not kept at nice 19 until a 401 starts the count over.
#[tokio::test]
async fn a_connection_that_reaches_the_lane_past_its_streak_is_let_go_at_once() {
    let db = TestDb::migrated().await;
    let alice = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "[server]\ndemote_after_refusals = 4").await;
    let mut stream = TcpStream::connect(s.addr()).await.unwrap();
    // One write: four refusals (the fourth demotes), then six valid tokens read ahead with
    // them, answered before the connection moves.
    let mut batch = String::new();
    for _ in 0..4 {
        batch += &verify_request(&generate_token("", 64));
    }
    for _ in 0..6 {
        batch += &verify_request(&alice.token);
    }
    stream.write_all(batch.as_bytes()).await.unwrap();
    assert_eq!(
        read_responses(&mut stream, 10).await,
        [401, 401, 401, 401, 200, 200, 200, 200, 200, 200]
    );
    demoted_count_reaches(&s, 1.0).await;
    assert_eq!(s.metric(RELEASED).await, 0.0);

    // The first answer on the lane is the last on this connection.
    stream
        .write_all(verify_request(&alice.token).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_responses(&mut stream, 1).await, [200]);
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("closed within 5 s of its answer");
    assert!(matches!(closed, Ok(0)), "{closed:?}");
    assert_eq!(s.metric(RELEASED).await, 1.0);
    s.stop().await;
}

/// Reads from `stream` until `n` whole responses (status line, headers, `Content-Length` body)
/// have arrived; returns their status codes in order.
async fn read_responses(stream: &mut TcpStream, n: usize) -> Vec<u16> {
    let mut data = Vec::new();
    let mut statuses = Vec::new();
    let mut at = 0;
    while statuses.len() < n {
        // Parse every complete response already read.
        if let Some(head_end) = find(&data[at..], b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[at..at + head_end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            let end = at + head_end + 4 + length;
            if data.len() >= end {
                statuses.push(head[9..12].parse().expect("status code"));
                at = end;
                continue;
            }
        }
        let mut buf = [0u8; 16384];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("responses within 10 s")
            .expect("read");
        assert!(read > 0, "closed after {statuses:?}");
        data.extend_from_slice(&buf[..read]);
    }
    assert_eq!(at, data.len(), "bytes after the expected responses");
    statuses
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn verify_request(token: &str) -> String {
    format!("GET /verify HTTP/1.1\r\nHost: knoxgate\r\nAuthorization: Token {token}\r\n\r\n")
}

#[tokio::test]
async fn pipelined_and_split_requests_across_the_move_are_all_answered_and_the_lane_keeps_the_idle_timeout()
 {
    let db = TestDb::migrated().await;
    let alice = user_with_token(&db, "alice").await;
    let s = TestServer::start(
        &db,
        "[server]\ndemote_after_refusals = 4\nidle_timeout = \"1s\"",
    )
    .await;
    let mut stream = TcpStream::connect(s.addr()).await.unwrap();
    // One write: four refusals (the fourth completes the streak), a valid token and a refusal
    // that hyper reads ahead, and the first half of another request: the move must carry all
    // of it to the lane.
    let mut batch = String::new();
    for _ in 0..4 {
        batch += &verify_request(&generate_token("", 64));
    }
    batch += &verify_request(&alice.token);
    batch += &verify_request(&generate_token("", 64));
    let split = verify_request(&alice.token);
    let (first_half, second_half) = split.split_at(split.len() / 2);
    batch += first_half;
    stream.write_all(batch.as_bytes()).await.unwrap();
    assert_eq!(
        read_responses(&mut stream, 6).await,
        [401, 401, 401, 401, 200, 401]
    );
    demoted_count_reaches(&s, 1.0).await;

    // Served on the lane: the rest of the split request, a valid token, a pipelined pair.
    stream.write_all(second_half.as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut stream, 1).await, [200]);
    stream
        .write_all(verify_request(&alice.token).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_responses(&mut stream, 1).await, [200]);
    let pair = verify_request(&generate_token("", 64)) + &verify_request(&alice.token);
    stream.write_all(pair.as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut stream, 2).await, [401, 200]);

    // Idle for server.idle_timeout: the lane closes it as the main runtime would.
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("closed within 5 s of a 1 s idle timeout");
    assert!(matches!(closed, Ok(0)), "{closed:?}");
    s.stop().await;
}

#[tokio::test]
async fn with_demotion_off_no_connection_moves() {
    let db = TestDb::migrated().await;
    let s = TestServer::start(&db, "[server]\ndemote_after_refusals = 0").await;
    let mut conn = Client::connect(s.addr()).await.unwrap();
    refuse(&mut conn, 40).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.metric(DEMOTED).await, 0.0);
    refuse(&mut conn, 1).await;
    s.stop().await;
}

/// A request whose body knoxgate answers without reading (`/verify` ignores bodies; a login
/// refused on its credentials never reads one) may complete the streak. The body is still the
/// client's body, never a request: such a connection is closed by that answer instead of
/// moving, whether the body came with the head or is still to come. A body earlier in the
/// streak is hyper's to skip before the next request, and the move waits for that request.
#[tokio::test]
async fn a_body_left_unread_by_the_answer_that_demotes_is_never_taken_for_a_request() {
    let db = TestDb::migrated().await;
    let alice = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "[server]\ndemote_after_refusals = 4").await;
    let inner = verify_request(&alice.token);
    let posted = || {
        format!(
            "POST /verify HTTP/1.1\r\nHost: knoxgate\r\nAuthorization: Token {}\r\n\
             Content-Length: {}\r\n\r\n",
            generate_token("", 64),
            inner.len()
        )
    };
    let refusals = |n: usize| -> String {
        (0..n)
            .map(|_| verify_request(&generate_token("", 64)))
            .collect()
    };

    // The body in the same write as its head.
    let mut stream = TcpStream::connect(s.addr()).await.unwrap();
    let batch = refusals(3) + &posted() + &inner;
    stream.write_all(batch.as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut stream, 4).await, [401, 401, 401, 401]);
    assert_closed(&mut stream).await;

    // The body sent once the answer has come.
    let mut stream = TcpStream::connect(s.addr()).await.unwrap();
    let batch = refusals(3) + &posted();
    stream.write_all(batch.as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut stream, 4).await, [401, 401, 401, 401]);
    let _ = stream.write_all(inner.as_bytes()).await;
    assert_closed(&mut stream).await;
    assert_eq!(s.metric(DEMOTED).await, 0.0);

    // A body earlier in the streak: skipped, and the connection moves after the next request.
    let mut stream = TcpStream::connect(s.addr()).await.unwrap();
    let batch = refusals(2) + &posted() + &inner + &refusals(1);
    stream.write_all(batch.as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut stream, 4).await, [401, 401, 401, 401]);
    demoted_count_reaches(&s, 1.0).await;
    stream.write_all(inner.as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut stream, 1).await, [200]);
    s.stop().await;
}

/// The connection is closed within a second, with no further response.
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!(
            "a response to bytes of a body: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => panic!("still open a second after the answer that completed the streak"),
    }
}
