//! Login throttling by username and client address.

use std::time::Duration;

use crate::support::*;

const THROTTLE: &str = "[sessions]\nthrottle_failures = 3\nthrottle_window = \"60s\"";

fn assert_throttled(r: &Response) {
    assert_eq!(r.status, 429, "{}", r.body_text());
    let wait: u64 = r
        .header("retry-after")
        .expect("Retry-After on 429")
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
}

#[tokio::test]
async fn three_failed_logins_throttle_the_username_and_the_address() {
    let (_db, client, s) = Fixture::new()
        .user("alice")
        .user("bob")
        .config(THROTTLE)
        .start()
        .await;
    let alice = user_id(&client, "alice").await;
    let bob = user_id(&client, "bob").await;
    for _ in 0..3 {
        assert_login_refused(
            &login(&s, "alice", "wrong").await,
            "Invalid username/password.",
        );
    }
    // The right password does not get through any more.
    assert_throttled(&login(&s, "alice", "alice-pass").await);
    // Per address: another username from the same client is throttled too.
    assert_throttled(&login(&s, "bob", "bob-pass").await);
    // X-Forwarded-For from an untrusted peer changes nothing.
    assert_throttled(&login_with(&s, "bob", "bob-pass", &[("X-Forwarded-For", "10.9.9.9")]).await);
    assert_eq!(rows_of_user(&client, alice).await, 0);
    assert_eq!(rows_of_user(&client, bob).await, 0);
    s.stop().await;
}

#[tokio::test]
async fn waiting_retry_after_seconds_is_enough_to_log_in_again() {
    let (_db, _client, s) = Fixture::new()
        .user("alice")
        .config("[sessions]\nthrottle_failures = 1\nthrottle_window = \"2s\"")
        .start()
        .await;
    assert_eq!(login(&s, "alice", "wrong").await.status, 401);
    let r = login(&s, "alice", "alice-pass").await;
    assert_throttled(&r);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    // Less than 2 s remain; rounded up (as DRF does) that is 2, and 2 s later the window is over.
    assert_eq!(wait, 2);
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let r = login(&s, "alice", "alice-pass").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    s.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_address_is_throttled() {
    let (_db, _client, s) = Fixture::new()
        .user("alice")
        .user("bob")
        .config(&format!("{THROTTLE}\ntrusted_proxies = [\"127.0.0.1\"]"))
        .start()
        .await;
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    for _ in 0..3 {
        assert_login_refused(
            &login_with(&s, "alice", "wrong", &from("10.0.0.1")).await,
            "Invalid username/password.",
        );
    }
    assert_throttled(&login_with(&s, "alice", "alice-pass", &from("10.0.0.1")).await);
    // Another client address is not throttled by the first one's failures...
    let r = login_with(&s, "bob", "bob-pass", &from("10.0.0.2")).await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    // ...but the username still is, from anywhere; and the first address still is, for anyone.
    assert_throttled(&login_with(&s, "alice", "alice-pass", &from("10.0.0.2")).await);
    assert_throttled(&login_with(&s, "bob", "bob-pass", &from("10.0.0.1")).await);
    s.stop().await;
}

#[tokio::test]
async fn a_successful_login_clears_the_usernames_failures() {
    let (_db, _client, s) = Fixture::new()
        .user("alice")
        .config(&format!("{THROTTLE}\ntrusted_proxies = [\"127.0.0.1\"]"))
        .start()
        .await;
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    for ip in ["10.0.0.1", "10.0.0.2"] {
        assert_eq!(
            login_with(&s, "alice", "wrong", &from(ip)).await.status,
            401
        );
    }
    let r = login_with(&s, "alice", "alice-pass", &from("10.0.0.3")).await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    // Two more failures (from fresh addresses) stay under the limit of three.
    for ip in ["10.0.0.4", "10.0.0.5"] {
        assert_eq!(
            login_with(&s, "alice", "wrong", &from(ip)).await.status,
            401
        );
    }
    let r = login_with(&s, "alice", "alice-pass", &from("10.0.0.6")).await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    s.stop().await;
}
