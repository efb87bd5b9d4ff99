//! The demoted lane: an HTTP/1 connection whose last `server.demote_after_refusals` answers
//! were all 401 — a client cycling through tokens or passwords that do not exist — is moved,
//! between two requests, to threads of the lowest CPU priority and served there until as many
//! answers in a row were not 401. That answer carries `Connection: close`: the client opens a
//! new connection, which starts on the main threads. A proxy's pooled connection, which
//! carries a flood and real users alike, is thus served at normal priority again once the
//! flood is over (a proxy that keeps its connections for hours would otherwise keep it last
//! for as long).
//!
//! Refusing a random token is cheap, but not cheaper than answering a valid one: both cost the
//! HTTP parsing and the syscalls. A flood that fills the cores would otherwise delay every real
//! client by as much as any load does. On the lane's threads (nice 19) the kernel runs flood
//! work only when no normal-priority thread wants a core, so real clients keep their median
//! latency and the flood still gets every cycle they leave (bench/FLOOD.md; what a flood's
//! packets cost the kernel, and its sender the cores it shares, no process priority removes).
//! The flood is answered as before (401, no query); it is only served last.
//!
//! The move: once the response that completes the streak has been written, hyper gets no more
//! bytes while no request is in flight; as soon as every answer is flushed and none is in
//! flight, hyper is no longer polled and gives the socket back with whatever it had read ahead
//! (pipelined requests, part of one). A request with a body moves nothing: where a body left
//! unread ends is known to hyper alone, so the answer that would demote such a connection
//! closes it instead. The socket leaves the main runtime's reactor, joins the
//! lane's, and a new HTTP/1 connection on the lane serves it, starting with those bytes. The
//! handlers still run in the main runtime's context (tasks they spawn, their timers), so a
//! demoted connection never drags shared work onto low-priority threads. HTTP/2 and gRPC
//! connections, which multiplex many clients, are never demoted.

use std::{
    future::Future,
    io,
    num::NonZeroU32,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    runtime::{Handle, Runtime},
};

use super::Activity;

/// The nice value of the lane's threads: the lowest priority there is.
const LANE_NICE: i32 = 19;

/// The low-priority runtime demoted connections are served on, and when to demote.
pub struct Lane {
    /// `Some` until dropped; shut down without waiting, as a drop may happen on a runtime thread.
    runtime: Option<Runtime>,
    handle: Handle,
    /// Consecutive 401 answers after which a connection is demoted, and consecutive other
    /// answers after which a demoted one is let go.
    pub(super) after_refusals: NonZeroU32,
    demoted: Counter,
    released: Counter,
}

/// What a connection served on the lane needs: the main runtime its handlers run in, and when
/// to let it go.
#[derive(Clone)]
pub(super) struct OnLane {
    pub(super) main: Handle,
    /// Answers in a row that were not 401 after which the connection is let go.
    pub(super) release_after: u32,
    released: Counter,
}

/// Makes `response` the last of its connection (`Connection: close`, which hyper honours by
/// closing once it is written): a demoted connection that has earned its way back. Closing
/// in-band, on an answer, rather than once the connection is idle, leaves no moment in which
/// the client may send a request on a connection being closed under it.
pub(super) fn release<B>(response: &mut hyper::Response<B>, on: &OnLane) {
    response.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    on.released.inc();
}

/// Makes `response` the last of its connection instead of the one after which it moves: its
/// request came with a body, which its handler may have left unread, and only hyper knows where
/// that body ends. Moved with it, the rest of the body would be read on the lane as requests
/// (a client could smuggle one past a proxy that forwards the body as it is).
pub(super) fn close_instead_of_moving<B>(response: &mut hyper::Response<B>) {
    response.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
}

impl Lane {
    /// Starts `threads` lane threads at nice 19. `demoted` counts the connections moved,
    /// `released` those let go.
    pub fn start(
        threads: usize,
        after_refusals: NonZeroU32,
        demoted: Counter,
        released: Counter,
    ) -> io::Result<Arc<Lane>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("knoxgate-demoted")
            .on_thread_start(|| {
                crate::priority::lower_current_thread(LANE_NICE, "demoted-connection threads")
            })
            .enable_all()
            .build()?;
        Ok(Arc::new(Lane {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            after_refusals,
            demoted,
            released,
        }))
    }

    /// For the connections moved here from the runtime of `main`.
    pub(super) fn on_lane(&self, main: Handle) -> OnLane {
        OnLane {
            main,
            release_after: self.after_refusals.get(),
            released: self.released.clone(),
        }
    }

    /// Serves the rest of a demoted connection on the lane, beginning with `unread` (bytes
    /// hyper had read ahead), until it ends. `serve` gets the socket and returns the serving
    /// future; it is called on a lane thread.
    pub(super) async fn take<F>(
        &self,
        stream: TcpStream,
        unread: Bytes,
        serve: impl FnOnce(Socket) -> F + Send + 'static,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        // Leaves the main runtime's reactor (the socket stays open and non-blocking).
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "could not move a connection to the demoted lane");
                return;
            }
        };
        self.demoted.inc();
        let moved = self.handle.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(Socket::resumed(stream, unread)).await,
                Err(e) => tracing::debug!(error = %e, "could not resume a demoted connection"),
            }
        });
        // The caller's task (and its connection permit) lives until the lane is done with it.
        let _ = moved.await;
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Polls a handler's future in the main runtime's context: what it spawns and the timers it
/// sets belong to the main runtime, not to the lane thread that happens to poll it.
pub(super) struct InContext<F> {
    pub(super) main: Handle,
    pub(super) future: Pin<Box<F>>,
}

impl<F: Future> Future for InContext<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _main = self.main.enter();
        self.future.as_mut().poll(cx)
    }
}

/// When a connection on the main runtime may move: shared by its socket, which hyper reads and
/// writes through, and the loop that polls hyper.
pub(super) struct Watch {
    activity: Arc<Activity>,
    after_refusals: u32,
    /// A response was written once the refusals in a row had reached the threshold: from here
    /// on, hyper gets no more bytes while no request is in flight.
    demoted: AtomicBool,
    /// hyper has written, or failed to write, bytes it has not flushed since.
    unflushed: AtomicBool,
}

impl Watch {
    pub(super) fn new(activity: Arc<Activity>, lane: &Lane) -> Arc<Watch> {
        Arc::new(Watch {
            activity,
            after_refusals: lane.after_refusals.get(),
            demoted: AtomicBool::new(false),
            unflushed: AtomicBool::new(false),
        })
    }

    /// Whether the connection can leave hyper now without losing anything: demoted, every
    /// answer flushed, no request in flight, and the last request without a body (hyper reads
    /// a body left unread to its end, or closes; the answer that demotes such a connection
    /// closes it: see [`close_instead_of_moving`]). What hyper read ahead is in its read
    /// buffer, which moves with the socket.
    pub(super) fn may_move(&self) -> bool {
        self.holds_reads() && !self.unflushed.load(Ordering::Relaxed)
    }

    fn holds_reads(&self) -> bool {
        self.demoted.load(Ordering::Relaxed)
            && self.activity.is_idle()
            && !self.activity.body_sent()
    }

    fn wrote(&self, written: &Poll<io::Result<usize>>) {
        self.unflushed.store(true, Ordering::Relaxed);
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0)
            && self.activity.refusals_in_a_row() >= self.after_refusals
        {
            self.demoted.store(true, Ordering::Relaxed);
        }
    }
}

/// A connection's socket as hyper reads and writes it: first the bytes read before hyper took
/// it; for HTTP/1, watched for demotion on the main runtime when there is a lane.
pub(super) struct Socket {
    stream: TcpStream,
    /// Read before the stream: the first bytes that told the protocol, or on the lane what the
    /// main runtime's hyper had buffered.
    unread: Bytes,
    watch: Option<Arc<Watch>>,
}

impl Socket {
    /// A new connection on the main runtime whose first bytes were `read` already, watched
    /// for demotion when there is a lane.
    pub(super) fn new(stream: TcpStream, read: Bytes, watch: Option<Arc<Watch>>) -> Socket {
        Socket {
            stream,
            unread: read,
            watch,
        }
    }

    fn resumed(stream: TcpStream, unread: Bytes) -> Socket {
        Socket {
            stream,
            unread,
            watch: None,
        }
    }

    /// The stream and what was read before it that hyper has not taken yet (nothing, once
    /// hyper has read a request: its first read takes far more than the protocol's bytes).
    pub(super) fn into_parts(self) -> (TcpStream, Bytes) {
        (self.stream, self.unread)
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.watch.as_ref().is_some_and(|w| w.holds_reads()) {
            // Between two requests of a demoted connection: the next one is read on the lane.
            // No waker is needed: the loop polling hyper moves the connection after this poll
            // (or, while an answer is unflushed, is woken by the socket becoming writable).
            return Poll::Pending;
        }
        if this.unread.has_remaining() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, data);
        if let Some(w) = &this.watch {
            w.wrote(&written);
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if let Some(w) = &this.watch {
            w.wrote(&written);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.stream).poll_flush(cx);
        if let (Some(w), Poll::Ready(Ok(()))) = (&this.watch, &flushed) {
            // hyper flushes the socket only once its own buffer is written out.
            w.unflushed.store(false, Ordering::Relaxed);
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
