//! Envoy ext_authz over gRPC, with the client generated from Envoy's protos (envoy-types):
//! allow, deny and outage as Envoy acts on them, identity headers set and client copies removed,
//! every policy from `context_extensions`, flag and group changes reaching a second instance,
//! and hostile check requests answered without a panic.

use std::{collections::HashMap, time::Duration};

use envoy_types::{
    ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse, OkHttpResponse},
    pb::envoy::{
        config::core::v3::{HeaderMap, HeaderValue},
        service::auth::v3::{
            AttributeContext, attribute_context::HttpRequest, attribute_context::Request,
            authorization_client::AuthorizationClient,
        },
    },
};
use tonic::{Code, Status, transport::Channel};

use crate::support::*;

const GRPC: &str = "[server]\ngrpc_listen = \"127.0.0.1:0\"\n";

const IDENTITY: &str = r#"
[server]
grpc_listen = "127.0.0.1:0"
[verify]
username_header = "X-Auth-Username"
staff_header = "X-Auth-User-Staff"
superuser_header = "X-Auth-User-Superuser"
groups_header = "X-Auth-User-Groups"
"#;

/// A route's context_extensions, as key/value pairs.
type Extensions<'a> = &'a [(&'a str, &'a str)];

const FORBIDDEN: &str = r#"{"detail":"You do not have permission to perform this action."}"#;

/// The bound the tests hold propagation to, as over HTTP (tests/policy.rs).
const BOUND: Duration = Duration::from_secs(2);

async fn client(s: &TestServer) -> AuthorizationClient<Channel> {
    AuthorizationClient::connect(format!("http://{}", s.grpc()))
        .await
        .expect("gRPC connect")
}

/// A check request as Envoy sends it: the client's headers, the route's context_extensions.
fn request(headers: &[(&str, &str)], extensions: &[(&str, &str)]) -> CheckRequest {
    let map = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/api/orders".into(),
                    headers: map(headers),
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            context_extensions: map(extensions),
            ..AttributeContext::default()
        }),
    }
}

fn with_token(token: Option<&str>, extensions: &[(&str, &str)]) -> CheckRequest {
    let auth = token.map(|t| format!("Token {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    request(&headers, extensions)
}

async fn check(
    c: &mut AuthorizationClient<Channel>,
    req: CheckRequest,
) -> Result<CheckResponse, Status> {
    tokio::time::timeout(Duration::from_secs(10), c.check(req))
        .await
        .expect("answer within 10 s")
        .map(tonic::Response::into_inner)
}

/// The HTTP status Envoy would act on: 200 for OK, the denial's status.
fn status_of(r: &Result<CheckResponse, Status>) -> u16 {
    match r {
        Ok(resp) => match (&resp.status, &resp.http_response) {
            (Some(s), Some(HttpResponse::OkResponse(_))) if s.code == 0 => 200,
            (Some(s), Some(HttpResponse::DeniedResponse(d))) if s.code != 0 => {
                d.status.as_ref().map_or(0, |h| h.code as u16)
            }
            _ => panic!("inconsistent check response: {resp:?}"),
        },
        Err(s) => panic!("unexpected RPC error: {s:?}"),
    }
}

fn ok(r: &CheckResponse) -> &OkHttpResponse {
    match &r.http_response {
        Some(HttpResponse::OkResponse(o)) => o,
        other => panic!("not OK: {other:?}"),
    }
}

/// The value Envoy is told to set upstream for `name`.
/// `headers_to_remove` split into the names as configured (sorted) and the same names spelled
/// with underscores for hyphens, after checking that the latter are exactly every such spelling
/// of `owned` (a WSGI server that maps `_` like `-` reads each as the header itself).
fn removed(o: &OkHttpResponse, owned: &[&str]) -> Vec<String> {
    let (mut spelled, mut hyphenated): (Vec<String>, Vec<String>) = o
        .headers_to_remove
        .iter()
        .cloned()
        .partition(|name| name.contains('_'));
    let mut want: Vec<String> = Vec::new();
    for name in owned {
        let hyphens: Vec<usize> = name.match_indices('-').map(|(at, _)| at).collect();
        for mask in 1u32..1 << hyphens.len() {
            let mut twin = name.as_bytes().to_vec();
            for (bit, at) in hyphens.iter().enumerate() {
                if mask & (1 << bit) != 0 {
                    twin[*at] = b'_';
                }
            }
            want.push(String::from_utf8(twin).unwrap());
        }
    }
    spelled.sort();
    want.sort();
    assert_eq!(spelled, want, "underscore spellings of {owned:?}");
    hyphenated.sort();
    hyphenated
}

fn set_header<'a>(o: &'a OkHttpResponse, name: &str) -> Option<&'a str> {
    o.headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

#[tokio::test]
async fn every_policy_over_grpc() {
    let db = TestDb::migrated().await;
    let cast = PolicyCast::new(&db).await;
    let s = TestServer::start(&db, IDENTITY).await;
    let mut c = client(&s).await;
    let [p, st, ro, op, te] = cast.tokens();
    let none: &[(&str, &str)] = &[];
    let cases: &[(Extensions, Option<&str>, u16)] = &[
        // No extensions: the default rule.
        (none, p, 200),
        (none, None, 401),
        (none, Some("not-a-token"), 401),
        // anonymous=allow: strangers in, tokens still checked.
        (&[("anonymous", "allow")], None, 200),
        (&[("anonymous", "allow")], p, 200),
        (&[("anonymous", "allow")], Some("not-a-token"), 401),
        // IsAdminUser: is_staff only.
        (&[("require", "staff")], st, 200),
        (&[("require", "staff")], te, 200),
        (&[("require", "staff")], p, 403),
        (&[("require", "staff")], ro, 403),
        (&[("require", "staff")], None, 401),
        (&[("require", "superuser")], ro, 200),
        (&[("require", "superuser")], st, 403),
        // Groups: any of a list, exact names, percent-encoded like the groups header.
        (&[("group", "ops")], op, 200),
        (&[("group", "ops")], te, 403),
        (&[("group", "ops,Team A")], op, 200),
        (&[("group", "ops,Team A")], te, 200),
        (&[("group", "Team%20A")], te, 200),
        (&[("group", "team a")], te, 403),
        (&[("group", "a%2Cb")], te, 200),
        (&[("group", "a")], te, 403),
        (&[("group", "ops")], st, 403),
        (&[("group", "ops")], None, 401),
        // require and group: both.
        (&[("require", "staff"), ("group", "Team A")], te, 200),
        (&[("require", "staff"), ("group", "ops")], op, 403),
        (&[("require", "staff"), ("group", "ops")], st, 403),
        // Configuration errors: a denial with 500, never an allow, whatever the token.
        (&[("anonymous", "yes")], None, 500),
        (&[("anonymous", "yes")], p, 500),
        (&[("require", "admin")], st, 500),
        (&[("group", "")], op, 500),
        (&[("allowed_groups", "ops")], op, 500),
        (&[("anonymous", "allow"), ("require", "staff")], None, 500),
        (&[("anonymous", "allow"), ("group", "ops")], op, 500),
    ];
    for (extensions, token, want) in cases {
        let r = check(&mut c, with_token(*token, extensions)).await;
        assert_eq!(status_of(&r), *want, "{extensions:?} {token:?}: {r:?}");
        let r = r.unwrap();
        let code = r.status.as_ref().unwrap().code;
        match *want {
            200 => assert_eq!(code, Code::Ok as i32),
            401 => assert_eq!(code, Code::Unauthenticated as i32),
            403 => assert_eq!(code, Code::PermissionDenied as i32),
            _ => assert_eq!(code, Code::Internal as i32),
        }
        match (&r.http_response, *want) {
            (Some(HttpResponse::OkResponse(o)), _) if token.is_none() => {
                assert!(o.headers.is_empty(), "{extensions:?}: {o:?}");
            }
            (Some(HttpResponse::OkResponse(o)), _) => {
                assert!(set_header(o, "x-auth-user-id").is_some(), "{extensions:?}");
            }
            (Some(HttpResponse::DeniedResponse(d)), 401) => {
                assert!(d.body.starts_with(r#"{"detail":"#), "{}", d.body);
                let www = d.headers.iter().filter_map(|h| h.header.as_ref());
                assert!(
                    www.clone()
                        .any(|h| h.key == "www-authenticate" && h.value == "Token")
                );
            }
            (Some(HttpResponse::DeniedResponse(d)), 403) => {
                assert_eq!(d.body, FORBIDDEN);
                assert!(
                    d.headers
                        .iter()
                        .all(|h| h.header.as_ref().unwrap().key != "www-authenticate")
                );
            }
            (Some(HttpResponse::DeniedResponse(d)), _) => {
                assert_eq!(d.body, r#"{"detail":"Internal error."}"#);
            }
            other => panic!("{other:?}"),
        }
    }
    // Knox's words for each refusal, as /verify gives them.
    let bad = check(&mut c, with_token(Some("a b"), none)).await.unwrap();
    let Some(HttpResponse::DeniedResponse(d)) = &bad.http_response else {
        panic!("{bad:?}")
    };
    let http = s.verify("a b").await;
    assert_eq!(d.body, http.body_text());
    // Counted under the gRPC route, by the status Envoy acts on.
    let count = |want: u16| cases.iter().filter(|(_, _, w)| *w == want).count() as f64 + 0.0;
    assert_eq!(
        s.metric("knoxgate_requests_total{route=\"grpc_check\",status=\"4xx\"}")
            .await,
        count(401) + count(403) + 1.0
    );
    assert_eq!(
        s.metric("knoxgate_requests_total{route=\"grpc_check\",status=\"2xx\"}")
            .await,
        count(200)
    );
    assert_eq!(
        s.metric("knoxgate_verify_total{outcome=\"error\",reason=\"bad_policy\"}")
            .await,
        count(500)
    );
    s.stop().await;
}

#[tokio::test]
async fn allow_sets_identity_and_removes_every_client_copy() {
    let db = TestDb::migrated().await;
    let team = member(&db, "team", true, false, &["Team A", "a,b"]).await;
    let s = TestServer::start(&db, IDENTITY).await;
    let mut c = client(&s).await;
    let owned = [
        "x-auth-user-id",
        "x-auth-username",
        "x-auth-user-staff",
        "x-auth-user-superuser",
        "x-auth-user-groups",
        // Assertions are off here, and a client's copy is removed all the same.
        "x-auth-assertion",
        // Not sent here (no email_header), but the suggested name: an application may read it.
        "x-auth-email",
    ];
    // The client sends its own copies of every identity header.
    let auth = format!("Token {}", team.token);
    let mut headers: Vec<(&str, &str)> = owned.iter().map(|h| (*h, "forged")).collect();
    headers.push(("authorization", &auth));
    let r = check(&mut c, request(&headers, &[])).await.unwrap();
    let o = ok(&r);
    assert_eq!(
        set_header(o, "x-auth-user-id"),
        Some(team.user_id.to_string().as_str())
    );
    assert_eq!(set_header(o, "x-auth-username"), Some("team"));
    assert_eq!(set_header(o, "x-auth-user-staff"), Some("true"));
    assert_eq!(set_header(o, "x-auth-user-superuser"), Some("false"));
    assert_eq!(set_header(o, "x-auth-user-groups"), Some("Team A,a%2Cb"));
    // Each one overwrites the client's copy (Envoy applies removals after sets, so a header
    // being set is not removed as well).
    for h in &o.headers {
        assert_eq!(h.append_action, 2, "OVERWRITE_IF_EXISTS_OR_ADD: {h:?}");
    }
    assert_eq!(
        removed(o, &owned),
        ["x-auth-assertion", "x-auth-email"],
        "{o:?}"
    );
    // Anonymous: nothing set, every identity header removed.
    let r = check(
        &mut c,
        request(&headers[..owned.len()], &[("anonymous", "allow")]),
    )
    .await
    .unwrap();
    let o = ok(&r);
    assert!(o.headers.is_empty());
    let mut want = owned.map(str::to_owned).to_vec();
    want.sort();
    assert_eq!(removed(o, &owned), want);
    s.stop().await;
}

#[tokio::test]
async fn only_configured_identity_headers_are_set_the_rest_removed() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(
        &db,
        "[server]\ngrpc_listen = \"127.0.0.1:0\"\n[verify]\nstaff_header = \"X-Staff\"\n",
    )
    .await;
    let mut c = client(&s).await;
    let r = check(&mut c, with_token(Some(&t.token), &[]))
        .await
        .unwrap();
    let o = ok(&r);
    assert_eq!(o.headers.len(), 2, "{o:?}");
    assert_eq!(set_header(o, "x-staff"), Some("false"));
    // The assertion's header and the suggested names of the optional headers, which an
    // application may read although knoxgate does not send them.
    let suggested = [
        "x-auth-email",
        "x-auth-user-groups",
        "x-auth-user-staff",
        "x-auth-user-superuser",
        "x-auth-username",
    ];
    let mut want = vec!["x-auth-assertion"];
    want.extend(suggested);
    let mut owned = want.clone();
    owned.extend(["x-auth-user-id", "x-staff"]);
    assert_eq!(removed(o, &owned), want);
    let r = check(&mut c, with_token(None, &[("anonymous", "allow")]))
        .await
        .unwrap();
    let mut want = vec!["x-auth-assertion", "x-auth-user-id", "x-staff"];
    want.extend(suggested);
    want.sort();
    assert_eq!(removed(ok(&r), &want), want);
    s.stop().await;
}

#[tokio::test]
async fn outage_is_a_503_denial_whatever_envoys_failure_settings() {
    let db = TestDb::migrated().await;
    let port = free_port();
    let s = TestServer::start(
        &db,
        &format!(
            "{GRPC}[postgres]\nurl = \"postgres://postgres@127.0.0.1:{port}/x\"\n\
             [cache]\nconsistency = \"ttl\""
        ),
    )
    .await;
    let mut c = client(&s).await;
    let r = check(&mut c, with_token(Some(&"0".repeat(64)), &[])).await;
    // A denial, never an RPC error: Envoy would answer an error with status_on_error (403
    // unless set) or let it through under failure_mode_allow.
    let resp = r.as_ref().expect("a denial, not an RPC error");
    assert_eq!(status_of(&r), 503);
    let status = resp.status.as_ref().unwrap();
    assert_eq!(status.code, Code::Unavailable as i32);
    assert!(status.message.contains("unavailable"), "{status:?}");
    // Header problems are still decided without the database.
    assert_eq!(status_of(&check(&mut c, with_token(None, &[])).await), 401);
    assert_eq!(
        s.metric("knoxgate_requests_total{route=\"grpc_check\",status=\"5xx\"}")
            .await,
        1.0
    );
    s.stop().await;
}

#[tokio::test]
async fn off_by_default() {
    let db = TestDb::migrated().await;
    let s = TestServer::start(&db, "").await;
    assert!(s.running.grpc_addr.is_none());
    s.stop().await;
}

/// Waits until a check with `extensions` answers `want` for `token` on every server.
async fn all_answer(servers: &[&TestServer], extensions: &[(&str, &str)], token: &str, want: u16) {
    for s in servers {
        let mut c = client(s).await;
        let start = std::time::Instant::now();
        let mut last = status_of(&check(&mut c, with_token(Some(token), extensions)).await);
        while last != want && start.elapsed() < BOUND {
            tokio::time::sleep(Duration::from_millis(20)).await;
            last = status_of(&check(&mut c, with_token(Some(token), extensions)).await);
        }
        assert_eq!(last, want, "{extensions:?}: within {BOUND:?}");
    }
}

#[tokio::test]
async fn flag_and_group_changes_reach_a_second_instance() {
    let db = TestDb::migrated().await;
    let staff = member(&db, "staff", true, false, &[]).await;
    let ops = member(&db, "ops", false, false, &["ops", "other"]).await;
    let a = TestServer::start(&db, GRPC).await;
    let b = TestServer::start_with_prefix(&db, &a.prefix, GRPC).await;
    let both = [&a, &b];
    let staff_rule: &[(&str, &str)] = &[("require", "staff")];
    let ops_rule: &[(&str, &str)] = &[("group", "ops")];
    // Warm both instances (memory and Redis).
    for s in both {
        let mut c = client(s).await;
        for _ in 0..2 {
            let r = check(&mut c, with_token(Some(&staff.token), staff_rule)).await;
            assert_eq!(status_of(&r), 200);
            let r = check(&mut c, with_token(Some(&ops.token), ops_rule)).await;
            assert_eq!(status_of(&r), 200);
        }
    }
    let c = db.client().await;
    // Staff demotion.
    c.execute(
        "UPDATE auth_user SET is_staff = false WHERE username = 'staff'",
        &[],
    )
    .await
    .unwrap();
    all_answer(&both, staff_rule, &staff.token, 403).await;
    all_answer(&both, &[], &staff.token, 200).await;
    // Group removal, as Django's user.groups.remove() does it.
    c.execute(
        "DELETE FROM auth_user_groups WHERE user_id = $1 AND group_id = \
         (SELECT id FROM auth_group WHERE name = 'ops')",
        &[&ops.user_id],
    )
    .await
    .unwrap();
    all_answer(&both, ops_rule, &ops.token, 403).await;
    all_answer(&both, &[("group", "other")], &ops.token, 200).await;
    a.stop().await;
    b.stop().await;
}

/// Sends `body` (an encoded check request, possibly broken on purpose) as the Check call.
async fn check_raw(s: &TestServer, body: Vec<u8>) -> Result<CheckResponse, Status> {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    struct Raw;
    struct RawEncoder;
    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }
    struct ResponseDecoder(tonic_prost::ProstCodec<CheckRequest, CheckResponse>);
    impl Decoder for ResponseDecoder {
        type Item = CheckResponse;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<CheckResponse>, Status> {
            self.0.decoder().decode(src)
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = CheckResponse;
        type Encoder = RawEncoder;
        type Decoder = ResponseDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> ResponseDecoder {
            ResponseDecoder(tonic_prost::ProstCodec::default())
        }
    }
    let channel = Channel::from_shared(format!("http://{}", s.grpc()))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path =
        hyper::http::uri::PathAndQuery::from_static("/envoy.service.auth.v3.Authorization/Check");
    grpc.unary(tonic::Request::new(body), path, Raw)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn hostile_check_requests_are_answered_without_a_panic() {
    use prost::Message as _;

    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, GRPC).await;
    let mut c = client(&s).await;
    let auth = format!("Token {}", t.token);

    // Missing fields: no attributes, no request, no http. A request without headers.
    for req in [
        CheckRequest::default(),
        CheckRequest {
            attributes: Some(AttributeContext::default()),
        },
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request::default()),
                ..AttributeContext::default()
            }),
        },
    ] {
        assert_eq!(status_of(&check(&mut c, req).await), 401);
    }
    // A huge header map under the message cap: decided (the token among 12 000 headers).
    let names: Vec<String> = (0..12_000).map(|i| format!("x-h{i}")).collect();
    let mut headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    headers.push(("authorization", &auth));
    let req = request(&headers, &[]);
    assert!(req.encoded_len() < 262_144, "{}", req.encoded_len());
    assert_eq!(status_of(&check(&mut c, req).await), 200);
    // Over the cap: refused before decoding, as a denial (413), not an RPC error that
    // failure_mode_allow would let through, even with a valid token; the server carries on.
    let big = "v".repeat(1024);
    let names: Vec<String> = (0..400).map(|i| format!("x-h{i}")).collect();
    let mut headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), big.as_str())).collect();
    headers.push(("authorization", &auth));
    let too_large = s
        .metric("knoxgate_requests_total{route=\"grpc_check\",status=\"4xx\"}")
        .await;
    let r = check(&mut c, request(&headers, &[])).await;
    assert_eq!(status_of(&r), 413);
    let denial = r.unwrap().status.unwrap();
    assert_eq!(denial.code, Code::InvalidArgument as i32, "{denial:?}");
    assert_eq!(
        s.metric("knoxgate_requests_total{route=\"grpc_check\",status=\"4xx\"}")
            .await,
        too_large + 1.0
    );
    // A huge context_extensions map: refused as a bad policy, naming a key.
    let keys: Vec<String> = (0..5_000).map(|i| format!("k{i}")).collect();
    let ext: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
    let r = check(&mut c, with_token(Some(&t.token), &ext)).await;
    assert_eq!(status_of(&r), 500);

    // Duplicate Authorization headers in the raw form: refused, as /verify refuses them.
    let raw_request = |entries: Vec<(&str, Vec<u8>)>| {
        let mut req = request(&[], &[]);
        let http = req
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.header_map = Some(HeaderMap {
            headers: entries
                .into_iter()
                .map(|(k, v)| HeaderValue {
                    key: k.into(),
                    raw_value: v,
                    ..HeaderValue::default()
                })
                .collect(),
        });
        req
    };
    let r = check(
        &mut c,
        raw_request(vec![
            ("authorization", auth.clone().into_bytes()),
            ("authorization", auth.clone().into_bytes()),
        ]),
    )
    .await;
    assert_eq!(status_of(&r), 401);
    let r = check(
        &mut c,
        raw_request(vec![("authorization", auth.clone().into_bytes())]),
    )
    .await;
    assert_eq!(status_of(&r), 200);
    // Invalid UTF-8 in a raw value: an invalid token, as on /verify.
    let r = check(
        &mut c,
        raw_request(vec![("authorization", b"Token \xff\xfe\xfd".to_vec())]),
    )
    .await;
    assert_eq!(status_of(&r), 401);
    // A control character no HTTP request could carry: 400, as hyper answers it.
    let r = check(&mut c, request(&[("authorization", "Token a\r\nb")], &[])).await;
    assert_eq!(status_of(&r), 400);

    // Invalid UTF-8 inside a protobuf string field (not valid protobuf for `string`; Envoy
    // copies a client's Latin-1 header value or query byte raw): the message is refused by the
    // decoder, never half-read, and answered with a 400 denial, not an RPC error, which Envoy
    // would let through under failure_mode_allow, the client's own identity headers with it.
    let mut bytes =
        request(&[("authorization", &auth), ("x-auth-user-id", "XXXX")], &[]).encode_to_vec();
    let at = bytes
        .windows(4)
        .position(|w| w == b"XXXX")
        .expect("placeholder");
    bytes[at..at + 4].copy_from_slice(b"\xff\xfe\xfd\xfc");
    let r = check_raw(&s, bytes).await;
    assert!(r.is_ok(), "an RPC error, not a denial: {r:?}");
    assert_eq!(status_of(&r), 400);
    // Garbage and truncated messages: denied, never an RPC error; an empty one is a check
    // without credentials.
    for (body, status) in [
        (vec![0xff; 64], 400),
        (
            request(&[("authorization", &auth)], &[]).encode_to_vec()[..20].to_vec(),
            400,
        ),
        (Vec::new(), 401),
    ] {
        let r = check_raw(&s, body).await;
        assert!(r.is_ok(), "an RPC error, not a denial: {r:?}");
        assert_eq!(status_of(&r), status);
    }
    // Still serving, over the same connection too.
    let r = check(&mut c, with_token(Some(&t.token), &[])).await;
    assert_eq!(status_of(&r), 200);
    s.stop().await;
}

#[tokio::test]
async fn shares_the_connection_cap_and_drains_on_shutdown() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(
        &db,
        "[server]\ngrpc_listen = \"127.0.0.1:0\"\nmax_connections = 2\n",
    )
    .await;
    // Two HTTP connections take the whole cap...
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut h = Client::connect(s.addr()).await.unwrap();
        let r = h.request("GET", "/verify", &[], b"").await.unwrap();
        assert_eq!(r.status, 401);
        held.push(h);
    }
    // ...so a gRPC connection is closed at accept.
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        match AuthorizationClient::connect(format!("http://{}", s.grpc())).await {
            Err(_) => true,
            Ok(mut c) => check(&mut c, with_token(Some(&t.token), &[]))
                .await
                .is_err(),
        }
    })
    .await
    .expect("refused within 5 s");
    assert!(refused, "a gRPC connection over max_connections was served");
    // Freeing one lets it in.
    drop(held.pop());
    let start = std::time::Instant::now();
    let mut c = loop {
        if let Ok(mut c) = AuthorizationClient::connect(format!("http://{}", s.grpc())).await
            && let Ok(r) = check(&mut c, with_token(Some(&t.token), &[])).await
        {
            assert_eq!(status_of(&Ok(r)), 200);
            break c;
        }
        assert!(
            start.elapsed() < BOUND,
            "no gRPC connection after a slot was freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(held);
    // Shutdown with an idle HTTP/2 connection open: it is told to go away, so the drain ends
    // well within the grace period (2 s in the tests' configuration), and the port is closed.
    let grpc = s.grpc();
    let start = std::time::Instant::now();
    s.stop().await;
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "drain took {:?}",
        start.elapsed()
    );
    assert!(
        check(&mut c, with_token(Some(&t.token), &[]))
            .await
            .is_err()
    );
    assert!(tokio::net::TcpStream::connect(grpc).await.is_err());
}

/// Opens an HTTP/2 connection to the gRPC listener and starts a Check whose message announces
/// 100 bytes and never sends them: the call stays open until the server ends it. Returns when
/// the server answered (its grpc-status, or None for a reset stream) or the connection ended.
async fn stalled_check(s: &TestServer) -> tokio::task::JoinHandle<Option<String>> {
    use futures_util::StreamExt as _;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let stream = tokio::net::TcpStream::connect(s.grpc()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    // gRPC's length prefix: not compressed, 100 bytes to follow.
    let prefix = bytes::Bytes::from_static(&[0, 0, 0, 0, 100]);
    let body = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(prefix))])
        .chain(futures_util::stream::pending());
    let req = hyper::Request::post(format!(
        "http://{}/envoy.service.auth.v3.Authorization/Check",
        s.grpc()
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(StreamBody::new(body))
    .unwrap();
    tokio::spawn(async move {
        let response = sender.send_request(req).await.ok()?;
        let head = response.headers().get("grpc-status").cloned();
        let collected = http_body_util::BodyExt::collect(response.into_body()).await;
        let trailers = collected.ok().and_then(|c| c.trailers().cloned());
        head.or_else(|| trailers?.get("grpc-status").cloned())
            .map(|v| v.to_str().unwrap().to_string())
    })
}

/// A check whose message never arrives is answered (a denial, as for any request past its
/// deadline) within `server.request_timeout`, so such calls cannot hold the connection cap
/// that `/verify` shares.
#[tokio::test]
async fn a_check_whose_message_never_arrives_ends_within_request_timeout() {
    let db = TestDb::migrated().await;
    let s = TestServer::start(
        &db,
        "[server]\ngrpc_listen = \"127.0.0.1:0\"\nmax_connections = 2\n\
         request_timeout = \"2s\"\nidle_timeout = \"1s\"\n",
    )
    .await;
    let started = std::time::Instant::now();
    let stalled = [stalled_check(&s).await, stalled_check(&s).await];
    for call in stalled {
        let status = tokio::time::timeout(Duration::from_secs(6), call)
            .await
            .expect("a stalled check was still open after 6 s")
            .unwrap();
        // OK with a denial in the CheckResponse, as every answer of the listener.
        assert_eq!(status.as_deref(), Some("0"), "{status:?}");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "answered before the timeout: {:?}",
        started.elapsed()
    );
    // Their connections, idle once answered, give their slots back to /verify.
    let served = eventually(Duration::from_secs(5), || async {
        get_once(s.addr(), "/verify", None, Duration::from_secs(1))
            .await
            .is_ok_and(|r| r.status == 401)
    })
    .await;
    assert!(
        served.is_some(),
        "/verify was not served after the stalled checks"
    );
    s.stop().await;
}
