#!/usr/bin/env bash
# End to end with the Django companion package: real nginx (deploy/nginx/knoxgate.conf,
# placeholders filled) -> knoxgate (signed assertions on) -> gunicorn serving the package's test
# app (integrations/django/tests/kgtest) with REQUIRE_ASSERTION on and the JWKS fetched from
# knoxgate's admin port.
#
#   tests/e2e-django/run.sh
#
#   KNOXGATE_BIN   knoxgate binary (default <repo>/target/debug/knoxgate; `cargo build` when absent)
#   KGDJ_VENV_DIR  where the knoxgate-django venvs live (default <repo>/target/knoxgate-django;
#                  the django52 one is built as integrations/django/run-tests.sh builds it)
#   E2E_KEEP=1     keep the temp dir (configs, logs) and print its path
#
# Needs Postgres on 127.0.0.1:5432 (user postgres, trust auth) and Redis on 127.0.0.1:6379.
# Installs nginx with apt-get when missing (root only). Checks are in check.py: a token made by
# knoxgate's login and one made by Django/knox reach the view as their users; spoofed identity
# headers (every spelling) and spoofed, forged or expired assertions are refused; revoked tokens
# get 401; and Postgres's own statistics show no SQL for authentication, nor for the username,
# email and staff/superuser flags that knoxgate signs in the assertion. Prints one
# `ok - ...` / `not ok - ...` line per check, then `N passed, M failed`; exits 1 on a failure.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN=${KNOXGATE_BIN:-$ROOT/target/debug/knoxgate}
VENV=${KGDJ_VENV_DIR:-$ROOT/target/knoxgate-django}/venv-django52
REQUIREMENTS=$ROOT/integrations/django/tests/requirements-django52.txt
NGINX_CONF=$ROOT/deploy/nginx/knoxgate.conf
PG=(psql -h 127.0.0.1 -p 5432 -U postgres -v ON_ERROR_STOP=1 -qAt)
DB=knoxgate_e2edj_$$_$RANDOM
PREFIX_KEY=knoxgate-e2edj-$$-$RANDOM
PASSWORD="e2e-pw-$RANDOM-$RANDOM"
AUDIENCE=e2e-app

say() { printf '# %s\n' "$*"; }

setup_failed() {
    printf 'not ok - setup: %s\n' "$*"
    dump_logs
    printf '0 passed, 1 failed\n'
    exit 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/knoxgate-e2edj.XXXXXX")
chmod 0755 "$WORK"
PIDS=()
DB_CREATED=
POLICY_RC_CREATED=

# dump_logs, cleanup, exec_unprivileged, own_for_unprivileged, free_ports, wait_up
source "$ROOT/tests/e2e/helpers.sh"
trap cleanup EXIT
if [[ ${E2E_KEEP:-} == 1 ]]; then say "temp dir (kept): $WORK"; fi
trap 'exit 130' INT TERM

# --- tools ----------------------------------------------------------------------------------------

if ! command -v nginx >/dev/null 2>&1; then
    [[ $EUID -eq 0 ]] || setup_failed "nginx missing and not root to apt-get install it"
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    say "apt-get install nginx"
    if ! apt-cache policy nginx 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx \
        >"$WORK/apt-nginx.log" 2>&1 || setup_failed "apt-get install nginx failed"
fi
for tool in python3 psql redis-cli openssl setpriv timeout flock; do
    command -v "$tool" >/dev/null 2>&1 || setup_failed "$tool is not installed"
done
if [[ ! -x $BIN ]]; then
    say "no $BIN: cargo build"
    (cd "$ROOT" && cargo build --quiet) || setup_failed "cargo build failed"
fi

# The venv integrations/django/run-tests.sh uses (same stamp, so either builds it for both),
# with the package installed from this checkout.
build_venv() {
    local want stamp="$VENV/.requirements.sha256"
    want="$({ sha256sum <"$REQUIREMENTS"; python3 -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
    mkdir -p "$(dirname "$VENV")"
    (
        flock -w 900 9 || exit 1
        if ! [[ -x "$VENV/bin/python" && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
            say "building $VENV"
            rm -f "$stamp"
            timeout 120 python3 -m venv --clear "$VENV" &&
                timeout 900 "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input \
                    --quiet --timeout 60 --no-deps --requirement "$REQUIREMENTS" &&
                echo "$want" >"$stamp" || exit 1
        fi
        scratch=$(mktemp -d)
        cp -r "$ROOT/integrations/django/"{pyproject.toml,README.md,knoxgate_django} "$scratch/"
        timeout 300 "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
            --no-deps --no-build-isolation --force-reinstall "$scratch"
        status=$?
        rm -rf "$scratch"
        exit $status
    ) 9>"$VENV.lock"
}
build_venv >"$WORK/venv.log" 2>&1 || setup_failed "could not build $VENV: $(tail -n 3 "$WORK/venv.log")"
PY=$VENV/bin/python

BUDGET_END=$((SECONDS + 150))

# --- helpers --------------------------------------------------------------------------------------


start() {
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=("$!")
    disown "$!"
    printf -v "PID_${name//-/_}" '%s' "$!"
}
pid_of() { local v="PID_${1//-/_}"; printf '%s' "${!v}"; }

read -r KG_PORT KG_ADMIN APP_PORT NGINX_PORT <<<"$(free_ports 4)"

# knoxgate with exactly these settings (it rejects unknown KNOXGATE_* variables). The change
# feed's health probe, a statement every few seconds, is slowed down so that Postgres's
# counters see only what requests cause.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/assertion.pem" 2>/dev/null || setup_failed "openssl genpkey"
KG_ENV=(
    KNOXGATE_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/$DB"
    KNOXGATE_REDIS_URL=redis://127.0.0.1:6379/0
    KNOXGATE_REDIS_KEY_PREFIX="$PREFIX_KEY"
    KNOXGATE_SESSIONS_PASSWORD_ITERATIONS=1000
    KNOXGATE_CACHE_FEED_HEALTH_INTERVAL=10m
    KNOXGATE_ASSERTION_KEY_FILE="$WORK/assertion.pem"
    KNOXGATE_ASSERTION_AUDIENCE="$AUDIENCE"
    # Sent as headers and signed in the assertion, where Django (REQUIRE_ASSERTION) reads them.
    KNOXGATE_VERIFY_USERNAME_HEADER=X-Auth-Username
    KNOXGATE_VERIFY_EMAIL_HEADER=X-Auth-Email
    KNOXGATE_VERIFY_STAFF_HEADER=X-Auth-User-Staff
    KNOXGATE_VERIFY_SUPERUSER_HEADER=X-Auth-User-Superuser
)
KG=(env -i PATH="$PATH" HOME="$WORK" NO_COLOR=1 "${KG_ENV[@]}")
export PYTHONPATH="$HERE:$ROOT/integrations/django/tests"
export DJANGO_SETTINGS_MODULE=e2esite.settings E2E_DB="$DB" E2E_AUDIENCE="$AUDIENCE"
export E2E_JWKS_URL="http://127.0.0.1:$KG_ADMIN/.well-known/jwks.json"

# --- database: Django's schema, then knoxgate's users and Django's token ---------------------------

timeout 5 "${PG[@]}" -d postgres -c 'SELECT 1' >/dev/null 2>&1 || setup_failed "Postgres on 127.0.0.1:5432 unreachable"
[[ $(timeout 5 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null) == PONG ]] || setup_failed "Redis on 127.0.0.1:6379 unreachable"
timeout 10 "${PG[@]}" -d postgres -c "CREATE DATABASE $DB" || setup_failed "CREATE DATABASE $DB"
DB_CREATED=1
# Django creates every table (knox's, the test app's) and knoxgate_django's migration installs
# the change-feed triggers; knoxgate then finds its tables present and leaves them alone.
timeout 120 "$PY" -m django migrate --no-input >"$WORK/django-migrate.log" 2>&1 ||
    setup_failed "django migrate: $(tail -n 3 "$WORK/django-migrate.log")"
timeout 20 "${KG[@]}" "$BIN" migrate >"$WORK/migrate.log" 2>&1 || setup_failed "knoxgate migrate: $(tail -n 3 "$WORK/migrate.log")"
USERS_JSON="{"
for user in alice bob; do
    printf '%s\n' "$PASSWORD" | timeout 20 "${KG[@]}" "$BIN" user create "$user" --password-stdin >>"$WORK/setup.log" 2>&1 ||
        setup_failed "knoxgate user create $user: $(tail -n 3 "$WORK/setup.log")"
    id=$(timeout 10 "${PG[@]}" -d "$DB" -c "SELECT id FROM auth_user WHERE username = '$user'")
    USERS_JSON+="\"$user\": {\"id\": $id, \"password\": \"$PASSWORD\"},"
done
USERS_JSON="${USERS_JSON%,}}"
# bob's token is made by Django/knox itself.
DJANGO_TOKEN=$(timeout 60 "$PY" -m django shell -c "
from django.contrib.auth import get_user_model
from knox.models import AuthToken
print(AuthToken.objects.create(get_user_model().objects.get(username='bob'))[1])
" 2>>"$WORK/setup.log" | tail -n 1) || setup_failed "Django could not make a knox token: $(tail -n 3 "$WORK/setup.log")"
[[ $DJANGO_TOKEN =~ ^[0-9a-f]{64}$ ]] || setup_failed "unexpected knox token from Django: $DJANGO_TOKEN"

# --- processes ------------------------------------------------------------------------------------

start knoxgate "${KG[@]}" KNOXGATE_LISTEN="127.0.0.1:$KG_PORT" KNOXGATE_ADMIN_LISTEN="127.0.0.1:$KG_ADMIN" \
    "$BIN" serve
start gunicorn "$PY" -m gunicorn --bind "127.0.0.1:$APP_PORT" --workers 2 --access-logfile - \
    e2esite.wsgi:application
mkdir -p "$WORK/nginx"
sed -e "s|@LISTEN_PORT@|127.0.0.1:$NGINX_PORT|g; s|@KNOXGATE@|127.0.0.1:$KG_PORT|g" \
    -e "s|@UPSTREAM@|127.0.0.1:$APP_PORT|g; s|@PREFIX@|$WORK/nginx|g" \
    "$NGINX_CONF" >"$WORK/nginx/nginx.conf"
if grep -qE '@[A-Z_]+@' "$WORK/nginx/nginx.conf"; then setup_failed "placeholders left in the nginx config"; fi
own_for_unprivileged "$WORK/nginx"
start nginx exec_unprivileged nginx -p "$WORK/nginx/" -e "$WORK/nginx/error.log" \
    -c "$WORK/nginx/nginx.conf" -g 'daemon off;'

wait_up knoxgate "$(pid_of knoxgate)" "http://127.0.0.1:$KG_ADMIN/readyz" 20 200
wait_up gunicorn "$(pid_of gunicorn)" "http://127.0.0.1:$APP_PORT/api/open" 30 200
wait_up nginx "$(pid_of nginx)" "http://127.0.0.1:$NGINX_PORT/" 10

# --- checks ---------------------------------------------------------------------------------------

REMAINING=$((BUDGET_END - SECONDS))
((REMAINING > 60)) || setup_failed "setup used up the time budget"
set +e
timeout --kill-after=5 "$REMAINING" "$PY" "$HERE/check.py" \
    --nginx "http://127.0.0.1:$NGINX_PORT" --gunicorn "http://127.0.0.1:$APP_PORT" \
    --knoxgate "http://127.0.0.1:$KG_PORT" --admin "http://127.0.0.1:$KG_ADMIN" \
    --users "$USERS_JSON" --django-token "$DJANGO_TOKEN" --key "$WORK/assertion.pem" \
    --audience "$AUDIENCE" --db "$DB" --summary "$WORK/summary"
RC=$?
set -e
read -r PASSED FAILED 2>/dev/null <"$WORK/summary" || { PASSED=0 FAILED=0; }
if [[ $RC -ne 0 && $FAILED -eq 0 ]]; then
    printf 'not ok - check.py exited with status %s (timeout or crash)\n' "$RC"
    FAILED=$((FAILED + 1))
fi
if ((FAILED > 0)); then dump_logs; fi
printf '%s passed, %s failed\n' "$PASSED" "$FAILED"
((FAILED == 0))
