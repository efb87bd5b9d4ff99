#!/usr/bin/env python3
"""knoxgate login cost, and whether logins raise /verify tail latency (run through bench/login.sh).
Stdlib only; reuses bench/knoxbench's and bench/soak.py's helpers.

Fresh database LOGIN_DB (default knoxgate_bench_login; DROPPED first and at the end), `knoxgate
migrate`, 10k seeded knox tokens, LOGIN_CLIENTS users created by `knoxgate user create` with the
default hash cost (pbkdf2_sha256, 1,000,000 iterations unless LOGIN_ITERATIONS is set), a private
redis-server. For each hash_concurrency:hash_nice pair in LOGIN_CONFIGS (default "2:0 2:10 1:0 1:10"):
a fresh knoxgate (login throttling off), its 10k tokens warmed, then
  (a) logins only: LOGIN_CLIENTS clients POST /api/auth/login/ back to back for LOGIN_SECONDS;
  (b) /verify only: wrk paced at LOGIN_VERIFY_RATE req/s (random warmed tokens) for LOGIN_SECONDS;
  (c) the same /verify load with the login clients running the whole time;
  (b2) /verify only again (drift / noise check).
Output: bench/out/login.md, scratch + logs + login.json in bench/out/login/.
"""

import base64
import http.client
import json
import os
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def env_int(name, default):
    return int(os.environ.get(name, str(default)))


SECONDS = env_int("LOGIN_SECONDS", 20)
CLIENTS = env_int("LOGIN_CLIENTS", 4)
VERIFY_RATE = env_int("LOGIN_VERIFY_RATE", 5000)
VERIFY_CONNS = env_int("LOGIN_VERIFY_CONNECTIONS", 32)
# hash_concurrency:hash_nice pairs, one fresh knoxgate each
CONFIGS = [tuple(int(v) for v in x.split(":"))
           for x in os.environ.get("LOGIN_CONFIGS", "2:0 2:10 1:0 1:10").split()]
ITERATIONS = os.environ.get("LOGIN_ITERATIONS", "")   # empty = knoxgate's default (1,000,000)
KEEP_DB = os.environ.get("LOGIN_KEEP_DB", "0") == "1"
FINAL = Path(os.environ.get("LOGIN_FINAL_DIR", HERE / "out"))

os.environ["BENCH_DB"] = os.environ.get("LOGIN_DB", "knoxgate_bench_login")
os.environ["BENCH_REDIS_PORT"] = os.environ.get("LOGIN_REDIS_PORT", "16391")
os.environ["BENCH_KNOXGATE_PORT"] = os.environ.get("LOGIN_KNOXGATE_PORT", "18580")
os.environ["BENCH_KNOXGATE_ADMIN_PORT"] = os.environ.get("LOGIN_KNOXGATE_ADMIN_PORT", "18590")
os.environ["BENCH_OUT"] = str(FINAL / "login")
sys.path.insert(0, str(HERE))
from knoxbench import config as cfg  # noqa: E402
from knoxbench import counters, procs, servers  # noqa: E402
import soak as S  # noqa: E402  (helpers only; its env defaults are skipped: knoxbench.config is loaded)

log = cfg.log
ROWS = []


def kg_extra(hc, nice=10):
    e = {"KNOXGATE_SESSIONS_THROTTLE_FAILURES": "0",
         "KNOXGATE_SESSIONS_HASH_CONCURRENCY": str(hc),
         "KNOXGATE_SESSIONS_HASH_NICE": str(nice)}
    if ITERATIONS:
        e["KNOXGATE_SESSIONS_PASSWORD_ITERATIONS"] = ITERATIONS
    return e


def create_users():
    env = servers.kg_env(kg_extra(2))
    users = []
    t = time.monotonic()
    for i in range(CLIENTS):
        name, pw = f"login_{i}", f"bench-password-{i}"
        procs.run([str(cfg.KNOXGATE), "user", "create", name, "--password-stdin"], env=env,
              input=pw + "\n", timeout=120)
        users.append((name, pw))
    enc = procs.psql("SELECT password FROM auth_user WHERE username = 'login_0'")
    log(f"created {CLIENTS} users in {time.monotonic() - t:.1f}s; hash {enc.split('$')[0]}"
        f"${enc.split('$')[1]}$…")
    return users, enc.split("$")[0] + "$" + enc.split("$")[1]


class LoginClients:
    """CLIENTS threads, each logging its own user in back to back over one keep-alive connection."""

    def __init__(self, users):
        self.users = users
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.samples = []   # (t_done, latency_s, status)
        self.errors = []
        self.threads = []

    def _run(self, name, pw):
        auth = "Basic " + base64.b64encode(f"{name}:{pw}".encode()).decode()
        conn = None
        while not self.stop_ev.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", cfg.KG_PORT, timeout=30)
                t = time.perf_counter()
                conn.request("POST", "/api/auth/login/", headers={"Authorization": auth,
                                                                 "Content-Length": "0"})
                resp = conn.getresponse()
                body = resp.read()
                lat = time.perf_counter() - t
                ok = resp.status == 200 and b'"token"' in body
                with self.lock:
                    self.samples.append((time.monotonic(), lat, resp.status if ok or resp.status != 200 else -1))
                if resp.status != 200 and len(self.errors) < 5:
                    self.errors.append(f"{resp.status}: {body[:200]!r}")
            except Exception as e:  # noqa: BLE001
                with self.lock:
                    if len(self.errors) < 5:
                        self.errors.append(f"{type(e).__name__}: {e}")
                    self.samples.append((time.monotonic(), None, "exception"))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.2)
        if conn is not None:
            conn.close()

    def start(self):
        self.t0 = time.monotonic()
        for name, pw in self.users:
            th = threading.Thread(target=self._run, args=(name, pw), daemon=True)
            th.start()
            self.threads.append(th)

    def stop(self):
        self.stop_ev.set()
        for th in self.threads:
            th.join(60)
        self.t1 = time.monotonic()

    def summary(self, since=None, until=None):
        s = [x for x in self.samples if (since is None or x[0] >= since) and (until is None or x[0] <= until)]
        lats = sorted(x[1] for x in s if x[2] == 200)
        span = (until or self.t1) - (since or self.t0)
        return dict(ok=len(lats), failed=len(s) - len(lats), window_s=round(span, 2),
                    per_s=len(lats) / span if span > 0 else None,
                    p50_ms=pct(lats, 50), p99_ms=pct(lats, 99), max_ms=lats[-1] * 1000 if lats else None,
                    mean_ms=statistics.mean(lats) * 1000 if lats else None,
                    statuses=sorted({str(x[2]) for x in s}))


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k] * 1000


def server_stats(m0, m1, pid_cpu0, pid_cpu1, wall):
    pc_n = S.msum(m1, "knoxgate_password_check_duration_seconds_count") - S.msum(m0, "knoxgate_password_check_duration_seconds_count")
    pc_s = S.msum(m1, "knoxgate_password_check_duration_seconds_sum") - S.msum(m0, "knoxgate_password_check_duration_seconds_sum")
    return dict(
        pw_checks=int(pc_n), pw_check_mean_ms=pc_s / pc_n * 1000 if pc_n else None,
        pw_check_p99_le_ms=(S.hist_quantile(m0, m1, "knoxgate_password_check_duration_seconds", 0.99) or 0) * 1000 if pc_n else None,
        verify_p99_le_ms=(S.hist_quantile(m0, m1, "knoxgate_verify_duration_seconds", 0.99) or 0) * 1000,
        verify_p999_le_ms=(S.hist_quantile(m0, m1, "knoxgate_verify_duration_seconds", 0.999) or 0) * 1000,
        cpu_pct=(pid_cpu1 - pid_cpu0) / wall * 100 if pid_cpu0 is not None and pid_cpu1 is not None else None,
        logins={",".join(f"{a}={b}" for a, b in lab): int(v - m0.get((n, lab), 0))
                for (n, lab), v in m1.items() if n == "knoxgate_logins_total" and v - m0.get((n, lab), 0)})


def verify_run(kg, name, clients=None):
    env = {"BENCH_TOKENS": str(cfg.TOKENS), "BENCH_TOKENS_LIMIT": "0"}
    m0, c0, t0 = S.parse_metrics(kg.admin), S.cpu_seconds(kg.p.pid), time.monotonic()
    p, outf = S.wrk_start(name, kg.url, cfg.BENCH / "verify.lua", SECONDS, VERIFY_CONNS, VERIFY_RATE, env)
    w0 = time.monotonic()
    r = S.wrk_finish(p, outf, SECONDS + 60)
    w1 = time.monotonic()
    m1, c1 = S.parse_metrics(kg.admin), S.cpu_seconds(kg.p.pid)
    row = dict(wrk=r, server=server_stats(m0, m1, c0, c1, time.monotonic() - t0))
    if clients is not None:
        row["logins"] = clients.summary(since=w0, until=w1)
    return row


def run_config(hc, nice, users):
    label = f"hc{hc}-nice{nice}"
    kg = servers.Knoxgate(f"login-{label}", kg_extra(hc, nice))
    res = dict(config=f"{hc} / {nice}", hash_concurrency=hc, hash_nice=nice, idle_rss=kg.idle_rss)
    try:
        # warm all 10k tokens into the in-process tier (seq pass), as bench.py does for the hot set
        p, outf = S.wrk_start(f"{label}-warm", kg.url, cfg.BENCH / "verify.lua", 5, 32, 0,
                              {"BENCH_TOKENS": str(cfg.TOKENS), "BENCH_TOKENS_LIMIT": "0", "BENCH_MODE": "seq"})
        S.wrk_finish(p, outf, 70)
        ents = S.msum(S.parse_metrics(kg.admin), "knoxgate_memory_cache_entries")
        log(f"[{label}] warmed: {ents:.0f} in-process entries")
        # sanity: one login
        c = http.client.HTTPConnection("127.0.0.1", cfg.KG_PORT, timeout=30)
        auth = "Basic " + base64.b64encode(f"{users[0][0]}:{users[0][1]}".encode()).decode()
        c.request("POST", "/api/auth/login/", headers={"Authorization": auth, "Content-Length": "0"})
        rr = c.getresponse()
        body = rr.read()
        c.close()
        if rr.status != 200:
            raise RuntimeError(f"login sanity check: {rr.status} {body[:200]!r}")
        log(f"[{label}] login ok: {body[:60]!r}…")

        # (a) logins only
        m0, c0, t0 = S.parse_metrics(kg.admin), S.cpu_seconds(kg.p.pid), time.monotonic()
        lc = LoginClients(users)
        lc.start()
        time.sleep(SECONDS)
        lc.stop()
        m1, c1 = S.parse_metrics(kg.admin), S.cpu_seconds(kg.p.pid)
        res["a"] = dict(logins=lc.summary(), server=server_stats(m0, m1, c0, c1, time.monotonic() - t0),
                        errors=lc.errors)
        a = res["a"]["logins"]
        log(f"[{label}] (a) logins only: {a['ok']} ok ({a['per_s']:.2f}/s), p50 {a['p50_ms']:.0f} ms "
            f"p99 {a['p99_ms']:.0f} ms, failed {a['failed']}; pw check mean "
            f"{res['a']['server']['pw_check_mean_ms']:.0f} ms; knoxgate CPU {res['a']['server']['cpu_pct']:.0f}%")
        time.sleep(2)

        # (b) verify only
        res["b"] = verify_run(kg, f"{label}-verify-only")
        log_verify(label, "(b) verify only", res["b"])
        time.sleep(2)

        # (c) verify + logins: the login clients start 2 s before wrk and stop after it
        lc = LoginClients(users)
        lc.start()
        time.sleep(2)
        res["c"] = verify_run(kg, f"{label}-verify-with-logins", clients=lc)
        lc.stop()
        res["c"]["errors"] = lc.errors
        log_verify(label, "(c) verify + logins", res["c"])
        l = res["c"]["logins"]
        log(f"[{label}]     logins during (c): {l['ok']} ok ({l['per_s']:.2f}/s) p50 {fmt(l['p50_ms'], 0)} ms "
            f"p99 {fmt(l['p99_ms'], 0)} ms failed {l['failed']}")
        time.sleep(2)

        # (b2) verify only again
        res["b2"] = verify_run(kg, f"{label}-verify-only-again")
        log_verify(label, "(b2) verify only, again", res["b2"])
        res["rss_end"] = counters.rss_mib(kg.p.pid)
    finally:
        kg.stop()
    return res


def fmt(v, d=2):
    return "–" if v is None else f"{v:.{d}f}"


def log_verify(label, what, row):
    r, s = row["wrk"], row["server"]
    log(f"[{label}] {what}: {r['rps']:.0f} req/s p50 {r['p50_us']/1000:.2f} p99 {r['p99_us']/1000:.2f} "
        f"p99.9 {r['p999_us']/1000:.2f} ms; errors {r['errors']} non-2xx {r['non2xx3xx']}; server p99 ≤ "
        f"{fmt(s['verify_p99_le_ms'])} ms; knoxgate CPU {fmt(s['cpu_pct'], 0)}%")


def report(all_res, info):
    L = ["# knoxgate logins: cost, and effect on /verify latency\n",
         f"Measured {info['date']} by `bench/login.sh` on {info['machine']}. Password hashes: "
         f"`{info['hash']}` ({info['iterations']} iterations), {CLIENTS} login clients, "
         f"{SECONDS} s per phase, /verify paced at {VERIFY_RATE} req/s (wrk -t{cfg.THREADS} "
         f"-c{VERIFY_CONNS}, random over 10,000 warmed tokens).\n",
         "## Logins\n",
         "| hash_concurrency / hash_nice | phase | logins | logins/s | login p50 ms | login p99 ms | login max ms | failed | password check mean ms (server) | knoxgate CPU % |",
         "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in all_res:
        for ph, name in (("a", "(a) logins only"), ("c", "(c) during /verify load")):
            if ph not in res:
                continue
            l, s = res[ph]["logins"], res[ph]["server"]
            L.append(f"| {res['config']} | {name} | {l['ok']} | {fmt(l['per_s'])} | {fmt(l['p50_ms'], 0)} | "
                     f"{fmt(l['p99_ms'], 0)} | {fmt(l['max_ms'], 0)} | {l['failed']} | {fmt(s['pw_check_mean_ms'], 0)} | "
                     f"{fmt(s['cpu_pct'], 0)} |")
    L += ["", "## /verify latency with and without logins\n",
          "| hash_concurrency / hash_nice | phase | req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | non-2xx | server p99 ≤ ms | knoxgate CPU % |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in all_res:
        for ph, name in (("b", "(b) no logins"), ("c", f"(c) with {CLIENTS} login clients"), ("b2", "(b2) no logins, again")):
            if ph not in res:
                continue
            r, s = res[ph]["wrk"], res[ph]["server"]
            L.append(f"| {res['config']} | {name} | {r['rps']:,.0f} | {r['p50_us']/1000:.2f} | "
                     f"{r['p99_us']/1000:.2f} | {r['p999_us']/1000:.2f} | {r['lat_max_us']/1000:.1f} | {r['errors']} | "
                     f"{r['non2xx3xx']} | {fmt(s['verify_p99_le_ms'])} | {fmt(s['cpu_pct'], 0)} |")
    L += ["", "## Ratios\n"]
    for res in all_res:
        if not all(k in res for k in ("b", "c", "b2")):
            continue
        b, c, b2 = (res[k]["wrk"] for k in ("b", "c", "b2"))
        base = (b["p99_us"] + b2["p99_us"]) / 2
        base9 = (b["p999_us"] + b2["p999_us"]) / 2
        L.append(f"- hash_concurrency={res['hash_concurrency']}, hash_nice={res['hash_nice']}: /verify p99 with logins / without = "
                 f"**{c['p99_us'] / base:.2f}×** ({c['p99_us']/1000:.2f} ms vs {base/1000:.2f} ms, the mean of "
                 f"(b) {b['p99_us']/1000:.2f} and (b2) {b2['p99_us']/1000:.2f}); p50 {c['p50_us'] / max((b['p50_us'] + b2['p50_us']) / 2, 1):.2f}×; "
                 f"p99.9 {c['p999_us'] / base9:.2f}×. Logins/s during the /verify load: "
                 f"{fmt(res['c']['logins']['per_s'])} (vs {fmt(res['a']['logins']['per_s'])} alone).")
    L += ["", "## Method\n",
          f"Fresh database `{cfg.DB}` (`knoxgate migrate`; bench.py's seeding SQL, 10,000 knox tokens "
          f"over 2,500 users; {CLIENTS} users `login_0…` created by `knoxgate user create "
          "--password-stdin`, i.e. Django pbkdf2_sha256 hashes at knoxgate's configured iteration "
          f"count), private redis-server on 127.0.0.1:{cfg.REDIS_PORT}, knoxgate release binary on "
          f"127.0.0.1:{cfg.KG_PORT} with `KNOXGATE_SESSIONS_THROTTLE_FAILURES=0` and "
          "`KNOXGATE_SESSIONS_HASH_CONCURRENCY` and `KNOXGATE_SESSIONS_HASH_NICE` as listed (defaults on "
          "2 cores: 1 and 10), otherwise default config. A fresh "
          "knoxgate per configuration; its 10k tokens are first warmed into the in-process tier by a 5 s "
          f"sequential wrk pass. Login clients: {CLIENTS} Python threads (`http.client`, one keep-alive "
          "connection each, each its own user), `POST /api/auth/login/` with HTTP Basic back to back; "
          "latency is per request on the client; each successful login also INSERTs a knox token. "
          "/verify: `bench/verify.lua` with `bench/common.lua`'s delay() pacing (as bench.py's "
          "fixed-rate runs; NOT corrected for coordinated omission, so tails are optimistic). In (c) the "
          "login clients start 2 s before wrk and stop after it, and only logins completed inside the "
          "wrk window are counted. (b2) repeats (b) after (c) to show the run-to-run noise; the ratio "
          "uses the mean of (b) and (b2). *server p99* = upper bound of the bucket holding the 99th "
          "percentile in the delta of `knoxgate_verify_duration_seconds` (coarse: ×2 buckets); "
          "*password check mean* = sum/count delta of `knoxgate_password_check_duration_seconds` "
          "(time on the hashing thread, without the queue wait for a hash slot); *knoxgate CPU %* = "
          "utime+stime delta of the process over the phase (200 % = both cores).\n",
          "**Caveat:** one shared 2-core machine runs wrk, the login clients, knoxgate, Postgres and "
          "Redis. A 1M-iteration PBKDF2 check is CPU-bound for its whole duration. At hash_nice=0 the "
          "hashing threads compete with the tokio workers serving /verify as equals; at hash_nice=10 the "
          "kernel runs a check only on CPU time the workers leave, and preempts it when they wake.",
          ]
    conc = info.get("concurrent")
    L.append("\nOther activity seen while measuring (pgrep): " + (", ".join(conc) if conc else "none") + ".")
    for res in all_res:
        errs = (res.get("a", {}).get("errors") or []) + (res.get("c", {}).get("errors") or [])
        if errs:
            L.append(f"\nLogin errors ({res['config']}): " + "; ".join(errs))
        if res.get("failure"):
            L.append(f"\nFAILED ({res['config']}): {res['failure']}")
    L.append("")
    (FINAL / "login.md").write_text("\n".join(L))


def main():
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    conc = set(S.concurrent_activity())
    log(f"login bench: {CLIENTS} clients, {SECONDS}s phases, verify at {VERIFY_RATE}/s, "
        f"hash_concurrency:hash_nice {CONFIGS}; concurrent: {sorted(conc) or 'none'}")
    S.preflight()
    servers.start_redis()
    S.setup_db_knoxgate_only()
    users, hashdesc = create_users()
    all_res = []
    for hc, nice in CONFIGS:
        try:
            all_res.append(run_config(hc, nice, users))
        except Exception as e:  # noqa: BLE001
            log(f"FAILED hash_concurrency={hc} hash_nice={nice}: {e}")
            all_res.append(dict(config=f"{hc} / {nice}", hash_concurrency=hc, hash_nice=nice,
                                failure=f"{type(e).__name__}: {e}"))
        conc |= set(S.concurrent_activity())
        (cfg.OUT / "login.json").write_text(json.dumps(all_res, indent=1, default=str))
    info = dict(date=date, machine=S.machine(), hash=hashdesc,
                iterations=hashdesc.split("$")[-1] if "$" in hashdesc else "?", concurrent=sorted(conc))
    report(all_res, info)
    log(f"done: {FINAL / 'login.md'}")
    return 1 if any("failure" in r for r in all_res) else 0


if __name__ == "__main__":
    procs.exit_on_term()
    code = 1
    try:
        code = main()
    finally:
        procs.stop_all()
        if not KEEP_DB:
            S.drop_db()
    sys.exit(code)
