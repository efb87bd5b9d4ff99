//! Envoy ext_authz over gRPC (`envoy.service.auth.v3.Authorization/Check`): the `/verify`
//! decision, read from a check request and answered as a `CheckResponse`.
//!
//! A check crosses the same layers as `/verify`: the `Authorization` value(s) and the method are
//! taken from the check request's copy of the client's headers and the policy from the route's
//! `context_extensions` (pure, below); `http::verify::answer` does the tiered lookup, the
//! decision and the permission check, and `http::respond` chooses the status, as for `/verify`;
//! [`respond`] only says how Envoy is told that answer.

mod deadline;
pub mod respond;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use hyper::{
    HeaderMap, Method,
    header::{self, HeaderValue},
};
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;

use crate::{
    auth::Policy,
    deadline::Deadline,
    error::Error,
    http::{respond as http_respond, verify},
    metrics::{Reason, Route, VerifyOutcome},
    state::App,
    telemetry::{SPAN_TARGET, continue_trace},
};

/// The Authorization service: one per gRPC listener.
#[derive(Clone)]
pub struct Check {
    app: Arc<App>,
}

impl Check {
    pub fn new(app: Arc<App>) -> Check {
        Check { app }
    }
}

#[tonic::async_trait]
impl Authorization for Check {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let span = tracing::info_span!(target: SPAN_TARGET, "grpc_check", otel.kind = "server");
        continue_trace(&span, request.metadata().as_ref());
        let caller_deadline = request
            .metadata()
            .as_ref()
            .get(deadline::GRPC_TIMEOUT)
            .and_then(|v| deadline::parse_grpc_timeout(v.as_bytes()));
        let answer = self
            .answer(request.into_inner(), caller_deadline)
            .instrument(span)
            .await;
        let status = answer.status();
        self.app.metrics.request(Route::GrpcCheck, status);
        // Every answer is a CheckResponse, outages included (grpc/respond.rs says why).
        Ok(Response::new(
            respond::check_response(answer, &self.app.owned_identity_headers).await,
        ))
    }
}

/// `call` (tonic's service, the check's message read and answered) within
/// `server.request_timeout`, counted from the request's head: [`Check::answer`]'s own deadline
/// starts only once the message has arrived, and a caller that never sends it would otherwise
/// hold its call, and the connection's slot under `server.max_connections`, for as long as it
/// likes (an HTTP/2 connection with a call in flight is not idle). Past it, the answer is the
/// denial of any request past its deadline.
pub async fn within_request_timeout(
    app: &App,
    call: impl Future<Output = hyper::Response<tonic::body::Body>>,
) -> hyper::Response<tonic::body::Body> {
    match tokio::time::timeout(app.config.server.request_timeout, call).await {
        Ok(response) => response,
        Err(_) => {
            tracing::debug!(
                "check request not received and answered within server.request_timeout"
            );
            let denial = http_respond::error(&Error::DeadlineExceeded);
            app.metrics.request(Route::GrpcCheck, denial.status());
            respond::unary_response(&respond::check_response(denial, &[]).await)
        }
    }
}

/// The check request tonic refused before [`Check::check`] could see it, from the status of its
/// answer (a response without a body, the status in its headers): one over
/// `server.grpc_max_message_bytes` (OUT_OF_RANGE), or one that does not decode (INTERNAL: not
/// protobuf, truncated, or invalid UTF-8 in a `string` field, which a client's Latin-1 header
/// or query byte copied raw by Envoy makes). [`Check::check`] itself never fails, so these are
/// the only refusals on its path; other codes (UNIMPLEMENTED for another method) pass.
fn refused_check(response: &hyper::Response<tonic::body::Body>) -> Option<Error> {
    let code = response.headers().get("grpc-status")?;
    match Code::from_bytes(code.as_bytes()) {
        Code::OutOfRange => Some(Error::PayloadTooLarge),
        Code::Internal => Some(Error::BadRequest("Malformed check request.")),
        _ => None,
    }
}

/// The gRPC listener's answer: tonic's, except that a check it refused before decoding it
/// gets a denial (413 too large, 400 malformed) instead of an RPC error, which Envoy would
/// answer as `failure_mode_allow` says: let through under `true`, with whatever identity
/// headers the client sent, since only an allowed check's answer removes them. Every other
/// answer is already a `CheckResponse` ([`Check::check`]).
pub async fn answer_refusals_as_denials(
    app: &App,
    response: hyper::Response<tonic::body::Body>,
) -> hyper::Response<tonic::body::Body> {
    let Some(e) = refused_check(&response) else {
        return response;
    };
    match &e {
        Error::PayloadTooLarge => tracing::debug!(
            limit = app.config.server.grpc_max_message_bytes,
            "check request over server.grpc_max_message_bytes"
        ),
        _ => tracing::debug!(
            grpc_message = ?response.headers().get("grpc-message"),
            "check request that does not decode"
        ),
    }
    let denial = http_respond::error(&e);
    app.metrics.request(Route::GrpcCheck, denial.status());
    respond::unary_response(&respond::check_response(denial, &[]).await)
}

impl Check {
    /// The HTTP answer `/verify` would give, under the same in-flight cap, and the same
    /// deadline unless the caller's (`grpc-timeout`) comes sooner.
    async fn answer(
        &self,
        check: CheckRequest,
        caller_deadline: Option<Duration>,
    ) -> hyper::Response<http_respond::Body> {
        let app = &self.app;
        // Shed load rather than queue, as the HTTP listener does.
        let Ok(_permit) = Arc::clone(&app.in_flight).try_acquire_owned() else {
            app.metrics.load_shed.inc();
            return http_respond::error(&Error::Overloaded);
        };
        let started = Instant::now();
        let server = &app.config.server;
        let budget = deadline::check_deadline(
            server.request_timeout,
            caller_deadline,
            server.grpc_deadline_margin,
        );
        let deadline = Deadline::after(budget);
        let (response, outcome, reason) =
            match tokio::time::timeout(budget, decide(app, &check, deadline)).await {
                Ok(answer) => answer,
                Err(_) => {
                    let e = Error::DeadlineExceeded;
                    let reason = Reason::Failed(e.label());
                    (http_respond::error(&e), VerifyOutcome::Error, reason)
                }
            };
        app.metrics.verify_outcome(outcome, reason);
        app.metrics
            .verify_duration
            .observe(started.elapsed().as_secs_f64());
        response
    }
}

async fn decide(
    app: &Arc<App>,
    check: &CheckRequest,
    deadline: Deadline,
) -> (hyper::Response<http_respond::Body>, VerifyOutcome, Reason) {
    let failed = |e: Error| {
        let reason = Reason::Failed(e.label());
        (http_respond::error(&e), VerifyOutcome::Error, reason)
    };
    let attributes = check.attributes.as_ref();
    let extensions = attributes.into_iter().flat_map(|a| &a.context_extensions);
    let policy = match Policy::from_context_extensions(extensions) {
        Ok(p) => p,
        Err(e) => return failed(Error::from(e)),
    };
    let http = attributes
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    let (method, headers) = match request_headers(http) {
        Ok(read) => read,
        Err(e) => return failed(e),
    };
    verify::answer(app, &method, &headers, &policy, deadline).await
}

/// The headers `/verify` reads (`Authorization`, and `Access-Control-Request-Method` for a
/// preflight) and the method, from the check request's copy of the client's request.
///
/// Envoy sends either `header_map` (with `encode_raw_headers`: one entry per header, values as
/// raw bytes) or the `headers` map (one entry per name, repeated headers merged with `,`, keys
/// lowercased). Both are read; names are matched case-insensitively in case a caller other than
/// Envoy sends them otherwise. Absent attributes mean a request without those headers.
fn request_headers(http: Option<&HttpRequest>) -> Result<(Method, HeaderMap), Error> {
    let mut headers = HeaderMap::new();
    let Some(http) = http else {
        return Ok((Method::GET, headers));
    };
    let mut read = |name: &str, value: &[u8]| -> Result<(), Error> {
        for wanted in [header::AUTHORIZATION, header::ACCESS_CONTROL_REQUEST_METHOD] {
            if name.eq_ignore_ascii_case(wanted.as_str()) {
                // What hyper would refuse on the HTTP listener (a control character in a
                // value) is refused here too, with the same 400.
                let value = HeaderValue::from_bytes(value)
                    .map_err(|_| Error::BadRequest("Invalid header value."))?;
                headers.append(wanted, value);
            }
        }
        Ok(())
    };
    match http.header_map.as_ref().filter(|m| !m.headers.is_empty()) {
        Some(map) => {
            for h in &map.headers {
                let value = if h.raw_value.is_empty() {
                    h.value.as_bytes()
                } else {
                    &h.raw_value
                };
                read(&h.key, value)?;
            }
        }
        None => {
            for (name, value) in &http.headers {
                read(name, value.as_bytes())?;
            }
        }
    }
    // Only OPTIONS changes anything (a CORS preflight); a method Envoy did not send, or that is
    // not a method at all, is read as one that does not.
    let method = Method::from_bytes(http.method.as_bytes()).unwrap_or(Method::GET);
    Ok((method, headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{
        HeaderMap as EnvoyHeaderMap, HeaderValue as EnvoyHeaderValue,
    };

    fn http(headers: &[(&str, &str)]) -> HttpRequest {
        HttpRequest {
            method: "GET".into(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..HttpRequest::default()
        }
    }

    fn raw(entries: &[(&str, &[u8])]) -> HttpRequest {
        HttpRequest {
            header_map: Some(EnvoyHeaderMap {
                headers: entries
                    .iter()
                    .map(|(k, v)| EnvoyHeaderValue {
                        key: (*k).to_owned(),
                        raw_value: v.to_vec(),
                        ..EnvoyHeaderValue::default()
                    })
                    .collect(),
            }),
            ..HttpRequest::default()
        }
    }

    fn authorization(h: &HeaderMap) -> Vec<&[u8]> {
        h.get_all(header::AUTHORIZATION)
            .iter()
            .map(|v| v.as_bytes())
            .collect()
    }

    #[test]
    fn reads_only_what_verify_reads() {
        let req = http(&[
            ("authorization", "Token abc"),
            ("cookie", "a=b"),
            ("x-auth-user-id", "7"),
        ]);
        let (method, h) = request_headers(Some(&req)).unwrap();
        assert_eq!(method, Method::GET);
        assert_eq!(authorization(&h), [b"Token abc"]);
        assert_eq!(h.len(), 1);
        let mut pre = http(&[("access-control-request-method", "POST")]);
        pre.method = "OPTIONS".into();
        let (method, h) = request_headers(Some(&pre)).unwrap();
        assert_eq!(method, Method::OPTIONS);
        assert!(h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD));
    }

    #[test]
    fn raw_header_map_keeps_every_copy_and_byte() {
        let req = raw(&[
            ("authorization", b"Token a"),
            ("Authorization", b"Token b"),
            ("x", b"y"),
        ]);
        let (_, h) = request_headers(Some(&req)).unwrap();
        // Two copies, as /verify would see two headers (and refuses them).
        assert_eq!(authorization(&h), [&b"Token a"[..], b"Token b"]);
        let req = raw(&[("authorization", b"Token \xff\xfe")]);
        let (_, h) = request_headers(Some(&req)).unwrap();
        assert_eq!(authorization(&h), [b"Token \xff\xfe"]);
        // `value` when `raw_value` is empty.
        let mut req = raw(&[]);
        req.header_map = Some(EnvoyHeaderMap {
            headers: vec![EnvoyHeaderValue {
                key: "authorization".into(),
                value: "Token v".into(),
                ..EnvoyHeaderValue::default()
            }],
        });
        assert_eq!(
            authorization(&request_headers(Some(&req)).unwrap().1),
            [b"Token v"]
        );
    }

    #[test]
    fn missing_or_odd_fields_do_not_fail() {
        let (method, h) = request_headers(None).unwrap();
        assert_eq!(method, Method::GET);
        assert!(h.is_empty());
        let mut req = http(&[]);
        req.method = String::new();
        assert_eq!(request_headers(Some(&req)).unwrap().0, Method::GET);
        req.method = "B A D".into();
        assert_eq!(request_headers(Some(&req)).unwrap().0, Method::GET);
        let req = http(&[("authorization", "Token a\nb")]);
        assert!(matches!(
            request_headers(Some(&req)),
            Err(Error::BadRequest(_))
        ));
    }
}
