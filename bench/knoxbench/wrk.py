"""Driving wrk and turning one run into a result row.

`wrk` runs one bounded wrk with a bench Lua script and parses the `BENCH_JSON` line that
common.lua prints; `measure` wraps it in the counter reads (Postgres transactions, Redis
commands, knoxgate metrics, RSS) and appends the row to RESULTS; `fixed_rate_for` picks the paced
rate from a saturation row.
"""

import json
import os
import re

from .config import BENCH, CONNS, LOGS, RATE, THREADS, log
from .counters import delta, metrics, pg_xacts, proc_status_kib, redis_commands, redis_reset, rss_mib
from .procs import run
from .results import RESULTS, save_raw


def wrk(name, url, script, duration, conns=CONNS, rate=0, extra_env=None, quiet=False):
    env = dict(os.environ, BENCH_RATE=str(rate), BENCH_THREADS=str(THREADS), **(extra_env or {}))
    cmd = ["wrk", f"-t{THREADS}", f"-c{conns}", f"-d{duration}s", "--timeout", "5s", "--latency",
           "-s", str(BENCH / script), url]
    p = run(cmd, timeout=duration + 60, env=env, check=False)
    (LOGS / f"wrk-{name}.txt").write_text(" ".join(cmd) + "\n" + json.dumps(extra_env or {}) +
                                          "\n\n" + p.stdout + "\n" + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"wrk {name} exited {p.returncode}: {p.stderr[-500:]}")
    m = re.search(r"^BENCH_JSON (.*)$", p.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk {name}: no BENCH_JSON line: {p.stdout[-800:]} {p.stderr[-500:]}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    if not quiet:
        log(f"  {name}: {r['rps']:.0f} req/s p50 {r['p50_us']/1000:.2f} ms p99 "
            f"{r['p99_us']/1000:.2f} ms errors {r['errors']} non-2xx {r['non2xx3xx']}")
    return r


def measure(target, load, url, script, duration, *, pid=None, pid_tree=False, admin=None,
            conns=CONNS, rate=0, extra_env=None, expect_status="2xx", tokens_desc="", note="",
            uses_db=True, before_x=None):
    if before_x is None:
        before_x = pg_xacts(settle=uses_db)
    before_sql = metrics(admin) if admin else None
    redis_reset()
    r = wrk(f"{target}-{load}".replace(" ", "_").replace("/", "_").replace("+", ""), url, script,
            duration, conns=conns, rate=rate, extra_env=extra_env)
    rcmds, rper = redis_commands()
    after_x = pg_xacts(settle=uses_db)
    row = dict(target=target, load=load, tokens=tokens_desc, note=note, expect=expect_status,
               conns=conns, duration=duration, after_x=after_x, **r)
    n = max(r["requests"], 1)
    row["pg_xact_per_req"] = (after_x - before_x) / n   # our reads go through the postgres DB
    row["redis_per_req"] = rcmds / n
    row["redis_detail"] = {k: round(v / n, 3) for k, v in rper.items()}
    if admin:
        after_sql = metrics(admin)
        row["kg_sql_per_req"] = (after_sql["sql"] - before_sql["sql"]) / n
        row["kg_detail"] = delta(after_sql["detail"], before_sql["detail"])
        row["kg_redis_ops"] = delta(after_sql["redis_ops"], before_sql["redis_ops"])
        row["memory_entries"] = after_sql["detail"].get("memory_entries")
    if pid:
        row["rss_mib"] = rss_mib(pid, tree=pid_tree)
        if not pid_tree:
            hwm = proc_status_kib(pid, "VmHWM")
            row["hwm_mib"] = round(hwm / 1024, 1) if hwm else None
    RESULTS.append(row)
    save_raw()
    return row


def fixed_rate_for(sat_row):
    r = min(RATE, int(sat_row["rps"] * 0.5) // 10 * 10)
    return max(r, 10)
