//! Knox and DRF on the wire: the session endpoints, requests to them, and assertions on the
//! exact shape of knox's answers (login body, DRF expiry format, `detail` bodies, view headers).

use base64::Engine;

use super::{Response, TestServer, http};

pub const LOGIN: &str = "/api/auth/login/";
pub const LOGOUT: &str = "/api/auth/logout/";
pub const LOGOUT_ALL: &str = "/api/auth/logoutall/";

pub fn basic(username: &str, password: &str) -> String {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    format!("Basic {encoded}")
}

/// POST login/ with HTTP Basic credentials.
pub async fn login(s: &TestServer, username: &str, password: &str) -> Response {
    login_with(s, username, password, &[]).await
}

pub async fn login_with(
    s: &TestServer,
    username: &str,
    password: &str,
    extra: &[(&str, &str)],
) -> Response {
    let auth = basic(username, password);
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    http(s.addr(), "POST", LOGIN, &headers, b"").await
}

/// POST to a session endpoint with `Authorization: Token <token>`.
pub async fn post_with_token(s: &TestServer, path: &str, token: &str) -> Response {
    http(
        s.addr(),
        "POST",
        path,
        &[("Authorization", &format!("Token {token}"))],
        b"",
    )
    .await
}

/// A successful login's token; panics with the response otherwise.
pub async fn login_ok(s: &TestServer, username: &str, password: &str) -> String {
    let r = login(s, username, password).await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    parse_login_body(&r.body_text()).1
}

/// Splits knox's login body `{"expiry":…,"token":"…"}` (exactly that text, keys in that order)
/// into the expiry string (`None` for null) and the token.
pub fn parse_login_body(body: &str) -> (Option<String>, String) {
    let rest = body
        .strip_prefix("{\"expiry\":")
        .unwrap_or_else(|| panic!("body does not start with expiry: {body}"));
    let (expiry, rest) = match rest.strip_prefix("null") {
        Some(rest) => (None, rest),
        None => {
            let rest = rest
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("expiry is neither null nor a string: {body}"));
            let (e, rest) = rest.split_once('"').expect("closing quote of expiry");
            (Some(e.to_owned()), rest)
        }
    };
    let token = rest
        .strip_prefix(",\"token\":\"")
        .and_then(|r| r.strip_suffix("\"}"))
        .unwrap_or_else(|| panic!("token is not the second and last key: {body}"));
    assert!(!token.contains('"'), "{body}");
    (expiry, token.to_owned())
}

/// DRF's rendering: `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, six fractional digits or none.
pub fn assert_drf_expiry_format(e: &str) {
    let b = e.as_bytes();
    let shape_ok = |date_time: &[u8]| {
        date_time.len() == 19
            && date_time.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                _ => c.is_ascii_digit(),
            })
    };
    let ok = match b.len() {
        20 => shape_ok(&b[..19]) && b[19] == b'Z',
        27 => {
            shape_ok(&b[..19])
                && b[19] == b'.'
                && b[20..26].iter().all(u8::is_ascii_digit)
                && &b[20..26] != b"000000"
                && b[26] == b'Z'
        }
        _ => false,
    };
    assert!(ok, "not DRF's expiry format: {e}");
}

pub fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub fn redis_key(s: &TestServer, token: &str) -> String {
    format!("{}:token:{}", s.prefix, &token[..15])
}

pub fn assert_detail(r: &Response, status: u16, detail: &str) {
    assert_eq!(r.status, status, "{}", r.body_text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.body_text(),
        serde_json::json!({ "detail": detail }).to_string()
    );
}

pub fn assert_drf_view_headers(r: &Response) {
    assert_eq!(r.header("vary"), Some("Accept"));
    assert_eq!(r.header("allow"), Some("POST, OPTIONS"));
}

pub fn assert_login_refused(r: &Response, detail: &str) {
    assert_detail(r, 401, detail);
    assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"api\""));
    assert_drf_view_headers(r);
}
