//! The change feed through Redis (`cache.feed = "redis"`): `knoxgate relay` processes (the real
//! binary, killed and restarted) republish what Postgres reports; instances read the stream and
//! hold no Postgres connection for it. Every revocation must reach every instance across a relay
//! crash, all relays gone, a Redis restart and a subscriber's dropped connection.

use std::time::Duration;

use crate::support::*;

/// The bound the tests hold propagation to (the feed's own latency is far below it).
const BOUND: Duration = Duration::from_secs(3);

/// Heartbeats and the relay timeout, short so that the tests see state changes quickly.
const FEED: &str = r#"
[cache]
feed = "redis"
feed_heartbeat_interval = "200ms"
feed_relay_timeout = "800ms"
"#;

fn relay(db: &TestDb, redis: &PrivateRedis, prefix: &str) -> Binary {
    relay_on(db, &redis.url(), prefix)
}

fn relay_on(db: &TestDb, redis_url: &str, prefix: &str) -> Binary {
    relay_with(db, redis_url, prefix, &[])
}

/// A relay with the tests' short intervals, and `overrides` (set after them, so they win).
fn relay_with(
    db: &TestDb,
    redis_url: &str,
    prefix: &str,
    overrides: &[(&'static str, String)],
) -> Binary {
    let env = [
        ("KNOXGATE_CACHE_FEED_HEALTH_INTERVAL", "200ms".into()),
        ("KNOXGATE_CACHE_FEED_RECONNECT_DELAY", "100ms".into()),
    ];
    spawn_on("relay", db, redis_url, prefix, &[&env, overrides].concat())
}

/// `knoxgate <command>` on the Redis at `redis_url` under `prefix`, with the tests' short
/// heartbeat interval, relay timeout and reconnection delay, then `env` (later values win).
fn spawn_on(
    command: &str,
    db: &TestDb,
    redis_url: &str,
    prefix: &str,
    env: &[(&'static str, String)],
) -> Binary {
    let mut all = vec![
        ("KNOXGATE_REDIS_URL", redis_url.to_owned()),
        ("KNOXGATE_REDIS_KEY_PREFIX", prefix.to_owned()),
        ("KNOXGATE_REDIS_RECONNECT_MAX_DELAY", "200ms".into()),
        ("KNOXGATE_CACHE_FEED_HEARTBEAT_INTERVAL", "200ms".into()),
        ("KNOXGATE_CACHE_FEED_RELAY_TIMEOUT", "800ms".into()),
    ];
    all.extend_from_slice(env);
    Binary::spawn_command(command, &db.url, &all)
}

/// A relay whose listener connection (`postgres.feed_url`) goes through a [`SlowProxy`], which
/// the test can slow down; its pool reaches Postgres directly.
async fn relay_with_slow_listener(
    db: &TestDb,
    redis: &PrivateRedis,
    prefix: &str,
    overrides: &[(&'static str, String)],
) -> (Binary, SlowProxy) {
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let feed_url = db.url.replace("127.0.0.1:5432", &proxy.addr().to_string());
    let mut env = vec![("KNOXGATE_POSTGRES_FEED_URL", feed_url)];
    env.extend_from_slice(overrides);
    (relay_with(db, &redis.url(), prefix, &env), proxy)
}

async fn readyz_of(admin: std::net::SocketAddr) -> (u16, String) {
    let r = http(admin, "GET", "/readyz", &[], b"").await;
    (r.status, r.body_text())
}

/// Until `/readyz` answers 200 with the feed live (a relay: its own Postgres feed; an
/// instance: the stream read and a relay's heartbeat seen).
async fn ready_within(admin: std::net::SocketAddr, limit: Duration) -> bool {
    wait_accepting(admin.port(), limit).await
        && eventually(limit, || async move {
            let (status, body) = readyz_of(admin).await;
            status == 200 && body.contains("\"feed\":\"live\"")
        })
        .await
        .is_some()
}

/// Fails the test, with the process's log, unless it answers `/readyz` 200 within `limit`.
async fn assert_ready(process: &Binary, limit: Duration) {
    assert!(
        ready_within(process.admin, limit).await,
        "not ready: {}",
        process.log()
    );
}

async fn instance(db: &TestDb, redis: &PrivateRedis, prefix: &str) -> TestServer {
    instance_on(db, &redis.url(), prefix).await
}

async fn instance_on(db: &TestDb, redis_url: &str, prefix: &str) -> TestServer {
    let extra = format!("[redis]\nurl = \"{redis_url}\"\nreconnect_max_delay = \"200ms\"\n{FEED}");
    TestServer::start_with_prefix(db, prefix, &extra).await
}

/// An instance in a process of its own (so that it can be stopped while the stream changes
/// under it), with the tests' short intervals and `overrides` (set after them, so they win).
fn instance_process(
    db: &TestDb,
    redis_url: &str,
    prefix: &str,
    overrides: &[(&'static str, String)],
) -> Binary {
    let feed = [("KNOXGATE_CACHE_FEED", "redis".into())];
    spawn_on("serve", db, redis_url, prefix, &[&feed, overrides].concat())
}

async fn revoke(db: &TestDb, token: &Token) {
    db.client()
        .await
        .execute(
            "DELETE FROM knox_authtoken WHERE digest = $1",
            &[&token.digest],
        )
        .await
        .unwrap();
}

async fn refused_by_all(servers: &[&TestServer], token: &Token) -> bool {
    for s in servers {
        let refused = eventually(BOUND, || async {
            s.verify(&token.token).await.status == 401
        })
        .await;
        if refused.is_none() {
            return false;
        }
    }
    true
}

async fn cached_on_all(servers: &[&TestServer], tokens: &[&Token]) {
    for s in servers {
        for t in tokens {
            assert_eq!(s.verify(&t.token).await.status, 200);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocations_reach_every_instance_through_relays_that_crash_and_return() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let prefix = unique("kgrelay");
    let relay_a = relay(&db, &redis, &prefix);
    let relay_b = relay(&db, &redis, &prefix);
    for r in [&relay_a, &relay_b] {
        assert_ready(r, Duration::from_secs(10)).await;
    }
    let a = instance(&db, &redis, &prefix).await;
    let b = instance(&db, &redis, &prefix).await;
    let tokens = [
        user_with_token(&db, "r1").await,
        user_with_token(&db, "r2").await,
        user_with_token(&db, "r3").await,
        user_with_token(&db, "r4").await,
    ];
    let keep = user_with_token(&db, "keep").await;
    let all: Vec<&Token> = tokens.iter().chain([&keep]).collect();
    cached_on_all(&[&a, &b], &all).await;

    // The fleet's Postgres connections for the feed: one per relay, none per instance.
    let admin = connect(crate::support::PG_ADMIN).await;
    assert_eq!(backends(&admin, &db.name, "knoxgate-feed").await, 2);

    // Cached hits cost no SQL: the stream is what keeps them fresh. (A heartbeat later than
    // feed_relay_timeout on a loaded machine makes the stream not live for a moment, and then a
    // hit is rightly confirmed, or the key filter reloaded: a hit is looked for that cost none.)
    let free_hit = eventually(Duration::from_secs(5), || async {
        let sql = a.metric("knoxgate_sql_statements_total").await;
        assert_eq!(a.verify(&keep.token).await.status, 200);
        a.metric("knoxgate_sql_statements_total").await == sql
    })
    .await;
    assert!(free_hit.is_some(), "every cached hit cost SQL for 5 s");

    const DELS: &str = "knoxgate_redis_commands_total{op=\"del\"}";
    const REDIS_READS: [&str; 2] = [
        "knoxgate_cache_lookups_total{tier=\"redis\",result=\"hit\"}",
        "knoxgate_redis_errors_total{op=\"del\"}",
    ];
    let dels = [a.metric(DELS).await, b.metric(DELS).await];
    let mut reads = Vec::new();
    for s in [&a, &b] {
        reads.push(s.metric(REDIS_READS[0]).await + s.metric(REDIS_READS[1]).await);
    }
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    revoke(&db, &tokens[0]).await;
    assert!(
        refused_by_all(&[&a, &b], &tokens[0]).await,
        "both relays up"
    );
    // A relay's DEL that failed (a command timeout on a loaded machine) is queued for retry
    // while the change goes out; an instance that then finds the entry, tombstoned, repairs
    // it with a DEL of its own, as it does when its own read of the entry raced the relay's
    // DEL, and it retries a DEL of its own that failed. Only then may its DELs move.
    let mut relay_del_failures = 0.0;
    for r in [&relay_a, &relay_b] {
        relay_del_failures += metric(r.admin, "knoxgate_redis_errors_total{op=\"del\"}").await;
    }
    for ((s, dels), reads) in [&a, &b].into_iter().zip(dels).zip(reads) {
        // The relays evicted the Redis entry before appending the change: the instances do
        // not repeat that DEL, one per instance.
        let read_redis = s.metric(REDIS_READS[0]).await + s.metric(REDIS_READS[1]).await > reads;
        if relay_del_failures == 0.0 && !read_redis {
            assert_eq!(s.metric(DELS).await, dels);
        }
        let applied = s
            .metric("knoxgate_feed_last_change_timestamp_seconds")
            .await;
        assert!(
            applied > before && applied < before + BOUND.as_secs_f64(),
            "the revocation's arrival was stamped at {applied} (deleted after {before})"
        );
    }
    assert_eq!(
        redis_cli(
            redis.port,
            &[
                "EXISTS",
                &format!("{prefix}:token:{}", &tokens[0].token[..15])
            ]
        ),
        "0",
        "the relays evicted the entry"
    );

    // One relay crashes: the other carries every change.
    relay_a.kill().await;
    revoke(&db, &tokens[1]).await;
    assert!(
        refused_by_all(&[&a, &b], &tokens[1]).await,
        "one relay left"
    );
    assert!(
        a.readyz().await.contains("\"feed\":\"live\""),
        "{}",
        a.readyz().await
    );

    // Every relay gone: past the relay timeout the instances say so and confirm with Postgres
    // (still ready, as with a Postgres feed that is down: the answers stay right).
    relay_b.kill().await;
    for s in [&a, &b] {
        let down = eventually(Duration::from_secs(3), || async {
            readyz_of(s.admin()).await.1.contains("\"feed\":\"down\"")
        })
        .await;
        assert!(
            down.is_some(),
            "still live with no relay: {}",
            s.readyz().await
        );
        assert_eq!(s.metric("knoxgate_feed_connected").await, 0.0);
    }
    revoke(&db, &tokens[2]).await;
    assert!(
        refused_by_all(&[&a, &b], &tokens[2]).await,
        "confirmed with postgres"
    );

    // A relay returns: the instances are live again and hear the next change.
    let relay_c = relay(&db, &redis, &prefix);
    for s in [&a, &b] {
        assert!(
            ready_within(s.admin(), Duration::from_secs(10)).await,
            "not live again: {} / relay: {}",
            s.readyz().await,
            relay_c.log()
        );
    }
    cached_on_all(&[&a, &b], &[&tokens[3], &keep]).await;
    revoke(&db, &tokens[3]).await;
    assert!(
        refused_by_all(&[&a, &b], &tokens[3]).await,
        "after the return"
    );

    // No valid token was refused on the way, and no revoked one came back.
    for s in [&a, &b] {
        assert_eq!(s.verify(&keep.token).await.status, 200);
        for t in &tokens {
            assert_eq!(s.verify(&t.token).await.status, 401);
        }
    }
    a.stop().await;
    b.stop().await;
    relay_c.terminate().await;
}

/// The ids of the clients blocked in XREAD: the instances' stream readers.
fn stream_readers(redis: &PrivateRedis) -> Vec<String> {
    redis_cli(redis.port, &["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains("cmd=xread"))
        .filter_map(|l| {
            l.split_whitespace()
                .next()?
                .strip_prefix("id=")
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_and_a_dropped_reader_lose_no_revocation() {
    let db = TestDb::migrated().await;
    let mut redis = PrivateRedis::start().await;
    let prefix = unique("kgrelay");
    let relay = relay(&db, &redis, &prefix);
    assert_ready(&relay, Duration::from_secs(10)).await;
    let a = instance(&db, &redis, &prefix).await;
    let b = instance(&db, &redis, &prefix).await;
    let during_restart = user_with_token(&db, "restart").await;
    let during_drop = user_with_token(&db, "dropped").await;
    let keep = user_with_token(&db, "keep").await;
    cached_on_all(&[&a, &b], &[&during_restart, &during_drop, &keep]).await;

    // Redis restarts empty (no persistence): the stream and its ids are gone. A revocation made
    // meanwhile must still reach both instances' in-process tiers. They are not asked about it
    // until they are live again: a lookup while not live would confirm with Postgres and hide
    // a lost event.
    redis.kill();
    revoke(&db, &during_restart).await;
    redis.restart().await;
    for s in [&a, &b] {
        assert!(
            ready_within(s.admin(), Duration::from_secs(15)).await,
            "not live after the restart: {} / relay: {}",
            s.readyz().await,
            relay.log()
        );
    }
    for s in [&a, &b] {
        assert_eq!(s.verify(&during_restart.token).await.status, 401);
    }

    // A reader's connection is dropped while a revocation is made: it resumes from the last
    // entry it read and applies what it missed.
    cached_on_all(&[&a, &b], &[&during_drop, &keep]).await;
    let readers = eventually(Duration::from_secs(3), || async {
        stream_readers(&redis).len() >= 2
    })
    .await;
    assert!(
        readers.is_some(),
        "{}",
        redis_cli(redis.port, &["CLIENT", "LIST"])
    );
    for id in stream_readers(&redis) {
        redis_cli(redis.port, &["CLIENT", "KILL", "ID", &id]);
    }
    revoke(&db, &during_drop).await;
    for s in [&a, &b] {
        assert!(ready_within(s.admin(), Duration::from_secs(10)).await);
        let refused = eventually(BOUND, || async {
            s.verify(&during_drop.token).await.status == 401
        })
        .await;
        assert!(
            refused.is_some(),
            "a revocation lost across a dropped reader"
        );
        assert_eq!(s.verify(&keep.token).await.status, 200);
    }
    a.stop().await;
    b.stop().await;
    relay.terminate().await;
}

/// A relay and an instance under `prefix` on the Redis at `redis_url`, once the instance
/// hears the relay.
async fn relay_and_instance(db: &TestDb, redis_url: &str, prefix: &str) -> (Binary, TestServer) {
    let relayed = relay_on(db, redis_url, prefix);
    let a = instance_on(db, redis_url, prefix).await;
    assert!(
        ready_within(a.admin(), Duration::from_secs(20)).await,
        "the instance never heard the relay on {redis_url}: {:?}",
        readyz_of(a.admin()).await
    );
    (relayed, a)
}

/// A relay and an instance on a replicated Redis deployment: the instance hears the relay
/// (feed live) and a raw-SQL revocation reaches it through the stream.
async fn relayed_revocation_on(redis_url: &str) {
    let db = TestDb::migrated().await;
    let (relayed, a) = relay_and_instance(&db, redis_url, &unique("kgrelayha")).await;
    let token = user_with_token(&db, "relayed").await;
    let bystander = user_with_token(&db, "bystander").await;
    cached_on_all(&[&a], &[&token, &bystander]).await;
    revoke(&db, &token).await;
    assert!(
        refused_by_all(&[&a], &token).await,
        "a revocation did not reach the instance through the relay on {redis_url}"
    );
    assert_eq!(a.verify(&bystander.token).await.status, 200);
    relayed.kill().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_work_on_a_sentinel_deployment() {
    let deployment = RedisSentinel::start().await;
    relayed_revocation_on(&deployment.url()).await;
}

/// Replication is asynchronous, so a failover can lose stream entries Redis acknowledged. An
/// instance whose last entry read survived goes on from it, past the lost ones; the relay's next
/// append (a heartbeat here) finds its previous one gone, and the relay replays the revocation
/// log before it vouches for the stream again, so they reach the instance anyway. The relay's
/// appends wait out the failover here (a long command timeout), as they do wherever a failover
/// is quicker than the timeout: none fails, so only the check tells.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_a_redis_failover_loses_from_the_stream_is_appended_again() {
    let db = TestDb::migrated().await;
    let mut deployment = RedisSentinel::start().await;
    let url = deployment.url();
    let prefix = unique("kgfolost");
    let stream = format!("{prefix}:knoxgate:feed");
    let relayed = relay_with(
        &db,
        &url,
        &prefix,
        &[("KNOXGATE_REDIS_COMMAND_TIMEOUT", "60s".into())],
    );
    let b = instance_process(&db, &url, &prefix, &[]);
    assert_ready(&b, Duration::from_secs(30)).await;
    let revoked = user_with_token(&db, "failover-lost").await;
    let kept = user_with_token(&db, "failover-kept").await;
    for t in [&revoked, &kept] {
        assert_eq!(b.verify(&t.token).await.status, 200);
    }

    // The instance stops reading; the replica gets every entry it has read.
    b.pause();
    let master = deployment.master_port().expect("a master");
    let replica = deployment.other_than(master);
    let newest = redis_cli(master, &["XREVRANGE", &stream, "+", "-", "COUNT", "1"]);
    let newest = newest
        .lines()
        .next()
        .expect("heartbeats on the stream")
        .to_owned();
    let synced = eventually(Duration::from_secs(10), || async {
        !redis_cli(replica, &["XRANGE", &stream, &newest, &newest]).is_empty()
    })
    .await;
    assert!(synced.is_some(), "the replica never got entry {newest}");

    let entries = |port: u16, kind: &str| {
        redis_cli(port, &["XRANGE", &stream, "-", "+"])
            .lines()
            .filter(|l| l.starts_with(kind))
            .count()
    };
    let revocations = |port: u16| entries(port, "t|");
    let inserts = entries(replica, "i|");
    assert!(inserts > 0, "the tokens' INSERTs were appended when heard");

    // From now on only the master gets what the relay appends: the revocation among it.
    deployment.server(replica).pause();
    redis_cli(master, &["CLIENT", "KILL", "TYPE", "replica"]);
    revoke(&db, &revoked).await;
    let appended = eventually(BOUND, || async { revocations(master) > 0 }).await;
    assert!(
        appended.is_some(),
        "the relay never appended the revocation"
    );

    // The master dies with it; the replica is promoted without it.
    deployment.server(master).kill();
    deployment.server(replica).resume();
    assert_eq!(revocations(replica), 0, "the replica should have missed it");
    deployment
        .wait_promoted(master, Duration::from_secs(40))
        .await
        .expect("the sentinels promoted the replica");

    // Once it has read the relay's heartbeats from the new master it counts its feed live
    // again, and from then on trusts what it holds: the revocation must have reached it. No
    // request for the token before that: one answered while the feed is down is confirmed with
    // Postgres (and evicted) whatever the stream held. Right after SIGCONT its feed state is the
    // one from before the stop, so it is given longer than the relay timeout to notice first.
    b.resume();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_ready(&b, Duration::from_secs(30)).await;
    let refused = eventually(BOUND, || async {
        b.verify(&revoked.token).await.status == 401
    })
    .await;
    assert!(
        refused.is_some(),
        "the revocation lost in the failover never reached the instance; relay log:\n{}",
        relayed.log()
    );
    assert_eq!(b.verify(&kept.token).await.status, 200);
    assert!(revocations(replica) > 0, "appended again on the new master");
    // Told by the check its appends make (none of them failed).
    let log = relayed.log();
    assert!(
        log.contains("no longer holds this relay's last append"),
        "relay log:\n{log}"
    );
    // INSERTs are logged too: the replay appends them again (for key filters), and no relay
    // needs to tell instances to reload theirs.
    assert!(
        entries(replica, "i|") > inserts,
        "the replay appended the logged INSERTs"
    );
    assert_eq!(entries(replica, "l|"), 0);
    relayed.kill().await;
    b.kill().await;
}

/// A read returns what follows the entry last read even when that entry has been trimmed: a
/// burst of appends past `cache.feed_stream_max_len` while an instance waits on the stream
/// would hand it the entries after a gap. It must tell, from the full batch and the entry gone,
/// and drop what it holds as a lost stream makes it do. The test writes the stream itself (no
/// relay): heartbeats, then a revocation followed by a burst, trimmed in one script.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_that_trims_past_a_waiting_reader_does_not_hide_a_revocation() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let prefix = unique("kgtrim");
    let stream = format!("{prefix}:knoxgate:feed");
    // A relay's heartbeats, faster than the instance's read window, so that it is caught up
    // and waiting on the stream whenever the burst comes.
    let heartbeats = Heartbeats::start(redis.port, &stream);
    let a = instance(&db, &redis, &prefix).await;
    assert!(ready_within(a.admin(), Duration::from_secs(10)).await);
    let revoked = user_with_token(&db, "trimmed").await;
    let kept = user_with_token(&db, "trimmed-kept").await;
    cached_on_all(&[&a], &[&revoked, &kept]).await;
    // Deleted behind its back: only the stream can tell it.
    revoke(&db, &revoked).await;
    assert_eq!(
        a.verify(&revoked.token).await.status,
        200,
        "trusted while live"
    );

    // The revocation, then 2,000 entries, the stream trimmed to 600 after each: the reader's
    // last entry and the revocation are gone before it reads again.
    let script = "redis.call('XADD', KEYS[1], 'MAXLEN', '=', ARGV[2], '*', 'c', ARGV[1]) \
                  for i = 1, tonumber(ARGV[3]) do \
                    redis.call('XADD', KEYS[1], 'MAXLEN', '=', ARGV[2], '*', 'c', 'b|burst|' .. i) \
                  end return 1";
    let revocation = format!(
        "t|{}|{}",
        revoked.user_id,
        knoxgate::auth::token_key_of(&revoked.token)
    );
    assert_eq!(
        redis_cli(
            redis.port,
            &["EVAL", script, "1", &stream, &revocation, "600", "2000"]
        ),
        "1"
    );
    let refused = eventually(BOUND, || async {
        a.verify(&revoked.token).await.status == 401
    })
    .await;
    heartbeats.stop();
    assert!(
        refused.is_some(),
        "the revocation trimmed from under the reader was never made up for"
    );
    assert_eq!(a.verify(&kept.token).await.status, 200);
    a.stop().await;
}

/// A relay's heartbeats, written to the stream by the test every 50 ms.
struct Heartbeats {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Heartbeats {
    fn start(port: u16, stream: &str) -> Heartbeats {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (stop, stream) = (std::sync::Arc::clone(&stop), stream.to_owned());
            std::thread::spawn(move || {
                for seq in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    redis_cli(port, &["XADD", &stream, "*", "c", &format!("b|test|{seq}")]);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Heartbeats { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

/// Relays of earlier versions did not replay INSERTs (their triggers did not log them): one that
/// went live on a new `LISTEN` appended `l|…` instead, and instances must still reload their key
/// filters on it while such relays run beside new instances during an upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_earlier_relays_word_still_makes_instances_reload_their_key_filters() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let prefix = unique("kgoldrelay");
    let stream = format!("{prefix}:knoxgate:feed");
    let heartbeats = Heartbeats::start(redis.port, &stream);
    let a = instance(&db, &redis, &prefix).await;
    const LOADS: &str = "knoxgate_key_filter_loads_total";
    let loaded = eventually(Duration::from_secs(10), || async {
        a.metric(LOADS).await >= 1.0
    })
    .await;
    assert!(loaded.is_some(), "the key filter was never loaded");
    let loads = a.metric(LOADS).await;
    redis_cli(redis.port, &["XADD", &stream, "*", "c", "l|old|7"]);
    let reloaded = eventually(BOUND, || async { a.metric(LOADS).await > loads }).await;
    heartbeats.stop();
    assert!(reloaded.is_some(), "no reload on an earlier relay's word");
    a.stop().await;
}

/// A relay's replay reads removals back over the cache window, but INSERTs (which only key
/// filters need) only since a relay last heartbeated on the stream, plus 60 s: whatever was
/// logged before that, some relay heard and appended. So a restart on a busy site replays a
/// minute of logins, not the cache window's. Other entries vouch for nothing (a replay cut
/// short appends some too); without a heartbeat, or with no stream at all, the longer window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_replays_removals_over_the_cache_window_and_inserts_since_the_last_heartbeat() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO knoxgate_revocation_log (logged_at, kind, user_id, token_key) VALUES \
               (now() - interval '300 seconds', 't', '1', 'oldremoval00000'), \
               (now() - interval '400 seconds', 'i', '1', 'pastthewindow00'), \
               (now() - interval '200 seconds', 'i', '1', 'beforequiet0000'), \
               (now() - interval '130 seconds', 'i', '1', 'whilequiet00000')",
        )
        .await
        .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    // Appends made `secs_ago`, oldest first.
    let seed = |prefix: &str, entries: &[(u128, &str)]| {
        let stream = format!("{prefix}:knoxgate:feed");
        for (secs_ago, payload) in entries {
            let id = format!("{}-0", now_ms - secs_ago * 1000);
            redis_cli(redis.port, &["XADD", &stream, &id, "c", payload]);
        }
    };
    let replayed = async |prefix: &str| {
        let relayed = relay(&db, &redis, prefix);
        assert_ready(&relayed, Duration::from_secs(20)).await;
        relayed.kill().await;
        redis_cli(
            redis.port,
            &["XRANGE", &format!("{prefix}:knoxgate:feed"), "-", "+"],
        )
    };

    // The last heartbeat 100 s ago, an older one before it, and a change after it.
    let quiet = unique("kgquiet");
    seed(
        &quiet,
        &[
            (300, "b|gone|1"),
            (100, "b|gone|2"),
            (50, "t|9|afterheartbeat"),
        ],
    );
    let entries = replayed(&quiet).await;
    assert!(entries.contains("t|1|oldremoval00000"), "{entries}");
    assert!(entries.contains("i|1|whilequiet00000"), "{entries}");
    assert!(!entries.contains("beforequiet"), "{entries}");
    assert!(!entries.contains("pastthewindow"), "{entries}");

    // No heartbeat on the stream, or no stream: INSERTs over the longer window (defaults:
    // redis.max_cache_ttl 300 s, plus 60 s).
    let unvouched = unique("kgnoheartbeat");
    seed(&unvouched, &[(50, "t|9|afterheartbeat")]);
    for prefix in [unvouched, unique("kgempty")] {
        let entries = replayed(&prefix).await;
        assert!(entries.contains("t|1|oldremoval00000"), "{entries}");
        assert!(entries.contains("i|1|whilequiet00000"), "{entries}");
        assert!(entries.contains("i|1|beforequiet0000"), "{entries}");
        assert!(!entries.contains("pastthewindow"), "{entries}");
    }
}

/// A relay's replay longer than the stream's cap trims the other relays' latest appends. That is
/// a trim, not a loss (every entry before theirs went too), so they go on without replaying in
/// turn; taking it for a loss would make two relays trim each other's appends without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_that_trims_another_relays_appends_does_not_make_it_replay() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let prefix = unique("kgtrimrelay");
    // 1,500 revocations to replay, against a stream capped at 1,024 entries.
    db.client()
        .await
        .execute(
            "INSERT INTO knoxgate_revocation_log (kind, user_id, token_key) \
             SELECT 't', '1', 'k' || lpad(g::text, 14, '0') FROM generate_series(1, 1500) g",
            &[],
        )
        .await
        .unwrap();
    let cap = [("KNOXGATE_CACHE_FEED_STREAM_MAX_LEN", "1024".to_owned())];
    let first = relay_with(&db, &redis.url(), &prefix, &cap);
    assert_ready(&first, Duration::from_secs(20)).await;
    let second = relay_with(&db, &redis.url(), &prefix, &cap);
    assert_ready(&second, Duration::from_secs(20)).await;
    // The second's replay has trimmed the first's heartbeats; both append on.
    let stream = format!("{prefix}:knoxgate:feed");
    let heartbeats = || {
        redis_cli(redis.port, &["XRANGE", &stream, "-", "+"])
            .lines()
            .filter(|l| l.starts_with("b|"))
            .count()
    };
    let since = heartbeats();
    let going_on = eventually(Duration::from_secs(5), || async {
        heartbeats() >= since + 6
    })
    .await;
    assert!(going_on.is_some(), "the relays stopped heartbeating");
    for relay in [&first, &second] {
        let log = relay.log();
        assert!(
            !log.contains("no longer holds this relay's last append"),
            "a trim taken for a loss:\n{log}"
        );
        assert_eq!(log.matches("change feed live").count(), 1, "{log}");
    }
    first.kill().await;
    second.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_work_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3, 1).await;
    relayed_revocation_on(&cluster.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_revocations_reaches_the_instance_in_few_appends() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let prefix = unique("kgburst");
    let (relayed, a) = relay_and_instance(&db, &redis.url(), &prefix).await;
    let client = db.client().await;
    let user = insert_user(&client, "burst", "pw", true).await;
    let tokens = insert_default_tokens(&client, user, 300).await;
    let keep = user_with_token(&db, "kept").await;
    let all: Vec<&Token> = tokens.iter().chain([&keep]).collect();
    cached_on_all(&[&a], &all).await;

    // 300 revocations in one commit: Postgres hands the relay 300 notifications at once.
    let stamp = a
        .metric("knoxgate_feed_last_change_timestamp_seconds")
        .await;
    // The appends counted from here (the INSERTs above went out one by one, as they came).
    // Counters reset first: a heartbeat appended after the stream's last entry is read is then
    // counted among the script calls as well as among the relay's own entries below.
    let stream_key = format!("{prefix}:knoxgate:feed");
    redis_cli(redis.port, &["CONFIG", "RESETSTAT"]);
    let before = redis_cli(
        redis.port,
        &["XREVRANGE", &stream_key, "+", "-", "COUNT", "1"],
    );
    let before = before.lines().next().expect("entries").to_owned();
    client
        .execute("DELETE FROM knox_authtoken WHERE user_id = $1", &[&user])
        .await
        .unwrap();
    let heard = eventually(BOUND, || async {
        a.metric("knoxgate_feed_events_total{kind=\"token\"}").await >= 300.0
    })
    .await;
    assert!(heard.is_some(), "not every revocation reached the instance");
    assert!(
        a.metric("knoxgate_feed_last_change_timestamp_seconds")
            .await
            > stamp
    );
    for t in &tokens {
        assert_eq!(a.verify(&t.token).await.status, 401);
    }
    assert_eq!(a.verify(&keep.token).await.status, 200);

    // Every revocation is in the stream once, and they went out in batches (one script call
    // each): the instance woke for a few appends, not for 300.
    let stream = redis_cli(
        redis.port,
        &["XRANGE", &stream_key, &format!("({before}"), "+"],
    );
    let revoked = stream.lines().filter(|l| l.starts_with("t|")).count();
    assert_eq!(revoked, 300);
    let stats = redis_cli(redis.port, &["INFO", "commandstats"]);
    let calls = |command: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    // Every append is a script call; the relay's own entries since (heartbeats) take one each.
    // A heartbeat between the reset and the read of the last entry counts as one more call.
    let own = stream.lines().filter(|l| l.starts_with("b|")).count() as u64;
    let change_appends = calls("eval").saturating_sub(own);
    assert!(
        (1..30).contains(&change_appends),
        "{change_appends} appends for 300 changes ({} script calls, {own} the relay's own entries)",
        calls("eval")
    );
    relayed.kill().await;
    a.stop().await;
}

/// A Redis entry can outlive the relays' DEL (here put back by hand, as a fill that raced the
/// revocation would). Running instances hold a tombstone for the revoked token and confirm
/// such an entry with Postgres; an instance started afterwards reads the stream's recent
/// changes back as tombstones and does the same, while other tokens' entries are still
/// trusted without SQL. With a stream that does not reach back over the horizon, it distrusts
/// every entry written before it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_started_after_a_revocation_distrusts_the_entry_that_outlived_it() {
    for stream_reaches_back in [true, false] {
        let db = TestDb::migrated().await;
        let redis = PrivateRedis::start().await;
        let prefix = unique("kgrecall");
        let port = redis.port;
        if stream_reaches_back {
            // An entry from long ago: the stream covers the whole horizon.
            let stream = format!("{prefix}:knoxgate:feed");
            redis_cli(port, &["XADD", &stream, "1-1", "c", "b|old|1"]);
        }
        let relayed = relay(&db, &redis, &prefix);
        assert_ready(&relayed, Duration::from_secs(10)).await;
        let a = instance(&db, &redis, &prefix).await;
        assert!(ready_within(a.admin(), Duration::from_secs(10)).await);
        let token = user_with_token(&db, "revoked").await;
        let bystander = user_with_token(&db, "bystander").await;
        cached_on_all(&[&a], &[&token, &bystander]).await;
        let key = redis_key(&a, &token.token);
        let entry = redis_cli(port, &["GET", &key]);
        assert!(!entry.is_empty(), "no Redis entry to keep");
        revoke(&db, &token).await;
        assert!(refused_by_all(&[&a], &token).await);
        // The relay deleted it; it comes back as a racing fill would leave it.
        assert_eq!(redis_cli(port, &["EXISTS", &key]), "0");
        redis_cli(port, &["SET", &key, &entry, "PX", "60000"]);

        let b = instance(&db, &redis, &prefix).await;
        assert!(ready_within(b.admin(), Duration::from_secs(10)).await);
        let r = b.verify(&token.token).await;
        assert_eq!(
            r.status,
            401,
            "reaches back {stream_reaches_back}: {}",
            r.body_text()
        );
        assert_eq!(b.verify(&bystander.token).await.status, 200);
        let confirms = b
            .metric("knoxgate_sql_statements_total{statement=\"confirm\"}")
            .await;
        // The revoked token's entry is confirmed (and found gone); the bystander's is trusted
        // unless the stream could not say what happened before the instance started.
        assert_eq!(
            confirms,
            if stream_reaches_back { 1.0 } else { 2.0 },
            "reaches back {stream_reaches_back}"
        );
        relayed.kill().await;
        a.stop().await;
        b.stop().await;
    }
}

/// A relay whose `LISTEN` connection drops and comes back within `cache.feed_relay_timeout`
/// misses the INSERTs committed meanwhile, and the instances never see their feed go down. The
/// triggers log INSERTs, so the relay's replay appends the missed one and the instance's key
/// filter learns it without a reload: a token made in the gap is not refused as unknown once the
/// budget of unknown-key lookups is spent (here none at all), and no relay restart makes the
/// fleet reload its filters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_made_while_the_relay_reconnects_is_not_refused_as_unknown() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let prefix = unique("kggap");
    let relayed = relay(&db, &redis, &prefix);
    assert_ready(&relayed, Duration::from_secs(10)).await;
    // A relay timeout far longer than the relay takes to come back: the instance's feed stays
    // live throughout, so only the relay's replay can tell it of the token.
    let extra = format!(
        "[redis]\nurl = \"{}\"\nreconnect_max_delay = \"200ms\"\n\
         [cache]\nfeed = \"redis\"\nfeed_heartbeat_interval = \"200ms\"\n\
         feed_relay_timeout = \"20s\"\nunknown_key_lookups_per_second = 0\n",
        redis.url()
    );
    let s = TestServer::start_with_prefix(&db, &prefix, &extra).await;
    assert!(ready_within(s.admin(), Duration::from_secs(10)).await);
    const LOADS: &str = "knoxgate_key_filter_loads_total";
    let loaded = eventually(Duration::from_secs(10), || async {
        s.metric(LOADS).await >= 1.0
    })
    .await;
    assert!(loaded.is_some(), "the key filter was never loaded");
    // Heard through the relay: known once its INSERT has come down the stream.
    let heard = user_with_token(&db, "gap").await;
    let known = eventually(BOUND, || async {
        s.verify(&heard.token).await.status == 200
    })
    .await;
    assert!(known.is_some(), "a token made while the relay listened");
    let loads = s.metric(LOADS).await;

    // The relay's LISTEN connection goes (waiting until its backend has exited); a token is
    // committed before the relay is back (its reconnect delay is 100 ms).
    let client = db.client().await;
    let terminated = client
        .query(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'knoxgate-feed'",
            &[&db.name],
        )
        .await
        .expect("terminate the relay's feed");
    assert_eq!(terminated.len(), 1, "one relay feed connection");
    let unheard = insert_default_token(&client, heard.user_id).await;

    let accepted = eventually(Duration::from_secs(10), || async {
        s.verify(&unheard.token).await.status == 200
    })
    .await;
    assert!(
        accepted.is_some(),
        "the token made in the gap stayed unknown; relay log:\n{}",
        relayed.log()
    );
    assert_eq!(
        s.metric(LOADS).await,
        loads,
        "learnt from the replay, not a reload"
    );
    assert_eq!(
        s.metric("knoxgate_feed_connected").await,
        1.0,
        "the instance's feed went down: the test did not cover the gap it is for"
    );
    relayed.kill().await;
    s.stop().await;
}

/// A relay vouches for its listener with every heartbeat. When the listener's connection stops
/// answering without failing (its replies held back, as a partition would), the relay stops
/// heartbeating at once rather than at its next health check (here 30 s away, and the query
/// deadline as long), so instances stop trusting their caches within `cache.feed_relay_timeout`
/// and a revocation the relay cannot hear is still honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_whose_listener_goes_silent_stops_vouching_for_it() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let prefix = unique("kgsilent");
    let (relayed, proxy) = relay_with_slow_listener(
        &db,
        &redis,
        &prefix,
        &[
            ("KNOXGATE_POSTGRES_STATEMENT_TIMEOUT", "30s".into()),
            ("KNOXGATE_CACHE_FEED_HEALTH_INTERVAL", "30s".into()),
        ],
    )
    .await;
    assert_ready(&relayed, Duration::from_secs(10)).await;
    let s = instance(&db, &redis, &prefix).await;
    assert!(ready_within(s.admin(), Duration::from_secs(10)).await);
    let token = user_with_token(&db, "silent").await;
    cached_on_all(&[&s], &[&token]).await;

    proxy.set_delay(Duration::from_secs(120));
    // The feed relay timeout is 800 ms; the relay would not find out for 30 s by itself.
    let down = eventually(Duration::from_secs(5), || async {
        s.metric("knoxgate_feed_connected").await == 0.0
    })
    .await;
    assert!(
        down.is_some(),
        "the relay went on vouching for a listener that does not answer; relay log:\n{}",
        relayed.log()
    );
    revoke(&db, &token).await;
    assert!(refused_by_all(&[&s], &token).await);
    relayed.kill().await;
    s.stop().await;
}

/// A relay whose first echo comes back late (its listener slow for a moment after a reconnect)
/// is deaf until it hears one: it asks again, ever less often while none comes back, and goes
/// live when one comes back in time. An idle instance's feed skips those checks so as not to hold a pooled
/// connection open, and a relay's pool is always idle: asking only while requests come, it
/// stayed deaf, without heartbeats and not ready, until its connection failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_whose_first_echo_comes_back_late_goes_live_once_it_hears() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let prefix = unique("kglateecho");
    let (relayed, proxy) = relay_with_slow_listener(
        &db,
        &redis,
        &prefix,
        &[
            ("KNOXGATE_POSTGRES_STATEMENT_TIMEOUT", "10s".into()),
            ("KNOXGATE_CACHE_FEED_ECHO_TIMEOUT", "150ms".into()),
        ],
    )
    .await;
    assert_ready(&relayed, Duration::from_secs(10)).await;

    // The listener's replies (its notifications with them) now take longer than the echo
    // timeout, and its connection is cut: the next session's first echo comes back late.
    proxy.set_delay(Duration::from_millis(300));
    let before = relayed.log().len();
    db.client()
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'knoxgate-feed'",
            &[&db.name],
        )
        .await
        .unwrap();
    let since_cut = || relayed.log()[before..].to_owned();
    let deaf = eventually(Duration::from_secs(20), || async {
        since_cut().contains("change feed is deaf")
    })
    .await;
    assert!(deaf.is_some(), "no late echo: {}", relayed.log());

    proxy.set_delay(Duration::ZERO);
    assert_ready(&relayed, Duration::from_secs(10)).await;
    let log = since_cut();
    assert!(
        log.contains("hears its own notifications again"),
        "live without an echo heard while deaf: {log}"
    );
    // And it stays live.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_ready(&relayed, Duration::from_millis(100)).await;
    assert_eq!(
        since_cut().matches("change feed is deaf").count(),
        1,
        "{}",
        since_cut()
    );
    relayed.kill().await;
}

/// A ready relay and a ready instance reading its stream, with a Redis command timeout (5 s)
/// far longer than `FEED`'s relay timeout: for tests that stop Redis answering. `cache_extra`
/// adds keys to `FEED`'s `[cache]`.
async fn relay_and_patient_instance(
    db: &TestDb,
    redis: &PrivateRedis,
    prefix: &str,
    cache_extra: &str,
) -> (Binary, TestServer) {
    let prefix = unique(prefix);
    let relayed = relay(db, redis, &prefix);
    assert_ready(&relayed, Duration::from_secs(10)).await;
    let extra = format!(
        "[redis]\nurl = \"{}\"\ncommand_timeout = \"5s\"\n{FEED}{cache_extra}",
        redis.url()
    );
    let s = TestServer::start_with_prefix(db, &prefix, &extra).await;
    assert!(ready_within(s.admin(), Duration::from_secs(10)).await);
    (relayed, s)
}

/// An instance stops trusting its caches `cache.feed_relay_timeout` after the last heartbeat,
/// also while its read of the stream is still waiting: on a Redis that stopped answering, that
/// read ends only after `redis.command_timeout` (here 5 s), and the feed was taken as live
/// until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_stops_answering_is_distrusted_within_the_relay_timeout() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let (relayed, s) = relay_and_patient_instance(&db, &redis, "kgstall", "").await;
    let token = user_with_token(&db, "stalled").await;
    cached_on_all(&[&s], &[&token]).await;

    redis.sigstop();
    revoke(&db, &token).await;
    // 800 ms of relay timeout, and the time to notice; far under the 5 s command timeout.
    let refused = eventually(Duration::from_secs(2), || async {
        s.verify(&token.token).await.status == 401
    })
    .await;
    redis.sigcont();
    assert!(
        refused.is_some(),
        "a cached answer was trusted for 2 s after the last heartbeat could have come"
    );
    relayed.kill().await;
    s.stop().await;
}

/// The key filter is kept current by the feed alone. While a relay's heartbeat is overdue, also
/// while the instance's read of the stream still waits on a Redis that stopped answering (up to
/// `redis.command_timeout`, here 5 s), a token made meanwhile is asked for, never refused as
/// unknown; and `knoxgate_feed_connected` says the feed is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_made_while_the_stream_stalls_is_not_refused_as_unknown() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let (relayed, s) = relay_and_patient_instance(
        &db,
        &redis,
        "kgfilter",
        "unknown_key_lookups_per_second = 0\n",
    )
    .await;
    let loaded = eventually(Duration::from_secs(10), || async {
        s.metric("knoxgate_key_filter_loads_total").await >= 1.0
    })
    .await;
    assert!(loaded.is_some(), "the key filter was never loaded");
    let heard = user_with_token(&db, "filtered").await;
    let known = eventually(BOUND, || async {
        s.verify(&heard.token).await.status == 200
    })
    .await;
    assert!(known.is_some(), "a token heard through the relay");

    redis.sigstop();
    // Past the 800 ms relay timeout (the last heartbeat is at most 200 ms old), far from the
    // 5 s after which the stalled read fails.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let feed_connected = s.metric("knoxgate_feed_connected").await;
    let unheard = insert_default_token(&db.client().await, heard.user_id).await;
    let mut statuses = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        let status = s.verify(&unheard.token).await.status;
        statuses.push(status);
        if status == 200 || status == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    redis.sigcont();
    assert_eq!(
        feed_connected, 0.0,
        "knoxgate_feed_connected 1.5 s after the last heartbeat could have come"
    );
    assert_eq!(
        statuses.last(),
        Some(&200),
        "a token made while the feed was down was answered {statuses:?}"
    );
    relayed.kill().await;
    s.stop().await;
}

/// A heartbeat counts from when it was appended, not from when it is read. An instance that
/// stood still while every relay died reads, once it runs again, the heartbeats they appended
/// before: those must not make the feed live, or a revocation made after the relays died would
/// be answered from the cache for as long as the instance stood still, plus the relay timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_read_late_do_not_vouch_for_the_time_since() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let prefix = unique("kglate");
    let relayed = relay(&db, &redis, &prefix);
    let b = instance_process(
        &db,
        &redis.url(),
        &prefix,
        &[("KNOXGATE_CACHE_FEED_RECONNECT_DELAY", "100ms".into())],
    );
    assert_ready(&b, Duration::from_secs(30)).await;
    let token = user_with_token(&db, "late-heartbeats").await;
    assert_eq!(b.verify(&token.token).await.status, 200);

    // Stopped mid-read: Redis answers that read with the relay's next heartbeat, which waits
    // unread in the socket while the relay dies and the token is revoked.
    b.pause();
    tokio::time::sleep(Duration::from_millis(500)).await;
    relayed.kill().await;
    revoke(&db, &token).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    b.resume();

    // The heartbeats it reads now (its read waiting in the socket, or the read after it, which
    // timed out while the process stood still) are 3 s old and more, past the 800-ms relay
    // timeout: nothing vouches for the cache. (Only `/readyz` is asked meanwhile: a verify
    // while the feed is down would be confirmed with Postgres and evict the entry.)
    let started = std::time::Instant::now();
    let mut answered_while_live = None;
    while started.elapsed() < Duration::from_secs(3) {
        let (_, body) = readyz_of(b.admin).await;
        if body.contains("\"feed\":\"live\"") {
            answered_while_live = Some(b.verify(&token.token).await.status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        answered_while_live,
        None,
        "the feed went live on heartbeats appended before the relay died (the revoked token \
         answered with that status): {}",
        b.log()
    );
    assert_eq!(b.verify(&token.token).await.status, 401);
    b.kill().await;
}

/// A read of the stream that waits its whole `block` and gets nothing (a nil reply) is a read,
/// not a failure: with reads shorter than the relay's heartbeat interval most of them end so,
/// and the feed stays live between heartbeats rather than going down after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_that_find_nothing_new_keep_the_feed_live() {
    let db = TestDb::migrated().await;
    let redis = PrivateRedis::start().await;
    let prefix = unique("kgnil");
    let relayed = relay(&db, &redis, &prefix);
    // The instance reads for 50 ms at a time, the relay heartbeats every 200 ms.
    let b = instance_process(
        &db,
        &redis.url(),
        &prefix,
        &[("KNOXGATE_CACHE_FEED_HEARTBEAT_INTERVAL", "50ms".into())],
    );
    assert_ready(&b, Duration::from_secs(30)).await;
    for _ in 0..40 {
        let (status, body) = readyz_of(b.admin).await;
        assert!(
            body.contains("\"feed\":\"live\""),
            "{status} {body}: {}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !b.log().contains("cannot read the redis stream"),
        "{}",
        b.log()
    );
    b.kill().await;
    relayed.kill().await;
}

/// The relay's appends and the instance's stream reader find the new master when the old one
/// goes silent instead of closing its connections (stopped, as a host that vanished): their
/// commands time out on the caller's side only, so each must start a new connection itself, or
/// the feed stays down (every cached answer confirmed with Postgres) for as long as the old
/// master's sockets stay open. (Seen failing with either reconnection left out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_reads_the_stream_from_the_new_master_after_the_old_one_goes_silent() {
    let db = TestDb::migrated().await;
    let mut deployment = RedisSentinel::start().await;
    let url = deployment.url();
    let prefix = unique("kgsilent");
    let (relayed, s) = relay_and_instance(&db, &url, &prefix).await;
    let master = deployment.master_port().expect("a master");
    deployment.server(master).pause();
    deployment
        .wait_promoted(master, Duration::from_secs(40))
        .await
        .expect("the sentinels promoted the replica");
    let live = ready_within(s.admin(), Duration::from_secs(30)).await;
    deployment.server(master).resume();
    assert!(
        live,
        "the instance never read the stream from the new master: {:?}\nrelay log:\n{}",
        readyz_of(s.admin()).await,
        relayed.log()
    );
    relayed.kill().await;
    s.stop().await;
}
