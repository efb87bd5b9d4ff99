#!/usr/bin/env python3
"""Assertions of the e2e suite; tests/e2e/run.sh starts everything and calls this.

Talks to the running processes only (stdlib http.client): each proxy in front of knoxgate and
echo_upstream.py, knoxgate directly, a second knoxgate with verify.allow_cors_preflight = true,
and the upstream's control path to count the requests that reached it. Near the end it kills the
main knoxgate (SIGKILL, by pid) and checks that every proxy then fails closed.

Prints one `ok - ...` / `not ok - ...` line per check and writes `N passed, M failed` to
--summary (run.sh prints it last, after any diagnostics). Exits 1 when a check failed.
"""
import argparse
import base64
import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time

TIMEOUT = 10  # seconds, per request
SPOOF = "999"
ID_SPELLINGS = ("X-Auth-User-Id", "X_Auth_User_Id", "x-auth-user-id", "x_auth_user_id",
                # mixed: a WSGI server that maps underscores reads these as X-Auth-User-Id too
                "X-Auth_User-Id", "X_Auth-User_Id", "x-auth-user_id")
# The other identity headers knoxgate can send (by their suggested names). The knoxgate here
# sends none of them, so the upstream must never see any, whatever the client adds.
OTHER_IDENTITY = ("X-Auth-Username", "X-Auth-Email", "X-Auth-Assertion", "X-Auth-User-Staff",
                  "X-Auth-User-Superuser", "X-Auth-User-Groups")
FORGED_IDENTITY = ([(h, SPOOF) for h in OTHER_IDENTITY] + [(h.replace("-", "_"), SPOOF) for h in OTHER_IDENTITY]
                   + [(h.replace("-", "_", 2).replace("_", "-", 1), SPOOF) for h in OTHER_IDENTITY])


class Result:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # [(name, value)] as received
        self.body = body

    def header(self, name):
        """All values of a response header, case-insensitively."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def __repr__(self):
        return f"status={self.status} headers={self.headers} body={self.body[:300]!r}"


def request(base, method, path, headers=(), body=None, host=True):
    """One request on a fresh connection, sending exactly `headers` (plus Host unless host is
    False, and Content-Length when there is a body)."""
    hostport = base.split("://", 1)[-1].rstrip("/")
    h, p = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(h, int(p), timeout=TIMEOUT)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        names = {k.lower() for k, _ in headers}
        if host and "host" not in names:
            conn.putheader("Host", hostport)
        for k, v in headers:
            conn.putheader(k, v)
        if body is not None and "content-length" not in names:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
        return Result(r.status, r.getheaders(), data)
    finally:
        conn.close()


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, cond, detail=""):
        if cond:
            self.passed += 1
            print(f"ok - {name}", flush=True)
        else:
            self.failed += 1
            print(f"not ok - {name}", flush=True)
            if detail:
                for line in str(detail).splitlines():
                    print(f"#   {line}", flush=True)
        return bool(cond)

    def run(self, name, fn):
        """Runs fn() -> (cond, detail); an exception is a failure of that check."""
        try:
            cond, detail = fn()
        except Exception as e:  # noqa: BLE001 - any error fails this check, not the suite
            cond, detail = False, f"{type(e).__name__}: {e}"
        return self.check(name, cond, detail)


class Upstream:
    def __init__(self, base):
        self.base = base

    def requests(self):
        r = request(self.base, "GET", "/__e2e__/requests")
        assert r.status == 200, r
        return json.loads(r.body)

    def hits(self):
        return len(self.requests())


def id_values(record):
    """Every value the upstream got under any spelling of X-Auth-User-Id."""
    return [v for k, v in record["headers"] if k.lower().replace("_", "-") == "x-auth-user-id"]


def other_identity(record):
    """The headers of OTHER_IDENTITY (any spelling) the upstream got."""
    names = {h.lower() for h in OTHER_IDENTITY}
    return [(k, v) for k, v in record["headers"] if k.lower().replace("_", "-") in names]


def token_auth(token):
    return ("Authorization", f"Token {token}")


def basic_auth(user, password):
    return ("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())


def bogus_token():
    return secrets.token_hex(32)  # knox's shape (64 hex chars), in no database


def proxy_checks(c, name, base, up, users, password):
    alice, bob = users["alice"], users["bob"]

    def passes(user, extra=(), method="GET", path="/api/orders?x=1", body=None):
        def fn():
            before = up.hits()
            r = request(base, method, path, [token_auth(user["token"]), *extra], body)
            rec = r.json() if r.status == 200 else None
            after = up.hits()
            ok = (
                r.status == 200
                and isinstance(rec, dict)
                and rec.get("method") == method
                and id_values(rec) == [user["id"]]
                and after == before + 1
            )
            return ok, f"client got {r!r}\nupstream hits {before} -> {after}"
        return fn

    def refused(headers, statuses=(401,), www_auth="Token", method="GET", path="/api/orders?x=1", body=None):
        def fn():
            before = up.hits()
            r = request(base, method, path, headers, body)
            after = up.hits()
            ok = r.status in statuses and after == before
            if www_auth is not None:
                ok = ok and r.header("WWW-Authenticate") == [www_auth]
            return ok, f"client got {r!r}\nupstream hits {before} -> {after}"
        return fn

    c.run(f"{name}: a valid token reaches the upstream with X-Auth-User-Id: {alice['id']} (alice)", passes(alice))
    c.run(f"{name}: another user's token reaches the upstream with X-Auth-User-Id: {bob['id']} (bob)", passes(bob))
    c.run(f"{name}: a POST with a body and a valid token reaches the upstream as a POST",
          passes(alice, [("Content-Type", "application/json")], "POST", "/api/orders", b'{"item": 1}'))
    for spelling in ID_SPELLINGS:
        c.run(f"{name}: valid token + client `{spelling}: {SPOOF}` -> upstream gets only X-Auth-User-Id: {alice['id']}",
              passes(alice, [(spelling, SPOOF)]))
    c.run(f"{name}: valid token + every spelling of a client X-Auth-User-Id at once -> upstream gets only {alice['id']}",
          passes(alice, [(s, SPOOF) for s in ID_SPELLINGS]))
    for spelling in ID_SPELLINGS:
        c.run(f"{name}: no token + client `{spelling}: {SPOOF}` -> 401 + WWW-Authenticate: Token, upstream not reached",
              refused([(spelling, SPOOF)]))
    c.run(f"{name}: no token, POST with a body -> 401, upstream not reached",
          refused([("Content-Type", "application/json")], method="POST", path="/api/orders", body=b'{"item": 1}'))
    c.run(f"{name}: invalid token + client X-Auth-User-Id: {SPOOF} -> 401 + WWW-Authenticate: Token, upstream not reached",
          refused([token_auth(bogus_token()), ("X-Auth-User-Id", SPOOF)]))
    c.run(f"{name}: malformed Authorization (`Token` with no key) -> 401 + WWW-Authenticate: Token, upstream not reached",
          refused([("Authorization", "Token")]))

    # Login goes straight to knoxgate, without a token, and never reaches the upstream.
    login = {}

    def do_login():
        before = up.hits()
        r = request(base, "POST", "/api/auth/login/", [basic_auth("alice", password)], b"")
        after = up.hits()
        doc = r.json() if r.status == 200 else None
        ok = isinstance(doc, dict) and isinstance(doc.get("token"), str) and doc["token"] and "expiry" in doc
        ok = ok and after == before
        if ok:
            login["token"] = doc["token"]
        return ok, f"client got {r!r}\nupstream hits {before} -> {after}"

    c.run(f"{name}: POST /api/auth/login/ with Basic alice:<password> and no token -> 200 {{expiry, token}}, upstream not reached",
          do_login)

    def login_token_passes():
        if "token" not in login:
            return False, "login failed, no token to try"
        return passes({"id": alice["id"], "token": login["token"]})()

    c.run(f"{name}: the token returned by login passes: upstream gets X-Auth-User-Id: {alice['id']}", login_token_passes)
    def logout_revokes():
        if "token" not in login:
            return False, "login failed, no token to log out"
        tok = login["token"]
        before = up.hits()
        r = request(base, "POST", "/api/auth/logout/", [token_auth(tok)], b"")
        mid = up.hits()
        r2 = request(base, "GET", "/api/orders", [token_auth(tok)])
        after = up.hits()
        ok = r.status == 204 and r2.status == 401 and r2.header("WWW-Authenticate") == ["Token"] and after == before
        return ok, f"logout: {r!r}\nafter logout: {r2!r}\nupstream hits {before} -> {mid} -> {after}"

    c.run(f"{name}: POST /api/auth/logout/ with that token -> 204, then the token gets 401; upstream not reached",
          logout_revokes)
    c.run(f"{name}: login with a wrong password -> 401 (Basic), upstream not reached",
          refused([basic_auth("alice", password + "-wrong")], www_auth=None, method="POST",
                  path="/api/auth/login/", body=b""))


def policy_checks(c, name, base, up, users):
    """Per-route policy through the proxy: /staff/ (require=staff), /public/ (anonymous=allow),
    and a client's own policy parameters on every route (never read)."""
    alice, bob = users["alice"], users["bob"]  # bob is staff (run.sh)

    def through(path, headers, status, uid, www_auth=None):
        """`uid`: the X-Auth-User-Id values the upstream must get ([] = none at all), or None
        when the upstream must not be reached."""
        def fn():
            before = up.hits()
            r = request(base, "GET", path, headers)
            after = up.hits()
            rec = r.json() if r.status == 200 else None
            ok = r.status == status
            if uid is None:
                ok = ok and after == before
            else:
                ok = ok and isinstance(rec, dict) and id_values(rec) == uid and after == before + 1
            if www_auth is not None:
                ok = ok and r.header("WWW-Authenticate") == [www_auth]
            return ok, f"client got {r!r}\nupstream hits {before} -> {after}"
        return fn

    spoof = ("X-Auth-User-Id", SPOOF)
    c.run(f"{name}: /staff/ (require=staff), staff token -> upstream gets X-Auth-User-Id: {bob['id']}",
          through("/staff/reports", [token_auth(bob["token"])], 200, [bob["id"]]))
    c.run(f"{name}: /staff/, a valid non-staff token -> 403, upstream not reached",
          through("/staff/reports", [token_auth(alice["token"]), spoof], 403, None))
    c.run(f"{name}: /staff/, no token -> 401 + WWW-Authenticate: Token, upstream not reached",
          through("/staff/reports", [], 401, None, "Token"))
    c.run(f"{name}: /public/ (anonymous=allow), no token + client X-Auth-User-Id: {SPOOF} -> upstream reached with no X-Auth-User-Id",
          through("/public/page", [spoof], 200, []))
    c.run(f"{name}: /public/, valid token -> upstream gets X-Auth-User-Id: {alice['id']}",
          through("/public/page", [token_auth(alice["token"])], 200, [alice["id"]]))
    c.run(f"{name}: /public/, invalid token -> 401 (DRF authenticates before permissions), upstream not reached",
          through("/public/page", [token_auth(bogus_token())], 401, None, "Token"))
    # The client's own query string never becomes a policy.
    for path in ("/api/orders?anonymous=allow", "/api/orders?x=1&anonymous=allow&anonymous=allow",
                 "/api/orders;anonymous=allow", "/api/orders%3Fanonymous=allow", "/staff/reports?anonymous=allow",
                 "/api/anonymous=allow"):
        c.run(f"{name}: injection `{path}` without a token -> 401, upstream not reached",
              through(path, [], 401, None, "Token"))
    for path in ("/staff/reports?require=superuser", "/staff/reports?anonymous=yes", "/api/orders?require=staff"):
        want = 403 if path.startswith("/staff/") else 200
        c.run(f"{name}: `{path}` with alice's token -> {want} as the route's own rule says (client parameters ignored)",
              through(path, [token_auth(alice["token"])], want, None if want == 403 else [alice["id"]]))

    def no_forged_identity(path, headers, uid):
        def fn():
            r = request(base, "GET", path, [*headers, *FORGED_IDENTITY])
            rec = r.json() if r.status == 200 else None
            ok = r.status == 200 and isinstance(rec, dict) and id_values(rec) == uid and not other_identity(rec)
            return ok, f"client got {r!r}\nupstream saw {other_identity(rec) if isinstance(rec, dict) else None}"
        return fn

    every = "client copies of every other identity header (username, email, assertion, staff, superuser, groups; both spellings)"
    c.run(f"{name}: /api/orders, valid token + {every} -> upstream gets none of them",
          no_forged_identity("/api/orders", [token_auth(alice["token"])], [alice["id"]]))
    c.run(f"{name}: /staff/, staff token + {every} -> upstream gets none of them",
          no_forged_identity("/staff/reports", [token_auth(bob["token"])], [bob["id"]]))
    c.run(f"{name}: /public/, no token + {every} -> upstream gets none of them",
          no_forged_identity("/public/page", [], []))
    c.run(f"{name}: /public/, valid token + {every} -> upstream gets none of them",
          no_forged_identity("/public/page", [token_auth(alice["token"])], [alice["id"]]))


def proxy_down_checks(c, name, base, up, users):
    alice = users["alice"]

    def fn(headers, method="GET", path="/api/orders?x=1", body=None):
        def inner():
            before = up.hits()
            r = request(base, method, path, headers, body)
            after = up.hits()
            return 500 <= r.status <= 599 and after == before, f"client got {r!r}\nupstream hits {before} -> {after}"
        return inner

    c.run(f"{name}: knoxgate stopped -> a valid token gets a 5xx, upstream not reached", fn([token_auth(alice["token"])]))
    c.run(f"{name}: knoxgate stopped -> valid token + client X-Auth-User-Id: {SPOOF} gets a 5xx, upstream not reached",
          fn([token_auth(alice["token"]), ("X-Auth-User-Id", SPOOF)]))
    c.run(f"{name}: knoxgate stopped -> no token gets a 5xx, upstream not reached", fn([]))
    c.run(f"{name}: knoxgate stopped -> login gets a 5xx, upstream not reached",
          fn([basic_auth("alice", "x")], "POST", "/api/auth/login/", b""))


def traefik_headers(auth):
    # What Traefik's forwardAuth sends (pkg/middlewares/auth/forward.go): GET to the address, the
    # client's headers (minus hop-by-hop), X-Forwarded-*, Go's client defaults.
    h = [
        ("User-Agent", "Go-http-client/1.1"),
        ("Accept", "application/json"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-Host", "app.example.com"),
        ("X-Forwarded-Method", "POST"),
        ("X-Forwarded-Port", "443"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Server", "traefik-7d9f"),
        ("X-Forwarded-Uri", "/api/orders?x=1"),
        ("X-Real-Ip", "203.0.113.7"),
        ("Accept-Encoding", "gzip"),
    ]
    if auth:
        h.insert(1, ("Authorization", auth))
    return h


def envoy_headers(knoxgate, auth):
    # What Envoy's ext_authz HTTP service sends by default: the original method, path_prefix +
    # original path, Content-Length: 0, and of the client's headers only Authorization and Host.
    h = [("Host", "app.example.com")]
    if auth:
        h.append(("Authorization", auth))
    h.append(("Content-Length", "0"))
    return h


def direct_checks(c, kg, users):
    alice = users["alice"]
    good, bad = f"Token {alice['token']}", f"Token {bogus_token()}"

    def allowed(r):
        return r.status == 200 and r.header("X-Auth-User-Id") == [alice["id"]], repr(r)

    def denied(r):
        return r.status == 401 and r.header("WWW-Authenticate") == ["Token"] and not r.header("X-Auth-User-Id"), repr(r)

    c.run(f"knoxgate direct, Traefik ForwardAuth shape (GET /verify + X-Forwarded-*), valid token -> 200 X-Auth-User-Id: {alice['id']}",
          lambda: allowed(request(kg, "GET", "/verify", traefik_headers(good))))
    c.run("knoxgate direct, Traefik ForwardAuth shape, invalid token -> 401 + WWW-Authenticate: Token",
          lambda: denied(request(kg, "GET", "/verify", traefik_headers(bad))))
    c.run("knoxgate direct, Traefik ForwardAuth shape, no token -> 401 + WWW-Authenticate: Token",
          lambda: denied(request(kg, "GET", "/verify", traefik_headers(None))))
    for method in ("POST", "DELETE", "PUT", "PATCH", "GET"):
        c.run(f"knoxgate direct, Envoy ext_authz shape ({method} /verify/api/orders?x=1, Content-Length: 0, "
              f"Authorization + Host only), valid token -> 200 X-Auth-User-Id: {alice['id']}",
              lambda m=method: allowed(request(kg, m, "/verify/api/orders?x=1", envoy_headers(kg, good), b"")))
    for method in ("POST", "DELETE"):
        c.run(f"knoxgate direct, Envoy ext_authz shape ({method}), invalid token -> 401 + WWW-Authenticate: Token",
              lambda m=method: denied(request(kg, m, "/verify/api/orders?x=1", envoy_headers(kg, bad), b"")))
    c.run("knoxgate direct, Envoy ext_authz shape (POST), no token -> 401 + WWW-Authenticate: Token",
          lambda: denied(request(kg, "POST", "/verify/api/orders?x=1", envoy_headers(kg, None), b"")))
    # Envoy's path_prefix form: what follows /verify is the client's, policy parameters included.
    for path in ("/verify/api/orders?anonymous=allow", "/verify/?anonymous=allow", "/verify/api;anonymous=allow",
                 "/verify/api%3Fanonymous=allow"):
        c.run(f"knoxgate direct, Envoy ext_authz shape, client policy `{path}`, no token -> 401",
              lambda p=path: denied(request(kg, "GET", p, envoy_headers(kg, None), b"")))
    c.run("knoxgate direct, Traefik address /verify?require=staff, non-staff token -> 403 with DRF's detail",
          lambda: (lambda r: (r.status == 403 and r.json() == {"detail": "You do not have permission to perform this action."},
                              repr(r)))(request(kg, "GET", "/verify?require=staff", traefik_headers(good))))
    c.run("knoxgate direct, Traefik address /verify?anonymous=allow, no token -> 200 without X-Auth-User-Id",
          lambda: (lambda r: (r.status == 200 and not r.header("X-Auth-User-Id"), repr(r)))(
              request(kg, "GET", "/verify?anonymous=allow", traefik_headers(None))))
    c.run("knoxgate direct, a bad policy parameter (/verify?require=admin) -> 500, never 2xx or 401",
          lambda: (lambda r: (r.status == 500, repr(r)))(request(kg, "GET", "/verify?require=admin", traefik_headers(good))))
    c.run(f"knoxgate direct, Envoy ext_authz shape (HEAD), valid token -> 200 X-Auth-User-Id: {alice['id']}",
          lambda: allowed(request(kg, "HEAD", "/verify/api/orders?x=1", envoy_headers(kg, good), b"")))
    c.run(f"knoxgate direct, Traefik forwardBody (POST /verify with a JSON body), valid token -> 200 X-Auth-User-Id: {alice['id']}",
          lambda: allowed(request(kg, "POST", "/verify", [*traefik_headers(good), ("Content-Type", "application/json")],
                                  b'{"item": 1}')))

    def stale_content_length():
        # nginx auth_request shares the client's headers with the subrequest; without
        # `proxy_set_header Content-Length ""` knoxgate gets a Content-Length and no body.
        hostport = kg.split("://", 1)[-1]
        h, p = hostport.rsplit(":", 1)
        with socket.create_connection((h, int(p)), timeout=3) as s:
            s.sendall(f"GET /verify HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: {good}\r\n"
                      f"Content-Length: 11\r\n\r\n".encode())
            s.settimeout(3)
            head = s.recv(4096).decode("latin-1")
        return head.startswith("HTTP/1.1 200") and f"x-auth-user-id: {alice['id']}" in head.lower(), head

    c.run("knoxgate direct, GET /verify with a stale Content-Length: 11 and no body -> 200 within 3 s (body never read)",
          stale_content_length)
    # django-rest-knox compatibility of the Authorization header (knox/auth.py: split(), keyword
    # compared case-insensitively, undecodable bytes -> 401).
    c.run(f"knoxgate direct, `Authorization: token <key>` (lower-case keyword, as knox accepts) -> 200 X-Auth-User-Id: {alice['id']}",
          lambda: allowed(request(kg, "GET", "/verify", [("Authorization", f"token {alice['token']}")])))
    c.run(f"knoxgate direct, `Authorization: Token  <key>` (two spaces, as knox's split() accepts) -> 200 X-Auth-User-Id: {alice['id']}",
          lambda: allowed(request(kg, "GET", "/verify", [("Authorization", f"Token  {alice['token']}")])))
    c.run("knoxgate direct, `Authorization: Token <key> extra` (three parts) -> 401",
          lambda: denied(request(kg, "GET", "/verify", [("Authorization", f"Token {alice['token']} extra")])))
    c.run("knoxgate direct, a 300-character token -> 401 (never 400/431, which nginx would turn into 500)",
          lambda: denied(request(kg, "GET", "/verify", [("Authorization", "Token " + "a" * 300)])))
    c.run("knoxgate direct, a token with non-ASCII bytes -> 401",
          lambda: denied(request(kg, "GET", "/verify", [("Authorization", b"Token \xe9\xe9\xe9" + b"a" * 61)])))


def cors_checks(c, kg_default, kg_cors, users):
    preflight = [("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "POST"),
                 ("Access-Control-Request-Headers", "authorization, content-type")]

    def fn(base, expect_status, headers=preflight, path="/verify"):
        def inner():
            r = request(base, "OPTIONS", path, headers)
            ok = r.status == expect_status and not r.header("X-Auth-User-Id")
            if expect_status == 401:
                ok = ok and r.header("WWW-Authenticate") == ["Token"]
            return ok, repr(r)
        return inner

    c.run("allow_cors_preflight=true: OPTIONS /verify + Access-Control-Request-Method: POST, no token -> 200 without X-Auth-User-Id",
          fn(kg_cors, 200))
    c.run("allow_cors_preflight=true: preflight on a sub-path (OPTIONS /verify/api/orders) -> 200 without X-Auth-User-Id",
          fn(kg_cors, 200, path="/verify/api/orders"))
    c.run("allow_cors_preflight=true: OPTIONS /verify without Access-Control-Request-Method, no token -> 401",
          fn(kg_cors, 401, headers=[("Origin", "https://app.example.com")]))
    c.run("allow_cors_preflight=true: a GET with no token is still 401",
          lambda: (lambda r: (r.status == 401, repr(r)))(request(kg_cors, "GET", "/verify", [])))
    c.run("allow_cors_preflight=false (default): OPTIONS /verify + Access-Control-Request-Method: POST, no token -> 401",
          fn(kg_default, 401))


def nostore_checks(c, kg, proxies, up, users):
    """knoxgate alive but unable to decide (Postgres and Redis unreachable): 503, and every proxy
    fails closed."""
    tok = users["alice"]["token"]

    def direct():
        r = request(kg, "GET", "/verify", [token_auth(tok)])
        return r.status == 503 and not r.header("X-Auth-User-Id"), repr(r)

    c.run("knoxgate with Postgres and Redis unreachable: /verify with a token -> 503 without X-Auth-User-Id", direct)

    def via(base, headers):
        def fn():
            before = up.hits()
            r = request(base, "GET", "/api/orders", headers)
            after = up.hits()
            return 500 <= r.status <= 599 and after == before, f"client got {r!r}\nupstream hits {before} -> {after}"
        return fn

    for name, base in proxies:
        c.run(f"{name}: knoxgate answering 503 (stores down) -> a valid token gets a 5xx, upstream not reached",
              via(base, [token_auth(tok)]))
        c.run(f"{name}: knoxgate answering 503 (stores down) -> token + client X-Auth-User-Id: {SPOOF} gets a 5xx, upstream not reached",
              via(base, [token_auth(tok), ("X-Auth-User-Id", SPOOF)]))


def verify_counts(admin):
    """knoxgate_verify_total by its label set, from the admin listener's /metrics."""
    r = request(admin, "GET", "/metrics")
    assert r.status == 200, r
    counts = {}
    for line in r.body.decode().splitlines():
        m = re.match(r"knoxgate_verify_total\{([^}]*)\} (\S+)$", line)
        if m:
            counts[m.group(1)] = float(m.group(2))
    return counts


def metrics_checks(c, instances, users):
    """Each /verify answer is counted once, under the right outcome and reason."""
    tok = users["alice"]["token"]
    cases = [
        ("main", "allow", "valid", "GET", "/verify", [token_auth(tok)]),
        ("main", "deny", "invalid_token", "GET", "/verify", [token_auth(bogus_token())]),
        ("cors", "allow", "cors_preflight", "OPTIONS", "/verify", [("Access-Control-Request-Method", "POST")]),
        ("nostore", "error", None, "GET", "/verify", [token_auth(tok)]),
    ]
    for inst, outcome, reason, method, path, headers in cases:
        base, admin = instances[inst]

        def fn(outcome=outcome, reason=reason, base=base, admin=admin, method=method, path=path, headers=headers):
            before = verify_counts(admin)
            r = request(base, method, path, headers)
            after = verify_counts(admin)
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
            delta = {k: v for k, v in delta.items() if v}
            ok = len(delta) == 1
            if ok:
                (labels, n), = delta.items()
                ok = n == 1 and f'outcome="{outcome}"' in labels and (reason is None or f'reason="{reason}"' in labels)
            return ok, f"answer {r.status}; knoxgate_verify_total changes: {delta}"

        labels = f'outcome="{outcome}"' + (f', reason="{reason}"' if reason else "")
        c.run(f"knoxgate ({inst}) /metrics: one {method} {path} adds exactly 1 to knoxgate_verify_total{{{labels}}}", fn)


def psql(db, sql):
    subprocess.run(["psql", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1",
                    "-qAtc", sql], check=True, capture_output=True, timeout=10)


def revocation_checks(c, proxies, up, users, db, seconds=3.0):
    """Django changes Postgres behind knoxgate's back; every proxy must refuse within `seconds`."""

    def until_refused(user, sql, what):
        def fn():
            for name, base in proxies:
                r = request(base, "GET", "/api/orders", [token_auth(user["token"])])
                if r.status != 200:
                    return False, f"{name}: before the change: {r!r}"
            psql(db, sql)
            detail = []
            for name, base in proxies:
                deadline = time.monotonic() + seconds
                while True:
                    before = up.hits()
                    r = request(base, "GET", "/api/orders", [token_auth(user["token"])])
                    after = up.hits()
                    if r.status == 401 and after == before:
                        break
                    if time.monotonic() > deadline:
                        detail.append(f"{name}: still {r.status} {seconds} s after {what}: {r!r}")
                        break
                    time.sleep(0.05)
            return not detail, "\n".join(detail)
        return fn

    carol, dave = users["carol"], users["dave"]
    c.run(f"every proxy refuses carol's token within {seconds} s of Django deleting it in Postgres (knox logout elsewhere)",
          until_refused(carol, f"DELETE FROM knox_authtoken WHERE user_id = {int(carol['id'])}", "the DELETE"))
    c.run(f"every proxy refuses dave's token within {seconds} s of Django setting is_active = false",
          until_refused(dave, f"UPDATE auth_user SET is_active = false WHERE id = {int(dave['id'])}", "the UPDATE"))


def kill_and_wait(pid, addr, seconds=10):
    """SIGKILLs knoxgate and waits until its port refuses connections."""
    os.kill(pid, signal.SIGKILL)
    host, port = addr.split("://", 1)[-1].rsplit(":", 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
        except OSError:
            return True
        time.sleep(0.05)
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--knoxgate", required=True, help="base URL of the main knoxgate")
    ap.add_argument("--knoxgate-pid", required=True, type=int)
    ap.add_argument("--admin", required=True, help="admin URLs: main,cors,nostore (comma-separated)")
    ap.add_argument("--knoxgate-cors", required=True, help="base URL of the allow_cors_preflight knoxgate")
    ap.add_argument("--knoxgate-nostore", required=True,
                    help="base URL of a knoxgate whose Postgres and Redis are unreachable")
    ap.add_argument("--proxy-nostore", action="append", default=[],
                    help="NAME=URL of a proxy in front of --knoxgate-nostore, repeatable")
    ap.add_argument("--upstream", required=True, help="base URL of echo_upstream.py")
    ap.add_argument("--proxy", action="append", default=[], help="NAME=URL, repeatable")
    ap.add_argument("--users", required=True, help="JSON {name: {id, token}}")
    ap.add_argument("--password", required=True)
    ap.add_argument("--db", required=True, help="the Postgres database knoxgate uses")
    ap.add_argument("--summary", required=True)
    a = ap.parse_args()

    # run.sh's timeout sends SIGTERM: still write the summary of what ran.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    users = json.loads(a.users)
    up = Upstream(a.upstream)
    proxies = [p.split("=", 1) for p in a.proxy]
    c = Checks()
    try:
        for name, base in proxies:
            proxy_checks(c, name, base, up, users, a.password)
            policy_checks(c, name, base, up, users)
        direct_checks(c, a.knoxgate, users)
        cors_checks(c, a.knoxgate, a.knoxgate_cors, users)
        revocation_checks(c, proxies, up, users, a.db)
        admin_main, admin_cors, admin_nostore = a.admin.split(",")
        metrics_checks(c, {"main": (a.knoxgate, admin_main), "cors": (a.knoxgate_cors, admin_cors),
                           "nostore": (a.knoxgate_nostore, admin_nostore)}, users)
        nostore_checks(c, a.knoxgate_nostore, [p.split("=", 1) for p in a.proxy_nostore], up, users)
        c.check("knoxgate killed (SIGKILL) and its port closed", kill_and_wait(a.knoxgate_pid, a.knoxgate))
        for name, base in proxies:
            proxy_down_checks(c, name, base, up, users)
    finally:
        with open(a.summary, "w") as f:
            f.write(f"{c.passed} {c.failed}\n")
    sys.exit(1 if c.failed else 0)


if __name__ == "__main__":
    main()
