#!/usr/bin/env bash
# End to end: one DRF endpoint behind one nginx, each way of authenticating, measured in one
# run, interleaved. Bounded in time (about 10 minutes with the defaults; hard limit 20 minutes).
# Cached tokens expire redis.max_cache_ttl (300 s) after they were filled and are reloaded with
# one query each: the paced phase, which counts SQL per request, waits for that moment and warms
# the tokens again when it could reach it (about 2 minutes with the defaults); with more rounds
# the saturation rounds themselves run past it.
#
#   bench/e2e.sh
#   BENCH_ROUNDS=1 E2E_DURATION=5 bench/e2e.sh      # quicker
#
# Fresh database knoxgate_bench_e2e (DROPPED if it exists, and again at the end unless
# E2E_KEEP_DB=1): Django's and knoxgate's migrations, 10,000 knox tokens over 2,500 users seeded
# with SQL. A private redis-server on 127.0.0.1:16393, two knoxgate instances (signed assertions
# on 18780, admin 18790; none on 18781, admin 18791), a stub auth server (a second nginx
# answering 200, on 18782), one gunicorn per configuration (18810-18815) serving
# bench/django/e2e_urls.py (GET /api/whoami/ -> the user's id), and one nginx with a server
# block per configuration (18800-18805):
#   floor              Django, no authentication
#   auth-stub          nginx auth_request -> the stub -> Django, no authentication
#   knox               Django + django-rest-knox
#   knox-redis         Django + django-rest-knox-redis
#   knoxgate           nginx auth_request -> knoxgate (signed) -> Django + knoxgate-django
#   knoxgate-unsigned  the same without assertions (X-Auth-User-Id only)
# Then: BENCH_ROUNDS interleaved rounds of wrk at saturation; one paced run per configuration at
# one fixed rate with Postgres's transaction counter around it (SQL per request); E2E_VERIFY_ROUNDS
# interleaved rounds of hot /verify on each knoxgate (assertions on vs off). CPU per request by
# process from /proc around every run. Method and column meanings: bench/README.md.
# Output: bench/out/e2e.md (copied to bench/E2E.md on a full run), logs, wrk output and
# e2e.json in bench/out/e2e/.
#
# Knobs: BENCH_ROUNDS=3 E2E_DURATION=10 E2E_VERIFY_ROUNDS=8 E2E_VERIFY_DURATION=5 E2E_WARM_DURATION=3
#        E2E_RATE=0 (0: half the slowest configuration's saturation) E2E_CONNECTIONS=64
#        E2E_RATE_CONNECTIONS=32 E2E_HOT_SET=1000 E2E_NGINX_WORKERS=1
#        E2E_GUNICORN="--workers 2 --worker-class gthread --threads 8"
#        E2E_ASSERTION_KEY=p256 (the signed configuration's key: p256 for ES256, ed25519)
#        E2E_CONFIGS="floor knox knox-redis knoxgate knoxgate-unsigned" (a partial run leaves
#        bench/E2E.md alone) E2E_DB E2E_REDIS_PORT E2E_PORT_BASE=18780 E2E_KEEP_DB=0
#        KNOXGATE_BIN= (a binary to measure instead of building target/release/knoxgate)
#        E2E_FINAL_DIR=bench/out
#        E2E_PROBE=1 (where each gunicorn's CPU goes: Django's handler, knoxgate-django,
#        signature checks, garbage collections; bench/django/gunicorn_probe.py; a probed run
#        leaves bench/E2E.md alone)
# Needs: Postgres at 127.0.0.1:5432 (trust, user postgres), cargo, python3 with venv, network
# for pip the first time; wrk, nginx, psql, redis-server and openssl are installed with apt-get
# when missing (as root; bench/lib.sh).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"
source "$here/lib.sh"
bench_install wrk:wrk nginx:nginx-light psql:postgresql-client redis-server:redis-server \
    redis-cli:redis-tools openssl:openssl python3:python3
bench_knoxgate

# The interop suite's pinned Django set plus PyJWT/cryptography for knoxgate-django's assertion
# check; knoxgate_django itself is imported from this checkout (PYTHONPATH, set by e2e.py).
venv="${KNOXGATE_VENV:-$repo/target/e2e-venv}"
requirements="$here/django/requirements-e2e.txt"
stamp="$venv/.e2e-requirements.sha256"
want="$({ cat "$requirements" "$repo/tests/interop/requirements.txt"; python3 -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
if ! [[ -x "$venv/bin/python" && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    echo "bench: building $venv" >&2
    timeout 120 python3 -m venv --clear "$venv"
    (cd "$here/django" && timeout 900 "$venv/bin/python" -m pip install --disable-pip-version-check \
        --no-input --quiet --timeout 60 --no-deps --requirement "$requirements")
    timeout 120 "$venv/bin/python" -m pip check --disable-pip-version-check >&2
    echo "$want" >"$stamp"
fi
export KNOXGATE_VENV="$venv"

final="${E2E_FINAL_DIR:-$here/out}"
mkdir -p "$final/e2e"
rc=0
timeout --signal=TERM --kill-after=30 "${E2E_TIMEOUT:-1200}" python3 "$here/e2e.py" \
    > >(tee "$final/e2e/run.log") 2>&1 || rc=$?
if [[ $rc -eq 0 && -z ${E2E_CONFIGS:-} && -z ${E2E_FINAL_DIR:-} && ${E2E_PROBE:-0} != 1 ]]; then
    cp "$final/e2e.md" "$here/E2E.md"
    echo "bench: wrote bench/E2E.md" >&2
fi
exit "$rc"
