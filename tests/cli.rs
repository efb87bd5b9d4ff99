//! The operator CLI (`knoxgate user …`, `knoxgate token …`) run as a process against a test
//! database.

use std::time::Duration;

use crate::support::*;

struct CliOutput {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs the built `knoxgate` binary against this database and Redis prefix.
async fn cli(db: &TestDb, prefix: &str, args: &[&str], stdin: Option<&str>) -> CliOutput {
    cli_at(&db.url, prefix, args, stdin).await
}

/// The same with `postgres.url` = `url`.
async fn cli_at(url: &str, prefix: &str, args: &[&str], stdin: Option<&str>) -> CliOutput {
    cli_with_env(url, prefix, args, stdin, &[]).await
}

/// The same with more `KNOXGATE_*` variables.
async fn cli_with_env(
    url: &str,
    prefix: &str,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> CliOutput {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let url = url.to_owned();
    let prefix = prefix.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let stdin = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_knoxgate"))
            .args(&args)
            .env_clear()
            .env("KNOXGATE_POSTGRES_URL", &url)
            .env("KNOXGATE_REDIS_KEY_PREFIX", &prefix)
            .env("KNOXGATE_SESSIONS_PASSWORD_ITERATIONS", "1000")
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run knoxgate");
        let mut pipe = child.stdin.take().unwrap();
        if let Some(input) = stdin {
            pipe.write_all(input.as_bytes()).unwrap();
        }
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        CliOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn operator_cli_creates_users_and_tokens_and_revokes_them() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let s = TestServer::start(&db, "").await;
    let p = s.prefix.clone();

    let out = cli(
        &db,
        &p,
        &["user", "create", "bob", "--password-stdin"],
        Some("bob-pass\n"),
    )
    .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let stored = stored_password(&client, "bob").await;
    assert!(stored.starts_with("pbkdf2_sha256$1000$"), "{stored}");
    let login_token = login_ok(&s, "bob", "bob-pass").await;
    assert_eq!(s.verify(&login_token).await.status, 200);

    let out = cli(&db, &p, &["token", "create", "--user", "bob"], None).await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let token = out.stdout.trim().to_owned();
    assert_eq!(token.len(), 64, "{}", out.stdout);
    assert!(is_lower_hex(&token), "{token}");
    assert_eq!(rows_matching(&client, &token).await, 1);
    assert_eq!(s.verify(&token).await.status, 200);

    let out = cli(&db, &p, &["token", "revoke", &token], None).await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let revoked = eventually(Duration::from_secs(2), || async {
        s.verify(&token).await.status == 401
    })
    .await;
    assert!(revoked.is_some(), "revoked token still verifies");
    assert_eq!(rows_matching(&client, &token).await, 0);
    assert_eq!(s.verify(&login_token).await.status, 200);

    // This step used to fail about 1 run in 5: see
    // deactivating_a_user_under_concurrent_requests_refuses_their_tokens_within_two_seconds.
    let out = cli(&db, &p, &["user", "deactivate", "bob"], None).await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let refused = eventually(Duration::from_secs(2), || async {
        s.verify(&login_token).await.status == 401
    })
    .await;
    assert!(
        refused.is_some(),
        "a deactivated user's token still verifies"
    );
    assert_detail(
        &s.verify(&login_token).await,
        401,
        "User inactive or deleted.",
    );
    // And he can no longer log in.
    assert_login_refused(
        &login(&s, "bob", "bob-pass").await,
        "Invalid username/password.",
    );

    // Unknown names fail with a message, not silently.
    let out = cli(&db, &p, &["token", "create", "--user", "nobody"], None).await;
    assert!(!out.success);
    let out = cli(&db, &p, &["user", "deactivate", "nobody"], None).await;
    assert!(!out.success);
    s.stop().await;
}

/// Runs `args` and asserts it fails with `message` in its error and no trace of a database
/// failure in its log.
async fn refused(db: &TestDb, args: &[&str], stdin: Option<&str>, message: &str) {
    let out = cli(db, "kgcli", args, stdin).await;
    assert!(!out.success, "{args:?} succeeded: {}", out.stdout);
    assert!(out.stderr.contains(message), "{args:?}: {}", out.stderr);
    assert!(
        !out.stderr.contains("postgres failure"),
        "{args:?}: {}",
        out.stderr
    );
}

#[tokio::test]
async fn operator_cli_refuses_blank_passwords_duplicates_and_inactive_users() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let users = || async {
        let row = client
            .query_one("SELECT count(*) FROM auth_user", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    let create = ["user", "create", "carol", "--password-stdin"];
    // An empty standard input (a script's unset variable), an empty line, only whitespace (blank
    // to Django too), an empty argument.
    refused(&db, &create, Some(""), "no password on standard input").await;
    refused(&db, &create, Some("\n"), "blank passwords are not allowed").await;
    refused(
        &db,
        &create,
        Some("  \t \n"),
        "blank passwords are not allowed",
    )
    .await;
    refused(
        &db,
        &["user", "create", "carol", "--password", ""],
        None,
        "blank passwords are not allowed",
    )
    .await;
    assert_eq!(users().await, 0, "no user made of a blank password");

    let out = cli(&db, "kgcli", &create, Some("carol-pass\n")).await;
    assert!(out.success, "{}", out.stderr);
    refused(
        &db,
        &create,
        Some("other\n"),
        "a user named carol already exists",
    )
    .await;
    refused(
        &db,
        &["user", "set-password", "carol", "--password-stdin"],
        Some(""),
        "no password on standard input",
    )
    .await;
    assert_eq!(users().await, 1);

    // login refuses an inactive user, so does token create.
    let out = cli(
        &db,
        "kgcli",
        &["user", "create", "dave", "--password-stdin", "--inactive"],
        Some("dave-pass\n"),
    )
    .await;
    assert!(out.success, "{}", out.stderr);
    refused(
        &db,
        &["token", "create", "--user", "dave"],
        None,
        "dave is inactive",
    )
    .await;
    let tokens = client
        .query_one("SELECT count(*) FROM knox_authtoken", &[])
        .await
        .unwrap();
    assert_eq!(tokens.get::<_, i64>(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_cli_works_through_pgbouncer_in_transaction_mode() {
    // postgres.url is PgBouncer and postgres.pgbouncer is unset: the commands find out, as
    // `serve` does, and send neither startup options (PgBouncer refuses the connection) nor
    // named statements (another client's server connection would not know them).
    let db = TestDb::migrated().await;
    let bouncer = PgBouncer::start(5432, &db.name, "transaction", 2).await;
    let url = bouncer.url(&db.name);
    let p = unique("kgclipgb");
    let out = cli_at(
        &url,
        &p,
        &["user", "create", "carol", "--password-stdin"],
        Some("pw\n"),
    )
    .await;
    assert!(out.success, "{}", out.stderr);
    let out = cli_at(&url, &p, &["token", "create", "--user", "carol"], None).await;
    assert!(out.success, "{}", out.stderr);
    let token = out.stdout.trim().to_owned();
    let out = cli_at(&url, &p, &["token", "revoke", &token], None).await;
    assert!(out.success, "{}", out.stderr);
    let out = cli_at(&url, &p, &["user", "deactivate", "carol"], None).await;
    assert!(out.success, "{}", out.stderr);
    let c = db.client().await;
    let active: bool = c
        .query_one(
            "SELECT is_active FROM auth_user WHERE username = 'carol'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!active);
    let tokens: i64 = c
        .query_one("SELECT count(*) FROM knox_authtoken", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tokens, 0, "the revoked token's row is gone");
}

/// `token create` whose COMMIT gets no answer (a proxy holds it past the transaction's
/// deadline) fails, and deletes the token it may have made before it exits: nobody was shown
/// it, and under `TOKEN_LIMIT_PER_USER` it would count against the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_whose_commit_goes_unanswered_deletes_its_token_before_exiting() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let bob = insert_user(&client, "bob", "bob-pass", true).await;
    slow_commits(&client, 1.5).await;
    let proxy = SlowProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = db
        .url
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port));
    assert_ne!(url, db.url, "the database URL goes through the proxy");
    let prefix = unique("kgcli");
    // statement_timeout 2 s (longer than the COMMIT): the transaction's deadline is 4 x 2.25 s.
    let create = ["token", "create", "--user", "bob"];
    let timeout = [("KNOXGATE_POSTGRES_STATEMENT_TIMEOUT", "2s")];
    let (out, ()) = tokio::join!(
        cli_with_env(&url, &prefix, &create, None, &timeout),
        async {
            // Once the COMMIT is running, its answer is held for far longer than the deadline.
            let committing = eventually(Duration::from_secs(20), || async {
                count(&client, COMMITS_RUNNING).await == 1
            })
            .await;
            assert!(committing.is_some(), "no COMMIT seen running");
            proxy.set_delay(Duration::from_secs(60));
            assert_committed(&client).await;
            // What is sent from now on goes through at once, so the delete can reach Postgres.
            tokio::time::sleep(Duration::from_millis(300)).await;
            proxy.set_delay(Duration::ZERO);
        }
    );
    assert!(!out.success, "the creation succeeded: {}", out.stdout);
    assert_eq!(out.stdout, "", "a token was printed");
    assert_eq!(
        rows_of_user(&client, bob).await,
        0,
        "the token of the unanswered COMMIT outlived the process: {}",
        out.stderr
    );
}
