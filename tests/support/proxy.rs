//! A TCP proxy on a loopback port that delays what the server sends back, for gray failures: a
//! store that answers, but slowly. Each chunk is held for the current delay from the moment it
//! arrived, independently of the others (as `tc netem delay` holds packets), so pipelined
//! replies are not serialised behind each other. The delay can be changed while connections
//! are open; the proxy stops with its owner.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};

pub struct SlowProxy {
    pub port: u16,
    delay_us: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl SlowProxy {
    /// Starts forwarding 127.0.0.1:<port> to `target`, with no delay yet.
    pub async fn start(target: SocketAddr) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let delay_us = Arc::new(AtomicU64::new(0));
        let delay = Arc::clone(&delay_us);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let delay = Arc::clone(&delay);
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        forward(client, server, delay).await;
                    }
                });
            }
        });
        SlowProxy {
            port,
            delay_us,
            accept,
        }
    }

    /// Every reply chunk from now on is held this long.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Client → server as it comes; server → client, each chunk after the delay.
async fn forward(client: TcpStream, server: TcpStream, delay_us: Arc<AtomicU64>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    });
    let (held, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let delay = Duration::from_micros(delay_us.load(Ordering::SeqCst));
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
    while let Some((at, chunk)) = due.recv().await {
        tokio::time::sleep_until(at).await;
        if client_write.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = client_write.shutdown().await;
    reader.abort();
    upstream.abort();
}
