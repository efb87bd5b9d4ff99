#!/usr/bin/env bash
# What knoxgate's tracing costs on the hot /verify path: spans compiled out, spans present but
# tracing off (the default), and tracing on (OTLP export to a local sink). About 5 minutes plus
# two release builds.
#
#   bench/tracing.sh
#
# Builds target/release/knoxgate (the shipped build) and, in target/bench-spans-out, the same
# source with tracing's `max_level_warn` feature, which removes every span and info/debug event
# at compile time: the baseline that has no instrumentation at all. Then TRACING_ROUNDS rounds,
# each measuring the three variants back to back with wrk on 1,000 hot tokens (in-process tier),
# so that each round's ratios are taken minutes apart at most. Fresh database
# knoxgate_bench_tracing (DROPPED first and at the end), `knoxgate migrate`, 10k seeded tokens, a
# private redis-server on 127.0.0.1:16392, knoxgate on 127.0.0.1:18680 (admin 18690), the OTLP
# sink on 127.0.0.1:18695.
# Output: bench/out/tracing/tracing.md (copied to bench/TRACING.md), logs next to it.
#
# Knobs: TRACING_ROUNDS=3 TRACING_SECONDS=10 TRACING_CONNECTIONS=64
#        KNOXGATE_BIN= and SPANS_OUT_BIN= (binaries to measure instead of building them)
# Needs: Postgres at 127.0.0.1:5432 (trust, user postgres) and cargo; wrk, psql and redis-server
# are installed with apt-get when missing (as root; bench/lib.sh). Stdlib Python only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
source "$here/lib.sh"
bench_install wrk:wrk psql:postgresql-client redis-server:redis-server redis-cli:redis-tools python3:python3
bench_knoxgate
if [[ -z "${SPANS_OUT_BIN:-}" ]]; then
    echo "bench: building knoxgate with spans compiled out (target/bench-spans-out)" >&2
    timeout 2400 cargo build --release --locked --features tracing/max_level_warn \
        --target-dir target/bench-spans-out
    SPANS_OUT_BIN="$PWD/target/bench-spans-out/release/knoxgate"
fi
export SPANS_OUT_BIN
mkdir -p "$here/out/tracing"
timeout --signal=TERM --kill-after=30 "${TRACING_TIMEOUT:-900}" python3 "$here/tracing.py" \
    > >(tee "$here/out/tracing/run.log") 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' INT TERM
wait "$pid"
cp "$here/out/tracing/tracing.md" "$here/TRACING.md"
