"""Fixtures for the Django <-> knoxgate interop suite.

Each test asks `start_stack(**settings)` for a stack: a fresh Postgres database (a copy of
one Django migrated once in this run), a flushed Redis DB, our Django project
(tests/interop/djproject) under gunicorn, its management commands (run by
djproject/manage_server.py), and knoxgate (`migrate`, then `serve`) sharing that database and
Redis DB with the same knox settings. Everything listens on 127.0.0.1 and everything is torn down after the test, also
when it fails: processes are stopped, the database is dropped, the Redis DB is flushed.

Environment:
  KNOXGATE_BIN        knoxgate binary (default <repo>/target/debug/knoxgate)
  INTEROP_REDIS_DB    Redis DB index reserved for this suite (default 11); FLUSHDB'd per stack
  INTEROP_PG_HOST / INTEROP_PG_PORT / INTEROP_PG_USER   default 127.0.0.1 / 5432 / postgres
  INTEROP_REDIS_HOST / INTEROP_REDIS_PORT               default 127.0.0.1 / 6379
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest
import redis
import requests
from psycopg import sql

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DJPROJECT = HERE / "djproject"

PG_HOST = os.environ.get("INTEROP_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("INTEROP_PG_PORT", "5432"))
PG_USER = os.environ.get("INTEROP_PG_USER", "postgres")
REDIS_HOST = os.environ.get("INTEROP_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("INTEROP_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("INTEROP_REDIS_DB", "11"))

#: bound on every HTTP request the driver makes
HTTP_TIMEOUT = 15.0
#: bound on waiting for a server to answer its readiness probe
READY_TIMEOUT = 20.0
#: bound on a process exiting after SIGTERM
STOP_TIMEOUT = 15.0
#: bound on one `manage.py` or `knoxgate migrate` run
COMMAND_TIMEOUT = 120.0
#: how much of each log to show with a failure
LOG_TAIL_LINES = 150


def knoxgate_binary() -> Path:
    return Path(os.environ.get("KNOXGATE_BIN") or REPO / "target" / "debug" / "knoxgate")


# === settings shared by both sides ===


@dataclass(frozen=True)
class Settings:
    """knox settings given to Django (DJ_*) and to knoxgate (KNOXGATE_*) alike."""

    token_prefix: str = ""
    #: knox SECURE_HASH_ALGORITHM, without 'hashlib.'
    hash_algorithm: str = "sha512"
    #: "default" (knox's 10 h) or "none"
    token_ttl: str = "default"
    #: Django uses django-rest-knox-redis (authenticator, views, cache) when true
    knox_redis: bool = False
    redis_key_prefix: str = "knox"
    #: Django's preferred password hasher(s), comma separated
    password_hashers: str = "pbkdf2_sha256"
    #: KNOXGATE_CACHE_CONSISTENCY
    cache_consistency: str = "notify"
    #: Django's TIME_ZONE, and knoxgate's sessions.time_zone
    time_zone: str = "UTC"
    #: knox EXPIRY_DATETIME_FORMAT ("none" for None)
    expiry_datetime_format: str = "iso-8601"

    def django_env(self, db_name: str, redis_url: str) -> dict[str, str]:
        return {
            "DJANGO_SETTINGS_MODULE": "djproject.settings",
            "DJ_DB_NAME": db_name,
            "DJ_DB_HOST": PG_HOST,
            "DJ_DB_PORT": str(PG_PORT),
            "DJ_DB_USER": PG_USER,
            "DJ_REDIS_URL": redis_url,
            "DJ_KNOX_REDIS": "1" if self.knox_redis else "0",
            "DJ_REDIS_KEY_PREFIX": self.redis_key_prefix,
            "DJ_TOKEN_PREFIX": self.token_prefix,
            "DJ_HASH": self.hash_algorithm,
            "DJ_TOKEN_TTL_SECONDS": {"default": "", "none": "none"}[self.token_ttl],
            "DJ_PASSWORD_HASHERS": self.password_hashers,
            "DJ_TIME_ZONE": self.time_zone,
            "DJ_EXPIRY_DATETIME_FORMAT": self.expiry_datetime_format,
        }

    def knoxgate_env(self, db_name: str, redis_url: str, listen: str, admin: str) -> dict[str, str]:
        env = {
            "KNOXGATE_POSTGRES_URL": f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{db_name}",
            "KNOXGATE_REDIS_URL": redis_url,
            "KNOXGATE_LISTEN": listen,
            "KNOXGATE_ADMIN_LISTEN": admin,
            "KNOXGATE_KNOX_HASH_ALGORITHM": self.hash_algorithm,
            "KNOXGATE_KNOX_TOKEN_TTL": {"default": "10h", "none": "none"}[self.token_ttl],
            "KNOXGATE_REDIS_KEY_PREFIX": self.redis_key_prefix,
            "KNOXGATE_CACHE_CONSISTENCY": self.cache_consistency,
            "KNOXGATE_SESSIONS_TIME_ZONE": self.time_zone,
            "KNOXGATE_KNOX_EXPIRY_DATETIME_FORMAT": self.expiry_datetime_format,
        }
        if self.token_prefix:
            env["KNOXGATE_KNOX_TOKEN_PREFIX"] = self.token_prefix
        # The same PASSWORD_HASHERS as the Django side (djproject.settings.password_hashers):
        # the preferred ones, then Django's defaults.
        preferred = [h.strip() for h in self.password_hashers.split(",") if h.strip()]
        defaults = ["pbkdf2_sha256", "pbkdf2_sha1", "argon2", "bcrypt_sha256", "scrypt"]
        env["KNOXGATE_SESSIONS_PASSWORD_HASHERS"] = ",".join(
            preferred + [h for h in defaults if h not in preferred])
        return env


# === small helpers ===


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) if kept else "(empty)"


def basic_auth(username: str, password: str) -> str:
    """An HTTP Basic header value with UTF-8 credentials (requests would use latin-1)."""
    raw = f"{username}:{password}".encode("utf-8")
    return "Basic " + base64.b64encode(raw).decode("ascii")


def describe(response: requests.Response) -> str:
    """One line to put in an assertion message: status, headers, body."""
    headers = ", ".join(f"{k}: {v}" for k, v in response.headers.items())
    return (
        f"{response.request.method} {response.url} -> {response.status_code}; "
        f"headers [{headers}]; body {response.text[:500]!r}"
    )


def eventually(
    probe: Callable[[], Any],
    accept: Callable[[Any], bool],
    *,
    within: float,
    what: str,
    interval: float = 0.02,
    show: Callable[[Any], str] = repr,
) -> tuple[Any, float]:
    """Call `probe()` until `accept(result)`; return (result, seconds it took).

    Fails the test when `within` seconds pass first, showing the last result.
    """
    start = time.monotonic()
    while True:
        result = probe()
        elapsed = time.monotonic() - start
        if accept(result):
            return result, elapsed
        if elapsed > within:
            pytest.fail(f"{what}: not reached within {within} s; last result: {show(result)}")
        time.sleep(interval)


# === processes ===


class Service:
    """A server process we started, with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        log: Path,
        stop_signal: int = signal.SIGTERM,
    ):
        self.name = name
        self.argv = argv
        self.log = log
        self.stop_signal = stop_signal
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, url: str, ready: Callable[[requests.Response], bool]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer yet"
        with requests.Session() as session:
            session.trust_env = False
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code is not None:
                    pytest.fail(
                        f"{self.name} exited with status {code} before it was ready "
                        f"(probing {url}); its output:\n{tail(self.log)}"
                    )
                try:
                    response = session.get(url, timeout=2)
                    if ready(response):
                        return
                    last = describe(response)
                except requests.RequestException as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.05)
        pytest.fail(
            f"{self.name} not ready within {READY_TIMEOUT} s (probing {url}; last: {last}); "
            f"its output:\n{tail(self.log)}"
        )

    def stop(self) -> int:
        """`stop_signal`, wait; SIGKILL the process group if it does not exit. Returns the
        status."""
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=STOP_TIMEOUT)
                self._log_file.close()
                raise AssertionError(
                    f"{self.name} did not exit within {STOP_TIMEOUT} s of "
                    f"{signal.Signals(self.stop_signal).name} (killed)"
                )
        self._log_file.close()
        return self.process.returncode


# === database and Redis ===


def pg_connect(dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, autocommit=True, connect_timeout=10
    )


def create_database(name: str) -> None:
    with pg_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(name: str) -> None:
    with pg_connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def copy_database(name: str, template: str) -> None:
    with pg_connect() as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )


def redis_client() -> redis.Redis:
    return redis.Redis(
        host=REDIS_HOST,
        port=REDIS_PORT,
        db=REDIS_DB,
        decode_responses=True,
        socket_timeout=10,
        socket_connect_timeout=10,
    )


# === the stack ===


@dataclass
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"{' '.join(self.argv)} exited {self.returncode}\n"
            f"stdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-4000:]}"
        )


class ManageServer:
    """`djproject/manage_server.py`: runs `manage.py` commands with one stack's settings,
    Django set up once and each command in a child forked from it (see that file)."""

    def __init__(self, env: dict[str, str], log: Path):
        self.log = log
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "manage_server.py"],
            cwd=DJPROJECT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            start_new_session=True,
        )
        self._buffer = b""

    def run(self, argv: list[str], args: tuple[str, ...]) -> "CommandResult":
        """`manage.py <args>`; fails the test when the server has died or the command has not
        answered within COMMAND_TIMEOUT."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(list(args)).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self._fail(f"manage_server exited with status {self.process.wait(timeout=STOP_TIMEOUT)}")
        deadline = time.monotonic() + COMMAND_TIMEOUT
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                self._fail(f"{' '.join(args)} did not answer within {COMMAND_TIMEOUT} s (killed)")
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self._fail(f"manage_server exited with status {self.process.wait(timeout=STOP_TIMEOUT)}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer = json.loads(line)
        return CommandResult(argv, answer["returncode"], answer["stdout"], answer["stderr"])

    def _fail(self, what: str) -> None:
        self._log_file.flush()
        pytest.fail(f"{what}; its output:\n{tail(self.log)}")

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """Ends its input and waits for it to exit; killed if it does not. Its pipes are
        closed either way: the stack that holds it lives as long as the session."""
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
                self.process.wait(timeout=STOP_TIMEOUT)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.kill()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass  # unflushed input to a process that is gone
        self._log_file.close()


@dataclass(repr=False)
class Stack:
    """One Postgres DB + one Redis DB shared by a Django server and a knoxgate server."""

    settings: Settings
    db_name: str
    logdir: Path
    redis_url: str
    django_env: dict[str, str]
    knoxgate_env: dict[str, str] = field(default_factory=dict)
    django_url: str = ""
    knoxgate_url: str = ""
    admin_url: str = ""
    services: list[Service] = field(default_factory=list)
    #: the running `knoxgate serve`, if any
    knoxgate: Service | None = None
    #: runs the stack's management commands (those without extra environment)
    manage_server: ManageServer | None = None
    http: requests.Session = field(default_factory=requests.Session)
    redis: redis.Redis = field(default_factory=redis_client)

    def __repr__(self) -> str:
        return f"Stack({self.db_name}, {self.settings})"

    def __post_init__(self) -> None:
        # Only 127.0.0.1 is ever contacted; never route through a proxy from the environment.
        self.http.trust_env = False

    # --- Django management commands ---

    def run_manage(self, *args: str, env: dict[str, str] | None = None) -> CommandResult:
        """`manage.py <args>` with the stack's settings, plus `env` if given (then in a
        process of its own, since the manage server's Django was set up without it)."""
        argv = [sys.executable, "manage.py", *args]
        if not env and self.manage_server is not None:
            return self.manage_server.run(argv, args)
        completed = subprocess.run(
            argv,
            cwd=DJPROJECT,
            env={**base_env(), **self.django_env, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        return CommandResult(argv, completed.returncode, completed.stdout, completed.stderr)

    def interop(self, action: str, *args: str, env: dict[str, str] | None = None) -> dict:
        """Run `manage.py interop <action> ...` and return its JSON output."""
        result = self.run_manage("interop", action, *args, env=env)
        assert result.returncode == 0, f"management command failed: {result}"
        return json.loads(result.stdout.strip().splitlines()[-1])

    def create_user(
        self,
        username: str,
        password: str,
        *,
        tokens: int = 0,
        ttl: str = "default",
        inactive: bool = False,
        env: dict[str, str] | None = None,
    ) -> dict:
        args = ["--username", username, "--password", password, "--tokens", str(tokens), "--ttl", ttl]
        if inactive:
            args.append("--inactive")
        return self.interop("create-user", *args, env=env)

    # --- direct reads (fast enough to poll) ---

    def sql(self, query: str, *params: Any) -> list[tuple]:
        with pg_connect(self.db_name) as conn:
            return conn.execute(query, params).fetchall()

    def token_rows(self, token_key: str) -> list[dict]:
        rows = self.sql(
            "SELECT digest, token_key, user_id, created, expiry FROM knox_authtoken "
            "WHERE token_key = %s",
            token_key,
        )
        names = ("digest", "token_key", "user_id", "created", "expiry")
        return [dict(zip(names, row)) for row in rows]

    def token_count(self, user_id: int | None = None) -> int:
        if user_id is None:
            return self.sql("SELECT count(*) FROM knox_authtoken")[0][0]
        return self.sql("SELECT count(*) FROM knox_authtoken WHERE user_id = %s", user_id)[0][0]

    # --- Django over HTTP ---

    def django_login(self, username: str, password: str) -> requests.Response:
        return self.http.post(
            self.django_url + "/api/auth/login/",
            headers={"Authorization": basic_auth(username, password)},
            timeout=HTTP_TIMEOUT,
        )

    def django_protected(self, token: str) -> requests.Response:
        return self.http.get(
            self.django_url + "/api/protected/",
            headers={"Authorization": f"Token {token}"},
            timeout=HTTP_TIMEOUT,
        )

    def django_logout(self, token: str) -> requests.Response:
        return self._post_with_token(self.django_url + "/api/auth/logout/", token)

    def django_logout_all(self, token: str) -> requests.Response:
        return self._post_with_token(self.django_url + "/api/auth/logoutall/", token)

    # --- knoxgate over HTTP ---

    def verify(self, token: str, method: str = "GET") -> requests.Response:
        return self.http.request(
            method,
            self.knoxgate_url + "/verify",
            headers={"Authorization": f"Token {token}"},
            timeout=HTTP_TIMEOUT,
        )

    def login(self, username: str, password: str) -> requests.Response:
        return self.http.post(
            self.knoxgate_url + "/api/auth/login/",
            headers={"Authorization": basic_auth(username, password)},
            timeout=HTTP_TIMEOUT,
        )

    def login_json(self, username: str, password: str) -> requests.Response:
        return self.http.post(
            self.knoxgate_url + "/api/auth/login/",
            json={"username": username, "password": password},
            timeout=HTTP_TIMEOUT,
        )

    def logout(self, token: str) -> requests.Response:
        return self._post_with_token(self.knoxgate_url + "/api/auth/logout/", token)

    def logout_all(self, token: str) -> requests.Response:
        return self._post_with_token(self.knoxgate_url + "/api/auth/logoutall/", token)

    def start_knoxgate(self) -> None:
        """`knoxgate serve`; returns once /readyz answers 200."""
        assert self.knoxgate is None, "knoxgate is already running"
        runs = sum(1 for s in self.services if s.name == "knoxgate")
        server = Service(
            "knoxgate",
            [str(knoxgate_binary()), "serve"],
            env={**base_env(), **self.knoxgate_env},
            cwd=REPO,
            log=self.logdir / ("knoxgate.log" if runs == 0 else f"knoxgate-{runs + 1}.log"),
        )
        self.services.append(server)
        self.knoxgate = server
        server.wait_ready(self.admin_url + "/readyz", lambda r: r.status_code == 200)

    def stop_knoxgate(self) -> None:
        """SIGTERM; knoxgate must exit with status 0."""
        server, self.knoxgate = self.knoxgate, None
        assert server is not None, "knoxgate is not running"
        code = server.stop()
        assert code == 0, f"knoxgate exited with status {code} after SIGTERM (expected 0)"

    def knoxgate_migrate(self) -> CommandResult:
        return run_knoxgate_migrate(self.knoxgate_env, self.logdir / "knoxgate-migrate-again.log")

    def _post_with_token(self, url: str, token: str) -> requests.Response:
        return self.http.post(url, headers={"Authorization": f"Token {token}"}, timeout=HTTP_TIMEOUT)


def base_env() -> dict[str, str]:
    """The environment children inherit: ours, minus anything that would configure them.

    knoxgate refuses to start on a KNOXGATE_* variable that is not a config key, so even
    KNOXGATE_BIN / KNOXGATE_VENV must not reach it.
    """
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("KNOXGATE_", "DJ_", "DJANGO_"))
    }


def run_knoxgate_migrate(env: dict[str, str], log: Path) -> CommandResult:
    argv = [str(knoxgate_binary()), "migrate"]
    completed = subprocess.run(
        argv,
        env={**base_env(), **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    log.write_text(f"$ knoxgate migrate\n--- stdout\n{completed.stdout}\n--- stderr\n{completed.stderr}")
    return CommandResult(argv, completed.returncode, completed.stdout, completed.stderr)


STACKS = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def knoxgate_bin() -> Path:
    """The knoxgate binary; a clear failure (not a skip) when it is missing or broken."""
    path = knoxgate_binary()
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"knoxgate binary not found or not executable at {path}. Build it (cargo build) "
            f"or point KNOXGATE_BIN at it. Django-only harness tests: pytest -m 'not knoxgate'.",
            pytrace=False,
        )
    try:
        subprocess.run(
            [str(path), "--help"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=True
        )
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.fail(f"{path} --help failed: {exc}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def migrated_database() -> Callable[[Settings], str]:
    """Factory: the name of a database that Django's `migrate` ran on once in this run, for
    the settings' INSTALLED_APPS (which only `knox_redis` changes). Each stack's database is a
    copy of it (`CREATE DATABASE ... TEMPLATE`, ~0.1 s against ~2 s for `migrate`). Dropped at
    the end of the run."""
    made: dict[bool, str] = {}
    created: list[str] = []

    def migrated(settings: Settings) -> str:
        if settings.knox_redis not in made:
            name = f"knoxgate_interop_template_{secrets.token_hex(4)}"
            create_database(name)
            created.append(name)
            env = {**base_env(), **settings.django_env(name, f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}")}
            argv = [sys.executable, "manage.py", "migrate", "--no-input", "--verbosity", "0"]
            completed = subprocess.run(
                argv, cwd=DJPROJECT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=COMMAND_TIMEOUT,
            )
            result = CommandResult(argv, completed.returncode, completed.stdout, completed.stderr)
            assert result.returncode == 0, f"Django migrate of {name} failed: {result}"
            # Only now: after a failed migrate, the next stack tries again (and fails as
            # plainly) rather than copying a half-migrated template.
            made[settings.knox_redis] = name
        return made[settings.knox_redis]

    yield migrated
    for name in created:
        drop_database(name)


@pytest.fixture
def start_stack(request, tmp_path, migrated_database) -> Callable[..., Stack]:
    """Factory: `start_stack(**Settings fields, django=True, knoxgate=True, knoxgate_env={})`.

    `knoxgate_env` adds KNOXGATE_* variables beyond those derived from the settings.

    A test starts at most one stack (they share the suite's Redis DB).
    """
    stacks: list[Stack] = []
    request.node.stash[STACKS] = stacks
    cleanups: list[tuple[str, Callable[[], None]]] = []

    def start(
        *,
        django: bool = True,
        knoxgate: bool = True,
        knoxgate_env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> Stack:
        assert not stacks, "one stack per test: they would share the Redis DB"
        if knoxgate:
            request.getfixturevalue("knoxgate_bin")
        settings = replace(Settings(), **overrides)
        db_name = f"knoxgate_interop_{secrets.token_hex(6)}"
        redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
        logdir = tmp_path / "logs"
        logdir.mkdir(exist_ok=True)
        stack = Stack(
            settings=settings,
            db_name=db_name,
            logdir=logdir,
            redis_url=redis_url,
            django_env=settings.django_env(db_name, redis_url),
        )
        stacks.append(stack)
        cleanups.append(("close Redis client", stack.redis.close))

        stack.redis.flushdb()
        cleanups.append(("flush Redis", stack.redis.flushdb))

        template = migrated_database(settings)
        copy_database(db_name, template)
        cleanups.append((f"drop database {db_name}", lambda: drop_database(db_name)))

        # Set up while the servers start; the stack's management commands then skip Django's
        # start-up.
        stack.manage_server = ManageServer(
            {**base_env(), **stack.django_env}, logdir / "manage-server.log"
        )
        cleanups.append(("stop manage server", stack.manage_server.stop))

        if django:
            port = free_port()
            gunicorn = Service(
                "Django (gunicorn)",
                [
                    sys.executable, "-m", "gunicorn", "djproject.wsgi:application",
                    "--bind", f"127.0.0.1:{port}",
                    "--workers", "1", "--worker-class", "gthread", "--threads", "4",
                    "--timeout", "60", "--graceful-timeout", "5",
                    "--access-logfile", "-", "--error-logfile", "-",
                    # gunicorn's control socket lives at a fixed path under $HOME: not for tests
                    "--no-control-socket",
                ],
                env={**base_env(), **stack.django_env},
                cwd=DJPROJECT,
                log=logdir / "django.log",
                # gunicorn's quick shutdown: its graceful one waits up to a second for each
                # worker's poll loop, and no test looks at how Django stops.
                stop_signal=signal.SIGQUIT,
            )
            stack.services.append(gunicorn)
            cleanups.append(("stop Django", gunicorn.stop))
            stack.django_url = f"http://127.0.0.1:{port}"
            # Any DRF answer means Django is serving; the protected view answers 401 unauthenticated.
            gunicorn.wait_ready(stack.django_url + "/api/protected/", lambda r: r.status_code == 401)

        if knoxgate:
            listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            stack.knoxgate_env = {
                **settings.knoxgate_env(db_name, redis_url, listen, admin),
                **(knoxgate_env or {}),
            }
            stack.knoxgate_url = f"http://{listen}"
            stack.admin_url = f"http://{admin}"
            migrated = run_knoxgate_migrate(stack.knoxgate_env, logdir / "knoxgate-migrate.log")
            assert migrated.returncode == 0, f"knoxgate migrate failed: {migrated}"

            def stop_knoxgate() -> None:
                if stack.knoxgate is not None:
                    stack.stop_knoxgate()

            cleanups.append(("stop knoxgate", stop_knoxgate))
            stack.start_knoxgate()
        return stack

    yield start

    # Idle keep-alive connections would hold up the servers' graceful stop.
    for stack in stacks:
        stack.http.close()
    # Tear down in reverse order; run every step even if one fails, then report the failures.
    failures = []
    for what, cleanup in reversed(cleanups):
        try:
            cleanup()
        except Exception as exc:  # noqa: BLE001 - collected and re-raised below
            failures.append(f"{what}: {exc}")
    if failures:
        pytest.fail("teardown: " + "; ".join(failures), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the servers' logs to the report of a failing test (or teardown)."""
    report = yield
    if report.failed:
        for stack in item.stash.get(STACKS, []):
            for name in sorted(p.name for p in stack.logdir.glob("*.log")):
                report.sections.append((f"{name} ({stack.db_name})", tail(stack.logdir / name)))
    return report
