//! The markdown report of a chaos run: the fault script as it happened, answers by class and
//! status, wrong answers, latency per phase, recovery times, the final check and the verdict.

use std::{fmt::Write as _, time::Duration};

use crate::{
    BOUND, CLIENTS, Class, NO_ANSWER_IO, PACE, PROBES, REVOKED, Sample, Tokens, VALID,
    faults::{Recovery, Timeline},
    ms, secs,
    truth::{Analysis, phase_of, status_name, statuses},
};

/// What a run produced, for the report.
pub struct Run<'a> {
    pub events: &'a [(Duration, String)],
    pub samples: &'a [Sample],
    pub connect_errors: usize,
    pub load_end: Duration,
    pub timeline: &'a Timeline,
    pub tokens: &'a Tokens,
    pub analysis: &'a Analysis,
    pub recovered: &'a [Recovery],
    /// `/readyz` answered 200 after the load stopped.
    pub ready: bool,
    pub checked: usize,
    pub final_failures: &'a [String],
    pub final_retried: usize,
    pub metrics: &'a str,
}

impl Run<'_> {
    /// Every wrong-answer count zero, no stall while Redis was down, a clean final check, and a
    /// recovery after each fault.
    pub fn passed(&self) -> bool {
        let a = self.analysis;
        a.total_wrong == 0
            && a.redis_killed().p99 <= a.p99_limit
            && self.final_failures.is_empty()
            && self.ready
            && self
                .recovered
                .iter()
                .all(|x| x.first_store_200.is_some() && x.readyz_200.is_some())
    }
}

pub fn render(run: &Run) -> String {
    let a = run.analysis;
    let mut r = String::new();
    let _ = writeln!(r, "# knoxgate chaos-under-load report\n");
    let _ = writeln!(
        r,
        "{CLIENTS} keep-alive clients, {} pause between requests; tokens: {VALID} valid, \
         {REVOKED} revoked mid-run, fresh random unknown ones, {PROBES} never-used valid probe \
         tokens for recovery timing. Mix: 60% valid / 30% revoked / 10% unknown. \
         Revocation bound checked: {}.\n",
        ms(PACE),
        secs(BOUND)
    );
    let _ = writeln!(r, "## Fault script (t since load start)\n");
    for (at, what) in run.events {
        let _ = writeln!(r, "- `{:>8}` {what}", secs(*at));
    }
    let _ = writeln!(r, "\n## Answers\n");
    let _ = writeln!(
        r,
        "- requests: {} ({:.0}/s over {}), client connect errors: {}",
        run.samples.len(),
        run.samples.len() as f64 / run.load_end.as_secs_f64(),
        secs(run.load_end),
        run.connect_errors
    );
    let _ = writeln!(r, "- by status: {}", statuses(&a.by_status));
    for (class, m) in &a.by_class {
        let _ = writeln!(r, "- {class:?}: {}", statuses(m));
    }
    let _ = writeln!(
        r,
        "- revoked tokens sent ≥ T_rev + {}: {}",
        secs(BOUND),
        statuses(&a.revoked_after_bound)
    );
    let _ = writeln!(
        r,
        "- revoked tokens during the total outage: {}",
        statuses(&a.revoked_in_outage)
    );
    let _ = writeln!(
        r,
        "- last 200 for a revoked token, sent after T_rev: {}",
        a.last_revoked_200
            .map_or("none".into(), |d| format!("+{}", ms(d)))
    );
    let _ = writeln!(r, "\n## Wrong answers (all must be 0)\n");
    for (kind, v) in &a.wrong {
        let _ = writeln!(r, "- {kind}: **{}**", v.len());
        for x in v.iter().take(10) {
            let token = match x.class {
                Class::Valid => run.tokens.valid[x.idx as usize].token[..15].to_owned(),
                Class::Revoked => run.tokens.revoked[x.idx as usize].token[..15].to_owned(),
                Class::Probe => run.tokens.probes[x.idx as usize].token[..15].to_owned(),
                Class::Unknown => "(random)".into(),
            };
            let _ = writeln!(
                r,
                "  - {:?} #{} key {token}: {} sent {} answered {} (phase: {}; T_rev {})",
                x.class,
                x.idx,
                status_name(x.status),
                secs(x.sent),
                secs(x.recv),
                phase_of(run.timeline, run.load_end, x.sent),
                secs(run.timeline.rev_commit)
            );
        }
    }
    let _ = writeln!(
        r,
        "- no answer (connection error, client reconnected): {}",
        a.by_status.get(&NO_ANSWER_IO).copied().unwrap_or(0)
    );
    let _ = writeln!(r, "\n## Latency by phase (by send time)\n");
    let _ = writeln!(
        r,
        "| phase | window | requests | p50 | p99 | max | >100 ms | answers |\n|---|---|---|---|---|---|---|---|"
    );
    for p in &a.stats {
        let _ = writeln!(
            r,
            "| {} | {}–{} | {} | {} | {} | {} | {} | {} |",
            p.name,
            secs(p.from),
            secs(p.to),
            p.n,
            ms(p.p50),
            ms(p.p99),
            ms(p.max),
            p.slow.len(),
            statuses(&p.by_status)
        );
    }
    let _ = writeln!(
        r,
        "\nRedis-killed p99 {} vs limit 5 × max(baseline p99 {}, 5 ms) = {}\n",
        ms(a.redis_killed().p99),
        ms(a.baseline().p99),
        ms(a.p99_limit)
    );
    let _ = writeln!(
        r,
        "Requests over 100 ms, grouped into bursts (by send time):\n"
    );
    for p in a
        .stats
        .iter()
        .filter(|p| p.name != "whole run" && !p.slow.is_empty())
    {
        let mut bursts: Vec<(Duration, Duration, usize, Duration)> = Vec::new();
        for x in &p.slow {
            match bursts.last_mut() {
                Some(b) if x.sent <= b.1 + Duration::from_millis(100) => {
                    b.1 = x.sent;
                    b.2 += 1;
                    b.3 = b.3.max(x.latency());
                }
                _ => bursts.push((x.sent, x.sent, 1, x.latency())),
            }
        }
        let list: Vec<String> = bursts
            .iter()
            .map(|(a, b, n, m)| format!("{}–{}: {n} (max {})", secs(*a), secs(*b), ms(*m)))
            .collect();
        let _ = writeln!(r, "- {}: {}", p.name, list.join("; "));
    }
    let _ = writeln!(r);
    let _ = writeln!(r, "## Recovery after each fault (from the fault's end)\n");
    let _ = writeln!(
        r,
        "| fault | fault ended | first store-backed 200 (fresh valid token) | /readyz 200 | \
         /readyz redis connected + feed live |\n|---|---|---|---|---|"
    );
    let show = |d: Option<Duration>| d.map_or("NOT within 10 s".into(), ms);
    for x in run.recovered {
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} | {} |",
            x.fault,
            secs(x.fault_end),
            show(x.first_store_200),
            show(x.readyz_200),
            show(x.fully_healthy)
        );
    }
    let _ = writeln!(
        r,
        "\n## Final check (load stopped + 1 s)\n\n- readyz 200: {}\n- tokens checked: \
         {} ({} valid incl. probes → 200, {REVOKED} revoked → 401), 503 retries: \
         {}\n- failures: {}",
        run.ready,
        run.checked,
        VALID + PROBES,
        run.final_retried,
        run.final_failures.len()
    );
    for f in run.final_failures {
        let _ = writeln!(r, "  - {f}");
    }
    let _ = writeln!(r, "\n## knoxgate metrics at the end\n\n```");
    for l in run.metrics.lines().filter(|l| {
        !l.starts_with('#')
            && [
                "knoxgate_cache_lookups",
                "knoxgate_stale",
                "knoxgate_feed",
                "knoxgate_verify_total",
                "knoxgate_redis_errors",
                "knoxgate_postgres_errors",
                "knoxgate_coalesced",
                "knoxgate_load_shed",
            ]
            .iter()
            .any(|p| l.starts_with(p))
    }) {
        let _ = writeln!(r, "{l}");
    }
    let _ = writeln!(r, "```");
    let _ = writeln!(
        r,
        "\n## Verdict: {}",
        if run.passed() { "PASS" } else { "FAIL" }
    );
    r
}
