#!/usr/bin/env bash
# Run the Django interop suite against knoxgate.
#
#   tests/interop/run.sh [pytest args...]
#
#   KNOXGATE_BIN   knoxgate binary to test (default <repo>/target/debug/knoxgate; not built here)
#   KNOXGATE_VENV  virtualenv location (default <repo>/target/interop-venv), made by setup.sh
#
# Needs Postgres on 127.0.0.1:5432 (user postgres, trust auth) and Redis on 127.0.0.1:6379;
# uses Redis DB ${INTEROP_REDIS_DB:-11}. Exits with pytest's status; "no tests ran" is a failure.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${KNOXGATE_VENV:-$repo/target/interop-venv}"
export KNOXGATE_BIN="${KNOXGATE_BIN:-$repo/target/debug/knoxgate}"

"$here/setup.sh" || { echo "run.sh: setup.sh failed" >&2; exit 1; }

cd "$here"
# The suite bounds every step itself; this is only a backstop against a wedged run.
timeout --signal=INT --kill-after=60 "${INTEROP_TIMEOUT_SECONDS:-3600}" \
    "$venv/bin/python" -m pytest -q "$here" "$@"
status=$?
if [[ $status -eq 5 ]]; then
    echo "run.sh: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit $status
