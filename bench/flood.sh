#!/usr/bin/env bash
# A random-token flood against one knoxgate: what it costs Postgres and Redis, its throughput
# beside hot tokens', what it does to real clients' p99, and whether a token created during it
# is ever refused. About 4 minutes (3 rounds) plus a release build.
#
#   bench/flood.sh
#
# Fresh database knoxgate_bench_flood (DROPPED first and at the end), `knoxgate migrate`, 10k
# seeded tokens, a private redis-server on 127.0.0.1:16394, knoxgate on 127.0.0.1:18880 (admin
# 18890). Method and targets: the docstring of bench/flood.py.
# Output: bench/out/flood/flood.md (copied to bench/FLOOD.md), flood.json and logs next to it.
#
# Knobs: FLOOD_ROUNDS=3 FLOOD_SECONDS=10 FLOOD_CONNECTIONS=64 FLOOD_HOT_RATE=1000
#        FLOOD_HOT_CONNECTIONS=16 FLOOD_BUDGET=50 FLOOD_DEMOTE_AFTER=32 (0: no demoted
#        lane, for comparison) KNOXGATE_BIN= (a binary to measure)
# Needs: Postgres at 127.0.0.1:5432 (trust, user postgres) and cargo; wrk, psql and redis-server
# are installed with apt-get when missing (as root; bench/lib.sh). Stdlib Python only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
source "$here/lib.sh"
bench_install wrk:wrk psql:postgresql-client redis-server:redis-server redis-cli:redis-tools python3:python3
bench_knoxgate
mkdir -p "$here/out/flood"
timeout --signal=TERM --kill-after=30 "${FLOOD_TIMEOUT:-900}" python3 "$here/flood.py" \
    > >(tee "$here/out/flood/run.log") 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' INT TERM
wait "$pid"
cp "$here/out/flood/flood.md" "$here/FLOOD.md"
