//! Parsers for the kinds of value several sections share: durations with units, header names,
//! SQL identifiers, addresses and path prefixes. Each names the key it was given in its error.

use std::{net::SocketAddr, num::NonZeroUsize, time::Duration};

use super::ConfigError;

/// The error for a bad value of `key`.
pub(super) fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// The longest duration any key takes: far beyond any sensible setting, and short enough that
/// `Instant::now() + d` and `OffsetDateTime::now_utc() + d` cannot overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses `250ms`, `5s`, `10m`, `10h`, `1d`; fractions such as `1.5s` too.
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    duration_from_str(s).map_err(|message| invalid(key, message))
}

fn duration_from_str(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("`{s}` has no unit; write e.g. `{s}s` or `{s}ms`"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("unknown unit `{unit}` (use ms, s, m, h or d)")),
    };
    // Past what a Duration holds, or so far that adding it to a clock overflows (a panic at
    // the first request), is a typo to report.
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(format!("`{s}` is too long (at most 100 years)")),
    }
}

/// Like [`duration_from_str`], with `none` for no duration at all.
fn optional_duration_from_str(s: &str) -> Result<Option<Duration>, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        Ok(None)
    } else {
        duration_from_str(s).map(Some)
    }
}

/// Writes a duration back in the largest unit that keeps it whole, so that what the file says
/// and the defaults compare equal whatever unit either was written in.
fn format_duration(d: Duration) -> String {
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{}s", d.as_secs_f64());
    }
    let ms = d.as_millis();
    for (unit, per) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= per && ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// Serde glue for a duration key: `#[serde(with = "value::duration")]`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        // The key is added by the caller, which knows the path (see `Config::from_toml_and_env`).
        super::duration_from_str(&String::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// Serde glue for a duration key that accepts `none`.
pub mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_str("none"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::optional_duration_from_str(&String::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// A count that must be at least 1.
/// A duration that must not be zero: a timeout of zero would close every connection (or fail
/// every call) at once, an interval of zero would spin.
pub(super) fn positive(key: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(d)
}

/// A file named by `key`, checked to exist now rather than when first used; `None` when empty.
pub(super) fn existing_file(key: &str, path: &str) -> Result<Option<String>, ConfigError> {
    let path = path.trim();
    if path.is_empty() {
        return Ok(None);
    }
    std::fs::metadata(path).map_err(|e| invalid(key, format!("`{path}`: {e}")))?;
    Ok(Some(path.to_owned()))
}

pub(super) fn nonzero(key: &str, n: u64) -> Result<NonZeroUsize, ConfigError> {
    NonZeroUsize::new(n as usize).ok_or_else(|| invalid(key, "must be greater than 0"))
}

/// A count no larger than `max` (what the thing it sizes can hold).
pub(super) fn at_most(key: &str, n: u64, max: u64) -> Result<u64, ConfigError> {
    if n > max {
        return Err(invalid(key, format!("must be at most {max}")));
    }
    Ok(n)
}

/// A count of at least 1 and at most `max`.
pub(super) fn nonzero_at_most(key: &str, n: u64, max: u64) -> Result<NonZeroUsize, ConfigError> {
    nonzero(key, at_most(key, n, max)?)
}

/// A header name, or `None` for an empty string (the header is not sent).
pub(super) fn header_name(
    key: &str,
    s: &str,
) -> Result<Option<hyper::header::HeaderName>, ConfigError> {
    if s.is_empty() {
        return Ok(None);
    }
    hyper::header::HeaderName::from_bytes(s.as_bytes())
        .map(Some)
        .map_err(|_| invalid(key, format!("`{s}` is not a valid header name")))
}

/// A table name, optionally schema-qualified.
pub(super) fn sql_identifier(key: &str, s: &str) -> Result<String, ConfigError> {
    // Table names are spliced into SQL, so only plain (optionally schema-qualified) identifiers.
    let ok = !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(invalid(key, format!("`{s}` is not a plain SQL identifier")))
    }
}

/// A column name, without a table.
pub(super) fn column(key: &str, s: &str) -> Result<String, ConfigError> {
    if s.contains('.') {
        return Err(invalid(key, "a column name, without a table"));
    }
    sql_identifier(key, s)
}

/// A column name, or `None` for an empty string (the model has no such column).
pub(super) fn optional_column(key: &str, s: &str) -> Result<Option<String>, ConfigError> {
    if s.is_empty() {
        Ok(None)
    } else {
        column(key, s).map(Some)
    }
}

/// A listen address with its port.
pub(super) fn socket_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(key, format!("`{s}` is not an address like 0.0.0.0:8080")))
}

/// A URL path that starts with `/`. A request path never holds `?` or `#` (they start the query
/// and fragment), whitespace or control characters: a prefix with one would match no request.
pub(super) fn path_prefix(key: &str, s: &str) -> Result<String, ConfigError> {
    if !s.starts_with('/') {
        return Err(invalid(key, "must start with `/`"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| matches!(c, '?' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            key,
            format!(
                "{s:?} holds {c:?}: a path has no `?`, `#`, whitespace or control characters \
                 (no request would ever match it)"
            ),
        ));
    }
    Ok(s.to_owned())
}
