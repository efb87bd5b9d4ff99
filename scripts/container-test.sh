#!/usr/bin/env bash
# Builds the image from the repository's Dockerfile and runs it, then runs the services of
# docker-compose.yml with the same images, with podman.
#
#   scripts/container-test.sh
#
#   CT_KEEP=1     keep the containers, network, volume and database of a failed run for a look
#   CT_NO_PULL=1  use local images or stand-ins only (no registry is tried)
#
# 1. Tools: podman, buildah, runc, netavark, aardvark-dns, debootstrap (apt-get, root only).
#    podman runs with scripts/container-test/containers.conf (through CONTAINERS_CONF; nothing
#    under /etc changes).
# 2. Base images: each image that the Dockerfile's FROM lines or docker-compose.yml name is used
#    as it is when podman has it, else pulled, else replaced by a local stand-in built from
#    Debian (scripts/container-test/*/Containerfile, on a debootstrapped Debian 12). Stand-ins
#    stay in podman's storage and are rebuilt only when their recipe changes. The Dockerfile
#    itself is built as committed.
# 3. The image against the host's Postgres (127.0.0.1:5432, user postgres, trust; a database
#    made for the run) and Redis (127.0.0.1:6379, keys under a prefix made for the run), host
#    network, loopback ports picked at random: check-config (and a bad setting refused), migrate,
#    user create, serve read-only/non-root/no capabilities, /healthz, /readyz, login -> verify ->
#    logout, /metrics, and SIGTERM with a login in flight (it completes, exit 0 within the grace).
# 4. The compose services (scripts/container-test/compose_up.py reads docker-compose.yml) on a
#    podman network of their own, started in dependency order with the conditions waited for by
#    hand (podman 4.3 runs no healthchecks without systemd): through nginx, no token -> 401, a
#    token -> the application with the right X-Auth-User-Id and not the client's copy, a forged
#    token -> 401 and nothing reaches the application.
#
# Prints one `ok - ...` line per check and each phase's time; on a failure prints the
# containers' logs and exits 1. Everything it creates is named kgct-<pid>-* and removed on exit.
# Cost on 2 cores: cold (no images) about 15 min idle, most of it the Rust build (25-34 min when
# the cores were shared with other builds); with the images cached about 1 min, plus about 2.5 min
# when src/ changed.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CT=$ROOT/scripts/container-test
cd "$ROOT"
export CONTAINERS_CONF=$CT/containers.conf
IMAGE=localhost/knoxgate:local
BUILDER_TAG=localhost/knoxgate:local-builder
NAME=kgct-$$
PG=(psql -h 127.0.0.1 -p 5432 -U postgres -v ON_ERROR_STOP=1 -qAt)
DB=kgct_$$_$RANDOM
KEY_PREFIX=kgct-$$-$RANDOM:
PY=/usr/bin/python3
STARTED=$SECONDS

say() { printf '# %s\n' "$*"; }
ok() { printf 'ok - %s\n' "$*"; }

# --- cleanup and failure --------------------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/knoxgate-ct.XXXXXX")
DB_CREATED=
POLICY_RC_CREATED=

own_containers() { podman ps -a --format '{{.Names}}' 2>/dev/null | grep "^$NAME-" || true; }

dump_logs() {
    local c
    for c in $(own_containers); do
        printf '# --- %s (%s), last lines of its log\n' "$c" "$(podman inspect -f '{{.State.Status}} exit={{.State.ExitCode}}' "$c" 2>/dev/null)"
        podman logs --tail 25 "$c" 2>&1 | sed 's/^/#   /'
    done
}

fail() {
    trap - ERR
    set +e
    printf 'not ok - %s\n' "$*"
    dump_logs
    say "container test FAILED after $((SECONDS - STARTED)) s"
    exit 1
}

cleanup() {
    local rc=$? c
    set +e
    if [[ $rc -ne 0 && ${CT_KEEP:-} == 1 ]]; then
        say "kept: containers $NAME-*, network $NAME, volumes $NAME-*, database $DB"
        return
    fi
    for c in $(own_containers); do podman rm -f -t 2 "$c" >/dev/null 2>&1; done
    podman network rm -f "$NAME" >/dev/null 2>&1
    for c in $(podman volume ls --format '{{.Name}}' 2>/dev/null | grep "^$NAME-"); do
        podman volume rm -f "$c" >/dev/null 2>&1
    done
    if [[ -n $DB_CREATED ]]; then
        timeout 10 "${PG[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 ||
            say "could not drop database $DB"
    fi
    timeout 10 redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "$KEY_PREFIX*" 2>/dev/null |
        timeout 10 xargs -r redis-cli -h 127.0.0.1 -p 6379 DEL >/dev/null 2>&1
    if [[ -n $POLICY_RC_CREATED ]]; then rm -f /usr/sbin/policy-rc.d; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'fail "unexpected error at line $LINENO: $BASH_COMMAND"' ERR

PHASE_START=$SECONDS
phase_done() {
    say "$1: $((SECONDS - PHASE_START)) s"
    PHASE_START=$SECONDS
}

# --- tools ----------------------------------------------------------------------------------------

# CMD:PACKAGE pairs; a package is installed when its command is missing.
TOOLS=(podman:podman buildah:buildah runc:runc /usr/lib/podman/netavark:netavark
    /usr/lib/podman/aardvark-dns:aardvark-dns debootstrap:debootstrap newuidmap:uidmap
    catatonit:catatonit psql:postgresql-client redis-cli:redis-tools curl:curl)
missing=()
for pair in "${TOOLS[@]}"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
$PY -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
if ((${#missing[@]})); then
    [[ $EUID -eq 0 ]] || fail "missing ${missing[*]} and not root to apt-get install them"
    say "apt-get install ${missing[*]}"
    # Packages must not start services (podman's units are harmless, but keep the rule).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$WORK/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        golang-github-containers-common containernetworking-plugins "${missing[@]}" >>"$WORK/apt.log" 2>&1 ||
        { tail -n 20 "$WORK/apt.log"; fail "apt-get install ${missing[*]}"; }
fi
podman info >"$WORK/podman-info.txt" 2>&1 || { cat "$WORK/podman-info.txt"; fail "podman info"; }
say "$(podman --version), $(runc --version | head -n 1), storage $(podman info -f '{{.Store.GraphDriverName}}')"
phase_done "tools"

# --- base images ----------------------------------------------------------------------------------

STANDIN_LABEL=org.knoxgate.standin-recipe
DEBIAN_STANDIN=localhost/knoxgate-standin/debian:bookworm
DEBIAN_MIRROR=http://deb.debian.org/debian

# recipe_hash DIR [EXTRA]: what a stand-in is built from; a change rebuilds it.
recipe_hash() {
    { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum); printf '%s\n' "${2:-}"; } |
        sha256sum | cut -c1-16
}
image_label() { podman image inspect -f "{{index .Labels \"$STANDIN_LABEL\"}}" "$1" 2>/dev/null || true; }

ensure_debian() {
    local want
    want=$(printf 'debootstrap minbase bookworm %s' "$DEBIAN_MIRROR" | sha256sum | cut -c1-16)
    [[ $(image_label "$DEBIAN_STANDIN") == "$want" ]] && return 0
    say "building $DEBIAN_STANDIN with debootstrap (cold runs only, about 1-2 min)"
    local rootfs=$WORK/rootfs
    debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    tar -C "$rootfs" --numeric-owner -c . |
        podman import --change 'CMD ["/bin/bash"]' --change "LABEL $STANDIN_LABEL=$want" - "$DEBIAN_STANDIN" >/dev/null
    rm -rf "$rootfs"
}

# build_standin DIR TAG [EXTRA]: builds scripts/container-test/DIR as TAG unless TAG already
# holds this recipe. The build context is a copy so that extra files can join it.
build_standin() {
    local dir=$1 tag=$2 extra=${3:-} ctx want
    ensure_debian
    want=$(recipe_hash "$CT/$dir" "$extra $(podman image inspect -f '{{.Id}}' "$DEBIAN_STANDIN")")
    [[ $(image_label "$tag") == "$want" ]] && return 0
    say "building stand-in $tag from scripts/container-test/$dir"
    ctx=$WORK/ctx-$dir
    mkdir -p "$ctx"
    cp -a "$CT/$dir/." "$ctx/"
    [[ -z ${PREPARE_CONTEXT:-} ]] || "$PREPARE_CONTEXT" "$ctx"
    podman build --pull=never --label "$STANDIN_LABEL=$want" -t "$tag" "$ctx" >"$WORK/build-$dir.log" 2>&1 ||
        { tail -n 30 "$WORK/build-$dir.log"; fail "building stand-in $tag"; }
    rm -rf "$ctx"
}

# docker_name NAME: NAME as Docker reads it (postgres:15 -> docker.io/library/postgres:15), since
# podman may have no search registries configured for short names.
docker_name() {
    local first=${1%%/*}
    if [[ $1 != */* ]]; then
        printf 'docker.io/library/%s\n' "$1"
    elif [[ $first != *.* && $first != *:* && $first != localhost ]]; then
        printf 'docker.io/%s\n' "$1"
    else
        printf '%s\n' "$1"
    fi
}

# resolve_image NAME DIR [EXTRA]: prints the image to run for NAME: NAME itself when podman has
# it (a real image, or a stand-in already tagged so) or can pull it within 60 s, else the
# stand-in from DIR. A stand-in under NAME is rebuilt when its recipe changed. CT_NO_PULL=1
# skips the pull.
resolve_image() {
    local name=$1 dir=$2 extra=${3:-} standin=localhost/knoxgate-standin/$2:latest
    if podman image exists "$name"; then
        if [[ -z $(image_label "$name") ]]; then
            printf '%s\n' "$name"
            return
        fi
    elif [[ -z ${CT_NO_PULL:-} ]] && timeout 60 podman pull -q "$(docker_name "$name")" >"$WORK/pull.log" 2>&1; then
        [[ $(docker_name "$name") == "$name" ]] || podman tag "$(docker_name "$name")" "$name"
        printf '%s\n' "$name"
        return
    fi
    build_standin "$dir" "$standin" "$extra" >&2
    printf '%s\n' "$standin"
}

# The Dockerfile's FROM images must exist under their own names for an unchanged build.
RUST_FROM=$(awk '$1 == "FROM" && $2 ~ /^rust:/ {print $2; exit}' Dockerfile)
RUNTIME_FROM=$(awk '$1 == "FROM" {last = $2} END {print last}' Dockerfile)
[[ -n $RUST_FROM && -n $RUNTIME_FROM ]] || fail "Dockerfile: expected FROM rust:... and a runtime FROM"

# The Rust stand-in's build context gets the host's extra CA certificates (if any).
rust_context() {
    mkdir -p "$1/local-ca"
    cp /usr/local/share/ca-certificates/*.crt "$1/local-ca/" 2>/dev/null || true
}
RUST_EXTRA="ca=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null | sha256sum | cut -c1-16)"

# from_image NAME DIR EXTRA: like resolve_image, but a stand-in is tagged NAME for the build.
from_image() {
    local name=$1 dir=$2 extra=$3 got
    got=$(PREPARE_CONTEXT=${4:-} resolve_image "$name" "$dir" "$extra")
    if [[ $got != "$name" ]]; then podman tag "$got" "$name"; fi
    say "FROM $name: $(if [[ -n $(image_label "$name") ]]; then echo "local stand-in ($dir)"; else echo "as found/pulled"; fi)"
}
from_image "$RUST_FROM" rust "$RUST_EXTRA" rust_context
from_image "$RUNTIME_FROM" distroless ""
phase_done "base images"

# --- the image ------------------------------------------------------------------------------------

# Tags are moved by the build; the images they held are removed afterwards so that repeated
# runs do not pile up builder stages (about 1 GB each). The dependency layer stays cached: the
# new builder stage still uses it.
old_ids=$(podman image inspect -f '{{.Id}}' "$IMAGE" "$BUILDER_TAG" 2>/dev/null || true)
# The context is a copy of the checkout with permissions normalised to 644/755: buildah's layer
# cache keys COPY on the files' modes as well as their contents, so a clone made under another
# umask would otherwise rebuild every dependency. Contents, Dockerfile and .dockerignore are the
# checkout's; target/ and .git/ are left out as .dockerignore does.
CONTEXT=$WORK/context
mkdir -p "$CONTEXT"
tar -C "$ROOT" --exclude=./target --exclude=./.git -cf - . | tar -C "$CONTEXT" -xf -
chmod -R u=rwX,go=rX "$CONTEXT"
say "podman build -t $IMAGE . (cold: about 9 min on 2 cores; only src/ changed: about 2.5 min)"
if ! podman build --pull=never --target builder -t "$BUILDER_TAG" "$CONTEXT" >"$WORK/build.log" 2>&1 ||
    ! podman build --pull=never -t "$IMAGE" "$CONTEXT" >>"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log"
    fail "podman build of the Dockerfile"
fi
for id in $old_ids; do
    if [[ -z $(podman image inspect -f '{{.RepoTags}}' "$id" 2>/dev/null | tr -d '[]') ]]; then
        podman rmi "$id" >/dev/null 2>&1 || true
    fi
done
ok "podman build of the Dockerfile as committed ($(podman image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}'))"
[[ $(podman image inspect -f '{{.Config.User}}' "$IMAGE") == 65532:65532 ]] || fail "image user is not 65532:65532"
ok "image runs as 65532:65532"
phase_done "image build"

# --- the image against the host's Postgres and Redis -----------------------------------------------

free_port() { $PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
ADMIN=$(free_port)
while [[ $ADMIN == "$PORT" ]]; do ADMIN=$(free_port); done
"${PG[@]}" -d postgres -c "CREATE DATABASE $DB" >/dev/null
DB_CREATED=1
ENV=(-e "KNOXGATE_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/$DB"
    -e "KNOXGATE_REDIS_URL=redis://127.0.0.1:6379/0" -e "KNOXGATE_REDIS_KEY_PREFIX=$KEY_PREFIX"
    -e "KNOXGATE_LISTEN=127.0.0.1:$PORT" -e "KNOXGATE_ADMIN_LISTEN=127.0.0.1:$ADMIN"
    -e KNOXGATE_LOG_FORMAT=json
    # A zone the image must know, from its own zoneinfo or the copy built into the binary.
    -e KNOXGATE_SESSIONS_TIME_ZONE=Europe/Berlin
    # Logins slow enough to still be running when SIGTERM comes (below) on a fast machine, and a
    # request timeout and grace period long enough for them on a slow one.
    -e KNOXGATE_SESSIONS_PASSWORD_ITERATIONS=4000000 -e KNOXGATE_REQUEST_TIMEOUT=20s
    -e KNOXGATE_SHUTDOWN_GRACE=20s)
# The same restrictions as docker-compose.yml and the Kubernetes manifests.
HARDENED=(--read-only --cap-drop ALL --security-opt no-new-privileges:true)
kg() { podman run --rm --network host "${HARDENED[@]}" "${ENV[@]}" "$@"; }

out=$(kg "$IMAGE" check-config 2>&1) || fail "check-config: $out"
grep -q 'configuration is valid' <<<"$out" || fail "check-config said: $out"
ok "check-config accepts the settings"
if out=$(kg -e KNOXGATE_SHUTDOWN_GRACE=soon "$IMAGE" check-config 2>&1); then
    fail "check-config accepted shutdown_grace=soon: $out"
fi
grep -qi shutdown_grace <<<"$out" || fail "check-config's refusal does not name the key: $out"
ok "check-config refuses a bad value and names the key"

out=$(kg "$IMAGE" migrate 2>&1) || fail "migrate: $out"
n=$("${PG[@]}" -d "$DB" -c "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('auth_user', 'knox_authtoken')")
[[ $n == 2 ]] || fail "migrate: auth_user/knox_authtoken not created ($n of 2)"
kg "$IMAGE" migrate >/dev/null 2>&1 || fail "migrate is not idempotent"
ok "migrate creates the tables, and runs again cleanly"

PASSWORD="ct-pw-$RANDOM-$RANDOM"
printf '%s\n' "$PASSWORD" | kg -i "$IMAGE" user create --password-stdin ctuser >/dev/null 2>&1 ||
    fail "user create"
USER_ID=$("${PG[@]}" -d "$DB" -c "SELECT id FROM auth_user WHERE username = 'ctuser'")
[[ $USER_ID =~ ^[0-9]+$ ]] || fail "user create: no auth_user row"
ok "user create (id $USER_ID)"

SERVE=$NAME-serve
podman run -d --name "$SERVE" --network host "${HARDENED[@]}" "${ENV[@]}" "$IMAGE" serve >/dev/null
for ((i = 0; i < 100; i++)); do
    curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN/healthz" 2>/dev/null && break
    sleep 0.2
done
curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN/healthz" || fail "/healthz did not answer 200 within 20 s"
ok "serve: /healthz 200"
for ((i = 0; i < 100; i++)); do
    ready=$(curl -sS -w ' %{http_code}' "http://127.0.0.1:$ADMIN/readyz" 2>/dev/null || true)
    [[ $ready == *' 200' && $ready == *'"live"'* ]] && break
    sleep 0.2
done
[[ $ready == *' 200' && $ready == *'"live"'* ]] || fail "/readyz never 200 with a live feed: $ready"
ok "serve: /readyz 200, feed live (${ready% *})"

# What the kernel says about the serving process, not what the image claims.
pid=$(podman inspect -f '{{.State.Pid}}' "$SERVE")
status=$(cat "/proc/$pid/status")
grep -Eq '^Uid:\s+65532\s+65532\s+65532\s+65532$' <<<"$status" || fail "serve runs as $(grep ^Uid <<<"$status")"
if ! grep -Eq '^CapEff:\s+0+$' <<<"$status" || ! grep -Eq '^CapBnd:\s+0+$' <<<"$status"; then
    fail "serve has capabilities: $(grep ^Cap <<<"$status" | tr '\n' ' ')"
fi
grep -Eq '^NoNewPrivs:\s+1$' <<<"$status" || fail "no_new_privs is not set"
[[ $(podman inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$SERVE") == true ]] || fail "root filesystem is writable"
# distroless: nothing but the binary to run inside (podman exec itself works, as the first shows).
podman exec "$SERVE" /usr/local/bin/knoxgate --version >/dev/null 2>&1 || fail "podman exec knoxgate --version"
if podman exec "$SERVE" sh -c true >/dev/null 2>&1; then fail "the runtime image has a shell"; fi
ok "serve: uid 65532, no capabilities (effective and bounding), no_new_privs, read-only root, no shell"

# login -> verify -> logout, straight to the container.
API=http://127.0.0.1:$PORT
code=$(curl -sS -o /dev/null -w '%{http_code}' "$API/verify")
[[ $code == 401 ]] || fail "verify without a token: $code, expected 401"
login=$(curl -sS -X POST -u "ctuser:$PASSWORD" -w '\n%{http_code}' "$API/api/auth/login/")
[[ ${login##*$'\n'} == 200 ]] || fail "login: $login"
TOKEN=$(jq -r .token <<<"${login%$'\n'*}")
[[ $TOKEN =~ ^[0-9a-f]{64}$ ]] || fail "login returned no 64-hex token: $login"
EXPIRY=$(jq -r .expiry <<<"${login%$'\n'*}")
[[ $EXPIRY =~ ^[0-9-]{10}T[0-9:.]{8,15}\+0[12]:00$ ]] ||
    fail "login: expiry '$EXPIRY' is not shown in Europe/Berlin (+01:00 or +02:00)"
hdr=$(curl -sS -D - -o /dev/null -H "Authorization: Token $TOKEN" "$API/verify")
grep -q '^HTTP/1.1 200' <<<"$hdr" || fail "verify with the token: $hdr"
uid=$(grep -i '^x-auth-user-id:' <<<"$hdr" | tr -d '\r' | awk '{print $2}')
[[ $uid == "$USER_ID" ]] || fail "verify: X-Auth-User-Id '$uid', expected $USER_ID"
code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Token $TOKEN" "$API/api/auth/logout/")
[[ $code == 204 ]] || fail "logout: $code, expected 204"
code=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Token $TOKEN" "$API/verify")
[[ $code == 401 ]] || fail "verify after logout: $code, expected 401"
ok "login (expiry $EXPIRY, in Europe/Berlin) -> verify 200 with X-Auth-User-Id $USER_ID -> logout 204 -> verify 401"

metrics=$(curl -fsS "http://127.0.0.1:$ADMIN/metrics")
grep -q '^knoxgate_logins_total{result="ok"} 1$' <<<"$metrics" ||
    fail "/metrics: expected one ok login: $(grep logins_total <<<"$metrics")"
grep -q '^knoxgate_verify_total{outcome="allow",reason="valid"} 1$' <<<"$metrics" ||
    fail "/metrics: expected one allowed /verify: $(grep verify_total <<<"$metrics")"
grep -q '^knoxgate_logouts_total{kind="logout"} 1$' <<<"$metrics" ||
    fail "/metrics: expected one logout: $(grep logouts_total <<<"$metrics")"
ok "/metrics counts the login, the allowed /verify and the logout"

# SIGTERM while a login (a password hash: the slowest request there is) is in flight: the login
# completes and the process exits 0 within shutdown_grace (20 s here).
curl -sS -X POST -u "ctuser:$PASSWORD" -o "$WORK/drain.body" -w '%{http_code}' \
    "$API/api/auth/login/" >"$WORK/drain.code" 2>&1 &
curl_pid=$!
# A login hashes for a second or more (4,000,000 PBKDF2 rounds); 0.2 s in, it is running.
sleep 0.2
kill -0 "$curl_pid" 2>/dev/null || fail "the login finished before SIGTERM could be sent; nothing to drain"
t0=$(date +%s.%N)
podman stop -t 30 "$SERVE" >/dev/null
t1=$(date +%s.%N)
wait "$curl_pid" || true
exit_code=$(podman inspect -f '{{.State.ExitCode}}' "$SERVE")
took=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
[[ $exit_code == 0 ]] || fail "after SIGTERM: exit code $exit_code"
awk -v t="$took" 'BEGIN {exit !(t < 20)}' || fail "SIGTERM took $took s, beyond shutdown_grace (20 s)"
if [[ $(cat "$WORK/drain.code") != 200 ]] || ! jq -e '.token | test("^[0-9a-f]{64}$")' "$WORK/drain.body" >/dev/null; then
    fail "the login in flight at SIGTERM did not complete: $(cat "$WORK/drain.code") $(cat "$WORK/drain.body")"
fi
ok "SIGTERM with a login in flight: the login completes (200), exit 0 after $took s"
podman rm "$SERVE" >/dev/null
phase_done "image against the host's Postgres and Redis"

# --- the compose services ---------------------------------------------------------------------------

declare -A SERVICE_IMAGE=()
for svc in $($PY "$CT/compose_up.py" --list-images docker-compose.yml); do
    image=${svc#*=}
    svc=${svc%%=*}
    case $image in
        "$IMAGE" | knoxgate:local) continue ;;
    esac
    case $svc in
        # The application is always the local echo: it logs each request it receives, which is
        # how the test sees that a forged token never reaches it.
        app) SERVICE_IMAGE[$svc]=$(build_standin whoami localhost/knoxgate-standin/whoami:latest >&2 &&
            echo localhost/knoxgate-standin/whoami:latest) ;;
        *) SERVICE_IMAGE[$svc]=$(resolve_image "$image" "$svc") ;;
    esac
    say "service $svc: ${SERVICE_IMAGE[$svc]}"
done
phase_done "compose service images"

IMAGE_ARGS=(--image "knoxgate=$IMAGE" --image "migrate=$IMAGE")
for svc in "${!SERVICE_IMAGE[@]}"; do IMAGE_ARGS+=(--image "$svc=${SERVICE_IMAGE[$svc]}"); done
$PY "$CT/compose_up.py" --project "$NAME" "${IMAGE_ARGS[@]}" --ports-out "$WORK/ports.json" docker-compose.yml ||
    fail "starting the compose services in dependency order"
NGINX_PORT=$(jq -r '.nginx["80"]' "$WORK/ports.json")
STACK_ADMIN=$(jq -r '.knoxgate["9090"]' "$WORK/ports.json")
ok "compose services up in dependency order (nginx on 127.0.0.1:$NGINX_PORT, admin on 127.0.0.1:$STACK_ADMIN)"
phase_done "compose services started"

EDGE=http://127.0.0.1:$NGINX_PORT
ready=$(curl -sS -w ' %{http_code}' "http://127.0.0.1:$STACK_ADMIN/readyz")
[[ $ready == *' 200' ]] || fail "stack /readyz: $ready"
ok "stack: knoxgate /readyz 200 through the published admin port"

hdr=$(curl -sS -D - -o /dev/null "$EDGE/anything/no-token-$$")
grep -q '^HTTP/1.1 401' <<<"$hdr" || fail "through nginx without a token: $hdr"
grep -qi '^www-authenticate: Token' <<<"$hdr" || fail "401 without WWW-Authenticate: Token: $hdr"
ok "stack: no token -> 401 with WWW-Authenticate: Token"

# A user, created as the compose file's header comment says, in a one-off container.
STACK_PASSWORD="ct-stack-$RANDOM-$RANDOM"
mapfile -t RUN_ARGS < <($PY "$CT/compose_up.py" --project "$NAME" "${IMAGE_ARGS[@]}" --run-args knoxgate docker-compose.yml)
printf '%s\n' "$STACK_PASSWORD" | podman run --rm -i "${RUN_ARGS[@]}" user create --password-stdin stackuser >/dev/null 2>&1 ||
    fail "user create in a one-off knoxgate container on the stack's network"
login=$(curl -sS -X POST -u "stackuser:$STACK_PASSWORD" -w '\n%{http_code}' "$EDGE/api/auth/login/")
[[ ${login##*$'\n'} == 200 ]] || fail "login through nginx: $login"
STACK_TOKEN=$(jq -r .token <<<"${login%$'\n'*}")
[[ $STACK_TOKEN =~ ^[0-9a-f]{64}$ ]] || fail "login through nginx returned no token: $login"
STACK_UID=$(podman exec "$NAME-postgres" psql -U django -d app -qAt -c "SELECT id FROM auth_user WHERE username = 'stackuser'")
ok "stack: login through nginx (user id $STACK_UID)"

body=$(curl -sS -H "Authorization: Token $STACK_TOKEN" -H 'X-Auth-User-Id: 999' -H 'X_Auth_User_Id: 998' \
    -w '\n%{http_code}' "$EDGE/anything/with-token-$$")
[[ ${body##*$'\n'} == 200 ]] || fail "with a token through nginx: $body"
seen=$(grep -i '^x[-_]auth[-_]user[-_]id:' <<<"$body" || true)
[[ $seen == "X-Auth-User-Id: $STACK_UID" ]] ||
    fail "the application saw identity headers '$seen', expected exactly X-Auth-User-Id: $STACK_UID"
ok "stack: a token reaches the application with X-Auth-User-Id: $STACK_UID only (client's 999/998 dropped)"

FORGED=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
code=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Token $FORGED" -H "X-Auth-User-Id: $STACK_UID" \
    "$EDGE/anything/forged-$$")
[[ $code == 401 ]] || fail "a forged token through nginx: $code, expected 401"
app_log=$(podman logs "$NAME-app" 2>&1)
grep -q "/anything/with-token-$$" <<<"$app_log" || fail "the application's log misses the authorised request"
if grep -q -e "/anything/forged-$$" -e "/anything/no-token-$$" <<<"$app_log"; then
    fail "a refused request reached the application: $(grep anything <<<"$app_log")"
fi
ok "stack: a forged token -> 401, and no refused request reached the application (its log)"

code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Token $STACK_TOKEN" "$EDGE/api/auth/logout/")
[[ $code == 204 ]] || fail "logout through nginx: $code"
code=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Token $STACK_TOKEN" "$EDGE/anything/after-logout-$$")
[[ $code == 401 ]] || fail "the token after logout through nginx: $code, expected 401"
ok "stack: logout through nginx -> 204, the token is then refused"
phase_done "compose stack checks"

say "container test passed in $((SECONDS - STARTED)) s"
