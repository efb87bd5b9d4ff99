#!/usr/bin/env bash
# knoxgate logins: what a login costs, and whether concurrent logins raise /verify tail latency.
# Bounded in time (about 7 minutes with the defaults; hard limit 15 minutes).
#
#   bench/login.sh
#   LOGIN_CONFIGS="1:10" LOGIN_SECONDS=10 bench/login.sh   # quicker
#
# Fresh database knoxgate_bench_login (DROPPED if it exists, and again at the end unless
# LOGIN_KEEP_DB=1), `knoxgate migrate`, 10k knox tokens seeded by SQL, 4 users created by
# `knoxgate user create` with the default hash cost (pbkdf2_sha256, 1,000,000 iterations), a
# private redis-server on 127.0.0.1:16391, knoxgate on 127.0.0.1:18580 (admin 18590) with login
# throttling off. Database and ports differ from bench/run.sh and bench/soak.sh (they would still
# compete for the CPU: run it alone for meaningful figures). For each hash_concurrency:hash_nice:
# (a) 4 clients log in back to back; (b) /verify paced at 5,000 req/s; (c) (b) with the 4 login
# clients running; (b2) (b) again.
# Output: bench/out/login.md; scratch, wrk logs and login.json in bench/out/login/.
#
# Knobs: LOGIN_SECONDS=20 LOGIN_CLIENTS=4 LOGIN_VERIFY_RATE=5000 LOGIN_VERIFY_CONNECTIONS=32
#        LOGIN_CONFIGS="2:0 2:10 1:0 1:10" (hash_concurrency:hash_nice) LOGIN_ITERATIONS= (empty: knoxgate's default) LOGIN_DB
#        LOGIN_REDIS_PORT LOGIN_KNOXGATE_PORT LOGIN_KNOXGATE_ADMIN_PORT LOGIN_KEEP_DB=0
#        KNOXGATE_BIN= (a binary to measure instead of building)
#        LOGIN_FINAL_DIR=bench/out  (a second run elsewhere: LOGIN_FINAL_DIR=bench/out/login-run2)
# Needs: Postgres at 127.0.0.1:5432 (trust, user postgres) and cargo; psql, redis-server, wrk and
# python3 are installed with apt-get when missing (as root; bench/lib.sh). Stdlib Python only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
source "$here/lib.sh"
bench_install wrk:wrk psql:postgresql-client redis-server:redis-server redis-cli:redis-tools python3:python3
bench_knoxgate
work="${LOGIN_FINAL_DIR:-$here/out}/login"
mkdir -p "$work"
timeout --signal=TERM --kill-after=30 "${LOGIN_TIMEOUT:-900}" python3 "$here/login.py" > >(tee "$work/run.log") 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' INT TERM
wait "$pid"
