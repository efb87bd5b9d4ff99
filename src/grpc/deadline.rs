//! The caller's deadline on a check (`grpc-timeout`), and the one knoxgate answers within.

use std::time::Duration;

/// The `grpc-timeout` request header: gRPC's encoding of the caller's deadline.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// A `grpc-timeout` value: at most 8 ASCII digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`), as
/// the gRPC over HTTP/2 protocol defines it. `None` for anything else.
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Eight digits cannot overflow a u64, nor 99,999,999 hours a Duration.
    let n = std::str::from_utf8(digits).ok()?.parse::<u64>().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long knoxgate gives a check: `server.request_timeout`, or less when the caller's own
/// deadline comes sooner. Then knoxgate answers `margin` before the caller gives up (at the
/// latest at half its deadline, for deadlines shorter than twice the margin), so the caller
/// gets knoxgate's answer (a 503 for an outage) rather than its own timeout, which Envoy turns
/// into whatever `failure_mode_allow` says.
pub fn check_deadline(
    request_timeout: Duration,
    caller: Option<Duration>,
    margin: Duration,
) -> Duration {
    match caller {
        Some(caller) => {
            let answered_by = caller.saturating_sub(margin).max(caller / 2);
            answered_by.min(request_timeout)
        }
        None => request_timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values_are_read_in_every_unit() {
        let cases: &[(&str, Duration)] = &[
            ("500m", Duration::from_millis(500)),
            ("2S", Duration::from_secs(2)),
            ("1M", Duration::from_secs(60)),
            ("1H", Duration::from_secs(3600)),
            ("250000u", Duration::from_millis(250)),
            ("99999999n", Duration::from_nanos(99_999_999)),
            ("0m", Duration::ZERO),
        ];
        for (value, expected) in cases {
            assert_eq!(
                parse_grpc_timeout(value.as_bytes()),
                Some(*expected),
                "{value}"
            );
        }
    }

    #[test]
    fn malformed_grpc_timeout_values_are_not_read() {
        for value in [
            "",
            "m",
            "500",
            "500x",
            "123456789m",
            "-5m",
            "5 m",
            " 5m",
            "5.0S",
            "５m",
        ] {
            assert_eq!(parse_grpc_timeout(value.as_bytes()), None, "{value:?}");
        }
    }

    #[test]
    fn a_check_is_answered_a_margin_before_the_callers_deadline() {
        let ms = Duration::from_millis;
        let margin = ms(50);
        // Envoy's 0.5 s: knoxgate answers by 450 ms.
        assert_eq!(check_deadline(ms(2000), Some(ms(500)), margin), ms(450));
        // A caller more patient than knoxgate: knoxgate's own deadline.
        assert_eq!(check_deadline(ms(2000), Some(ms(5000)), margin), ms(2000));
        // No caller deadline.
        assert_eq!(check_deadline(ms(2000), None, margin), ms(2000));
        // A deadline shorter than twice the margin: half of it.
        assert_eq!(check_deadline(ms(2000), Some(ms(60)), margin), ms(30));
        assert_eq!(check_deadline(ms(2000), Some(ms(0)), margin), ms(0));
    }
}
