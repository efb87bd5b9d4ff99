//! Postgres for tests: a private database per test on the machine's Postgres, dropped with it.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use tokio_postgres::NoTls;

use super::{config_for_url, eventually, unique};

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database of its own, dropped (with FORCE) when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = unique("knoxgate_test");
        let client = connect(PG_ADMIN).await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        TestDb { name, url }
    }

    /// A new database with the Django schema and the change-feed triggers.
    pub async fn migrated() -> TestDb {
        let db = TestDb::new().await;
        migrate(&db.url).await;
        db
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-q", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Creates the Django schema and the change-feed triggers in the database at `url`.
pub async fn migrate(url: &str) {
    let cfg = config_for_url(url, &unique("kg"), "");
    let mut client = connect(url).await;
    knoxgate::store::schema::migrate(&mut client, &cfg.postgres, true)
        .await
        .expect("migrate");
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    try_connect(url).await.expect("connect to postgres")
}

pub async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Connects, retrying every 20 ms (2 s per attempt) until `limit` passes.
pub async fn connect_retry(url: &str, limit: Duration) -> tokio_postgres::Client {
    let start = std::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), try_connect(url)).await {
            Ok(Ok(c)) => return c,
            other => {
                if start.elapsed() > limit {
                    panic!("cannot connect to postgres at {url}: {other:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Makes the COMMIT of every token row take `seconds` longer: a deferred trigger sleeps in it.
/// Its table `committed` gets a row in the token's own transaction, so it shows that the
/// COMMIT happened.
pub async fn slow_commits(client: &tokio_postgres::Client, seconds: f64) {
    client
        .batch_execute(&format!(
            "CREATE TABLE committed (digest text);
             CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO committed VALUES (NEW.digest);
                 PERFORM pg_sleep({seconds});
                 RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON knox_authtoken
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();"
        ))
        .await
        .unwrap();
}

/// The count a `SELECT count(*) …` finds.
pub async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits (up to 10 s) for a token's COMMIT to have happened (see [`slow_commits`]).
pub async fn assert_committed(client: &tokio_postgres::Client) {
    let committed = eventually(Duration::from_secs(10), || async {
        count(client, "SELECT count(*) FROM committed").await == 1
    })
    .await;
    assert!(committed.is_some(), "the token's COMMIT never happened");
}

/// Sessions of this database running a COMMIT.
pub const COMMITS_RUNNING: &str = "SELECT count(*) FROM pg_stat_activity \
                                   WHERE datname = current_database() AND query = 'COMMIT' \
                                     AND state = 'active'";

/// Sessions of this database waiting for a lock.
pub const LOCK_WAITS: &str = "SELECT count(*) FROM pg_stat_activity \
                          WHERE datname = current_database() AND wait_event_type = 'Lock'";

/// Runs `request` to its end while running `sql` (a count) every 20 ms: its answer, and
/// whether the count was ever 1 or more meanwhile.
pub async fn while_watching<T>(
    client: &tokio_postgres::Client,
    sql: &str,
    request: impl std::future::Future<Output = T>,
) -> (T, bool) {
    let mut request = std::pin::pin!(request);
    let mut seen = false;
    loop {
        tokio::select! {
            answer = &mut request => return (answer, seen),
            () = tokio::time::sleep(Duration::from_millis(20)) => {
                seen |= count(client, sql).await > 0;
            }
        }
    }
}

/// Sends `login`, a login of `username` whose request deadline is shorter than its
/// `statement_timeout` (5 s), while the test holds that user's row lock, and asserts that it is
/// answered 503 while its transaction waits for the lock, and that the wait ends (its
/// statement cancelled) within 2 s although the lock is still held. Returns the lock's holder,
/// still inside its transaction, for the caller to end. `context` is added to a failure's
/// message.
pub async fn assert_abandoned_login_lets_go_of_the_lock(
    db: &TestDb,
    client: &tokio_postgres::Client,
    username: &str,
    login: impl std::future::Future<Output = super::Response>,
    context: impl FnOnce() -> String,
) -> tokio_postgres::Client {
    let holder = db.client().await;
    holder.execute("BEGIN", &[]).await.unwrap();
    holder
        .execute(
            "SELECT 1 FROM auth_user WHERE username = $1 FOR UPDATE",
            &[&username],
        )
        .await
        .unwrap();
    let (r, waited) = while_watching(client, LOCK_WAITS, login).await;
    assert_eq!(r.status, 503, "{}", r.body_text());
    assert!(
        waited,
        "the login's transaction was not seen waiting for the lock"
    );
    // Without the cancel the wait lasts until 5 s after the statement began.
    let released = eventually(Duration::from_secs(2), || async {
        count(client, LOCK_WAITS).await == 0
    })
    .await;
    assert!(
        released.is_some(),
        "the abandoned login still waits for the lock 2 s after its 503{}",
        context()
    );
    holder
}
