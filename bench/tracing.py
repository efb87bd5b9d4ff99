#!/usr/bin/env python3
"""What tracing costs on the hot /verify path (run through bench/tracing.sh). Stdlib only.

Three variants of knoxgate, measured back to back in each of TRACING_ROUNDS rounds with wrk on
1,000 hot tokens (the in-process tier, where any per-request overhead shows most):
  - spans compiled out: the same source built with tracing's `max_level_warn` (SPANS_OUT_BIN);
  - tracing off: the shipped build with no `tracing.otlp_endpoint` (the default);
  - tracing on: the shipped build exporting every span by OTLP/HTTP to a local sink that
    answers 200 and counts what it receives.
"Zero cost when off" holds when off/compiled-out is 1.00 within the spread of the rounds.
Output: bench/out/tracing/tracing.md, tracing.json and logs/ next to it.
"""

import json
import os
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent


def env_int(name, default):
    return int(os.environ.get(name, str(default)))


ROUNDS = env_int("TRACING_ROUNDS", 3)
SECONDS = env_int("TRACING_SECONDS", 10)
CONNS = env_int("TRACING_CONNECTIONS", 64)
SINK_PORT = env_int("TRACING_SINK_PORT", 18695)
SPANS_OUT_BIN = os.environ["SPANS_OUT_BIN"]

os.environ["BENCH_DB"] = os.environ.get("TRACING_DB", "knoxgate_bench_tracing")
os.environ["BENCH_REDIS_PORT"] = os.environ.get("TRACING_REDIS_PORT", "16392")
os.environ["BENCH_KNOXGATE_PORT"] = os.environ.get("TRACING_KNOXGATE_PORT", "18680")
os.environ["BENCH_KNOXGATE_ADMIN_PORT"] = os.environ.get("TRACING_KNOXGATE_ADMIN_PORT", "18690")
os.environ["BENCH_OUT"] = str(HERE / "out" / "tracing")
os.environ["BENCH_CONNECTIONS"] = str(CONNS)
sys.path.insert(0, str(HERE))
from knoxbench import config as cfg  # noqa: E402
from knoxbench import procs, servers  # noqa: E402
from knoxbench.wrk import wrk  # noqa: E402
import soak as S  # noqa: E402  (helpers only)

log = cfg.log
HOT_SET = 1000


class Sink:
    """An OTLP/HTTP traces endpoint that accepts everything and counts it."""

    def __init__(self, port):
        sink = self
        self.requests = 0
        self.bytes = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with sink.lock:
                    sink.requests += 1
                    sink.bytes += len(body)
                # An empty ExportTraceServiceResponse is zero bytes of protobuf.
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}/v1/traces"

    def counts(self):
        with self.lock:
            return self.requests, self.bytes


VARIANTS = [
    ("spans compiled out", SPANS_OUT_BIN, {}),
    ("tracing off (default)", None, {}),
    ("tracing on (OTLP)", None, {"KNOXGATE_TRACING_OTLP_ENDPOINT": f"http://127.0.0.1:{SINK_PORT}/v1/traces"}),
]


def measure(round_no, label, binary, extra, sink):
    env = {"BENCH_TOKENS": str(cfg.TOKENS), "BENCH_TOKENS_LIMIT": str(HOT_SET)}
    name = f"round{round_no}-{label.split()[0]}-{label.split()[1]}"
    kg = servers.Knoxgate(name, extra, binary=binary)
    try:
        wrk(f"{name}-warmup", kg.url, "verify.lua", 3, extra_env=dict(env, BENCH_MODE="seq"),
            quiet=True)
        before = sink.counts()
        r = wrk(name, kg.url, "verify.lua", SECONDS, extra_env=env)
    finally:
        kg.stop()   # SIGTERM: the exporter flushes its last batch
    after = sink.counts()
    return dict(round=round_no, variant=label, rps=r["rps"], p50_ms=r["p50_us"] / 1000,
                p99_ms=r["p99_us"] / 1000, errors=r["errors"], non2xx=r["non2xx3xx"],
                requests=r["requests"], exports=after[0] - before[0],
                export_bytes=after[1] - before[1])


def report(rows, info):
    lines = [
        "# Tracing on the hot path: what it costs",
        "",
        f"One run of `bench/tracing.sh`, {info['date']}, {info['machine']}. Concurrent activity "
        f"during the run: {', '.join(info['concurrent']) or 'none seen'}.",
        "",
        f"wrk `-t2 -c{CONNS}` for {SECONDS} s per run on {HOT_SET} hot tokens (in-process tier), "
        f"{ROUNDS} rounds; in each round the three variants run back to back, so the ratios "
        "below compare runs taken within a minute of each other. The machine has 2 cores shared "
        "by wrk, knoxgate, Postgres and Redis; absolute figures move by 10-20 % between runs.",
        "",
        "| round | variant | req/s | p50 ms | p99 ms | errors | non-2xx | OTLP exports (bytes) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['round']} | {r['variant']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['errors']} | {r['non2xx']} | "
                     f"{r['exports']} ({r['export_bytes']}) |")
    ratios = {"off / compiled out": [], "on / off": []}
    for n in range(1, ROUNDS + 1):
        by = {r["variant"]: r for r in rows if r["round"] == n}
        if len(by) < 3:
            continue
        out, off, on = (by[v[0]]["rps"] for v in VARIANTS)
        ratios["off / compiled out"].append(off / out)
        ratios["on / off"].append(on / off)
    lines += ["", "Throughput ratios per round, and their median:", "",
              "| ratio | per round | median |", "| --- | --- | ---: |"]
    for k, v in ratios.items():
        if v:
            lines.append(f"| {k} | {', '.join(f'{x:.3f}' for x in v)} | "
                         f"{statistics.median(v):.3f} |")
    lines += ["", "Reading: *off / compiled out* is the price of the instrumentation when tracing "
              "is off (one cached interest check per span callsite); *on / off* is the price of "
              "exporting every span. A ratio within the rounds' spread of 1.00 is no measurable "
              "cost. `OTLP exports` counts the batches the local sink received during the "
              "measured run: zero for the first two variants.", ""]
    (cfg.OUT / "tracing.md").write_text("\n".join(lines))


def main():
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    conc = set(S.concurrent_activity())
    S.preflight()
    servers.start_redis()
    S.setup_db_knoxgate_only(users=2500, tokens_per_user=4)
    sink = Sink(SINK_PORT)
    rows = []
    for n in range(1, ROUNDS + 1):
        for label, binary, extra in VARIANTS:
            rows.append(measure(n, label, binary, extra, sink))
            conc |= set(S.concurrent_activity())
            (cfg.OUT / "tracing.json").write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if r["errors"] or r["non2xx"]]
    exported = [r for r in rows if r["variant"].startswith("tracing on") and r["exports"] == 0]
    info = dict(date=date, machine=S.machine(), concurrent=sorted(conc))
    report(rows, info)
    log(f"done: {cfg.OUT / 'tracing.md'}")
    if bad:
        log(f"FAILED: errors or non-2xx answers in {[(r['round'], r['variant']) for r in bad]}")
    if exported:
        log("FAILED: tracing on exported nothing (the comparison would be meaningless)")
    return 1 if bad or exported else 0


if __name__ == "__main__":
    procs.exit_on_term()
    code = 1
    try:
        code = main()
    finally:
        procs.stop_all()
        S.drop_db()
    sys.exit(code)
