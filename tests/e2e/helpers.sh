# Shared by tests/e2e/run.sh and tests/e2e-django/run.sh (sourced, not run). The sourcing script
# defines say and setup_failed, and the state cleanup undoes: WORK (temp dir), PIDS, PG, DB and
# DB_CREATED, PREFIX_KEY (Redis keys), POLICY_RC_CREATED.

dump_logs() {
    local f
    for f in "$WORK"/*.log "$WORK"/*/error.log; do
        [[ -s $f ]] || continue
        printf '# --- last lines of %s\n' "${f#"$WORK"/}"
        tail -n 8 "$f" | sed 's/^/#   /'
    done
}

cleanup() {
    local pid i
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || continue 2; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    done
    if [[ -n $DB_CREATED ]]; then
        timeout 10 "${PG[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 ||
            say "could not drop database $DB" >&2
    fi
    timeout 10 redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "$PREFIX_KEY*" 2>/dev/null |
        timeout 10 xargs -r redis-cli -h 127.0.0.1 -p 6379 DEL >/dev/null 2>&1
    if [[ -n $POLICY_RC_CREATED ]]; then rm -f /usr/sbin/policy-rc.d; fi
    if [[ ${E2E_KEEP:-} != 1 ]]; then rm -rf "$WORK"; fi
}

# Becomes COMMAND..., as nobody when root (nginx and Caddy need no privilege). Used as
# `exec_unprivileged ... &`: the exec makes $! the server's own pid, which cleanup signals.
exec_unprivileged() {
    if [[ $EUID -eq 0 ]]; then
        exec setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"
    else
        exec "$@"
    fi
}
own_for_unprivileged() { if [[ $EUID -eq 0 ]]; then chown -R 65534:65534 "$@"; fi; }

# N distinct free ports on 127.0.0.1.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# wait_up NAME PID URL SECONDS [STATUS]: waits until URL answers (with STATUS when given) while
# PID lives.
wait_up() {
    python3 - "$@" <<'PY' || setup_failed "$1 did not come up within $4 s ($3)"
import os, sys, time, urllib.error, urllib.request
name, pid, url, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
want = int(sys.argv[5]) if len(sys.argv) > 5 else None
deadline = time.monotonic() + secs
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"{name} exited")
    try:
        status = urllib.request.urlopen(url, timeout=1).status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = None
    if status is not None and (want is None or status == want):
        sys.exit(0)
    time.sleep(0.1)
sys.exit(1)
PY
}
