//! The load: keep-alive clients sending `/verify` for valid, revoked and unknown tokens at a
//! steady pace, the shared clock and event log, and the final check after the run.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    CLIENT_TIMEOUT, Class, NO_ANSWER_IO, NO_ANSWER_TIMEOUT, PACE, REVOKED, Sample, Tokens, VALID,
    secs, support::*, truth::status_name,
};

/// xorshift64: enough randomness for picking tokens, no dependency on rand's API.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn hex64(&mut self) -> String {
        format!(
            "{:016x}{:016x}{:016x}{:016x}",
            self.next(),
            self.next(),
            self.next(),
            self.next()
        )
    }
}

/// Shared clock and event log.
#[derive(Clone)]
pub struct Clock {
    pub t0: Instant,
    pub events: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Clock {
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }
    pub fn log(&self, what: impl Into<String>) -> Duration {
        let at = self.now();
        let what = what.into();
        println!("[chaos {:>8}] {what}", secs(at));
        self.events.lock().unwrap().push((at, what));
        at
    }
    pub async fn at(&self, offset: Duration) {
        tokio::time::sleep_until((self.t0 + offset).into()).await;
    }
}

/// One load client: its own keep-alive connection, reconnecting after any error.
pub async fn client_task(
    id: usize,
    addr: SocketAddr,
    tokens: Arc<Tokens>,
    stop: Arc<AtomicBool>,
    clock: Clock,
) -> (Vec<Sample>, usize) {
    let mut rng = Rng::new(
        0x9E37_79B9_7F4A_7C15u64.wrapping_mul(id as u64 + 1)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
    );
    let mut conn: Option<Client> = None;
    let mut out = Vec::with_capacity(40_000);
    let mut connect_errors = 0;
    while !stop.load(Ordering::Relaxed) {
        let r = rng.below(100);
        let (class, idx, token) = if r < 60 {
            let i = rng.below(VALID);
            (Class::Valid, i, tokens.valid[i].token.clone())
        } else if r < 90 {
            let i = rng.below(REVOKED);
            (Class::Revoked, i, tokens.revoked[i].token.clone())
        } else {
            (Class::Unknown, 0, rng.hex64())
        };
        if conn.is_none() {
            match tokio::time::timeout(CLIENT_TIMEOUT, Client::connect(addr)).await {
                Ok(Ok(c)) => conn = Some(c),
                _ => {
                    connect_errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().unwrap();
        let auth = format!("Token {token}");
        let sent = clock.now();
        let res = tokio::time::timeout(CLIENT_TIMEOUT, c.get("/verify", Some(&auth))).await;
        let recv = clock.now();
        let status = match res {
            Ok(Ok(r)) => r.status,
            Ok(Err(_)) => NO_ANSWER_IO,
            Err(_) => NO_ANSWER_TIMEOUT,
        };
        if status <= NO_ANSWER_TIMEOUT || c.closed {
            conn = None;
        }
        out.push(Sample {
            class,
            idx: idx as u32,
            status,
            sent,
            recv,
        });
        tokio::time::sleep(PACE).await;
    }
    (out, connect_errors)
}

/// After the run: every valid token 200, every revoked token 401 (503s retried briefly).
pub async fn final_check(addr: SocketAddr, tokens: &Tokens) -> (usize, Vec<String>, usize) {
    let mut conn = Client::connect(addr).await.expect("connect");
    let mut failures = Vec::new();
    let mut retried = 0;
    let mut checked = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    let cases = tokens
        .valid
        .iter()
        .chain(&tokens.probes)
        .map(|t| (t, 200, "valid"))
        .chain(tokens.revoked.iter().map(|t| (t, 401, "revoked")));
    for (t, want, what) in cases {
        checked += 1;
        let auth = format!("Token {}", t.token);
        loop {
            let got = match tokio::time::timeout(CLIENT_TIMEOUT, conn.get("/verify", Some(&auth)))
                .await
            {
                Ok(Ok(r)) => r.status,
                _ => {
                    conn = Client::connect(addr).await.expect("reconnect");
                    NO_ANSWER_IO
                }
            };
            if conn.closed {
                conn = Client::connect(addr).await.expect("reconnect");
            }
            if got == want {
                break;
            }
            if (got == 503 || got == NO_ANSWER_IO) && Instant::now() < deadline {
                retried += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            failures.push(format!(
                "{what} token {}… answered {} (want {want})",
                &t.token[..15],
                status_name(got)
            ));
            break;
        }
    }
    (checked, failures, retried)
}
