//! Cancel requests sent as libpq sends them: the CancelRequest on a connection of its own, then
//! waiting for the server to close that connection, which it does once it has handled it.
//!
//! tokio-postgres's own `cancel_query` closes its side right after writing (over TLS, with a
//! close_notify). Postgres does not mind, but PgBouncer passes a cancel on to its server over a
//! connection it opens then, and drops the cancel when its client is gone before that: the
//! statement then runs on until `statement_timeout`.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures_util::{TryFutureExt, future::MapOk};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_postgres::{
    CancelToken, NoTls,
    config::Host,
    tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream},
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Abandoned logins cancelled and rolled back at once, at most (a place is held from the cancel
/// request to the end of the ROLLBACK): when many logins give up together (Postgres slow for
/// everyone), each would otherwise add a connection, and a process, to the server that is slow
/// already. Beyond it, an abandoned login's connection is closed without a cancel, and its
/// statement runs on until `statement_timeout`.
const CANCELS_AT_ONCE: usize = 4;

/// Sends cancel requests to wherever the pool's connections may have been opened.
#[derive(Clone)]
pub struct Canceller {
    targets: Arc<[Target]>,
    tls: Option<MakeRustlsConnect>,
    /// Bound on one cancel request, connecting included (`postgres.connect_timeout`).
    within: Duration,
    in_flight: Arc<Semaphore>,
}

#[derive(Clone, Debug, PartialEq)]
enum Target {
    /// Host (or address) and port; the host name is the one TLS checks.
    Tcp {
        connect: String,
        name: String,
        port: u16,
    },
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

impl Canceller {
    pub fn new(
        pg: &tokio_postgres::Config,
        tls: Option<MakeRustlsConnect>,
        within: Duration,
    ) -> Canceller {
        Canceller {
            targets: targets(pg).into(),
            tls,
            within,
            in_flight: Arc::new(Semaphore::new(CANCELS_AT_ONCE)),
        }
    }

    /// A place among the cancel requests in flight, if one is free ([`CANCELS_AT_ONCE`]).
    pub fn place(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.in_flight).try_acquire_owned().ok()
    }

    /// Asks the server to cancel what the connection of `token` is running. The URL may list
    /// several hosts, and a name may resolve to several addresses; the pool does not say which
    /// one a connection reached, so each is asked, and those that do not know the
    /// connection's key ignore the request. All of it within `postgres.connect_timeout`. Best
    /// effort: how it went is logged at debug level, since the statement ends at its
    /// `statement_timeout` anyway.
    pub async fn cancel(&self, token: &CancelToken) {
        let deadline = Instant::now() + self.within;
        let sends = self.targets.iter().map(|target| async move {
            match self.send(target, token, deadline).await {
                Ok(()) => tracing::debug!(?target, "cancel request handled"),
                Err(e) => tracing::debug!(?target, error = %e, "cancel request failed"),
            }
        });
        futures_util::future::join_all(sends).await;
    }

    /// To every address of `target` until `deadline`; fine when one of them handled it.
    async fn send(
        &self,
        target: &Target,
        token: &CancelToken,
        deadline: Instant,
    ) -> io::Result<()> {
        match target {
            Target::Tcp {
                connect,
                name,
                port,
            } => {
                let addrs =
                    by(deadline, tokio::net::lookup_host((connect.as_str(), *port))).await?;
                any_handled(addrs.map(|addr| by(deadline, self.send_tcp(addr, name, token)))).await
            }
            #[cfg(unix)]
            Target::Unix(path) => {
                by(deadline, async {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    let sent = token.cancel_query_raw(CloseWait(stream), NoTls).await;
                    sent.map_err(io::Error::other)
                })
                .await
            }
        }
    }

    async fn send_tcp(&self, addr: SocketAddr, name: &str, token: &CancelToken) -> io::Result<()> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let sent = match &self.tls {
            // The wait sits above TLS: below it, the close_notify TLS sends on shutdown would
            // end the request as a close does.
            Some(tls) => {
                let connect = MakeTlsConnect::<TcpStream>::make_tls_connect(&mut tls.clone(), name)
                    .map_err(io::Error::other)?;
                token.cancel_query_raw(stream, WaitForClose(connect)).await
            }
            None => token.cancel_query_raw(CloseWait(stream), NoTls).await,
        };
        sent.map_err(io::Error::other)
    }
}

/// `work`, unless `deadline` passes first.
async fn by<T>(deadline: Instant, work: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    match tokio::time::timeout_at(deadline, work).await {
        Ok(done) => done,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "not handled within postgres.connect_timeout",
        )),
    }
}

/// Runs every send to its end, and is fine when one of them succeeded; otherwise the first
/// error. Not done at the first success: an address that does not know the key closes the
/// connection at once, while the one that does may hold it longer (PgBouncer, until it has
/// passed the cancel on to its server) and drops the cancel if its client leaves first.
async fn any_handled(
    sends: impl IntoIterator<Item = impl Future<Output = io::Result<()>>>,
) -> io::Result<()> {
    let results = futures_util::future::join_all(sends).await;
    if results.iter().any(Result::is_ok) {
        return Ok(());
    }
    match results.into_iter().find_map(Result::err) {
        Some(e) => Err(e),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the name resolved to no address",
        )),
    }
}

/// Every place a connection made with `pg` may have reached, as tokio-postgres's own connect
/// works them out: `hostaddr` (over TCP) before `host`, one port for all hosts or one each,
/// 5432 by default.
fn targets(pg: &tokio_postgres::Config) -> Vec<Target> {
    let (hosts, addrs, ports) = (pg.get_hosts(), pg.get_hostaddrs(), pg.get_ports());
    (0..hosts.len().max(addrs.len()))
        .filter_map(|i| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let name = match hosts.get(i) {
                Some(Host::Tcp(name)) => name.clone(),
                _ => String::new(),
            };
            match (hosts.get(i), addrs.get(i)) {
                (_, Some(addr)) => Some(Target::Tcp {
                    connect: addr.to_string(),
                    name,
                    port,
                }),
                #[cfg(unix)]
                (Some(Host::Unix(dir)), None) => {
                    Some(Target::Unix(dir.join(format!(".s.PGSQL.{port}"))))
                }
                (Some(Host::Tcp(host)), None) => Some(Target::Tcp {
                    connect: host.clone(),
                    name,
                    port,
                }),
                (None, None) => None,
            }
        })
        .collect()
}

/// A stream whose shutdown waits for the peer to close instead of closing: after its
/// CancelRequest, the cancel's connection stays open until the server is done with it.
struct CloseWait<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for CloseWait<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for CloseWait<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    /// Flushes, then reads (and discards) until the peer closes. A close without TLS's
    /// close_notify, or a reset, is a close too.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.0).poll_flush(cx))?;
        let mut scratch = [0u8; 64];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut self.0).poll_read(cx, &mut buf)) {
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Poll::Ready(Ok(()));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<S: TlsStream + Unpin> TlsStream for CloseWait<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.0.channel_binding()
    }
}

/// A TLS connector whose streams are [`CloseWait`]s.
struct WaitForClose<T>(T);

impl<S, T: TlsConnect<S>> TlsConnect<S> for WaitForClose<T> {
    type Stream = CloseWait<T::Stream>;
    type Error = T::Error;
    type Future = MapOk<T::Future, fn(T::Stream) -> CloseWait<T::Stream>>;

    fn connect(self, stream: S) -> Self::Future {
        self.0.connect(stream).map_ok(CloseWait as fn(_) -> _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets_of(url: &str) -> Vec<Target> {
        targets(&url.parse().expect("a valid URL"))
    }

    fn tcp(connect: &str, name: &str, port: u16) -> Target {
        Target::Tcp {
            connect: connect.into(),
            name: name.into(),
            port,
        }
    }

    #[test]
    fn every_host_of_the_url_is_a_target_with_its_port() {
        assert_eq!(
            targets_of("postgres://u@db.internal/app"),
            [tcp("db.internal", "db.internal", 5432)]
        );
        assert_eq!(
            targets_of("postgres://u@a:6432,b:6433/app"),
            [tcp("a", "a", 6432), tcp("b", "b", 6433)]
        );
        // One port for every host.
        assert_eq!(
            targets_of("host=a,b port=6432 user=u"),
            [tcp("a", "a", 6432), tcp("b", "b", 6432)]
        );
    }

    #[test]
    fn a_hostaddr_is_connected_to_and_the_host_name_kept_for_tls() {
        assert_eq!(
            targets_of("host=db.internal hostaddr=10.0.0.7 user=u"),
            [tcp("10.0.0.7", "db.internal", 5432)]
        );
        assert_eq!(
            targets_of("hostaddr=10.0.0.7 port=6432 user=u"),
            [tcp("10.0.0.7", "", 6432)]
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_hostaddr_wins_over_a_unix_socket_as_in_tokio_postgres() {
        assert_eq!(
            targets_of("host=/run/postgresql hostaddr=10.0.0.7 user=u"),
            [tcp("10.0.0.7", "", 5432)]
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_unix_socket_directory_names_its_socket_file() {
        assert_eq!(
            targets_of("host=/run/postgresql port=6432 user=u"),
            [Target::Unix("/run/postgresql/.s.PGSQL.6432".into())]
        );
    }

    /// The send that answers first does not end the others: the address that has the
    /// connection may be the slow one (PgBouncer passing the cancel on).
    #[tokio::test(start_paused = true)]
    async fn every_send_runs_to_its_end_though_another_answered_first() {
        let slow_done = std::sync::atomic::AtomicBool::new(false);
        let fast = async { Ok(()) };
        let slow = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            slow_done.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        };
        let sends: Vec<std::pin::Pin<Box<dyn Future<Output = io::Result<()>> + Send + '_>>> =
            vec![Box::pin(fast), Box::pin(slow)];
        any_handled(sends).await.expect("handled");
        assert!(slow_done.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn one_address_that_handled_it_is_enough() {
        let refused = async { Err(io::Error::from(io::ErrorKind::ConnectionRefused)) };
        let handled = async { Ok(()) };
        let sends: Vec<std::pin::Pin<Box<dyn Future<Output = io::Result<()>> + Send>>> =
            vec![Box::pin(refused), Box::pin(handled)];
        assert!(any_handled(sends).await.is_ok());
    }

    #[tokio::test]
    async fn no_address_that_handled_it_is_an_error() {
        let refused = async { Err(io::Error::from(io::ErrorKind::ConnectionRefused)) };
        let e = any_handled([refused]).await.expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        let none: [std::future::Ready<io::Result<()>>; 0] = [];
        let e = any_handled(none).await.expect_err("no address");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_still_running_at_the_deadline_has_timed_out() {
        let deadline = Instant::now() + Duration::from_secs(2);
        let silent = by(deadline, std::future::pending::<io::Result<()>>());
        let e = silent.await.expect_err("timed out");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
