#!/usr/bin/env bash
# knoxgate memory soak: is RSS flat over a long steady load? Bounded in time
# (SOAK_WARMUP + SOAK_SECONDS + about 1 minute of setup; hard limit + 300 s).
#
#   bench/soak.sh                  # 30 s warm-up + 600 s soak at 3,000 req/s
#   SOAK_SECONDS=60 bench/soak.sh  # quick check
#
# Fresh database knoxgate_bench_soak (DROPPED if it exists, and again at the end unless
# SOAK_KEEP_DB=1), `knoxgate migrate`, 10k knox tokens seeded by SQL, a private redis-server on
# 127.0.0.1:16392, knoxgate (default config) on 127.0.0.1:18581 (admin 18591): ports and database
# differ from bench/run.sh so both can run at once (but they compete for the CPU). Load: paced wrk,
# 85 % random valid tokens + 15 % fresh random unknown tokens; every 5 s one token is DELETEd and
# one INSERTed by SQL. RSS / cache entries sampled every 10 s. Refuses to start if its ports are
# in use or its database has open connections (another run); drops only a database it created.
# Output: bench/out/soak.md, bench/out/soak-rss.csv; scratch and logs in bench/out/soak/.
#
# Knobs: SOAK_SECONDS=600 SOAK_WARMUP=30 SOAK_RATE=3000 SOAK_CONNECTIONS=32 SOAK_UNKNOWN_PCT=15
#        SOAK_SAMPLE=10 SOAK_CHURN_EVERY=5 SOAK_DB SOAK_REDIS_PORT SOAK_KNOXGATE_PORT
#        SOAK_KNOXGATE_ADMIN_PORT SOAK_KEEP_DB=0 KNOXGATE_BIN= (a binary to measure instead of building)
#        SOAK_TAG=x  -> bench/out/soak-x.md, soak-rss-x.csv, bench/out/soak-x/ (keeps the default run's)
# Re-render the report from the saved data: python3 bench/soak.py --report
# Needs: Postgres at 127.0.0.1:5432 (trust, user postgres) and cargo; psql, redis-server, wrk and
# python3 are installed with apt-get when missing (as root; bench/lib.sh). Stdlib Python only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
source "$here/lib.sh"
bench_install wrk:wrk psql:postgresql-client redis-server:redis-server redis-cli:redis-tools python3:python3
bench_knoxgate
work="$here/out/soak${SOAK_TAG:+-$SOAK_TAG}"
mkdir -p "$work"
limit=$(( ${SOAK_SECONDS:-600} + ${SOAK_WARMUP:-30} + 300 ))
timeout --signal=TERM --kill-after=30 "$limit" python3 "$here/soak.py" > >(tee "$work/run.log") 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' INT TERM
wait "$pid"
