"""The report: OUT/results.md (bench/RESULTS.md after a full run).

`versions` describes the machine and the software measured; `report` writes the tables
(saturation, fixed rate), the ratios and interleaved rounds, the Targets section
(`target_verdicts`: each figure the benchmark is held to, met or not), knoxgate's memory, how
each target was run, the per-request breakdown, notes and failures.
"""

import os
import statistics
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from .config import (COLD_DURATION, CONNS, DB, DJANGO_PICK_DURATION, DURATION, EXTRA_USERS, HOT_SET,
                     KNOXGATE, MAIN_USERS, OUT, PG_SETTLE, RATE, RATE_CONNS, REDIS_PORT,
                     THREADS, TOKENS_PER_USER, VENV, WARMUP)
from .procs import psql, source_state
from .results import FAILURES, NOTES, RATIO_ROUNDS, RESULTS
from .servers import GUNICORN_SETTINGS


def versions():
    def out(cmd, err=False):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return ((p.stderr if err else p.stdout) or p.stdout or p.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    pyv = out([str(VENV / "bin" / "python"), "-c",
               "import django, importlib.metadata as m; print('Django', django.get_version(), "
               "'| django-rest-knox', m.version('django-rest-knox'), '| django-rest-knox-redis', "
               "m.version('django-rest-knox-redis'), '| gunicorn', m.version('gunicorn'), "
               "'| psycopg', m.version('psycopg'))"])
    git, src_modified = source_state("src", "Cargo.toml", "Cargo.lock")
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {out(['uname', '-sr'])}, "
                   f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1)} GiB RAM",
        "knoxgate": out([str(KNOXGATE), "--version"]) + f" (git {git}{', src modified' if src_modified else ''}, release build)",
        "wrk": out(["wrk", "-v"]),
        "nginx": out(["nginx", "-v"], err=True),
        "postgres": psql("SELECT version()", db="postgres").split(" on ")[0],
        "redis": "redis-server " + out(["redis-server", "--version"]).split()[2],
        "python": pyv,
    }


def fmt_ms(us):
    return f"{us / 1000:.2f}" if us is not None else "–"


def target_verdicts(sat, medians, rss100k):
    """One line per target of the issue, each from the figures above."""
    out = []

    def line(name, value, ok):
        verdict = "not measured" if ok is None else ("**met**" if ok else "**NOT met**")
        out.append(f"- {name}: {value} — {verdict}")

    hot, kr, floor = (sat.get(t) for t in ("knoxgate hot", "Django knox-redis (gunicorn)",
                                           "nginx return 200 (floor)"))
    redis_row = sat.get("knoxgate Redis tier")
    if hot and kr:
        x = hot["rps"] / kr["rps"]
        line("hot tokens ≥ 50× django-rest-knox-redis", f"{x:.0f}×", x >= 50)
    else:
        line("hot tokens ≥ 50× django-rest-knox-redis", "–", None)
    for key, row, name, goal in (("hot", hot, "hot tokens ≥ 60 % of the nginx floor", 0.60),
                                 ("redis", redis_row, "Redis tier ≥ 30 % of the nginx floor", 0.30)):
        if key in medians:
            single = f"; single run above: {row['rps'] / floor['rps']:.2f}" if row and floor else ""
            line(name, f"median {medians[key]:.2f} over {len(RATIO_ROUNDS)} rounds{single}",
                 medians[key] >= goal)
        elif row and floor:
            x = row["rps"] / floor["rps"]
            line(name, f"{x:.2f} (one run)", x >= goal)
        else:
            line(name, "–", None)
    fixed = [r for r in RESULTS if r["target"] == "knoxgate hot" and r["load"] == "fixed rate"]
    if fixed and fixed[0]["rate_target"] and fixed[0]["rate_target"] >= 10000:
        f = fixed[0]
        line("hot p99 < 1 ms at 10,000 requests/s",
             f"p99 {f['p99_us'] / 1000:.2f} ms at {f['rps']:,.0f} req/s", f["p99_us"] < 1000)
    else:
        line("hot p99 < 1 ms at 10,000 requests/s", "no fixed-rate run at 10,000 req/s (see BENCH_RATE)", None)
    hot_rows = [r for r in RESULTS if r["target"] == "knoxgate hot" and "kg_sql_per_req" in r]
    if hot_rows:
        worst = max(r["kg_sql_per_req"] for r in hot_rows)
        line("0 SQL statements per hot hit (notify)", f"{worst:.3f} per request", worst == 0)
    redis_rows = [r for r in RESULTS if r["target"] == "knoxgate Redis tier"]
    if redis_rows:
        worst = max(r["redis_per_req"] for r in redis_rows)
        line("≤ 1 Redis round trip per Redis-tier hit", f"{worst:.3f} commands per request", worst <= 1)
    default = [r for r in rss100k if not r["env"]]
    if default:
        r = default[0]
        line("RSS < 64 MiB with 100,000 cached tokens",
             f"{r['rss_mib']} MiB with {(r['entries'] or 0):,.0f} entries",
             r["rss_mib"] is not None and r["rss_mib"] < 64 and (r["entries"] or 0) >= 100_000)
    else:
        line("RSS < 64 MiB with 100,000 cached tokens", "–", None)
    return out


def report(rss100k, info):
    lines = []
    lines.append("# knoxgate benchmark results\n")
    lines.append(f"Measured {info['date']} by `bench/run.sh` "
                 f"(BENCH_DURATION={DURATION}s per run, wrk -t{THREADS} -c{CONNS} for saturation, "
                 f"-c{RATE_CONNS} paced for fixed rate). Raw data: `bench/out/results.json`, wrk "
                 f"logs in `bench/out/logs/`.\n")
    lines.append("**Caveat:** one shared, noisy 2-core machine runs the load generator, the server "
                 "under test, Postgres and Redis at once; figures are indicative and vary run to "
                 "run by ±10–20 %. Saturation numbers are what *this* box does with wrk competing "
                 "for the same cores, not a capacity claim.\n")
    lines.append("## Environment\n")
    for k in ("machine", "knoxgate", "wrk", "nginx", "postgres", "redis", "python"):
        lines.append(f"- {k}: {info[k]}")
    lines.append("")
    for load in ("saturation", "fixed rate"):
        rows = [r for r in RESULTS if r["load"] == load]
        if not rows:
            continue
        lines.append(f"## {load.capitalize()}\n")
        if load == "fixed rate":
            lines.append("Paced with wrk's `delay()` hook against a per-thread schedule "
                         f"(target = min({RATE} req/s, 50 % of that target's saturation rate)). "
                         "wrk2 is not packaged for this Debian; this pacing is NOT corrected for "
                         "coordinated omission, so tail latencies are optimistic compared to wrk2.\n")
        lines.append("| target | tokens | req/s | target rate | p50 ms | p90 ms | p99 ms | p99.9 ms | "
                     "socket errors | non-2xx | SQL stmts/req (knoxgate metric) | PG xacts/req | "
                     "Redis cmds/req | RSS MiB |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            non2xx = f"{r['non2xx3xx']}"
            if r["expect"] == "401":
                non2xx += f" (401s expected: {r['requests']})"
            sql = f"{r['kg_sql_per_req']:.3f}" if "kg_sql_per_req" in r else "–"
            tgt = r["target"] + (f" <br><sub>{r['note']}</sub>" if r.get("note") else "")
            lines.append(
                f"| {tgt} | {r['tokens']} | {r['rps']:,.0f} | "
                f"{r['rate_target'] if r['rate_target'] else '–'} | {fmt_ms(r['p50_us'])} | "
                f"{fmt_ms(r['p90_us'])} | {fmt_ms(r['p99_us'])} | {fmt_ms(r['p999_us'])} | "
                f"{r['errors']} | {non2xx} | {sql} | {r['pg_xact_per_req']:.3f} | "
                f"{r['redis_per_req']:.3f} | {r.get('rss_mib', '–')} |")
        lines.append("")
    sat = {r["target"]: r for r in RESULTS if r["load"] == "saturation"}

    def ratio(a, b):
        if a in sat and b in sat and sat[b]["rps"]:
            return f"{sat[a]['rps'] / sat[b]['rps']:.2f}× ({sat[a]['rps']:,.0f} / {sat[b]['rps']:,.0f} req/s)"
        return "not measured"
    lines.append("## Ratios (saturation throughput)\n")
    lines.append(f"- knoxgate hot / Django knox-redis: {ratio('knoxgate hot', 'Django knox-redis (gunicorn)')}")
    lines.append(f"- knoxgate hot / Django knox: {ratio('knoxgate hot', 'Django knox (gunicorn)')}")
    lines.append(f"- knoxgate hot / nginx floor: {ratio('knoxgate hot', 'nginx return 200 (floor)')}")
    lines.append(f"- knoxgate Redis tier / nginx floor: {ratio('knoxgate Redis tier', 'nginx return 200 (floor)')}")
    lines.append(f"- knoxgate cache disabled / Django knox: {ratio('knoxgate cache disabled', 'Django knox (gunicorn)')}")
    lines.append("")
    medians = {}
    if RATIO_ROUNDS:
        lines.append(f"## Floor ratios over {len(RATIO_ROUNDS)} interleaved rounds\n")
        lines.append("The machine's speed drifts within minutes, so the floor, hot tokens and the Redis "
                     "tier are also measured back to back in each round (saturation, "
                     f"{DURATION}s each, same wrk settings and hot set); ratios are per round, then the "
                     "median over rounds.\n")
        lines.append("| round | floor req/s | hot req/s | Redis tier req/s | hot / floor | Redis tier / floor |")
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for r in RATIO_ROUNDS:
            lines.append(f"| {r['round']} | {r['floor']:,.0f} | {r['hot']:,.0f} | {r['redis']:,.0f} | "
                         f"{r['hot'] / r['floor']:.2f} | {r['redis'] / r['floor']:.2f} |")
        medians["hot"] = statistics.median(r["hot"] / r["floor"] for r in RATIO_ROUNDS)
        medians["redis"] = statistics.median(r["redis"] / r["floor"] for r in RATIO_ROUNDS)
        lines.append(f"| **median** | | | | **{medians['hot']:.2f}** | **{medians['redis']:.2f}** |")
        lines.append("")
    lines.append("## Targets\n")
    lines.extend(target_verdicts(sat, medians, rss100k))
    lines.append("")
    lines.append("## knoxgate memory\n")
    for r in RESULTS:
        if r["target"].startswith("knoxgate") and r["load"] == "saturation":
            lines.append(f"- {r['target']}: RSS {r.get('rss_mib')} MiB after the saturation run "
                         f"(peak {r.get('hwm_mib')} MiB, idle after start {r.get('idle_rss_mib')} MiB, "
                         f"in-process entries {r.get('memory_entries')})")
    for rss in rss100k:
        ok = rss["rss_mib"] is not None and rss["rss_mib"] < 64
        envdesc = ", ".join(f"{k}={v}" for k, v in rss["env"].items()) or "default config"
        lines.append(f"- **{rss['tokens']:,} tokens warmed** ({envdesc}) through /verify (seq pass, "
                     f"{rss['requests']:,} requests in {rss['duration']}s, wraps "
                     f"{rss['wraps']}, errors {rss['errors']}, non-2xx {rss['non2xx']}): "
                     f"in-process cache entries **{(rss['entries'] or 0):.0f}**, RSS **{rss['rss_mib']} MiB** "
                     f"(peak {rss['hwm_mib']} MiB; idle {rss['idle_rss_mib']} MiB) — target "
                     f"< 64 MiB: **{'met' if ok else 'NOT met'}**"
                     + ("" if rss["covered"] else " (the pass did NOT cover every token)")
                     + (f"; RSS growth ≈ {(rss['rss_mib'] - rss['idle_rss_mib']) * 1024 / rss['entries']:.2f} KiB per cached entry"
                        if rss["entries"] and rss["rss_mib"] and rss["idle_rss_mib"] else "")
                     + (f"; the byte bound admitted {rss['entries']:.0f} entries ⇒ knoxgate's own weight estimate ≈ "
                        f"{int(rss['env']['KNOXGATE_CACHE_MEMORY_MAX_BYTES']) / rss['entries']:.0f} B/entry"
                        if "KNOXGATE_CACHE_MEMORY_MAX_BYTES" in rss["env"] and rss["entries"] else ""))
    if not rss100k:
        lines.append("- RSS with 100k cached tokens: not measured (see failures)")
    lines.append("")
    lines.append("## How each target was run\n")
    lines.append(f"- **knoxgate hot**: default config (consistency notify, in-process tier + Redis); "
                 f"hot set of {HOT_SET} tokens warmed by a {WARMUP}s sequential pass, then random tokens "
                 "from that set: in-process hits.")
    lines.append("- **knoxgate Redis tier**: `KNOXGATE_CACHE_MEMORY_MAX_ENTRIES=1`, "
                 "`KNOXGATE_CACHE_MEMORY_MAX_BYTES=1` (in-process tier holds nothing), Redis on, notify; "
                 "same hot set, warmed first, so every request is a Redis hit.")
    lines.append("- **knoxgate cache disabled**: `KNOXGATE_REDIS_URL=\"\"`, memory 1/1, consistency strict: "
                 f"every request is one Postgres lookup (knox-equivalent path); random over all "
                 f"{MAIN_USERS * TOKENS_PER_USER} main tokens.")
    lines.append(f"- **knoxgate cold**: a fresh instance and an empty Redis for each run, tokens walked "
                 f"sequentially through the {MAIN_USERS * TOKENS_PER_USER + EXTRA_USERS * TOKENS_PER_USER} "
                 f"token file so each is seen once (first sight: Postgres lookup + cache fill); "
                 f"{COLD_DURATION}s runs.")
    lines.append("- **knoxgate invalid flood**: default config, a fresh random unknown 64-hex token per "
                 "request (`bench/invalid.lua`); every answer is expected to be 401.")
    lines.append("- **Django knox / knox-redis**: the interop project `tests/interop/djproject` "
                 "(`/api/protected/`: TokenAuthentication + IsAuthenticated) under gunicorn, via "
                 "`bench/django/bench_settings.py` which only sets CONN_MAX_AGE=600 (persistent DB "
                 "connections, as in production; the interop suite uses 0). The better of two "
                 f"gunicorn settings ({', '.join(GUNICORN_SETTINGS)}) by a {DJANGO_PICK_DURATION}s run is "
                 f"used. knox-redis: same hot set as knoxgate, warmed first.")
    lines.append("- **nginx floor**: `return 200;` with worker_processes 2 on loopback, same wrk script "
                 "and headers as knoxgate hot.")
    lines.append("- **Counters**: *SQL stmts/req* = delta of knoxgate's own `sql_statements_total` "
                 "(pg_stat_statements is available but not in `shared_preload_libraries`, and the shared "
                 "Postgres was not restarted). *PG xacts/req* = delta of `xact_commit + xact_rollback` "
                 f"in `pg_stat_database` for `{DB}` (autocommit, so ≈ statements; includes "
                 "connection-setup statements and anything else touching that DB; read after a "
                 f"{PG_SETTLE}s settle because PG15 backends publish idle stats up to 10 s late, so "
                 "it is approximate). *Redis cmds/req* = "
                 "`INFO commandstats` calls after `CONFIG RESETSTAT` on a private redis-server "
                 f"(port {REDIS_PORT}) started by the bench, excluding INFO/CONFIG. RSS = VmRSS after "
                 "the run (process tree for nginx/gunicorn).")
    lines.append("")
    lines.append("## Per-request breakdown (counts / requests)\n")
    lines.append("| target | load | knoxgate lookups & statements | Redis commands (commandstats) |")
    lines.append("|---|---|---|---|")
    for r in RESULTS:
        n = max(r["requests"], 1)
        kg = ", ".join(f"{k} {v / n:.3f}" for k, v in sorted((r.get("kg_detail") or {}).items())) or "–"
        rd = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["redis_detail"].items()) if v) or "–"
        lines.append(f"| {r['target']} | {r['load']} | {kg} | {rd} |")
    lines.append("")
    if NOTES:
        lines.append("## Notes\n")
        lines.extend(f"- {n}" for n in NOTES)
        lines.append("")
    lines.append("## Failures / not measured\n")
    if FAILURES:
        lines.extend(f"- {f}" for f in FAILURES)
    else:
        lines.append("- none")
    lines.append("")
    lines.append("![chart](chart.png)\n")
    (OUT / "results.md").write_text("\n".join(lines))
