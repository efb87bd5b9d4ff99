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

from conftest import HERE, spare_port

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
    port = spare_port()
    log = tmp_path_factory.mktemp(request.param) / "server.log"
    if request.param == "gunicorn":
        argv = [sys.executable, "-m", "gunicorn", "kgtest.wsgi:application", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    else:
        argv = [sys.executable, "-m", "uvicorn", "kgtest.asgi:application", "--host", "127.0.0.1", "--port", str(port), "--no-proxy-headers"]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "kgtest.settings", "PYTHONPATH": str(HERE)}
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
                    pytest.fail(f"{request.param} did not start:\n{log.read_text()}")
                time.sleep(0.1)
        yield request.param, port
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
