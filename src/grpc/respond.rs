//! How Envoy is told an answer of `http::respond`, which stays the one table of outcomes and
//! statuses: this only maps each kind of status to the shape ext_authz acts on.
//!
//! - 2xx: OK, with the identity headers to set upstream (overwriting a client's copy) and
//!   `headers_to_remove` naming every other identity header knoxgate owns (and every one, set
//!   or not, spelled with underscores for hyphens: see `grpc::Check`). Envoy applies
//!   removals after sets, so a header being set is not also listed for removal.
//! - Any other status: a denied `CheckResponse` carrying the status, knox's/DRF's body and
//!   the headers (`WWW-Authenticate`, an overload's `Retry-After`). Envoy answers a denial
//!   with exactly that, whatever `failure_mode_allow` and `status_on_error` say: a route
//!   misconfigured with an unknown policy key (500, INTERNAL) can never fail open, and an
//!   outage (503, UNAVAILABLE) reaches the client as 503. Were an outage an RPC error instead,
//!   Envoy would answer it with `status_on_error` (403 unless set, and Contour always sets
//!   403: a denial for an outage), or let the request through under `failure_mode_allow`.

use envoy_types::{
    ext_authz::v3::pb::{
        CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
        HttpResponse, HttpStatus, OkHttpResponse,
    },
    pb::google::rpc,
};
use http_body_util::BodyExt as _;
use hyper::{HeaderMap, StatusCode, header::HeaderName};
use tonic::Code;

use crate::http::respond::Body;

/// The gRPC code of a denial with this HTTP status.
fn denied_code(status: StatusCode) -> Code {
    match status {
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        s if s.is_client_error() => Code::InvalidArgument,
        _ => Code::Internal,
    }
}

/// One header for Envoy to set, replacing any value the client sent.
fn set(name: &HeaderName, value: &hyper::header::HeaderValue) -> HeaderValueOption {
    let bytes = value.as_bytes();
    let header = match std::str::from_utf8(bytes) {
        Ok(text) => HeaderValue {
            key: name.as_str().to_owned(),
            value: text.to_owned(),
            ..HeaderValue::default()
        },
        // Not reachable with values made from strings; kept exact rather than lossy.
        Err(_) => HeaderValue {
            key: name.as_str().to_owned(),
            raw_value: bytes.to_vec(),
            ..HeaderValue::default()
        },
    };
    HeaderValueOption {
        header: Some(header),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

fn all_set(headers: &HeaderMap) -> Vec<HeaderValueOption> {
    headers.iter().map(|(k, v)| set(k, v)).collect()
}

fn rpc_status(code: Code, message: &str) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: code as i32,
        message: message.to_owned(),
        ..rpc::Status::default()
    })
}

/// The check response for `answer`, an answer of `http::respond`. `owned` names every
/// identity header knoxgate sets.
pub async fn check_response(answer: hyper::Response<Body>, owned: &[HeaderName]) -> CheckResponse {
    let (parts, body) = answer.into_parts();
    let status = parts.status;
    if status.is_success() {
        // An identity header sent empty (a value a header cannot carry exactly) is removed
        // rather than set empty: what Envoy makes of an empty value has changed between
        // releases, and a client's own copy must not survive either way.
        let sent = |name: &HeaderName| parts.headers.get(name).is_some_and(|v| !v.is_empty());
        let remove = owned
            .iter()
            .filter(|name| !sent(name))
            .map(|name| name.as_str().to_owned())
            .collect();
        let set_headers = parts
            .headers
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| set(name, value))
            .collect();
        return CheckResponse {
            status: rpc_status(Code::Ok, ""),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: set_headers,
                headers_to_remove: remove,
                ..OkHttpResponse::default()
            })),
            ..CheckResponse::default()
        };
    }
    // A `Full` body: collecting it cannot fail or wait.
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(never) => match never {},
    };
    let body = String::from_utf8_lossy(&body).into_owned();
    let code = denied_code(status);
    CheckResponse {
        status: rpc_status(code, &detail_of(&body)),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status.as_u16()),
            }),
            headers: all_set(&parts.headers),
            body,
        })),
        ..CheckResponse::default()
    }
}

/// A unary gRPC response carrying `message`, as tonic frames one: a length-prefixed message
/// and an OK status in the trailers. For answers made outside tonic's generated service.
pub fn unary_response(message: &CheckResponse) -> hyper::Response<tonic::body::Body> {
    use bytes::BufMut as _;
    use prost::Message as _;
    let len = message.encoded_len();
    let mut frame = bytes::BytesMut::with_capacity(5 + len);
    frame.put_u8(0); // not compressed
    // A CheckResponse of knoxgate's is a few hundred bytes: its length fits the prefix.
    frame.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    message
        .encode(&mut frame)
        .expect("the buffer was sized for the message");
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
    let frames = futures_util::stream::iter([
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(frame.freeze())),
        Ok(hyper::body::Frame::trailers(trailers)),
    ]);
    let mut response = hyper::Response::new(tonic::body::Body::new(
        http_body_util::StreamBody::new(frames),
    ));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The `detail` of a DRF body, for the gRPC status message (logs, `grpcurl`).
fn detail_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("detail")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        auth::{DenyReason, Policy},
        error::Error,
        http::respond,
        store::StoreError,
    };

    fn owned() -> Vec<HeaderName> {
        ["x-auth-user-id", "x-auth-user-staff", "x-auth-user-groups"]
            .map(HeaderName::from_static)
            .to_vec()
    }

    async fn check(r: hyper::Response<Body>) -> CheckResponse {
        check_response(r, &owned()).await
    }

    fn denied(r: &CheckResponse) -> &DeniedHttpResponse {
        match r.http_response.as_ref() {
            Some(HttpResponse::DeniedResponse(d)) => d,
            other => panic!("not denied: {other:?}"),
        }
    }

    /// Every failure of the HTTP table, as Envoy is told it.
    #[tokio::test]
    async fn every_error_reaches_envoy_fail_closed() {
        for e in [
            Error::StoreUnavailable(StoreError::Timeout("t".into())),
            Error::StoreUnavailable(StoreError::Unavailable("u".into())),
            Error::DeadlineExceeded,
            Error::Overloaded,
        ] {
            let r = check(respond::error(&e)).await;
            assert_eq!(
                r.status.as_ref().unwrap().code,
                Code::Unavailable as i32,
                "{e:?}"
            );
            let d = denied(&r);
            assert_eq!(d.status.as_ref().unwrap().code, 503, "{e:?}");
            assert!(d.body.contains("detail"), "{e:?}");
            // The HTTP answer's headers too: Retry-After when overloaded.
            let retry_after = d
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .any(|h| h.key == "retry-after");
            assert_eq!(retry_after, matches!(e, Error::Overloaded), "{e:?}: {d:?}");
        }
        for (e, code, http) in [
            (
                Error::BadPolicy(Policy::from_query("x=1").unwrap_err()),
                Code::Internal,
                500,
            ),
            (Error::Internal("i".into()), Code::Internal, 500),
            (Error::BadRequest("b"), Code::InvalidArgument, 400),
        ] {
            let r = check(respond::error(&e)).await;
            assert_eq!(r.status.as_ref().unwrap().code, code as i32, "{e:?}");
            assert_eq!(denied(&r).status.as_ref().unwrap().code, http);
            assert!(denied(&r).body.contains("detail"));
        }
    }

    #[tokio::test]
    async fn denials_carry_knoxs_body_and_header() {
        let r = check(respond::deny(DenyReason::InvalidToken, "Token")).await;
        let status = r.status.as_ref().unwrap();
        assert_eq!(status.code, Code::Unauthenticated as i32);
        assert_eq!(status.message, "Invalid token.");
        let d = denied(&r);
        assert_eq!(d.status.as_ref().unwrap().code, 401);
        assert_eq!(d.body, r#"{"detail":"Invalid token."}"#);
        let header = |name: &str| {
            d.headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == name)
                .map(|h| h.value.clone())
        };
        assert_eq!(header("www-authenticate").as_deref(), Some("Token"));
        assert_eq!(header("content-type").as_deref(), Some("application/json"));

        let r = check(respond::forbidden()).await;
        assert_eq!(
            r.status.as_ref().unwrap().code,
            Code::PermissionDenied as i32
        );
        assert_eq!(denied(&r).status.as_ref().unwrap().code, 403);
        assert_eq!(
            denied(&r).body,
            r#"{"detail":"You do not have permission to perform this action."}"#
        );
    }

    #[tokio::test]
    async fn allow_sets_identity_and_removes_the_rest() {
        let mut answer = respond::anonymous();
        answer.headers_mut().insert(
            HeaderName::from_static("x-auth-user-id"),
            hyper::header::HeaderValue::from_static("42"),
        );
        let r = check(answer).await;
        assert_eq!(r.status.as_ref().unwrap().code, Code::Ok as i32);
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("not ok");
        };
        assert_eq!(ok.headers.len(), 1);
        let h = &ok.headers[0];
        assert_eq!(
            h.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        assert_eq!(h.header.as_ref().unwrap().key, "x-auth-user-id");
        assert_eq!(h.header.as_ref().unwrap().value, "42");
        assert_eq!(
            ok.headers_to_remove,
            ["x-auth-user-staff", "x-auth-user-groups"]
        );

        // Anonymous: nothing set, every identity header removed.
        let r = check(respond::anonymous()).await;
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("not ok");
        };
        assert!(ok.headers.is_empty());
        assert_eq!(ok.headers_to_remove.len(), 3);

        // An identity header sent empty (a value it cannot carry exactly): removed, not set.
        let mut answer = respond::anonymous();
        answer.headers_mut().insert(
            HeaderName::from_static("x-auth-user-id"),
            hyper::header::HeaderValue::from_static("42"),
        );
        answer.headers_mut().insert(
            HeaderName::from_static("x-auth-user-groups"),
            hyper::header::HeaderValue::from_static(""),
        );
        let Some(HttpResponse::OkResponse(ok)) = check(answer).await.http_response else {
            panic!("not ok");
        };
        let set: Vec<_> = ok
            .headers
            .iter()
            .map(|h| h.header.as_ref().unwrap().key.as_str())
            .collect();
        assert_eq!(set, ["x-auth-user-id"]);
        assert_eq!(
            ok.headers_to_remove,
            ["x-auth-user-staff", "x-auth-user-groups"]
        );
    }

    #[tokio::test]
    async fn a_unary_response_is_framed_as_tonic_frames_one() {
        use prost::Message as _;
        let message = check(respond::error(&Error::PayloadTooLarge)).await;
        let response = unary_response(&message);
        assert_eq!(
            response.headers()[hyper::header::CONTENT_TYPE],
            "application/grpc"
        );
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        let bytes = collected.to_bytes();
        assert_eq!(bytes[0], 0, "not compressed");
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 5);
        let decoded = CheckResponse::decode(&bytes[5..]).unwrap();
        assert_eq!(decoded, message);
        assert_eq!(denied(&decoded).status.as_ref().unwrap().code, 413);
    }
}
