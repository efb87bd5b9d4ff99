//! A primary whose commits wait for a synchronous standby (`synchronous_standby_names = '*'`),
//! both in temp dirs, and the standby stopped while a login commits: the COMMIT is never
//! cancelled, and the token it makes, which nobody received, is deleted once it lands, however
//! long the standby stays away.

use std::{sync::Arc, time::Duration};

use crate::support::{
    PrivatePg, config_for_url, connect, count, eventually, insert_user, login, rows_of_user,
    run_blocking, start_unready, unique,
};

/// Backends whose COMMIT waits for the synchronous standby.
const WAITING_FOR_THE_STANDBY: &str =
    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'";

/// What Postgres logs (and tells the client) when a cancel ends that wait: the transaction is
/// then committed on the primary alone.
const WAIT_CANCELLED: &str = "canceling wait for synchronous replication";

/// The login is answered 503 at its request deadline (1 s) and its COMMIT given up at the
/// transaction's (4 × 450 ms), while the standby is away for 8 s more. Before, the token was
/// looked for twice, found neither time (a COMMIT waiting for a standby hides its row), and left
/// behind once the standby returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_whose_commit_waits_for_a_stopped_standby_leaves_no_token_once_it_lands() {
    let primary =
        Arc::new(run_blocking(|| PrivatePg::init_and_start("-c synchronous_commit=on")).await);
    let cfg0 = knoxgate::config::Config::from_toml_str(&format!(
        "[postgres]\nurl = \"{}\"",
        primary.url()
    ))
    .unwrap();
    let admin = connect(&primary.url()).await;
    {
        let mut c = connect(&primary.url()).await;
        knoxgate::store::schema::migrate(&mut c, &cfg0.postgres, true)
            .await
            .expect("migrate");
    }
    let alice = insert_user(&admin, "alice", "alice-pass", true).await;
    let p = Arc::clone(&primary);
    let standby = Arc::new(run_blocking(move || PrivatePg::standby_of(&p)).await);
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let synchronous = eventually(Duration::from_secs(10), || async {
        count(
            &admin,
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
        )
        .await
            == 1
    })
    .await;
    assert!(
        synchronous.is_some(),
        "the standby never became synchronous"
    );
    let commit_mode: String = admin
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(commit_mode, "on");

    let s = start_unready(config_for_url(
        &primary.url(),
        &unique("kgsync"),
        "[server]\nrequest_timeout = \"1s\"\n[postgres]\nstatement_timeout = \"200ms\"\n\
         [sessions]\nhash_queue_timeout = \"500ms\"",
    ))
    .await;
    s.wait_ready().await;

    let st = Arc::clone(&standby);
    assert!(
        run_blocking(move || st.stop_immediate()).await,
        "the standby did not stop"
    );
    let r = login(&s, "alice", "alice-pass").await;
    assert_eq!(r.status, 503, "{}", r.body_text());
    let waiting = eventually(Duration::from_secs(2), || async {
        count(&admin, WAITING_FOR_THE_STANDBY).await == 1
    })
    .await;
    assert!(
        waiting.is_some(),
        "the login's COMMIT is not waiting for the standby"
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        count(&admin, WAITING_FOR_THE_STANDBY).await,
        1,
        "the login's COMMIT stopped waiting for the standby"
    );
    assert!(
        !primary.log().contains(WAIT_CANCELLED),
        "a COMMIT was cancelled:\n{}",
        primary.log()
    );

    let st = Arc::clone(&standby);
    run_blocking(move || st.start()).await;
    let landed = eventually(Duration::from_secs(20), || async {
        count(&admin, WAITING_FOR_THE_STANDBY).await == 0
    })
    .await;
    assert!(landed.is_some(), "the COMMIT never landed");
    let deleted = eventually(Duration::from_secs(30), || async {
        rows_of_user(&admin, alice).await == 0
    })
    .await;
    assert!(
        deleted.is_some(),
        "the token of the COMMIT that waited for the standby stays"
    );
    assert!(!primary.log().contains(WAIT_CANCELLED), "{}", primary.log());
    s.stop().await;
}
