//! Listeners: accept loop with a connection cap, hyper HTTP/1.1 + h2c per connection with header
//! limits and timeouts, and a graceful drain on shutdown.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};

use crate::config::ServerConfig;

/// Per-connection protocol limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

impl From<&ServerConfig> for Limits {
    fn from(c: &ServerConfig) -> Self {
        Limits {
            max_header_bytes: c.max_header_bytes,
            header_read_timeout: c.header_read_timeout,
            shutdown_grace: c.shutdown_grace,
        }
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
    let graceful = GracefulShutdown::new();
    loop {
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
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let fut = handler(req, peer);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period ended with connections still open");
    }
}
