"""Spoofed spellings through real servers: gunicorn (WSGI) and uvicorn (ASGI) serving the test
project, spoken to over raw sockets so that nothing on the client side merges or drops headers.

Whatever a server does with an underscore twin or a second copy (drop it, merge it, refuse the
request), the client's value must never become the identity.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import AUDIENCE, HERE, new_key, spare_port, write_jwks

PROXY_ID, CLIENT_ID = "5", "7"


def raw_get(port: int, path: str, headers: list[tuple[str, str]]) -> tuple[int, dict | None]:
    """GET with exactly these header lines, in this order (http.client's putheader adds each
    line as given; nothing merges, drops or renames them on this side)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, None


@pytest.fixture(scope="module", params=["gunicorn", "uvicorn"])
def server(request, tmp_path_factory):
    yield from _serve(request.param, tmp_path_factory, {})


@pytest.fixture(scope="module")
def signing_key():
    return new_key("ES256")


@pytest.fixture(scope="module", params=["gunicorn", "uvicorn"])
def signed_server(request, tmp_path_factory, signing_key):
    """The same servers with REQUIRE_ASSERTION on and signing_key's JWKS."""
    jwks = write_jwks(tmp_path_factory.mktemp("jwks") / "jwks.json", signing_key)
    yield from _serve(request.param, tmp_path_factory, {"KGTEST_JWKS_FILE": str(jwks), "KGTEST_AUDIENCE": AUDIENCE})


def _serve(kind, tmp_path_factory, extra_env):
    port = spare_port()
    log = tmp_path_factory.mktemp(kind) / "server.log"
    if kind == "gunicorn":
        argv = [sys.executable, "-m", "gunicorn", "kgtest.wsgi:application", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    else:
        argv = [sys.executable, "-m", "uvicorn", "kgtest.asgi:application", "--host", "127.0.0.1", "--port", str(port), "--no-proxy-headers"]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "kgtest.settings", "PYTHONPATH": str(HERE), **extra_env}
    with open(log, "wb") as logf:
        proc = subprocess.Popen(argv, cwd=HERE, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                raw_get(port, "/plain/whoami", [])
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{kind} did not start:\n{log.read_text()}")
                time.sleep(0.1)
        yield kind, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def identity(result: tuple[int, dict | None]) -> str | None:
    """The user id a response shows, or None when not authenticated (anonymous, 400 or 401)."""
    status, body = result
    if status == 200 and body and body["authenticated"]:
        return str(body["id"])
    assert status in (200, 400, 401), result
    return None


@pytest.mark.parametrize("path", ["/plain/whoami", "/api/open"])
def test_plain_header(server, path):
    _, port = server
    assert identity(raw_get(port, path, [("X-Auth-User-Id", PROXY_ID)])) == PROXY_ID
    assert identity(raw_get(port, path, [])) is None


@pytest.mark.parametrize("path", ["/plain/whoami", "/api/open"])
@pytest.mark.parametrize(
    "headers",
    [
        [("X_Auth_User_Id", CLIENT_ID)],
        [("X-Auth-User-Id", PROXY_ID), ("X_Auth_User_Id", CLIENT_ID)],
        [("X_Auth_User_Id", CLIENT_ID), ("X-Auth-User-Id", PROXY_ID)],
        [("X-Auth-User-Id", CLIENT_ID), ("X-Auth-User-Id", PROXY_ID)],
        [("X-Auth-User-Id", PROXY_ID), ("x-auth-user-id", CLIENT_ID)],
    ],
)
def test_client_copy_never_wins(server, path, headers):
    _, port = server
    got = identity(raw_get(port, path, headers))
    assert got != CLIENT_ID
    if any(n.lower() == "x-auth-user-id" for n, v in headers if v == CLIENT_ID):
        # two hyphenated copies: merged by the server, refused by the package
        assert got is None


@pytest.mark.parametrize("path", ["/plain/whoami", "/api/open"])
def test_a_client_assertion_never_wins(signed_server, signing_key, path):
    """REQUIRE_ASSERTION through real servers: the proxy's assertion names PROXY_ID; a client's
    copy, genuine but captured for CLIENT_ID, comes as an underscore twin or a second copy."""
    _, port = signed_server
    proxy, client = signing_key.sign(PROXY_ID), signing_key.sign(CLIENT_ID)
    assert identity(raw_get(port, path, [("X-Auth-Assertion", proxy)])) == PROXY_ID
    for headers in (
        [("X_Auth_Assertion", client)],
        [("X-Auth-Assertion", proxy), ("X_Auth_Assertion", client)],
        [("X_Auth_Assertion", client), ("X-Auth-Assertion", proxy)],
        [("X-Auth-Assertion", proxy), ("X-Auth-Assertion", client)],
    ):
        got = identity(raw_get(port, path, headers))
        assert got != CLIENT_ID, headers
        if [n for n, _ in headers].count("X-Auth-Assertion") == 2:
            # two copies: merged by the server, refused by the package
            assert got is None, headers
