//! What an entry in Redis may be trusted for. With `redis.entry_key`, knoxgate's user status in
//! an entry counts only under a valid MAC: an entry forged by whoever can write Redis is a hint
//! confirmed with Postgres. And an entry copied from Redis into the in-process tier lives there
//! no longer than its Redis key has left. The instances here keep nothing in process unless
//! said otherwise, so their answers come from Redis or Postgres.

use std::time::Duration;

use knoxgate::auth::{HashAlgorithm, generate_token, token_key_of};

use crate::support::*;

const ENTRY_KEY: &str = "6b6e6f78676174652d746573742d656e7472792d6b6579";

/// An instance without an in-process tier, with or without the entry key.
async fn redis_only(db: &TestDb, entry_key: Option<&str>) -> TestServer {
    let key = entry_key.map_or_else(String::new, |k| format!("entry_key = \"{k}\"\n"));
    TestServer::start(db, &format!("[redis]\n{key}[cache]\nmemory_max_bytes = 1")).await
}

/// A knoxgate-format entry, written by someone who can write Redis, that claims `token` for
/// `user_id` (an active user), with or without a made-up MAC.
fn forged_entry(token: &str, user_id: i32, fake_mac: bool) -> String {
    let digest = HashAlgorithm::Sha512.hex_digest(token.as_bytes());
    let seal = if fake_mac {
        format!(", \"until\": 4102444800, \"mac\": \"{}\"", "ab".repeat(32))
    } else {
        String::new()
    };
    format!(
        "{{\"schema_version\": 2, \"digest\": \"{digest}\", \"user_id\": {user_id}, \
         \"created\": \"2026-01-01T00:00:00+00:00\", \"expiry\": \"2099-01-01T00:00:00+00:00\", \
         \"token_key\": \"{}\", \"knoxgate\": {{\"is_active\": true, \"is_staff\": true, \
         \"is_superuser\": true, \"groups\": []{seal}}}}}",
        token_key_of(token)
    )
}

fn set_entry(s: &TestServer, token: &str, entry: &str) {
    let key = format!("{}:token:{}", s.prefix, token_key_of(token));
    redis_cli(6379, &["SET", &key, entry, "EX", "300"]);
}

/// Waits until `s` answers `token` from a Redis entry it wrote itself.
async fn written_by_knoxgate(s: &TestServer, token: &str) -> String {
    let key = format!("{}:token:{}", s.prefix, token_key_of(token));
    let written = eventually(Duration::from_secs(10), || async {
        s.verify(token).await.status == 200 && redis_cli(6379, &["EXISTS", &key]) == "1"
    })
    .await;
    assert!(written.is_some(), "knoxgate never wrote the entry");
    redis_cli(6379, &["GET", &key])
}

#[tokio::test]
async fn without_an_entry_key_a_forged_entry_is_believed() {
    // The documented risk that `redis.entry_key` removes: kept visible by this test.
    let db = TestDb::migrated().await;
    let s = redis_only(&db, None).await;
    let alice = user_with_token(&db, "nokey_alice").await;
    let bob = user_with_token(&db, "nokey_bob").await;
    let entry = written_by_knoxgate(&s, &alice.token).await;
    assert!(!entry.contains("\"mac\""), "{entry}");
    // Each try a new forged token: while the feed is not current (a statement of its own
    // holding notifications back, right after it went live under load), a hit is confirmed
    // with Postgres, which refuses the token and drops its entry.
    let believed = eventually(Duration::from_secs(5), || async {
        let forged = generate_token("", 64);
        set_entry(&s, &forged, &forged_entry(&forged, bob.user_id, false));
        let r = s.verify(&forged).await;
        r.status == 200 && r.header("x-auth-user-id") == Some(bob.user_id.to_string().as_str())
    })
    .await;
    assert!(believed.is_some(), "a forged entry was never believed");
    s.stop().await;
}

#[tokio::test]
async fn with_an_entry_key_forged_entries_are_confirmed_with_postgres() {
    let db = TestDb::migrated().await;
    let s = redis_only(&db, Some(ENTRY_KEY)).await;
    let alice = user_with_token(&db, "key_alice").await;
    let bob = user_with_token(&db, "key_bob").await;
    let alice_id = alice.user_id.to_string();
    // knoxgate's own entries are sealed.
    let entry = written_by_knoxgate(&s, &alice.token).await;
    assert!(
        entry.contains("\"until\": ") && entry.contains("\"mac\": \""),
        "{entry}"
    );
    // A token Postgres never saw, claimed for bob: with no MAC, or a made-up one.
    for fake_mac in [false, true] {
        let forged = generate_token("", 64);
        set_entry(&s, &forged, &forged_entry(&forged, bob.user_id, fake_mac));
        for _ in 0..5 {
            assert_eq!(s.verify(&forged).await.status, 401, "fake mac: {fake_mac}");
        }
    }
    // alice's genuine, sealed entry moved to bob's user id: the MAC no longer holds, and
    // Postgres says whose token it is.
    let moved = entry.replacen(
        &format!("\"user_id\": {alice_id}"),
        &format!("\"user_id\": {}", bob.user_id),
        1,
    );
    assert_ne!(moved, entry);
    set_entry(&s, &alice.token, &moved);
    for _ in 0..5 {
        let r = s.verify(&alice.token).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-auth-user-id"), Some(alice_id.as_str()));
    }
    // An instance with another key treats the genuine entry as a hint too: still alice.
    let other = redis_only(&db, Some("another-key-another-key-another-key-another-key")).await;
    let r = other.verify(&alice.token).await;
    assert_eq!(r.header("x-auth-user-id"), Some(alice_id.as_str()));
    s.stop().await;
    other.stop().await;
}

/// An entry read from Redis with little time left lives no longer in process: when the Redis
/// key is gone, the next answer is not an in-process hit.
#[tokio::test]
async fn an_entry_copied_from_redis_lives_no_longer_than_its_redis_key() {
    let db = TestDb::migrated().await;
    let prefix = unique("kgttl");
    let ttl = "[redis]\nmax_cache_ttl = \"3s\"\n";
    let writer =
        TestServer::start_with_prefix(&db, &prefix, &format!("{ttl}[cache]\nmemory_max_bytes = 1"))
            .await;
    let reader = TestServer::start_with_prefix(&db, &prefix, ttl).await;
    let t = user_with_token(&db, "short").await;
    let key = format!("{prefix}:token:{}", token_key_of(&t.token));
    // The writer loads the token from Postgres and writes it to Redis for at most 3 s.
    let written = eventually(Duration::from_secs(10), || async {
        writer.verify(&t.token).await.status == 200 && redis_cli(6379, &["EXISTS", &key]) == "1"
    })
    .await;
    assert!(written.is_some());
    // Some time later the reader's first answer comes from that entry.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pttl: i64 = redis_cli(6379, &["PTTL", &key]).parse().unwrap();
    assert!(pttl > 0 && pttl <= 1500, "{pttl} ms left");
    let redis_hits = "knoxgate_cache_lookups_total{tier=\"redis\",result=\"hit\"";
    let memory_hits = "knoxgate_cache_lookups_total{tier=\"memory\",result=\"hit\"";
    assert_eq!(reader.verify(&t.token).await.status, 200);
    assert_eq!(reader.metric(redis_hits).await, 1.0);
    // While the Redis key lives, the reader answers from its in-process copy.
    assert_eq!(reader.verify(&t.token).await.status, 200);
    assert_eq!(reader.metric(memory_hits).await, 1.0);
    // Once the Redis key has expired, so has the copy (with a fresh 3 s it would live on).
    let gone = eventually(Duration::from_secs(3), || async {
        redis_cli(6379, &["EXISTS", &key]) == "0"
    })
    .await;
    assert!(gone.is_some());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(reader.verify(&t.token).await.status, 200);
    assert_eq!(
        reader.metric(memory_hits).await,
        1.0,
        "the in-process copy outlived its Redis key"
    );
    writer.stop().await;
    reader.stop().await;
}

#[tokio::test]
async fn an_entry_that_lives_longer_than_knoxgate_writes_them_is_confirmed() {
    let db = TestDb::migrated().await;
    let s = redis_only(&db, None).await;
    let t = user_with_token(&db, "longlived").await;
    written_by_knoxgate(&s, &t.token).await;
    let key = format!("{}:token:{}", s.prefix, token_key_of(&t.token));
    // As written: at most redis.max_cache_ttl (300 s) left, answered from Redis with no SQL.
    let pttl: i64 = redis_cli(6379, &["PTTL", &key]).parse().unwrap();
    assert!(pttl > 0 && pttl <= 300_000, "{pttl} ms left");
    // Retried: while the feed is not current (the user's and token's own notifications still
    // being applied, under load), a Redis hit is confirmed with Postgres.
    let from_redis = eventually(Duration::from_secs(5), || async {
        let sql = s.metric("knoxgate_sql_statements_total").await;
        s.verify(&t.token).await.status == 200
            && s.metric("knoxgate_sql_statements_total").await == sql
    })
    .await;
    assert!(
        from_redis.is_some(),
        "never answered from Redis without SQL"
    );
    // Ten times that (a writer whose clock runs ahead), or no expiry at all: either could
    // outlive the tombstone of a revocation whose DEL it missed, so Postgres is asked.
    for outlives in [vec!["EXPIRE", &key, "3000"], vec!["PERSIST", &key]] {
        redis_cli(6379, &outlives);
        let sql = s.metric("knoxgate_sql_statements_total").await;
        assert_eq!(s.verify(&t.token).await.status, 200);
        assert_eq!(
            s.metric("knoxgate_sql_statements_total").await,
            sql + 1.0,
            "{outlives:?}: answered from Redis without asking Postgres"
        );
    }
    s.stop().await;
}
