#!/usr/bin/env bash
# Create (or refresh) the Python virtualenv used by the Django interoperability suite.
#
#   KNOXGATE_VENV    where to put it (default: <repo>/target/interop-venv)
#   KNOXGATE_PYTHON  interpreter to build it from (default: python3)
#
# Idempotent: the venv carries a stamp with the hash of requirements.txt and the interpreter
# version; when both match, this script exits at once without touching the network.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${KNOXGATE_VENV:-$repo/target/interop-venv}"
python="${KNOXGATE_PYTHON:-python3}"
requirements="$here/requirements.txt"
stamp="$venv/.interop-requirements.sha256"

want="$({ sha256sum <"$requirements"; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"

up_to_date() {
    [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]
}

if up_to_date; then
    exit 0
fi

mkdir -p "$(dirname "$venv")"
# Two runs at once (e.g. two shells) must not build the same venv concurrently.
exec 9>"$venv.lock"
flock -w 900 9 || { echo "setup.sh: timed out waiting for $venv.lock" >&2; exit 1; }
if up_to_date; then
    exit 0
fi

echo "setup.sh: building $venv" >&2
rm -f "$stamp"
timeout 120 "$python" -m venv --clear "$venv"
timeout 900 "$venv/bin/python" -m pip install \
    --disable-pip-version-check --no-input --quiet --timeout 60 \
    --no-deps --requirement "$requirements"
# --no-deps keeps exactly the pinned set; pip check proves the pins are complete and consistent.
timeout 120 "$venv/bin/python" -m pip check --disable-pip-version-check >&2
echo "$want" >"$stamp"
echo "setup.sh: ready" >&2
