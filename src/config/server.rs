//! `[server]`: the listeners (main, admin, and the optional gRPC ext_authz one), the connection and request limits, and the deadlines every
//! request and connection shares.

use std::{
    net::SocketAddr,
    num::{NonZeroU32, NonZeroUsize},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    value::{self, invalid, nonzero, nonzero_at_most, positive, socket_addr},
};

const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9090";
const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
const DEFAULT_MAX_IN_FLIGHT: u64 = 2_048;
const DEFAULT_MAX_HEADER_BYTES: u64 = 16_384;
/// hyper refuses buffers under 8 KiB.
const MIN_MAX_HEADER_BYTES: u64 = 8_192;
/// The largest head knoxgate will buffer: far above what proxies send (nginx's largest
/// header buffers are 8 KiB by default), and within what HTTP/2's header-list limit can state.
const MAX_MAX_HEADER_BYTES: u64 = 1_048_576;
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_READINESS_INTERVAL: Duration = Duration::from_secs(1);
/// Well within the probe timeouts orchestrators use (Kubernetes' default is 1 s; the shipped
/// manifests use 2 s), so that a Postgres that does not answer fails the probe, not /readyz.
const DEFAULT_READINESS_TIMEOUT: Duration = Duration::from_millis(500);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A check request carries the client request's headers (Envoy's own cap on them defaults to
/// 60 KiB) and a few attributes; four times that is ample and still bounds what one decodes.
const DEFAULT_GRPC_MAX_MESSAGE_BYTES: u64 = 262_144;
/// The largest check request knoxgate will decode: gRPC's own default message limit. Each call
/// in flight may buffer this much, under `server.max_connections` times HTTP/2's streams.
const MAX_GRPC_MAX_MESSAGE_BYTES: u64 = 4_194_304;
/// Room kept between knoxgate's answer to a check and the caller's own deadline: Envoy beside
/// knoxgate (a sidecar, a node-local service) gets the answer back within a few milliseconds.
const DEFAULT_GRPC_DEADLINE_MARGIN: Duration = Duration::from_millis(50);
/// A client that presents 32 failing credentials in a row on one connection is not a user who
/// mistyped; a proxy's pooled connection that carries real users sees a 200 long before that.
const DEFAULT_DEMOTE_AFTER_REFUSALS: u64 = 32;
/// More threads than this (runtime workers, lane threads) serve nothing a core count would not.
const MAX_THREADS: u64 = 1_024;
/// A proxy multiplexes many clients' checks over one HTTP/2 connection (Envoy's gRPC
/// ext_authz opens one per worker thread): 256 at once per connection leaves room for bursts
/// while `server.max_in_flight` still bounds them all together.
const DEFAULT_HTTP2_MAX_STREAMS: u64 = 256;
/// More streams at once than HTTP/2 clients ask for: past this a connection is a flood.
const MAX_HTTP2_MAX_STREAMS: u64 = 65_536;
/// A peer that vanished without a reset (a node gone, a NAT entry dropped) is found within
/// interval + timeout rather than by `server.idle_timeout` alone.
const DEFAULT_HTTP2_PING_INTERVAL: Duration = Duration::from_secs(30);
/// hyper's own default.
const DEFAULT_HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// `[server]` as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerFile {
    pub listen: String,
    pub admin_listen: String,
    pub max_connections: u64,
    pub max_in_flight: u64,
    pub max_header_bytes: u64,
    #[serde(with = "value::duration")]
    pub header_read_timeout: Duration,
    #[serde(with = "value::duration")]
    pub idle_timeout: Duration,
    #[serde(with = "value::duration")]
    pub readiness_interval: Duration,
    #[serde(with = "value::duration")]
    pub readiness_timeout: Duration,
    #[serde(with = "value::duration")]
    pub request_timeout: Duration,
    #[serde(with = "value::duration")]
    pub shutdown_grace: Duration,
    /// Empty: no gRPC listener.
    pub grpc_listen: String,
    pub grpc_max_message_bytes: u64,
    #[serde(with = "value::duration")]
    pub grpc_deadline_margin: Duration,
    /// 0: never demote.
    pub demote_after_refusals: u64,
    /// 0: as many as the CPUs.
    pub demoted_threads: u64,
    /// 0: as many as the CPUs.
    pub worker_threads: u64,
    pub http2_max_streams: u64,
    /// 0: no pings.
    #[serde(with = "value::duration")]
    pub http2_ping_interval: Duration,
    #[serde(with = "value::duration")]
    pub http2_ping_timeout: Duration,
}

impl Default for ServerFile {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.into(),
            admin_listen: DEFAULT_ADMIN_LISTEN.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            readiness_interval: DEFAULT_READINESS_INTERVAL,
            readiness_timeout: DEFAULT_READINESS_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            grpc_listen: String::new(),
            grpc_max_message_bytes: DEFAULT_GRPC_MAX_MESSAGE_BYTES,
            grpc_deadline_margin: DEFAULT_GRPC_DEADLINE_MARGIN,
            demote_after_refusals: DEFAULT_DEMOTE_AFTER_REFUSALS,
            demoted_threads: 0,
            worker_threads: 0,
            http2_max_streams: DEFAULT_HTTP2_MAX_STREAMS,
            http2_ping_interval: DEFAULT_HTTP2_PING_INTERVAL,
            http2_ping_timeout: DEFAULT_HTTP2_PING_TIMEOUT,
        }
    }
}

/// The listeners and the limits and deadlines of serving.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Main listener: `/verify` and the session endpoints.
    pub listen: SocketAddr,
    /// Admin listener: `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// Connections beyond this are closed at accept.
    pub max_connections: NonZeroUsize,
    /// `/verify` requests and gRPC checks handled at once; beyond it they get 503 at once
    /// instead of queueing (session requests have `sessions.max_in_flight`).
    pub max_in_flight: NonZeroUsize,
    /// Cap on a request head (line + headers); larger heads get 431.
    pub max_header_bytes: usize,
    /// Time allowed for a request head to arrive, counted from the accept for a connection's
    /// first bytes (a connection that sends nothing is closed after it); also closes idle
    /// HTTP/1 keep-alive connections.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (gracefully: HTTP/2
    /// gets a GOAWAY). HTTP/2 peers that answer pings would otherwise stay open for ever.
    pub idle_timeout: Duration,
    /// `/readyz` reuses the last Postgres probe for this long; at most one probe runs at once.
    pub readiness_interval: Duration,
    /// How long `/readyz` waits for its Postgres probe; one unanswered by then counts as
    /// Postgres not answering.
    pub readiness_timeout: Duration,
    /// The whole budget of one request; past it the answer is 503.
    pub request_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Envoy ext_authz over gRPC (h2c), with the main listener's connection cap, in-flight cap,
    /// deadlines and drain; `None` when not configured.
    pub grpc_listen: Option<SocketAddr>,
    /// Largest check request decoded; a larger one is denied with 413, a denial Envoy answers
    /// as such whatever `failure_mode_allow` says.
    pub grpc_max_message_bytes: usize,
    /// A check whose caller sends a deadline (`grpc-timeout`, as Envoy does from its ext_authz
    /// `timeout`) is answered this long before it (at the latest at half of it), so that
    /// knoxgate's 503 reaches the caller instead of the caller's own timeout.
    pub grpc_deadline_margin: Duration,
    /// An HTTP/1 connection on the main listener whose last this many answers were all 401 is
    /// served by the demoted lane's threads (nice 19) until at least as many answers in a row
    /// were not 401; the lane's answer that sees it so closes the connection. `None`: never.
    pub demote_after_refusals: Option<NonZeroU32>,
    /// Threads of the demoted lane.
    pub demoted_threads: NonZeroUsize,
    /// Worker threads of the runtime that serves every listener. One per CPU by default; a
    /// sidecar that answers one pod's proxy can take one: at a few thousand requests a second
    /// each request wakes a thread, and with one thread no other is woken to look for work.
    pub worker_threads: NonZeroUsize,
    /// Requests (gRPC checks) one HTTP/2 connection may have open at once; the client is told
    /// in the connection's SETTINGS and a stream beyond it is refused.
    pub http2_max_streams: u32,
    /// An HTTP/2 connection is pinged this often (`None`: never) and closed when a ping is not
    /// answered within `http2_ping_timeout`.
    pub http2_ping_interval: Option<Duration>,
    pub http2_ping_timeout: Duration,
}

/// A thread count: `n`, or as many as the CPUs (as the process may use) for 0.
fn threads(key: &str, n: u64) -> Result<NonZeroUsize, ConfigError> {
    match n {
        0 => Ok(std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)),
        n if n > MAX_THREADS => Err(invalid(
            key,
            "must be at most 1024 (0: as many as the CPUs)",
        )),
        n => nonzero(key, n),
    }
}

/// Largest `server.max_connections` and `server.max_in_flight`: each is the size of a
/// `tokio::sync::Semaphore`, which panics above this.
pub const MAX_PERMITS: u64 = tokio::sync::Semaphore::MAX_PERMITS as u64;

/// Whether listening on `a` and on `b` at once would fail with "address in use": the same
/// port (not 0, which picks a free one) on the same address, or on the wildcard address of
/// either (`[::]` also takes IPv4, as IPV6_V6ONLY is not set).
fn listeners_clash(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let covers = |wild: SocketAddr, other: SocketAddr| match wild {
        SocketAddr::V6(w) => w.ip().is_unspecified(),
        SocketAddr::V4(w) => w.ip().is_unspecified() && other.is_ipv4(),
    };
    a.ip() == b.ip() || covers(a, b) || covers(b, a)
}

impl ServerConfig {
    /// The listeners must not take each other's address: serve would bind the first and fail
    /// on the next.
    fn check_listeners(&self) -> Result<(), ConfigError> {
        let mut named = vec![
            ("server.listen", self.listen),
            ("server.admin_listen", self.admin_listen),
        ];
        if let Some(grpc) = self.grpc_listen {
            named.push(("server.grpc_listen", grpc));
        }
        for (i, (key, addr)) in named.iter().enumerate() {
            if let Some((other, other_addr)) =
                named[..i].iter().find(|(_, o)| listeners_clash(*o, *addr))
            {
                return Err(invalid(
                    key,
                    format!(
                        "`{addr}` takes the port of {other} (`{other_addr}`): each listener \
                         needs its own port"
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl TryFrom<ServerFile> for ServerConfig {
    type Error = ConfigError;

    fn try_from(file: ServerFile) -> Result<Self, ConfigError> {
        let server = ServerConfig {
            listen: socket_addr("server.listen", &file.listen)?,
            admin_listen: socket_addr("server.admin_listen", &file.admin_listen)?,
            max_connections: nonzero_at_most(
                "server.max_connections",
                file.max_connections,
                MAX_PERMITS,
            )?,
            max_in_flight: nonzero_at_most(
                "server.max_in_flight",
                file.max_in_flight,
                MAX_PERMITS,
            )?,
            max_header_bytes: {
                if !(MIN_MAX_HEADER_BYTES..=MAX_MAX_HEADER_BYTES).contains(&file.max_header_bytes) {
                    return Err(invalid(
                        "server.max_header_bytes",
                        "must be between 8192 and 1048576 (1 MiB)",
                    ));
                }
                file.max_header_bytes as usize
            },
            header_read_timeout: positive("server.header_read_timeout", file.header_read_timeout)?,
            idle_timeout: positive("server.idle_timeout", file.idle_timeout)?,
            readiness_interval: file.readiness_interval,
            readiness_timeout: positive("server.readiness_timeout", file.readiness_timeout)?,
            request_timeout: positive("server.request_timeout", file.request_timeout)?,
            shutdown_grace: file.shutdown_grace,
            grpc_listen: match file.grpc_listen.trim() {
                "" => None,
                addr => Some(socket_addr("server.grpc_listen", addr)?),
            },
            grpc_max_message_bytes: {
                if !(MIN_MAX_HEADER_BYTES..=MAX_GRPC_MAX_MESSAGE_BYTES)
                    .contains(&file.grpc_max_message_bytes)
                {
                    return Err(invalid(
                        "server.grpc_max_message_bytes",
                        "must be between 8192 and 4194304 (4 MiB)",
                    ));
                }
                usize::try_from(file.grpc_max_message_bytes)
                    .map_err(|_| invalid("server.grpc_max_message_bytes", "too large"))?
            },
            grpc_deadline_margin: positive(
                "server.grpc_deadline_margin",
                file.grpc_deadline_margin,
            )?,
            demote_after_refusals: match u32::try_from(file.demote_after_refusals) {
                Ok(n) => NonZeroU32::new(n),
                Err(_) => {
                    return Err(invalid(
                        "server.demote_after_refusals",
                        "must be at most 4294967295 (0: never demote)",
                    ));
                }
            },
            demoted_threads: threads("server.demoted_threads", file.demoted_threads)?,
            worker_threads: threads("server.worker_threads", file.worker_threads)?,
            http2_max_streams: nonzero_at_most(
                "server.http2_max_streams",
                file.http2_max_streams,
                MAX_HTTP2_MAX_STREAMS,
            )?
            .get() as u32,
            http2_ping_interval: Some(file.http2_ping_interval).filter(|d| !d.is_zero()),
            http2_ping_timeout: positive("server.http2_ping_timeout", file.http2_ping_timeout)?,
        };
        server.check_listeners()?;
        Ok(server)
    }
}
