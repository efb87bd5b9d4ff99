//! Listeners: accept loop with a connection cap (`cap`: a connection yet to send a request
//! makes room, and on the admin port one idle between requests), hyper HTTP/1.1 + h2c per
//! connection with header limits and timeouts (a bound on a new connection's first bytes, an
//! idle timeout for every protocol), a graceful drain on shutdown, and the demoted lane
//! (`lane`) for HTTP/1 connections whose answers keep being 401.

mod cap;
mod lane;

pub use cap::Cap;
pub use cap::Evict;
use cap::Evictable;
pub use lane::Lane;

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};

use crate::config::ServerConfig;

/// Per-connection protocol limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// The longest a handler runs (`server.request_timeout`).
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub http2_max_streams: u32,
    pub http2_ping_interval: Option<Duration>,
    pub http2_ping_timeout: Duration,
}

impl From<&ServerConfig> for Limits {
    fn from(c: &ServerConfig) -> Self {
        Limits {
            max_header_bytes: c.max_header_bytes,
            header_read_timeout: c.header_read_timeout,
            request_timeout: c.request_timeout,
            idle_timeout: c.idle_timeout,
            shutdown_grace: c.shutdown_grace,
            http2_max_streams: c.http2_max_streams,
            http2_ping_interval: c.http2_ping_interval,
            http2_ping_timeout: c.http2_ping_timeout,
        }
    }
}

/// The HTTP/2 connection preface a prior-knowledge client opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the client has sent enough to tell HTTP/1 from HTTP/2, and returns what it read
/// for hyper to read first. hyper's protocol detection reads these bytes with no timer of its
/// own, and its HTTP/1 `header_read_timeout` starts only after it, so without this bound a
/// socket that never sends a byte holds a connection slot for ever. Read, not peeked: a peek
/// returns at once while any byte is buffered, so a client stopping halfway through the
/// HTTP/2 preface could only be polled for the rest. `None`: the peer closed first.
async fn first_bytes(stream: &mut TcpStream) -> std::io::Result<Option<(Protocol, Bytes)>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(None);
        }
        filled += n;
        let read = || Bytes::copy_from_slice(&buf[..filled]);
        if buf[..filled] != H2_PREFACE[..filled] {
            return Ok(Some((Protocol::Http1, read())));
        }
        if filled == buf.len() {
            return Ok(Some((Protocol::Http2, read())));
        }
    }
}

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// Prior-knowledge HTTP/2 (h2c).
    Http2,
}

/// Requests in flight on one connection and when the last one ended, for the idle timeout;
/// and how many answers in a row were 401, or were not, for the demoted lane.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` at which the connection last became idle.
    idle_since_ms: AtomicU64,
    refused_in_a_row: AtomicU32,
    not_refused_in_a_row: AtomicU32,
    /// The latest request came with a body, which its handler may have left unread (`/verify`
    /// never reads one): hyper alone knows where that body ends, so the connection must not
    /// leave hyper before the next request (see [`lane::Watch::may_move`]).
    body_sent: AtomicBool,
    /// A request has begun on it: until then it may be evicted to make room (see [`Evictable`]).
    requested: AtomicBool,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            refused_in_a_row: AtomicU32::new(0),
            not_refused_in_a_row: AtomicU32::new(0),
            body_sent: AtomicBool::new(false),
            requested: AtomicBool::new(false),
        })
    }

    /// Counts an answer: a 401 lengthens the streak of refusals and ends the other streak,
    /// anything else the reverse. Returns how long the other streak now is (0 after a 401).
    fn answered(&self, status: StatusCode) -> u32 {
        if status == StatusCode::UNAUTHORIZED {
            self.refused_in_a_row.fetch_add(1, Ordering::Relaxed);
            self.not_refused_in_a_row.store(0, Ordering::Relaxed);
            0
        } else {
            self.refused_in_a_row.store(0, Ordering::Relaxed);
            self.not_refused_in_a_row.fetch_add(1, Ordering::Relaxed) + 1
        }
    }

    /// No request in flight.
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }

    fn refusals_in_a_row(&self) -> u32 {
        self.refused_in_a_row.load(Ordering::Relaxed)
    }

    fn body_sent(&self) -> bool {
        self.body_sent.load(Ordering::SeqCst)
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.requested.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    /// When the connection last became idle (was opened, or ended a request), or `None` while
    /// a request runs.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
        Some(self.started + since)
    }

    /// When the connection will have been idle for `limit`, or `None` while a request runs.
    fn idle_deadline(&self, limit: Duration) -> Option<Instant> {
        Some(self.idle_since()? + limit)
    }
}

/// Marks one request in flight until dropped (the response is sent or the request dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.started.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(now, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The bounds a connection's handler must meet; the gRPC listener's bodies are tonic's.
pub trait Handler<B>:
    Fn(Request<Incoming>, SocketAddr) -> Self::Answer + Clone + Send + Sync + Unpin + 'static
{
    type Answer: Future<Output = Response<B>> + Send + 'static;
}

impl<H, F, B> Handler<B> for H
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + Unpin + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
{
    type Answer = F;
}

/// A handler's answer as hyper's service future (boxed, so that the HTTP/1 connection that
/// can hand its socket to the lane may poll it).
type Answering<B> = Pin<Box<dyn Future<Output = Result<Response<B>, Infallible>> + Send>>;

/// Where a connection is served, as far as the demoted lane is concerned.
#[derive(Clone)]
enum Place {
    /// Never moves: HTTP/2, or no lane.
    Fixed,
    /// HTTP/1 on the main threads, demoted after `after_refusals` answers in a row were 401.
    Main { after_refusals: u32 },
    /// On the demoted lane.
    Lane(lane::OnLane),
}

/// The service of one connection: answers with `handler` and keeps `activity`. On the main
/// threads, the answer that demotes a connection whose request came with a body closes it
/// instead (the body's end is hyper's to find, so the socket cannot move without it being
/// taken for requests). On the demoted lane, polls the handler in the main runtime's context
/// and lets the connection go once it no longer earns its place there.
fn service<H, B>(
    handler: H,
    peer: SocketAddr,
    activity: Arc<Activity>,
    place: Place,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<B>,
    Error = Infallible,
    Future = Answering<B>,
> + Unpin
+ Clone
where
    H: Handler<B>,
    B: hyper::body::Body + Send + 'static,
{
    service_fn(move |req: Request<Incoming>| -> Answering<B> {
        let in_flight = activity.begin();
        let with_body = !hyper::body::Body::is_end_stream(req.body());
        activity.body_sent.store(with_body, Ordering::SeqCst);
        let activity = Arc::clone(&activity);
        let answer = handler(req, peer);
        let place = place.clone();
        let main = match &place {
            Place::Lane(on) => Some(on.main.clone()),
            _ => None,
        };
        let answer = async move {
            let mut response = answer.await;
            let not_refused = activity.answered(response.status());
            match place {
                Place::Main { after_refusals }
                    if with_body && activity.refusals_in_a_row() >= after_refusals =>
                {
                    lane::close_instead_of_moving(&mut response);
                }
                // At least, not exactly: hyper answers on the main threads what it read
                // ahead, so a connection may reach the lane with its streak already past the
                // mark.
                Place::Lane(on) if not_refused >= on.release_after => {
                    lane::release(&mut response, &on);
                }
                _ => {}
            }
            drop(in_flight);
            Ok::<_, Infallible>(response)
        };
        match main {
            None => Box::pin(answer),
            Some(main) => Box::pin(lane::InContext {
                main,
                future: Box::pin(answer),
            }),
        }
    })
}

/// Serves `listener` until `shutdown` becomes true, then drains open connections for at most
/// the grace period. `cap` bounds its open connections (see [`Cap::admit`] for what happens
/// at the cap). The handler's body type is free so that the gRPC listener (tonic's bodies)
/// shares this loop.
/// With a `lane`, HTTP/1 connections whose answers keep being 401 are demoted to it.
pub async fn serve<H, B>(
    listener: TcpListener,
    limits: Limits,
    cap: Cap,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    lane: Option<Arc<Lane>>,
) where
    H: Handler<B>,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // HTTP/2 (h2c) only: the first bytes tell the protocols apart (`first_bytes`), and HTTP/1
    // is served below, where a connection can move to the lane.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http2_only();
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.http2_max_streams)
        .keep_alive_interval(limits.http2_ping_interval)
        .keep_alive_timeout(limits.http2_ping_timeout);
    let builder = Arc::new(builder);
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes);
    let http1 = Arc::new(http1);
    let mut open = JoinSet::new();
    let mut evictable = Evictable::new(cap.evict);
    loop {
        // Forget connections that have ended, so the set holds only open ones.
        while open.try_join_next().is_some() {}
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = cap.admit(&mut evictable) else {
                    // Over the cap with every slot serving: close at once rather than let it
                    // queue.
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let activity = Activity::new();
                let conn = connection(
                    Connection {
                        builder: Arc::clone(&builder),
                        http1: Arc::clone(&http1),
                        lane: lane.clone(),
                        limits: limits.clone(),
                        shutdown: shutdown.clone(),
                    },
                    stream,
                    peer,
                    handler.clone(),
                    Arc::clone(&activity),
                );
                let freed_within = limits.header_read_timeout;
                let task = open.spawn(async move {
                    let Some(_permit) = slot.taken(freed_within).await else {
                        return;
                    };
                    conn.await;
                });
                evictable.push(activity, task, open.len());
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while open.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown grace period ended with connections still open");
    }
}

/// What every connection of a listener shares.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    http1: Arc<http1::Builder>,
    lane: Option<Arc<Lane>>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
}

/// One connection: wait (bounded) for its first bytes, then serve it until it ends, has been
/// idle for `idle_timeout`, or shutdown begins (then gracefully).
async fn connection<H, B>(
    shared: Connection,
    stream: TcpStream,
    peer: SocketAddr,
    handler: H,
    activity: Arc<Activity>,
) where
    H: Handler<B>,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = &shared.limits;
    let mut stream = stream;
    let (protocol, read) =
        match tokio::time::timeout(limits.header_read_timeout, first_bytes(&mut stream)).await {
            Ok(Ok(Some(first))) => first,
            // Silent for the whole head timeout, closed, or failed: drop it and free the slot.
            _ => return,
        };
    if protocol == Protocol::Http1 {
        return http1_connection(&shared, stream, read, peer, handler, activity).await;
    }
    let conn = shared.builder.serve_connection(
        TokioIo::new(lane::Socket::new(stream, read, None)),
        service(handler, peer, Arc::clone(&activity), Place::Fixed),
    );
    let mut conn = std::pin::pin!(conn);
    let mut shutdown = shared.shutdown.clone();
    let closing = Closing::of(limits);
    let mut close_by: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = time_to_close(&activity, closing.idle_timeout, &mut shutdown), if close_by.is_none() => {
                close_by = Some(tokio::time::Instant::now() + closing.within);
                conn.as_mut().graceful_shutdown();
            }
            _ = sleep_until_some(close_by), if close_by.is_some() => {
                tracing::debug!("HTTP/2 connection still open request_timeout + header_read_timeout after its close began; dropped");
                return;
            }
        }
    }
}

/// Sleeps until `at`; never resolves for `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// An HTTP/1 connection. With a lane, it moves there once its answers have been 401
/// `after_refusals` times in a row, and is served there until as many answers in a row were
/// not 401: that one tells the client to close it (see [`lane::release`]).
async fn http1_connection<H, B>(
    shared: &Connection,
    stream: TcpStream,
    read: Bytes,
    peer: SocketAddr,
    handler: H,
    activity: Arc<Activity>,
) where
    H: Handler<B>,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let watch = shared
        .lane
        .as_deref()
        .map(|lane| lane::Watch::new(Arc::clone(&activity), lane));
    let place = match &shared.lane {
        Some(lane) => Place::Main {
            after_refusals: lane.after_refusals.get(),
        },
        None => Place::Fixed,
    };
    let mut conn = shared.http1.serve_connection(
        TokioIo::new(lane::Socket::new(stream, read, watch.clone())),
        service(handler.clone(), peer, Arc::clone(&activity), place),
    );
    let mut shutdown = shared.shutdown.clone();
    let closing = Closing::of(&shared.limits);
    let served = serve_http1(
        &mut conn,
        &activity,
        closing,
        &mut shutdown,
        watch.as_deref(),
    )
    .await;
    let lane = match (served, &shared.lane) {
        (Ok(Served::Moving), Some(lane)) => lane,
        // Its answers cannot be written: the socket goes as it is, not waited on again.
        (Ok(Served::Abandoned), _) => return,
        (Err(e), _) => {
            tracing::debug!(error = %e, "connection ended with an error");
            return close(conn).await;
        }
        _ => return close(conn).await,
    };
    let parts = conn.into_parts();
    let http1 = Arc::clone(&shared.http1);
    let on_lane = lane.on_lane(tokio::runtime::Handle::current());
    let (stream, not_taken) = parts.io.into_inner().into_parts();
    // hyper's read-ahead came first, off the socket: what it never took follows it.
    let unread = if not_taken.is_empty() {
        parts.read_buf
    } else {
        [parts.read_buf, not_taken].concat().into()
    };
    lane.take(stream, unread, move |socket| async move {
        let mut conn = http1.serve_connection(
            TokioIo::new(socket),
            service(handler, peer, Arc::clone(&activity), Place::Lane(on_lane)),
        );
        match serve_http1(&mut conn, &activity, closing, &mut shutdown, None).await {
            Ok(Served::Abandoned) => return,
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "demoted connection ended with an error"),
        }
        close(conn).await;
    })
    .await;
}

/// Ends a connection that hyper has finished with (or failed on, e.g. after answering 431) as
/// hyper itself would: the write side is shut down (FIN after the last answer) before the
/// socket is closed, so that a client whose extra bytes are still unread gets its answer
/// rather than a reset.
async fn close<S, B>(conn: http1::Connection<TokioIo<lane::Socket>, S>)
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut socket = conn.into_parts().io.into_inner();
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut socket).await;
}

/// How [`serve_http1`] returned.
enum Served {
    /// The connection is over.
    Ended,
    /// Its socket is to move to the lane (only with a [`lane::Watch`]).
    Moving,
    /// It was still open [`Closing::within`] after its close began: its answers cannot be
    /// written (a client that does not read them), and it is dropped as it is.
    Abandoned,
}

/// When a connection is closed, and how long it then has to end.
#[derive(Clone, Copy)]
struct Closing {
    /// No request in flight for this long: close it.
    idle_timeout: Duration,
    /// Once closing, what its handlers may still take (`request_timeout`), then
    /// `header_read_timeout`. hyper waits for every answer to be written, and a client that
    /// stops reading (on HTTP/2: never opens its flow-control window) would keep them, and the
    /// connection's slot, for ever.
    within: Duration,
}

impl Closing {
    fn of(limits: &Limits) -> Closing {
        Closing {
            idle_timeout: limits.idle_timeout,
            within: limits.request_timeout + limits.header_read_timeout,
        }
    }
}

/// Serves an HTTP/1 connection until it ends, or until `watch` says it may move (then hyper
/// is no longer polled and its socket, not shut down, can be taken back); closes it gracefully
/// when it is idle too long or shutdown begins, and gives it up if that close does not end in
/// time.
async fn serve_http1<S, B>(
    conn: &mut http1::Connection<TokioIo<lane::Socket>, S>,
    activity: &Activity,
    closing: Closing,
    shutdown: &mut watch::Receiver<bool>,
    watch: Option<&lane::Watch>,
) -> Result<Served, hyper::Error>
where
    S: hyper::service::HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut close_by: Option<tokio::time::Instant> = None;
    loop {
        let served = std::future::poll_fn(|cx| match conn.poll_without_shutdown(cx) {
            Poll::Ready(ended) => Poll::Ready(ended.map(|()| Served::Ended)),
            // Not while closing: a connection being shut down is not worth moving.
            Poll::Pending if close_by.is_none() && watch.is_some_and(lane::Watch::may_move) => {
                Poll::Ready(Ok(Served::Moving))
            }
            Poll::Pending => Poll::Pending,
        });
        tokio::select! {
            served = served => return served,
            _ = time_to_close(activity, closing.idle_timeout, shutdown), if close_by.is_none() => {
                close_by = Some(tokio::time::Instant::now() + closing.within);
                Pin::new(&mut *conn).graceful_shutdown();
            }
            _ = sleep_until_some(close_by), if close_by.is_some() => {
                tracing::debug!("HTTP/1 connection still open request_timeout + header_read_timeout after its close began; dropped");
                return Ok(Served::Abandoned);
            }
        }
    }
}

/// Resolves when a connection should be closed gracefully: shutdown has begun, or no request
/// has been in flight for `idle_timeout`.
async fn time_to_close(
    activity: &Activity,
    idle_timeout: Duration,
    shutdown: &mut watch::Receiver<bool>,
) {
    loop {
        let idle_at = activity.idle_deadline(idle_timeout);
        let recheck = idle_at.unwrap_or_else(|| Instant::now() + idle_timeout);
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep_until(recheck.into()) => {
                if activity
                    .idle_deadline(idle_timeout)
                    .is_some_and(|at| at <= Instant::now())
                {
                    return;
                }
            }
        }
    }
}
