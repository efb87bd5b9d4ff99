//! The only place a status code is chosen: decisions and errors become responses here, and
//! errors are logged and counted here, once.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Response, StatusCode,
    header::{self, HeaderName, HeaderValue},
};
use jiff::tz::TimeZone;

use crate::{
    auth::{DenyReason, ExpiryFormat, TokenRow, format_drf_expiry, format_login_expiry},
    config::VerifyConfig,
    error::Error,
};

pub type Body = Full<Bytes>;

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn detail(status: StatusCode, text: &str) -> Response<Body> {
    json(status, serde_json::json!({ "detail": text }).to_string())
}

/// The whitespace HTTP strips from both ends of a field value (RFC 9110 §5.5): a proxy that
/// copies a header passes on the value without it.
const OPTIONAL_WHITESPACE: [char; 2] = [' ', '\t'];

/// Whether `s` arrives as it was sent: a value with whitespace at either end reaches the
/// application trimmed, as another value (`" admin"` as `admin`).
fn survives_proxies(s: &str) -> bool {
    s.trim_matches(OPTIONAL_WHITESPACE) == s
}

fn header_value(s: &str) -> HeaderValue {
    // Values come from the database; anything a header cannot carry exactly is dropped (sent
    // empty, which the Django package reads as "not sent"), never sent raw or trimmed.
    if !survives_proxies(s) {
        return HeaderValue::from_static("");
    }
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// 200 for an allowed token, with the identity headers. The user id header is always present
/// and never empty: a user id a header cannot carry (only a forged cache entry or a custom
/// primary key with control characters holds one) is a 500, because a 200 with an empty header
/// reaches the application as an allowed request with no identity (nginx drops empty headers).
/// `assertion` is the signed identity assertion and its header, when assertions are on.
pub fn allow(
    row: &TokenRow,
    cfg: &VerifyConfig,
    assertion: Option<(&HeaderName, HeaderValue)>,
) -> Response<Body> {
    let user_id = match HeaderValue::from_str(&row.user_id) {
        Ok(v) if !row.user_id.trim().is_empty() && survives_proxies(&row.user_id) => v,
        _ => {
            return error(&Error::Internal(format!(
                "refusing to answer 200 for a user id that cannot be sent as a header: {:?}",
                row.user_id.as_str()
            )));
        }
    };
    let mut r = Response::new(Full::new(Bytes::new()));
    let h = r.headers_mut();
    h.insert(cfg.user_id_header.clone(), user_id);
    if let Some((name, value)) = assertion {
        h.insert(name.clone(), value);
    }
    if let Some(name) = &cfg.username_header {
        h.insert(name.clone(), header_value(&row.user.username));
    }
    if let Some(name) = &cfg.email_header {
        h.insert(name.clone(), header_value(&row.user.email));
    }
    let flag = |b: bool| HeaderValue::from_static(if b { "true" } else { "false" });
    if let Some(name) = &cfg.staff_header {
        h.insert(name.clone(), flag(row.user.is_staff));
    }
    if let Some(name) = &cfg.superuser_header {
        h.insert(name.clone(), flag(row.user.is_superuser));
    }
    if let Some(name) = &cfg.groups_header {
        h.insert(name.clone(), header_value(&groups_value(&row.user.groups)));
    }
    if let Some(name) = &cfg.expiry_header {
        let v = row.expiry.map_or_else(
            || "none".to_owned(),
            |e| format_drf_expiry(e, &TimeZone::UTC),
        );
        h.insert(name.clone(), header_value(&v));
    }
    r
}

/// 200 for a CORS preflight let through without a token: no identity headers.
pub fn preflight() -> Response<Body> {
    Response::new(Full::new(Bytes::new()))
}

/// 200 for a request without credentials on an `anonymous=allow` route: no identity headers.
pub fn anonymous() -> Response<Body> {
    Response::new(Full::new(Bytes::new()))
}

/// 403 for an authenticated user the route's policy does not admit, in DRF's words.
pub fn forbidden() -> Response<Body> {
    detail(
        StatusCode::FORBIDDEN,
        "You do not have permission to perform this action.",
    )
}

/// Characters escaped in a group name inside the groups header: the list separator, the escape
/// itself, and what a header value cannot carry.
const GROUP_ESCAPES: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b',').add(b'%');

/// The groups header value: names sorted as loaded, comma-separated, each percent-encoded
/// where needed (non-ASCII as UTF-8), so any name survives and none can split the list.
fn groups_value(groups: &[compact_str::CompactString]) -> String {
    groups
        .iter()
        .map(|g| group_value(g))
        .collect::<Vec<_>>()
        .join(",")
}

/// One group name, encoded: spaces at its ends too (`%20`), which a proxy would trim from the
/// header's ends and a reader splitting the list would trim from each name; spaces inside a
/// name are kept as they are.
fn group_value(name: &str) -> String {
    let start = name.trim_start_matches(' ');
    let core = start.trim_end_matches(' ');
    let leading = name.len() - start.len();
    let trailing = start.len() - core.len();
    let encoded = percent_encoding::utf8_percent_encode(core, GROUP_ESCAPES);
    format!(
        "{}{encoded}{}",
        "%20".repeat(leading),
        "%20".repeat(trailing)
    )
}

/// 401 with knox's `detail` and `WWW-Authenticate: <keyword>`.
pub fn deny(reason: DenyReason, keyword: &str) -> Response<Body> {
    let mut r = detail(StatusCode::UNAUTHORIZED, reason.detail());
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, header_value(keyword));
    r
}

/// 401 from a login: DRF's BasicAuthentication header.
pub fn login_refused(text: &str) -> Response<Body> {
    let mut r = detail(StatusCode::UNAUTHORIZED, text);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"api\""),
    );
    drf_view_headers(&mut r);
    r
}

/// knox's login body: `{"expiry":…,"token":…}`, keys in that order, the expiry shown in the
/// site's `TIME_ZONE` and knox's `EXPIRY_DATETIME_FORMAT`.
pub fn login_ok(
    expiry: Option<time::OffsetDateTime>,
    token: &str,
    time_zone: &TimeZone,
    format: &ExpiryFormat,
) -> Response<Body> {
    let expiry = expiry.map_or(serde_json::Value::Null, |e| {
        format_login_expiry(e, time_zone, format).into()
    });
    let body = format!(
        "{{\"expiry\":{},\"token\":{}}}",
        expiry,
        serde_json::Value::from(token)
    );
    let mut r = json(StatusCode::OK, body);
    drf_view_headers(&mut r);
    r
}

/// 403 when TOKEN_LIMIT_PER_USER is reached (knox uses the key `error`, not `detail`).
pub fn token_limit_reached() -> Response<Body> {
    let mut r = json(
        StatusCode::FORBIDDEN,
        "{\"error\":\"Maximum amount of tokens allowed per user exceeded.\"}".into(),
    );
    drf_view_headers(&mut r);
    r
}

/// 204 after logout / logout-all.
pub fn no_content() -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    drf_view_headers(&mut r);
    r
}

/// 405 as DRF words it.
pub fn method_not_allowed(method: &hyper::Method) -> Response<Body> {
    let mut r = detail(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("Method \"{}\" not allowed.", method.as_str()),
    );
    drf_view_headers(&mut r);
    r
}

/// 429 for a throttled login.
pub fn throttled(retry_after_secs: u64) -> Response<Body> {
    let mut r = detail(
        StatusCode::TOO_MANY_REQUESTS,
        &format!(
            "Request was throttled. Expected available in {retry_after_secs} second{}.",
            if retry_after_secs == 1 { "" } else { "s" }
        ),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    r
}

pub fn not_found() -> Response<Body> {
    detail(StatusCode::NOT_FOUND, "Not found.")
}

/// Headers DRF adds to every response of knox's views.
fn drf_view_headers(r: &mut Response<Body>) {
    let h = r.headers_mut();
    h.insert(header::VARY, HeaderValue::from_static("Accept"));
    h.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
}

/// The response for a failure. Outages are 503 (never 401, never 2xx); client mistakes 4xx.
pub fn error(e: &Error) -> Response<Body> {
    match e {
        Error::StoreUnavailable(inner) => {
            tracing::warn!(error = %inner, "cannot decide: token store unavailable");
            detail(
                StatusCode::SERVICE_UNAVAILABLE,
                "Authentication service unavailable.",
            )
        }
        Error::DeadlineExceeded => {
            tracing::warn!("request deadline exceeded");
            detail(
                StatusCode::SERVICE_UNAVAILABLE,
                "Authentication service unavailable.",
            )
        }
        Error::Overloaded => {
            let mut r = detail(
                StatusCode::SERVICE_UNAVAILABLE,
                "Authentication service overloaded.",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Error::BadRequest(what) => detail(StatusCode::BAD_REQUEST, what),
        Error::PayloadTooLarge => detail(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large."),
        Error::BodyTimeout => {
            let mut r = detail(
                StatusCode::REQUEST_TIMEOUT,
                "Request body not received in time.",
            );
            // The connection may hold the rest of a body never read: not reusable.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
        Error::UnsupportedMediaType => detail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported media type in request; send application/json or HTTP Basic credentials.",
        ),
        Error::BadPolicy(e) => {
            tracing::error!(key = %e.key, error = %e, "bad policy parameter on the verify URL");
            detail(StatusCode::INTERNAL_SERVER_ERROR, "Internal error.")
        }
        Error::Internal(what) => {
            tracing::error!(error = %what, "internal error");
            detail(StatusCode::INTERNAL_SERVER_ERROR, "Internal error.")
        }
    }
}

#[cfg(test)]
mod identity_tests {
    use super::*;
    use crate::auth::{StoredDigest, UserInfo};

    fn row(user_id: &str) -> TokenRow {
        TokenRow {
            digest: StoredDigest::parse("aa"),
            token_key: "k".into(),
            user_id: user_id.into(),
            created: time::macros::datetime!(2026-01-01 00:00 UTC),
            expiry: None,
            user: UserInfo {
                is_active: true,
                username: "u".into(),
                ..UserInfo::default()
            },
        }
    }

    #[test]
    fn never_200_without_a_usable_user_id() {
        let cfg = crate::config::Config::from_toml_str("").unwrap().verify;
        let ok = allow(&row("7"), &cfg, None);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()[&cfg.user_id_header], "7");
        // " 7" and "7\t" would reach the application as user 7.
        for bad in ["1\r\nX-Evil: 1", "", " ", "a\u{0}b", " 7", "7 ", "7\t"] {
            let r = allow(&row(bad), &cfg, None);
            assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR, "{bad:?}");
            assert!(!r.headers().contains_key(&cfg.user_id_header), "{bad:?}");
        }
    }

    #[test]
    fn usernames_and_emails_a_proxy_would_trim_are_not_sent() {
        let cfg = crate::config::Config::from_toml_str(
            "[verify]\nusername_header = \"X-Auth-User-Name\"\nemail_header = \"X-Auth-User-Email\"",
        )
        .unwrap()
        .verify;
        let mut r = row("7");
        r.user.username = " admin".into();
        r.user.email = "a@example.com\t".into();
        let response = allow(&r, &cfg, None);
        assert_eq!(response.status(), StatusCode::OK);
        let h = response.headers();
        assert_eq!(h[cfg.username_header.as_ref().unwrap()], "");
        assert_eq!(h[cfg.email_header.as_ref().unwrap()], "");
        r.user.username = "ad min".into();
        let response = allow(&r, &cfg, None);
        assert_eq!(
            response.headers()[cfg.username_header.as_ref().unwrap()],
            "ad min"
        );
    }
}

#[cfg(test)]
mod error_status_tests {
    use super::*;
    use crate::store::StoreError;

    /// The whole failure → status table, pinned: outages are 503 (never 401, never 2xx).
    #[test]
    fn every_error_maps_to_its_status() {
        let table = [
            (
                Error::StoreUnavailable(StoreError::Timeout("t".into())),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Error::StoreUnavailable(StoreError::Unavailable("u".into())),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Error::StoreUnavailable(StoreError::Query("q".into())),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (Error::DeadlineExceeded, StatusCode::SERVICE_UNAVAILABLE),
            (Error::Overloaded, StatusCode::SERVICE_UNAVAILABLE),
            (Error::BadRequest("b"), StatusCode::BAD_REQUEST),
            (Error::PayloadTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
            (Error::BodyTimeout, StatusCode::REQUEST_TIMEOUT),
            (
                Error::UnsupportedMediaType,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                Error::Internal("i".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                Error::BadPolicy(crate::auth::Policy::from_query("x=1").unwrap_err()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (failure, status) in table {
            let r = error(&failure);
            assert_eq!(r.status(), status, "{failure:?}");
            assert!(!r.status().is_success() && r.status() != StatusCode::UNAUTHORIZED);
        }
        // Only overload tells the client when to retry.
        assert_eq!(
            error(&Error::Overloaded).headers()[header::RETRY_AFTER],
            "1"
        );
    }
}

#[cfg(test)]
mod policy_response_tests {
    use super::*;

    #[test]
    fn group_names_cannot_split_the_list() {
        let groups: Vec<compact_str::CompactString> = vec![
            "a,b".into(),
            "100%".into(),
            "équipe".into(),
            "ops team".into(),
        ];
        let v = groups_value(&groups);
        assert_eq!(v, "a%2Cb,100%25,%C3%A9quipe,ops team");
        assert!(HeaderValue::from_str(&v).is_ok());
        assert_eq!(groups_value(&[]), "");
    }

    #[test]
    fn group_names_keep_the_spaces_at_their_ends() {
        // Proxies trim a header value's ends: " admin" first or "admin " last in the list
        // would arrive as "admin".
        let groups: Vec<compact_str::CompactString> =
            vec![" admin".into(), "a b".into(), "  ".into(), "admin ".into()];
        let v = groups_value(&groups);
        assert_eq!(v, "%20admin,a b,%20%20,admin%20");
        let decoded: Vec<String> = v
            .split(',')
            .map(|g| {
                percent_encoding::percent_decode_str(g)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(decoded, [" admin", "a b", "  ", "admin "]);
    }

    #[test]
    fn forbidden_is_drfs_403() {
        let r = forbidden();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(!r.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}
