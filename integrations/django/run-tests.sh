#!/usr/bin/env bash
# Run the knoxgate-django test suite against real Django and Postgres.
#
#   integrations/django/run-tests.sh [pytest args...]
#
#   KGDJ_MATRIX    which environments to test, space separated (default "django52 django42":
#                  tests/requirements-<name>.txt each, one venv per name)
#   KGDJ_VENV_DIR  where the venvs live (default <repo>/target/knoxgate-django)
#   KNOXGATE_BIN   knoxgate binary the SQL tests compare with (default <repo>/target/debug/knoxgate;
#                  not built here). Set, so those tests fail rather than skip when it is missing.
#   KGDJ_PG_HOST / KGDJ_PG_PORT / KGDJ_PG_USER   Postgres (default 127.0.0.1 / 5432 / postgres)
#
# Each venv is built once per (requirements file, interpreter) and reused; the package itself is
# reinstalled from this directory on every run (no network), so the tests import the installed
# copy, package data included. Each environment gets a throwaway database, dropped afterwards.
# Exits non-zero if any environment fails; "no tests ran" is a failure.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venvs="${KGDJ_VENV_DIR:-$repo/target/knoxgate-django}"
python="${KGDJ_PYTHON:-python3}"
KNOXGATE_BIN="${KNOXGATE_BIN:-$repo/target/debug/knoxgate}"
# The tests run from tests/: a relative path is taken from where this script was started.
export KNOXGATE_BIN="$(realpath -m -- "$KNOXGATE_BIN")"
export KGDJ_PG_HOST="${KGDJ_PG_HOST:-127.0.0.1}" KGDJ_PG_PORT="${KGDJ_PG_PORT:-5432}" KGDJ_PG_USER="${KGDJ_PG_USER:-postgres}"

build_venv() {
    local name=$1 venv=$2 requirements="$here/tests/requirements-$1.txt"
    [[ -f $requirements ]] || { echo "run-tests.sh: no $requirements" >&2; return 1; }
    local want stamp="$venv/.requirements.sha256"
    want="$({ sha256sum <"$requirements"; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
    if [[ -x "$venv/bin/python" && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    mkdir -p "$(dirname "$venv")"
    (
        # Two runs at once must not build the same venv concurrently.
        flock -w 900 9 || { echo "run-tests.sh: timed out waiting for $venv.lock" >&2; exit 1; }
        if [[ -x "$venv/bin/python" && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
            exit 0
        fi
        echo "run-tests.sh: building $venv" >&2
        rm -f "$stamp"
        timeout 120 "$python" -m venv --clear "$venv" &&
            timeout 900 "$venv/bin/python" -m pip install --disable-pip-version-check --no-input \
                --quiet --timeout 60 --no-deps --requirement "$requirements" &&
            timeout 120 "$venv/bin/python" -m pip check --disable-pip-version-check >&2 &&
            echo "$want" >"$stamp"
    ) 9>"$venv.lock"
}

drop_db() {
    "$1/bin/python" - "$2" <<'PY'
import os, sys
import psycopg
with psycopg.connect(host=os.environ["KGDJ_PG_HOST"], port=int(os.environ["KGDJ_PG_PORT"]),
                     user=os.environ["KGDJ_PG_USER"], dbname="postgres", autocommit=True) as c:
    c.execute(f'DROP DATABASE IF EXISTS "{sys.argv[1]}" WITH (FORCE)')
PY
}

failed=()
for name in ${KGDJ_MATRIX:-django52 django42}; do
    echo "--- knoxgate-django on $name"
    venv="$venvs/venv-$name"
    if ! build_venv "$name" "$venv"; then
        echo "run-tests.sh: could not build $venv" >&2
        failed+=("$name")
        continue
    fi
    # Build in a scratch copy: setuptools writes build/ and *.egg-info next to the sources.
    scratch="$(mktemp -d)"
    cp -r "$here/pyproject.toml" "$here/README.md" "$here/knoxgate_django" "$scratch/"
    if ! timeout 300 "$venv/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
        --no-deps --no-build-isolation --force-reinstall "$scratch"; then
        rm -rf "$scratch"
        echo "run-tests.sh: could not install the package into $venv" >&2
        failed+=("$name")
        continue
    fi
    rm -rf "$scratch"

    export KGDJ_TEST_DB="knoxgate_django_test_${name}_$$"
    # pytest-django creates and drops the database; this is the backstop for a killed run.
    trap 'drop_db "$venv" "$KGDJ_TEST_DB" 2>/dev/null' EXIT
    (cd "$here/tests" &&
        timeout --signal=INT --kill-after=60 "${KGDJ_TIMEOUT_SECONDS:-1800}" \
            "$venv/bin/python" -m pytest -q --create-db "$@")
    status=$?
    drop_db "$venv" "$KGDJ_TEST_DB" || true
    trap - EXIT
    if [[ $status -eq 5 ]]; then
        echo "run-tests.sh: pytest collected no tests; treating that as a failure" >&2
    fi
    if [[ $status -ne 0 ]]; then
        failed+=("$name")
    fi
done

if ((${#failed[@]})); then
    echo "run-tests.sh: FAILED on ${failed[*]}" >&2
    exit 1
fi
