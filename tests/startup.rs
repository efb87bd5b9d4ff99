//! Startup and process behaviour: refusing to start without triggers or with a bad config,
//! `migrate`, draining on SIGTERM, the runtime's thread count, and a custom user model's
//! columns.

use std::time::Duration;

use knoxgate::auth::{HashAlgorithm, generate_token};

use crate::support::*;

const TEN_HOURS: Option<Duration> = Some(Duration::from_secs(36_000));

#[tokio::test]
async fn notify_mode_without_triggers_refuses_to_start_naming_both_fixes() {
    let db = TestDb::new().await;
    let cfg = config_for(&db, "kgx", "");
    let mut client = db.client().await;
    knoxgate::store::schema::migrate(&mut client, &cfg.postgres, false)
        .await
        .unwrap();
    let err = knoxgate::app::start(cfg).await.err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("knoxgate migrate") && msg.contains("ttl"),
        "{msg}"
    );
}

#[tokio::test]
async fn migrate_creates_django_schema_once_and_never_alters() {
    let db = TestDb::new().await;
    let cfg = config_for(&db, "kgx", "");
    let mut client = db.client().await;
    let first = knoxgate::store::schema::migrate(&mut client, &cfg.postgres, true)
        .await
        .unwrap();
    assert_eq!(
        first.created_tables,
        vec![
            "auth_user",
            "knox_authtoken",
            "auth_group",
            "auth_user_groups"
        ]
    );
    let cols = columns(&client).await;
    assert!(
        cols.contains(&"knox_authtoken.digest character varying NO 128".to_owned()),
        "{cols:?}"
    );
    assert!(cols.contains(&"knox_authtoken.token_key character varying NO 25".to_owned()));
    assert!(cols.contains(&"auth_user.username character varying NO 150".to_owned()));
    let second = knoxgate::store::schema::migrate(&mut client, &cfg.postgres, true)
        .await
        .unwrap();
    assert!(second.created_tables.is_empty());
    assert_eq!(columns(&client).await, cols);
    assert!(
        knoxgate::store::schema::triggers_installed(&client, &cfg.postgres, true)
            .await
            .unwrap()
    );
    knoxgate::store::schema::uninstall_triggers(&mut client, &cfg.postgres)
        .await
        .unwrap();
    assert!(
        !knoxgate::store::schema::triggers_installed(&client, &cfg.postgres, true)
            .await
            .unwrap()
    );
    knoxgate::store::schema::uninstall_triggers(&mut client, &cfg.postgres)
        .await
        .unwrap();
}

#[tokio::test]
async fn binary_drains_and_exits_zero_on_sigterm() {
    let db = TestDb::migrated().await;
    let binary = Binary::spawn(&db.url, &[]);
    assert!(binary.wait_up(Duration::from_secs(10)).await);
    assert_eq!(
        http(binary.admin, "GET", "/healthz", &[], b"").await.status,
        200
    );
    assert_eq!(binary.terminate().await.code(), Some(0));
}

#[tokio::test]
async fn the_runtime_has_as_many_worker_threads_as_configured() {
    let db = TestDb::migrated().await;
    let cores = std::thread::available_parallelism().unwrap().get();
    for (setting, want) in [("1", 1), ("3", 3), ("0", cores)] {
        let binary = Binary::spawn(&db.url, &[("KNOXGATE_WORKER_THREADS", setting.into())]);
        assert!(binary.wait_up(Duration::from_secs(10)).await);
        let workers = metric(binary.admin, "knoxgate_runtime_worker_threads ").await;
        assert_eq!(workers, want as f64, "worker_threads = {setting}");
        binary.kill().await;
    }
}

#[tokio::test]
async fn bad_config_fails_at_startup_naming_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_knoxgate"))
        .arg("check-config")
        .env("KNOXGATE_SERVER_TIMEOUT", "5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KNOXGATE_SERVER_TIMEOUT"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_knoxgate"))
        .arg("check-config")
        .env("KNOXGATE_REQUEST_TIMEOUT", "5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("request_timeout"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_knoxgate"))
        .arg("check-config")
        .output()
        .unwrap();
    assert!(out.status.success());
}

async fn columns(c: &tokio_postgres::Client) -> Vec<String> {
    c.query(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text, \
         coalesce(character_maximum_length, 0) FROM information_schema.columns \
         WHERE table_name IN ('auth_user','knox_authtoken') ORDER BY 1, ordinal_position",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        format!(
            "{}.{} {} {} {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, i32>(4)
        )
    })
    .collect()
}

#[tokio::test]
async fn custom_user_model_columns_are_configurable() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE accounts_member (uid integer PRIMARY KEY, login varchar(254) UNIQUE NOT NULL, \
             secret varchar(128) NOT NULL, enabled boolean NOT NULL);
             CREATE TABLE knox_authtoken (digest varchar(128) PRIMARY KEY, created timestamptz NOT NULL, \
             user_id integer NOT NULL REFERENCES accounts_member(uid) DEFERRABLE INITIALLY DEFERRED, \
             expiry timestamptz, token_key varchar(25) NOT NULL);",
        )
        .await
        .unwrap();
    let encoded = knoxgate::password::make_password("pw", 1000);
    client
        .execute(
            "INSERT INTO accounts_member VALUES (41, 'ada@example.com', $1, true)",
            &[&encoded],
        )
        .await
        .unwrap();
    let t = insert_token(&client, 41, TEN_HOURS, "", HashAlgorithm::Sha512).await;
    // Its login is its email too (USERNAME_FIELD = "email"): one column, named once.
    let columns = "[postgres]\nuser_table = \"accounts_member\"\nuser_id_column = \"uid\"\n\
                   username_column = \"login\"\nemail_column = \"login\"\nis_active_column = \"enabled\"\n\
                   password_column = \"secret\"\nlast_login_column = \"\"\n\
                   is_staff_column = \"\"\nis_superuser_column = \"\"\nuser_groups_table = \"\"";
    let cfg = config_for(&db, "kgx", columns);
    knoxgate::store::schema::migrate(&mut db.client().await, &cfg.postgres, true)
        .await
        .unwrap();
    let s = TestServer::start(&db, columns).await;
    let r = s.verify(&t.token).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-auth-user-id"), Some("41"));
    // Groups are not read: a group rule cannot be applied, which is a configuration error
    // (500), never a denial of the group's members. A missing flag column counts as false.
    let auth = format!("Token {}", t.token);
    for (query, want) in [("group=ops", 500), ("require=staff", 403)] {
        let path = format!("/verify?{query}");
        let r = http(s.addr(), "GET", &path, &[("Authorization", &auth)], b"").await;
        assert_eq!(r.status, want, "{query}: {}", r.body_text());
    }
    // Login through the custom columns (no last_login column to stamp).
    let basic = format!("Basic {}", base64_of("ada@example.com:pw"));
    let r = http(
        s.addr(),
        "POST",
        "/api/auth/login/",
        &[("Authorization", &basic)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    // The trigger on the custom active column reaches the cache.
    client
        .execute("UPDATE accounts_member SET enabled = false", &[])
        .await
        .unwrap();
    let refused = eventually(Duration::from_secs(2), || async {
        s.verify(&t.token).await.status == 401
    })
    .await;
    assert!(refused.is_some());
    s.stop().await;
    // With custom columns, knoxgate does not invent the tables.
    let empty = TestDb::new().await;
    let cfg = config_for(&empty, "kgx", columns);
    let err = knoxgate::store::schema::migrate(&mut empty.client().await, &cfg.postgres, true)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Django's migrate"), "{err}");
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn an_instance_started_while_postgres_is_down_serves_tokens_redis_holds() {
    // README, "Postgres down": with cache.stale_if_error (the default) tokens already cached
    // keep being served. That includes tokens this instance never saw, when the shared Redis
    // holds knoxgate's entry for them (it carries the user's status): a replica restarted
    // during a Postgres outage serves the same tokens as the others. Entries only Django wrote
    // are not enough on their own.
    let (db, _client, s) = Fixture::new().user("alice").start().await;
    let token = login_ok(&s, "alice", "alice-pass").await;
    // A second token whose Redis entry is in django-rest-knox-redis's format, as Django writes
    // it: without knoxgate's field it says nothing of whether the user is still active.
    let django_token = login_ok(&s, "alice", "alice-pass").await;
    let key = redis_key(&s, &django_token);
    let mut entry: serde_json::Value =
        serde_json::from_str(redis_cli(6379, &["GET", &key]).trim()).expect("knoxgate entry");
    entry
        .as_object_mut()
        .unwrap()
        .remove("knoxgate")
        .expect("knoxgate's field");
    redis_cli(6379, &["SET", &key, &entry.to_string(), "EX", "300"]);
    let prefix = s.prefix.clone();
    s.stop().await;
    let port = free_port();
    let cfg = config_for_url(
        &format!("postgres://postgres@127.0.0.1:{port}/x"),
        &prefix,
        "",
    );
    let running = knoxgate::app::start(cfg)
        .await
        .expect("starts without postgres");
    let redis_up = eventually(Duration::from_secs(4), || async {
        running.app.store.redis().is_some_and(|r| r.is_connected())
    })
    .await;
    assert!(redis_up.is_some(), "redis never connected");
    let header = format!("Token {token}");
    let r = http(
        running.addr,
        "GET",
        "/verify",
        &[("Authorization", &header)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    // A Django-format entry is only a hint: Postgres must confirm the user, so without it the
    // answer is 503 (fail closed), never a 200 for a user who may have been deactivated.
    let r = http(
        running.addr,
        "GET",
        "/verify",
        &[("Authorization", &format!("Token {django_token}"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body_text());
    // A token nobody cached: no answer can be given without Postgres.
    let r = http(
        running.addr,
        "GET",
        "/verify",
        &[("Authorization", &format!("Token {}", "0".repeat(64)))],
        b"",
    )
    .await;
    assert_eq!(r.status, 503);
    running.shutdown().await;
    drop(db);
}

/// A user id holding '|' (a text primary key: an email address) is one id in the change feed,
/// not two fields: deleting the user's token and deactivating the user each reach the cache
/// at once, as for any user.
#[tokio::test]
async fn a_user_id_holding_a_bar_is_revoked_as_any_other() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE accounts_member (email varchar(254) PRIMARY KEY, \
             secret varchar(128) NOT NULL, enabled boolean NOT NULL);
             CREATE TABLE knox_authtoken (digest varchar(128) PRIMARY KEY, created timestamptz NOT NULL, \
             user_id varchar(254) NOT NULL REFERENCES accounts_member(email) DEFERRABLE INITIALLY DEFERRED, \
             expiry timestamptz, token_key varchar(25) NOT NULL);
             INSERT INTO accounts_member VALUES ('x|y%7C@example.com', '!', true);",
        )
        .await
        .unwrap();
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let token = generate_token("", 64);
        let digest = HashAlgorithm::Sha512.hex_digest(token.as_bytes());
        client
            .execute(
                "INSERT INTO knox_authtoken VALUES ($1, now(), 'x|y%7C@example.com', \
                 now() + interval '10 hours', left($2, 15))",
                &[&digest, &token],
            )
            .await
            .unwrap();
        tokens.push(token);
    }
    let columns = "[postgres]\nuser_table = \"accounts_member\"\nuser_id_column = \"email\"\n\
                   username_column = \"email\"\nemail_column = \"email\"\nis_active_column = \"enabled\"\n\
                   password_column = \"secret\"\nlast_login_column = \"\"\n\
                   is_staff_column = \"\"\nis_superuser_column = \"\"\nuser_groups_table = \"\"";
    let cfg = config_for(&db, "kgbar", columns);
    knoxgate::store::schema::migrate(&mut db.client().await, &cfg.postgres, true)
        .await
        .unwrap();
    let s = TestServer::start(&db, columns).await;
    for t in &tokens {
        let r = s.verify(t).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-auth-user-id"), Some("x|y%7C@example.com"));
    }
    let revoked_within = |token: &str| {
        let (s, token) = (&s, token.to_owned());
        async move {
            eventually(Duration::from_secs(2), || async {
                s.verify(&token).await.status == 401
            })
            .await
            .is_some()
        }
    };
    client
        .execute(
            "DELETE FROM knox_authtoken WHERE token_key = left($1, 15)",
            &[&tokens[0]],
        )
        .await
        .unwrap();
    assert!(
        revoked_within(&tokens[0]).await,
        "the deleted token is still answered"
    );
    assert_eq!(s.verify(&tokens[1]).await.status, 200);
    client
        .execute("UPDATE accounts_member SET enabled = false", &[])
        .await
        .unwrap();
    assert!(
        revoked_within(&tokens[1]).await,
        "the deactivated user's token is still answered"
    );
    s.stop().await;
}
