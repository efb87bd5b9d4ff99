# Shared by tests/e2e/run.sh and tests/e2e-django/run.sh (sourced, not run). The sourcing script
# defines setup_failed MESSAGE.

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
