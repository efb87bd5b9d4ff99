//! A primary whose commits wait for a synchronous standby (`synchronous_standby_names = '*'`),
//! both in temp dirs, and the standby stopped while knoxgate writes: a COMMIT is never
//! cancelled (that would keep it on the primary alone), a logout that cannot be confirmed is
//! answered 503, never 204, and whatever such a write leaves to do is done once its COMMIT
//! lands, however long the standby stays away.

use std::{sync::Arc, time::Duration};

use crate::support::{
    LOGOUT, PrivatePg, TestServer, config_for_url, connect, count, eventually, http, insert_user,
    login, login_ok, post_with_token, rows_of_user, run_blocking, start_unready, unique,
};

/// Backends whose COMMIT waits for the synchronous standby.
const WAITING_FOR_THE_STANDBY: &str =
    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'";

/// What Postgres logs (and tells the client) when a cancel ends that wait: the transaction is
/// then committed on the primary alone.
const WAIT_CANCELLED: &str = "canceling wait for synchronous replication";

/// A primary and its synchronous standby, user alice, and knoxgate on the primary with a 1 s
/// request deadline and a 200 ms `statement_timeout` (a login transaction's deadline 4 × 450 ms).
struct Synchronous {
    primary: Arc<PrivatePg>,
    standby: Arc<PrivatePg>,
    admin: tokio_postgres::Client,
    alice: i32,
    server: TestServer,
}

impl Synchronous {
    async fn start() -> Synchronous {
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
        let server = start_unready(config_for_url(
            &primary.url(),
            &unique("kgsync"),
            "[server]\nrequest_timeout = \"1s\"\n[postgres]\nstatement_timeout = \"200ms\"\n\
             [sessions]\nhash_queue_timeout = \"500ms\"",
        ))
        .await;
        server.wait_ready().await;
        Synchronous {
            primary,
            standby,
            admin,
            alice,
            server,
        }
    }

    async fn stop_the_standby(&self) {
        let standby = Arc::clone(&self.standby);
        assert!(
            run_blocking(move || standby.stop_immediate()).await,
            "the standby did not stop"
        );
    }

    /// Starts the standby again, and waits until no COMMIT waits for it.
    async fn start_the_standby(&self) {
        let standby = Arc::clone(&self.standby);
        run_blocking(move || standby.start()).await;
        let landed = eventually(Duration::from_secs(20), || async {
            count(&self.admin, WAITING_FOR_THE_STANDBY).await == 0
        })
        .await;
        assert!(landed.is_some(), "the waiting COMMITs never landed");
    }

    /// Waits until one COMMIT waits for the standby.
    async fn assert_one_commit_waits(&self, what: &str) {
        let waiting = eventually(Duration::from_secs(2), || async {
            count(&self.admin, WAITING_FOR_THE_STANDBY).await == 1
        })
        .await;
        assert!(
            waiting.is_some(),
            "{what}'s COMMIT is not waiting for the standby"
        );
    }

    fn assert_no_wait_cancelled(&self) {
        let log = self.primary.log();
        assert!(
            !log.contains(WAIT_CANCELLED),
            "a COMMIT was cancelled:\n{log}"
        );
    }
}

/// The login is answered 503 at its request deadline and its COMMIT given up at the
/// transaction's, while the standby is away for 14 s more. Before, the token was looked for
/// twice, found neither time (a COMMIT waiting for a standby hides its row), and left behind
/// once the standby returned. While the transaction is seen running it is looked at every
/// transaction deadline (1.8 s): the token goes within a few seconds of the COMMIT landing,
/// not at the next of doubling pauses (1.8, 3.6, 7.2, 14.4 s: 12 s after the standby's
/// return), while it counts against the user's token limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_whose_commit_waits_for_a_stopped_standby_leaves_no_token_once_it_lands() {
    let t = Synchronous::start().await;
    t.stop_the_standby().await;
    let r = login(&t.server, "alice", "alice-pass").await;
    assert_eq!(r.status, 503, "{}", r.body_text());
    t.assert_one_commit_waits("the login").await;
    tokio::time::sleep(Duration::from_secs(14)).await;
    assert_eq!(
        count(&t.admin, WAITING_FOR_THE_STANDBY).await,
        1,
        "the login's COMMIT stopped waiting for the standby"
    );
    t.assert_no_wait_cancelled();

    t.start_the_standby().await;
    let deleted = eventually(Duration::from_secs(6), || async {
        rows_of_user(&t.admin, t.alice).await == 0
    })
    .await;
    assert!(
        deleted.is_some(),
        "the token of the COMMIT that waited for the standby is still there 6 s after it landed"
    );
    t.assert_no_wait_cancelled();
    t.server.stop().await;
}

/// A logout whose DELETE cannot be confirmed by the standby is not a logout the client may
/// rely on: 503 (the client tries again), never 204. Once the standby confirms it, the token is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_the_standby_has_not_confirmed_is_answered_503_and_holds_once_it_lands() {
    let t = Synchronous::start().await;
    let token = login_ok(&t.server, "alice", "alice-pass").await;
    let verify = || async {
        http(
            t.server.addr(),
            "GET",
            "/verify",
            &[("Authorization", &format!("Token {token}"))],
            b"",
        )
        .await
        .status
    };
    assert_eq!(verify().await, 200);
    t.stop_the_standby().await;
    let r = post_with_token(&t.server, LOGOUT, &token).await;
    assert_eq!(r.status, 503, "{}", r.body_text());
    t.assert_one_commit_waits("the logout").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    t.assert_no_wait_cancelled();

    t.start_the_standby().await;
    let refused = eventually(Duration::from_secs(5), || async { verify().await == 401 }).await;
    assert!(refused.is_some(), "the logged-out token is still accepted");
    assert_eq!(rows_of_user(&t.admin, t.alice).await, 0);
    t.assert_no_wait_cancelled();
    t.server.stop().await;
}
