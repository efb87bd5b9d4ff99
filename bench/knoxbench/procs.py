"""Child processes and the command-line / HTTP clients the benchmark talks through.

`run` (a bounded subprocess), `psql` and `redis_cli` (the private redis-server), `http_get` and
`wait_http` (readiness probes), and `start` / `stop` / `stop_all`: every long-running process is
started in its own session, logged to LOGS/<name>.log, recorded in PROCS and stopped by its
process group at exit, never by name.
"""

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

from .config import DB, LOGS, PG_HOST, PG_PORT, PG_USER, REDIS_PORT, REPO


PROCS = []       # (name, Popen) we started; stopped by pid at exit


def run(cmd, timeout=120, env=None, cwd=None, check=True, input=None):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                       input=input)
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p


def source_state(*paths):
    """HEAD's short hash, and whether tracked files under `paths` (git pathspecs) differ from
    it, i.e. whether what was measured is not exactly that commit."""
    git = ["git", "-C", str(REPO)]
    head = run([*git, "rev-parse", "--short", "HEAD"], timeout=10, check=False).stdout.strip()
    changed = run([*git, "status", "--porcelain", "--untracked-files=no", "--", *paths],
                  timeout=10, check=False).stdout.strip()
    return head or "?", bool(changed)


def psql(sql, db=DB, timeout=300):
    p = run(["psql", "-h", PG_HOST, "-p", PG_PORT, "-U", PG_USER, "-d", db, "-v", "ON_ERROR_STOP=1",
             "-X", "-q", "-At", "-c", sql], timeout=timeout)
    return p.stdout.strip()


def redis_cli(*args):
    return run(["redis-cli", "-h", "127.0.0.1", "-p", str(REDIS_PORT), *args], timeout=30).stdout


def http_get(url, headers=None, timeout=2):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def wait_http(url, ok, timeout=30, headers=None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, _ = http_get(url, headers)
            if ok(status):
                return
            last = status
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s (last: {last})")


def start(name, cmd, env=None, cwd=None):
    LOGS.mkdir(parents=True, exist_ok=True)
    logf = open(LOGS / f"{name}.log", "ab")
    p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                         start_new_session=True)
    PROCS.append((name, p))
    return p


def stop(p, grace=10):
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)   # our own session: the process and its children only
    except ProcessLookupError:
        return
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


def exit_on_term():
    """Makes SIGTERM (``timeout``'s, or a user's ``kill``) raise SystemExit in the main thread,
    so that the caller's ``finally: stop_all()`` runs: Python's default for SIGTERM ends the
    process at once, leaving every server started here running."""
    signal.signal(signal.SIGTERM, _exit_on_signal)


def _exit_on_signal(signum, frame):
    # Once: a second SIGTERM (``pkill`` matches ``timeout`` too, which passes its own on) would
    # otherwise interrupt the cleanup it started. ``stop`` bounds every wait, and SIGKILL
    # (``timeout --kill-after``) still ends a cleanup that hangs.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(f"signal {signum}")


def stop_all():
    for name, p in reversed(PROCS):
        try:
            stop(p)
        except Exception:  # noqa: BLE001
            pass
