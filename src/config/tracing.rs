//! `[tracing]`: OpenTelemetry spans exported by OTLP/HTTP. Off unless `otlp_endpoint` is set.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    value::{self, invalid},
};

const DEFAULT_SERVICE_NAME: &str = "knoxgate";
/// Matches the OTLP exporters' own default export timeout.
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// `[tracing]` as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingFile {
    /// Empty: off.
    pub otlp_endpoint: String,
    pub service_name: String,
    #[serde(with = "value::duration")]
    pub export_timeout: Duration,
}

impl Default for TracingFile {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: DEFAULT_SERVICE_NAME.into(),
            export_timeout: DEFAULT_EXPORT_TIMEOUT,
        }
    }
}

/// Where spans go, if anywhere.
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// The OTLP/HTTP traces URL, used verbatim (e.g. `http://collector:4318/v1/traces`);
    /// `None` exports nothing and costs nothing on the request path.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// How long one export may take before it is abandoned.
    pub export_timeout: Duration,
}

impl TryFrom<TracingFile> for TracingConfig {
    type Error = ConfigError;

    fn try_from(file: TracingFile) -> Result<Self, ConfigError> {
        let otlp_endpoint = Some(file.otlp_endpoint.trim().to_owned()).filter(|e| !e.is_empty());
        if let Some(url) = &otlp_endpoint
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "tracing.otlp_endpoint",
                format!(
                    "`{url}`: give an http:// or https:// URL, e.g. http://collector:4318/v1/traces"
                ),
            ));
        }
        if file.service_name.is_empty() {
            return Err(invalid("tracing.service_name", "must not be empty"));
        }
        Ok(TracingConfig {
            otlp_endpoint,
            service_name: file.service_name,
            export_timeout: file.export_timeout,
        })
    }
}
