#!/usr/bin/env python3
"""knoxgate benchmark driver. Run it through bench/run.sh (which prepares the tools); see there
for the knobs. Everything listens on 127.0.0.1 only and every load is bounded in time.

Steps: fresh database (Django migrate, then `knoxgate migrate`), SQL seeding of tokens, then for
each target a saturation run (wrk -t2 -c64) and a fixed-rate run (wrk + delay() pacing),
per-request SQL / Redis counts from before/after deltas, RSS, and finally results.md + chart.png.

This file is the sequence of steps; the parts are in the knoxbench package next to it.
"""

import os
import shutil
import sys
import time
import traceback

from knoxbench.chart import chart
from knoxbench.config import (BENCH, BUDGET, HOT_SET, LOGS, MAIN_USERS, ONLY, OUT, T0, TOKENS,
                              TOKENS_PER_USER, log, over_budget)
from knoxbench.procs import exit_on_term, stop_all
from knoxbench.report import report, versions
from knoxbench.results import FAILURES, save_raw
from knoxbench.seed import setup_db
from knoxbench.servers import start_redis
from knoxbench.targets import (kg_target, target_cold, target_django, target_nginx,
                               target_ratio_rounds, target_rss100k)


def step(name, fn, *args):
    if ONLY and name != "chart" and not any(name.lower().startswith(n) for n in ONLY):
        return None
    if over_budget():
        FAILURES.append(f"{name}: skipped, time budget BENCH_BUDGET={BUDGET}s exhausted")
        log(f"SKIP {name} (budget)")
        return None
    log(f"== {name}")
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        FAILURES.append(f"{name}: {type(e).__name__}: {e}")
        log(f"FAILED {name}: {e}")
        traceback.print_exc()
        return None


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    for f in LOGS.glob("*"):
        if f.is_file():
            f.unlink()
    start_redis()
    setup_db()
    hot_env = {"BENCH_TOKENS": str(TOKENS)}
    step("nginx floor", target_nginx)
    step("knoxgate hot", kg_target, "hot", {}, "knoxgate hot", "verify.lua", TOKENS, HOT_SET, True,
         f"hot set {HOT_SET}, random")
    step("knoxgate Redis tier", kg_target, "redis",
         {"KNOXGATE_CACHE_MEMORY_MAX_ENTRIES": "1", "KNOXGATE_CACHE_MEMORY_MAX_BYTES": "1"},
         "knoxgate Redis tier", "verify.lua", TOKENS, HOT_SET, True, f"hot set {HOT_SET}, random")
    step("knoxgate cache disabled", kg_target, "nocache",
         {"KNOXGATE_REDIS_URL": "", "KNOXGATE_CACHE_MEMORY_MAX_ENTRIES": "1",
          "KNOXGATE_CACHE_MEMORY_MAX_BYTES": "1", "KNOXGATE_CACHE_CONSISTENCY": "strict"},
         "knoxgate cache disabled", "verify.lua", TOKENS, 0, False,
         f"{MAIN_USERS * TOKENS_PER_USER} tokens, random")
    step("knoxgate invalid flood", kg_target, "invalid", {}, "knoxgate invalid flood", "invalid.lua",
         TOKENS, 0, False, "random unknown token per request", "401")
    step("Django knox-redis", target_django, True)
    step("Django knox", target_django, False)
    step("knoxgate cold", target_cold)
    step("floor ratios, interleaved rounds", target_ratio_rounds)
    rss100k = []
    r = step("knoxgate RSS with 100k cached tokens", target_rss100k)
    if r:
        rss100k.append(r)
    if os.environ.get("BENCH_RSS_DIAG", "1") == "1":
        # diagnostic: same, with glibc malloc limited to 2 arenas (environment only)
        r = step("knoxgate RSS with 100k cached tokens, MALLOC_ARENA_MAX=2", target_rss100k,
                 "arena2", {"MALLOC_ARENA_MAX": "2"})
        if r:
            rss100k.append(r)
        # diagnostic: half the default byte bound, to see how many entries knoxgate's own
        # weight estimate admits per MiB (entries × estimated weight ≈ 32 MiB when it evicts)
        r = step("knoxgate RSS with 100k tokens offered, memory_max_bytes=32MiB", target_rss100k,
                 "bytes32m", {"KNOXGATE_CACHE_MEMORY_MAX_BYTES": str(32 * 1024 * 1024)})
        if r:
            rss100k.append(r)
    del hot_env
    info = versions()
    report(rss100k, info)
    ok = step("chart", chart)
    if ok is None:
        report(rss100k, info)  # record a chart failure in the report
    save_raw()
    if not ONLY:
        shutil.copyfile(OUT / "results.md", BENCH / "RESULTS.md")
        if (OUT / "chart.png").exists():
            shutil.copyfile(OUT / "chart.png", BENCH / "chart.png")
    log(f"done in {time.monotonic() - T0:.0f}s: {OUT / 'results.md'}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    exit_on_term()
    code = 1
    try:
        code = main()
    finally:
        stop_all()
    sys.exit(code)
