//! logout/ and logoutall/ end to end against knox's recorded behaviour (FACTS.md §5, http.json).

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn logout_revokes_only_the_presented_token_at_once() {
    let (_db, client, s) = Fixture::new().user("alice").start().await;
    let id = user_id(&client, "alice").await;
    let t1 = login_ok(&s, "alice", "alice-pass").await;
    let t2 = login_ok(&s, "alice", "alice-pass").await;
    // Cached in every tier before the logout.
    assert_eq!(s.verify(&t1).await.status, 200);
    assert_eq!(s.verify(&t2).await.status, 200);
    let r = post_with_token(&s, LOGOUT, &t1).await;
    assert_eq!(r.status, 204, "{}", r.body_text());
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-type"), None);
    assert_drf_view_headers(&r);
    let v = s.verify(&t1).await;
    assert_detail(&v, 401, "Invalid token.");
    assert_eq!(v.header("www-authenticate"), Some("Token"));
    assert_eq!(rows_matching(&client, &t1).await, 0);
    assert_eq!(redis_cli(6379, &["EXISTS", &redis_key(&s, &t1)]), "0");
    let index = format!("{}:user:{id}:tokens", s.prefix);
    assert_eq!(redis_cli(6379, &["SISMEMBER", &index, &t1[..15]]), "0");
    assert_eq!(redis_cli(6379, &["SISMEMBER", &index, &t2[..15]]), "1");
    // The other token of the user is untouched.
    assert_eq!(rows_matching(&client, &t2).await, 1);
    assert_eq!(rows_of_user(&client, id).await, 1);
    assert_eq!(s.verify(&t2).await.status, 200);
    // Logging out again with the revoked token is refused like any invalid token.
    let again = post_with_token(&s, LOGOUT, &t1).await;
    assert_detail(&again, 401, "Invalid token.");
    assert_eq!(again.header("www-authenticate"), Some("Token"));
    s.stop().await;
}

#[tokio::test]
async fn logout_all_revokes_every_token_of_the_user_and_only_theirs() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let id = insert_user(&client, "alice", "alice-pass", true).await;
    let other = user_with_token(&db, "bob").await;
    let s = TestServer::start(&db, "").await;
    let t1 = login_ok(&s, "alice", "alice-pass").await;
    let t2 = login_ok(&s, "alice", "alice-pass").await;
    // One written by Django, not through knoxgate.
    let t3 = insert_token(
        &client,
        id,
        Some(Duration::from_secs(36_000)),
        "",
        knoxgate::auth::HashAlgorithm::Sha512,
    )
    .await
    .token;
    for t in [&t1, &t2, &t3, &other.token] {
        assert_eq!(s.verify(t).await.status, 200);
    }
    assert_eq!(rows_of_user(&client, id).await, 3);
    let r = post_with_token(&s, LOGOUT_ALL, &t2).await;
    assert_eq!(r.status, 204, "{}", r.body_text());
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-type"), None);
    assert_drf_view_headers(&r);
    assert_eq!(rows_of_user(&client, id).await, 0);
    for t in [&t1, &t2, &t3] {
        let v = s.verify(t).await;
        assert_detail(&v, 401, "Invalid token.");
        assert_eq!(redis_cli(6379, &["EXISTS", &redis_key(&s, t)]), "0");
    }
    let index = format!("{}:user:{id}:tokens", s.prefix);
    assert_eq!(redis_cli(6379, &["SCARD", &index]), "0");
    assert_eq!(s.verify(&other.token).await.status, 200);
    assert_eq!(rows_of_user(&client, other.user_id).await, 1);
    s.stop().await;
}

#[tokio::test]
async fn logout_without_a_token_is_401_with_token_challenge() {
    let db = TestDb::migrated().await;
    let s = TestServer::start(&db, "").await;
    for path in [LOGOUT, LOGOUT_ALL] {
        let r = http(s.addr(), "POST", path, &[], b"").await;
        assert_detail(&r, 401, "Authentication credentials were not provided.");
        assert_eq!(r.header("www-authenticate"), Some("Token"), "{path}");
        assert_drf_view_headers(&r);
        let r = post_with_token(&s, path, &"0".repeat(64)).await;
        assert_detail(&r, 401, "Invalid token.");
        assert_eq!(r.header("www-authenticate"), Some("Token"), "{path}");
    }
    s.stop().await;
}

#[tokio::test]
async fn logout_with_an_expired_or_inactive_users_token_is_refused_as_knox_does() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let alice = insert_user(&client, "alice", "alice-pass", true).await;
    let bob = insert_user(&client, "bob", "bob-pass", false).await;
    let s = TestServer::start(&db, "").await;
    let alg = knoxgate::auth::HashAlgorithm::Sha512;
    let live = insert_token(&client, alice, Some(Duration::from_secs(36_000)), "", alg).await;
    let expired = insert_token(&client, alice, Some(Duration::from_secs(36_000)), "", alg).await;
    client
        .execute(
            "UPDATE knox_authtoken SET expiry = now() - interval '1 second' \
             WHERE token_key = left($1, 15)",
            &[&expired.token],
        )
        .await
        .unwrap();
    // An expired token is refused and, as knox does on any use, deleted; logout-all does not
    // run, so the user's live token stays.
    let r = post_with_token(&s, LOGOUT_ALL, &expired.token).await;
    assert_detail(&r, 401, "Invalid token.");
    assert_eq!(rows_matching(&client, &expired.token).await, 0);
    assert_eq!(rows_of_user(&client, alice).await, 1);
    assert_eq!(s.verify(&live.token).await.status, 200);
    // An inactive user's token: 401 and nothing is deleted.
    let inactive = insert_token(&client, bob, Some(Duration::from_secs(36_000)), "", alg).await;
    for path in [LOGOUT, LOGOUT_ALL] {
        let r = post_with_token(&s, path, &inactive.token).await;
        assert_detail(&r, 401, "User inactive or deleted.");
        assert_eq!(r.header("www-authenticate"), Some("Token"));
    }
    assert_eq!(rows_of_user(&client, bob).await, 1);
    s.stop().await;
}

#[tokio::test]
async fn get_on_logout_with_a_valid_token_is_405_and_revokes_nothing() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "").await;
    for path in [LOGOUT, LOGOUT_ALL] {
        let r = http(
            s.addr(),
            "GET",
            path,
            &[("Authorization", &format!("Token {}", t.token))],
            b"",
        )
        .await;
        assert_detail(&r, 405, "Method \"GET\" not allowed.");
        assert_drf_view_headers(&r);
    }
    assert_eq!(s.verify(&t.token).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn logout_on_one_instance_is_refused_by_another_within_two_seconds() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    insert_user(&client, "alice", "alice-pass", true).await;
    let a = TestServer::start(&db, "").await;
    let b = TestServer::start_with_prefix(&db, &a.prefix, "").await;
    let t1 = login_ok(&a, "alice", "alice-pass").await;
    let t2 = login_ok(&a, "alice", "alice-pass").await;
    let t3 = login_ok(&a, "alice", "alice-pass").await;
    for t in [&t1, &t2, &t3] {
        assert_eq!(b.verify(t).await.status, 200);
    }
    assert_eq!(post_with_token(&a, LOGOUT, &t1).await.status, 204);
    let took = eventually(Duration::from_secs(2), || async {
        b.verify(&t1).await.status == 401
    })
    .await;
    assert!(took.is_some(), "B still accepts a token logged out on A");
    assert_eq!(b.verify(&t2).await.status, 200);
    // Logout-all on B reaches A the same way.
    assert_eq!(post_with_token(&b, LOGOUT_ALL, &t2).await.status, 204);
    let took_all = eventually(Duration::from_secs(2), || async {
        a.verify(&t2).await.status == 401 && a.verify(&t3).await.status == 401
    })
    .await;
    assert!(took_all.is_some(), "A still accepts tokens logged out on B");
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn logout_with_a_token_postgres_no_longer_holds_is_401_and_revokes_nothing_else() {
    // knox reads Postgres, so a token deleted there is refused at once. knoxgate may still hold
    // it in a cache (consistency = "ttl", or a feed that has not delivered yet): its logout and
    // logout-all must not answer 204 as if they had revoked anything.
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let id = insert_user(&client, "alice", "alice-pass", true).await;
    let s = TestServer::start(&db, "[cache]\nconsistency = \"ttl\"\n").await;
    let gone = login_ok(&s, "alice", "alice-pass").await;
    let other = login_ok(&s, "alice", "alice-pass").await;
    let gone_too = login_ok(&s, "alice", "alice-pass").await;
    for t in [&gone, &other, &gone_too] {
        assert_eq!(s.verify(t).await.status, 200);
    }
    for t in [&gone, &gone_too] {
        delete_token(&client, t).await;
        // Still answered from the cache: ttl mode hears nothing.
        assert_eq!(s.verify(t).await.status, 200);
    }

    let r = post_with_token(&s, LOGOUT_ALL, &gone).await;
    assert_detail(&r, 401, "Invalid token.");
    assert_eq!(r.header("www-authenticate"), Some("Token"));
    assert_drf_view_headers(&r);
    // Nothing else revoked, and the client was not told otherwise.
    assert_eq!(rows_of_user(&client, id).await, 1);
    assert_eq!(s.verify(&other).await.status, 200);
    // The stale entry of the presented token is gone from the caches.
    assert_eq!(s.verify(&gone).await.status, 401);

    let r = post_with_token(&s, LOGOUT, &gone_too).await;
    assert_detail(&r, 401, "Invalid token.");
    assert_eq!(s.verify(&gone_too).await.status, 401);
    assert_eq!(s.verify(&other).await.status, 200);
    s.stop().await;
}

/// A logout whose DELETE outlasts the request deadline still finishes: the evictions after the
/// DELETE (this instance's cache, Redis) run even though the client got its 503. In `ttl`
/// mode no feed would repair a logout stopped half-way, and the token would stay allowed
/// here for `redis.max_cache_ttl`.
#[tokio::test]
async fn a_logout_cut_by_the_request_deadline_still_evicts_what_it_deleted() {
    let (_db, client, s) = Fixture::new()
        .user("alice")
        .config(
            "[server]\nrequest_timeout = \"1s\"\n[sessions]\nhash_queue_timeout = \"500ms\"\n\
             [postgres]\nstatement_timeout = \"5s\"\n[cache]\nconsistency = \"ttl\"\n",
        )
        .start()
        .await;
    let token = login_ok(&s, "alice", "alice-pass").await;
    assert_eq!(s.verify(&token).await.status, 200);
    // Postgres takes 2 s to delete a token from now on.
    client
        .batch_execute(
            "CREATE FUNCTION slow_delete() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(2); RETURN OLD; END $$; \
             CREATE TRIGGER slow_delete BEFORE DELETE ON knox_authtoken \
             FOR EACH ROW EXECUTE FUNCTION slow_delete();",
        )
        .await
        .unwrap();
    let r = post_with_token(&s, LOGOUT, &token).await;
    assert_eq!(r.status, 503, "{}", r.body_text());
    let gone = eventually(Duration::from_secs(4), || async {
        s.verify(&token).await.status == 401
    })
    .await;
    assert!(
        gone.is_some(),
        "the logout's row went, its cache entry stayed"
    );
    assert_eq!(redis_cli(6379, &["EXISTS", &redis_key(&s, &token)]), "0");
    s.stop().await;
}
