//! `[log]`: the format and filter of the log written to stderr.

use serde::{Deserialize, Serialize};

use super::{ConfigError, value::invalid};

const DEFAULT_FORMAT: &str = "text";
const DEFAULT_LEVEL: &str = "info";

/// `[log]` as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogFile {
    pub format: String,
    pub level: String,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            format: DEFAULT_FORMAT.into(),
            level: DEFAULT_LEVEL.into(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// The log's format and filter.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// How lines are written.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `knoxgate=debug,info`; checked at load.
    pub level: String,
}

impl TryFrom<LogFile> for LogConfig {
    type Error = ConfigError;

    fn try_from(file: LogFile) -> Result<Self, ConfigError> {
        let format = match file.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("`{other}`: use text or json"),
                ));
            }
        };
        tracing_subscriber::EnvFilter::try_new(&file.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(LogConfig {
            format,
            level: file.level,
        })
    }
}
