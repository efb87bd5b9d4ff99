//! When a request's answer is due, and how much of the time left a wait with a fallback may
//! take.
//!
//! Some waits have an answer to fall back on when they give up: the confirmation of a cached
//! token (`cache.stale_if_error` serves the cached answer), the delete of an expired token (the
//! 401 is known already). Such a wait is worth something only if it gives up early enough for
//! the fallback to reach the caller, so it gets its configured limit or half of the time left,
//! whichever is less. Half, not all: the rest is for answering, and for the caller's own clock,
//! which started before knoxgate's.

use std::time::{Duration, Instant};

/// The instant a request's answer is due: `server.request_timeout` after it arrived, or sooner
/// for a gRPC check whose caller's deadline comes first (`grpc::deadline::check_deadline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

impl Deadline {
    /// The deadline `budget` from now.
    pub fn after(budget: Duration) -> Deadline {
        Deadline(Instant::now() + budget)
    }

    /// How long a wait with a fallback may take now: `limit`, or half of the time left when
    /// that is less (zero once the deadline has passed).
    pub fn share(self, limit: Duration) -> Duration {
        self.share_at(Instant::now(), limit)
    }

    fn share_at(self, now: Instant, limit: Duration) -> Duration {
        limit.min(self.0.saturating_duration_since(now) / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_wait_gets_its_limit_when_the_deadline_is_far() {
        let now = Instant::now();
        let deadline = Deadline(now + ms(2_000));
        assert_eq!(deadline.share_at(now, ms(250)), ms(250));
        // Exactly half of the time left is still the limit.
        assert_eq!(deadline.share_at(now, ms(1_000)), ms(1_000));
    }

    #[test]
    fn a_wait_gets_half_of_the_time_left_when_that_is_less() {
        let now = Instant::now();
        let deadline = Deadline(now + ms(150));
        assert_eq!(deadline.share_at(now, ms(250)), ms(75));
        // Later, less is left.
        assert_eq!(deadline.share_at(now + ms(100), ms(250)), ms(25));
    }

    #[test]
    fn a_passed_deadline_leaves_nothing_to_wait() {
        let now = Instant::now();
        let deadline = Deadline(now);
        assert_eq!(deadline.share_at(now, ms(250)), Duration::ZERO);
        assert_eq!(deadline.share_at(now + ms(10), ms(250)), Duration::ZERO);
    }
}
