#!/usr/bin/env bash
# knoxgate benchmark: one command, bounded in time (about 6-10 minutes with the defaults).
#
#   bench/run.sh
#
# What it does: creates a fresh Postgres database (default knoxgate_bench; DROPPED if it exists),
# runs the interop Django project's `migrate` and then `knoxgate migrate`, seeds 100k knox tokens
# (10k "main" tokens over 2,500 users + 90k more for the cold / RSS runs) with SQL, starts a
# private redis-server on 127.0.0.1:16390, and measures with wrk at saturation and at a paced
# fixed rate: nginx `return 200` floor, knoxgate hot (in-process tier), Redis tier, cache
# disabled, invalid-token flood, cold/first sight, Django + django-rest-knox and Django +
# django-rest-knox-redis under gunicorn; then knoxgate RSS with 100k cached tokens.
# Output: bench/out/results.md, results.json, chart.png, logs/ (copied to bench/RESULTS.md and
# bench/chart.png).
#
# Needs: Postgres at 127.0.0.1:5432 (trust, user postgres) and cargo; wrk, nginx, psql and
# redis-server are installed with apt-get when missing (as root). Everything listens on 127.0.0.1.
#
# Knobs (environment):
#   BENCH_DURATION=10        seconds per measured run (saturation and fixed rate each)
#   BENCH_RATE=10000         fixed-rate target in req/s (capped at 50% of each target's saturation)
#   BENCH_SKIP_FIXED=0       1 = saturation runs only
#   BENCH_ROUNDS=3           interleaved floor / hot / Redis-tier rounds for the floor ratios
#   BENCH_ONLY=""            comma-separated step names to run alone (prefixes, e.g. "nginx floor,
#                            knoxgate redis tier"); a partial run leaves bench/RESULTS.md alone
#   BENCH_CONNECTIONS=64     wrk connections at saturation (threads: BENCH_THREADS=2)
#   BENCH_RATE_CONNECTIONS=32  connections for the fixed-rate runs
#   BENCH_BUDGET=900         seconds after which the remaining steps are skipped (and reported)
#   BENCH_TIMEOUT=1500       hard kill of the whole driver
#   BENCH_DB=knoxgate_bench  database (dropped and re-created!)
#   BENCH_HOT_SET=1000  BENCH_USERS=2500  BENCH_TOKENS_PER_USER=4  BENCH_EXTRA_USERS=22500
#   BENCH_REDIS_PORT=16390 BENCH_KNOXGATE_PORT=18480 BENCH_KNOXGATE_ADMIN_PORT=18490
#   BENCH_NGINX_PORT=18481 BENCH_DJANGO_PORT=18482
#   KNOXGATE_BIN=...         measure this binary instead of building target/release/knoxgate
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"

source "$here/lib.sh"
bench_install wrk:wrk nginx:nginx-light psql:postgresql-client redis-server:redis-server redis-cli:redis-tools
bench_knoxgate

# Django + knox + knox-redis + gunicorn (shared with the interop suite; idempotent)
"$repo/tests/interop/setup.sh"

# bench's own venv, only for matplotlib (the chart)
bvenv="$repo/target/bench-venv"
if ! "$bvenv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    python3 -m venv "$bvenv"
    timeout 600 "$bvenv/bin/pip" install --quiet --disable-pip-version-check matplotlib
fi

mkdir -p "$here/out"
timeout --signal=TERM --kill-after=30 "${BENCH_TIMEOUT:-1500}" \
    "$bvenv/bin/python" "$here/bench.py" 2>&1 | tee "$here/out/run.log"
