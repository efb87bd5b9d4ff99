"""Checks of the nginx -> knoxgate -> gunicorn/Django chain (started by run.sh).

Prints one `ok - ...` / `not ok - ...` line per check and `N passed, M failed`; exits 1 on a
failure. Runs in the knoxgate-django venv (PyJWT, cryptography, psycopg).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import time
import urllib.parse

import jwt
import psycopg
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

results = [0, 0]


def check(name: str, ok: bool, detail: str = "") -> None:
    results[0 if ok else 1] += 1
    print(f"{'ok' if ok else 'not ok'} - {name}{'' if ok else ': ' + detail}", flush=True)


def request(
    base: str, method: str, path: str, headers: list[tuple[str, str]] = (), body: bytes = b""
) -> tuple[int, dict, bytes]:
    """One request with exactly these header lines (duplicates and underscores kept)."""
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for k, v in headers:
        conn.putheader(k, v)
    if body:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body or None)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def whoami(base: str, headers: list[tuple[str, str]] = ()) -> tuple[int, dict | None]:
    status, _, body = request(base, "GET", "/api/whoami", headers)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def token(t: str) -> tuple[str, str]:
    return ("Authorization", f"Token {t}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nginx", required=True)
    p.add_argument("--gunicorn", required=True)
    p.add_argument("--knoxgate", required=True)
    p.add_argument("--admin", required=True)
    p.add_argument("--users", required=True, help="JSON: name -> {id, password}")
    p.add_argument("--django-token", required=True, help="bob's token, made by Django/knox")
    p.add_argument("--key", required=True, help="knoxgate's signing key (PEM)")
    p.add_argument("--audience", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--summary", required=True)
    a = p.parse_args()
    users = json.loads(a.users)
    alice, bob = users["alice"], users["bob"]

    # --- a token made by knoxgate's login, through nginx ---------------------------------------
    basic = base64.b64encode(f"alice:{alice['password']}".encode()).decode()
    status, _, body = request(
        a.nginx, "POST", "/api/auth/login/", [("Authorization", f"Basic {basic}")]
    )
    check("knoxgate login through nginx", status == 200, f"{status} {body[:200]!r}")
    alice_token = json.loads(body)["token"] if status == 200 else "x"
    status, seen = whoami(a.nginx, [token(alice_token)])
    check(
        "a knoxgate-made token reaches the DRF view as its user, with a verified assertion",
        status == 200 and seen == {"authenticated": True, "id": alice["id"], "has_claims": True},
        f"{status} {seen}",
    )
    status, _, body = request(a.nginx, "GET", "/plain/whoami", [token(alice_token)])
    check(
        "a knoxgate-made token reaches the plain Django view as its user",
        status == 200 and json.loads(body) == {"authenticated": True, "id": alice["id"]},
        f"{status} {body[:200]!r}",
    )

    # --- a token made by Django/knox, through nginx --------------------------------------------
    status, seen = whoami(a.nginx, [token(a.django_token)])
    check(
        "a Django-made token reaches the view as its user",
        status == 200 and seen == {"authenticated": True, "id": bob["id"], "has_claims": True},
        f"{status} {seen}",
    )

    # --- spoofed identity headers ---------------------------------------------------------------
    spellings = {
        "X-Auth-User-Id": [("X-Auth-User-Id", str(alice["id"]))],
        "X_Auth_User_Id": [("X_Auth_User_Id", str(alice["id"]))],
        "x-auth-user-id": [("x-auth-user-id", str(alice["id"]))],
        "duplicated": [("X-Auth-User-Id", str(alice["id"])), ("X-Auth-User-Id", str(alice["id"]))],
    }
    for name, spoof in spellings.items():
        # Without a token nginx refuses; with bob's, the view sees bob whatever was added.
        status, _ = whoami(a.nginx, spoof)
        check(f"nginx: spoofed {name} without a token is 401", status == 401, str(status))
        status, seen = whoami(a.nginx, [token(a.django_token), *spoof])
        check(
            f"nginx: spoofed {name} beside bob's token still reaches the view as bob",
            status == 200 and seen and seen.get("id") == bob["id"],
            f"{status} {seen}",
        )
        # A proxy that leaks the client's header (here: none at all, straight to gunicorn):
        # without a signed assertion the identity is refused.
        status, seen = whoami(a.gunicorn, spoof)
        check(
            f"leaked to Django: spoofed {name} without an assertion is refused",
            status in (401, 403) and not (seen or {}).get("authenticated"),
            f"{status} {seen}",
        )
        status, _, body = request(a.gunicorn, "GET", "/plain/whoami", spoof)
        check(
            f"leaked to Django: spoofed {name} leaves a plain view anonymous",
            status == 200 and json.loads(body).get("authenticated") is False,
            f"{status} {body[:200]!r}",
        )

    # --- spoofed, forged and expired assertions -------------------------------------------------
    status, headers, _ = request(a.knoxgate, "GET", "/verify", [token(alice_token)])
    alice_assertion = headers.get("x-auth-assertion", "")
    check("knoxgate's /verify answers with an assertion", status == 200 and bool(alice_assertion))
    signed = jwt.decode(alice_assertion, options={"verify_signature": False}) if alice_assertion else {}
    check(
        "the assertion signs the attributes knoxgate sends as headers",
        {k: signed.get(k) for k in ("sub", "username", "email", "is_staff", "is_superuser")}
        == {"sub": str(alice["id"]), "username": "alice", "email": "", "is_staff": False,
            "is_superuser": False},
        str(signed),
    )
    status, seen = whoami(
        a.nginx,
        [token(a.django_token), ("X-Auth-Assertion", alice_assertion),
         ("X-Auth-User-Id", str(alice["id"]))],
    )
    check(
        "nginx: a client-sent assertion (alice's, genuine) is overwritten by knoxgate's (bob)",
        status == 200 and seen and seen.get("id") == bob["id"],
        f"{status} {seen}",
    )
    status, seen = whoami(a.nginx, [("X-Auth-Assertion", alice_assertion)])
    check("nginx: an assertion without a token is 401", status == 401, str(status))

    kid = jwt.get_unverified_header(alice_assertion)["kid"] if alice_assertion else "none"
    now = int(time.time())
    claims = {"iss": "knoxgate", "sub": str(alice["id"]), "aud": a.audience,
              "iat": now, "exp": now + 60}
    with open(a.key, "rb") as f:
        real_key = load_pem_private_key(f.read(), password=None)
    alg = "EdDSA" if isinstance(real_key, Ed25519PrivateKey) else "ES256"
    # Forged: the same algorithm and key id, another key.
    other_key = (Ed25519PrivateKey.generate() if alg == "EdDSA"
                 else ec.generate_private_key(ec.SECP256R1()))
    forged = jwt.encode(claims, other_key, algorithm=alg, headers={"kid": kid})
    expired = jwt.encode({**claims, "iat": now - 120, "exp": now - 60}, real_key, algorithm=alg,
                         headers={"kid": kid})
    wrong_audience = jwt.encode({**claims, "aud": "another-app"}, real_key, algorithm=alg,
                                headers={"kid": kid})
    unknown_kid = jwt.encode(claims, real_key, algorithm=alg, headers={"kid": "not-published"})
    unsigned = jwt.encode(claims, None, algorithm="none")
    # Sanity: the same claims signed with the real key are accepted, so the refusals below are
    # about the signature, expiry, audience and key id, and nothing else.
    genuine = jwt.encode(claims, real_key, algorithm=alg, headers={"kid": kid})
    status, seen = whoami(a.gunicorn, [("X-Auth-User-Id", str(alice["id"])),
                                      ("X-Auth-Assertion", genuine)])
    check(
        "control: an assertion signed with knoxgate's key is accepted by Django",
        status == 200 and seen and seen.get("id") == alice["id"],
        f"{status} {seen}",
    )
    for name, bad in [
        ("forged (another key, knoxgate's kid)", forged),
        ("expired", expired),
        ("for another audience", wrong_audience),
        ("with an unknown kid", unknown_kid),
        ("unsigned (alg none)", unsigned),
        ("garbage", "not.a.jws"),
    ]:
        status, seen = whoami(a.gunicorn, [("X-Auth-User-Id", str(alice["id"])),
                                          ("X-Auth-Assertion", bad)])
        check(
            f"leaked to Django: an assertion {name} is refused",
            status in (401, 403) and not (seen or {}).get("authenticated"),
            f"{status} {seen}",
        )
        status, seen = whoami(a.nginx, [token(a.django_token), ("X-Auth-Assertion", bad)])
        check(
            f"nginx: an assertion {name} from the client is replaced by knoxgate's",
            status == 200 and seen and seen.get("id") == bob["id"],
            f"{status} {seen}",
        )
    status, seen = whoami(a.gunicorn, [("X-Auth-User-Id", str(bob["id"])),
                                      ("X-Auth-Assertion", alice_assertion)])
    check(
        "leaked to Django: an assertion for another user than the header is refused",
        status in (401, 403),
        f"{status} {seen}",
    )

    # --- SQL per request, from Postgres's own statistics ----------------------------------------
    def transactions() -> int:
        # Read from another database, so the reading itself is not counted.
        with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres") as c:
            row = c.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                (a.db,),
            ).fetchone()
            return int(row[0])

    # A backend reports its counts when it ends, or when idle at most every 10 s (Postgres 15+):
    # wait that long before each reading.
    settle = 11
    for _ in range(3):
        whoami(a.nginx, [token(alice_token)])
        whoami(a.nginx, [token(a.django_token)])
    time.sleep(settle)
    before = transactions()
    # By each token in turn, to four views: the user's id; the username and flags (signed
    # in the assertion, so no row is read); DRF's IsAdminUser (signed "not staff": 403); the
    # user id in a plain Django view, through the middleware.
    expected = {
        "/api/whoami": lambda user: (200, {"authenticated": True, "id": user["id"], "has_claims": True}),
        # knoxgate's `user create` sets no email: signed as "".
        "/api/names": lambda user: (200, {"username": user["name"], "email": "",
                                          "is_staff": False, "is_superuser": False}),
        "/api/admin": lambda user: (403, None),
        # A plain Django view: KnoxgateMiddleware's request.user.
        "/plain/whoami": lambda user: (200, {"authenticated": True, "id": user["id"]}),
    }
    n = 104
    ok = 0
    wrong = []
    for i in range(n):
        t, user = ((alice_token, {**alice, "name": "alice"}) if (i // len(expected)) % 2
                   else (a.django_token, {**bob, "name": "bob"}))
        path = list(expected)[i % len(expected)]
        status, _, body = request(a.nginx, "GET", path, [token(t)])
        got = (status, json.loads(body) if status == 200 else None)
        if got == expected[path](user):
            ok += 1
        else:
            wrong.append((path, got))
    time.sleep(settle)
    after = transactions()
    check(
        f"{n} authenticated requests through nginx all get the view's right answer",
        ok == n,
        f"{ok}/{n}; first wrong: {wrong[:2]}",
    )
    print(f"# SQL transactions at Postgres during {n} authenticated requests: {after - before}",
          flush=True)
    check(
        "no SQL at Postgres for authentication (pg_stat_database transactions unchanged)",
        after == before,
        f"{after - before} transactions for {n} requests",
    )
    # Control: a view that does query is seen by the same meter.
    for _ in range(5):
        request(a.nginx, "GET", "/plain/notes", [token(alice_token)])
    time.sleep(settle)
    control = transactions()
    print(f"# SQL transactions at Postgres during 5 requests to a querying view: {control - after}",
          flush=True)
    check(
        "control: 5 requests to a view that queries show up in pg_stat_database",
        control - after >= 5,
        f"{control - after} transactions",
    )

    # --- revoked tokens -------------------------------------------------------------------------
    status, _, _ = request(a.nginx, "POST", "/api/auth/logout/", [token(alice_token)])
    check("knoxgate logout through nginx", status == 204, str(status))
    status, _ = whoami(a.nginx, [token(alice_token)])
    check("a revoked (logged-out) knoxgate token is 401", status == 401, str(status))
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=a.db, autocommit=True) as c:
        # What knox's LogoutView does: delete the token's row.
        c.execute("DELETE FROM knox_authtoken WHERE token_key = %s", (a.django_token[:15],))
    deadline = time.monotonic() + 5
    status = None
    while time.monotonic() < deadline:
        status, _ = whoami(a.nginx, [token(a.django_token)])
        if status == 401:
            break
        time.sleep(0.1)
    check("a Django-made token deleted in Postgres is 401 within 5 s", status == 401, str(status))

    with open(a.summary, "w") as f:
        f.write(f"{results[0]} {results[1]}\n")
    return 0 if results[1] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
