//! OpenTelemetry: the real binary exports its spans by OTLP/HTTP to a receiver started here,
//! which decodes them with the OpenTelemetry protobuf definitions. A `/verify` and a login each
//! give a span that continues the caller's W3C `traceparent`, with a child span per tier asked.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, trace::v1::Span,
};
use prost::Message as _;
use tokio::net::TcpListener;

use crate::support::{Binary, TestDb, eventually, http, user_with_token};

/// An OTLP/HTTP traces endpoint that keeps every span it is sent.
async fn start_receiver() -> (SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&spans);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let kept = Arc::clone(&kept);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let kept = Arc::clone(&kept);
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        let body = req.into_body().collect().await?.to_bytes();
                        let export =
                            ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                        for resource in export.resource_spans {
                            for scope in resource.scope_spans {
                                kept.lock().unwrap().extend(scope.spans);
                            }
                        }
                        Ok::<_, hyper::Error>(Response::new(Full::new(bytes::Bytes::new())))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, spans)
}

fn tier_of(span: &Span) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == "tier")
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                Some(s.clone())
            }
            _ => None,
        })
}

#[tokio::test]
async fn verify_and_login_spans_continue_the_callers_trace_with_a_child_per_tier() {
    let db = TestDb::migrated().await;
    let token = user_with_token(&db, "tracy").await;
    let (receiver, spans) = start_receiver().await;
    let binary = Binary::spawn(
        &db.url,
        &[
            ("KNOXGATE_SESSIONS_PASSWORD_ITERATIONS", "1000".into()),
            (
                "KNOXGATE_TRACING_OTLP_ENDPOINT",
                format!("http://{receiver}/v1/traces"),
            ),
        ],
    );
    let (main, admin) = (binary.addr, binary.admin);
    let ready = eventually(Duration::from_secs(15), || async {
        tokio::net::TcpStream::connect(admin).await.is_ok()
            && http(admin, "GET", "/readyz", &[], b"").await.status == 200
    })
    .await;
    assert!(ready.is_some(), "knoxgate did not become ready");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let auth = format!("Token {}", token.token);
    let verified = http(
        main,
        "GET",
        "/verify",
        &[("authorization", &auth), ("traceparent", &traceparent)],
        b"",
    )
    .await;
    assert_eq!(verified.status, 200);
    let login_trace = "0af7651916cd43dd8448eb211c80319c";
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("tracy:pw")
    );
    let login_parent = format!("00-{login_trace}-b7ad6b7169203331-01");
    let logged_in = http(
        main,
        "POST",
        "/api/auth/login/",
        &[("authorization", &basic), ("traceparent", &login_parent)],
        b"",
    )
    .await;
    assert_eq!(logged_in.status, 200);

    // SIGTERM flushes the batch exporter before the process exits.
    assert_eq!(binary.terminate().await.code(), Some(0));

    let spans = spans.lock().unwrap().clone();
    let named = |name: &str, trace: &str| -> Vec<Span> {
        spans
            .iter()
            .filter(|s| s.name == name && hex::encode(&s.trace_id) == trace)
            .cloned()
            .collect()
    };
    let verify = named("verify", trace_id);
    assert_eq!(
        verify.len(),
        1,
        "one verify span in the caller's trace: {spans:#?}"
    );
    let verify = &verify[0];
    assert_eq!(hex::encode(&verify.parent_span_id), caller_span);
    let children: Vec<String> = named("store.lookup", trace_id)
        .iter()
        .filter(|s| s.parent_span_id == verify.span_id)
        .filter_map(tier_of)
        .collect();
    // A first request: the in-process tier misses, Redis misses, Postgres answers.
    for tier in ["memory", "redis", "postgres"] {
        assert!(
            children.iter().any(|t| t == tier),
            "no {tier} child of the verify span: {children:?}"
        );
    }
    let login = named("login", login_trace);
    assert_eq!(
        login.len(),
        1,
        "one login span in the caller's trace: {spans:#?}"
    );
    assert_eq!(hex::encode(&login[0].parent_span_id), "b7ad6b7169203331");
}
