//! Timestamps as Django, DRF and django-rest-knox-redis write them.

use time::{OffsetDateTime, UtcOffset, format_description::well_known::Iso8601};

fn isoformat_utc(dt: OffsetDateTime, suffix: &str) -> String {
    let dt = dt.to_offset(UtcOffset::UTC);
    let (y, mo, d) = (dt.year(), u8::from(dt.month()), dt.day());
    let (h, mi, s, us) = (dt.hour(), dt.minute(), dt.second(), dt.microsecond());
    // Python's isoformat() drops the fraction when the microsecond is 0, else prints 6 digits.
    if us == 0 {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{suffix}")
    } else {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}{suffix}")
    }
}

/// The login response's `expiry`: DRF's ISO-8601 rendering of a UTC datetime (`…Z`).
pub fn format_drf_expiry(dt: OffsetDateTime) -> String {
    isoformat_utc(dt, "Z")
}

/// Python `datetime.isoformat()` of a UTC datetime (`…+00:00`), as django-rest-knox-redis stores it.
pub fn format_isoformat(dt: OffsetDateTime) -> String {
    isoformat_utc(dt, "+00:00")
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

    #[test]
    fn drf_examples_from_http_json() {
        let http = crate::knox_compat("http.json");
        let ex = &http["expiry_format_examples"];
        let base = datetime!(2030-01-02 03:04:05 UTC);
        assert_eq!(
            format_drf_expiry(base.replace_microsecond(123456).unwrap()),
            ex["utc_with_micro"]
        );
        assert_eq!(format_drf_expiry(base), ex["utc_micro_zero"]);
        assert_eq!(
            format_drf_expiry(base.replace_microsecond(1000).unwrap()),
            ex["utc_micro_1000"]
        );
    }

    #[test]
    fn non_utc_input_is_rendered_in_utc() {
        let dt = datetime!(2030-01-02 04:04:05.5 +01:00);
        assert_eq!(format_drf_expiry(dt), "2030-01-02T03:04:05.500000Z");
        assert_eq!(format_isoformat(dt), "2030-01-02T03:04:05.500000+00:00");
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
