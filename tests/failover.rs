//! Postgres failover under load: a primary and a streaming standby (`pg_basebackup -R`) in temp
//! dirs, knoxgate given both in a multi-host URL with `target_session_attrs=read-write`. The
//! standby is promoted and the primary killed while clients verify tokens; every answer is
//! checked against the truth, then lookups, logins and the change feed must work on the new
//! primary.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use base64::Engine as _;

use crate::support::{
    PrivatePg, connect, delete_token, eventually, fleet_config, http, insert_default_token,
    insert_user, readyz_status, run_blocking, start_unready,
};

/// What the load saw.
#[derive(Default, Debug)]
struct Tally {
    valid_ok: u64,
    valid_unavailable: u64,
    revoked_refused: u64,
    revoked_unavailable: u64,
    /// A valid token refused (401) or a revoked one allowed (200), or any other status.
    wrong: Vec<String>,
    /// 200 answers to valid tokens after the old primary was killed.
    ok_after_kill: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promoted_standby_takes_over_under_load_without_a_wrong_answer() {
    let primary = Arc::new(run_blocking(|| PrivatePg::init_and_start("")).await);
    let cfg0 = knoxgate::config::Config::from_toml_str(&format!(
        "[postgres]\nurl = \"{}\"",
        primary.url()
    ))
    .unwrap();
    {
        let mut c = connect(&primary.url()).await;
        knoxgate::store::schema::migrate(&mut c, &cfg0.postgres, true)
            .await
            .expect("migrate");
    }
    let p = Arc::clone(&primary);
    let standby = Arc::new(run_blocking(move || PrivatePg::standby_of(&p)).await);

    let old = connect(&primary.url()).await;
    let mut valid = Vec::new();
    let mut revoked = Vec::new();
    for i in 0..10 {
        let id = insert_user(&old, &format!("fo{i}"), "secret", true).await;
        for n in 0..3 {
            let t = insert_default_token(&old, id).await;
            if n == 0 { &mut revoked } else { &mut valid }.push(t.token);
        }
    }

    // The standby first: until the failover only target_session_attrs keeps knoxgate off it.
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        standby.port, primary.port
    );
    let s = start_unready(fleet_config(&url, "pool_size = 4", "", "")).await;
    s.wait_ready().await;
    let addr = s.addr();
    let status = |t: String| async move {
        http(
            addr,
            "GET",
            "/verify",
            &[("Authorization", &format!("Token {t}"))],
            b"",
        )
        .await
        .status
    };
    // Cache everything, then revoke a third of it on the primary; the feed evicts.
    for t in valid.iter().chain(&revoked) {
        assert_eq!(status(t.clone()).await, 200);
    }
    for t in &revoked {
        delete_token(&old, t).await;
    }
    for t in &revoked {
        let refused = eventually(Duration::from_secs(2), || async {
            status(t.clone()).await == 401
        })
        .await;
        assert!(refused.is_some(), "revocation before the failover not seen");
    }
    // The standby has replayed everything the primary wrote.
    let lsn: String = old
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let replica = connect(&standby.url()).await;
    let caught_up = eventually(Duration::from_secs(10), || async {
        replica
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&lsn],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    assert!(caught_up.is_some(), "standby did not catch up");
    drop(replica);
    drop(old);

    // Load: four clients cycling through valid and revoked tokens.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..4 {
        let (valid, revoked) = (valid.clone(), revoked.clone());
        let (tally, stop, killed_at) = (
            Arc::clone(&tally),
            Arc::clone(&stop),
            Arc::clone(&killed_at),
        );
        clients.push(tokio::spawn(async move {
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let is_valid = n % 3 != 0;
                let t = if is_valid {
                    valid[n % valid.len()].clone()
                } else {
                    revoked[n % revoked.len()].clone()
                };
                let got = http(
                    addr,
                    "GET",
                    "/verify",
                    &[("Authorization", &format!("Token {t}"))],
                    b"",
                )
                .await
                .status;
                {
                    let after_kill = killed_at.lock().unwrap().is_some();
                    let mut k = tally.lock().unwrap();
                    match (is_valid, got) {
                        (true, 200) => {
                            k.valid_ok += 1;
                            if after_kill {
                                k.ok_after_kill += 1;
                            }
                        }
                        (true, 503) => k.valid_unavailable += 1,
                        (false, 401) => k.revoked_refused += 1,
                        (false, 503) => k.revoked_unavailable += 1,
                        (v, s) => k.wrong.push(format!("valid={v} status={s}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Failover: promote the standby, kill the primary.
    let (p, st) = (Arc::clone(&primary), Arc::clone(&standby));
    let promoted = Instant::now();
    run_blocking(move || {
        st.promote();
        assert!(p.stop_immediate(), "old primary did not stop");
    })
    .await;
    *killed_at.lock().unwrap() = Some(Instant::now());
    println!("failover: promote + kill took {:?}", promoted.elapsed());

    // Lookups of a token never seen before work on the new primary.
    let new = connect(&standby.url()).await;
    let id: i32 = new
        .query_one("SELECT id FROM auth_user WHERE username = 'fo0'", &[])
        .await
        .unwrap()
        .get(0);
    let fresh = insert_default_token(&new, id).await;
    let kill = killed_at.lock().unwrap().unwrap();
    let cold = eventually(Duration::from_secs(15), || async {
        status(fresh.token.clone()).await == 200
    })
    .await;
    assert!(cold.is_some(), "no lookup on the new primary within 15 s");
    println!(
        "failover: first cold lookup answered {:?} after the kill",
        kill.elapsed()
    );

    // Logins write on the new primary.
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("fo1:secret")
    );
    let login = eventually(Duration::from_secs(5), || async {
        http(
            addr,
            "POST",
            "/api/auth/login/",
            &[("Authorization", &auth)],
            b"",
        )
        .await
        .status
            == 200
    })
    .await;
    assert!(login.is_some(), "no login on the new primary");

    // The feed is live again, on the new primary.
    let live = eventually(Duration::from_secs(10), || async {
        s.running.app.store.feed_live()
    })
    .await;
    assert!(
        live.is_some(),
        "feed not back: {:?}",
        readyz_status(&s).await
    );
    println!("failover: feed live {:?} after the kill", kill.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    // A revocation made on the new primary reaches knoxgate through the feed.
    let victim = valid[0].clone();
    assert_eq!(status(victim.clone()).await, 200);
    let sql_before = s.metric("knoxgate_sql_statements_total").await;
    assert_eq!(status(victim.clone()).await, 200);
    assert_eq!(
        s.metric("knoxgate_sql_statements_total").await,
        sql_before,
        "hits should be served from cache again once the feed is live"
    );
    delete_token(&new, &victim).await;
    let refused = eventually(Duration::from_secs(2), || async {
        status(victim.clone()).await == 401
    })
    .await;
    assert!(refused.is_some(), "revocation on the new primary not seen");

    s.stop().await;
    let tally = tally.lock().unwrap();
    println!("failover tally: {tally:?}");
    assert!(tally.wrong.is_empty(), "wrong answers: {:?}", tally.wrong);
    assert!(
        tally.ok_after_kill > 0,
        "no valid answer after the failover"
    );
    assert!(tally.revoked_refused > 0);
}
