#!/usr/bin/env bash
# Scale benchmark: 200 knoxgate instances on one Postgres with max_connections = 100.
#
#   bench/scale.sh
#
# Starts, all on 127.0.0.1 and each on a spare port: a private Postgres cluster in a temp dir
# (initdb as the postgres OS user, max_connections = 100), PgBouncer in front of it
# (pool_mode = transaction, default_pool_size = 20), a private redis-server, two
# `knoxgate relay` processes and SCALE_INSTANCES (200) knoxgate instances with
# cache.feed = "redis" (postgres.url = PgBouncer, pgbouncer = true, the rest defaults: pool_size
# 4, idle_timeout 30 s). The measuring client (bench/scale.rs, built as the `scale` example)
# reports idle and cold-wave Postgres backends, RSS, revocation fan-out time and the relays'
# CPU; then the instances are restarted with cache.feed = "listen" (each its own LISTEN
# connection to Postgres) and measured again for comparison. Every process started here is
# stopped by its PID on exit (trap). Report: bench/SCALE.md (the run log: bench/out/scale/).
#
# Needs: root (Postgres and PgBouncer run as the postgres OS user), Postgres server binaries in
# /usr/lib/postgresql/<v>/bin, cargo; pgbouncer, redis-server and psql are installed with
# apt-get when missing.
#
# Knobs (environment):
#   SCALE_INSTANCES=200      knoxgate instances
#   SCALE_STAGGER=0.05       seconds between instance starts (2 cores: not all at once)
#   SCALE_IDLE_WAIT=35       seconds idle before counting backends (> postgres.idle_timeout)
#   SCALE_REVOCATIONS=60     raw-SQL revocations timed
#   SCALE_WAVE_TOKENS=5      cold tokens per instance in the wave
#   SCALE_TIMEOUT=900        hard limit of the whole run, seconds
#   KNOXGATE_BIN=...         measure this binary instead of building target/release/knoxgate
#   SCALE_CLIENT=...         this measuring client instead of building the `scale` example
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"

source "$here/lib.sh"
bench_install pgbouncer:pgbouncer redis-server:redis-server psql:postgresql-client
if [[ $EUID -ne 0 ]]; then
    echo "bench: run as root (Postgres and PgBouncer are started as the postgres user)" >&2
    exit 2
fi
bench_knoxgate
client_bin="${SCALE_CLIENT:-}"
if [[ -z $client_bin ]]; then
    echo "bench: building the measuring client (cargo build --release --locked --example scale)" >&2
    nice -n 10 timeout 1800 cargo build --release --locked --example scale
    client_bin="${CARGO_TARGET_DIR:-$repo/target}/release/examples/scale"
fi


instances=${SCALE_INSTANCES:-200}
stagger=${SCALE_STAGGER:-0.05}
idle_wait=${SCALE_IDLE_WAIT:-35}
# Every instance holds sockets to Redis, PgBouncer and its clients: far past the default 1024.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

work="$(mktemp -d /tmp/knoxscale.XXXXXX)"
chown postgres:postgres "$work"
out="$here/out/scale"
mkdir -p "$out"
pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
started=()   # PIDs of everything started here, stopped on exit

stop_pids() {
    local pid
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 100); do
        local alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && return 0
        sleep 0.1
    done
    for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
}

cleanup() {
    set +e
    [[ ${#started[@]} -gt 0 ]] && stop_pids "${started[@]}"
    if [[ -f "$work/data/postmaster.pid" ]]; then
        local pm
        pm="$(head -1 "$work/data/postmaster.pid")"
        runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -m immediate -w stop >/dev/null 2>&1
        kill -KILL "$pm" 2>/dev/null
    fi
    cp "$work"/*.log "$out/" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Spare loopback ports: bound all at once (so distinct), then released.
mapfile -t ports < <(python3 - "$((2 * instances + 6))" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
)
pg_port=${ports[0]} bouncer_port=${ports[1]} redis_port=${ports[2]}
relay_admin=("${ports[3]}" "${ports[4]}")
next_port=6

# Postgres: a private cluster, max_connections = 100 (the default, said explicitly).
runuser -u postgres -- "$pgbin/initdb" -D "$work/data" --auth=trust -U postgres --no-sync \
    -E UTF8 --locale=C >/dev/null
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -l "$work/postgres.log" -w -t 60 \
    -o "-c port=$pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$work \
        -c max_connections=100 -c fsync=off -c full_page_writes=off" start >/dev/null
# knoxgate connects as an ordinary role, as in production; the measuring client as the
# superuser, which keeps superuser_reserved_connections when knoxgate has taken the rest.
psql -q -h 127.0.0.1 -p "$pg_port" -U postgres \
    -c "CREATE ROLE knoxgate LOGIN" -c "CREATE DATABASE knoxscale OWNER knoxgate" postgres
pg_url="postgres://knoxgate@127.0.0.1:$pg_port/knoxscale"
admin_url="postgres://postgres@127.0.0.1:$pg_port/knoxscale"
bouncer_url="postgres://knoxgate@127.0.0.1:$bouncer_port/knoxscale"

cat >"$work/pgbouncer.ini" <<EOF
[databases]
knoxscale = host=127.0.0.1 port=$pg_port dbname=knoxscale user=knoxgate
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = 20
; A fleet's start-up (every instance loads its key filter) opens server connections that
; PgBouncer's default keeps for 10 minutes; a fleet-sized setting returns them in 20 s.
server_idle_timeout = 20
max_client_conn = 4000
logfile = $work/pgbouncer.log
pidfile = $work/pgbouncer.pid
EOF
chown postgres:postgres "$work/pgbouncer.ini"
pgbouncer_bin="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
"$pgbouncer_bin" -u postgres "$work/pgbouncer.ini" >/dev/null 2>&1 &
started+=($!)

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --maxclients 10000 --logfile "$work/redis.log" &
started+=($!)

for _ in $(seq 100); do
    (echo >"/dev/tcp/127.0.0.1/$bouncer_port") 2>/dev/null \
        && (echo >"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null && break
    sleep 0.1
done

# config_file PATH LISTEN ADMIN FEED: one knoxgate configuration.
config_file() {
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
[postgres]
url = "$bouncer_url"
pgbouncer = true
feed_url = "$pg_url"
[redis]
url = "redis://127.0.0.1:$redis_port/0"
key_prefix = "knoxscale"
[cache]
feed = "$4"
[log]
level = "warn"
EOF
}

# knoxgate refuses unknown KNOXGATE_* variables, so the binary's own is not passed on (env
# execs the binary: $! stays its PID).
config_file "$work/relay.toml" 0 "${relay_admin[0]}" redis
env -u KNOXGATE_BIN "$KNOXGATE_BIN" --config "$work/relay.toml" migrate >"$work/migrate.log" 2>&1

relays=()
for r in 0 1; do
    config_file "$work/relay$r.toml" 0 "${relay_admin[$r]}" redis
    env -u KNOXGATE_BIN "$KNOXGATE_BIN" --config "$work/relay$r.toml" relay >"$work/relay$r.log" 2>&1 &
    relays+=($!)
    started+=($!)
done

# start_instances FEED: SCALE_INSTANCES instances, staggered; writes $work/instances.
instance_pids=()
start_instances() {
    : >"$work/instances"
    instance_pids=()
    local n listen admin
    for ((n = 0; n < instances; n++)); do
        listen=${ports[$((next_port + 2 * n))]}
        admin=${ports[$((next_port + 2 * n + 1))]}
        config_file "$work/i$n.toml" "$listen" "$admin" "$1"
        env -u KNOXGATE_BIN "$KNOXGATE_BIN" --config "$work/i$n.toml" >>"$work/instances-$1.log" 2>&1 &
        instance_pids+=($!)
        started+=($!)
        echo "$listen $admin $!" >>"$work/instances"
        sleep "$stagger"
    done
}

# measure MODE RELAY_PIDS REVOCATIONS: the measuring client's markdown section.
measure() {
    timeout --signal=TERM "${SCALE_TIMEOUT:-900}" "$client_bin" --mode "$1" --pg "$admin_url" \
        --instances "$work/instances" --relays "$2" --idle-wait "$idle_wait" \
        --revocations "$3" --wave-tokens "${SCALE_WAVE_TOKENS:-5}" --redis-port "$redis_port"
}

t0=$SECONDS
echo "bench: starting $instances instances (cache.feed = \"redis\")" >&2
start_instances redis
redis_section="$(measure redis "${relays[0]},${relays[1]}" "${SCALE_REVOCATIONS:-60}")"
echo "$redis_section" >&2

echo "bench: restarting the instances with cache.feed = \"listen\", relays stopped" >&2
stop_pids "${instance_pids[@]}" "${relays[@]}"
start_instances listen
listen_section="$(measure listen "" 0)"
echo "$listen_section" >&2
too_many=$(grep -c "too many clients" "$work/instances-listen.log" || true)
elapsed=$((SECONDS - t0))

{
    echo "# Scale: $instances instances on one Postgres (max_connections = 100)"
    echo
    echo "Produced by \`bench/scale.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'); one run, ${elapsed} s."
    echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
    echo "$(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -sr); $("$pgbin/postgres" --version),"
    echo "$("$pgbouncer_bin" --version | head -1), $(redis-server --version | cut -d' ' -f1-3)."
    echo "Everything (Postgres, PgBouncer, Redis, 2 relays, $instances instances and the"
    echo "measuring client) shares these cores, so latencies include CPU contention that separate"
    echo "machines would not have."
    echo
    echo "## Setup"
    echo
    echo "- Postgres: private cluster, \`max_connections = 100\`, \`fsync = off\` (temp cluster)."
    echo "- PgBouncer: \`pool_mode = transaction\`, \`default_pool_size = 20\`, \`server_idle_timeout = 20\`"
    echo "  (its default, 600 s, keeps the server connections of the fleet's start-up for 10 minutes)."
    echo "- knoxgate: \`postgres.url\` = PgBouncer with \`pgbouncer = true\`, \`feed_url\` = Postgres,"
    echo "  defaults otherwise (\`pool_size = 4\`, \`idle_timeout = 30s\`); started ${stagger} s apart."
    echo "- knoxgate (instances, relays, PgBouncer's server side) connects as the ordinary role"
    echo "  \`knoxgate\`; the measuring client as the superuser, which keeps the reserved slots."
    echo "- Backends: \`pg_stat_activity\` rows with \`backend_type = 'client backend'\`, the"
    echo "  measuring client's own connection excluded; grouped by \`application_name\` (PgBouncer's"
    echo "  server connections carry the client's, \`knoxgate\`)."
    echo
    echo "## Results"
    echo
    echo "$redis_section"
    echo
    echo "$listen_section"
    echo "- \"too many clients\" lines in the listen-mode instances' logs: $too_many"
    echo
    echo "## Method"
    echo
    sed -n '/^\/\/! \* /,/^$/p' "$here/scale.rs" | sed -n '/^\/\/!/p' | sed 's|^//! \{0,1\}||'
} >"$out/SCALE.md"
cp "$out/SCALE.md" "$here/SCALE.md"
echo "bench: wrote bench/SCALE.md" >&2
