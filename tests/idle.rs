//! Connections that send nothing hold no connection slot for long: a socket that never sends a
//! byte is closed after `server.header_read_timeout`, and an HTTP/2 connection with no request
//! in flight after `server.idle_timeout`, even when it answers every ping.

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

#[tokio::test]
async fn silent_sockets_at_the_connection_cap_do_not_lock_out_real_clients() {
    let cap = silent_count();
    let (_db, _client, s) = Fixture::new()
        .config(&format!(
            "[server]\nmax_connections = {cap}\nheader_read_timeout = \"1s\""
        ))
        .start()
        .await;
    let opened = Instant::now();
    let mut silent = Vec::with_capacity(cap);
    for _ in 0..cap {
        silent.push(TcpStream::connect(s.addr()).await.expect("connect"));
    }
    // Give the accept loop time to take every one of them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The cap is full: a real client is turned away (this is the attack working).
    let refused = get_once(s.addr(), "/verify", None, Duration::from_millis(500)).await;
    assert!(refused.is_err(), "cap not reached: {refused:?}");
    // Once the head timeout has passed, the silent sockets are closed and real clients served.
    let served = eventually(Duration::from_secs(4), || async {
        matches!(
            get_once(s.addr(), "/verify", None, Duration::from_millis(500)).await,
            Ok(r) if r.status == 401
        )
    })
    .await;
    assert!(
        served.is_some(),
        "no request served after the silent sockets"
    );
    assert!(
        opened.elapsed() < Duration::from_secs(4),
        "served only after {:?}",
        opened.elapsed()
    );
    // The server closed them: each reads end-of-file (or a reset), never blocks.
    for mut sock in silent {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "silent socket still open"
        );
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
