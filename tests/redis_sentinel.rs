//! knoxgate on a real Sentinel deployment (a master, a replica, three sentinels, quorum 2): a
//! failover under load gives no wrong answer, and a DEL acknowledged by a master that dies
//! before its replica got it (asynchronous replication loses it) does not bring the token back,
//! neither on the instances that saw the logout nor on one started after the failover. The
//! instances keep nothing in process, so every answer comes from Redis or Postgres.

use std::time::{Duration, Instant};

use crate::support::*;

/// Waits until the entry of `token` is on both data servers (written and replicated).
async fn replicated(deployment: &RedisSentinel, prefix: &str, token: &str) {
    let key = entry_key(prefix, token);
    for server in &deployment.servers {
        let there = eventually(Duration::from_secs(10), || async {
            server.cli(&["EXISTS", &key]) == "1"
        })
        .await;
        assert!(there.is_some(), "entry {key} not on {}", server.port);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_master_fails_over_under_load_without_a_wrong_answer() {
    let db = TestDb::migrated().await;
    let mut deployment = RedisSentinel::start().await;
    let prefix = unique("kgsf");
    let s = instance(&db, &prefix, &deployment.url()).await;
    let valid = tokens(&db, "sfvalid", 30).await;
    let revoked_before = tokens(&db, "sfrevoked", 8).await;
    let revoked_during = tokens(&db, "sfduring", 8).await;
    let everything: Vec<String> = valid
        .iter()
        .chain(&revoked_before)
        .chain(&revoked_during)
        .cloned()
        .collect();
    for t in &everything {
        assert_eq!(s.verify(t).await.status, 200);
    }
    for t in &everything {
        replicated(&deployment, &prefix, t).await;
    }
    let client = db.client().await;
    for t in &revoked_before {
        delete_token(&client, t).await;
    }
    for t in &revoked_before {
        let refused = eventually(REVOCATION_BOUND, || async {
            s.verify(t).await.status == 401
        })
        .await;
        assert!(refused.is_some(), "revocation before the failover not seen");
    }

    let load = VerifyLoad::start(s.addr(), 4, everything.clone(), &revoked_before);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = deployment.master_port().expect("a master");
    let killed = Instant::now();
    deployment.server(old).kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for t in &revoked_during {
        load.revoke(t);
        delete_token(&client, t).await;
    }
    let promoted = deployment
        .wait_promoted(old, Duration::from_secs(30))
        .await
        .expect("the sentinels promoted the replica");
    // Some load on the new master, past the revocation bound.
    tokio::time::sleep(REVOCATION_BOUND + Duration::from_secs(1)).await;
    let redis_hits_before = s
        .metric("knoxgate_cache_lookups_total{tier=\"redis\",result=\"hit\"")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = load.finish().await;
    let error_window = tally
        .first_error
        .zip(tally.last_error)
        .map(|(a, b)| (a.saturating_duration_since(killed), b - a));
    println!(
        "sentinel failover: promoted {promoted:?} after the kill; {tally:?}; 5xx window \
         (start after kill, length): {error_window:?}"
    );
    assert!(tally.wrong.is_empty(), "wrong answers: {:?}", tally.wrong);
    assert!(tally.valid_ok > 0 && tally.revoked_refused > 0, "{tally:?}");
    // Redis serves again after the failover (knoxgate followed the sentinels).
    assert!(
        s.metric("knoxgate_cache_lookups_total{tier=\"redis\",result=\"hit\"")
            .await
            > redis_hits_before,
        "no Redis hit after the failover"
    );
    for t in &valid {
        assert_eq!(s.verify(t).await.status, 200);
    }
    for t in revoked_before.iter().chain(&revoked_during) {
        assert_eq!(s.verify(t).await.status, 401);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_logout_lost_in_a_failover_stays_revoked_on_every_instance() {
    let db = TestDb::migrated().await;
    let mut deployment = RedisSentinel::start().await;
    let prefix = unique("kglw");
    let a = instance(&db, &prefix, &deployment.url()).await;
    let b = instance(&db, &prefix, &deployment.url()).await;
    let token = user_with_token(&db, "lostwrite").await.token;
    let other = user_with_token(&db, "bystander").await.token;
    for t in [&token, &other] {
        assert_eq!(a.verify(t).await.status, 200);
        replicated(&deployment, &prefix, t).await;
    }
    // Redis answers for it, on both instances.
    assert_eq!(b.verify(&token).await.status, 200);
    let key = entry_key(&prefix, &token);

    // The replica misses the DEL: only the master acknowledges it.
    let master = deployment.master_port().expect("a master");
    let replica = deployment.other_than(master);
    deployment.server(replica).pause();
    // Cut its link as well: what the master sends meanwhile would wait in the paused replica's
    // socket buffer and be applied when it resumes.
    redis_cli(master, &["CLIENT", "KILL", "TYPE", "replica"]);
    let r = post_with_token(&a, LOGOUT, &token).await;
    assert_eq!(r.status, 204, "{}", r.body_text());
    let deleted = eventually(Duration::from_secs(5), || async {
        redis_cli(master, &["EXISTS", &key]) == "0"
    })
    .await;
    assert!(deleted.is_some(), "the master never got the DEL");
    for s in [&a, &b] {
        let refused = eventually(REVOCATION_BOUND, || async {
            s.verify(&token).await.status == 401
        })
        .await;
        assert!(refused.is_some(), "logout not seen before the failover");
    }

    // The master dies with the DEL; the replica, resumed, is promoted with the entry.
    deployment.server(master).kill();
    deployment.server(replica).resume();
    // Still a read-only replica (the sentinels need a second to agree): nothing can have
    // deleted the entry there yet. The write is lost, as in an asynchronous failover.
    assert_eq!(
        redis_cli(replica, &["EXISTS", &key]),
        "1",
        "the replica should still hold the entry whose DEL it never received"
    );
    let promoted = deployment
        .wait_promoted(master, Duration::from_secs(40))
        .await
        .expect("the sentinels promoted the replica");
    let entry_back = redis_cli(replica, &["EXISTS", &key]) == "1";
    println!(
        "replica promoted {promoted:?} after the kill, holding the lost entry; still there after \
         promotion: {entry_back}"
    );

    // Every instance refuses the token from now on, while they reconnect and after.
    let started = Instant::now();
    let c = instance(&db, &prefix, &deployment.url()).await;
    println!(
        "instance started after the failover: ready in {:?}",
        started.elapsed()
    );
    let until = Instant::now() + Duration::from_secs(4);
    let mut answers = 0;
    while Instant::now() < until {
        for s in [&a, &b, &c] {
            let got = s.verify(&token).await.status;
            assert!(
                got == 401 || got >= 500,
                "a logged-out token answered {got} after the failover"
            );
            answers += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for s in [&a, &b, &c] {
        assert_eq!(s.verify(&token).await.status, 401);
        assert_eq!(
            s.verify(&other).await.status,
            200,
            "the bystander is untouched"
        );
    }
    println!("{answers} answers for the lost-write token after the failover, none 200");
    a.stop().await;
    b.stop().await;
    c.stop().await;
}
