"""Configuration of a benchmark run, read from the environment once, at import time.

Paths (repository, output directory, Django project, venv, knoxgate binary), the BENCH_* knobs
documented in bench/run.sh, the ports and URLs derived from them, the token files, and the run's
start time with the log line and the time budget built on it.

bench/soak.py and bench/login.py set BENCH_* variables (their own database, ports and output
directory) *before* importing this module, so nothing here may be read lazily or re-read.
"""

import os
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
OUT = Path(os.environ.get("BENCH_OUT", BENCH / "out"))
LOGS = OUT / "logs"
DJPROJECT = REPO / "tests" / "interop" / "djproject"
VENV = Path(os.environ.get("KNOXGATE_VENV", REPO / "target" / "interop-venv"))
KNOXGATE = Path(os.environ.get("KNOXGATE_BIN", REPO / "target" / "release" / "knoxgate"))


def env_int(name, default):
    return int(os.environ.get(name, str(default)))


DURATION = env_int("BENCH_DURATION", 10)          # seconds per measured run
RATE = env_int("BENCH_RATE", 10000)               # fixed-rate target (req/s), capped at 50% of saturation
THREADS = env_int("BENCH_THREADS", 2)
CONNS = env_int("BENCH_CONNECTIONS", 64)
RATE_CONNS = env_int("BENCH_RATE_CONNECTIONS", 32)
WARMUP = env_int("BENCH_WARMUP", 3)
COLD_DURATION = env_int("BENCH_COLD_DURATION", 3)
DJANGO_PICK_DURATION = env_int("BENCH_DJANGO_PICK_DURATION", 5)
ROUNDS = env_int("BENCH_ROUNDS", 3)              # interleaved floor/hot/Redis-tier rounds for the ratios
BUDGET = env_int("BENCH_BUDGET", 900)             # seconds; optional steps are skipped past it
SKIP_FIXED = os.environ.get("BENCH_SKIP_FIXED", "0") == "1"
# Comma-separated step names (prefixes, case-insensitive) to run alone, e.g.
# BENCH_ONLY="nginx floor,knoxgate Redis tier". A partial run writes bench/out/ only and leaves
# the published bench/RESULTS.md and chart alone.
ONLY = [n.strip().lower() for n in os.environ.get("BENCH_ONLY", "").split(",") if n.strip()]
MAIN_USERS = env_int("BENCH_USERS", 2500)
TOKENS_PER_USER = env_int("BENCH_TOKENS_PER_USER", 4)
EXTRA_USERS = env_int("BENCH_EXTRA_USERS", 22500)  # for the 100k RSS / cold runs
HOT_SET = env_int("BENCH_HOT_SET", 1000)
DB = os.environ.get("BENCH_DB", "knoxgate_bench")
PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_PORT = os.environ.get("BENCH_PG_PORT", "5432")
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
REDIS_PORT = env_int("BENCH_REDIS_PORT", 16390)   # private redis-server started by this script
KG_PORT = env_int("BENCH_KNOXGATE_PORT", 18480)
KG_ADMIN_PORT = env_int("BENCH_KNOXGATE_ADMIN_PORT", 18490)
NGINX_PORT = env_int("BENCH_NGINX_PORT", 18481)
DJANGO_PORT = env_int("BENCH_DJANGO_PORT", 18482)

PG_URL = f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{DB}"
REDIS_URL_KG = f"redis://127.0.0.1:{REDIS_PORT}/0"
REDIS_URL_DJ = f"redis://127.0.0.1:{REDIS_PORT}/1"
TOKENS = OUT / "tokens.txt"           # 10k main tokens, shuffled
TOKENS_ALL = OUT / "tokens100k.txt"   # main + extra tokens (100k by default), shuffled

PG_SETTLE = float(os.environ.get("BENCH_PG_SETTLE", "10.5"))   # see counters.pg_xacts

T0 = time.monotonic()


def log(msg):
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp} +{time.monotonic() - T0:5.0f}s] {msg}", flush=True)


def over_budget():
    return time.monotonic() - T0 > BUDGET
