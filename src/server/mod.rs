//! Listeners: accept loop with a connection cap, hyper HTTP/1.1 + h2c per connection with header
//! limits and timeouts (a bound on a new connection's first bytes, an idle timeout for every
//! protocol), and a graceful drain on shutdown.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinSet,
};

use crate::config::ServerConfig;

/// Per-connection protocol limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
}

impl From<&ServerConfig> for Limits {
    fn from(c: &ServerConfig) -> Self {
        Limits {
            max_header_bytes: c.max_header_bytes,
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            shutdown_grace: c.shutdown_grace,
        }
    }
}

/// The HTTP/2 connection preface a prior-knowledge client opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits until the client has sent enough to tell HTTP/1 from HTTP/2. hyper's protocol
/// detection reads these bytes with no timer of its own, and its HTTP/1 `header_read_timeout`
/// starts only after it, so without this bound a socket that never sends a byte holds a
/// connection slot for ever. `false`: the peer closed first.
async fn first_bytes(stream: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(false);
        }
        if n == buf.len() || buf[..n] != H2_PREFACE[..n] {
            return Ok(true);
        }
        // Part of the HTTP/2 preface: peek returns at once while bytes are buffered, so poll
        // gently for the rest (rare, and bounded by the caller's timeout).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Requests in flight on one connection and when the last one ended, for the idle timeout.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` at which the connection last became idle.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    /// When the connection will have been idle for `limit`, or `None` while a request runs.
    fn idle_deadline(&self, limit: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
        Some(self.started + since + limit)
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

/// Serves `listener` until `shutdown` becomes true, then drains open connections for at most
/// the grace period. `connections` caps open connections (shared between listeners). The
/// handler's body type is free so that the gRPC listener (tonic's bodies) shares this loop.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    limits: Limits,
    connections: Arc<Semaphore>,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let mut open = JoinSet::new();
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
                let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                    // Over the connection cap: close at once rather than let it queue.
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = connection(
                    Arc::clone(&builder),
                    stream,
                    peer,
                    handler.clone(),
                    limits.clone(),
                    shutdown.clone(),
                );
                open.spawn(async move {
                    let _permit = permit;
                    conn.await;
                });
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

/// One connection: wait (bounded) for its first bytes, then serve it until it ends, has been
/// idle for `idle_timeout`, or shutdown begins (then gracefully).
async fn connection<H, F, B>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
    handler: H,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tokio::time::timeout(limits.header_read_timeout, first_bytes(&stream)).await {
        Ok(Ok(true)) => {}
        // Silent for the whole head timeout, closed, or failed: drop it and free the slot.
        _ => return,
    }
    let activity = Activity::new();
    let service = {
        let activity = Arc::clone(&activity);
        service_fn(move |req| {
            let in_flight = activity.begin();
            let fut = handler(req, peer);
            async move {
                let response = fut.await;
                drop(in_flight);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        let idle_at = activity.idle_deadline(limits.idle_timeout);
        let recheck = idle_at.unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.wait_for(|stop| *stop), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(recheck.into()), if !closing => {
                if activity
                    .idle_deadline(limits.idle_timeout)
                    .is_some_and(|at| at <= Instant::now())
                {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
