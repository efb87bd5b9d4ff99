#!/usr/bin/env python3
"""End to end: one DRF endpoint behind one nginx, each way of authenticating (run through
bench/e2e.sh).

Every configuration serves the same view (bench/django/e2e_urls.py, GET /api/whoami/ answering
the user's id) from its own gunicorn with the same settings, behind one nginx with one server
block per configuration:

  floor              Django, no authentication (AllowAny; the view answers null)
  knox               Django + django-rest-knox TokenAuthentication
  knox-redis         Django + django-rest-knox-redis TokenAuthentication (its Redis cache warmed)
  knoxgate           nginx auth_request -> knoxgate (signed assertions on, a P-256 key unless
                     E2E_ASSERTION_KEY=ed25519) -> Django + knoxgate-django
                     (REQUIRE_ASSERTION, keys from knoxgate's JWKS)
  knoxgate-unsigned  the same with a second knoxgate without assertions, Django trusting
                     X-Auth-User-Id from the loopback proxy (an extra beside the four the
                     targets compare)
  auth-stub          nginx auth_request -> a stub forward-auth server (a second nginx, one
                     worker, answering 200 to everything) -> Django, no authentication: what
                     the subrequest and a separate auth process cost before any authentication

Two more, only when named in E2E_CONFIGS, take the gap apart further:

  auth-stub-unix     auth-stub with nginx reaching the stub over a unix socket instead of
                     loopback TCP: what the socket between the two costs
  knoxgate-floor     nginx auth_request -> knoxgate (the knoxgate-unsigned instance) -> Django,
                     no authentication: what knoxgate's answer costs before knoxgate-django
                     reads it

Steps: fresh database E2E_DB (Django's and knoxgate's migrations, 10,000 knox tokens seeded with
SQL over 2,500 users; E2E_HOT_SET of them are requested), a private redis-server, the two
knoxgate instances, the gunicorns, nginx and the stub; a check per configuration (a token
reaches the view as its user, no token gets 401, a forged X-Auth-User-Id straight to the
knoxgate app gets 401); warm-up; then
  1. E2E_ROUNDS interleaved rounds of wrk at saturation, one run per configuration per round;
  2. one paced run per configuration at the same fixed rate (half the slowest configuration's
     saturation unless E2E_RATE is set), with Postgres's transaction counter read around it
     after it has settled (SQL per request); when the phase could reach the moment the warmed
     tokens' cache entries expire together (300 s after the warm-up), it first waits for that
     moment and warms them again;
  3. E2E_VERIFY_ROUNDS interleaved rounds of GET /verify straight to knoxgate on hot tokens,
     signed assertions on against off (more and shorter rounds than step 1: at ~80,000 requests/s
     one 10-s round's neighbour noise moved the ratio between 0.73 and 1.21).
CPU per request by process comes from /proc/<pid>/stat (utime + stime) read around every run:
nginx (master and worker), the stub's nginx, each gunicorn (master and workers), each knoxgate,
redis-server, the Postgres backends connected to the bench database, and wrk (getrusage of the
child).
E2E_PROBE=1 also loads bench/django/gunicorn_probe.py into every gunicorn: each run then says how
much of its workers' CPU went to Django's handler, to knoxgate-django, to signature checks and
to Python's garbage collections (a section of its own in the report; the probe's clock reads
cost every request a little).
Output: bench/out/e2e.md (and e2e.json, logs and wrk output in bench/out/e2e/).
"""

import json
import os
import resource
import shutil
import statistics
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def env_int(name, default):
    return int(os.environ.get(name, str(default)))


ROUNDS = env_int("BENCH_ROUNDS", 3)
DURATION = env_int("E2E_DURATION", 10)            # seconds per saturation / fixed-rate run
VERIFY_DURATION = env_int("E2E_VERIFY_DURATION", 5)
VERIFY_ROUNDS = env_int("E2E_VERIFY_ROUNDS", 8)
WARM_DURATION = env_int("E2E_WARM_DURATION", 3)
FIXED_RATE = env_int("E2E_RATE", 0)               # 0 = half the slowest configuration's saturation
CONNS = env_int("E2E_CONNECTIONS", 64)
RATE_CONNS = env_int("E2E_RATE_CONNECTIONS", 32)
HOT_SET = env_int("E2E_HOT_SET", 1000)
#: How long the caches hold a token from when it is filled: knoxgate's redis.max_cache_ttl and
#: knox-redis's MAX_TOKEN_CACHE_TTL, both left at their default.
CACHE_TTL = 300
GUNICORN_ARGS = os.environ.get("E2E_GUNICORN",
                               "--workers 2 --worker-class gthread --threads 8").split()
NGINX_WORKERS = env_int("E2E_NGINX_WORKERS", 1)
#: The signed configuration's key: "p256" (ES256) or "ed25519" (EdDSA).
ASSERTION_KEY = os.environ.get("E2E_ASSERTION_KEY", "p256")
KEYGEN = {"p256": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
          "ed25519": ["-algorithm", "ed25519"]}
if ASSERTION_KEY not in KEYGEN:
    raise SystemExit(f"E2E_ASSERTION_KEY must be one of {sorted(KEYGEN)}, not {ASSERTION_KEY!r}")
#: 1: gunicorn runs with bench/django/gunicorn_probe.py, and each run says where its workers'
#: CPU went (Django's handler, knoxgate-django, signature checks). Costs every request a little.
PROBE = os.environ.get("E2E_PROBE", "0") == "1"
# The order of round 1 (reversed every other round). With the signed path fifth of six, its
# runs in rounds 1 and 2 start about 30 s apart, under the 45 s after which an assertion is
# renewed: round 2 meets its assertions as round 1 left them, rounds 1 and 3 meet all 1,000
# renewed (the report counts the renewals of each round).
CONFIGS = os.environ.get("E2E_CONFIGS",
                         "floor auth-stub knox knox-redis knoxgate knoxgate-unsigned").split()
FINAL = Path(os.environ.get("E2E_FINAL_DIR", HERE / "out"))
AUDIENCE = "e2e-bench"
PORT_BASE = env_int("E2E_PORT_BASE", 18780)

os.environ["BENCH_DB"] = os.environ.get("E2E_DB", "knoxgate_bench_e2e")
os.environ["BENCH_REDIS_PORT"] = os.environ.get("E2E_REDIS_PORT", "16393")
os.environ["BENCH_KNOXGATE_PORT"] = str(PORT_BASE)
os.environ["BENCH_KNOXGATE_ADMIN_PORT"] = str(PORT_BASE + 10)
os.environ["BENCH_OUT"] = str(FINAL / "e2e")
os.environ["BENCH_EXTRA_USERS"] = "0"
os.environ["BENCH_HOT_SET"] = str(HOT_SET)
os.environ.setdefault("KNOXGATE_VENV", str(HERE.parent / "target" / "e2e-venv"))
sys.path.insert(0, str(HERE))
from knoxbench import config as cfg  # noqa: E402
from knoxbench import counters, procs, seed, servers  # noqa: E402
from knoxbench.wrk import wrk  # noqa: E402

log = cfg.log
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = cfg.REPO
OUT = cfg.OUT

# name -> (label in the report, E2E_AUTH, DJ_KNOX_REDIS, knoxgate instance or None)
CONFIG_INFO = {
    "floor": ("Django, no authentication (floor)", "none", False, None),
    "knox": ("Django + django-rest-knox", "knox", False, None),
    "knox-redis": ("Django + django-rest-knox-redis", "knox-redis", True, None),
    "knoxgate": ("nginx auth_request → knoxgate → Django + knoxgate-django (signed assertions)",
                 "knoxgate", False, "signed"),
    "knoxgate-unsigned": ("nginx auth_request → knoxgate → Django + knoxgate-django "
                          "(X-Auth-User-Id, no assertion)", "knoxgate-unsigned", False, "unsigned"),
    "auth-stub": ("nginx auth_request → a stub auth server (a second nginx: `return 200`) → "
                  "Django, no authentication", "none", False, "stub"),
    "auth-stub-unix": ("`auth-stub` with nginx reaching the stub over a unix socket", "none",
                       False, "stub_unix"),
    "knoxgate-floor": ("nginx auth_request → knoxgate (no assertion) → Django, no "
                       "authentication", "none", False, "unsigned"),
}
# Forward-auth servers that refuse a request without a token (the stub lets everything in).
KNOXGATE_INSTANCES = ("signed", "unsigned")
for c in CONFIGS:
    if c not in CONFIG_INFO:
        sys.exit(f"E2E_CONFIGS: unknown configuration {c!r} (known: {' '.join(CONFIG_INFO)})")

PORTS = {
    "kg:signed": PORT_BASE, "kg:unsigned": PORT_BASE + 1, "kg:stub": PORT_BASE + 2,
    "kgadmin:signed": PORT_BASE + 10, "kgadmin:unsigned": PORT_BASE + 11,
    **{f"nginx:{c}": PORT_BASE + 20 + i for i, c in enumerate(CONFIG_INFO)},
    **{f"app:{c}": PORT_BASE + 30 + i for i, c in enumerate(CONFIG_INFO)},
}
PATH = "/api/whoami/"
STUB_SOCKET = OUT / "auth-stub" / "stub.sock"

STATE = {"runs": [], "checks": [], "notes": [], "failures": [], "versions": {}}


def save():
    (OUT / "e2e.json").write_text(json.dumps(STATE, indent=1))


# --- CPU accounting --------------------------------------------------------------------------------

def cpu_ticks(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])   # utime + stime (fields 14 and 15)
    except (OSError, IndexError, ValueError):
        return None


def pg_backend_pids():
    out = procs.psql(f"SELECT pid FROM pg_stat_activity WHERE datname = '{cfg.DB}'", db="postgres")
    return [int(x) for x in out.split()]


class CpuSnapshot:
    """Ticks per process group: nginx, each gunicorn, each knoxgate, redis, Postgres backends."""

    def __init__(self, groups, with_pg=True):
        self.groups = groups            # name -> (root pid, whole tree?)
        self.with_pg = with_pg
        self.ticks = {}
        for name, (pid, tree) in groups.items():
            pids = counters.tree_pids(pid) if tree else [pid]
            self.ticks[name] = {p: cpu_ticks(p) for p in pids}
        if with_pg:
            self.ticks["postgres"] = {p: cpu_ticks(p) for p in pg_backend_pids()}

    def delta(self, before):
        """CPU seconds per group between `before` and this snapshot (processes that exited in
        between are lost; processes that started in between count from zero)."""
        out = {}
        for name, now in self.ticks.items():
            old = before.ticks.get(name, {})
            total = 0
            for p, t in now.items():
                if t is not None:
                    total += t - (old.get(p) or 0) if p in old else t
            out[name] = total / CLK_TCK
        return out


# --- processes -------------------------------------------------------------------------------------

def start_knoxgate(label, key_file):
    extra = {
        "KNOXGATE_LISTEN": f"127.0.0.1:{PORTS['kg:' + label]}",
        "KNOXGATE_ADMIN_LISTEN": f"127.0.0.1:{PORTS['kgadmin:' + label]}",
        # The change feed's health probe is a statement every 5 s by default; slowed down so
        # that Postgres's counters see only what requests cause (as tests/e2e-django does).
        "KNOXGATE_CACHE_FEED_HEALTH_INTERVAL": "10m",
    }
    if key_file:
        extra.update({"KNOXGATE_ASSERTION_KEY_FILE": str(key_file),
                      "KNOXGATE_ASSERTION_AUDIENCE": AUDIENCE})
    p = procs.start(f"knoxgate-{label}", [str(cfg.KNOXGATE)], env=servers.kg_env(extra))
    admin = f"127.0.0.1:{PORTS['kgadmin:' + label]}"
    procs.wait_http(f"http://{admin}/readyz", lambda s: s == 200, timeout=30)
    return p, f"http://127.0.0.1:{PORTS['kg:' + label]}", admin


def start_app(name):
    _, mode, knox_redis, kg = CONFIG_INFO[name]
    extra = {
        "E2E_AUTH": mode,
        "DJANGO_SETTINGS_MODULE": "e2e_settings",
        "PYTHONPATH": f"{HERE / 'django'}:{cfg.DJPROJECT}:{REPO / 'integrations' / 'django'}",
        "E2E_JWKS_URL": f"http://127.0.0.1:{PORTS['kgadmin:signed']}/.well-known/jwks.json",
        "E2E_AUDIENCE": AUDIENCE,
    }
    if PROBE:
        extra.update({"E2E_PROBE_DIR": str(probe_dir()), "E2E_PROBE_NAME": name})
    port = PORTS["app:" + name]
    cmd = [str(cfg.VENV / "bin" / "python"), "-m", "gunicorn", "djproject.wsgi:application",
           "--bind", f"127.0.0.1:{port}", "--timeout", "60", "--graceful-timeout", "5",
           "--backlog", "2048", "--no-control-socket", "--error-logfile", "-", *GUNICORN_ARGS]
    if PROBE:
        cmd += ["--config", str(HERE / "django" / "gunicorn_probe.py")]
    p = procs.start(f"gunicorn-{name}", cmd, env=servers.dj_env(knox_redis, extra),
                    cwd=cfg.DJPROJECT)
    return p, f"http://127.0.0.1:{port}"


NGINX_HEAD = """
daemon off;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
    keepalive_requests 1000000;
    underscores_in_headers off;
"""

# Upstream to knoxgate as deploy/nginx/knoxgate.conf has it; no keep-alive to the application
# (deploy/nginx/knoxgate.conf: gunicorn's idle timeout is 2 s), the same for every configuration.
NGINX_KG_UPSTREAM = """
    upstream kg_{label} {{
        server {server};
        keepalive 16;
        keepalive_timeout 4s;
        keepalive_requests 1000;
    }}
"""

NGINX_PLAIN = """
    upstream app_{u} {{ server 127.0.0.1:{app}; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_set_header X-Auth-User-Id "";
            proxy_set_header X-Auth-Assertion "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_pass http://app_{u};
        }}
    }}
"""

NGINX_AUTH = """
    upstream app_{u} {{ server 127.0.0.1:{app}; }}
    server {{
        listen 127.0.0.1:{port};
        set $knox_uid "";
        set $knox_assertion "";
        location = /_knoxgate/verify {{
            internal;
            proxy_pass http://kg_{label}/verify;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_connect_timeout 1s;
            proxy_send_timeout 3s;
            proxy_read_timeout 3s;
        }}
        location / {{
            auth_request /_knoxgate/verify;
            auth_request_set $knox_uid $upstream_http_x_auth_user_id;
            auth_request_set $knox_assertion $upstream_http_x_auth_assertion;
            proxy_set_header X-Auth-User-Id $knox_uid;
            proxy_set_header X-Auth-Assertion $knox_assertion;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_pass http://app_{u};
        }}
    }}
"""


def start_nginx():
    d = OUT / "nginx"
    (d / "logs").mkdir(parents=True, exist_ok=True)
    conf = NGINX_HEAD.format(d=d, workers=NGINX_WORKERS)
    for label in ("signed", "unsigned", "stub"):
        conf += NGINX_KG_UPSTREAM.format(label=label, server=f"127.0.0.1:{PORTS['kg:' + label]}")
    conf += NGINX_KG_UPSTREAM.format(label="stub_unix", server=f"unix:{STUB_SOCKET}")
    for name in CONFIGS:
        kg = CONFIG_INFO[name][3]
        tmpl = NGINX_AUTH if kg else NGINX_PLAIN
        conf += tmpl.format(u=name.replace("-", "_"), app=PORTS["app:" + name],
                            port=PORTS["nginx:" + name], label=kg)
    conf += "}\n"
    return start_nginx_process("nginx", d, conf)


def start_auth_stub():
    """The forward-auth server of `auth-stub` (on loopback TCP) and `auth-stub-unix` (on a
    unix socket): a process of its own, as knoxgate is, that answers every /verify with 200
    and nothing else."""
    d = OUT / "auth-stub"
    (d / "logs").mkdir(parents=True, exist_ok=True)
    STUB_SOCKET.unlink(missing_ok=True)  # an earlier run's
    conf = NGINX_HEAD.format(d=d, workers=1)
    listens = [f"127.0.0.1:{PORTS['kg:stub']}"]
    if "auth-stub-unix" in CONFIGS:
        # Only then: a socket path has a length limit (107 bytes) that E2E_FINAL_DIR may pass.
        listens.append(f"unix:{STUB_SOCKET}")
    for listen in listens:
        conf += ("    server {\n        listen %s;\n        location / { return 200; }\n"
                 "    }\n" % listen)
    conf += "}\n"
    return start_nginx_process("auth-stub", d, conf)


def start_nginx_process(name, d, conf):
    (d / "nginx.conf").write_text(conf)
    procs.run(["nginx", "-t", "-p", str(d), "-c", str(d / "nginx.conf")], timeout=30)
    return procs.start(name, ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")])


# --- checks ----------------------------------------------------------------------------------------

def check(name, ok, detail):
    STATE["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
    log(f"  {'ok' if ok else 'FAILED'} - {name}: {' '.join(detail.split())[:160]}")
    if not ok:
        raise RuntimeError(f"check failed: {name}: {detail}")


def check_config(name, url, tok, uid):
    status, body = procs.http_get(url + PATH, {"Authorization": f"Token {tok}"}, timeout=10)
    authenticates = CONFIG_INFO[name][1] != "none"
    want = str(uid) if authenticates else "null"
    got = json.loads(body).get("user_id") if status == 200 else None
    check(f"{name}: a seeded token through nginx", status == 200 and json.dumps(got) == want,
          f"{status} {body[:120]}")
    status, body = procs.http_get(url + PATH, timeout=10)
    want_status = 401 if authenticates or CONFIG_INFO[name][3] in KNOXGATE_INSTANCES else 200
    check(f"{name}: no token through nginx", status == want_status, f"{status} {body[:120]}")


def verify_headers(base, tok):
    req = urllib.request.Request(base + "/verify", headers={"Authorization": f"Token {tok}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, {k.lower() for k in r.headers.keys()}


# --- measuring -------------------------------------------------------------------------------------

def wrk_env(mode="random"):
    return {"BENCH_TOKENS": str(cfg.TOKENS), "BENCH_TOKENS_LIMIT": str(HOT_SET),
            "BENCH_PATH": PATH, "BENCH_MODE": mode}


def probe_dir():
    return OUT / "probe"


def probe_totals(config, at, *, before):
    """The probe's running totals summed over `config`'s workers at `at` (Unix time): each
    worker's last sample taken at or before it (`before`), or its first one at or after it."""
    total = {}
    for f in probe_dir().glob(f"{config}.*.jsonl"):
        chosen = None
        for line in f.read_text().splitlines():
            sample = json.loads(line)
            if before and sample["t"] > at:
                break
            chosen = sample
            if not before and sample["t"] >= at:
                break
        for k, v in (chosen or {}).items():
            if k != "t":
                total[k] = total.get(k, 0) + v
    return total


def probe_row(config, t0, t1):
    """Per request of `config`'s gunicorn over the run from t0 to t1 (widened to the samples
    around it, up to 0.5 s of idle time on each side): CPU µs of the worker processes, of
    Django's handler and of knoxgate-django, the signature checks made, and Python's garbage
    collections (all, and the full ones)."""
    a, b = probe_totals(config, t0, before=True), probe_totals(config, t1, before=False)
    d = {k: b.get(k, 0) - a.get(k, 0) for k in b}
    n = d.get("wsgi_n", 0)
    if not n:
        return None
    checks = d.get("checks_n", 0)
    return {"requests": n, "process_us": d["process_cpu"] * 1e6 / n,
            "wsgi_us": d["wsgi_cpu"] * 1e6 / n,
            "package_us": d.get("resolve_cpu", 0) * 1e6 / n, "checks": checks,
            "check_us": d.get("checks_cpu", 0) * 1e6 / checks if checks else None,
            "checks_us_per_req": d.get("checks_cpu", 0) * 1e6 / n,
            "gc_us": d.get("gc_cpu", 0) * 1e6 / n, "gc_full": d.get("gc2_n", 0),
            "gc_full_us": d.get("gc2_cpu", 0) * 1e6 / n}


def run_one(tag, config, url, duration, groups, *, conns=CONNS, rate=0, path=None, pg=True,
            redis=False, signer=None):
    """One wrk run with CPU (and optionally Redis) counters around it; returns the row.
    signer: the admin address of a knoxgate signing assertions, whose signatures during the
    run are counted (each new assertion is verified once by every gunicorn worker seeing it)."""
    env = wrk_env()
    if path:
        env["BENCH_PATH"] = path
    if redis:
        counters.redis_reset()
    signed0 = signed_count(signer) if signer else None
    before = CpuSnapshot(groups, with_pg=pg)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    r = wrk(f"{tag}-{config}", url, "verify.lua", duration, conns=conns, rate=rate, extra_env=env,
            quiet=True)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t1 = time.time()
    after = CpuSnapshot(groups, with_pg=pg)
    cpu = after.delta(before)
    cpu["wrk"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    n = max(r["requests"], 1)
    row = {"tag": tag, "config": config, "rate": rate, "conns": conns, "duration": duration,
           "rps": r["rps"], "requests": r["requests"], "errors": r["errors"],
           "non2xx": r["non2xx3xx"], "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
           "p99_ms": r["p99_us"] / 1000, "p999_ms": r["p999_us"] / 1000,
           "cpu_s": cpu, "cpu_us_per_req": {k: v * 1e6 / n for k, v in cpu.items()}}
    if signer:
        row["assertions_signed"] = signed_count(signer) - signed0
    if PROBE and config in CONFIG_INFO:
        time.sleep(0.6)  # each worker's first sample after the run
        row["probe"] = probe_row(config, t0, t1)
    if redis:
        total, per = counters.redis_commands()
        row["redis_per_req"] = total / n
        row["redis_detail"] = {k: round(v / n, 3) for k, v in per.items()}
    log(f"  {tag} {config}: {r['rps']:.0f} req/s p50 {row['p50_ms']:.2f} ms p99 "
        f"{row['p99_ms']:.2f} ms errors {r['errors']} non-2xx {r['non2xx3xx']} | CPU µs/req "
        + " ".join(f"{k} {v:.0f}" for k, v in sorted(row["cpu_us_per_req"].items()) if v)
        + (f" | assertions signed {row['assertions_signed']:.0f}" if signer else "")
        + (" | probe: gunicorn {process_us:.0f} µs/req, Django handler {wsgi_us:.0f}, "
           "knoxgate-django {package_us:.0f}, signature checks {checks} × {check_us_:.0f} µs, "
           "gc {gc_us:.0f} µs/req ({gc_full} full, {gc_full_us:.0f} µs/req)"
           .format(**row["probe"], check_us_=row["probe"]["check_us"] or 0)
           if row.get("probe") else ""))
    if r["errors"] or r["non2xx3xx"]:
        STATE["failures"].append(f"{tag} {config}: {r['errors']} socket errors, "
                                 f"{r['non2xx3xx']} non-2xx answers")
    STATE["runs"].append(row)
    save()
    return row


def kg_metrics_sql(admin):
    return counters.metrics(admin)["sql"]


def rewarm_after_expiry(urls, filled):
    """The caches (knoxgate's tiers, knox-redis's) hold a token for CACHE_TTL from when it was
    filled, however often it is read since, and the warm-up filled all the hot tokens between
    the two times of `filled`: they expire within as many seconds, and a paced run that met
    them would count 1,000 reloads in one 10-s window (0.3 SQL per request; spread out in steady
    traffic, one per token per CACHE_TTL). When the paced phase could reach the first of them
    (more rounds, more configurations), wait until the last has passed and send every hot
    token through every configuration again, so that the reloads happen here, unmeasured."""
    first_filled, last_filled = filled
    # Per configuration its run and the settled read after it (PG_SETTLE, then a few 1.5-s
    # polls), and the settled read before the first.
    phase = len(CONFIGS) * (DURATION + cfg.PG_SETTLE + 5) + cfg.PG_SETTLE + 5
    if time.monotonic() + phase < first_filled + CACHE_TTL:
        return
    wait = max(0.0, last_filled + CACHE_TTL + 5 - time.monotonic())
    log(f"  the warmed tokens' cache entries expire within the paced phase: waiting {wait:.0f} s "
        "for them to expire, then each hot token once more through every configuration")
    time.sleep(wait)
    for c in CONFIGS:
        send_each_hot_token(f"rewarm-seq-{c}", urls[c])


def send_each_hot_token(tag, url):
    """Each hot token once (and round again until WARM_DURATION ends) through `url`."""
    wrk(tag, url, "verify.lua", WARM_DURATION, conns=8, extra_env=wrk_env("seq"), quiet=True)


def signed_count(admin):
    return counters.metrics(admin)["detail"].get("assertions_signed", 0)


def main():
    FINAL.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    cfg.LOGS.mkdir(parents=True, exist_ok=True)
    log(f"e2e: configurations {' '.join(CONFIGS)}; {ROUNDS} rounds of {DURATION}s at saturation "
        f"(-c{CONNS}), fixed rate {'auto' if not FIXED_RATE else FIXED_RATE} (-c{RATE_CONNS}), "
        f"/verify rounds {VERIFY_DURATION}s; gunicorn {' '.join(GUNICORN_ARGS)}")
    seed.setup_db()
    STATE["notes"].extend(seed.NOTES)
    redis_p = servers.start_redis()
    if PROBE:
        shutil.rmtree(probe_dir(), ignore_errors=True)  # an earlier run's workers
        probe_dir().mkdir(parents=True)
    key = OUT / "assertion.pem"
    procs.run(["openssl", "genpkey", *KEYGEN[ASSERTION_KEY], "-out", str(key)], timeout=30)
    kg = {}
    for label, k in (("signed", key), ("unsigned", None)):
        kg[label] = start_knoxgate(label, k)
    apps = {c: start_app(c) for c in CONFIGS}
    stub_p = (start_auth_stub() if {"auth-stub", "auth-stub-unix"} & set(CONFIGS)
              else None)
    nginx_p = start_nginx()
    for c, (p, url) in apps.items():
        procs.wait_http(url + PATH, lambda s: s in (200, 401), timeout=90)
    procs.wait_http(f"http://127.0.0.1:{PORTS['nginx:' + CONFIGS[0]]}{PATH}",
                    lambda s: s in (200, 401), timeout=10)
    urls = {c: f"http://127.0.0.1:{PORTS['nginx:' + c]}" for c in CONFIGS}

    tok = cfg.TOKENS.open().readline().strip()
    uid = int(procs.psql(f"SELECT user_id FROM knox_authtoken WHERE token_key = '{tok[:15]}'"))
    log("checks")
    for c in CONFIGS:
        check_config(c, urls[c], tok, uid)
    # The knoxgate path's view must refuse an identity that knoxgate did not sign.
    if "knoxgate" in apps:
        status, body = procs.http_get(apps["knoxgate"][1] + PATH, {"X-Auth-User-Id": str(uid)})
        check("knoxgate: forged X-Auth-User-Id straight to gunicorn (no assertion)",
              status == 401, f"{status} {body[:120]}")
    status, hdrs = verify_headers(kg["signed"][1], tok)
    check("knoxgate signed: /verify answers 200 with X-Auth-Assertion",
          status == 200 and "x-auth-assertion" in hdrs, f"{status} {sorted(hdrs)}")
    status, hdrs = verify_headers(kg["unsigned"][1], tok)
    check("knoxgate unsigned: /verify answers 200 without X-Auth-Assertion",
          status == 200 and "x-auth-user-id" in hdrs and "x-auth-assertion" not in hdrs,
          f"{status} {sorted(hdrs)}")

    pids = {"nginx": (nginx_p.pid, True), "redis": (redis_p.pid, False)}
    for label, (p, _, _) in kg.items():
        pids[f"knoxgate-{label}"] = (p.pid, False)
    if stub_p:
        pids["auth-stub"] = (stub_p.pid, True)
    for c, (p, _) in apps.items():
        pids[f"gunicorn-{c}"] = (p.pid, True)

    # Postgres's deferred work from the seeding (autovacuum of 10,000 fresh rows, the next
    # checkpoint's writes) would otherwise land in whichever measured run comes minutes later.
    log("settle: VACUUM ANALYZE and CHECKPOINT after the seeding")
    procs.psql("VACUUM ANALYZE")
    procs.psql("CHECKPOINT")
    log("warm-up: each hot token once through every configuration, then a short random run")
    warm_began = time.monotonic()
    for c in CONFIGS:
        send_each_hot_token(f"warm-seq-{c}", urls[c])
        wrk(f"warm-{c}", urls[c], "verify.lua", WARM_DURATION, extra_env=wrk_env(), quiet=True)
    filled = (warm_began, time.monotonic())
    for label in kg:
        wrk(f"warm-verify-{label}", kg[label][1], "verify.lua", WARM_DURATION,
            extra_env=dict(wrk_env("seq"), BENCH_PATH="/verify"), quiet=True)

    log(f"1. saturation: {ROUNDS} interleaved rounds")
    for rnd in range(1, ROUNDS + 1):
        order = CONFIGS if rnd % 2 else list(reversed(CONFIGS))
        for c in order:
            row = run_one(f"sat{rnd}", c, urls[c], DURATION, pids, pg=True,
                          signer=kg["signed"][2] if c == "knoxgate" else None)
            row["round"] = rnd

    sat = {c: statistics.median(r["rps"] for r in STATE["runs"]
                                if r["tag"].startswith("sat") and r["config"] == c)
           for c in CONFIGS}
    rate = FIXED_RATE or max(10, int(min(sat.values()) * 0.5) // 10 * 10)
    STATE["fixed_rate"] = rate
    log(f"2. fixed rate {rate} req/s, SQL per request from pg_stat_database (settled reads)")
    rewarm_after_expiry(urls, filled)
    x_before = counters.pg_xacts(settle=True)
    for c in CONFIGS:
        sql0 = {label: kg_metrics_sql(kg[label][2]) for label in kg}
        row = run_one("fixed", c, urls[c], DURATION, pids, conns=RATE_CONNS, rate=rate,
                      pg=True, redis=True, signer=kg["signed"][2] if c == "knoxgate" else None)
        x_after = counters.pg_xacts(settle=True)
        n = max(row["requests"], 1)
        # our own read of the counter is a transaction in the postgres database, not this one
        row["pg_xacts"] = x_after - x_before
        row["pg_xact_per_req"] = (x_after - x_before) / n
        row["kg_sql_per_req"] = {label: (kg_metrics_sql(kg[label][2]) - sql0[label]) / n
                                 for label in kg}
        log(f"    {c}: Postgres transactions / request {row['pg_xact_per_req']:.3f}; knoxgate's "
            f"own SQL / request {row['kg_sql_per_req']}; Redis commands / request "
            f"{row['redis_per_req']:.3f}")
        x_before = x_after
        save()

    log(f"3. hot /verify, signed assertions on vs off: {VERIFY_ROUNDS} interleaved rounds")
    # An unmeasured run on each first: the first measured run after the paced phase was the
    # slowest of the six in most runs, whichever instance it was.
    for label in ("signed", "unsigned"):
        wrk(f"warm-verify2-{label}", kg[label][1], "verify.lua", WARM_DURATION,
            extra_env=dict(wrk_env(), BENCH_PATH="/verify"), quiet=True)
    for rnd in range(1, VERIFY_ROUNDS + 1):
        order = ("signed", "unsigned") if rnd % 2 else ("unsigned", "signed")
        for label in order:
            row = run_one(f"verify{rnd}", f"verify-{label}", kg[label][1], VERIFY_DURATION, pids,
                          path="/verify", pg=False)
            row["round"] = rnd

    STATE["versions"] = versions()
    save()
    from e2e_report import write_report  # noqa: E402  (bench/e2e_report.py)
    md = write_report(STATE, CONFIGS, CONFIG_INFO, {
        "rounds": ROUNDS, "duration": DURATION, "verify_duration": VERIFY_DURATION,
        "verify_rounds": VERIFY_ROUNDS,
        "conns": CONNS, "rate_conns": RATE_CONNS, "hot_set": HOT_SET,
        "gunicorn": " ".join(GUNICORN_ARGS), "nginx_workers": NGINX_WORKERS, "probe": PROBE,
        "assertion_key": {"p256": "a P-256 key (ES256)", "ed25519": "an Ed25519 key (EdDSA)"}[
            ASSERTION_KEY],
        "elapsed": time.monotonic() - cfg.T0})
    (FINAL / "e2e.md").write_text(md)
    log(f"wrote {FINAL / 'e2e.md'}")


def versions():
    v = {}
    py = str(cfg.VENV / "bin" / "python")
    try:
        v["python"] = procs.run([py, "-c", (
            "import importlib.metadata as m, platform; print(platform.python_version(), *("
            "f'{d} {m.version(d)}' for d in ('Django', 'djangorestframework', 'django-rest-knox',"
            " 'django-rest-knox-redis', 'gunicorn', 'PyJWT', 'cryptography', 'psycopg')), "
            "sep=' | ')")], timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        v["python"] = f"? ({e})"
    for name, cmd in (("knoxgate", [str(cfg.KNOXGATE), "--version"]), ("nginx", ["nginx", "-v"]),
                      ("redis", ["redis-server", "--version"]), ("wrk", ["wrk", "-v"])):
        try:
            p = procs.run(cmd, timeout=10, check=False)
            v[name] = (p.stdout + p.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            v[name] = f"? ({e})"
    v["postgres"] = procs.psql("SHOW server_version", db="postgres")
    # Marked modified only for changes to what runs: notes written during a run are not.
    head, modified = procs.source_state(".", ":(exclude)*.md")
    v["git"] = head + ("-dirty" if modified else "")
    v["cpu"] = next((line.split(":", 1)[1].strip() for line in
                     Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "?")
    v["cores"] = os.cpu_count()
    v["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return v


if __name__ == "__main__":
    procs.exit_on_term()
    try:
        main()
    except Exception as e:  # noqa: BLE001
        STATE["failures"].append(f"aborted: {type(e).__name__}: {e}")
        save()
        log(f"e2e: FAILED: {e}")
        raise
    finally:
        procs.stop_all()
        if os.environ.get("E2E_KEEP_DB", "0") != "1":
            try:
                procs.psql(f"DROP DATABASE IF EXISTS {cfg.DB} WITH (FORCE)", db="postgres")
            except Exception:  # noqa: BLE001
                pass
