//! Gray failures between knoxgate and a store: a store that answers, but slowly, or over a link
//! that loses packets.
//!
//! [`SlowProxy`] is a TCP proxy that delays what the server sends back. Each chunk is held for
//! the current delay from the moment it arrived, independently of the others (as `tc netem
//! delay` holds packets), so pipelined replies are not serialised behind each other. The delay
//! can be changed while connections are open; the proxy stops with its owner. It can also be
//! slow to connect only (a server far away, or busy authenticating): each new connection
//! reaches the server that much later, and is then as fast as the others.
//!
//! [`LossyLink`] is real packet loss: a network namespace with a veth pair into it, where an
//! nftables rule drops a random share of the packets crossing the pair, both ways; the proxy
//! listens inside the namespace, so knoxgate's connections to the store cross the lossy link and
//! TCP retransmits what is lost. [`LossyPath`] picks it where the machine allows it (root, `ip`
//! and `nft`, a kernel with nf_tables) and otherwise emulates what TCP makes of a lost segment
//! in the proxy: the chunk, and every chunk behind it on that connection, arrives one
//! retransmission timeout late (Linux's minimum, 200 ms).

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsFd,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};

/// What an emulated lost segment costs: Linux's minimum retransmission timeout.
const EMULATED_RETRANSMISSION: Duration = Duration::from_millis(200);

pub struct SlowProxy {
    pub port: u16,
    addr: SocketAddr,
    delay_us: Arc<AtomicU64>,
    /// Time before a new connection is passed on to the server.
    connect_delay_us: Arc<AtomicU64>,
    /// Emulated loss, in percent of chunks (each direction).
    loss_percent: Arc<AtomicU32>,
    accept: JoinHandle<()>,
}

impl SlowProxy {
    /// Starts forwarding 127.0.0.1:<port> to `target`, with no delay yet.
    pub async fn start(target: SocketAddr) -> SlowProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        SlowProxy::start_on(listener, target)
    }

    /// Starts forwarding what `listener` accepts to `target` (a listener made in another network
    /// namespace keeps accepting there, while the proxy's own connections are made here).
    pub fn start_on(listener: std::net::TcpListener, target: SocketAddr) -> SlowProxy {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let listener = TcpListener::from_std(listener).expect("listener");
        let addr = listener.local_addr().unwrap();
        let delay_us = Arc::new(AtomicU64::new(0));
        let connect_delay_us = Arc::new(AtomicU64::new(0));
        let loss_percent = Arc::new(AtomicU32::new(0));
        let (delay, loss) = (Arc::clone(&delay_us), Arc::clone(&loss_percent));
        let connect_delay = Arc::clone(&connect_delay_us);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (delay, loss) = (Arc::clone(&delay), Arc::clone(&loss));
                let wait = Duration::from_micros(connect_delay.load(Ordering::SeqCst));
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    if let Ok(server) = TcpStream::connect(target).await {
                        forward(client, server, delay, loss).await;
                    }
                });
            }
        });
        SlowProxy {
            port: addr.port(),
            addr,
            delay_us,
            connect_delay_us,
            loss_percent,
            accept,
        }
    }

    /// Every reply chunk from now on is held this long.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Connections accepted from now on reach the server this much later.
    pub fn set_connect_delay(&self, delay: Duration) {
        self.connect_delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// From now on this share of chunks (each way) is held back one retransmission timeout,
    /// with every chunk behind it on its connection: emulated packet loss.
    pub fn set_emulated_loss(&self, percent: u32) {
        self.loss_percent.store(percent.min(100), Ordering::SeqCst);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Both directions through [`pump`]: the delay applies to replies only, loss to both.
async fn forward(
    client: TcpStream,
    server: TcpStream,
    delay_us: Arc<AtomicU64>,
    loss: Arc<AtomicU32>,
) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let no_delay = Arc::new(AtomicU64::new(0));
    let upstream = tokio::spawn(pump(client_read, server_write, no_delay, Arc::clone(&loss)));
    pump(server_read, client_write, delay_us, loss).await;
    upstream.abort();
}

/// Copies `from` to `to`, each chunk written at its arrival plus the delay (plus a
/// retransmission timeout when it is "lost"), in order.
async fn pump(
    mut from: impl AsyncRead + Unpin + Send + 'static,
    mut to: impl AsyncWrite + Unpin,
    delay_us: Arc<AtomicU64>,
    loss: Arc<AtomicU32>,
) {
    let (held, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut dice = Dice::seeded();
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut delay = Duration::from_micros(delay_us.load(Ordering::SeqCst));
                    if dice.below(100) < loss.load(Ordering::SeqCst) {
                        delay += EMULATED_RETRANSMISSION;
                    }
                    if held
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    // In order: a chunk held back holds back those behind it, as TCP's in-order delivery does.
    while let Some((at, chunk)) = due.recv().await {
        tokio::time::sleep_until(at).await;
        if to.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    reader.abort();
}

/// xorshift64 for the loss dice: no dependency on a random crate's API.
struct Dice(u64);

impl Dice {
    fn seeded() -> Dice {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Dice(nanos | 1)
    }

    fn below(&mut self, n: u32) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x % u64::from(n)) as u32
    }
}

/// A network namespace joined to this one by a veth pair, with an nftables table in the
/// namespace that drops a chosen share of the packets crossing the pair. Removed (namespace,
/// pair and rules) on drop.
pub struct LossyLink {
    namespace: String,
    /// The namespace's end of the pair.
    pub inside: Ipv4Addr,
}

static LINKS: AtomicU32 = AtomicU32::new(0);

impl LossyLink {
    /// Creates the namespace, the pair and an empty loss table; `Err` says why this machine
    /// cannot (not root, no `ip` or `nft`, a kernel without namespaces or nf_tables).
    pub fn create() -> Result<LossyLink, String> {
        let pid = std::process::id();
        let n = LINKS.fetch_add(1, Ordering::SeqCst);
        // Names and a /30 unique to this process and link: parallel tests each get their own.
        let namespace = format!("knoxgate-loss-{pid}-{n}");
        let (outside_if, inside_if) = (
            format!("kgl{}o{}", pid % 100_000, n % 100),
            format!("kgl{}i{}", pid % 100_000, n % 100),
        );
        let net = [
            10,
            (100 + pid % 100) as u8,
            ((pid / 100) % 256) as u8,
            ((n % 64) * 4) as u8,
        ];
        let outside = Ipv4Addr::new(net[0], net[1], net[2], net[3] + 1);
        let inside = Ipv4Addr::new(net[0], net[1], net[2], net[3] + 2);
        run(&format!("ip netns add {namespace}"))?;
        let link = LossyLink { namespace, inside };
        let ns = &link.namespace;
        run(&format!(
            "ip link add {outside_if} type veth peer name {inside_if} netns {ns}"
        ))?;
        run(&format!("ip addr add {outside}/30 dev {outside_if}"))?;
        run(&format!("ip link set {outside_if} up"))?;
        run(&format!("ip -n {ns} addr add {inside}/30 dev {inside_if}"))?;
        run(&format!("ip -n {ns} link set {inside_if} up"))?;
        run(&format!("ip -n {ns} link set lo up"))?;
        link.nft(
            "add table inet loss\n\
             add chain inet loss input { type filter hook input priority 0; policy accept; }\n\
             add chain inet loss output { type filter hook output priority 0; policy accept; }\n",
        )?;
        Ok(link)
    }

    /// Drops `percent` % of the packets entering and of those leaving the namespace from now on
    /// (0: none).
    pub fn set_loss(&self, percent: u32) -> Result<(), String> {
        let mut script =
            String::from("flush chain inet loss input\nflush chain inet loss output\n");
        if percent > 0 {
            for chain in ["input", "output"] {
                script.push_str(&format!(
                    "add rule inet loss {chain} meta l4proto tcp numgen random mod 100 < {percent} drop\n"
                ));
            }
        }
        self.nft(&script)
    }

    /// A listener on the namespace's end of the pair: what connects to it crosses the link.
    pub fn listen(&self) -> Result<std::net::TcpListener, String> {
        let path = format!("/var/run/netns/{}", self.namespace);
        let inside = self.inside;
        // Only this short-lived thread enters the namespace; the socket it makes stays there.
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| format!("setns {path}: {e}"))?;
            std::net::TcpListener::bind((inside, 0)).map_err(|e| format!("bind {inside}: {e}"))
        })
        .join()
        .map_err(|_| "the namespace thread panicked".to_owned())?
    }

    fn nft(&self, script: &str) -> Result<(), String> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.namespace, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("ip netns exec nft: {e}"))?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .map_err(|e| format!("nft stdin: {e}"))?;
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft refused ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and so the pair and its rules.
        let _ = run(&format!("ip netns del {}", self.namespace));
    }
}

/// Runs a command line whose words contain no spaces.
fn run(command_line: &str) -> Result<(), String> {
    let mut words = command_line.split_whitespace();
    let out = Command::new(words.next().expect("a command"))
        .args(words)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command_line}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command_line}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The path from knoxgate to one store, with packet loss that can be turned on and off: real
/// loss on a [`LossyLink`] where the machine allows it, else emulated in the proxy.
pub struct LossyPath {
    pub proxy: SlowProxy,
    /// `None`: loss is emulated; [`LossyPath::how`] says why.
    link: Option<LossyLink>,
    why_emulated: String,
}

impl LossyPath {
    pub async fn start(target: SocketAddr) -> LossyPath {
        let real = LossyLink::create().and_then(|link| {
            let listener = link.listen()?;
            Ok((link, listener))
        });
        match real {
            Ok((link, listener)) => LossyPath {
                proxy: SlowProxy::start_on(listener, target),
                link: Some(link),
                why_emulated: String::new(),
            },
            Err(why) => LossyPath {
                proxy: SlowProxy::start(target).await,
                link: None,
                why_emulated: why,
            },
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.proxy.addr()
    }

    /// Real loss: the nftables rule; emulated: the proxy's dice.
    pub fn set_loss(&self, percent: u32) {
        match &self.link {
            Some(link) => link.set_loss(percent).expect("set the loss rule"),
            None => self.proxy.set_emulated_loss(percent),
        }
    }

    /// How the loss is made, for the test's output.
    pub fn how(&self) -> String {
        match &self.link {
            Some(_) => "real packet loss (nftables in a network namespace)".to_owned(),
            None => format!(
                "emulated loss in the proxy ({} retransmission per lost chunk; {})",
                EMULATED_RETRANSMISSION.as_millis(),
                self.why_emulated
            ),
        }
    }
}
