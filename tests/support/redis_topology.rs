//! Replicated Redis for tests: a real Redis Cluster (masters with one replica each, made with
//! `redis-cli --cluster create`) and a real Sentinel deployment (a master, a replica, three
//! sentinels), each process on spare loopback ports with its files in a temp dir, killed, frozen
//! or resumed by PID, and every process SIGKILLed on drop. A missing redis-server or redis-cli
//! fails the test: `scripts/ensure-tools.sh` installs them.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{free_port, redis_cli};

/// One redis-server process (a cluster node, a Sentinel-managed server, or a sentinel).
pub struct RedisProcess {
    pub port: u16,
    child: Option<Child>,
}

impl RedisProcess {
    fn spawn(port: u16, args: &[String]) -> RedisProcess {
        let child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/ensure-tools.sh installs it)");
        RedisProcess {
            port,
            child: Some(child),
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL and reap: a crash, nothing flushed.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: connections are accepted by the kernel, nothing answers or replicates.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        super::signal_pid(self.child.as_ref().expect("running").id(), sig);
    }

    /// `redis-cli` against this process.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped process dies of SIGKILL too.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` distinct spare loopback ports. Cluster nodes get their bus port from here too
/// (`cluster-port`), since `port + 10000` may be taken or past 65535.
fn spare_ports(n: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < n {
        let p = free_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    ports
}

/// Polls a blocking check every 50 ms until it holds or `limit` passes.
fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The value of `field` in an `INFO`-style reply (`field:value` lines).
pub fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// A Redis Cluster on loopback: every node a master or a replica of one.
pub struct RedisCluster {
    pub nodes: Vec<RedisProcess>,
    dir: tempfile::TempDir,
}

/// A master's view in `CLUSTER NODES`: its port, its replicas' ports and the slots it owns.
#[derive(Debug, Clone)]
pub struct ClusterMaster {
    pub port: u16,
    pub replicas: Vec<u16>,
    /// Inclusive slot ranges.
    pub ranges: Vec<(u32, u32)>,
}

impl ClusterMaster {
    pub fn slots(&self) -> u32 {
        self.ranges.iter().map(|(a, b)| b - a + 1).sum()
    }
}

impl RedisCluster {
    /// `masters` masters with `replicas_per_master` replicas each, created with `redis-cli
    /// --cluster create`, returned once every node says `cluster_state:ok` and every replica is
    /// in sync. A node is declared failed after 1 s, so a failover takes a few seconds.
    pub async fn start(masters: usize, replicas_per_master: usize) -> RedisCluster {
        tokio::task::spawn_blocking(move || Self::start_blocking(masters, replicas_per_master))
            .await
            .expect("cluster start-up")
    }

    fn start_blocking(masters: usize, replicas_per_master: usize) -> RedisCluster {
        let count = masters * (1 + replicas_per_master);
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = spare_ports(count * 2);
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        for i in 0..count {
            let (port, bus) = (ports[2 * i], ports[2 * i + 1]);
            let args = node_args(port, cluster.dir.path())
                .into_iter()
                .chain(
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &format!("nodes-{port}.conf"),
                        "--cluster-port",
                        &bus.to_string(),
                        "--cluster-node-timeout",
                        "1000",
                        // A replica takes over however long its link was down.
                        "--cluster-replica-validity-factor",
                        "0",
                        // Keys on live masters stay served while one master's slots are
                        // uncovered (Redis's own default stops the whole cluster).
                        "--cluster-require-full-coverage",
                        "no",
                    ]
                    .map(String::from),
                )
                .collect::<Vec<_>>();
            cluster.nodes.push(RedisProcess::spawn(port, &args));
        }
        for n in &cluster.nodes {
            assert!(
                wait_for(Duration::from_secs(10), || n.cli(&["PING"]) == "PONG"),
                "cluster node {} did not start",
                n.port
            );
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args([
                "--cluster-replicas",
                &replicas_per_master.to_string(),
                "--cluster-yes",
            ])
            .output()
            .expect("redis-cli on PATH (scripts/ensure-tools.sh installs it)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_healthy(masters, Duration::from_secs(30));
        cluster
    }

    /// Waits until every running node says `cluster_state:ok`, `expected_masters` masters own
    /// all 16384 slots, and every replica's link to its master is up.
    fn wait_healthy(&self, expected_masters: usize, limit: Duration) {
        let healthy = wait_for(limit, || {
            let all_ok = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                info_field(&n.cli(&["CLUSTER", "INFO"]), "cluster_state").as_deref() == Some("ok")
            });
            let masters = self.masters();
            all_ok
                && masters.len() == expected_masters
                && masters.iter().map(|m| m.slots()).sum::<u32>() == 16384
                && masters.iter().flat_map(|m| &m.replicas).all(|&r| {
                    info_field(
                        &redis_cli(r, &["INFO", "replication"]),
                        "master_link_status",
                    )
                    .as_deref()
                        == Some("up")
                })
        });
        assert!(
            healthy,
            "redis cluster not healthy within {limit:?}: {}",
            self.any_running().cli(&["CLUSTER", "NODES"])
        );
    }

    fn any_running(&self) -> &RedisProcess {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a running node")
    }

    /// The masters that own slots, as a running node sees them (failed nodes left out).
    pub fn masters(&self) -> Vec<ClusterMaster> {
        let nodes = self.any_running().cli(&["CLUSTER", "NODES"]);
        let rows: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let port_of = |row: &[&str]| -> u16 {
            row[1]
                .split(['@', ','])
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .expect("node address")
        };
        rows.iter()
            .filter(|r| r.len() >= 8 && r[2].contains("master") && !r[2].contains("fail"))
            .map(|r| {
                // Slot ranges `a-b` or single slots; `[..]` entries are slots in migration.
                let ranges = r[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .map(|s| {
                        let (a, b) = s.split_once('-').unwrap_or((s, s));
                        (a.parse().expect("slot"), b.parse().expect("slot"))
                    })
                    .collect();
                let replicas = rows
                    .iter()
                    .filter(|o| o.len() >= 8 && o[3] == r[0] && !o[2].contains("fail"))
                    .map(|o| port_of(o))
                    .collect();
                ClusterMaster {
                    port: port_of(r),
                    replicas,
                    ranges,
                }
            })
            .filter(|m| m.slots() > 0)
            .collect()
    }

    /// The port of the master that owns `slot` now.
    pub fn owner_of_slot(&self, slot: u16) -> u16 {
        let slot = u32::from(slot);
        self.masters()
            .into_iter()
            .find(|m| m.ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|m| m.port)
            .expect("every slot has an owner")
    }

    /// The port of the master that owns `key` now.
    pub fn owner_of_key(&self, key: &str) -> u16 {
        self.owner_of_slot(fred::util::redis_keyslot(key.as_bytes()))
    }

    pub fn node(&mut self, port: u16) -> &mut RedisProcess {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node on that port")
    }

    /// Waits until `expected_masters` masters, none of them failed, cover every slot again
    /// (after a failover: a replica promoted in place of a dead master).
    pub async fn wait_covered(&self, expected_masters: usize, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let masters = self.masters();
            let ok = masters.len() == expected_masters
                && masters.iter().map(|m| m.slots()).sum::<u32>() == 16384
                && info_field(
                    &self.any_running().cli(&["CLUSTER", "INFO"]),
                    "cluster_state",
                )
                .as_deref()
                    == Some("ok");
            if ok {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The URL knoxgate is given: one seed node, the others as `node=` parameters.
    pub fn url(&self) -> String {
        let mut ports = self.nodes.iter().map(|n| n.port);
        let first = ports.next().expect("a node");
        let rest: Vec<String> = ports.map(|p| format!("node=127.0.0.1:{p}")).collect();
        format!("redis-cluster://127.0.0.1:{first}?{}", rest.join("&"))
    }
}

/// Arguments every private redis-server gets: loopback, no persistence, files in `dir`.
fn node_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir.to_str().expect("utf-8 temp dir"),
        "--protected-mode",
        "no",
    ]
    .map(String::from)
    .to_vec()
}

/// The service name the sentinels monitor.
pub const SENTINEL_SERVICE: &str = "mymaster";

/// A master, a replica and three sentinels (quorum 2) on loopback. A master is declared down
/// after 1 s, so a failover takes a few seconds.
pub struct RedisSentinel {
    /// The two data servers; which one is the master changes with failovers.
    pub servers: Vec<RedisProcess>,
    pub sentinels: Vec<RedisProcess>,
    dir: tempfile::TempDir,
}

impl RedisSentinel {
    pub async fn start() -> RedisSentinel {
        tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .expect("sentinel start-up")
    }

    fn start_blocking() -> RedisSentinel {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = spare_ports(5);
        let mut deployment = RedisSentinel {
            servers: Vec::new(),
            sentinels: Vec::new(),
            dir,
        };
        let master = ports[0];
        deployment.servers.push(RedisProcess::spawn(
            master,
            &node_args(master, deployment.dir.path()),
        ));
        let mut replica_args = node_args(ports[1], deployment.dir.path());
        replica_args.extend(["--replicaof".into(), "127.0.0.1".into(), master.to_string()]);
        deployment
            .servers
            .push(RedisProcess::spawn(ports[1], &replica_args));
        for s in &deployment.servers {
            assert!(
                wait_for(Duration::from_secs(10), || s.cli(&["PING"]) == "PONG"),
                "redis-server {} did not start",
                s.port
            );
        }
        assert!(
            wait_for(Duration::from_secs(10), || {
                info_field(
                    &redis_cli(ports[1], &["INFO", "replication"]),
                    "master_link_status",
                )
                .as_deref()
                    == Some("up")
            }),
            "replica did not sync"
        );
        for &port in &ports[2..] {
            // Sentinels rewrite their configuration file: one each, in the temp dir.
            let conf = deployment.dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n\
                     sentinel failover-timeout {SENTINEL_SERVICE} 4000\n\
                     sentinel parallel-syncs {SENTINEL_SERVICE} 1\n",
                    dir = deployment.dir.path().display()
                ),
            )
            .expect("sentinel config");
            let args = [
                conf.to_str().expect("utf-8").to_owned(),
                "--sentinel".into(),
            ];
            deployment.sentinels.push(RedisProcess::spawn(port, &args));
        }
        // Every sentinel knows the master, its replica and the two other sentinels.
        let seen = |s: &RedisProcess| {
            let master = s.cli(&["SENTINEL", "MASTER", SENTINEL_SERVICE]);
            let lines: Vec<&str> = master.lines().collect();
            let field = |name: &str| {
                lines
                    .iter()
                    .position(|l| *l == name)
                    .and_then(|i| lines.get(i + 1))
                    .map(|v| v.to_string())
            };
            (field("num-slaves"), field("num-other-sentinels"))
        };
        let known = wait_for(Duration::from_secs(45), || {
            deployment.sentinels.iter().all(|s| {
                let (replicas, others) = seen(s);
                replicas.as_deref() == Some("1") && others.as_deref() == Some("2")
            })
        });
        assert!(
            known,
            "sentinels did not discover the deployment within 45 s: (replicas, other sentinels) \
             seen by each: {:?}; the master's role: {:?}; the replica's link: {:?}",
            deployment.sentinels.iter().map(seen).collect::<Vec<_>>(),
            info_field(&redis_cli(ports[0], &["INFO", "replication"]), "role"),
            info_field(
                &redis_cli(ports[1], &["INFO", "replication"]),
                "master_link_status"
            ),
        );
        deployment
    }

    /// The port the sentinels name as master now (asked of the first sentinel that answers).
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels
            .iter()
            .filter(|s| s.is_running())
            .find_map(|s| {
                let reply = s.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE]);
                reply.lines().nth(1)?.trim().parse().ok()
            })
    }

    pub fn server(&mut self, port: u16) -> &mut RedisProcess {
        self.servers
            .iter_mut()
            .find(|s| s.port == port)
            .expect("a server on that port")
    }

    /// The data server that is not on `port`.
    pub fn other_than(&self, port: u16) -> u16 {
        self.servers
            .iter()
            .map(|s| s.port)
            .find(|&p| p != port)
            .expect("two servers")
    }

    /// Waits until every running sentinel names a master other than `old` and that server
    /// answers as a master; returns how long it took.
    pub async fn wait_promoted(&self, old: u16, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let names: Vec<Option<u16>> = self
                .sentinels
                .iter()
                .filter(|s| s.is_running())
                .map(|s| {
                    let reply = s.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE]);
                    reply.lines().nth(1)?.trim().parse().ok()
                })
                .collect();
            if let Some(Some(new)) = names.first()
                && *new != old
                && names.iter().all(|n| *n == Some(*new))
                && info_field(&redis_cli(*new, &["INFO", "replication"]), "role").as_deref()
                    == Some("master")
            {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The URL knoxgate is given: every sentinel, and the service name.
    pub fn url(&self) -> String {
        let mut ports = self.sentinels.iter().map(|s| s.port);
        let first = ports.next().expect("a sentinel");
        let rest: String = ports.map(|p| format!("&node=127.0.0.1:{p}")).collect();
        format!("redis-sentinel://127.0.0.1:{first}/0?sentinelServiceName={SENTINEL_SERVICE}{rest}")
    }
}

/// How long after its revocation a token may still be answered 200 under load: the change
/// feed's delivery, generously (its p99 is well under 100 ms; the CI machine is loaded).
pub const REVOCATION_BOUND: Duration = Duration::from_secs(2);

/// What a [`VerifyLoad`] saw, every answer checked against the truth in Postgres.
#[derive(Default, Debug)]
pub struct LoadTally {
    pub valid_ok: u64,
    pub revoked_refused: u64,
    /// 200 for a token revoked less than [`REVOCATION_BOUND`] ago (allowed).
    pub revoked_ok_within_bound: u64,
    /// 5xx answers, and when the first and last came.
    pub server_errors: u64,
    pub first_error: Option<Instant>,
    pub last_error: Option<Instant>,
    /// A valid token refused, a revoked one allowed after the bound, any other status.
    pub wrong: Vec<String>,
}

/// Clients verifying a cycle of tokens against one instance until stopped. A token counts as
/// revoked from the moment [`revoke`](Self::revoke) is called, before the row is deleted.
pub struct VerifyLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub tally: std::sync::Arc<std::sync::Mutex<LoadTally>>,
    revoked_at: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
}

impl VerifyLoad {
    /// `clients` concurrent clients over `tokens`; those in `revoked` count as revoked already.
    pub fn start(
        addr: std::net::SocketAddr,
        clients: usize,
        tokens: Vec<String>,
        revoked: &[String],
    ) -> VerifyLoad {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let long_ago = Instant::now() - REVOCATION_BOUND * 2;
        let revoked_at = Arc::new(Mutex::new(
            revoked
                .iter()
                .map(|t| (t.clone(), long_ago))
                .collect::<std::collections::HashMap<String, Instant>>(),
        ));
        let tally = Arc::new(Mutex::new(LoadTally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tokens = Arc::new(tokens);
        let tasks = (0..clients)
            .map(|c| {
                let (tokens, tally, stop, revoked_at) = (
                    Arc::clone(&tokens),
                    Arc::clone(&tally),
                    Arc::clone(&stop),
                    Arc::clone(&revoked_at),
                );
                tokio::spawn(async move {
                    let mut n = c * 7;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        n += 1;
                        let token = &tokens[n % tokens.len()];
                        let status = super::http(
                            addr,
                            "GET",
                            "/verify",
                            &[("Authorization", &format!("Token {token}"))],
                            b"",
                        )
                        .await
                        .status;
                        let now = Instant::now();
                        let revoked_since = revoked_at.lock().unwrap().get(token).copied();
                        // A block, not drop(): the guard must not be held across the await.
                        {
                            let mut k = tally.lock().unwrap();
                            match (revoked_since, status) {
                                (None, 200) => k.valid_ok += 1,
                                (Some(_), 401) => k.revoked_refused += 1,
                                (Some(at), 200) if now - at <= REVOCATION_BOUND => {
                                    k.revoked_ok_within_bound += 1
                                }
                                (_, s) if s >= 500 => {
                                    k.server_errors += 1;
                                    k.first_error.get_or_insert(now);
                                    k.last_error = Some(now);
                                }
                                (revoked, s) => k.wrong.push(format!(
                                    "token {}: status {s}, revoked {:?} before",
                                    &token[..8],
                                    revoked.map(|at| now - at)
                                )),
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        VerifyLoad {
            stop,
            tasks,
            tally,
            revoked_at,
        }
    }

    /// From now on `token` is revoked: a 200 for it is wrong once the bound has passed.
    pub fn revoke(&self, token: &str) {
        self.revoked_at
            .lock()
            .unwrap()
            .insert(token.to_owned(), Instant::now());
    }

    /// Stops the clients and returns what they saw.
    pub async fn finish(self) -> LoadTally {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load client");
        }
        std::mem::take(&mut *self.tally.lock().unwrap())
    }
}

/// An instance under `prefix` on the Redis deployment at `url`, without an in-process tier, so
/// that its answers come from Redis or Postgres.
pub async fn instance(db: &super::TestDb, prefix: &str, url: &str) -> super::TestServer {
    super::TestServer::start_with_prefix(
        db,
        prefix,
        &format!("[redis]\nurl = \"{url}\"\n[cache]\nmemory_max_bytes = 1"),
    )
    .await
}

/// The Redis key of `token`'s entry under `prefix`.
pub fn entry_key(prefix: &str, token: &str) -> String {
    format!("{prefix}:token:{}", knoxgate::auth::token_key_of(token))
}

/// `n` users named `name0`, `name1`, ..., with one token each.
pub async fn tokens(db: &super::TestDb, name: &str, n: usize) -> Vec<String> {
    let client = db.client().await;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = super::insert_user(&client, &format!("{name}{i}"), "pw", true).await;
        out.push(super::insert_default_token(&client, id).await.token);
    }
    out
}
