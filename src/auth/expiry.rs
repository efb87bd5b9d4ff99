//! Timestamps as Django, DRF and django-rest-knox-redis write them.

use jiff::tz::TimeZone;
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Iso8601};

/// Python's `datetime.isoformat()` of `dt` seen at `offset`, a zero offset written `zero`.
fn isoformat(dt: OffsetDateTime, offset: UtcOffset, zero: &str) -> String {
    let dt = dt.to_offset(offset);
    let (y, mo, d) = (dt.year(), u8::from(dt.month()), dt.day());
    let (h, mi, s, us) = (dt.hour(), dt.minute(), dt.second(), dt.microsecond());
    let suffix = if offset.is_utc() {
        zero.to_owned()
    } else {
        python_offset(offset)
    };
    // Python's isoformat() drops the fraction when the microsecond is 0, else prints 6 digits.
    if us == 0 {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{suffix}")
    } else {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}{suffix}")
    }
}

/// An offset as `isoformat()` prints it: `+HH:MM`, with `:SS` only when there are seconds
/// (some zones' offsets before 1900, "local mean time").
fn python_offset(offset: UtcOffset) -> String {
    let sign = if offset.is_negative() { '-' } else { '+' };
    let (h, m, s) = offset.as_hms();
    let (h, m, s) = (h.unsigned_abs(), m.unsigned_abs(), s.unsigned_abs());
    if s == 0 {
        format!("{sign}{h:02}:{m:02}")
    } else {
        format!("{sign}{h:02}:{m:02}:{s:02}")
    }
}

/// The offset `zone` has at the instant `dt`.
fn offset_in(zone: &TimeZone, dt: OffsetDateTime) -> UtcOffset {
    // Both crates span the years -9999..=9999, so neither conversion fails for a datetime
    // Postgres or knoxgate made; UTC is only a fallback that cannot be reached.
    jiff::Timestamp::from_second(dt.unix_timestamp())
        .ok()
        .and_then(|at| UtcOffset::from_whole_seconds(zone.to_offset(at).seconds()).ok())
        .unwrap_or(UtcOffset::UTC)
}

/// The login response's `expiry` as DRF renders a datetime with `USE_TZ = True`: converted to
/// the site's `TIME_ZONE`, then `isoformat()` with a zero offset written `Z`.
pub fn format_drf_expiry(dt: OffsetDateTime, zone: &TimeZone) -> String {
    isoformat(dt, offset_in(zone, dt), "Z")
}

/// knox's `EXPIRY_DATETIME_FORMAT`: how the login response shows a token's expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpiryFormat {
    /// `'iso-8601'`, DRF's default `DATETIME_FORMAT`: see [`format_drf_expiry`].
    Iso8601,
    /// `None`: DRF leaves the datetime as Django read it from the database (in UTC, whatever
    /// `TIME_ZONE` says) and its JSON encoder writes `isoformat()`, `+00:00` as `Z`.
    Unconverted,
    /// A `strftime` format, applied to the expiry in the site's `TIME_ZONE`.
    Strftime(Vec<Piece>),
}

/// A part of a `strftime` format: text written as it is, or a directive (the letter after `%`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Directive(char),
}

/// The `strftime` directives knoxgate writes as Python does (in the C locale, as Django runs).
pub const STRFTIME_DIRECTIVES: &str = "YmdHMSfyjIpaAbBzZ%";

impl ExpiryFormat {
    /// Reads a setting as knox does: `iso-8601` or `none` (knox's `None`), in any case, or a
    /// `strftime` format made of the directives in [`STRFTIME_DIRECTIVES`]; any other directive
    /// is refused rather than written differently from Python, and so is a format without one.
    pub fn parse(setting: &str) -> Result<ExpiryFormat, String> {
        if setting.eq_ignore_ascii_case("iso-8601") {
            return Ok(ExpiryFormat::Iso8601);
        }
        if setting.eq_ignore_ascii_case("none") {
            return Ok(ExpiryFormat::Unconverted);
        }
        if setting.is_empty() {
            return Err("empty: use iso-8601, none or a strftime format".into());
        }
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = setting.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                text.push(c);
                continue;
            }
            match chars.next() {
                Some(d) if STRFTIME_DIRECTIVES.contains(d) => {
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Directive(d));
                }
                Some(d) => {
                    return Err(format!(
                        "`%{d}` is not among the directives knoxgate writes as Python does: %{}",
                        STRFTIME_DIRECTIVES
                            .chars()
                            .map(String::from)
                            .collect::<Vec<_>>()
                            .join(" %")
                    ));
                }
                None => return Err("ends with a lone `%`".into()),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        // Python would write such a format as it is, as every token's expiry: a misspelt
        // `iso-8601` or `None`, surely.
        if !pieces
            .iter()
            .any(|p| matches!(p, Piece::Directive(d) if *d != '%'))
        {
            return Err(format!(
                "`{setting}` has no % directive: use iso-8601, none or a strftime format"
            ));
        }
        Ok(ExpiryFormat::Strftime(pieces))
    }
}

/// The login response's `expiry` as knox's `LoginView.format_expiry_datetime` writes it.
pub fn format_login_expiry(dt: OffsetDateTime, zone: &TimeZone, format: &ExpiryFormat) -> String {
    match format {
        ExpiryFormat::Iso8601 => format_drf_expiry(dt, zone),
        ExpiryFormat::Unconverted => format_drf_expiry(dt, &TimeZone::UTC),
        ExpiryFormat::Strftime(pieces) => strftime(dt, zone, pieces),
    }
}

/// Python's `datetime.strftime` of `dt` in `zone`, in the C locale.
fn strftime(dt: OffsetDateTime, zone: &TimeZone, pieces: &[Piece]) -> String {
    let offset = offset_in(zone, dt);
    let local = dt.to_offset(offset);
    // time writes the English names, as Python does in the C locale.
    let (weekday, month) = (local.weekday().to_string(), local.month().to_string());
    let hour12 = match local.hour() % 12 {
        0 => 12,
        h => h,
    };
    let mut out = String::new();
    for piece in pieces {
        let d = match piece {
            Piece::Text(text) => {
                out.push_str(text);
                continue;
            }
            Piece::Directive(d) => *d,
        };
        let written = match d {
            'Y' => format!("{:04}", local.year()),
            'm' => format!("{:02}", u8::from(local.month())),
            'd' => format!("{:02}", local.day()),
            'H' => format!("{:02}", local.hour()),
            'M' => format!("{:02}", local.minute()),
            'S' => format!("{:02}", local.second()),
            'f' => format!("{:06}", local.microsecond()),
            'y' => format!("{:02}", local.year().rem_euclid(100)),
            'j' => format!("{:03}", local.ordinal()),
            'I' => format!("{hour12:02}"),
            'p' => (if local.hour() < 12 { "AM" } else { "PM" }).to_owned(),
            'a' => weekday[..3].to_owned(),
            'A' => weekday.clone(),
            'b' => month[..3].to_owned(),
            'B' => month.clone(),
            'z' => python_offset(offset).replace(':', ""),
            'Z' => abbreviation_in(zone, dt),
            // `%%`: the parse lets in no other directive.
            _ => "%".to_owned(),
        };
        out.push_str(&written);
    }
    out
}

/// The zone's abbreviation at the instant `dt` (`CET`, `CEST`, `UTC`), as `%Z` writes it.
fn abbreviation_in(zone: &TimeZone, dt: OffsetDateTime) -> String {
    jiff::Timestamp::from_second(dt.unix_timestamp())
        .map(|at| zone.to_offset_info(at).abbreviation().to_owned())
        .unwrap_or_default()
}

/// Python `datetime.isoformat()` of a UTC datetime (`…+00:00`), as django-rest-knox-redis stores it.
pub fn format_isoformat(dt: OffsetDateTime) -> String {
    isoformat(dt, UtcOffset::UTC, "+00:00")
}

/// Parses the timestamps django-rest-knox-redis reads back with `datetime.fromisoformat`.
///
/// An offset is required: a naive timestamp is ambiguous, and a cache entry we cannot read
/// for certain is simply a miss.
pub fn parse_isoformat(s: &str) -> Option<OffsetDateTime> {
    if s.len() > 40 {
        return None;
    }
    OffsetDateTime::parse(s, &Iso8601::DEFAULT)
        .ok()
        .filter(|_| {
            s.contains('T')
                && (s.ends_with('Z') || s[s.len().saturating_sub(6)..].starts_with(['+', '-']))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn zone(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    #[test]
    fn drf_examples_from_http_json() {
        let http = crate::knox_compat("http.json");
        let ex = &http["expiry_format_examples"];
        let base = datetime!(2030-01-02 03:04:05 UTC);
        let micro = base.replace_microsecond(123456).unwrap();
        assert_eq!(
            format_drf_expiry(micro, &TimeZone::UTC),
            ex["utc_with_micro"]
        );
        assert_eq!(
            format_drf_expiry(base, &TimeZone::UTC),
            ex["utc_micro_zero"]
        );
        assert_eq!(
            format_drf_expiry(base.replace_microsecond(1000).unwrap(), &TimeZone::UTC),
            ex["utc_micro_1000"]
        );
        assert_eq!(
            format_drf_expiry(micro, &zone("Europe/Berlin")),
            ex["default format, TIME_ZONE=Europe/Berlin"]
        );
    }

    #[test]
    fn knox_login_in_berlin_from_http_json() {
        let http = crate::knox_compat("http.json");
        let exchange = http["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "login_time_zone_europe_berlin")
            .expect("the recorded exchange");
        let shown = exchange["response"]["json"]["expiry"].as_str().unwrap();
        assert!(shown.ends_with("+01:00"), "{shown}");
        let instant = parse_isoformat(shown).unwrap();
        assert_eq!(format_drf_expiry(instant, &zone("Europe/Berlin")), shown);
        assert_eq!(
            format_drf_expiry(instant, &TimeZone::UTC),
            "2026-11-25T14:05:04.027242Z"
        );
    }

    #[test]
    fn the_offset_is_the_zones_at_that_instant() {
        let winter = datetime!(2030-01-02 03:04:05 UTC);
        let summer = datetime!(2030-07-02 03:04:05 UTC);
        let berlin = zone("Europe/Berlin");
        assert_eq!(
            format_drf_expiry(winter, &berlin),
            "2030-01-02T04:04:05+01:00"
        );
        assert_eq!(
            format_drf_expiry(summer, &berlin),
            "2030-07-02T05:04:05+02:00"
        );
        // A zone at offset zero is written as DRF writes UTC.
        let london = zone("Europe/London");
        assert_eq!(format_drf_expiry(winter, &london), "2030-01-02T03:04:05Z");
        assert_eq!(
            format_drf_expiry(summer, &london),
            "2030-07-02T04:04:05+01:00"
        );
        // West of Greenwich, half hours, and across midnight.
        assert_eq!(
            format_drf_expiry(winter, &zone("America/St_Johns")),
            "2030-01-01T23:34:05-03:30"
        );
        // The input's own offset plays no part.
        let in_tokyo = datetime!(2030-01-02 12:04:05.5 +09:00);
        assert_eq!(
            format_drf_expiry(in_tokyo, &TimeZone::UTC),
            "2030-01-02T03:04:05.500000Z"
        );
        assert_eq!(
            format_isoformat(in_tokyo),
            "2030-01-02T03:04:05.500000+00:00"
        );
    }

    #[test]
    fn knox_expiry_formats_from_http_json() {
        let http = crate::knox_compat("http.json");
        let ex = &http["expiry_format_examples"];
        let base = datetime!(2030-01-02 03:04:05 UTC);
        let format = |s| ExpiryFormat::parse(s).unwrap();
        assert_eq!(
            format_login_expiry(base, &TimeZone::UTC, &format("%Y-%m-%d %H:%M")),
            ex["EXPIRY_DATETIME_FORMAT='%Y-%m-%d %H:%M'"]
        );
        // None: the value as read from the database, in UTC whatever TIME_ZONE is.
        let body = format!(
            "{{\"expiry\":\"{}\"}}",
            format_login_expiry(
                base.replace_microsecond(123456).unwrap(),
                &zone("Europe/Berlin"),
                &format("none")
            )
        );
        assert_eq!(
            body,
            ex["EXPIRY_DATETIME_FORMAT=None, TIME_ZONE=Europe/Berlin, rendered by DRF JSONRenderer"]
        );
        assert_eq!(format("ISO-8601"), ExpiryFormat::Iso8601);
        assert_eq!(format("None"), ExpiryFormat::Unconverted);
        assert_eq!(
            format_login_expiry(base, &zone("Europe/Berlin"), &format("iso-8601")),
            "2030-01-02T04:04:05+01:00"
        );
    }

    #[test]
    fn strftime_writes_what_python_writes() {
        // Python 3.11: datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)
        //   .astimezone(ZoneInfo(zone)).strftime(every directive).
        let every =
            ExpiryFormat::parse("%Y-%m-%d %H:%M:%S.%f %z %Z %y %j %I %p %a %A %b %B %%").unwrap();
        let at = datetime!(2030-01-02 03:04:05.123456 UTC);
        for (name, python) in [
            (
                "UTC",
                "2030-01-02 03:04:05.123456 +0000 UTC 30 002 03 AM Wed Wednesday Jan January %",
            ),
            (
                "Europe/Berlin",
                "2030-01-02 04:04:05.123456 +0100 CET 30 002 04 AM Wed Wednesday Jan January %",
            ),
            (
                "America/St_Johns",
                "2030-01-01 23:34:05.123456 -0330 NST 30 001 11 PM Tue Tuesday Jan January %",
            ),
        ] {
            assert_eq!(
                format_login_expiry(at, &zone(name), &every),
                python,
                "{name}"
            );
        }
        let twelve = ExpiryFormat::parse("%I %p").unwrap();
        let utc = TimeZone::UTC;
        let at = |h| datetime!(2030-01-02 00:04 UTC).replace_hour(h).unwrap();
        assert_eq!(format_login_expiry(at(13), &utc, &twelve), "01 PM");
        assert_eq!(format_login_expiry(at(0), &utc, &twelve), "12 AM");
        assert_eq!(format_login_expiry(at(12), &utc, &twelve), "12 PM");
    }

    #[test]
    fn formats_knoxgate_cannot_write_as_python_are_refused() {
        for bad in [
            "", "%", "%Y-%", "%c", "%-d", "%e %Y", "iso8601", "null", "100%%",
        ] {
            assert!(ExpiryFormat::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            ExpiryFormat::parse("at %H%%"),
            Ok(ExpiryFormat::Strftime(vec![
                Piece::Text("at ".into()),
                Piece::Directive('H'),
                Piece::Directive('%'),
            ]))
        );
    }

    #[test]
    fn offsets_print_as_python_prints_them() {
        let offset = |s| python_offset(UtcOffset::from_whole_seconds(s).unwrap());
        assert_eq!(offset(3600), "+01:00");
        assert_eq!(offset(-(3 * 3600 + 30 * 60)), "-03:30");
        // Local mean time: seconds only when there are any.
        assert_eq!(offset(53 * 60 + 28), "+00:53:28");
        assert_eq!(offset(-(3600 + 30)), "-01:00:30");
    }

    #[test]
    fn isoformat_round_trips() {
        for s in [
            "2026-11-25T04:05:50.083570+00:00",
            "2026-11-25T04:05:50+00:00",
            "2026-11-25T14:06:00.570105+00:00",
        ] {
            assert_eq!(format_isoformat(parse_isoformat(s).unwrap()), s);
        }
        assert_eq!(
            parse_isoformat("2026-11-25T04:05:50.083570Z"),
            parse_isoformat("2026-11-25T04:05:50.083570+00:00")
        );
        assert_eq!(
            parse_isoformat("2026-11-25T05:05:50+01:00"),
            parse_isoformat("2026-11-25T04:05:50+00:00")
        );
    }

    #[test]
    fn unreadable_timestamps_are_rejected() {
        for s in [
            "",
            "yesterday",
            "2026-11-25",
            "2026-11-25T04:05:50",
            "2026-13-25T04:05:50Z",
        ] {
            assert_eq!(parse_isoformat(s), None, "{s}");
        }
    }
}
