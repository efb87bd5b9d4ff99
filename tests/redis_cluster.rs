//! knoxgate on a real Redis Cluster (3 masters, 3 replicas, `redis-cli --cluster create`):
//! entries spread over every master, revocations reach every instance, and a master's failover
//! under load gives no wrong answer and sends to Postgres only the reads of the keys it owned.
//! The instances keep nothing in process, so every answer comes from Redis or Postgres.

use std::time::{Duration, Instant};

use knoxgate::auth::token_key_of;

use crate::support::*;

/// Verifies every token through `s` (which writes its entry) and waits until every entry is on
/// the master that owns its slot. Writing an entry is best effort (a write that times out on a
/// loaded machine is dropped and counted), so a token whose entry does not appear is verified
/// again, but only if the instance counted a failed Redis command: a write dropped silently
/// still fails the test.
async fn cache_all(s: &TestServer, cluster: &RedisCluster, tokens: &[String]) {
    const ATTEMPTS: usize = 3;
    let failures = || s.metric("knoxgate_redis_errors_total");
    // Counted before any write: after a failed one the breaker may skip the next few without
    // counting them again.
    let failed_before = failures().await;
    for t in tokens {
        let key = entry_key(&s.prefix, t);
        let owner = cluster.owner_of_key(&key);
        for attempt in 1..=ATTEMPTS {
            assert_eq!(s.verify(t).await.status, 200, "valid token refused");
            let written = eventually(Duration::from_secs(5), || async {
                redis_cli(owner, &["EXISTS", &key]) == "1"
            })
            .await;
            if written.is_some() {
                break;
            }
            assert!(
                failures().await > failed_before,
                "entry {key} never written to {owner}, and no failed Redis command counted"
            );
            assert!(attempt < ATTEMPTS, "entry {key} never written to {owner}");
            println!("the write of {key} failed (counted); verifying it again");
        }
    }
}

async fn revoke_row(client: &tokio_postgres::Client, token: &str) {
    let n = client
        .execute(
            "DELETE FROM knox_authtoken WHERE token_key = $1",
            &[&token_key_of(token)],
        )
        .await
        .expect("delete");
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entries_spread_over_every_master_and_revocations_reach_every_instance() {
    let db = TestDb::migrated().await;
    let cluster = RedisCluster::start(3, 1).await;
    let prefix = unique("kgcl");
    let a = instance(&db, &prefix, &cluster.url()).await;
    let b = instance(&db, &prefix, &cluster.url()).await;
    let all = tokens(&db, "spread", 30).await;
    cache_all(&a, &cluster, &all).await;

    // Entries on every master, each where CLUSTER SLOTS says its slot lives.
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    for m in &masters {
        let held = all
            .iter()
            .filter(|t| redis_cli(m.port, &["EXISTS", &entry_key(&prefix, t)]) == "1")
            .count();
        assert!(held > 0, "master {} holds no entry", m.port);
        println!(
            "master {} ({} slots) holds {held} entries",
            m.port,
            m.slots()
        );
    }
    // The second instance answers them from Redis, once its node connections are up: no
    // Postgres lookup.
    let hits = || b.metric("knoxgate_cache_lookups_total{tier=\"redis\",result=\"hit\"");
    let warm = eventually(Duration::from_secs(5), || async {
        b.verify(&all[0]).await.status == 200 && hits().await > 0.0
    })
    .await;
    assert!(warm.is_some(), "no Redis hit on the second instance");
    let (hits_before, pg_before) = (
        hits().await,
        b.metric("knoxgate_cache_lookups_total{tier=\"postgres\"")
            .await,
    );
    for t in &all {
        assert_eq!(b.verify(t).await.status, 200);
    }
    assert_eq!(
        hits().await - hits_before,
        all.len() as f64,
        "answered from Redis"
    );
    assert_eq!(
        b.metric("knoxgate_cache_lookups_total{tier=\"postgres\"")
            .await,
        pg_before
    );

    // One logout through `a`, one row deleted by raw SQL: 401 on both instances.
    let (logged_out, deleted, kept) = (&all[0], &all[1], &all[2..]);
    let r = post_with_token(&a, LOGOUT, logged_out).await;
    assert_eq!(r.status, 204, "{}", r.body_text());
    let started = Instant::now();
    revoke_row(&db.client().await, deleted).await;
    for s in [&a, &b] {
        for t in [logged_out, deleted] {
            let refused = eventually(REVOCATION_BOUND, || async {
                s.verify(t).await.status == 401
            })
            .await;
            assert!(
                refused.is_some(),
                "revoked token not refused within the bound"
            );
        }
    }
    println!(
        "both revocations refused on both instances after {:?}",
        started.elapsed()
    );
    let key = entry_key(&prefix, logged_out);
    assert_eq!(
        redis_cli(cluster.owner_of_key(&key), &["EXISTS", &key]),
        "0"
    );
    // Nothing else changed: the other tokens still pass, on both.
    for s in [&a, &b] {
        for t in kept {
            assert_eq!(s.verify(t).await.status, 200, "valid token refused");
        }
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_fails_over_under_load_costing_only_its_slots_and_no_wrong_answer() {
    let db = TestDb::migrated().await;
    let mut cluster = RedisCluster::start(3, 1).await;
    let prefix = unique("kgfo");
    let s = instance(&db, &prefix, &cluster.url()).await;
    let valid = tokens(&db, "fovalid", 45).await;
    let revoked_before = tokens(&db, "forevoked", 10).await;
    let revoked_during = tokens(&db, "foduring", 10).await;
    let everything: Vec<String> = valid
        .iter()
        .chain(&revoked_before)
        .chain(&revoked_during)
        .cloned()
        .collect();
    cache_all(&s, &cluster, &everything).await;
    let client = db.client().await;
    for t in &revoked_before {
        revoke_row(&client, t).await;
    }
    for t in &revoked_before {
        let refused = eventually(REVOCATION_BOUND, || async {
            s.verify(t).await.status == 401
        })
        .await;
        assert!(refused.is_some(), "revocation before the failover not seen");
    }

    // The master to kill: the one owning the most of these entries.
    let masters = cluster.masters();
    let victim = masters
        .iter()
        .max_by_key(|m| {
            everything
                .iter()
                .filter(|t| cluster.owner_of_key(&entry_key(&prefix, t)) == m.port)
                .count()
        })
        .expect("masters")
        .clone();
    let slot_share = f64::from(victim.slots()) / 16384.0;
    // The load draws uniformly from these tokens, so the reads that must fail are those of the
    // entries the victim holds: chosen as the master holding the most, that share can exceed its
    // share of the slots by chance.
    let entry_share = everything
        .iter()
        .filter(|t| cluster.owner_of_key(&entry_key(&prefix, t)) == victim.port)
        .count() as f64
        / everything.len() as f64;

    let load = VerifyLoad::start(s.addr(), 4, everything.clone(), &revoked_before);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lookups = |result: &'static str| {
        let s = &s;
        async move {
            s.metric(&format!(
                "knoxgate_cache_lookups_total{{tier=\"redis\",result=\"{result}\"}}"
            ))
            .await
        }
    };
    let redis_total =
        || async { lookups("hit").await + lookups("miss").await + lookups("error").await };
    let (errors_before, total_before) = (lookups("error").await, redis_total().await);
    let pg_before = s
        .metric("knoxgate_cache_lookups_total{tier=\"postgres\"")
        .await;

    let killed = Instant::now();
    cluster.node(victim.port).kill();
    // Revocations while the master is down: their DELs may be lost with it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for t in &revoked_during {
        load.revoke(t);
        revoke_row(&client, t).await;
    }
    // Until the cluster marks the master failed it still lists it as the owner of its slots:
    // the failover is over when a replica owns them and every slot is covered.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.masters().iter().any(|m| m.port == victim.port) {
        assert!(
            Instant::now() < deadline,
            "no replica took over the dead master's slots"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster
        .wait_covered(3, Duration::from_secs(30))
        .await
        .expect("every slot covered again");
    let failover = killed.elapsed();
    let (errors_after, total_after) = (lookups("error").await, redis_total().await);
    let pg_after = s
        .metric("knoxgate_cache_lookups_total{tier=\"postgres\"")
        .await;
    // Some load after the failover, past the revocation bound.
    tokio::time::sleep(REVOCATION_BOUND + Duration::from_secs(1)).await;
    let tally = load.finish().await;

    let fallback_share = (errors_after - errors_before) / (total_after - total_before).max(1.0);
    let pg_share = (pg_after - pg_before) / (total_after - total_before).max(1.0);
    let error_window = tally
        .first_error
        .zip(tally.last_error)
        .map(|(a, b)| (a.saturating_duration_since(killed), b - a));
    println!(
        "cluster failover: slots covered again {failover:?} after the kill; dead master owned \
         {:.1}% of slots and {:.1}% of the entries; redis lookups that failed over to postgres \
         during it: {:.1}% (all postgres lookups, revoked tokens included: {:.1}%); {tally:?}; \
         5xx window (start after kill, length): {error_window:?}",
        slot_share * 100.0,
        entry_share * 100.0,
        fallback_share * 100.0,
        pg_share * 100.0,
    );
    assert!(tally.wrong.is_empty(), "wrong answers: {:?}", tally.wrong);
    assert!(tally.valid_ok > 0 && tally.revoked_refused > 0, "{tally:?}");
    assert!(
        fallback_share <= entry_share + 0.10,
        "{:.1}% of reads fell back to Postgres, the dead master held {:.1}% of the entries",
        fallback_share * 100.0,
        entry_share * 100.0
    );
    // After the failover every token gets its true answer, read from the promoted replica.
    for t in &valid {
        assert_eq!(s.verify(t).await.status, 200);
    }
    for t in revoked_before.iter().chain(&revoked_during) {
        assert_eq!(s.verify(t).await.status, 401);
    }
    s.stop().await;
}
