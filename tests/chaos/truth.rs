//! The truth: which answers are wrong given when each fault and the revocation happened, and
//! latency statistics per fault phase.

use std::{collections::BTreeMap, time::Duration};

use crate::{
    BOUND, Class, NO_ANSWER_IO, NO_ANSWER_TIMEOUT, SLOW, Sample, faults::Timeline, support::*,
};

pub struct PhaseStats {
    pub name: &'static str,
    pub from: Duration,
    pub to: Duration,
    pub n: usize,
    pub by_status: BTreeMap<u16, usize>,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Requests slower than [`SLOW`].
    pub slow: Vec<Sample>,
}

pub fn phase_stats(name: &'static str, from: Duration, to: Duration, s: &[Sample]) -> PhaseStats {
    let inside: Vec<&Sample> = s.iter().filter(|x| x.sent >= from && x.sent < to).collect();
    let mut lat: Vec<Duration> = inside.iter().map(|x| x.latency()).collect();
    lat.sort();
    let mut by_status = BTreeMap::new();
    for x in &inside {
        *by_status.entry(x.status).or_insert(0) += 1;
    }
    PhaseStats {
        name,
        from,
        to,
        n: inside.len(),
        by_status,
        p50: percentile(&lat, 50.0),
        p99: percentile(&lat, 99.0),
        max: lat.last().copied().unwrap_or_default(),
        slow: inside
            .iter()
            .filter(|x| x.latency() > SLOW)
            .map(|x| **x)
            .collect(),
    }
}

pub fn status_name(s: u16) -> String {
    match s {
        NO_ANSWER_IO => "no answer (connection error)".into(),
        NO_ANSWER_TIMEOUT => "no answer within 5 s".into(),
        s => s.to_string(),
    }
}

pub fn statuses(m: &BTreeMap<u16, usize>) -> String {
    m.iter()
        .map(|(s, n)| format!("{}: {n}", status_name(*s)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What each fault phase is called and when it ran.
pub fn phases(tl: &Timeline, load_end: Duration) -> Vec<(&'static str, Duration, Duration)> {
    vec![
        ("baseline (before faults)", Duration::ZERO, tl.redis_kill),
        ("redis killed", tl.redis_kill, tl.redis_back),
        ("redis black-holed (SIGSTOP)", tl.redis_stop, tl.redis_cont),
        (
            "feed killed → revocation",
            tl.feed_kill,
            tl.pg_restart_begin,
        ),
        ("postgres restart", tl.pg_restart_begin, tl.pg_restart_end),
        ("postgres slow (table locked)", tl.lock_begin, tl.lock_end),
        (
            "total outage (redis + postgres down)",
            tl.outage_begin,
            tl.outage_end,
        ),
        ("after the last fault", tl.outage_end, load_end),
        ("whole run", Duration::ZERO, load_end),
    ]
}

pub fn phase_of(tl: &Timeline, load_end: Duration, at: Duration) -> &'static str {
    phases(tl, load_end)
        .into_iter()
        .filter(|(n, _, _)| *n != "whole run")
        .find(|(_, a, b)| at >= *a && at < *b)
        .map(|(n, _, _)| n)
        .unwrap_or("between faults")
}

/// The truth: which answers are wrong, by kind.
pub fn wrong_answers(tl: &Timeline, samples: &[Sample]) -> BTreeMap<&'static str, Vec<Sample>> {
    let mut wrong: BTreeMap<&'static str, Vec<Sample>> = BTreeMap::new();
    for kind in [
        "valid token answered 401",
        "revoked token answered 200 after T_rev + BOUND",
        "revoked token answered 401 before the revocation was sent",
        "unknown token answered 2xx",
        "status other than 200/401/503",
        "no answer within 5 s",
    ] {
        wrong.insert(kind, Vec::new());
    }
    for x in samples {
        let kind = match (x.class, x.status) {
            (Class::Valid | Class::Probe, 401) => Some("valid token answered 401"),
            (Class::Revoked, 200) if x.sent >= tl.rev_commit + BOUND => {
                Some("revoked token answered 200 after T_rev + BOUND")
            }
            (Class::Revoked, 401) if x.recv < tl.rev_start => {
                Some("revoked token answered 401 before the revocation was sent")
            }
            (Class::Unknown, 200..=299) => Some("unknown token answered 2xx"),
            (_, NO_ANSWER_TIMEOUT) => Some("no answer within 5 s"),
            (_, NO_ANSWER_IO | 200 | 401 | 503) => None,
            _ => Some("status other than 200/401/503"),
        };
        if let Some(k) = kind {
            wrong.get_mut(k).unwrap().push(*x);
        }
    }
    wrong
}

/// Everything the report and the assertions read off the samples.
pub struct Analysis {
    pub wrong: BTreeMap<&'static str, Vec<Sample>>,
    pub total_wrong: usize,
    /// Per phase, in the order of [`phases`]: baseline first, Redis killed second.
    pub stats: Vec<PhaseStats>,
    /// How slow the Redis-killed phase may get: 5 × max(baseline p99, 5 ms).
    pub p99_limit: Duration,
    pub by_class: BTreeMap<Class, BTreeMap<u16, usize>>,
    pub by_status: BTreeMap<u16, usize>,
    /// Revocation visibility: the last revoked-token 200 sent after the COMMIT.
    pub last_revoked_200: Option<Duration>,
    pub revoked_after_bound: BTreeMap<u16, usize>,
    pub revoked_in_outage: BTreeMap<u16, usize>,
}

impl Analysis {
    pub fn baseline(&self) -> &PhaseStats {
        &self.stats[0]
    }

    pub fn redis_killed(&self) -> &PhaseStats {
        &self.stats[1]
    }
}

pub fn analyse(tl: &Timeline, load_end: Duration, samples: &[Sample]) -> Analysis {
    let wrong = wrong_answers(tl, samples);
    let total_wrong: usize = wrong.values().map(Vec::len).sum();
    let stats: Vec<PhaseStats> = phases(tl, load_end)
        .into_iter()
        .map(|(n, a, b)| phase_stats(n, a, b, samples))
        .collect();
    let p99_limit = stats[0].p99.max(Duration::from_millis(5)) * 5;

    let mut by_class: BTreeMap<Class, BTreeMap<u16, usize>> = BTreeMap::new();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for x in samples {
        *by_class
            .entry(x.class)
            .or_default()
            .entry(x.status)
            .or_insert(0) += 1;
        *by_status.entry(x.status).or_insert(0) += 1;
    }
    let last_revoked_200 = samples
        .iter()
        .filter(|x| x.class == Class::Revoked && x.status == 200 && x.sent >= tl.rev_commit)
        .map(|x| x.sent - tl.rev_commit)
        .max();
    let revoked_after_bound: BTreeMap<u16, usize> = samples
        .iter()
        .filter(|x| x.class == Class::Revoked && x.sent >= tl.rev_commit + BOUND)
        .fold(BTreeMap::new(), |mut m, x| {
            *m.entry(x.status).or_insert(0) += 1;
            m
        });
    let revoked_in_outage: BTreeMap<u16, usize> = samples
        .iter()
        .filter(|x| {
            x.class == Class::Revoked && x.sent >= tl.outage_begin && x.sent < tl.outage_end
        })
        .fold(BTreeMap::new(), |mut m, x| {
            *m.entry(x.status).or_insert(0) += 1;
            m
        });
    Analysis {
        wrong,
        total_wrong,
        stats,
        p99_limit,
        by_class,
        by_status,
        last_revoked_200,
        revoked_after_bound,
        revoked_in_outage,
    }
}
