//! Login throttling per (client address, username) and per username, counted before the
//! password check; the client address as trusted proxies report it.

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
async fn three_failed_logins_throttle_that_client_for_that_username() {
    let (_db, client, s) = Fixture::new()
        .user("alice")
        .user("bob")
        .config(THROTTLE)
        .start()
        .await;
    let alice = user_id(&client, "alice").await;
    for _ in 0..3 {
        assert_login_refused(
            &login(&s, "alice", "wrong").await,
            "Invalid username/password.",
        );
    }
    // The right password does not get through any more.
    assert_throttled(&login(&s, "alice", "alice-pass").await);
    // X-Forwarded-For from an untrusted peer changes nothing.
    assert_throttled(
        &login_with(
            &s,
            "alice",
            "alice-pass",
            &[("X-Forwarded-For", "10.9.9.9")],
        )
        .await,
    );
    assert_eq!(rows_of_user(&client, alice).await, 0);
    // Another username from the same address is not locked out by alice's failures.
    let r = login(&s, "bob", "bob-pass").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    s.stop().await;
}

#[tokio::test]
async fn failures_through_an_untrusted_proxy_do_not_lock_out_everyone() {
    // Default trusted_proxies = []: behind a proxy every client has the proxy's address (here
    // 127.0.0.1). Anyone's failed logins for many usernames must not lock out other users.
    let (_db, _client, s) = Fixture::new()
        .user("alice")
        .user("bob")
        .config(THROTTLE)
        .start()
        .await;
    for i in 0..30 {
        let r = login_with(
            &s,
            &format!("nobody{i}"),
            "wrong",
            &[("X-Forwarded-For", "198.51.100.7")],
        )
        .await;
        assert_eq!(r.status, 401, "{}", r.body_text());
    }
    for (user, pass) in [("alice", "alice-pass"), ("bob", "bob-pass")] {
        let r = login_with(&s, user, pass, &[("X-Forwarded-For", "192.0.2.1")]).await;
        assert_eq!(r.status, 200, "{user}: {}", r.body_text());
    }
    s.stop().await;
}

#[tokio::test]
async fn a_username_is_throttled_from_every_address_at_its_own_limit() {
    let (_db, _client, s) = Fixture::new()
        .user("alice")
        .config(&format!(
            "{THROTTLE}\nthrottle_user_failures = 6\ntrusted_proxies = [\"127.0.0.1\"]"
        ))
        .start()
        .await;
    // Two failures from each of three addresses: under the per-client limit of 3 each...
    for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        for _ in 0..2 {
            let r = login_with(&s, "alice", "wrong", &[("X-Forwarded-For", ip)]).await;
            assert_eq!(r.status, 401, "{}", r.body_text());
        }
    }
    // ...but six for the username: throttled from a fresh address too.
    assert_throttled(
        &login_with(
            &s,
            "alice",
            "alice-pass",
            &[("X-Forwarded-For", "10.0.0.4")],
        )
        .await,
    );
    s.stop().await;
}

#[tokio::test]
async fn concurrent_wrong_passwords_check_at_most_the_limit() {
    // Attempts are counted before the password is checked: 40 guesses at once against a limit
    // of 10 get at most 10 password checks; the rest are 429 without any hashing.
    let (_db, _client, s) = Fixture::new()
        .user("frank")
        .config(
            "[sessions]\nthrottle_failures = 10\nthrottle_window = \"60s\"\npassword_iterations = 100000\nhash_queue_timeout = \"2s\"\n[server]\nrequest_timeout = \"5s\"",
        )
        .start()
        .await;
    let checks_before = s
        .metric("knoxgate_password_check_duration_seconds_count")
        .await;
    let addr = s.addr();
    let guesses: Vec<_> = (0..40)
        .map(|i| {
            tokio::spawn(async move {
                let auth = basic("frank", &format!("guess{i}"));
                http(
                    addr,
                    "POST",
                    LOGIN,
                    &[("Authorization", auth.as_str())],
                    b"",
                )
                .await
                .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for g in guesses {
        statuses.push(g.await.unwrap());
    }
    let refused = statuses.iter().filter(|s| **s == 401).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    let checks = s
        .metric("knoxgate_password_check_duration_seconds_count")
        .await
        - checks_before;
    assert!(refused <= 10, "{refused} passwords checked: {statuses:?}");
    assert!(checks <= 10.0, "{checks} password checks for a limit of 10");
    assert!(throttled >= 30, "{throttled} throttled: {statuses:?}");
    s.stop().await;
}

/// The headers of a spoofing login, the `n`th of a series.
type Spoof = fn(u8) -> Vec<(&'static str, String)>;

#[tokio::test]
async fn unparseable_forwarded_hops_and_x_real_ip_do_not_dodge_the_throttle() {
    let (_db, _client, s) = Fixture::new()
        .user("alice")
        .config(&format!("{THROTTLE}\ntrusted_proxies = [\"127.0.0.1\"]"))
        .start()
        .await;
    // Each attempt changes the part the client controls; the hop the proxy appended is
    // written with a port, or is garbage, or is missing (X-Real-IP only).
    let spoofs: [Spoof; 3] = [
        |n| vec![("X-Forwarded-For", format!("1.2.4.{n}, 203.0.113.10:51234"))],
        |n| vec![("X-Forwarded-For", format!("1.2.5.{n}, not-an-address"))],
        |n| vec![("X-Real-IP", format!("9.9.9.{n}"))],
    ];
    // One username per spoof: each is counted against its own (client, username) pair.
    for (spoof, user) in spoofs.into_iter().zip(["alice", "bob", "carol"]) {
        let mut statuses = Vec::new();
        for n in 0..5u8 {
            let headers = spoof(n);
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            statuses.push(login_with(&s, user, "wrong", &headers).await.status);
        }
        assert_eq!(statuses, [401, 401, 401, 429, 429], "{:?}", spoof(0));
    }
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
    // Another client address is not throttled by the first one's failures, for alice or bob;
    // nor is another username from the first address.
    let r = login_with(&s, "alice", "alice-pass", &from("10.0.0.2")).await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    let r = login_with(&s, "bob", "bob-pass", &from("10.0.0.1")).await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    s.stop().await;
}

#[tokio::test]
async fn a_successful_login_clears_the_usernames_failures() {
    let (_db, _client, s) = Fixture::new()
        .user("alice")
        .config(&format!(
            "{THROTTLE}\nthrottle_user_failures = 3\ntrusted_proxies = [\"127.0.0.1\"]"
        ))
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
    // Two more failures (from fresh addresses) stay under the username's limit of three.
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

#[tokio::test]
async fn an_address_limit_throttles_one_client_across_usernames_and_only_that_client() {
    // sessions.throttle_address_failures, with the client address from a trusted proxy.
    let (_db, _client, s) = Fixture::new()
        .user("alice")
        .config(
            "[sessions]\nthrottle_failures = 10\nthrottle_address_failures = 3\n\
             throttle_window = \"60s\"\ntrusted_proxies = [\"127.0.0.1\"]",
        )
        .start()
        .await;
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    for name in ["u1", "u2", "u3"] {
        let r = login_with(&s, name, "Winter2026!", &from("10.1.1.1")).await;
        assert_login_refused(&r, "Invalid username/password.");
    }
    // The spraying client is stopped, even for an account it has not tried, with the right
    // password; another client is not.
    assert_throttled(&login_with(&s, "alice", "alice-pass", &from("10.1.1.1")).await);
    let r = login_with(&s, "alice", "alice-pass", &from("10.2.2.2")).await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    s.stop().await;
}

/// A login given up by its request deadline before its password was checked (here Postgres
/// holds the users table locked, so the user lookup waits past the 1-s deadline, within its
/// statement timeout) is an outage, answered 503, not a failed guess: however many there are, the right password logs in once Postgres answers
/// again, where counting them would answer 429 for up to the window.
#[tokio::test]
async fn logins_given_up_before_their_password_check_are_not_counted() {
    let (db, _client, s) = Fixture::new()
        .user("alice")
        .config(&format!(
            "{THROTTLE}\nhash_queue_timeout = \"500ms\"\n[server]\nrequest_timeout = \"1s\"\n\
             [postgres]\nstatement_timeout = \"5s\""
        ))
        .start()
        .await;
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; LOCK TABLE auth_user IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    for _ in 0..4 {
        let r = login(&s, "alice", "alice-pass").await;
        assert_eq!(r.status, 503, "{}", r.body_text());
    }
    holder.batch_execute("COMMIT").await.unwrap();
    let r = login(&s, "alice", "alice-pass").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    s.stop().await;
}
