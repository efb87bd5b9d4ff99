#!/usr/bin/env python3
"""knoxgate memory soak (run through bench/soak.sh). Stdlib only; reuses bench/knoxbench's helpers.

A fresh database (SOAK_DB, default knoxgate_bench_soak; DROPPED first and at the end), `knoxgate
migrate`, 10k seeded knox tokens (SQL, knoxbench.seed), a private redis-server, knoxgate with its
default configuration, then one paced wrk run of SOAK_WARMUP + SOAK_SECONDS seconds at SOAK_RATE
req/s: each request is a random valid seeded token (100 - SOAK_UNKNOWN_PCT %) or a fresh random
unknown 64-hex token (SOAK_UNKNOWN_PCT %). In the background, every SOAK_CHURN_EVERY seconds one
seeded token is DELETEd by SQL and a new one INSERTed (so the change feed and eviction run); 2 s
after each delete the deleted token is checked to be refused by /verify. knoxgate's RSS and
`knoxgate_memory_cache_entries` are sampled every SOAK_SAMPLE seconds.

Output: bench/out/soak.md, bench/out/soak-rss.csv, scratch + logs in bench/out/soak/.
"""

import hashlib
import json
import os
import random
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def env_int(name, default):
    return int(os.environ.get(name, str(default)))


SOAK_SECONDS = env_int("SOAK_SECONDS", 600)
SOAK_WARMUP = env_int("SOAK_WARMUP", 30)
SOAK_RATE = env_int("SOAK_RATE", 3000)
SOAK_CONNS = env_int("SOAK_CONNECTIONS", 32)
SOAK_UNKNOWN_PCT = env_int("SOAK_UNKNOWN_PCT", 15)
SOAK_SAMPLE = env_int("SOAK_SAMPLE", 10)
SOAK_CHURN_EVERY = float(os.environ.get("SOAK_CHURN_EVERY", "5"))
KEEP_DB = os.environ.get("SOAK_KEEP_DB", "0") == "1"
FINAL = Path(os.environ.get("SOAK_FINAL_DIR", HERE / "out"))
TAG = ("-" + os.environ["SOAK_TAG"]) if os.environ.get("SOAK_TAG") else ""   # output name suffix
MD, CSV = f"soak{TAG}.md", f"soak-rss{TAG}.csv"

# knoxbench.config reads the configuration from the environment at import time: point it at our
# own database, ports and scratch directory so we never collide with a concurrent bench/run.sh.
# (Skipped when it is already imported: bench/login.py imports this module for its helpers.)
if "knoxbench.config" not in sys.modules:
    os.environ["BENCH_DB"] = os.environ.get("SOAK_DB", "knoxgate_bench_soak")
    os.environ["BENCH_REDIS_PORT"] = os.environ.get("SOAK_REDIS_PORT", "16392")
    os.environ["BENCH_KNOXGATE_PORT"] = os.environ.get("SOAK_KNOXGATE_PORT", "18581")
    os.environ["BENCH_KNOXGATE_ADMIN_PORT"] = os.environ.get("SOAK_KNOXGATE_ADMIN_PORT", "18591")
    os.environ["BENCH_OUT"] = str(FINAL / f"soak{TAG}")
    os.environ["BENCH_USERS"] = "2500"
    os.environ["BENCH_TOKENS_PER_USER"] = "4"
    os.environ["BENCH_EXTRA_USERS"] = "0"
sys.path.insert(0, str(HERE))
from knoxbench import config as cfg  # noqa: E402
from knoxbench import counters, procs, seed, servers  # noqa: E402

log = cfg.log


# ---------------------------------------------------------------- shared bits (login.py imports)

def parse_metrics(admin):
    """Prometheus text -> {(name, ((label, value), ...)): float}."""
    _, body = procs.http_get(f"http://{admin}/metrics", timeout=5)
    out = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?)(\{[^}]*\})?\s+(\S+)$", line)
        if not m:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def msum(ms, name, **match):
    return sum(v for (n, lab), v in ms.items()
               if n == name and all(dict(lab).get(k) == w for k, w in match.items()))


def hist_quantile(before, after, name, q):
    """Quantile upper bound from the delta of a Prometheus histogram's buckets."""
    buckets = []
    for (n, lab), v in after.items():
        if n == name + "_bucket":
            le = dict(lab)["le"]
            buckets.append((float("inf") if le == "+Inf" else float(le), v - before.get((n, lab), 0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    for le, c in buckets:
        if c >= q * total:
            return le
    return None


def cpu_seconds(pid):
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return None


def wrk_start(name, url, script, duration, conns, rate, extra_env):
    """wrk in its own session, registered in procs.PROCS so stop_all() kills it."""
    env = dict(os.environ, BENCH_RATE=str(rate), BENCH_THREADS=str(cfg.THREADS), **extra_env)
    cmd = ["wrk", f"-t{cfg.THREADS}", f"-c{conns}", f"-d{duration}s", "--timeout", "5s", "--latency",
           "-s", str(script), url]
    cfg.LOGS.mkdir(parents=True, exist_ok=True)
    outf = cfg.LOGS / f"wrk-{name}.txt"
    fh = open(outf, "w")
    fh.write(" ".join(cmd) + "\n" + json.dumps(extra_env) + "\n\n")
    fh.flush()
    p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    procs.PROCS.append((f"wrk-{name}", p))
    return p, outf


def wrk_finish(p, outf, timeout):
    p.wait(timeout)
    text = outf.read_text()
    if p.returncode != 0:
        raise RuntimeError(f"wrk exited {p.returncode}: {text[-800:]}")
    m = re.search(r"^BENCH_JSON (.*)$", text, re.M)
    if not m:
        raise RuntimeError(f"wrk: no BENCH_JSON line: {text[-800:]}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    m = re.search(r"^STATUS_JSON (.*)$", text, re.M)
    if m:
        r["status"] = json.loads(m.group(1))
    return r


def preflight():
    """Refuse to run over another run: our ports must be free and our database unused."""
    for port in (cfg.KG_PORT, cfg.KG_ADMIN_PORT, cfg.REDIS_PORT):
        with socket.socket() as sk:
            if sk.connect_ex(("127.0.0.1", port)) == 0:
                raise RuntimeError(f"127.0.0.1:{port} is already in use: another run? (pick other ports)")
    busy = procs.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{cfg.DB}'", db="postgres")
    if busy != "0":
        raise RuntimeError(f"database {cfg.DB} has {busy} open connections: another run using it? "
                           "(pick another SOAK_DB / LOGIN_DB and ports)")


def setup_db_knoxgate_only(users=2500, tokens_per_user=4):
    """Fresh DB, `knoxgate migrate` (no Django needed), knoxbench.seed's seeding, tokens.txt."""
    log(f"fresh database {cfg.DB}")
    cfg.OUT.mkdir(parents=True, exist_ok=True)
    cfg.LOGS.mkdir(parents=True, exist_ok=True)
    procs.psql(f"DROP DATABASE IF EXISTS {cfg.DB} WITH (FORCE)", db="postgres")
    procs.psql(f"CREATE DATABASE {cfg.DB}", db="postgres")
    CREATED_DB.append(cfg.DB)
    p = procs.run([str(cfg.KNOXGATE), "migrate"], env=servers.kg_env(), timeout=120)
    (cfg.LOGS / "knoxgate-migrate.log").write_text(p.stdout + p.stderr)
    t = time.monotonic()
    seed.seed_tokens(users, 0, tokens_per_user, cfg.TOKENS)
    n = sum(1 for _ in cfg.TOKENS.open())
    rows = procs.psql("SELECT count(*) FROM knox_authtoken")
    log(f"seeded {rows} tokens over {users} users in {time.monotonic() - t:.1f}s ({n} in tokens.txt)")
    assert n == users * tokens_per_user, n
    return n


CREATED_DB = []   # drop_db() only drops a database this process created


def drop_db():
    if cfg.DB not in CREATED_DB:
        return
    try:
        procs.psql(f"DROP DATABASE IF EXISTS {cfg.DB} WITH (FORCE)", db="postgres")
        log(f"dropped database {cfg.DB}")
    except Exception as e:  # noqa: BLE001
        log(f"could not drop {cfg.DB}: {e}")


def concurrent_activity():
    """Other benchmark-ish processes running right now (for the report)."""
    ours = {p.pid for _, p in procs.PROCS} | {os.getpid(), os.getppid()}
    checks = {"bench.py (bench/run.sh)": ["-f", r"python.*bench\.py"],
              "bench/login.py": ["-f", r"python.*login\.py"],
              "cargo": ["-x", "cargo"], "rustc": ["-x", "rustc"],
              "another wrk": ["-x", "wrk"], "another knoxgate": ["-f", r"release/knoxgate( |$)"]}
    found = []
    for label, args in checks.items():
        p = subprocess.run(["pgrep", *args], capture_output=True, text=True)
        pids = {int(x) for x in p.stdout.split()} - ours
        if pids:
            found.append(label)
    return found


def machine():
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ver = subprocess.run([str(cfg.KNOXGATE), "--version"], capture_output=True, text=True).stdout.strip()
    git = subprocess.run(["git", "-C", str(cfg.REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    return (f"{os.cpu_count()} CPUs ({cpu}), "
            f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1)} GiB RAM; "
            f"{ver} (git {git}, release build)")


# ---------------------------------------------------------------- soak

MIX_LUA = r"""
-- generated by bench/soak.py: random valid token (file) or a fresh random unknown 64-hex token
local C = dofile("@BENCH@/common.lua")
local header = "Authorization"
local unknown_pct = tonumber(os.getenv("SOAK_UNKNOWN_PCT") or "15") or 15
issued, wraps, ntokens = 0, 0, 0
s200, s401, sother, nunknown = 0, 0, 0, 0
local tokens, n
local mine = {}

function setup(thread)
  C.setup(thread)
  table.insert(mine, thread)
end

function init(args)
  tokens = C.load_tokens()
  n = #tokens
  ntokens = n
  math.randomseed(os.time() + (tid or 0) * 7919)
  C.init_pacing(tonumber(os.getenv("BENCH_THREADS") or "2") or 2)
end

function request()
  local t
  issued = issued + 1
  if math.random(100) <= unknown_pct then
    local parts = {}
    for i = 1, 8 do parts[i] = string.format("%08x", math.random(0, 0x7fffffff) * 2 + math.random(0, 1)) end
    t = table.concat(parts)
    nunknown = nunknown + 1
  else
    t = tokens[math.random(n)]
  end
  return wrk.format("GET", C.path, { [header] = "Token " .. t })
end

function response(status, headers, body)
  if status == 200 then s200 = s200 + 1
  elseif status == 401 then s401 = s401 + 1
  else sother = sother + 1 end
end

if C.rate > 0 then delay = C.delay end

function done(summary, latency, requests)
  C.done(summary, latency, requests)
  local a, b, c, u = 0, 0, 0, 0
  for _, t in ipairs(mine) do
    a = a + (tonumber(t:get("s200")) or 0)
    b = b + (tonumber(t:get("s401")) or 0)
    c = c + (tonumber(t:get("sother")) or 0)
    u = u + (tonumber(t:get("nunknown")) or 0)
  end
  io.write(string.format('STATUS_JSON {"s200":%d,"s401":%d,"other":%d,"unknown_sent":%d}\n', a, b, c, u))
end
"""


class Churn(threading.Thread):
    """Every SOAK_CHURN_EVERY s: DELETE one seeded token, INSERT a new one; check the deleted one."""

    def __init__(self, tokens, url):
        super().__init__(daemon=True)
        self.tokens = list(tokens)
        random.shuffle(self.tokens)
        self.url = url
        self.stop_ev = threading.Event()
        self.deleted = self.inserted = self.failures = 0
        self.checks_ok = self.checks_stale = 0
        self.notes = []
        self.pending = []   # (check_at, token)

    def run(self):
        while not self.stop_ev.wait(SOAK_CHURN_EVERY):
            try:
                tok = self.tokens.pop()
                digest = hashlib.sha512(tok.encode()).hexdigest()
                new = secrets.token_hex(32)
                nd = hashlib.sha512(new.encode()).hexdigest()
                out = procs.psql(
                    f"WITH d AS (DELETE FROM knox_authtoken WHERE digest = '{digest}' RETURNING 1), "
                    f"i AS (INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) "
                    f"SELECT '{nd}', now(), id, now() + interval '10 hours', '{new[:15]}' "
                    f"FROM auth_user WHERE username = 'bench_{random.randint(1, 2500)}' RETURNING 1) "
                    f"SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM i)", timeout=30)
                d, i = (int(x) for x in out.split("|"))
                self.deleted += d
                self.inserted += i
                self.pending.append((time.monotonic() + 2, tok))
            except Exception as e:  # noqa: BLE001
                self.failures += 1
                if len(self.notes) < 5:
                    self.notes.append(str(e)[:300])
            now = time.monotonic()
            while self.pending and self.pending[0][0] <= now:
                _, tok = self.pending.pop(0)
                self.check(tok)
        for _, tok in self.pending:
            self.check(tok)

    def check(self, tok):
        try:
            status, _ = procs.http_get(self.url + "/verify", {"Authorization": f"Token {tok}"})
        except Exception:  # noqa: BLE001
            status = None
        if status == 401:
            self.checks_ok += 1
        else:
            self.checks_stale += 1
            if len(self.notes) < 5:
                self.notes.append(f"deleted token still answered {status} ~2-5 s after DELETE")


def lsq_slope(xs, ys):
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def main():
    t_start = datetime.now(timezone.utc)
    FINAL.mkdir(parents=True, exist_ok=True)
    before = concurrent_activity()
    log(f"soak: {SOAK_WARMUP}s warm-up + {SOAK_SECONDS}s at {SOAK_RATE} req/s "
        f"({100 - SOAK_UNKNOWN_PCT}% valid / {SOAK_UNKNOWN_PCT}% unknown); concurrent: {before or 'none'}")
    preflight()
    servers.start_redis()
    ntok = setup_db_knoxgate_only()
    kg = servers.Knoxgate("soak", {})
    pid = kg.p.pid
    log(f"knoxgate pid {pid}, idle RSS {kg.idle_rss} MiB")
    script = cfg.OUT / "soak-mix.lua"
    script.write_text(MIX_LUA.replace("@BENCH@", str(HERE)))
    total = SOAK_WARMUP + SOAK_SECONDS
    m0 = parse_metrics(kg.admin)
    wp, wout = wrk_start("soak", kg.url, script, total, SOAK_CONNS, SOAK_RATE,
                         {"BENCH_TOKENS": str(cfg.TOKENS), "BENCH_TOKENS_LIMIT": "0",
                          "SOAK_UNKNOWN_PCT": str(SOAK_UNKNOWN_PCT)})
    t0 = time.monotonic()
    churn = Churn([line.strip() for line in cfg.TOKENS.open() if line.strip()][1:], kg.url)
    churn.start()
    samples = []
    seen_concurrent = set(before)
    cpu_prev, t_prev = cpu_seconds(pid), t0
    k = 0
    while True:
        now = time.monotonic() - t0
        ms = parse_metrics(kg.admin)
        cpu = cpu_seconds(pid)
        tt = time.monotonic()
        cpu_pct = (cpu - cpu_prev) / (tt - t_prev) * 100 if k and cpu is not None else None
        cpu_prev, t_prev = cpu, tt
        hwm = counters.proc_status_kib(pid, "VmHWM")
        rinfo = procs.redis_cli("INFO", "memory")
        rmem = re.search(r"used_memory:(\d+)", rinfo)
        s = dict(t=round(now, 1), rss_mib=counters.rss_mib(pid), hwm_mib=round(hwm / 1024, 1) if hwm else None,
                 memory_cache_entries=msum(ms, "knoxgate_memory_cache_entries"),
                 verify_total=msum(ms, "knoxgate_verify_total"),
                 redis_used_mib=round(int(rmem.group(1)) / 2**20, 2) if rmem else None,
                 knoxgate_cpu_pct=round(cpu_pct, 1) if cpu_pct is not None else None,
                 loadavg1=float(Path("/proc/loadavg").read_text().split()[0]),
                 churn_deleted=churn.deleted)
        samples.append(s)
        with open(cfg.OUT / "samples-partial.csv", "a" if k else "w") as pf:   # survives a kill
            if not k:
                pf.write(",".join(s.keys()) + "\n")
            pf.write(",".join("" if v is None else str(v) for v in s.values()) + "\n")
        if k % 6 == 0:
            seen_concurrent |= set(concurrent_activity())
            log(f"  t={s['t']:.0f}s RSS {s['rss_mib']} MiB entries {s['memory_cache_entries']:.0f} "
                f"verify_total {s['verify_total']:.0f} cpu {s['knoxgate_cpu_pct']}% load {s['loadavg1']}")
        if wp.poll() is not None:
            break
        k += 1
        time.sleep(max(0.0, t0 + k * SOAK_SAMPLE - time.monotonic()))
        if kg.p.poll() is not None:
            raise RuntimeError(f"knoxgate exited with {kg.p.returncode} during the soak")
    churn.stop_ev.set()
    r = wrk_finish(wp, wout, 60)
    churn.join(30)
    m1 = parse_metrics(kg.admin)
    final = dict(rss_mib=counters.rss_mib(pid), hwm_mib=round(counters.proc_status_kib(pid, "VmHWM") / 1024, 1))
    kg.stop()

    with open(FINAL / CSV, "w") as f:
        cols = list(samples[0].keys())
        f.write(",".join(cols) + "\n")
        for s in samples:
            f.write(",".join("" if s[c] is None else str(s[c]) for c in cols) + "\n")

    post = [s for s in samples if s["t"] >= SOAK_WARMUP - 0.5 and s["rss_mib"] is not None]
    xs = [s["t"] for s in post]
    ys = [s["rss_mib"] for s in post]
    slope = lsq_slope(xs, ys)
    half = [s for s in post if s["t"] >= SOAK_WARMUP + SOAK_SECONDS / 2]
    slope2 = lsq_slope([s["t"] for s in half], [s["rss_mib"] for s in half])
    ent = [s["memory_cache_entries"] for s in post]
    vd = {}
    for (n, lab), v in m1.items():
        if n == "knoxgate_verify_total":
            d = v - m0.get((n, lab), 0)
            if d:
                vd[",".join(f"{a}={b}" for a, b in lab)] = int(d)
    fe = {",".join(f"{a}={b}" for a, b in lab): int(v - m0.get((n, lab), 0))
          for (n, lab), v in m1.items() if n == "knoxgate_feed_events_total" and v - m0.get((n, lab), 0)}
    lookups = {",".join(f"{a}={b}" for a, b in lab): int(v - m0.get((n, lab), 0))
               for (n, lab), v in m1.items() if n == "knoxgate_cache_lookups_total" and v - m0.get((n, lab), 0)}
    sp99 = hist_quantile(m0, m1, "knoxgate_verify_duration_seconds", 0.99)
    st = r.get("status") or {"s200": None, "s401": None, "other": None, "unknown_sent": None}
    res = dict(date=t_start.strftime("%Y-%m-%d %H:%M UTC"), machine=machine(), seconds=SOAK_SECONDS,
               warmup=SOAK_WARMUP, rate=SOAK_RATE, conns=SOAK_CONNS, unknown_pct=SOAK_UNKNOWN_PCT,
               tokens=ntok, wrk=r, idle_rss=kg.idle_rss,
               rss_start=post[0]["rss_mib"] if post else None, rss_start_t=post[0]["t"] if post else None,
               rss_end=post[-1]["rss_mib"] if post else None, rss_end_t=post[-1]["t"] if post else None,
               rss_max=max(ys) if ys else None, rss_min=min(ys) if ys else None, final=final,
               slope_mib_per_10min=slope * 600 if slope is not None else None,
               slope2_mib_per_10min=slope2 * 600 if slope2 is not None else None,
               entries_start=ent[0] if ent else None, entries_end=ent[-1] if ent else None,
               entries_max=max(ent) if ent else None, verify=vd, feed_events=fe, lookups=lookups,
               server_p99_le=sp99, churn=dict(deleted=churn.deleted, inserted=churn.inserted,
                                              failures=churn.failures, checks_ok=churn.checks_ok,
                                              checks_stale=churn.checks_stale, notes=churn.notes),
               concurrent=sorted(seen_concurrent), samples=len(samples))
    derive(res, samples)
    (cfg.OUT / "soak.json").write_text(json.dumps(res, indent=1))
    report(res, st)
    log(f"soak done: RSS start {res['rss_start']} end {res['rss_end']} max {res['rss_max']} MiB, "
        f"slope {res['slope_mib_per_10min']:.2f} MiB/10min; {FINAL / MD}")
    return 0


def derive(res, samples):
    """Phase after the in-process cache reached its steady size (entries fell between two samples, or
    reached 95 % of memory_max_entries): from then on entries leave as fast as they come, and RSS
    should be flat."""
    post = [s for s in samples if s["t"] >= res["warmup"] - 0.5 and s["rss_mib"] is not None]
    cap = float(os.environ.get("KNOXGATE_CACHE_MEMORY_MAX_ENTRIES", "200000"))
    t_bound = None
    for a, b in zip(post, post[1:]):
        if b["memory_cache_entries"] < a["memory_cache_entries"] or b["memory_cache_entries"] >= 0.95 * cap:
            t_bound = b["t"]
            break
    res["t_bound"] = t_bound
    res["bound"] = None
    if t_bound is not None:
        ph = [s for s in post if s["t"] >= t_bound]
        sl = lsq_slope([s["t"] for s in ph], [s["rss_mib"] for s in ph])
        res["bound"] = dict(n=len(ph), rss_first=ph[0]["rss_mib"], rss_last=ph[-1]["rss_mib"],
                            rss_min=min(s["rss_mib"] for s in ph), rss_max=max(s["rss_mib"] for s in ph),
                            entries_min=min(s["memory_cache_entries"] for s in ph),
                            entries_max=max(s["memory_cache_entries"] for s in ph),
                            slope_mib_per_10min=sl * 600 if sl is not None else None)


def report_only():
    """Rebuild soak.md from bench/out/soak/soak.json and bench/out/soak-rss.csv."""
    res = json.loads((cfg.OUT / "soak.json").read_text())
    lines = (FINAL / CSV).read_text().splitlines()
    cols = lines[0].split(",")
    samples = [{c: (float(v) if v else None) for c, v in zip(cols, line.split(","))} for line in lines[1:]]
    derive(res, samples)
    (cfg.OUT / "soak.json").write_text(json.dumps(res, indent=1))
    report(res, res["wrk"].get("status") or {"s200": None, "s401": None, "other": None, "unknown_sent": None})


def report(res, st):
    r = res["wrk"]
    f = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    n = lambda v: "–" if v is None else f"{v:,}"  # noqa: E731
    L = ["# knoxgate memory soak\n",
         f"Measured {res['date']} by `bench/soak.sh` on {res['machine']}.\n",
         "## Result\n",
         "| metric | value |", "|---|---:|",
         f"| soak length (after {res['warmup']} s warm-up) | {res['seconds']} s |",
         f"| target rate / achieved | {res['rate']} / {r['rps']:,.0f} req/s |",
         f"| requests (whole run incl. warm-up) | {r['requests']:,} |",
         f"| 200 / 401 / other status | {n(st['s200'])} / {n(st['s401'])} / {n(st['other'])} |",
         f"| unknown-token requests sent | {n(st['unknown_sent'])} |",
         f"| socket errors (connect/read/write/timeout) | {r['connect_errors']}/{r['read_errors']}/{r['write_errors']}/{r['timeouts']} |",
         f"| latency p50 / p99 / p99.9 (wrk, paced, not CO-corrected) | {r['p50_us']/1000:.2f} / {r['p99_us']/1000:.2f} / {r['p999_us']/1000:.2f} ms |",
         f"| server-side p99 (verify_duration histogram, bucket upper bound) | ≤ {f(res['server_p99_le'] and res['server_p99_le'] * 1000, 2)} ms |",
         f"| RSS idle (after start, before load) | {f(res['idle_rss'])} MiB |",
         f"| **RSS at start** (t = {f(res['rss_start_t'], 0)} s) | **{f(res['rss_start'])} MiB** |",
         f"| **RSS at end** (t = {f(res['rss_end_t'], 0)} s) | **{f(res['rss_end'])} MiB** |",
         f"| **RSS max** / min over the soak | **{f(res['rss_max'])}** / {f(res['rss_min'])} MiB |",
         f"| VmHWM (peak RSS) at the end | {f(res['final']['hwm_mib'])} MiB |",
         f"| **RSS slope** (least squares, all post-warm-up samples) | **{f(res['slope_mib_per_10min'], 2)} MiB / 10 min** |",
         f"| RSS slope, second half only | {f(res['slope2_mib_per_10min'], 2)} MiB / 10 min |",
         "| in-process cache at its steady size (entries first fell) | "
         + (f"t = {res['t_bound']:.0f} s |" if res.get("t_bound") is not None else "not reached |"),
         *([f"| **after that** ({res['bound']['n']} samples): RSS first / last / min / max | "
            f"{f(res['bound']['rss_first'])} / {f(res['bound']['rss_last'])} / {f(res['bound']['rss_min'])} / "
            f"**{f(res['bound']['rss_max'])}** MiB |",
            f"| **after that**: RSS slope | **{f(res['bound']['slope_mib_per_10min'], 2)} MiB / 10 min** |",
            f"| after that: cache entries min / max | {f(res['bound']['entries_min'], 0)} / {f(res['bound']['entries_max'], 0)} |"]
           if res.get("bound") else []),
         f"| memory_cache_entries start / end / max | {f(res['entries_start'], 0)} / {f(res['entries_end'], 0)} / {f(res['entries_max'], 0)} |",
         f"| churn: tokens DELETEd / INSERTed / SQL failures | {res['churn']['deleted']} / {res['churn']['inserted']} / {res['churn']['failures']} |",
         f"| deleted token refused (401) when re-checked 2–5 s later | {res['churn']['checks_ok']} ok, {res['churn']['checks_stale']} still allowed/other |",
         f"| RSS samples (every {SOAK_SAMPLE} s) | {res['samples']} → `bench/out/{CSV}` |",
         ""]
    L.append("knoxgate `/verify` answers by outcome (metric delta): " +
             ", ".join(f"{k}: {v:,}" for k, v in sorted(res["verify"].items())) + ".\n")
    if res["lookups"]:
        L.append("Cache lookups: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(res["lookups"].items())) + ".\n")
    if res["feed_events"]:
        L.append("Change-feed events applied: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(res["feed_events"].items())) + ".\n")
    if res.get("entries_max") and res["entries_max"] > 1.1 * res["tokens"]:
        L.append(f"**Why entries exceed the {res['tokens']:,} seeded tokens:** each unknown token leaves a "
                 "negative entry (negative_ttl 5 s) in the in-process tier until the once-a-second "
                 "housekeeping purges it, so about 5 s of unknown tokens are cached on top of the "
                 "known ones; the count settles once that many have expired and been purged.\n")
    L.append("## Method\n")
    L.append(f"Fresh database `{cfg.DB}` (`knoxgate migrate`, then bench.py's seeding SQL: "
             f"{res['tokens']:,} knox tokens over 2,500 users), private redis-server on "
             f"127.0.0.1:{cfg.REDIS_PORT}, knoxgate release binary with its default configuration "
             f"(consistency notify, in-process tier + Redis) on 127.0.0.1:{cfg.KG_PORT}. One wrk run "
             f"(-t{cfg.THREADS} -c{res['conns']}, {res['warmup'] + res['seconds']} s) paced at "
             f"{res['rate']} req/s with `bench/common.lua`'s delay() pacing; each request carries a "
             f"random seeded token ({100 - res['unknown_pct']} %) or a fresh random unknown 64-hex "
             f"token ({res['unknown_pct']} %, always 401). Every {SOAK_CHURN_EVERY:g} s a background "
             "thread DELETEs one seeded token and INSERTs a new one by SQL (so the change feed and "
             "eviction run; requests that later pick a deleted token get 401, which is why 401s "
             "slightly exceed the unknown share) and re-checks each deleted token on /verify. "
             f"Every {SOAK_SAMPLE} s: VmRSS of the knoxgate process (/proc, same as `ps -o rss=`), "
             "`knoxgate_memory_cache_entries`, Redis used_memory, knoxgate CPU %, load average. "
             f"'Start' = first sample at t ≥ {res['warmup']} s; slope = least-squares fit of RSS "
             "against time over all samples from then on, scaled to 10 minutes.\n")
    L.append("**Caveat:** one shared 2-core machine runs wrk, knoxgate, Postgres and Redis. "
             + ("Other activity seen during the soak (pgrep): " + ", ".join(res["concurrent"]) + "."
                if res["concurrent"] else "No bench/run.sh, bench.py, cargo or other wrk was seen running during the soak (pgrep every 60 s)."))
    if res["churn"]["notes"]:
        L.append("\nChurn notes: " + "; ".join(res["churn"]["notes"]))
    L.append("")
    (FINAL / MD).write_text("\n".join(L))


if __name__ == "__main__":
    if sys.argv[1:] == ["--report"]:
        report_only()
        sys.exit(0)
    procs.exit_on_term()
    code = 1
    try:
        code = main()
    finally:
        procs.stop_all()
        if not KEEP_DB:
            drop_db()
    sys.exit(code)
