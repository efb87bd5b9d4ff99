#!/usr/bin/env bash
# End-to-end tests: real nginx and Caddy, configured from deploy/nginx/knoxgate.conf and
# deploy/caddy/Caddyfile, in front of knoxgate and a stub application (echo_upstream.py), plus
# requests shaped like Traefik's ForwardAuth and Envoy's ext_authz sent to knoxgate directly.
#
#   tests/e2e/run.sh
#
#   KNOXGATE_BIN   knoxgate binary (default <repo>/target/debug/knoxgate; `cargo build` when absent)
#   E2E_CADDY2     a second Caddy binary to test as well (default target/tools/lint/bin/caddy,
#                  the current Caddy that scripts/validate-deploy.sh installs, when present;
#                  set it to "" to skip). The first is the distribution's `caddy`.
#   E2E_NGINX_CONF, E2E_CADDYFILE
#                  test other copies of deploy/nginx/knoxgate.conf / deploy/caddy/Caddyfile
#                  (e.g. a deliberately broken one, to see the suite catch it)
#   E2E_KEEP=1     keep the temp dir (configs, logs) and print its path
#
# Needs Postgres on 127.0.0.1:5432 (user postgres, trust auth) and Redis on 127.0.0.1:6379.
# Installs nginx and caddy with apt-get when missing (root only). Everything listens on
# 127.0.0.1 on free ports; the database is created for the run and dropped afterwards; nginx
# and Caddy run as nobody when this runs as root. Assertions are in e2e.py; prints one
# `ok - ...` / `not ok - ...` line per check, then `N passed, M failed`; exits 1 on a failure.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN=${KNOXGATE_BIN:-$ROOT/target/debug/knoxgate}
CADDY2=${E2E_CADDY2-$ROOT/target/tools/lint/bin/caddy}
NGINX_CONF=${E2E_NGINX_CONF:-$ROOT/deploy/nginx/knoxgate.conf}
CADDYFILE=${E2E_CADDYFILE:-$ROOT/deploy/caddy/Caddyfile}
PASSWORD="e2e-pw-$RANDOM-$RANDOM"
PG=(psql -h 127.0.0.1 -p 5432 -U postgres -v ON_ERROR_STOP=1 -qAt)
DB=knoxgate_e2e_$$_$RANDOM
PREFIX_KEY=knoxgate-e2e-$$-$RANDOM

say() { printf '# %s\n' "$*"; }

# Fails the run during setup: one `not ok` line and the closing count, as for a failed check.
setup_failed() {
    printf 'not ok - setup: %s\n' "$*"
    dump_logs
    printf '0 passed, 1 failed\n'
    exit 1
}

# --- cleanup --------------------------------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/knoxgate-e2e.XXXXXX")
chmod 0755 "$WORK" # nginx and Caddy run as nobody and must reach their directories inside
PIDS=()
DB_CREATED=
POLICY_RC_CREATED=

# dump_logs, cleanup, exec_unprivileged, own_for_unprivileged, free_ports, wait_up
source "$HERE/helpers.sh"
trap cleanup EXIT
if [[ ${E2E_KEEP:-} == 1 ]]; then say "temp dir (kept): $WORK"; fi
trap 'exit 130' INT TERM

# --- tools ----------------------------------------------------------------------------------------

# nginx and caddy from apt when missing (the approach of scripts/validate-deploy.sh): root only,
# and without letting the packages' services start.
ensure_apt() {
    local pair pkg missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $EUID -eq 0 ]] || setup_failed "${missing[*]} missing and not root to apt-get install them"
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    say "apt-get install ${missing[*]}"
    for pkg in "${missing[@]}"; do
        if ! apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" \
            >"$WORK/apt-$pkg.log" 2>&1 || setup_failed "apt-get install $pkg failed: $(tail -n 1 "$WORK/apt-$pkg.log")"
    done
    if [[ -n $POLICY_RC_CREATED ]]; then rm -f /usr/sbin/policy-rc.d; POLICY_RC_CREATED=; fi
}
ensure_apt nginx:nginx caddy:caddy
for tool in python3 psql redis-cli setpriv timeout; do
    command -v "$tool" >/dev/null 2>&1 || setup_failed "$tool is not installed"
done
if [[ ! -x $BIN ]]; then
    say "no $BIN: cargo build"
    (cd "$ROOT" && cargo build --quiet --all-targets) || setup_failed "cargo build failed"
fi
[[ -x $BIN ]] || setup_failed "no knoxgate binary at $BIN"
if [[ -n $CADDY2 && ! -x $CADDY2 ]]; then CADDY2=; fi

# The suite's own budget. Every wait below is bounded too; this is the backstop.
BUDGET_END=$((SECONDS + 110))

# --- helpers --------------------------------------------------------------------------------------


# knoxgate with exactly the given settings: it rejects unknown KNOXGATE_* variables, so nothing
# from the caller's environment is passed on.
KG_ENV=()
# Used as `kg ... &`, so it execs (see exec_unprivileged).
kg() { exec env -i PATH="$PATH" HOME="$WORK" NO_COLOR=1 "${KG_ENV[@]}" "$@"; }

# --- database, users, tokens ----------------------------------------------------------------------

timeout 5 "${PG[@]}" -d postgres -c 'SELECT 1' >/dev/null 2>&1 || setup_failed "Postgres on 127.0.0.1:5432 unreachable"
[[ $(timeout 5 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null) == PONG ]] || setup_failed "Redis on 127.0.0.1:6379 unreachable"
timeout 10 "${PG[@]}" -d postgres -c "CREATE DATABASE $DB" || setup_failed "CREATE DATABASE $DB"
DB_CREATED=1

read -r KG_PORT KG_ADMIN KG2_PORT KG2_ADMIN KG3_PORT KG3_ADMIN DEAD_PG_PORT DEAD_REDIS_PORT UP_PORT \
    NGINX_PORT NGINX3_PORT CADDY_PORT CADDY3_PORT CADDY2_PORT CADDY23_PORT <<<"$(free_ports 15)"
KG_ENV=(
    KNOXGATE_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/$DB"
    KNOXGATE_REDIS_URL=redis://127.0.0.1:6379/0
    KNOXGATE_REDIS_KEY_PREFIX="$PREFIX_KEY"
    KNOXGATE_SESSIONS_PASSWORD_ITERATIONS=1000
)

timeout 20 env -i PATH="$PATH" HOME="$WORK" "${KG_ENV[@]}" "$BIN" migrate >"$WORK/migrate.log" 2>&1 ||
    setup_failed "knoxgate migrate: $(tail -n 3 "$WORK/migrate.log")"
USERS_JSON="{"
for user in alice bob carol dave; do
    printf '%s\n' "$PASSWORD" | timeout 20 env -i PATH="$PATH" HOME="$WORK" "${KG_ENV[@]}" \
        "$BIN" user create "$user" --password-stdin >>"$WORK/setup.log" 2>&1 ||
        setup_failed "knoxgate user create $user: $(tail -n 3 "$WORK/setup.log")"
    token=$(timeout 20 env -i PATH="$PATH" HOME="$WORK" "${KG_ENV[@]}" "$BIN" token create --user "$user" 2>>"$WORK/setup.log") ||
        setup_failed "knoxgate token create --user $user: $(tail -n 3 "$WORK/setup.log")"
    id=$(timeout 10 "${PG[@]}" -d "$DB" -c "SELECT id FROM auth_user WHERE username = '$user'")
    [[ $token =~ ^[0-9a-f]{64}$ && $id =~ ^[0-9]+$ ]] || setup_failed "unexpected token ($token) or id ($id) for $user"
    USERS_JSON+="\"$user\": {\"id\": \"$id\", \"token\": \"$token\"},"
done
USERS_JSON="${USERS_JSON%,}}"
# bob is staff, for the per-route policy checks (/staff/ is require=staff in both proxy configs).
timeout 10 "${PG[@]}" -d "$DB" -c "UPDATE auth_user SET is_staff = true WHERE username = 'bob'" ||
    setup_failed "could not make bob staff"

# --- processes ------------------------------------------------------------------------------------

# start NAME COMMAND...: COMMAND in the background, logging to $WORK/NAME.log; sets PID_<NAME>.
# Disowned: no job-status noise when e2e.py or cleanup kills it. (Bash functions passed here
# must exec, so that the pid is the server's own.)
start() {
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=("$!")
    disown "$!"
    printf -v "PID_${name//-/_}" '%s' "$!"
}
pid_of() { local v="PID_${1//-/_}"; printf '%s' "${!v}"; }

# nginx_start NAME PORT KNOXGATE_PORT: deploy/nginx/knoxgate.conf, placeholders filled, nothing
# else changed; as nobody when root.
nginx_start() {
    local name=$1 port=$2 kg_port=$3 dir=$WORK/$1
    mkdir -p "$dir"
    sed -e "s|@LISTEN_PORT@|127.0.0.1:$port|g; s|@KNOXGATE@|127.0.0.1:$kg_port|g" \
        -e "s|@UPSTREAM@|127.0.0.1:$UP_PORT|g; s|@PREFIX@|$dir|g" \
        "$NGINX_CONF" >"$dir/nginx.conf"
    if grep -qE '@[A-Z_]+@' "$dir/nginx.conf"; then setup_failed "placeholders left in the $name config"; fi
    own_for_unprivileged "$dir"
    start "$name" exec_unprivileged nginx -p "$dir/" -e "$dir/error.log" -c "$dir/nginx.conf" -g 'daemon off;'
}

# caddy_start NAME BINARY PORT KNOXGATE_PORT: deploy/caddy/Caddyfile, placeholders filled; as
# nobody when root. The one addition, `bind 127.0.0.1`, keeps the site off other interfaces
# (`:PORT` alone listens on all of them).
caddy_start() {
    local name=$1 caddy=$2 port=$3 kg_port=$4 dir=$WORK/$1
    mkdir -p "$dir/home"
    sed -e "s|@LISTEN_PORT@|$port|g; s|@KNOXGATE@|127.0.0.1:$kg_port|g; s|@UPSTREAM@|127.0.0.1:$UP_PORT|g" \
        -e "s|^:$port {\$|&\n\tbind 127.0.0.1|" \
        "$CADDYFILE" >"$dir/Caddyfile"
    grep -q $'^\tbind 127.0.0.1$' "$dir/Caddyfile" || setup_failed "$name: could not add bind 127.0.0.1"
    if grep -qE '@[A-Z_]+@' "$dir/Caddyfile"; then setup_failed "placeholders left in the $name Caddyfile"; fi
    own_for_unprivileged "$dir"
    start "$name" exec_unprivileged env -i PATH="$PATH" HOME="$dir/home" XDG_DATA_HOME="$dir/home/data" \
        XDG_CONFIG_HOME="$dir/home/config" "$caddy" run --config "$dir/Caddyfile" --adapter caddyfile
}

start upstream python3 "$HERE/echo_upstream.py" "$UP_PORT"
# The main knoxgate: allow_cors_preflight left at its default (false).
start knoxgate kg KNOXGATE_LISTEN="127.0.0.1:$KG_PORT" KNOXGATE_ADMIN_LISTEN="127.0.0.1:$KG_ADMIN" "$BIN" serve
# A second one, same database, with allow_cors_preflight = true.
start knoxgate-cors kg KNOXGATE_LISTEN="127.0.0.1:$KG2_PORT" KNOXGATE_ADMIN_LISTEN="127.0.0.1:$KG2_ADMIN" \
    KNOXGATE_VERIFY_ALLOW_CORS_PREFLIGHT=true "$BIN" serve
# A third one whose Postgres and Redis are unreachable (ports nothing listens on): alive, but
# unable to decide, so it answers 503 to every token.
start knoxgate-nostore env -i PATH="$PATH" HOME="$WORK" NO_COLOR=1 \
    KNOXGATE_POSTGRES_URL="postgres://postgres@127.0.0.1:$DEAD_PG_PORT/$DB" \
    KNOXGATE_REDIS_URL="redis://127.0.0.1:$DEAD_REDIS_PORT/0" KNOXGATE_REDIS_KEY_PREFIX="$PREFIX_KEY" \
    KNOXGATE_LISTEN="127.0.0.1:$KG3_PORT" KNOXGATE_ADMIN_LISTEN="127.0.0.1:$KG3_ADMIN" "$BIN" serve

NGINX_NAME="nginx $(nginx -v 2>&1 | sed 's|.*nginx/||')"
CADDY_NAME="caddy $(caddy version | awk '{print $1}')"
nginx_start nginx "$NGINX_PORT" "$KG_PORT"
nginx_start nginx-nostore "$NGINX3_PORT" "$KG3_PORT"
caddy_start caddy caddy "$CADDY_PORT" "$KG_PORT"
caddy_start caddy-nostore caddy "$CADDY3_PORT" "$KG3_PORT"
PROXIES=(--proxy "$NGINX_NAME=http://127.0.0.1:$NGINX_PORT" --proxy "$CADDY_NAME=http://127.0.0.1:$CADDY_PORT")
NOSTORE=(--proxy-nostore "$NGINX_NAME=http://127.0.0.1:$NGINX3_PORT"
    --proxy-nostore "$CADDY_NAME=http://127.0.0.1:$CADDY3_PORT")
WAIT_PROXIES=(nginx:"$NGINX_PORT" nginx-nostore:"$NGINX3_PORT" caddy:"$CADDY_PORT" caddy-nostore:"$CADDY3_PORT")
if [[ -n $CADDY2 ]]; then
    CADDY2_NAME="caddy $("$CADDY2" version | awk '{print $1}')"
    caddy_start caddy2 "$CADDY2" "$CADDY2_PORT" "$KG_PORT"
    caddy_start caddy2-nostore "$CADDY2" "$CADDY23_PORT" "$KG3_PORT"
    PROXIES+=(--proxy "$CADDY2_NAME=http://127.0.0.1:$CADDY2_PORT")
    NOSTORE+=(--proxy-nostore "$CADDY2_NAME=http://127.0.0.1:$CADDY23_PORT")
    WAIT_PROXIES+=(caddy2:"$CADDY2_PORT" caddy2-nostore:"$CADDY23_PORT")
fi

wait_up upstream "$(pid_of upstream)" "http://127.0.0.1:$UP_PORT/__e2e__/requests" 10 200
wait_up knoxgate "$(pid_of knoxgate)" "http://127.0.0.1:$KG_ADMIN/readyz" 20 200
wait_up knoxgate-cors "$(pid_of knoxgate-cors)" "http://127.0.0.1:$KG2_ADMIN/readyz" 20 200
wait_up knoxgate-nostore "$(pid_of knoxgate-nostore)" "http://127.0.0.1:$KG3_ADMIN/healthz" 20 200
for pair in "${WAIT_PROXIES[@]}"; do
    wait_up "${pair%%:*}" "$(pid_of "${pair%%:*}")" "http://127.0.0.1:${pair#*:}/" 10
done

# --- assertions -----------------------------------------------------------------------------------

REMAINING=$((BUDGET_END - SECONDS))
((REMAINING > 10)) || setup_failed "setup used up the time budget"
set +e
timeout --kill-after=5 "$REMAINING" python3 "$HERE/e2e.py" \
    --knoxgate "http://127.0.0.1:$KG_PORT" --knoxgate-pid "$(pid_of knoxgate)" \
    --knoxgate-nostore "http://127.0.0.1:$KG3_PORT" "${NOSTORE[@]}" \
    --admin "http://127.0.0.1:$KG_ADMIN,http://127.0.0.1:$KG2_ADMIN,http://127.0.0.1:$KG3_ADMIN" \
    --knoxgate-cors "http://127.0.0.1:$KG2_PORT" \
    --upstream "http://127.0.0.1:$UP_PORT" "${PROXIES[@]}" \
    --users "$USERS_JSON" --password "$PASSWORD" --db "$DB" --summary "$WORK/summary"
RC=$?
set -e
read -r PASSED FAILED 2>/dev/null <"$WORK/summary" || { PASSED=0 FAILED=0; }
if [[ $RC -ne 0 && $FAILED -eq 0 ]]; then
    printf 'not ok - e2e.py exited with status %s (timeout or crash)\n' "$RC"
    FAILED=$((FAILED + 1))
fi
# A live /metrics scrape (after the traffic above) must pass Prometheus' own checker.
command -v promtool >/dev/null 2>&1 || ensure_apt promtool:prometheus
if python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
        "http://127.0.0.1:$KG2_ADMIN/metrics" >"$WORK/metrics.txt" 2>"$WORK/metrics.err" \
    && grep -q '^knoxgate_verify_total' "$WORK/metrics.txt" \
    && promtool check metrics <"$WORK/metrics.txt" >"$WORK/promtool.log" 2>&1; then
    printf 'ok - promtool check metrics accepts a live /metrics scrape\n'
    PASSED=$((PASSED + 1))
else
    printf 'not ok - promtool check metrics on a live /metrics scrape: %s\n' \
        "$(head -n 3 "$WORK/promtool.log" "$WORK/metrics.err" 2>/dev/null | tr '\n' ' ')"
    FAILED=$((FAILED + 1))
fi
if ((FAILED > 0)); then dump_logs; fi
printf '%s passed, %s failed\n' "$PASSED" "$FAILED"
((FAILED == 0))
