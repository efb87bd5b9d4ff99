#!/usr/bin/env python3
"""knoxgate benchmark driver. Run it through bench/run.sh (which prepares the tools); see there
for the knobs. Everything listens on 127.0.0.1 only and every load is bounded in time.

Steps: fresh database (Django migrate, then `knoxgate migrate`), SQL seeding of tokens, then for
each target a saturation run (wrk -t2 -c64) and a fixed-rate run (wrk + delay() pacing),
per-request SQL / Redis counts from before/after deltas, RSS, and finally results.md + chart.png.
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = Path(os.environ.get("BENCH_OUT", BENCH / "out"))
LOGS = OUT / "logs"
DJPROJECT = REPO / "tests" / "interop" / "djproject"
VENV = Path(os.environ.get("KNOXGATE_VENV", REPO / "target" / "interop-venv"))
KNOXGATE = Path(os.environ.get("KNOXGATE_BIN", REPO / "target" / "release" / "knoxgate"))


def env_int(name, default):
    return int(os.environ.get(name, str(default)))


DURATION = env_int("BENCH_DURATION", 10)          # seconds per measured run
RATE = env_int("BENCH_RATE", 10000)               # fixed-rate target (req/s), capped at 50% of saturation
THREADS = env_int("BENCH_THREADS", 2)
CONNS = env_int("BENCH_CONNECTIONS", 64)
RATE_CONNS = env_int("BENCH_RATE_CONNECTIONS", 32)
WARMUP = env_int("BENCH_WARMUP", 3)
COLD_DURATION = env_int("BENCH_COLD_DURATION", 3)
DJANGO_PICK_DURATION = env_int("BENCH_DJANGO_PICK_DURATION", 5)
ROUNDS = env_int("BENCH_ROUNDS", 3)              # interleaved floor/hot/Redis-tier rounds for the ratios
BUDGET = env_int("BENCH_BUDGET", 900)             # seconds; optional steps are skipped past it
SKIP_FIXED = os.environ.get("BENCH_SKIP_FIXED", "0") == "1"
# Comma-separated step names (prefixes, case-insensitive) to run alone, e.g.
# BENCH_ONLY="nginx floor,knoxgate Redis tier". A partial run writes bench/out/ only and leaves
# the published bench/RESULTS.md and chart alone.
ONLY = [n.strip().lower() for n in os.environ.get("BENCH_ONLY", "").split(",") if n.strip()]
MAIN_USERS = env_int("BENCH_USERS", 2500)
TOKENS_PER_USER = env_int("BENCH_TOKENS_PER_USER", 4)
EXTRA_USERS = env_int("BENCH_EXTRA_USERS", 22500)  # for the 100k RSS / cold runs
HOT_SET = env_int("BENCH_HOT_SET", 1000)
DB = os.environ.get("BENCH_DB", "knoxgate_bench")
PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_PORT = os.environ.get("BENCH_PG_PORT", "5432")
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
REDIS_PORT = env_int("BENCH_REDIS_PORT", 16390)   # private redis-server started by this script
KG_PORT = env_int("BENCH_KNOXGATE_PORT", 18480)
KG_ADMIN_PORT = env_int("BENCH_KNOXGATE_ADMIN_PORT", 18490)
NGINX_PORT = env_int("BENCH_NGINX_PORT", 18481)
DJANGO_PORT = env_int("BENCH_DJANGO_PORT", 18482)

PG_URL = f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{DB}"
REDIS_URL_KG = f"redis://127.0.0.1:{REDIS_PORT}/0"
REDIS_URL_DJ = f"redis://127.0.0.1:{REDIS_PORT}/1"
TOKENS = OUT / "tokens.txt"           # 10k main tokens, shuffled
TOKENS_ALL = OUT / "tokens100k.txt"   # main + extra tokens (100k by default), shuffled

T0 = time.monotonic()
PROCS = []       # (name, Popen) we started; stopped by pid at exit
RESULTS = []     # one dict per measured run
NOTES = []       # free-text notes for the report
FAILURES = []


def log(msg):
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp} +{time.monotonic() - T0:5.0f}s] {msg}", flush=True)


def over_budget():
    return time.monotonic() - T0 > BUDGET


def run(cmd, timeout=120, env=None, cwd=None, check=True, input=None):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                       input=input)
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p


def psql(sql, db=DB, timeout=300):
    p = run(["psql", "-h", PG_HOST, "-p", PG_PORT, "-U", PG_USER, "-d", db, "-v", "ON_ERROR_STOP=1",
             "-X", "-q", "-At", "-c", sql], timeout=timeout)
    return p.stdout.strip()


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


def stop_all():
    for name, p in reversed(PROCS):
        try:
            stop(p)
        except Exception:  # noqa: BLE001
            pass


def tree_pids(pid):
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(d.name))
            except (OSError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        x = todo.pop()
        out.append(x)
        todo.extend(children.get(x, []))
    return out


def proc_status_kib(pid, field):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib(pid, tree=False):
    pids = tree_pids(pid) if tree else [pid]
    vals = [proc_status_kib(p, "VmRSS") for p in pids]
    vals = [v for v in vals if v is not None]
    return round(sum(vals) / 1024, 1) if vals else None


# ---------------------------------------------------------------- counters

PG_SETTLE = float(os.environ.get("BENCH_PG_SETTLE", "10.5"))


def pg_xacts(settle=True):
    """xact_commit + xact_rollback of the bench DB, read once it has stopped moving.

    PG15 backends publish their counters lazily: a backend that goes idle less than 1 s after
    its last flush keeps the rest pending for PGSTAT_IDLE_INTERVAL (10 s). So we wait
    BENCH_PG_SETTLE seconds after any DB activity, then poll until two reads 1.5 s apart agree."""
    def read():
        return int(psql(f"SELECT xact_commit + xact_rollback FROM pg_stat_database "
                        f"WHERE datname = '{DB}'", db="postgres"))
    if settle:
        time.sleep(PG_SETTLE)
    prev = read()
    for _ in range(10):
        time.sleep(1.5)
        cur = read()
        if cur - prev <= 1:   # our own read is one transaction
            return cur
        prev = cur
    return prev


def redis_cli(*args):
    return run(["redis-cli", "-h", "127.0.0.1", "-p", str(REDIS_PORT), *args], timeout=30).stdout


def redis_reset():
    redis_cli("CONFIG", "RESETSTAT")


def redis_commands():
    """Total calls since RESETSTAT, minus our own INFO/CONFIG."""
    total, per = 0, {}
    for line in redis_cli("INFO", "commandstats").splitlines():
        m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
        if m and m.group(1).split("|")[0] not in ("info", "config"):
            per[m.group(1)] = int(m.group(2))
            total += int(m.group(2))
    return total, per


def metrics(admin):
    status, body = http_get(f"http://{admin}/metrics", timeout=5)
    sql, lookups, redis_ops = 0.0, {}, {}
    for line in body.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^(\S+?)(\{[^}]*\})?\s+(\S+)$", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if name.endswith("sql_statements_total"):
            sql += value
            lookups["sql:" + lab.get("statement", "?")] = lookups.get("sql:" + lab.get("statement", "?"), 0) + value
        elif name.endswith("cache_lookups_total"):
            k = f"{lab.get('tier')}/{lab.get('result')}"
            lookups[k] = lookups.get(k, 0) + value
        elif name.endswith("redis_commands_total"):
            redis_ops[lab.get("op", "?")] = redis_ops.get(lab.get("op", "?"), 0) + value
        elif name.endswith("memory_cache_entries"):
            lookups["memory_entries"] = value
        elif name.endswith("coalesced_misses_total"):
            lookups["coalesced_miss"] = value
        elif name.endswith("load_shed_total"):
            lookups["load_shed"] = value
        elif name.endswith("verify_total"):
            k = "verify:" + ",".join(f"{a}={b}" for a, b in sorted(lab.items()))
            lookups[k] = lookups.get(k, 0) + value
    return {"sql": sql, "detail": lookups, "redis_ops": redis_ops}


def delta(after, before):
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
            if k != "memory_entries" and after.get(k, 0) - before.get(k, 0)}


# ---------------------------------------------------------------- wrk

def wrk(name, url, script, duration, conns=CONNS, rate=0, extra_env=None, quiet=False):
    env = dict(os.environ, BENCH_RATE=str(rate), BENCH_THREADS=str(THREADS), **(extra_env or {}))
    cmd = ["wrk", f"-t{THREADS}", f"-c{conns}", f"-d{duration}s", "--timeout", "5s", "--latency",
           "-s", str(BENCH / script), url]
    p = run(cmd, timeout=duration + 60, env=env, check=False)
    (LOGS / f"wrk-{name}.txt").write_text(" ".join(cmd) + "\n" + json.dumps(extra_env or {}) +
                                          "\n\n" + p.stdout + "\n" + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"wrk {name} exited {p.returncode}: {p.stderr[-500:]}")
    m = re.search(r"^BENCH_JSON (.*)$", p.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk {name}: no BENCH_JSON line: {p.stdout[-800:]} {p.stderr[-500:]}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    if not quiet:
        log(f"  {name}: {r['rps']:.0f} req/s p50 {r['p50_us']/1000:.2f} ms p99 "
            f"{r['p99_us']/1000:.2f} ms errors {r['errors']} non-2xx {r['non2xx3xx']}")
    return r


def measure(target, load, url, script, duration, *, pid=None, pid_tree=False, admin=None,
            conns=CONNS, rate=0, extra_env=None, expect_status="2xx", tokens_desc="", note="",
            uses_db=True, before_x=None):
    if before_x is None:
        before_x = pg_xacts(settle=uses_db)
    before_sql = metrics(admin) if admin else None
    redis_reset()
    r = wrk(f"{target}-{load}".replace(" ", "_").replace("/", "_").replace("+", ""), url, script,
            duration, conns=conns, rate=rate, extra_env=extra_env)
    rcmds, rper = redis_commands()
    after_x = pg_xacts(settle=uses_db)
    row = dict(target=target, load=load, tokens=tokens_desc, note=note, expect=expect_status,
               conns=conns, duration=duration, after_x=after_x, **r)
    n = max(r["requests"], 1)
    row["pg_xact_per_req"] = (after_x - before_x) / n   # our reads go through the postgres DB
    row["redis_per_req"] = rcmds / n
    row["redis_detail"] = {k: round(v / n, 3) for k, v in rper.items()}
    if admin:
        after_sql = metrics(admin)
        row["kg_sql_per_req"] = (after_sql["sql"] - before_sql["sql"]) / n
        row["kg_detail"] = delta(after_sql["detail"], before_sql["detail"])
        row["kg_redis_ops"] = delta(after_sql["redis_ops"], before_sql["redis_ops"])
        row["memory_entries"] = after_sql["detail"].get("memory_entries")
    if pid:
        row["rss_mib"] = rss_mib(pid, tree=pid_tree)
        if not pid_tree:
            hwm = proc_status_kib(pid, "VmHWM")
            row["hwm_mib"] = round(hwm / 1024, 1) if hwm else None
    RESULTS.append(row)
    save_raw()
    return row


def fixed_rate_for(sat_row):
    r = min(RATE, int(sat_row["rps"] * 0.5) // 10 * 10)
    return max(r, 10)


def save_raw():
    (OUT / "results.json").write_text(json.dumps({"results": RESULTS, "ratio_rounds": RATIO_ROUNDS,
                                                  "notes": NOTES, "failures": FAILURES}, indent=1))


# ---------------------------------------------------------------- setup

def start_redis():
    p = start("redis", ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no", "--daemonize", "no",
                        "--protected-mode", "yes"])
    for _ in range(50):
        try:
            if redis_cli("PING").strip() == "PONG":
                return p
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.1)
    raise RuntimeError("private redis-server did not start")


def dj_env(knox_redis, extra=None):
    e = dict(os.environ)
    e.update({
        "DJ_DB_NAME": DB, "DJ_DB_HOST": PG_HOST, "DJ_DB_PORT": PG_PORT, "DJ_DB_USER": PG_USER,
        "DJ_REDIS_URL": REDIS_URL_DJ, "DJ_KNOX_REDIS": "1" if knox_redis else "0",
        "DJANGO_SETTINGS_MODULE": "bench_settings",
        "PYTHONPATH": f"{BENCH / 'django'}:{DJPROJECT}",
    })
    e.update(extra or {})
    return e


def kg_env(extra=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("KNOXGATE_")}
    e.update({
        "KNOXGATE_POSTGRES_URL": PG_URL,
        "KNOXGATE_REDIS_URL": REDIS_URL_KG,
        "KNOXGATE_REDIS_KEY_PREFIX": "knoxbench",
        "KNOXGATE_LISTEN": f"127.0.0.1:{KG_PORT}",
        "KNOXGATE_ADMIN_LISTEN": f"127.0.0.1:{KG_ADMIN_PORT}",
        "KNOXGATE_LOG_LEVEL": "warn",
    })
    e.update(extra or {})
    return e


def seed_tokens(main_users, extra_users, tokens_per_user, main_file, all_file=None):
    """Users `bench_1…` and `tokens_per_user` knox tokens each, written with SQL exactly as knox
    stores them (sha512 hex digest, token_key = first 15 characters, expiry now()+10h). The raw
    tokens of the first `main_users` users go to `main_file` (shuffled), all of them to `all_file`."""
    all_copy = (f"\\copy (SELECT tok FROM bench_tok ORDER BY random()) TO '{all_file}'\n"
                if all_file else "")
    sql = f"""
\\set ON_ERROR_STOP 1
BEGIN;
INSERT INTO auth_user (password, last_login, is_superuser, username, first_name, last_name,
                       email, is_staff, is_active, date_joined)
SELECT '!bench-unusable', NULL, false, 'bench_' || g, '', '', '', false, true, now()
FROM generate_series(1, {main_users + extra_users}) g;
CREATE TEMP TABLE bench_tok AS
SELECT u.id AS user_id,
       (substr(u.username, 7)::int <= {main_users}) AS main,
       md5(random()::text) || md5(random()::text) AS tok
FROM auth_user u CROSS JOIN generate_series(1, {tokens_per_user}) j
WHERE u.username LIKE 'bench\\_%';
INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key)
SELECT encode(sha512(convert_to(tok, 'UTF8')), 'hex'), now(), user_id,
       now() + interval '10 hours', left(tok, 15)
FROM bench_tok;
COMMIT;
\\copy (SELECT tok FROM bench_tok WHERE main ORDER BY random()) TO '{main_file}'
{all_copy}ANALYZE;
"""
    seed = OUT / "seed.sql"
    seed.write_text(sql)
    run(["psql", "-h", PG_HOST, "-p", PG_PORT, "-U", PG_USER, "-d", DB, "-X", "-q", "-f", str(seed)],
        timeout=600)


def setup_db():
    log(f"fresh database {DB}")
    psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", db="postgres")
    psql(f"CREATE DATABASE {DB}", db="postgres")
    log("django migrate (DJ_KNOX_REDIS=1, so knox_redis is installed too)")
    run([str(VENV / "bin" / "python"), "manage.py", "migrate", "--no-input", "--verbosity", "0"],
        env=dj_env(True), cwd=DJPROJECT, timeout=300)
    log("knoxgate migrate")
    p = run([str(KNOXGATE), "migrate"], env=kg_env(), timeout=120)
    (LOGS / "knoxgate-migrate.log").write_text(p.stdout + p.stderr)
    t = time.monotonic()
    n_main = MAIN_USERS * TOKENS_PER_USER
    seed_tokens(MAIN_USERS, EXTRA_USERS, TOKENS_PER_USER, TOKENS, TOKENS_ALL)
    n1 = sum(1 for _ in TOKENS.open())
    n2 = sum(1 for _ in TOKENS_ALL.open())
    rows = psql("SELECT count(*) FROM knox_authtoken")
    users = psql("SELECT count(*) FROM auth_user")
    log(f"seeded {rows} tokens over {users} users in {time.monotonic() - t:.1f}s "
        f"(tokens.txt {n1}, tokens100k.txt {n2})")
    assert n1 == n_main, (n1, n_main)
    NOTES.append(f"Seed: {rows} knox tokens over {users} users ({TOKENS_PER_USER} per user, expiry "
                 f"now()+10h), SQL INSERT…SELECT generate_series, digests computed in SQL, "
                 f"{time.monotonic() - t:.1f}s. Main set tokens.txt = {n1} tokens of {MAIN_USERS} "
                 f"users; hot set = its first {HOT_SET} (shuffled).")
    # sanity: one token verifies by digest in SQL exactly as knox computes it (python hashlib)
    import hashlib
    tok = TOKENS.open().readline().strip()
    digest = hashlib.sha512(tok.encode()).hexdigest()
    found = psql(f"SELECT count(*) FROM knox_authtoken WHERE digest = '{digest}' "
                 f"AND token_key = '{tok[:15]}'")
    assert found == "1", "seeded digest does not match hashlib.sha512"


# ---------------------------------------------------------------- targets

class Knoxgate:
    def __init__(self, label, extra_env):
        self.label = label
        self.env = kg_env(extra_env)
        self.admin = f"127.0.0.1:{KG_ADMIN_PORT}"
        self.url = f"http://127.0.0.1:{KG_PORT}"
        redis_cli("FLUSHALL")
        self.p = start(f"knoxgate-{label}", [str(KNOXGATE)], env=self.env)
        wait_http(f"http://{self.admin}/readyz", lambda s: s == 200, timeout=30)
        tok = TOKENS.open().readline().strip()
        status, _ = http_get(self.url + "/verify", {"Authorization": f"Token {tok}"})
        if status != 200:
            raise RuntimeError(f"knoxgate {label}: /verify of a seeded token gave {status}")
        self.idle_rss = rss_mib(self.p.pid)

    def stop(self):
        stop(self.p)


def kg_target(label, extra_env, target, script, token_file, limit, warm, tokens_desc,
              expect="2xx", note="", after=None):
    kg = Knoxgate(label, extra_env)
    env = {"BENCH_TOKENS": str(token_file), "BENCH_TOKENS_LIMIT": str(limit)}
    try:
        if warm:
            wrk(f"{label}-warmup", kg.url, script, WARMUP, extra_env=dict(env, BENCH_MODE="seq"),
                quiet=True)
            m = metrics(kg.admin)
            log(f"  warm-up done: memory entries {m['detail'].get('memory_entries')}")
        sat = measure(target, "saturation", kg.url, script, DURATION, pid=kg.p.pid, admin=kg.admin,
                      extra_env=env, expect_status=expect, tokens_desc=tokens_desc, note=note)
        sat["idle_rss_mib"] = kg.idle_rss
        if not SKIP_FIXED:
            measure(target, "fixed rate", kg.url, script, DURATION, pid=kg.p.pid, admin=kg.admin,
                    extra_env=env, rate=fixed_rate_for(sat), conns=RATE_CONNS, before_x=sat["after_x"],
                    expect_status=expect, tokens_desc=tokens_desc, note=note)
        if after:
            after(kg)
    finally:
        kg.stop()
    return sat


def target_nginx():
    p, url = start_nginx()
    try:
        env = {"BENCH_TOKENS": str(TOKENS), "BENCH_TOKENS_LIMIT": str(HOT_SET)}
        sat = measure("nginx return 200 (floor)", "saturation", url, "verify.lua", DURATION,
                      pid=p.pid, pid_tree=True, extra_env=env, tokens_desc="same requests as hot",
                      uses_db=False)
        if not SKIP_FIXED:
            measure("nginx return 200 (floor)", "fixed rate", url, "verify.lua", DURATION, pid=p.pid,
                    pid_tree=True, extra_env=env, rate=fixed_rate_for(sat), conns=RATE_CONNS,
                    tokens_desc="same requests as hot", uses_db=False)
    finally:
        stop(p)


NGINX_CONF = """
daemon off;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200; }}
    }}
}}
"""


def start_nginx():
    """nginx answering `return 200` (the floor); returns (process, url)."""
    d = OUT / "nginx"
    (d / "logs").mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, port=NGINX_PORT))
    p = start("nginx", ["nginx", "-p", str(d), "-c", str(conf)])
    url = f"http://127.0.0.1:{NGINX_PORT}"
    wait_http(url + "/verify", lambda s: s == 200, timeout=10)
    return p, url


RATIO_ROUNDS = []


def target_ratio_rounds():
    """The floor, hot tokens and the Redis tier at saturation, ROUNDS times in turn.

    The machine's speed drifts by tens of per cent within minutes, so a ratio of two runs taken
    minutes apart says as much about the drift as about knoxgate. Each round measures the three
    back to back; the ratios quoted are per round, and their median across rounds."""
    env = {"BENCH_TOKENS": str(TOKENS), "BENCH_TOKENS_LIMIT": str(HOT_SET)}
    p, url = start_nginx()
    try:
        for i in range(1, ROUNDS + 1):
            if over_budget():
                FAILURES.append(f"ratio rounds: stopped after {i - 1} rounds (budget)")
                break
            row = {"round": i}
            row["floor"] = wrk(f"round{i}-floor", url, "verify.lua", DURATION, extra_env=env)["rps"]
            for label, extra in (("hot", {}),
                                 ("redis", {"KNOXGATE_CACHE_MEMORY_MAX_ENTRIES": "1",
                                            "KNOXGATE_CACHE_MEMORY_MAX_BYTES": "1"})):
                kg = Knoxgate(f"round{i}-{label}", extra)
                try:
                    wrk(f"round{i}-{label}-warmup", kg.url, "verify.lua", WARMUP,
                        extra_env=dict(env, BENCH_MODE="seq"), quiet=True)
                    row[label] = wrk(f"round{i}-{label}", kg.url, "verify.lua", DURATION,
                                     extra_env=env)["rps"]
                finally:
                    kg.stop()
            RATIO_ROUNDS.append(row)
            log(f"  round {i}: hot/floor {row['hot'] / row['floor']:.2f}, "
                f"Redis tier/floor {row['redis'] / row['floor']:.2f}")
    finally:
        stop(p)


GUNICORN_SETTINGS = {
    "gthread w2x8": ["--workers", "2", "--worker-class", "gthread", "--threads", "8"],
    "sync w4": ["--workers", "4", "--worker-class", "sync"],
}


def start_gunicorn(label, knox_redis, args):
    cmd = [str(VENV / "bin" / "python"), "-m", "gunicorn", "djproject.wsgi:application",
           "--bind", f"127.0.0.1:{DJANGO_PORT}", "--timeout", "60", "--graceful-timeout", "5",
           "--backlog", "2048", "--no-control-socket", "--error-logfile", "-", *args]
    p = start(f"gunicorn-{label}", cmd, env=dj_env(knox_redis), cwd=DJPROJECT)
    url = f"http://127.0.0.1:{DJANGO_PORT}"
    wait_http(url + "/api/protected/", lambda s: s == 401, timeout=60)
    tok = TOKENS.open().readline().strip()
    status, body = http_get(url + "/api/protected/", {"Authorization": f"Token {tok}"}, timeout=10)
    if status != 200:
        stop(p)
        raise RuntimeError(f"Django {label}: seeded token gave {status}: {body[:300]}")
    return p, url


def target_django(knox_redis):
    name = "Django knox-redis (gunicorn)" if knox_redis else "Django knox (gunicorn)"
    short = "dj-knoxredis" if knox_redis else "dj-knox"
    limit = HOT_SET if knox_redis else 0
    env = {"BENCH_TOKENS": str(TOKENS), "BENCH_TOKENS_LIMIT": str(limit),
           "BENCH_PATH": "/api/protected/"}
    best = None
    for label, args in GUNICORN_SETTINGS.items():
        redis_cli("FLUSHALL")
        p, url = start_gunicorn(f"{short}-{label.replace(' ', '')}", knox_redis, args)
        try:
            if knox_redis:
                wrk(f"{short}-{label}-warmup", url, "verify.lua", DJANGO_PICK_DURATION,
                    extra_env=dict(env, BENCH_MODE="seq"), quiet=True)
            r = wrk(f"{short}-{label}-pick", url, "verify.lua", DJANGO_PICK_DURATION, extra_env=env)
        finally:
            stop(p)
        NOTES.append(f"{name}: gunicorn `{label}` ({' '.join(args)}) gave {r['rps']:.0f} req/s in a "
                     f"{DJANGO_PICK_DURATION}s pick run (errors {r['errors']}, non-2xx {r['non2xx3xx']}).")
        if best is None or r["rps"] > best[1]["rps"]:
            best = (label, r)
    label = best[0]
    redis_cli("FLUSHALL")
    p, url = start_gunicorn(f"{short}-best", knox_redis, GUNICORN_SETTINGS[label])
    desc = (f"hot set {HOT_SET}, random" if knox_redis else f"{TOKENS_PER_USER * MAIN_USERS} tokens, random")
    try:
        if knox_redis:
            wrk(f"{short}-best-warmup", url, "verify.lua", max(WARMUP, DJANGO_PICK_DURATION),
                extra_env=dict(env, BENCH_MODE="seq"), quiet=True)
            keys = redis_cli("-n", "1", "DBSIZE").strip()
            log(f"  knox-redis warm-up: {keys} keys in Redis db 1")
        note = f"gunicorn {label}"
        sat = measure(name, "saturation", url, "verify.lua", DURATION, pid=p.pid, pid_tree=True,
                      extra_env=env, tokens_desc=desc, note=note)
        if not SKIP_FIXED:
            measure(name, "fixed rate", url, "verify.lua", DURATION, pid=p.pid, pid_tree=True,
                    extra_env=env, rate=fixed_rate_for(sat), conns=RATE_CONNS, tokens_desc=desc,
                    before_x=sat["after_x"],
                    note=note)
    finally:
        stop(p)


def target_cold():
    env = {"BENCH_TOKENS": str(TOKENS_ALL), "BENCH_TOKENS_LIMIT": "0", "BENCH_MODE": "seq"}
    desc = "fresh instance + empty Redis, each token once (seq)"
    for load in (["saturation"] + ([] if SKIP_FIXED else ["fixed rate"])):
        kg = Knoxgate(f"cold-{load.replace(' ', '')}", {})
        try:
            rate = 0
            conns = CONNS
            if load == "fixed rate":
                sat = [r for r in RESULTS if r["target"] == "knoxgate cold" and r["load"] == "saturation"]
                rate = fixed_rate_for(sat[0]) if sat else RATE
                conns = RATE_CONNS
            row = measure("knoxgate cold", load, kg.url, "verify.lua", COLD_DURATION, pid=kg.p.pid,
                          admin=kg.admin, extra_env=env, rate=rate, conns=conns, tokens_desc=desc,
                          note="1 token in the file used by the readiness check")
            row["idle_rss_mib"] = kg.idle_rss
            wraps = sum(t["wraps"] for t in row["threads"])
            if wraps:
                row["note"] += f"; WRAPPED {wraps}x: some requests were repeats"
        finally:
            kg.stop()


def target_rss100k(label="default", extra_env=None):
    kg = Knoxgate("rss100k-" + label, extra_env or {})
    try:
        n = sum(1 for _ in TOKENS_ALL.open())
        cold = [r for r in RESULTS if r["target"] == "knoxgate cold" and r["load"] == "saturation"]
        est = n / cold[0]["rps"] if cold else 60
        dur = int(min(max(est * 1.3 + 3, 10), 120))
        log(f"  warming {n} tokens with a seq pass of {dur}s")
        r = wrk(f"rss100k-{label}-warm", kg.url, "verify.lua", dur,
                extra_env={"BENCH_TOKENS": str(TOKENS_ALL), "BENCH_TOKENS_LIMIT": "0",
                           "BENCH_MODE": "seq"})
        time.sleep(1)
        m = metrics(kg.admin)
        entries = m["detail"].get("memory_entries")
        rss = rss_mib(kg.p.pid)
        hwm = proc_status_kib(kg.p.pid, "VmHWM")
        wraps = sum(t["wraps"] for t in r["threads"])
        row = dict(label=label, env=extra_env or {}, tokens=n, requests=r["requests"], wraps=wraps, entries=entries, rss_mib=rss,
                   hwm_mib=round(hwm / 1024, 1) if hwm else None, idle_rss_mib=kg.idle_rss,
                   errors=r["errors"], non2xx=r["non2xx3xx"], duration=dur,
                   covered=r["requests"] >= n)
        (OUT / f"rss100k-{label}.json").write_text(json.dumps(row, indent=1))
        log(f"  RSS with {entries} cached entries: {rss} MiB (peak {row['hwm_mib']} MiB, idle "
            f"{kg.idle_rss} MiB)")
        return row
    finally:
        kg.stop()


# ---------------------------------------------------------------- report

def versions():
    def out(cmd, err=False):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return ((p.stderr if err else p.stdout) or p.stdout or p.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    pyv = out([str(VENV / "bin" / "python"), "-c",
               "import django, importlib.metadata as m; print('Django', django.get_version(), "
               "'| django-rest-knox', m.version('django-rest-knox'), '| django-rest-knox-redis', "
               "m.version('django-rest-knox-redis'), '| gunicorn', m.version('gunicorn'), "
               "'| psycopg', m.version('psycopg'))"])
    git = out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"])
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {out(['uname', '-sr'])}, "
                   f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1)} GiB RAM",
        "knoxgate": out([str(KNOXGATE), "--version"]) + f" (git {git}{', src modified' if dirty and not dirty.startswith('?') else ''}, release build)",
        "wrk": out(["wrk", "-v"]),
        "nginx": out(["nginx", "-v"], err=True),
        "postgres": psql("SELECT version()", db="postgres").split(" on ")[0],
        "redis": "redis-server " + out(["redis-server", "--version"]).split()[2],
        "python": pyv,
    }


def fmt_ms(us):
    return f"{us / 1000:.2f}" if us is not None else "–"


def target_verdicts(sat, medians, rss100k):
    """One line per target of the issue, each from the figures above."""
    out = []

    def line(name, value, ok):
        verdict = "not measured" if ok is None else ("**met**" if ok else "**NOT met**")
        out.append(f"- {name}: {value} — {verdict}")

    hot, kr, floor = (sat.get(t) for t in ("knoxgate hot", "Django knox-redis (gunicorn)",
                                           "nginx return 200 (floor)"))
    redis_row = sat.get("knoxgate Redis tier")
    if hot and kr:
        x = hot["rps"] / kr["rps"]
        line("hot tokens ≥ 50× django-rest-knox-redis", f"{x:.0f}×", x >= 50)
    else:
        line("hot tokens ≥ 50× django-rest-knox-redis", "–", None)
    for key, row, name, goal in (("hot", hot, "hot tokens ≥ 60 % of the nginx floor", 0.60),
                                 ("redis", redis_row, "Redis tier ≥ 30 % of the nginx floor", 0.30)):
        if key in medians:
            single = f"; single run above: {row['rps'] / floor['rps']:.2f}" if row and floor else ""
            line(name, f"median {medians[key]:.2f} over {len(RATIO_ROUNDS)} rounds{single}",
                 medians[key] >= goal)
        elif row and floor:
            x = row["rps"] / floor["rps"]
            line(name, f"{x:.2f} (one run)", x >= goal)
        else:
            line(name, "–", None)
    fixed = [r for r in RESULTS if r["target"] == "knoxgate hot" and r["load"] == "fixed rate"]
    if fixed and fixed[0]["rate_target"] and fixed[0]["rate_target"] >= 10000:
        f = fixed[0]
        line("hot p99 < 1 ms at 10,000 requests/s",
             f"p99 {f['p99_us'] / 1000:.2f} ms at {f['rps']:,.0f} req/s", f["p99_us"] < 1000)
    else:
        line("hot p99 < 1 ms at 10,000 requests/s", "no fixed-rate run at 10,000 req/s (see BENCH_RATE)", None)
    hot_rows = [r for r in RESULTS if r["target"] == "knoxgate hot" and "kg_sql_per_req" in r]
    if hot_rows:
        worst = max(r["kg_sql_per_req"] for r in hot_rows)
        line("0 SQL statements per hot hit (notify)", f"{worst:.3f} per request", worst == 0)
    redis_rows = [r for r in RESULTS if r["target"] == "knoxgate Redis tier"]
    if redis_rows:
        worst = max(r["redis_per_req"] for r in redis_rows)
        line("≤ 1 Redis round trip per Redis-tier hit", f"{worst:.3f} commands per request", worst <= 1)
    default = [r for r in rss100k if not r["env"]]
    if default:
        r = default[0]
        line("RSS < 64 MiB with 100,000 cached tokens",
             f"{r['rss_mib']} MiB with {(r['entries'] or 0):,.0f} entries",
             r["rss_mib"] is not None and r["rss_mib"] < 64 and (r["entries"] or 0) >= 100_000)
    else:
        line("RSS < 64 MiB with 100,000 cached tokens", "–", None)
    return out


def report(rss100k, info):
    lines = []
    lines.append("# knoxgate benchmark results\n")
    lines.append(f"Measured {info['date']} by `bench/run.sh` "
                 f"(BENCH_DURATION={DURATION}s per run, wrk -t{THREADS} -c{CONNS} for saturation, "
                 f"-c{RATE_CONNS} paced for fixed rate). Raw data: `bench/out/results.json`, wrk "
                 f"logs in `bench/out/logs/`.\n")
    lines.append("**Caveat:** one shared, noisy 2-core machine runs the load generator, the server "
                 "under test, Postgres and Redis at once; figures are indicative and vary run to "
                 "run by ±10–20 %. Saturation numbers are what *this* box does with wrk competing "
                 "for the same cores, not a capacity claim.\n")
    lines.append("## Environment\n")
    for k in ("machine", "knoxgate", "wrk", "nginx", "postgres", "redis", "python"):
        lines.append(f"- {k}: {info[k]}")
    lines.append("")
    for load in ("saturation", "fixed rate"):
        rows = [r for r in RESULTS if r["load"] == load]
        if not rows:
            continue
        lines.append(f"## {load.capitalize()}\n")
        if load == "fixed rate":
            lines.append("Paced with wrk's `delay()` hook against a per-thread schedule "
                         f"(target = min({RATE} req/s, 50 % of that target's saturation rate)). "
                         "wrk2 is not packaged for this Debian; this pacing is NOT corrected for "
                         "coordinated omission, so tail latencies are optimistic compared to wrk2.\n")
        lines.append("| target | tokens | req/s | target rate | p50 ms | p90 ms | p99 ms | p99.9 ms | "
                     "socket errors | non-2xx | SQL stmts/req (knoxgate metric) | PG xacts/req | "
                     "Redis cmds/req | RSS MiB |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            non2xx = f"{r['non2xx3xx']}"
            if r["expect"] == "401":
                non2xx += f" (401s expected: {r['requests']})"
            sql = f"{r['kg_sql_per_req']:.3f}" if "kg_sql_per_req" in r else "–"
            tgt = r["target"] + (f" <br><sub>{r['note']}</sub>" if r.get("note") else "")
            lines.append(
                f"| {tgt} | {r['tokens']} | {r['rps']:,.0f} | "
                f"{r['rate_target'] if r['rate_target'] else '–'} | {fmt_ms(r['p50_us'])} | "
                f"{fmt_ms(r['p90_us'])} | {fmt_ms(r['p99_us'])} | {fmt_ms(r['p999_us'])} | "
                f"{r['errors']} | {non2xx} | {sql} | {r['pg_xact_per_req']:.3f} | "
                f"{r['redis_per_req']:.3f} | {r.get('rss_mib', '–')} |")
        lines.append("")
    sat = {r["target"]: r for r in RESULTS if r["load"] == "saturation"}

    def ratio(a, b):
        if a in sat and b in sat and sat[b]["rps"]:
            return f"{sat[a]['rps'] / sat[b]['rps']:.2f}× ({sat[a]['rps']:,.0f} / {sat[b]['rps']:,.0f} req/s)"
        return "not measured"
    lines.append("## Ratios (saturation throughput)\n")
    lines.append(f"- knoxgate hot / Django knox-redis: {ratio('knoxgate hot', 'Django knox-redis (gunicorn)')}")
    lines.append(f"- knoxgate hot / Django knox: {ratio('knoxgate hot', 'Django knox (gunicorn)')}")
    lines.append(f"- knoxgate hot / nginx floor: {ratio('knoxgate hot', 'nginx return 200 (floor)')}")
    lines.append(f"- knoxgate Redis tier / nginx floor: {ratio('knoxgate Redis tier', 'nginx return 200 (floor)')}")
    lines.append(f"- knoxgate cache disabled / Django knox: {ratio('knoxgate cache disabled', 'Django knox (gunicorn)')}")
    lines.append("")
    medians = {}
    if RATIO_ROUNDS:
        lines.append(f"## Floor ratios over {len(RATIO_ROUNDS)} interleaved rounds\n")
        lines.append("The machine's speed drifts within minutes, so the floor, hot tokens and the Redis "
                     "tier are also measured back to back in each round (saturation, "
                     f"{DURATION}s each, same wrk settings and hot set); ratios are per round, then the "
                     "median over rounds.\n")
        lines.append("| round | floor req/s | hot req/s | Redis tier req/s | hot / floor | Redis tier / floor |")
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for r in RATIO_ROUNDS:
            lines.append(f"| {r['round']} | {r['floor']:,.0f} | {r['hot']:,.0f} | {r['redis']:,.0f} | "
                         f"{r['hot'] / r['floor']:.2f} | {r['redis'] / r['floor']:.2f} |")
        medians["hot"] = statistics.median(r["hot"] / r["floor"] for r in RATIO_ROUNDS)
        medians["redis"] = statistics.median(r["redis"] / r["floor"] for r in RATIO_ROUNDS)
        lines.append(f"| **median** | | | | **{medians['hot']:.2f}** | **{medians['redis']:.2f}** |")
        lines.append("")
    lines.append("## Targets\n")
    lines.extend(target_verdicts(sat, medians, rss100k))
    lines.append("")
    lines.append("## knoxgate memory\n")
    for r in RESULTS:
        if r["target"].startswith("knoxgate") and r["load"] == "saturation":
            lines.append(f"- {r['target']}: RSS {r.get('rss_mib')} MiB after the saturation run "
                         f"(peak {r.get('hwm_mib')} MiB, idle after start {r.get('idle_rss_mib')} MiB, "
                         f"in-process entries {r.get('memory_entries')})")
    for rss in rss100k:
        ok = rss["rss_mib"] is not None and rss["rss_mib"] < 64
        envdesc = ", ".join(f"{k}={v}" for k, v in rss["env"].items()) or "default config"
        lines.append(f"- **{rss['tokens']:,} tokens warmed** ({envdesc}) through /verify (seq pass, "
                     f"{rss['requests']:,} requests in {rss['duration']}s, wraps "
                     f"{rss['wraps']}, errors {rss['errors']}, non-2xx {rss['non2xx']}): "
                     f"in-process cache entries **{(rss['entries'] or 0):.0f}**, RSS **{rss['rss_mib']} MiB** "
                     f"(peak {rss['hwm_mib']} MiB; idle {rss['idle_rss_mib']} MiB) — target "
                     f"< 64 MiB: **{'met' if ok else 'NOT met'}**"
                     + ("" if rss["covered"] else " (the pass did NOT cover every token)")
                     + (f"; RSS growth ≈ {(rss['rss_mib'] - rss['idle_rss_mib']) * 1024 / rss['entries']:.2f} KiB per cached entry"
                        if rss["entries"] and rss["rss_mib"] and rss["idle_rss_mib"] else "")
                     + (f"; the byte bound admitted {rss['entries']:.0f} entries ⇒ knoxgate's own weight estimate ≈ "
                        f"{int(rss['env']['KNOXGATE_CACHE_MEMORY_MAX_BYTES']) / rss['entries']:.0f} B/entry"
                        if "KNOXGATE_CACHE_MEMORY_MAX_BYTES" in rss["env"] and rss["entries"] else ""))
    if not rss100k:
        lines.append("- RSS with 100k cached tokens: not measured (see failures)")
    lines.append("")
    lines.append("## How each target was run\n")
    lines.append(f"- **knoxgate hot**: default config (consistency notify, in-process tier + Redis); "
                 f"hot set of {HOT_SET} tokens warmed by a {WARMUP}s sequential pass, then random tokens "
                 "from that set: in-process hits.")
    lines.append("- **knoxgate Redis tier**: `KNOXGATE_CACHE_MEMORY_MAX_ENTRIES=1`, "
                 "`KNOXGATE_CACHE_MEMORY_MAX_BYTES=1` (in-process tier holds nothing), Redis on, notify; "
                 "same hot set, warmed first, so every request is a Redis hit.")
    lines.append("- **knoxgate cache disabled**: `KNOXGATE_REDIS_URL=\"\"`, memory 1/1, consistency strict: "
                 f"every request is one Postgres lookup (knox-equivalent path); random over all "
                 f"{MAIN_USERS * TOKENS_PER_USER} main tokens.")
    lines.append(f"- **knoxgate cold**: a fresh instance and an empty Redis for each run, tokens walked "
                 f"sequentially through the {MAIN_USERS * TOKENS_PER_USER + EXTRA_USERS * TOKENS_PER_USER} "
                 f"token file so each is seen once (first sight: Postgres lookup + cache fill); "
                 f"{COLD_DURATION}s runs.")
    lines.append("- **knoxgate invalid flood**: default config, a fresh random unknown 64-hex token per "
                 "request (`bench/invalid.lua`); every answer is expected to be 401.")
    lines.append("- **Django knox / knox-redis**: the interop project `tests/interop/djproject` "
                 "(`/api/protected/`: TokenAuthentication + IsAuthenticated) under gunicorn, via "
                 "`bench/django/bench_settings.py` which only sets CONN_MAX_AGE=600 (persistent DB "
                 "connections, as in production; the interop suite uses 0). The better of two "
                 f"gunicorn settings ({', '.join(GUNICORN_SETTINGS)}) by a {DJANGO_PICK_DURATION}s run is "
                 f"used. knox-redis: same hot set as knoxgate, warmed first.")
    lines.append("- **nginx floor**: `return 200;` with worker_processes 2 on loopback, same wrk script "
                 "and headers as knoxgate hot.")
    lines.append("- **Counters**: *SQL stmts/req* = delta of knoxgate's own `sql_statements_total` "
                 "(pg_stat_statements is available but not in `shared_preload_libraries`, and the shared "
                 "Postgres was not restarted). *PG xacts/req* = delta of `xact_commit + xact_rollback` "
                 f"in `pg_stat_database` for `{DB}` (autocommit, so ≈ statements; includes "
                 "connection-setup statements and anything else touching that DB; read after a "
                 f"{PG_SETTLE}s settle because PG15 backends publish idle stats up to 10 s late, so "
                 "it is approximate). *Redis cmds/req* = "
                 "`INFO commandstats` calls after `CONFIG RESETSTAT` on a private redis-server "
                 f"(port {REDIS_PORT}) started by the bench, excluding INFO/CONFIG. RSS = VmRSS after "
                 "the run (process tree for nginx/gunicorn).")
    lines.append("")
    lines.append("## Per-request breakdown (counts / requests)\n")
    lines.append("| target | load | knoxgate lookups & statements | Redis commands (commandstats) |")
    lines.append("|---|---|---|---|")
    for r in RESULTS:
        n = max(r["requests"], 1)
        kg = ", ".join(f"{k} {v / n:.3f}" for k, v in sorted((r.get("kg_detail") or {}).items())) or "–"
        rd = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["redis_detail"].items()) if v) or "–"
        lines.append(f"| {r['target']} | {r['load']} | {kg} | {rd} |")
    lines.append("")
    if NOTES:
        lines.append("## Notes\n")
        lines.extend(f"- {n}" for n in NOTES)
        lines.append("")
    lines.append("## Failures / not measured\n")
    if FAILURES:
        lines.extend(f"- {f}" for f in FAILURES)
    else:
        lines.append("- none")
    lines.append("")
    lines.append("![chart](chart.png)\n")
    (OUT / "results.md").write_text("\n".join(lines))


def chart():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        FAILURES.append(f"chart: matplotlib not importable ({e})")
        return False
    sat = [r for r in RESULTS if r["load"] == "saturation"]
    fixed = {r["target"]: r for r in RESULTS if r["load"] == "fixed rate"}
    if not sat:
        return False
    names = [r["target"] for r in sat]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.6 * len(names) + 2))
    y = range(len(names))
    axes[0].barh(list(y), [r["rps"] for r in sat], color="#4c72b0")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("requests/s at saturation (log)")
    for i, r in enumerate(sat):
        axes[0].text(r["rps"], i, f" {r['rps']:,.0f}", va="center", fontsize=8)
    axes[0].set_yticks(list(y))
    axes[0].set_yticklabels(names)
    axes[0].invert_yaxis()
    h = 0.4
    axes[1].barh([i - h / 2 for i in y], [r["p99_us"] / 1000 for r in sat], h, label="saturation",
                 color="#dd8452")
    axes[1].barh([i + h / 2 for i in y], [fixed[n]["p99_us"] / 1000 if n in fixed else 0 for n in names],
                 h, label="fixed rate (rate shown)", color="#55a868")
    for i, r in enumerate(sat):
        axes[1].text(r["p99_us"] / 1000, i - h / 2, f" {r['p99_us'] / 1000:.1f}", va="center", fontsize=7)
        if r["target"] in fixed:
            f = fixed[r["target"]]
            axes[1].text(f["p99_us"] / 1000, i + h / 2,
                         f" {f['p99_us'] / 1000:.1f} @ {f['rps']:,.0f}/s", va="center", fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("p99 latency, ms (log)")
    axes[1].set_yticks(list(y))
    axes[1].set_yticklabels([])
    axes[1].invert_yaxis()
    axes[1].legend()
    fig.suptitle(f"knoxgate bench, {datetime.now(timezone.utc).strftime('%Y-%m-%d')}, 2 shared cores "
                 f"(wrk -t{THREADS} -c{CONNS}, {DURATION}s)")
    fig.tight_layout()
    fig.savefig(OUT / "chart.png", dpi=110)
    return True


def step(name, fn, *args):
    if ONLY and name != "chart" and not any(name.lower().startswith(n) for n in ONLY):
        return None
    if over_budget():
        FAILURES.append(f"{name}: skipped, time budget BENCH_BUDGET={BUDGET}s exhausted")
        log(f"SKIP {name} (budget)")
        return None
    log(f"== {name}")
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        FAILURES.append(f"{name}: {type(e).__name__}: {e}")
        log(f"FAILED {name}: {e}")
        traceback.print_exc()
        return None


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    for f in LOGS.glob("*"):
        if f.is_file():
            f.unlink()
    start_redis()
    setup_db()
    hot_env = {"BENCH_TOKENS": str(TOKENS)}
    step("nginx floor", target_nginx)
    step("knoxgate hot", kg_target, "hot", {}, "knoxgate hot", "verify.lua", TOKENS, HOT_SET, True,
         f"hot set {HOT_SET}, random")
    step("knoxgate Redis tier", kg_target, "redis",
         {"KNOXGATE_CACHE_MEMORY_MAX_ENTRIES": "1", "KNOXGATE_CACHE_MEMORY_MAX_BYTES": "1"},
         "knoxgate Redis tier", "verify.lua", TOKENS, HOT_SET, True, f"hot set {HOT_SET}, random")
    step("knoxgate cache disabled", kg_target, "nocache",
         {"KNOXGATE_REDIS_URL": "", "KNOXGATE_CACHE_MEMORY_MAX_ENTRIES": "1",
          "KNOXGATE_CACHE_MEMORY_MAX_BYTES": "1", "KNOXGATE_CACHE_CONSISTENCY": "strict"},
         "knoxgate cache disabled", "verify.lua", TOKENS, 0, False,
         f"{MAIN_USERS * TOKENS_PER_USER} tokens, random")
    step("knoxgate invalid flood", kg_target, "invalid", {}, "knoxgate invalid flood", "invalid.lua",
         TOKENS, 0, False, "random unknown token per request", "401")
    step("Django knox-redis", target_django, True)
    step("Django knox", target_django, False)
    step("knoxgate cold", target_cold)
    step("floor ratios, interleaved rounds", target_ratio_rounds)
    rss100k = []
    r = step("knoxgate RSS with 100k cached tokens", target_rss100k)
    if r:
        rss100k.append(r)
    if os.environ.get("BENCH_RSS_DIAG", "1") == "1":
        # diagnostic: same, with glibc malloc limited to 2 arenas (environment only)
        r = step("knoxgate RSS with 100k cached tokens, MALLOC_ARENA_MAX=2", target_rss100k,
                 "arena2", {"MALLOC_ARENA_MAX": "2"})
        if r:
            rss100k.append(r)
        # diagnostic: half the default byte bound, to see how many entries knoxgate's own
        # weight estimate admits per MiB (entries × estimated weight ≈ 32 MiB when it evicts)
        r = step("knoxgate RSS with 100k tokens offered, memory_max_bytes=32MiB", target_rss100k,
                 "bytes32m", {"KNOXGATE_CACHE_MEMORY_MAX_BYTES": str(32 * 1024 * 1024)})
        if r:
            rss100k.append(r)
    del hot_env
    info = versions()
    report(rss100k, info)
    ok = step("chart", chart)
    if ok is None:
        report(rss100k, info)  # record a chart failure in the report
    save_raw()
    if not ONLY:
        shutil.copyfile(OUT / "results.md", BENCH / "RESULTS.md")
        if (OUT / "chart.png").exists():
            shutil.copyfile(OUT / "chart.png", BENCH / "chart.png")
    log(f"done in {time.monotonic() - T0:.0f}s: {OUT / 'results.md'}")
    return 1 if FAILURES else 0


def _on_term(signum, frame):
    raise SystemExit(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_term)
    code = 1
    try:
        code = main()
    finally:
        stop_all()
    sys.exit(code)
