"""The measured targets, one function per benchmark step.

Each starts what it measures (see servers), warms it where the step says so, and records a
saturation run and, unless BENCH_SKIP_FIXED=1, a fixed-rate run (see wrk.measure): knoxgate in a
given configuration (`kg_target`), the nginx floor, the Django anchors (best of the gunicorn
settings), knoxgate cold, the interleaved floor-ratio rounds and RSS with 100k cached tokens.
"""

import json
import time

from .config import (COLD_DURATION, CONNS, DJANGO_PICK_DURATION, DURATION, HOT_SET, MAIN_USERS, OUT,
                     RATE, RATE_CONNS, ROUNDS, SKIP_FIXED, TOKENS, TOKENS_ALL, TOKENS_PER_USER,
                     WARMUP, log, over_budget)
from .counters import metrics, proc_status_kib, rss_mib
from .procs import redis_cli, stop
from .results import FAILURES, NOTES, RATIO_ROUNDS, RESULTS
from .servers import GUNICORN_SETTINGS, Knoxgate, start_gunicorn, start_nginx
from .wrk import fixed_rate_for, measure, wrk


def kg_target(label, extra_env, target, script, token_file, limit, warm, tokens_desc,
              expect="2xx", note="", after=None):
    kg = Knoxgate(label, extra_env)
    env = {"BENCH_TOKENS": str(token_file), "BENCH_TOKENS_LIMIT": str(limit)}
    try:
        if warm:
            wrk(f"{label}-warmup", kg.url, script, WARMUP, extra_env=dict(env, BENCH_MODE="seq"),
                quiet=True)
            m = metrics(kg.admin)
            log(f"  warm-up done: memory entries {m['detail'].get('memory_entries')}")
        sat = measure(target, "saturation", kg.url, script, DURATION, pid=kg.p.pid, admin=kg.admin,
                      extra_env=env, expect_status=expect, tokens_desc=tokens_desc, note=note)
        sat["idle_rss_mib"] = kg.idle_rss
        if not SKIP_FIXED:
            measure(target, "fixed rate", kg.url, script, DURATION, pid=kg.p.pid, admin=kg.admin,
                    extra_env=env, rate=fixed_rate_for(sat), conns=RATE_CONNS, before_x=sat["after_x"],
                    expect_status=expect, tokens_desc=tokens_desc, note=note)
        if after:
            after(kg)
    finally:
        kg.stop()
    return sat


def target_nginx():
    p, url = start_nginx()
    try:
        env = {"BENCH_TOKENS": str(TOKENS), "BENCH_TOKENS_LIMIT": str(HOT_SET)}
        sat = measure("nginx return 200 (floor)", "saturation", url, "verify.lua", DURATION,
                      pid=p.pid, pid_tree=True, extra_env=env, tokens_desc="same requests as hot",
                      uses_db=False)
        if not SKIP_FIXED:
            measure("nginx return 200 (floor)", "fixed rate", url, "verify.lua", DURATION, pid=p.pid,
                    pid_tree=True, extra_env=env, rate=fixed_rate_for(sat), conns=RATE_CONNS,
                    tokens_desc="same requests as hot", uses_db=False)
    finally:
        stop(p)


def target_ratio_rounds():
    """The floor, hot tokens and the Redis tier at saturation, ROUNDS times in turn.

    The machine's speed drifts by tens of per cent within minutes, so a ratio of two runs taken
    minutes apart says as much about the drift as about knoxgate. Each round measures the three
    back to back; the ratios quoted are per round, and their median across rounds."""
    env = {"BENCH_TOKENS": str(TOKENS), "BENCH_TOKENS_LIMIT": str(HOT_SET)}
    p, url = start_nginx()
    try:
        for i in range(1, ROUNDS + 1):
            if over_budget():
                FAILURES.append(f"ratio rounds: stopped after {i - 1} rounds (budget)")
                break
            row = {"round": i}
            row["floor"] = wrk(f"round{i}-floor", url, "verify.lua", DURATION, extra_env=env)["rps"]
            for label, extra in (("hot", {}),
                                 ("redis", {"KNOXGATE_CACHE_MEMORY_MAX_ENTRIES": "1",
                                            "KNOXGATE_CACHE_MEMORY_MAX_BYTES": "1"})):
                kg = Knoxgate(f"round{i}-{label}", extra)
                try:
                    wrk(f"round{i}-{label}-warmup", kg.url, "verify.lua", WARMUP,
                        extra_env=dict(env, BENCH_MODE="seq"), quiet=True)
                    row[label] = wrk(f"round{i}-{label}", kg.url, "verify.lua", DURATION,
                                     extra_env=env)["rps"]
                finally:
                    kg.stop()
            RATIO_ROUNDS.append(row)
            log(f"  round {i}: hot/floor {row['hot'] / row['floor']:.2f}, "
                f"Redis tier/floor {row['redis'] / row['floor']:.2f}")
    finally:
        stop(p)


def target_django(knox_redis):
    name = "Django knox-redis (gunicorn)" if knox_redis else "Django knox (gunicorn)"
    short = "dj-knoxredis" if knox_redis else "dj-knox"
    limit = HOT_SET if knox_redis else 0
    env = {"BENCH_TOKENS": str(TOKENS), "BENCH_TOKENS_LIMIT": str(limit),
           "BENCH_PATH": "/api/protected/"}
    best = None
    for label, args in GUNICORN_SETTINGS.items():
        redis_cli("FLUSHALL")
        p, url = start_gunicorn(f"{short}-{label.replace(' ', '')}", knox_redis, args)
        try:
            if knox_redis:
                wrk(f"{short}-{label}-warmup", url, "verify.lua", DJANGO_PICK_DURATION,
                    extra_env=dict(env, BENCH_MODE="seq"), quiet=True)
            r = wrk(f"{short}-{label}-pick", url, "verify.lua", DJANGO_PICK_DURATION, extra_env=env)
        finally:
            stop(p)
        NOTES.append(f"{name}: gunicorn `{label}` ({' '.join(args)}) gave {r['rps']:.0f} req/s in a "
                     f"{DJANGO_PICK_DURATION}s pick run (errors {r['errors']}, non-2xx {r['non2xx3xx']}).")
        if best is None or r["rps"] > best[1]["rps"]:
            best = (label, r)
    label = best[0]
    redis_cli("FLUSHALL")
    p, url = start_gunicorn(f"{short}-best", knox_redis, GUNICORN_SETTINGS[label])
    desc = (f"hot set {HOT_SET}, random" if knox_redis else f"{TOKENS_PER_USER * MAIN_USERS} tokens, random")
    try:
        if knox_redis:
            wrk(f"{short}-best-warmup", url, "verify.lua", max(WARMUP, DJANGO_PICK_DURATION),
                extra_env=dict(env, BENCH_MODE="seq"), quiet=True)
            keys = redis_cli("-n", "1", "DBSIZE").strip()
            log(f"  knox-redis warm-up: {keys} keys in Redis db 1")
        note = f"gunicorn {label}"
        sat = measure(name, "saturation", url, "verify.lua", DURATION, pid=p.pid, pid_tree=True,
                      extra_env=env, tokens_desc=desc, note=note)
        if not SKIP_FIXED:
            measure(name, "fixed rate", url, "verify.lua", DURATION, pid=p.pid, pid_tree=True,
                    extra_env=env, rate=fixed_rate_for(sat), conns=RATE_CONNS, tokens_desc=desc,
                    before_x=sat["after_x"],
                    note=note)
    finally:
        stop(p)


def target_cold():
    env = {"BENCH_TOKENS": str(TOKENS_ALL), "BENCH_TOKENS_LIMIT": "0", "BENCH_MODE": "seq"}
    desc = "fresh instance + empty Redis, each token once (seq)"
    for load in (["saturation"] + ([] if SKIP_FIXED else ["fixed rate"])):
        kg = Knoxgate(f"cold-{load.replace(' ', '')}", {})
        try:
            rate = 0
            conns = CONNS
            if load == "fixed rate":
                sat = [r for r in RESULTS if r["target"] == "knoxgate cold" and r["load"] == "saturation"]
                rate = fixed_rate_for(sat[0]) if sat else RATE
                conns = RATE_CONNS
            row = measure("knoxgate cold", load, kg.url, "verify.lua", COLD_DURATION, pid=kg.p.pid,
                          admin=kg.admin, extra_env=env, rate=rate, conns=conns, tokens_desc=desc,
                          note="1 token in the file used by the readiness check")
            row["idle_rss_mib"] = kg.idle_rss
            wraps = sum(t["wraps"] for t in row["threads"])
            if wraps:
                row["note"] += f"; WRAPPED {wraps}x: some requests were repeats"
        finally:
            kg.stop()


def target_rss100k(label="default", extra_env=None):
    kg = Knoxgate("rss100k-" + label, extra_env or {})
    try:
        n = sum(1 for _ in TOKENS_ALL.open())
        cold = [r for r in RESULTS if r["target"] == "knoxgate cold" and r["load"] == "saturation"]
        est = n / cold[0]["rps"] if cold else 60
        dur = int(min(max(est * 1.3 + 3, 10), 120))
        log(f"  warming {n} tokens with a seq pass of {dur}s")
        r = wrk(f"rss100k-{label}-warm", kg.url, "verify.lua", dur,
                extra_env={"BENCH_TOKENS": str(TOKENS_ALL), "BENCH_TOKENS_LIMIT": "0",
                           "BENCH_MODE": "seq"})
        time.sleep(1)
        m = metrics(kg.admin)
        entries = m["detail"].get("memory_entries")
        rss = rss_mib(kg.p.pid)
        hwm = proc_status_kib(kg.p.pid, "VmHWM")
        wraps = sum(t["wraps"] for t in r["threads"])
        row = dict(label=label, env=extra_env or {}, tokens=n, requests=r["requests"], wraps=wraps, entries=entries, rss_mib=rss,
                   hwm_mib=round(hwm / 1024, 1) if hwm else None, idle_rss_mib=kg.idle_rss,
                   errors=r["errors"], non2xx=r["non2xx3xx"], duration=dur,
                   covered=r["requests"] >= n)
        (OUT / f"rss100k-{label}.json").write_text(json.dumps(row, indent=1))
        log(f"  RSS with {entries} cached entries: {rss} MiB (peak {row['hwm_mib']} MiB, idle "
            f"{kg.idle_rss} MiB)")
        return row
    finally:
        kg.stop()
