"""The processes under test and the services they need, each started on 127.0.0.1 only.

The private redis-server (`start_redis`), knoxgate (`Knoxgate`: one fresh instance, Redis
flushed, ready and answering a seeded token), the nginx `return 200` floor (`start_nginx`) and
the Django anchors under gunicorn (`start_gunicorn`, `GUNICORN_SETTINGS`), with the environment
each of knoxgate and Django is given (`kg_env`, `dj_env`).
"""

import os
import time

from .config import (BENCH, DB, DJANGO_PORT, DJPROJECT, KG_ADMIN_PORT, KG_PORT, KNOXGATE,
                     NGINX_PORT, OUT, PG_HOST, PG_PORT, PG_URL, PG_USER, REDIS_PORT, REDIS_URL_DJ,
                     REDIS_URL_KG, TOKENS, VENV)
from .counters import rss_mib
from .procs import http_get, redis_cli, start, stop, wait_http


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


class Knoxgate:
    def __init__(self, label, extra_env, binary=None):
        """`binary`: another build to measure (default: KNOXGATE, the build under test)."""
        self.label = label
        self.env = kg_env(extra_env)
        self.admin = f"127.0.0.1:{KG_ADMIN_PORT}"
        self.url = f"http://127.0.0.1:{KG_PORT}"
        redis_cli("FLUSHALL")
        self.p = start(f"knoxgate-{label}", [str(binary or KNOXGATE)], env=self.env)
        wait_http(f"http://{self.admin}/readyz", lambda s: s == 200, timeout=30)
        tok = TOKENS.open().readline().strip()
        status, _ = http_get(self.url + "/verify", {"Authorization": f"Token {tok}"})
        if status != 200:
            raise RuntimeError(f"knoxgate {label}: /verify of a seeded token gave {status}")
        self.idle_rss = rss_mib(self.p.pid)

    def stop(self):
        stop(self.p)


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
