//! Logging and tracing set-up: the stderr log (`[log]`) and, when `tracing.otlp_endpoint` is
//! set, OpenTelemetry spans exported by OTLP/HTTP (`[tracing]`).
//!
//! knoxgate's spans (one per `/verify` and login, a child per tier it asks) use the target
//! [`SPAN_TARGET`], which only the OpenTelemetry layer enables. With no endpoint there is no such
//! layer, so those callsites are disabled once and for all and a request pays one cached
//! interest check per span, nothing more.

use std::io::IsTerminal as _;

use hyper::HeaderMap;
use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, filter::Targets, layer::SubscriberExt as _};

use crate::config::{Config, LogFormat};

/// The target of knoxgate's request spans.
pub const SPAN_TARGET: &str = "knoxgate::span";

/// What must be flushed before the process exits.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (bounded by `tracing.export_timeout`).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("knoxgate: could not flush the last spans: {e}");
        }
    }
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP exporter: {0}")]
pub struct TelemetryError(String);

/// Client libraries whose debug and trace events carry secrets: tokio_postgres logs every
/// statement's parameters (token digests and keys, usernames, new password hashes), and the
/// pool and Redis client log commands and keys. They log through the `log` crate, which this
/// subscriber does not bridge today; the directives keep them quiet should a bridge (or a
/// driver's own `tracing` support) ever bring their records in.
const SECRET_LOGGING_TARGETS: [&str; 5] = [
    "tokio_postgres",
    "postgres_protocol",
    "deadpool_postgres",
    "deadpool",
    "fred",
];

/// Directives holding those libraries at `info` whatever the level, unless `level` names one
/// of them itself (an operator who writes `tokio_postgres=debug` asked for it).
fn quieted_drivers(level: &str) -> Vec<String> {
    SECRET_LOGGING_TARGETS
        .iter()
        .filter(|t| {
            !level
                .split(',')
                .any(|d| d.trim().split(['=', '[', ':']).next() == Some(**t))
        })
        .map(|t| format!("{t}=info"))
        .collect()
}

/// Installs the global subscriber. Call once, before the runtime starts.
pub fn init(config: &Config) -> Result<Telemetry, TelemetryError> {
    // The request spans are for the exporter only; the log never shows them.
    let mut log_filter = EnvFilter::new(&config.log.level).add_directive(
        format!("{SPAN_TARGET}=off")
            .parse()
            .expect("a valid directive"),
    );
    for directive in quieted_drivers(&config.log.level) {
        log_filter = log_filter.add_directive(directive.parse().expect("a valid directive"));
    }
    // Colours only for a terminal: a log file or collector would get escape codes.
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let log = match config.log.format {
        LogFormat::Json => log.json().with_filter(log_filter).boxed(),
        LogFormat::Text => log.with_filter(log_filter).boxed(),
    };
    let (otel, provider) = match &config.tracing.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .with_timeout(config.tracing.export_timeout)
                .build()
                .map_err(|e| TelemetryError(e.to_string()))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    Resource::builder()
                        .with_service_name(config.tracing.service_name.clone())
                        .build(),
                )
                .build();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("knoxgate"))
                .with_filter(Targets::new().with_target(SPAN_TARGET, tracing::Level::TRACE));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    let subscriber = tracing_subscriber::registry().with(log);
    // Without an exporter the layer is left out rather than added as `None`: an absent
    // `Option` layer declares interest in every callsite, so each request would still build
    // (and tear down) its spans in the registry only for the log layer to drop them.
    let installed = match otel {
        Some(otel) => tracing::subscriber::set_global_default(subscriber.with(otel)),
        None => tracing::subscriber::set_global_default(subscriber),
    };
    installed.map_err(|e| TelemetryError(e.to_string()))?;
    Ok(Telemetry { provider })
}

/// Makes `span` a child of the W3C `traceparent` the request carries, if any.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    // A malformed traceparent yields an empty context: the span then starts a new trace.
    let _ = span.set_parent(parent);
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::quieted_drivers;

    #[test]
    fn drivers_stay_at_info_unless_named() {
        let all = quieted_drivers("debug");
        assert!(all.contains(&"tokio_postgres=info".to_owned()), "{all:?}");
        assert!(all.contains(&"fred=info".to_owned()));
        let named = quieted_drivers("debug,tokio_postgres=trace");
        assert!(
            !named.iter().any(|d| d.starts_with("tokio_postgres=")),
            "{named:?}"
        );
        assert!(named.contains(&"fred=info".to_owned()));
    }
}
