//! AUTO_REFRESH: how `/verify` moves a token's expiry forward, and when it does not.

use std::time::Duration;

use time::OffsetDateTime;

use crate::support::*;

const TEN_HOURS: time::Duration = time::Duration::hours(10);

const REFRESH_WRITES: &str = "knoxgate_sql_statements_total{statement=\"refresh_expiry\"}";

#[tokio::test]
async fn auto_refresh_writes_only_when_expiry_moves_more_than_min_refresh_interval() {
    let (_db, client, s) = Fixture::new()
        .user("erin")
        .config("[knox]\nauto_refresh = true")
        .start()
        .await;
    let token = login_ok(&s, "erin", "erin-pass").await;
    let at_login = db_expiry(&client, &token).await.unwrap();
    // Right after login the refresh would move expiry by less than 60 s: nothing is written.
    assert_eq!(s.verify(&token).await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(db_expiry(&client, &token).await, Some(at_login));
    assert_eq!(s.metric(REFRESH_WRITES).await, 0.0);

    // Django moves expiry to now+1h; the feed evicts the caches; the next use writes now+10h.
    client
        .execute(
            "UPDATE knox_authtoken SET expiry = now() + interval '1 hour' \
             WHERE token_key = left($1, 15)",
            &[&token],
        )
        .await
        .unwrap();
    let moved = eventually(Duration::from_secs(3), || async {
        assert_eq!(s.verify(&token).await.status, 200);
        db_expiry(&client, &token)
            .await
            .is_some_and(|e| e > OffsetDateTime::now_utc() + time::Duration::hours(9))
    })
    .await;
    assert!(moved.is_some(), "expiry was not refreshed");
    let refreshed = db_expiry(&client, &token).await.unwrap();
    assert!(
        within(
            refreshed,
            OffsetDateTime::now_utc() + TEN_HOURS,
            time::Duration::seconds(5)
        ),
        "{refreshed}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.metric(REFRESH_WRITES).await,
        1.0,
        "one refresh, one write"
    );

    // Requests right after the refresh write nothing more.
    for _ in 0..3 {
        assert_eq!(s.verify(&token).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.metric(REFRESH_WRITES).await, 1.0);
    assert_eq!(db_expiry(&client, &token).await, Some(refreshed));
    s.stop().await;
}

#[tokio::test]
async fn auto_refresh_is_capped_at_created_plus_auto_refresh_max_ttl() {
    let (_db, client, s) = Fixture::new()
        .user("erin")
        .config("[knox]\nauto_refresh = true\nauto_refresh_max_ttl = \"2h\"")
        .start()
        .await;
    let token = login_ok(&s, "erin", "erin-pass").await;
    assert_eq!(s.verify(&token).await.status, 200);
    client
        .execute(
            "UPDATE knox_authtoken SET created = now() - interval '1 hour', \
             expiry = now() + interval '1 minute' WHERE token_key = left($1, 15)",
            &[&token],
        )
        .await
        .unwrap();
    let capped = eventually(Duration::from_secs(3), || async {
        assert_eq!(s.verify(&token).await.status, 200);
        client
            .query_one(
                "SELECT expiry = created + interval '2 hours' FROM knox_authtoken \
                 WHERE token_key = left($1, 15)",
                &[&token],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    assert!(capped.is_some(), "expiry did not become created + 2h");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.metric(REFRESH_WRITES).await, 1.0);
    s.stop().await;
}

#[tokio::test]
async fn auto_refresh_never_touches_tokens_without_expiry() {
    let (_db, client, s) = Fixture::new()
        .user("erin")
        .config("[knox]\nauto_refresh = true\ntoken_ttl = \"none\"")
        .start()
        .await;
    let token = login_ok(&s, "erin", "erin-pass").await;
    for _ in 0..3 {
        assert_eq!(s.verify(&token).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(db_expiry(&client, &token).await, None);
    assert_eq!(s.metric(REFRESH_WRITES).await, 0.0);
    s.stop().await;
}

#[tokio::test]
async fn logout_does_not_refresh_the_token_it_deletes() {
    // A refresh written as the logout deletes the token could put its Redis entry back after
    // the logout removed it, where other instances would find it.
    let (_db, client, s) = Fixture::new()
        .user("erin")
        .config("[knox]\nauto_refresh = true")
        .start()
        .await;
    for endpoint in [LOGOUT, LOGOUT_ALL] {
        let token = login_ok(&s, "erin", "erin-pass").await;
        // Due for a refresh (expiry an hour away, the TTL ten hours), and Postgres knows it
        // before any cache is filled.
        client
            .execute(
                "UPDATE knox_authtoken SET expiry = now() + interval '1 hour' \
                 WHERE token_key = left($1, 15)",
                &[&token],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let writes = s.metric(REFRESH_WRITES).await;
        let r = post_with_token(&s, endpoint, &token).await;
        assert_eq!(r.status, 204, "{}", r.body_text());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            s.metric(REFRESH_WRITES).await,
            writes,
            "{endpoint} refreshed"
        );
        assert_eq!(redis_cli(6379, &["EXISTS", &redis_key(&s, &token)]), "0");
        assert_eq!(s.verify(&token).await.status, 401);
    }
    s.stop().await;
}

/// `ttl` mode (no feed) with a refresh due about every second of use, and this
/// `redis.max_cache_ttl`: erin's token, issued and verified once.
async fn refreshing_in_ttl_mode(
    max_cache_ttl: &str,
) -> (TestDb, tokio_postgres::Client, TestServer, String) {
    let (db, client, s) = Fixture::new()
        .user("erin")
        .config(&format!(
            "[knox]\nauto_refresh = true\nmin_refresh_interval = \"1s\"\n\
             [cache]\nconsistency = \"ttl\"\n[redis]\nmax_cache_ttl = \"{max_cache_ttl}\""
        ))
        .start()
        .await;
    let token = login_ok(&s, "erin", "erin-pass").await;
    assert_eq!(s.verify(&token).await.status, 200);
    (db, client, s, token)
}

/// Uses `token` every 300 ms (a refresh falls due about every second) until it is refused;
/// false if it is still allowed after 6 s.
async fn refused_while_in_use(s: &TestServer, token: &str) -> bool {
    eventually(Duration::from_secs(6), || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.verify(token).await.status == 401
    })
    .await
    .is_some()
}

/// The `ttl` mode's bound (`redis.max_cache_ttl`) holds for a token in steady use: a refresh
/// moves the cached expiry but never lets the cached answer live longer, and a refresh that
/// finds the row gone drops it at once.
#[tokio::test]
async fn a_refresh_never_keeps_a_token_deleted_unheard_past_max_cache_ttl() {
    let (_db, client, s, token) = refreshing_in_ttl_mode("3s").await;
    client
        .execute(
            "DELETE FROM knox_authtoken WHERE token_key = left($1, 15)",
            &[&token],
        )
        .await
        .unwrap();
    // Each refresh used to put the entry back for another max_cache_ttl, so the deleted token
    // was allowed for as long as it was used.
    assert!(
        refused_while_in_use(&s, &token).await,
        "a deleted token in use stayed allowed"
    );
    assert!(
        s.metric(REFRESH_WRITES).await >= 1.0,
        "no refresh was tried"
    );
    s.stop().await;
}

/// What a refresh writes to Redis is the user as Postgres has them in the same statement, not
/// the cached status: a deactivation this instance did not hear (`ttl` mode) ends the token at
/// the next refresh, and Redis never gets the user back as active.
#[tokio::test]
async fn a_refresh_shares_the_user_postgres_has_not_the_cached_one() {
    let (_db, client, s, token) = refreshing_in_ttl_mode("60s").await;
    client
        .execute(
            "UPDATE auth_user SET is_active = false WHERE username = 'erin'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        refused_while_in_use(&s, &token).await,
        "a deactivated user's token stayed allowed through its refreshes"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        redis_cli(6379, &["EXISTS", &redis_key(&s, &token)]),
        "0",
        "Redis holds the deactivated user's token"
    );
    s.stop().await;
}

/// A refresh never brings back a token whose expiry was set into the past (Django's way to end
/// a token without deleting it) while this instance still had it cached as live (`ttl` mode,
/// nothing heard): the refresh finds no live row to move and the token ends.
#[tokio::test]
async fn a_refresh_never_revives_a_token_expired_unheard() {
    let (_db, client, s, token) = refreshing_in_ttl_mode("60s").await;
    client
        .execute(
            "UPDATE knox_authtoken SET expiry = now() - interval '1 second' \
             WHERE token_key = left($1, 15)",
            &[&token],
        )
        .await
        .unwrap();
    assert!(
        refused_while_in_use(&s, &token).await,
        "a token expired in Postgres stayed allowed through its refreshes"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Gone (a lookup deletes an expired token, as knox does) or still in the past.
    let row = client
        .query_opt(
            "SELECT expiry FROM knox_authtoken WHERE token_key = left($1, 15)",
            &[&token],
        )
        .await
        .unwrap();
    let expiry: Option<OffsetDateTime> = row.and_then(|r| r.get(0));
    assert!(
        expiry.is_none_or(|e| e < OffsetDateTime::now_utc()),
        "the refresh moved an expired token's expiry forward: {expiry:?}"
    );
    s.stop().await;
}
