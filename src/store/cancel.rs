//! Cancel requests sent as libpq sends them: the CancelRequest on a connection of its own, then
//! waiting for the server to close that connection, which it does once it has handled it.
//!
//! tokio-postgres's own `cancel_query` closes its side right after writing. Postgres does not
//! mind, but PgBouncer passes a cancel on to its server over a connection it opens then, and
//! (1.18 at least) drops the cancel when its client is gone before that: the statement then
//! runs on until `statement_timeout`.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::{CancelToken, NoTls, config::Host, tls::MakeTlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Where a connection of the pool may have been opened, and how to reach it again.
#[derive(Clone)]
pub struct Canceller {
    targets: Vec<Target>,
    tls: Option<MakeRustlsConnect>,
    /// Bound on one cancel request, connecting included (`postgres.connect_timeout`).
    within: Duration,
}

#[derive(Clone, Debug, PartialEq)]
enum Target {
    /// Host (or address) and port; the host name is also the one TLS checks.
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
            targets: targets(pg),
            tls,
            within,
        }
    }

    /// Asks the server to cancel what the connection of `token` is running. The URL may list
    /// several hosts and the pool does not say which one a connection reached: each is asked,
    /// and those that do not know the connection's key ignore the request. Best effort: how
    /// it went is logged at debug level, since the statement ends at its `statement_timeout`
    /// anyway.
    pub async fn cancel(&self, token: &CancelToken) {
        let sends = self.targets.iter().map(|target| async move {
            match tokio::time::timeout(self.within, self.send(target, token)).await {
                Ok(Ok(())) => tracing::debug!(?target, "cancel request handled"),
                Ok(Err(e)) => tracing::debug!(?target, error = %e, "cancel request failed"),
                Err(_) => tracing::debug!(
                    ?target,
                    "cancel request not handled within postgres.connect_timeout"
                ),
            }
        });
        futures_util::future::join_all(sends).await;
    }

    async fn send(&self, target: &Target, token: &CancelToken) -> io::Result<()> {
        match target {
            Target::Tcp {
                connect,
                name,
                port,
            } => {
                let stream = tokio::net::TcpStream::connect((connect.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                self.send_on(CloseWait(stream), name, token).await
            }
            #[cfg(unix)]
            Target::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await?;
                self.send_on(CloseWait(stream), "", token).await
            }
        }
    }

    async fn send_on<S>(&self, stream: S, name: &str, token: &CancelToken) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let sent = match &self.tls {
            Some(tls) => {
                let connect = MakeTlsConnect::<S>::make_tls_connect(&mut tls.clone(), name)
                    .map_err(io::Error::other)?;
                token.cancel_query_raw(stream, connect).await
            }
            None => token.cancel_query_raw(stream, NoTls).await,
        };
        sent.map_err(io::Error::other)
    }
}

/// Every place a connection made with `pg` may have reached, as tokio-postgres's own connect
/// works them out: `hostaddr` before `host`, one port for all hosts or one each, 5432 by
/// default.
fn targets(pg: &tokio_postgres::Config) -> Vec<Target> {
    let (hosts, addrs, ports) = (pg.get_hosts(), pg.get_hostaddrs(), pg.get_ports());
    (0..hosts.len().max(addrs.len()))
        .filter_map(|i| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match (hosts.get(i), addrs.get(i)) {
                #[cfg(unix)]
                (Some(Host::Unix(dir)), _) => {
                    Some(Target::Unix(dir.join(format!(".s.PGSQL.{port}"))))
                }
                (host, addr) => {
                    let name = match host {
                        Some(Host::Tcp(name)) => name.clone(),
                        _ => String::new(),
                    };
                    let connect = addr.map_or_else(|| name.clone(), ToString::to_string);
                    (!connect.is_empty()).then_some(Target::Tcp {
                        connect,
                        name,
                        port,
                    })
                }
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

    /// Reads (and discards) until the peer closes. A TLS layer above has sent its
    /// close_notify by now.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 64];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut self.0).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
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
    fn a_unix_socket_directory_names_its_socket_file() {
        assert_eq!(
            targets_of("host=/run/postgresql port=6432 user=u"),
            [Target::Unix("/run/postgresql/.s.PGSQL.6432".into())]
        );
    }
}
