"""The signed identity assertion: keys from a JWKS file or URL, every claim checked, and with
REQUIRE_ASSERTION nothing unsigned believed. Keys are made here with `cryptography` and
assertions signed with PyJWT, the library the package verifies with."""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import ipaddress
import itertools
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import jwt
import pytest

from conftest import AUDIENCE, ISSUER, new_key, spare_port, write_jwks
from knoxgate_django import assertion

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", "alice@example.com", "pw")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", "bob@example.com", "pw")


def get(client, path="/api/open", **headers):
    r = client.get(path, headers=headers)
    return r.status_code, (r.json() if r.status_code == 200 else None)


def ok(user_id):
    return 200, {"authenticated": True, "id": user_id}


ANON = (200, {"authenticated": False, "id": None})
REFUSED = (401, None)
UNAVAILABLE = (503, None)


def use_jwks_file(settings, path, *, cache_seconds, refetch_interval) -> None:
    """Assertions checked against the JWKS file at ``path``, with these timings."""
    settings.KNOXGATE = {
        **settings.KNOXGATE,
        "JWKS_FILE": str(path),
        "ASSERTION_AUDIENCE": AUDIENCE,
        "JWKS_CACHE_SECONDS": cache_seconds,
        "JWKS_REFETCH_INTERVAL": refetch_interval,
    }


def ticking_clock(keyset, start: float) -> list[float]:
    """Gives ``keyset`` a clock that moves 1 ms each time it is read, from ``start``, and when the
    test moves ``now[0]``; returns ``now``."""
    now = [start]

    def tick() -> float:
        now[0] += 0.001
        return now[0]

    keyset.clock = tick
    return now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_valid_assertion_with_header(client, assertion_settings, alice, ed_key, es_key, alg):
    key = ed_key if alg == "EdDSA" else es_key
    token = key.sign(str(alice.pk))
    assert get(client, **{"X-Auth-User-Id": str(alice.pk), "X-Auth-Assertion": token}) == ok(alice.pk)
    r = client.get("/api/whoami", headers={"X-Auth-User-Id": str(alice.pk), "X-Auth-Assertion": token})
    assert r.json()["has_claims"] is True
    # The plain middleware agrees.
    assert client.get("/plain/whoami", headers={"X-Auth-Assertion": token}).json()["id"] == alice.pk


def test_assertion_alone_names_the_user(client, assertion_settings, alice, ed_key):
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == ok(alice.pk)


def test_subject_must_match_header(client, assertion_settings, alice, bob, ed_key):
    h = {"X-Auth-User-Id": str(bob.pk), "X-Auth-Assertion": ed_key.sign(str(alice.pk))}
    assert get(client, **h) == REFUSED
    assert client.get("/plain/whoami", headers=h).json() == ANON[1]


def test_header_without_assertion_is_accepted_unless_required(client, assertion_settings, alice):
    assert get(client, **{"X-Auth-User-Id": str(alice.pk)}) == ok(alice.pk)
    assertion_settings.KNOXGATE = {**assertion_settings.KNOXGATE, "REQUIRE_ASSERTION": True}
    assert get(client, **{"X-Auth-User-Id": str(alice.pk)}) == REFUSED
    assert client.get("/plain/whoami", headers={"X-Auth-User-Id": str(alice.pk)}).json() == ANON[1]


def test_bad_assertion_never_falls_back_to_the_header(client, assertion_settings, alice, ed_key):
    token = ed_key.sign(str(alice.pk), exp=int(time.time()) - 60)
    assert get(client, **{"X-Auth-User-Id": str(alice.pk), "X-Auth-Assertion": token}) == REFUSED


def _bad_tokens(ed_key, es_key, uid):
    now = int(time.time())
    sub = str(uid)
    other_key = new_key("EdDSA", kid=ed_key.kid)  # same kid, different key
    good = ed_key.sign(sub)
    head, payload, sig = good.split(".")
    forged_payload = b64(json.dumps({"sub": "1", "iat": now, "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER}).encode())
    hs_secret = base64.urlsafe_b64decode(ed_key.jwk()["x"] + "==")
    # Deeper than the JSON parser's recursion limit (a RecursionError, not a ValueError).
    nested_header = b64(b'{"a":' + b"[" * 5000)
    return {
        "expired": ed_key.sign(sub, iat=now - 120, exp=now - 30),
        "issued in the future": ed_key.sign(sub, iat=now + 600, exp=now + 660),
        "wrong audience": ed_key.sign(sub, aud="another-app"),
        "wrong issuer": ed_key.sign(sub, iss="someone-else"),
        # PyJWT 2.10.0 took any substring of a string issuer (CVE-2024-53861)
        "issuer a part of ours": ed_key.sign(sub, iss=ISSUER[:4]),
        "empty issuer": ed_key.sign(sub, iss=""),
        "no exp": ed_key.sign(sub, exp=None),
        "no iat": ed_key.sign(sub, iat=None),
        "no aud": ed_key.sign(sub, aud=None),
        "no iss": ed_key.sign(sub, iss=None),
        "no sub": ed_key.sign(None),
        "integer sub": ed_key.sign(uid),
        "non-canonical sub": ed_key.sign("0" + sub),
        "comma sub": ed_key.sign(f"{sub},1"),
        "unknown kid": new_key("EdDSA").sign(sub),
        "no kid": jwt.encode({"sub": sub, "iat": now, "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER}, ed_key.private, algorithm="EdDSA"),
        "other key, same kid": other_key.sign(sub),
        "alg none": jwt.encode({"sub": sub, "iat": now, "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER}, None, algorithm="none", headers={"kid": ed_key.kid}),
        "HS256 with the public key": jwt.encode({"sub": sub, "iat": now, "exp": now + 60, "aud": AUDIENCE, "iss": ISSUER}, hs_secret, algorithm="HS256", headers={"kid": ed_key.kid}),
        "ES256 header on an Ed25519 key": es_key.sign(sub, headers={"kid": ed_key.kid}),
        "tampered payload": f"{head}.{forged_payload}.{sig}",
        "truncated": good[:-10],
        "garbage": "not.a.jws",
        "deeply nested header": f"{nested_header}.{payload}.{sig}",
        "oversized": good + "A" * 9000,
    }


CASES = list(_bad_tokens(new_key("EdDSA"), new_key("ES256"), 1))


@pytest.mark.parametrize("case", CASES)
def test_bad_assertions_are_refused(client, assertion_settings, alice, ed_key, es_key, case):
    # The key set's clock moves on an hour at every reading, so each request reloads the source
    # (a file) after it arrived and "unknown kid" is judged (refused) each time rather than
    # answered 503 within the refetch interval (tested on its own below).
    keyset = assertion.keyset_for(assertion.get_config())
    hours = itertools.count(step=3600)
    keyset.clock = lambda: float(next(hours))
    token = _bad_tokens(ed_key, es_key, alice.pk)[case]
    assert get(client, **{"X-Auth-Assertion": token}) == REFUSED
    assert get(client, **{"X-Auth-User-Id": str(alice.pk), "X-Auth-Assertion": token}) == REFUSED
    # Once a good assertion of the key has been seen (its header is then parsed only once),
    # the same bad one is still refused.
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == ok(alice.pk)
    assert get(client, **{"X-Auth-Assertion": token}) == REFUSED


def _assertions_no_key_could_make_good(uid):
    """Assertions whose claims alone condemn them, each with a kid no JWKS holds."""
    stranger = new_key("EdDSA")
    now = int(time.time())
    sub = str(uid)
    head = b64(json.dumps({"alg": "EdDSA", "kid": stranger.kid, "typ": "JWT"}).encode())
    sig = b64(bytes(64))

    def unsigned(payload: bytes) -> str:
        return f"{head}.{b64(payload)}.{sig}"

    return {
        "expired": stranger.sign(sub, iat=now - 120, exp=now - 30),
        "issued in the future": stranger.sign(sub, iat=now + 600, exp=now + 660),
        "wrong audience": stranger.sign(sub, aud="another-app"),
        "wrong issuer": stranger.sign(sub, iss="someone-else"),
        "issuer a part of ours": stranger.sign(sub, iss=ISSUER[:4]),
        "no exp": stranger.sign(sub, exp=None),
        "no aud": stranger.sign(sub, aud=None),
        "no sub": stranger.sign(None),
        "non-canonical sub": stranger.sign("0" + sub),
        "exp a numeric string": stranger.sign(sub, exp=str(now + 60)),
        "payload not JSON": unsigned(b"not json"),
        "payload not an object": unsigned(b"[1]"),
        "exp infinite": unsigned(b'{"sub": "%s", "iat": %d, "exp": Infinity, "aud": "%s", "iss": "%s"}'
                                 % (sub.encode(), now, AUDIENCE.encode(), ISSUER.encode())),
        "exp a list": unsigned(json.dumps({"sub": sub, "iat": now, "exp": [now + 60],
                                           "aud": AUDIENCE, "iss": ISSUER}).encode()),
        "deeply nested payload": unsigned(b"[" * 2500 + b"]" * 2500),
    }


@pytest.mark.parametrize("source", ["refetch used up", "unreachable"])
@pytest.mark.parametrize("case", list(_assertions_no_key_could_make_good(1)))
def test_an_assertion_no_key_could_make_good_is_refused_while_its_kid_cannot_be_judged(
    client, settings, tmp_path, alice, ed_key, source, case
):
    """An unknown kid that cannot be looked up now is 503 (it may be a key rotated in since), but
    only for an assertion that could be good: one whose claims already condemn it (expired, for
    another audience, unreadable...) is refused, 401, without asking the key source."""
    if source == "refetch used up":
        keys = {"JWKS_FILE": str(write_jwks(tmp_path / "jwks.json", ed_key))}
    else:
        keys = {"JWKS_URL": f"http://127.0.0.1:{spare_port()}/.well-known/jwks.json"}
    settings.KNOXGATE = {
        **settings.KNOXGATE,
        **keys,
        "ASSERTION_AUDIENCE": AUDIENCE,
        "JWKS_CACHE_SECONDS": 3600,
        "JWKS_REFETCH_INTERVAL": 3600,
        "JWKS_RETRY_INTERVAL": 3600,
    }
    if source == "refetch used up":
        # The keys are loaded, then the refetch is spent on one forged kid: the next unknown
        # kid cannot be looked up.
        assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == ok(alice.pk)
        assert get(client, **{"X-Auth-Assertion": new_key("EdDSA").sign(str(alice.pk))}) == REFUSED
    assert get(client, **{"X-Auth-Assertion": new_key("EdDSA").sign(str(alice.pk))}) == UNAVAILABLE
    keyset = assertion.keyset_for(assertion.get_config())
    fetches = keyset.fetches
    token = _assertions_no_key_could_make_good(alice.pk)[case]
    assert get(client, **{"X-Auth-Assertion": token}) == REFUSED
    with pytest.raises(assertion.AssertionRefused):
        assertion.verify(token)
    assert keyset.fetches == fetches, "the key source was asked about an assertion already condemned"


@pytest.mark.parametrize("claim", ["exp", "iat"])
@pytest.mark.parametrize("kind", ["numeric string", "boolean"])
def test_exp_and_iat_must_be_json_numbers(client, assertion_settings, alice, ed_key, claim, kind):
    """PyJWT takes "1700000000" (and true) for a time; the package does not: a verdict kept for
    such an assertion would compare a string with a number on its next use."""
    now = int(time.time())
    value = {"exp": now + 60, "iat": now}[claim]
    token = ed_key.sign(str(alice.pk), **{claim: str(value) if kind == "numeric string" else True})
    for _ in range(2):
        assert get(client, **{"X-Auth-Assertion": token}) == REFUSED
    # A fractional time is a number: accepted, and answered from the verified cache.
    token = ed_key.sign(str(alice.pk), **{claim: value + 0.5})
    for _ in range(2):
        assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)


def test_the_issuer_is_compared_by_the_package_itself(client, assertion_settings, alice, ed_key, monkeypatch):
    """Even with a PyJWT that checks no issuer (2.10.0 checked substrings), a wrong iss is refused."""
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: real_decode(*a, **{**k, "issuer": None}))
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == ok(alice.pk)
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk), iss=ISSUER[:4])}) == REFUSED


def test_leeway_accepts_small_clock_skew(client, assertion_settings, alice, ed_key):
    now = int(time.time())
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk), iat=now + 3, exp=now + 60)}) == ok(alice.pk)
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk), iat=now - 60, exp=now - 3)}) == ok(alice.pk)


def test_algorithm_allow_list(client, assertion_settings, alice, es_key):
    assertion_settings.KNOXGATE = {**assertion_settings.KNOXGATE, "ASSERTION_ALGORITHMS": ["EdDSA"]}
    assert get(client, **{"X-Auth-Assertion": es_key.sign(str(alice.pk))}) == REFUSED


def test_required_assertion_ignores_unsigned_attribute_headers(
    client, assertion_settings, alice, ed_key, django_assert_num_queries
):
    assertion_settings.KNOXGATE = {**assertion_settings.KNOXGATE, "REQUIRE_ASSERTION": True}
    h = {"X-Auth-Assertion": ed_key.sign(str(alice.pk)), "X-Auth-Is-Staff": "true", "X-Auth-Username": "root"}
    # alice is not staff: the forged flag is not believed; the row is read instead (one query).
    with django_assert_num_queries(1):
        assert client.get("/api/admin", headers=h).status_code == 403
    r = client.get("/api/names", headers=h)
    assert r.json()["username"] == "alice"


def test_a_comma_in_a_signed_attribute_is_the_signed_value(client, assertion_settings, alice, ed_key):
    # Under WSGI an unsigned email holding a comma is refused (copies joined); signed, it is
    # the one value knoxgate vouched for.
    email = '"al,ice"@example.com'
    # Every attribute the view reads is sent, so that none loads the row (and rereads email).
    signed = {"username": "alice", "email": email, "is_staff": False, "is_superuser": False}
    token = ed_key.sign(str(alice.pk), **signed)
    assert _signed_names(client, token, **{"X-Auth-Email": email}) == (200, signed)


def test_assertion_header_without_jwks_is_not_an_identity(client, alice, bob, ed_key):
    # No JWKS configured: an assertion alone cannot be checked, so it names nobody.
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == REFUSED
    # Beside a user id header it is not checked and adds nothing: the header alone is what
    # this configuration believes (as it would without the assertion).
    assert get(client, **{"X-Auth-User-Id": str(bob.pk), "X-Auth-Assertion": "garbage"}) == ok(bob.pk)


def _signed_names(client, token, **headers):
    r = client.get("/api/names", headers={"X-Auth-Assertion": token, **headers})
    return r.status_code, (r.json() if r.status_code == 200 else None)


def test_signed_attributes_cost_no_query_with_required_assertion(
    client, assertion_settings, alice, ed_key, django_user_model, django_assert_num_queries
):
    assertion_settings.KNOXGATE = {**assertion_settings.KNOXGATE, "REQUIRE_ASSERTION": True}
    boss = django_user_model.objects.create_superuser("boss", "boss@example.com", "pw")
    token = ed_key.sign(str(boss.pk), username="boss", email="boss@example.com", is_staff=True, is_superuser=True)
    with django_assert_num_queries(0):
        assert client.get("/api/admin", headers={"X-Auth-Assertion": token}).status_code == 200
        assert _signed_names(client, token) == (
            200,
            {"username": "boss", "email": "boss@example.com", "is_staff": True, "is_superuser": True},
        )
    # Signed "not staff" is believed over an unsigned header saying otherwise, without a query.
    token = ed_key.sign(str(alice.pk), is_staff=False)
    with django_assert_num_queries(0):
        r = client.get("/api/admin", headers={"X-Auth-Assertion": token, "X-Auth-Is-Staff": "true"})
        assert r.status_code == 403


@pytest.mark.parametrize(
    "claims",
    [{"is_staff": "true"}, {"is_superuser": 1}, {"username": 5}, {"email": ["a@b"]}],
)
def test_signed_attributes_of_the_wrong_type_are_refused(client, assertion_settings, alice, ed_key, claims):
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk), **claims)}) == REFUSED


def test_an_attribute_header_must_agree_with_the_signed_one(client, assertion_settings, alice, ed_key):
    token = ed_key.sign(str(alice.pk), username="alice", is_staff=False)
    assert _signed_names(client, token, **{"X-Auth-User-Id": str(alice.pk), "X-Auth-Username": "alice"})[0] == 200
    assert _signed_names(client, token, **{"X-Auth-User-Id": str(alice.pk), "X-Auth-Username": "root"}) == REFUSED
    assert _signed_names(client, token, **{"X-Auth-User-Id": str(alice.pk), "X-Auth-Is-Staff": "true"}) == REFUSED


def test_username_and_email_naming_one_field_must_agree(client, assertion_settings, alice, ed_key, monkeypatch):
    """A user model whose USERNAME_FIELD is its email field: username and email, signed or
    sent as headers, set the same field, and two different values are refused, not one of
    them picked."""
    from knoxgate_django import identity

    monkeypatch.setattr(identity, "_targets", lambda: {
        "username": "email", "email": "email", "is_staff": "is_staff", "is_superuser": "is_superuser",
    })
    same = ed_key.sign(str(alice.pk), username="a@example.com", email="a@example.com")
    assert _signed_names(client, same)[0] == 200
    differ = ed_key.sign(str(alice.pk), username="a@example.com", email="b@example.com")
    assert _signed_names(client, differ) == REFUSED
    headers = {"X-Auth-User-Id": str(alice.pk), "X-Auth-Username": "a@example.com"}
    r = client.get("/api/names", headers={**headers, "X-Auth-Email": "a@example.com"})
    assert r.status_code == 200
    r = client.get("/api/names", headers={**headers, "X-Auth-Email": "b@example.com"})
    assert (r.status_code, r.json() if r.status_code == 200 else None) == REFUSED


def test_jwks_ignores_unusable_keys(tmp_path, ed_key):
    good = ed_key.jwk()
    private = {**new_key("EdDSA").jwk(), "d": "AAAA", "kid": "private"}
    doc = {
        "keys": [
            good,
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**new_key("ES256").jwk(), "kid": "wrong-alg", "alg": "EdDSA"},
            {**new_key("ES256").jwk(), "kid": "enc", "use": "enc"},
            private,
            {"kty": "OKP", "crv": "Ed25519", "x": good["x"]},  # no kid
            "not an object",
        ]
    }
    keys = assertion._parse_jwks(json.dumps(doc).encode())
    assert list(keys) == [ed_key.kid]


def test_a_malformed_key_leaves_the_rest_of_the_jwks_usable(client, settings, tmp_path, alice, ed_key, caplog):
    """Members of the wrong JSON type, or values the key's constructor chokes on, put that one
    key aside (logged); the document's other keys still verify."""
    good = ed_key.jwk()
    other = new_key("EdDSA").jwk()
    malformed = [
        {**other, "kid": "kty-list", "kty": ["OKP"]},
        {**other, "kid": "crv-object", "crv": {"name": "Ed25519"}},
        {**other, "kid": ["kid-list"]},
        {**other, "kid": "alg-list", "alg": ["EdDSA"]},
        {**other, "kid": "use-object", "use": {"sig": True}},
        {**other, "kid": "x-number", "x": 5},
        {**other, "kid": "x-list", "x": [other["x"]]},
    ]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [*malformed, good]}))
    assert list(assertion._parse_jwks(path.read_bytes())) == [ed_key.kid]
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "knoxgate_django" and r.levelname == "WARNING"]
    assert len(warnings) == len(malformed), warnings
    settings.KNOXGATE = {**settings.KNOXGATE, "JWKS_FILE": str(path), "ASSERTION_AUDIENCE": AUDIENCE}
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == ok(alice.pk)


def test_rotation_through_the_file_and_rate_limited_refetch(client, settings, tmp_path, alice, ed_key):
    path = write_jwks(tmp_path / "jwks.json", ed_key)
    use_jwks_file(settings, path, cache_seconds=3600, refetch_interval=1.0)
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == ok(alice.pk)
    keyset = assertion.keyset_for(assertion.get_config())
    assert keyset.fetches == 1
    # From here on the key set's clock moves 1 ms each time it is read, and when the test moves
    # it: twenty requests on a busy machine can take longer than JWKS_REFETCH_INTERVAL.
    now = ticking_clock(keyset, time.monotonic())

    new = new_key("ES256")
    write_jwks(path, ed_key, new)
    # The first assertion with the new kid rereads the source at once (the load before does not
    # count against the refetch), and the new key works.
    assert get(client, **{"X-Auth-Assertion": new.sign(str(alice.pk))}) == ok(alice.pk)
    assert keyset.fetches == 2
    # Within the refetch interval an unknown kid does not reread the source, so it cannot be
    # judged: 503, not 401 (it might be a key rotated in since). Forged kids cost no reads.
    for _ in range(20):
        assert get(client, **{"X-Auth-Assertion": new_key("EdDSA").sign(str(alice.pk))}) == UNAVAILABLE
    assert keyset.fetches == 2
    assert get(client, **{"X-Auth-Assertion": new.sign(str(alice.pk))}) == ok(alice.pk)
    now[0] += 1.1
    # After it: one reread, which does not hold the forged kid: refused.
    assert get(client, **{"X-Auth-Assertion": new_key("EdDSA").sign(str(alice.pk))}) == REFUSED
    assert keyset.fetches == 3
    for _ in range(20):
        assert get(client, **{"X-Auth-Assertion": new_key("EdDSA").sign(str(alice.pk))}) == UNAVAILABLE
    assert keyset.fetches == 3


def test_cache_expiry_drops_retired_keys(client, settings, tmp_path, alice, ed_key):
    path = write_jwks(tmp_path / "jwks.json", ed_key)
    use_jwks_file(settings, path, cache_seconds=1, refetch_interval=1)
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == ok(alice.pk)
    write_jwks(path, new_key("EdDSA"))
    time.sleep(1.1)
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == REFUSED


def test_a_periodic_reload_does_not_use_up_the_refetch_for_a_new_kid(tmp_path, ed_key):
    """Rotation right after the cache reloaded: the first assertion signed with the new key
    rereads the source at once, rather than being refused until JWKS_REFETCH_INTERVAL has
    passed since the reload."""
    now = [0.0]
    path = write_jwks(tmp_path / "jwks.json", ed_key)
    keyset = assertion.KeySet(file=str(path), cache_seconds=300, refetch_interval=30, clock=lambda: now[0])
    assert keyset.get(ed_key.kid) is not None
    now[0] = 310.0  # the cache is stale: reloaded
    assert keyset.get(ed_key.kid) is not None
    assert keyset.fetches == 2
    rotated = new_key("ES256")
    write_jwks(path, ed_key, rotated)
    now[0] = 321.0  # 11 s after the reload: knoxgate signs with the new key
    assert keyset.get(rotated.kid) is not None
    assert keyset.fetches == 3


def test_an_unknown_kid_within_the_refetch_interval_is_unavailable_not_refused(tmp_path, ed_key):
    """At most one refetch per JWKS_REFETCH_INTERVAL for unknown kids. A kid that the source,
    read after the assertion arrived, does not hold is refused; a kid that cannot be looked up
    yet is KeysUnavailable (503): it may be a key rotated in since the last read."""
    now = [0.0]
    path = write_jwks(tmp_path / "jwks.json", ed_key)
    keyset = assertion.KeySet(file=str(path), cache_seconds=300, refetch_interval=30, clock=lambda: now[0])
    assert keyset.get(ed_key.kid) is not None
    assert keyset.fetches == 1

    now[0] = 1.0
    assert keyset.get("forged-1") is None, "the source, read for this kid, does not hold it"
    assert keyset.fetches == 2
    rotated = new_key("ES256")
    write_jwks(path, ed_key, rotated)
    now[0] = 2.0
    # Within the interval: no reread, and no verdict either way.
    for kid in ("forged-2", "forged-1", rotated.kid):
        with pytest.raises(assertion.KeysUnavailable):
            keyset.get(kid)
    # A stream of forged kids costs no further reads, and the keys held go on working.
    for i in range(50):
        now[0] = 2.0 + i / 10
        with pytest.raises(assertion.KeysUnavailable):
            keyset.get(new_key("EdDSA").kid)
    assert keyset.get(ed_key.kid) is not None
    assert keyset.fetches == 2
    # Once the interval has passed, the next unknown kid rereads, and the rotated key works.
    now[0] = 31.0
    assert keyset.get(rotated.kid) is not None
    assert keyset.fetches == 3


def test_a_kid_missing_from_a_reload_made_for_it_is_refused_without_a_second_read(tmp_path, ed_key):
    """The periodic reload a request triggers has read the source after the assertion arrived:
    a kid it does not hold is refused, with no refetch; and the refetch stays available."""
    now = [0.0]
    path = write_jwks(tmp_path / "jwks.json", ed_key)
    keyset = assertion.KeySet(file=str(path), cache_seconds=300, refetch_interval=30, clock=lambda: now[0])
    assert keyset.get(ed_key.kid) is not None
    now[0] = 310.0
    assert keyset.get("forged-1") is None
    assert keyset.fetches == 2
    now[0] = 311.0
    assert keyset.get("forged-2") is None
    assert keyset.fetches == 3


def test_a_key_dropped_by_a_reload_ends_its_verdicts_without_a_refetch(tmp_path, ed_key):
    """same_key() for a kid no longer held answers False without rereading the source: the
    refetch is left to verifying the assertion again."""
    now = [0.0]
    path = write_jwks(tmp_path / "jwks.json", ed_key)
    keyset = assertion.KeySet(file=str(path), cache_seconds=300, refetch_interval=30, clock=lambda: now[0])
    key = keyset.get(ed_key.kid)
    write_jwks(path, new_key("EdDSA"))
    now[0] = 310.0
    assert keyset.get("another") is None  # this request's reload drops ed_key
    now[0] = 311.0
    assert keyset.same_key(ed_key.kid, key) is False
    assert keyset.fetches == 2
    assert keyset.get(ed_key.kid) is None  # the refetch, made for this assertion
    assert keyset.fetches == 3


def test_a_verdict_whose_key_its_own_reload_dropped_is_refused_with_the_refetch_used(
        client, settings, tmp_path, alice, ed_key):
    """A request with a verified assertion whose stale keys it reloads, and whose kid that reload
    no longer holds, was judged by a read made after it arrived: refused (401), as the same
    assertion is when not cached, not 503 because a forged kid used the refetch just before."""
    path = write_jwks(tmp_path / "jwks.json", ed_key)
    use_jwks_file(settings, path, cache_seconds=5, refetch_interval=30)
    keyset = assertion.keyset_for(assertion.get_config())
    now = ticking_clock(keyset, 1000.0)
    signed = ed_key.sign(str(alice.pk))
    assert get(client, **{"X-Auth-Assertion": signed}) == ok(alice.pk)
    assert get(client, **{"X-Auth-Assertion": new_key("EdDSA").sign(str(alice.pk))}) == REFUSED
    assert keyset.fetches == 2, "the forged kid used the refetch"
    write_jwks(path, new_key("EdDSA"))
    now[0] += 6  # the keys are stale: the next request reloads them
    assert get(client, **{"X-Auth-Assertion": signed}) == REFUSED
    assert keyset.fetches == 3


def test_a_stale_cache_is_reloaded_after_jwks_cache_seconds_not_the_refetch_interval(tmp_path, ed_key):
    """The keys are used for JWKS_CACHE_SECONDS from the read that brought them, also when that
    is shorter than JWKS_REFETCH_INTERVAL; below one second, the source is still read at most
    once a second, not on every request."""
    now = [0.0]
    path = write_jwks(tmp_path / "jwks.json", ed_key)
    keyset = assertion.KeySet(file=str(path), cache_seconds=5, refetch_interval=30, clock=lambda: now[0])
    assert keyset.get(ed_key.kid) is not None
    write_jwks(path, new_key("EdDSA"))  # ed_key retired
    now[0] = 4.9
    assert keyset.get(ed_key.kid) is not None
    assert keyset.fetches == 1
    now[0] = 5.0
    assert keyset.get(ed_key.kid) is None, "the reload at JWKS_CACHE_SECONDS dropped the key"
    assert keyset.fetches == 2

    write_jwks(path, ed_key)
    keyset = assertion.KeySet(file=str(path), cache_seconds=0, refetch_interval=30, clock=lambda: now[0])
    now[0] = 100.0
    for t in (100.0, 100.5, 100.99):
        now[0] = t
        assert keyset.get(ed_key.kid) is not None
    assert keyset.fetches == 1
    now[0] = 101.0
    assert keyset.get(ed_key.kid) is not None
    assert keyset.fetches == 2


# --- JWKS from a URL, served by a real HTTP server ---


@pytest.fixture
def jwks_server(tmp_path):
    """`python -m http.server` on a spare port serving tmp_path/www; yields (url, request_log)."""
    www = tmp_path / "www"
    (www / ".well-known").mkdir(parents=True)
    log = tmp_path / "http.log"
    port = spare_port()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(www)],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"http.server did not start: {log.read_text()}") from None
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/.well-known/jwks.json"

        def fetches() -> int:
            return log.read_text().count("GET /.well-known/jwks.json")

        yield url, www / ".well-known" / "jwks.json", fetches, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_jwks_url_fetch_rotation_and_outage(client, settings, alice, ed_key, jwks_server):
    url, path, fetches, proc = jwks_server
    write_jwks(path, ed_key)
    settings.KNOXGATE = {
        **settings.KNOXGATE,
        "JWKS_URL": url,
        "ASSERTION_AUDIENCE": AUDIENCE,
        "REQUIRE_ASSERTION": True,
        "JWKS_CACHE_SECONDS": 3600,
        "JWKS_REFETCH_INTERVAL": 1,
    }
    for _ in range(5):
        assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == ok(alice.pk)
    assert fetches() == 1  # cached

    rotated = new_key("ES256")
    write_jwks(path, rotated)
    time.sleep(1.1)
    assert get(client, **{"X-Auth-Assertion": rotated.sign(str(alice.pk))}) == ok(alice.pk)
    assert fetches() == 2
    # The cache still holds the old key until JWKS_CACHE_SECONDS: keys rotate out with the cache.

    # knoxgate's admin port unreachable: the keys already held keep working; a key not held
    # might be a rotation the source would publish: that cannot be known, so 503, not 401.
    proc.terminate()
    proc.wait(timeout=10)
    time.sleep(1.1)
    assert get(client, **{"X-Auth-Assertion": new_key("EdDSA").sign(str(alice.pk))}) == UNAVAILABLE
    assert get(client, **{"X-Auth-Assertion": rotated.sign(str(alice.pk))}) == ok(alice.pk)


def test_a_key_source_never_read_is_503_until_it_answers(client, settings, alice, ed_key, jwks_server):
    url, path, fetches, _ = jwks_server
    settings.KNOXGATE = {
        **settings.KNOXGATE,
        "JWKS_URL": url,  # nothing there yet: 404
        "ASSERTION_AUDIENCE": AUDIENCE,
        "REQUIRE_ASSERTION": True,
        "JWKS_REFETCH_INTERVAL": 3600,
        "JWKS_RETRY_INTERVAL": 1,
    }
    token = ed_key.sign(str(alice.pk))
    assert get(client, **{"X-Auth-Assertion": token}) == UNAVAILABLE
    r = client.get("/plain/whoami", headers={"X-Auth-Assertion": token})
    assert r.status_code == 503
    assert fetches() == 1, "retried no sooner than JWKS_RETRY_INTERVAL"
    write_jwks(path, ed_key)
    time.sleep(1.1)
    # Retried after JWKS_RETRY_INTERVAL, not JWKS_REFETCH_INTERVAL.
    assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)
    assert client.get("/plain/whoami", headers={"X-Auth-Assertion": token}).json()["id"] == alice.pk
    assert fetches() == 2


def test_jwks_url_is_fetched_directly_never_through_a_proxy_or_a_redirect(
    client, settings, alice, ed_key, jwks_server, monkeypatch
):
    url, path, fetches, _ = jwks_server
    write_jwks(path, ed_key)
    # A proxy from the environment that would fail every request it carried.
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{spare_port()}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    base = {**settings.KNOXGATE, "ASSERTION_AUDIENCE": AUDIENCE, "REQUIRE_ASSERTION": True}
    settings.KNOXGATE = {**base, "JWKS_URL": url}
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == ok(alice.pk)
    assert fetches() == 1

    # http.server redirects a directory without its slash to the slash (301) and serves its
    # index.html: a JWKS reachable only through a redirect.
    moved = path.parent / "moved"
    moved.mkdir()
    write_jwks(moved / "index.html", ed_key)
    settings.KNOXGATE = {**base, "JWKS_URL": url.rsplit("/", 1)[0] + "/moved"}
    assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk))}) == UNAVAILABLE
    assert "GET /.well-known/moved/ " not in path.parent.parent.parent.joinpath("http.log").read_text()


def test_threads_go_on_with_held_keys_while_one_reads_a_slow_source(tmp_path, ed_key):
    """gunicorn threads: a reread that hangs (up to JWKS_TIMEOUT) holds up only the thread doing
    it; the others answer from the keys already held, even stale ones."""
    import threading

    now = [0.0]
    keyset = assertion.KeySet(
        file=str(write_jwks(tmp_path / "jwks.json", ed_key)),
        cache_seconds=10,
        refetch_interval=1,
        clock=lambda: now[0],
    )
    assert keyset.get(ed_key.kid) is not None
    real_read = keyset._read
    reading = threading.Event()
    release = threading.Event()

    def slow_read():
        reading.set()
        release.wait(10)
        return real_read()

    keyset._read = slow_read
    now[0] = 11.0  # the cache is stale: the next get rereads
    reader = threading.Thread(target=keyset.get, args=(ed_key.kid,))
    reader.start()
    assert reading.wait(5)
    started = time.monotonic()
    assert keyset.get(ed_key.kid) is not None
    assert time.monotonic() - started < 1, "a held key waited for another thread's read"
    # An unknown kid does wait for the read in progress (the source may hold it).
    waiter = threading.Thread(target=lambda: keyset.get("unknown"))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()
    release.set()
    reader.join(5)
    waiter.join(5)
    assert not reader.is_alive() and not waiter.is_alive()


def test_a_source_that_trickles_its_answer_is_given_up_after_jwks_timeout(ed_key):
    """JWKS_TIMEOUT bounds the whole fetch, not each socket read: a source sending a byte now
    and then would otherwise hold every request with an unknown kid for as long as it liked."""
    import socket
    import threading

    document = json.dumps({"keys": [ed_key.jwk()]}).encode()
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(document))
            for byte in document:
                if stop.wait(0.2):
                    return
                conn.sendall(bytes([byte]))

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    try:
        keyset = assertion.KeySet(url=f"http://127.0.0.1:{listener.getsockname()[1]}/jwks.json", timeout=1)
        started = time.monotonic()
        with pytest.raises(assertion.KeysUnavailable):
            keyset.get(ed_key.kid)
        took = time.monotonic() - started
        # At JWKS_TIMEOUT: every read waits only for what is left of it. A document of this
        # size trickled whole would take over a minute.
        assert 0.9 < took < 1.5, took
    finally:
        stop.set()
        listener.close()
        server.join(5)


def _count_signature_checks(monkeypatch) -> list:
    """A list that grows by one at each jwt.decode that verifies a signature (an assertion
    whose key is not held has its claims read once without one first)."""
    checked = []
    real_decode = jwt.decode

    def decode(*args, **kwargs):
        if kwargs.get("options", {}).get("verify_signature", True):
            checked.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", decode)
    return checked


def test_a_key_replaced_under_its_kid_ends_its_cached_verdicts(
    client, settings, tmp_path, alice, ed_key, monkeypatch
):
    decoded = _count_signature_checks(monkeypatch)
    path = write_jwks(tmp_path / "jwks.json", ed_key)
    use_jwks_file(settings, path, cache_seconds=1, refetch_interval=1)
    token = ed_key.sign(str(alice.pk))
    assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)
    # The same key reread: the verdict stands (no second check).
    time.sleep(1.1)
    assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)
    assert len(decoded) == 1
    # Another key under the same kid (a compromised key replaced): the verdict goes with it.
    write_jwks(path, new_key("EdDSA", kid=ed_key.kid))
    time.sleep(1.1)
    assert get(client, **{"X-Auth-Assertion": token}) == REFUSED


def test_a_verified_assertion_is_checked_once_until_its_exp(client, assertion_settings, alice, ed_key, monkeypatch):
    decoded = _count_signature_checks(monkeypatch)
    now = int(time.time())
    token = ed_key.sign(str(alice.pk), iat=now, exp=now + 60)
    for _ in range(5):
        assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)
    assert len(decoded) == 1, "a hot token's assertion is verified once"
    # Another audience is another verdict: not answered from the cache.
    assertion_settings.KNOXGATE = {**assertion_settings.KNOXGATE, "ASSERTION_AUDIENCE": "other"}
    assert get(client, **{"X-Auth-Assertion": token}) == REFUSED


def test_an_assertion_whose_key_is_held_is_decoded_once(client, assertion_settings, alice, ed_key, monkeypatch):
    decodes = []
    real = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **kw: decodes.append(kw["options"]) or real(*a, **kw))
    now = int(time.time())
    # The first reads the JWKS: its kid is not held yet, so its claims are read before the key
    # is looked up; the next, signed with the same key, is checked in one decode.
    for i in range(2):
        assert get(client, **{"X-Auth-Assertion": ed_key.sign(str(alice.pk), iat=now - i)}) == ok(alice.pk)
    assert [o["verify_signature"] for o in decodes] == [False, True, True]


def test_one_keys_header_is_parsed_once(client, assertion_settings, alice, bob, ed_key, monkeypatch):
    parsed = []
    real = jwt.get_unverified_header
    monkeypatch.setattr(jwt, "get_unverified_header", lambda t: parsed.append(1) or real(t))
    now = int(time.time())
    for i, user in enumerate([alice, bob, alice]):
        token = ed_key.sign(str(user.pk), iat=now - i)
        assert get(client, **{"X-Auth-Assertion": token}) == ok(user.pk)
    assert len(parsed) == 1, "every assertion of one key has the same header"


def test_the_cache_keeps_at_most_its_size(client, assertion_settings, alice, ed_key, monkeypatch):
    assertion_settings.KNOXGATE = {**assertion_settings.KNOXGATE, "ASSERTION_CACHE_SIZE": 2}
    decoded = _count_signature_checks(monkeypatch)
    now = int(time.time())
    first, second, third = (ed_key.sign(str(alice.pk), iat=now - i) for i in range(3))
    for token in (first, second, third, third, second):
        assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)
    assert len(decoded) == 3 and len(assertion._verified) == 2
    assert get(client, **{"X-Auth-Assertion": first}) == ok(alice.pk)
    assert len(decoded) == 4, "the oldest verdict was dropped"


def test_a_cached_verdict_ends_at_the_assertions_exp(client, assertion_settings, alice, ed_key):
    assertion_settings.KNOXGATE = {**assertion_settings.KNOXGATE, "ASSERTION_LEEWAY": 0}
    now = int(time.time())
    token = ed_key.sign(str(alice.pk), iat=now, exp=now + 1)
    assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)
    time.sleep(2.1)
    assert get(client, **{"X-Auth-Assertion": token}) == REFUSED


def test_a_cached_verdict_ends_when_pyjwt_would_refuse_the_assertion(client, assertion_settings, alice, ed_key):
    """PyJWT refuses once int(exp) <= now - leeway: a fractional exp ends at its whole second,
    for a verdict served from the cache as for a new check."""
    assertion_settings.KNOXGATE = {**assertion_settings.KNOXGATE, "ASSERTION_LEEWAY": 0}
    whole = int(time.time()) + 2
    token = ed_key.sign(str(alice.pk), iat=whole - 2, exp=whole + 0.9)
    assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)
    time.sleep(whole + 0.1 - time.time())
    assert get(client, **{"X-Auth-Assertion": token}) == REFUSED


def test_the_cache_can_be_turned_off(client, assertion_settings, alice, ed_key, monkeypatch):
    assertion_settings.KNOXGATE = {**assertion_settings.KNOXGATE, "ASSERTION_CACHE_SIZE": 0}
    decoded = _count_signature_checks(monkeypatch)
    token = ed_key.sign(str(alice.pk))
    for _ in range(3):
        assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)
    assert len(decoded) == 3


# --- A JWKS source that hangs, fails slowly or trickles: a threading http.server in process ---


class JwksSource:
    """What the in-process JWKS server does with the next requests (``mode``), and what it saw.

    * ``serve``: 200 with ``document``, once ``gate`` is set (clear it to hold answers back);
    * ``fail``: 503;
    * ``hang``: accepts the request and answers nothing until the test ends;
    * ``trickle-headers``: a status line, then header bytes one every 0.2 s, never ending.

    ``on_request``, if set, runs as each request arrives (before the answer)."""

    def __init__(self) -> None:
        self.mode = "serve"
        self.document = b""
        self.requests = 0
        self.received = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.stop = threading.Event()
        self.on_request = None
        self.url = ""
        #: TLS handshakes the client aborted (the TLS variant only).
        self.handshake_errors: list[Exception] = []

    def serve(self, *keys) -> None:
        self.mode = "serve"
        self.document = json.dumps({"keys": [k.jwk() for k in keys]}).encode()


def _jwks_handler(source: JwksSource):
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            with lock:
                source.requests += 1
            if source.on_request is not None:
                source.on_request()
            source.received.set()
            mode = source.mode
            try:
                if mode == "hang":
                    source.stop.wait(60)
                elif mode == "trickle-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    self.wfile.flush()
                    for byte in itertools.cycle(b"X-Pad: aaaaaaaaaaaaaaaa\r\n"):
                        if source.stop.wait(0.2):
                            break
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                elif mode == "fail":
                    self.send_error(503)
                else:
                    source.gate.wait(60)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(source.document)))
                    self.end_headers()
                    self.wfile.write(source.document)
            except OSError:
                pass  # the client gave up: that is what these tests are about

        def log_message(self, *args):
            pass

    return Handler


class _TLSServer(http.server.ThreadingHTTPServer):
    """The JWKS server over TLS: each connection's handshake runs in its own handler thread (not
    in the accepting one), and a handshake the client aborts is recorded, not printed."""

    daemon_threads = True

    def __init__(self, address, handler, context: ssl.SSLContext, source: JwksSource) -> None:
        self.context, self.source = context, source
        super().__init__(address, handler)

    def finish_request(self, request, client_address):
        request.settimeout(10)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except OSError as e:  # ssl.SSLError included: the client refused the certificate
            self.source.handshake_errors.append(e)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


@contextlib.contextmanager
def _serving(source: JwksSource, *, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"):
    """Runs the JWKS server for ``source`` on a spare loopback port, over TLS with ``tls`` (a
    server context) if given; ``source.url`` names it with ``host``."""
    handler = _jwks_handler(source)
    address = ("127.0.0.1", spare_port())
    if tls is None:
        server = http.server.ThreadingHTTPServer(address, handler)
        server.daemon_threads = True
    else:
        server = _TLSServer(address, handler, tls, source)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls is not None else "http"
    source.url = f"{scheme}://{host}:{server.server_address[1]}/.well-known/jwks.json"
    try:
        yield source
    finally:
        source.stop.set()
        source.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def jwks_source():
    with _serving(JwksSource()) as source:
        yield source


def test_a_failed_read_is_retried_from_its_end_with_a_doubling_wait(jwks_source, ed_key):
    """The wait before a retry starts when the failed read ENDS: a read that hung for
    JWKS_TIMEOUT, longer than JWKS_RETRY_INTERVAL, must not leave the next one due at once (each
    request then paid the timeout). The wait doubles with each failure in a row, up to
    JWKS_REFETCH_INTERVAL; meanwhile the stale keys held are served without reading."""
    now = [0.0]
    jwks_source.serve(ed_key)
    keyset = assertion.KeySet(url=jwks_source.url, cache_seconds=300, refetch_interval=30,
                              retry_interval=5, clock=lambda: now[0])
    key = keyset.get(ed_key.kid)
    assert key is not None and jwks_source.requests == 1

    # From now on each read fails after 10 s (the server moves the clock on as it answers).
    jwks_source.mode = "fail"
    jwks_source.on_request = lambda: now.__setitem__(0, now[0] + 10)
    now[0] = 400.0  # stale
    assert keyset.get(ed_key.kid) is key  # the reload, begun at 400, failed at 410
    assert jwks_source.requests == 2 and now[0] == 410.0
    # Every wait below is measured from the end of the last failure: 5, 10, 20, then 30 (the
    # cap, JWKS_REFETCH_INTERVAL), 30.
    for wait in (5, 10, 20, 30, 30):
        failed_at = now[0]
        for t in (failed_at, failed_at + wait / 2, failed_at + wait - 0.01):
            now[0] = t
            assert keyset.get(ed_key.kid) is key, "the stale key held is served meanwhile"
            with pytest.raises(assertion.KeysUnavailable):
                keyset.get("rotated")
            assert keyset.same_key(ed_key.kid, key)
        requests = jwks_source.requests
        now[0] = failed_at + wait
        assert keyset.get(ed_key.kid) is key
        assert jwks_source.requests == requests + 1, f"retried {wait} s after the failure"
    # The source answers again: the keys are reloaded, and the wait starts over.
    jwks_source.on_request = None
    rotated = new_key("ES256")
    jwks_source.serve(ed_key, rotated)
    now[0] += 30
    assert keyset.get(rotated.kid) is not None
    assert keyset.retry_wait() == 0


def test_a_hanging_key_source_costs_one_request_its_timeout_not_every_request(
    client, settings, alice, ed_key, jwks_source
):
    """Sync workers: once the keys are older than JWKS_CACHE_SECONDS, even an assertion answered
    from the verified cache asks whether its key still stands, which reloads. With a source that
    hangs, one request waits JWKS_TIMEOUT; the next ones are answered from the keys held until
    the retry is due (JWKS_RETRY_INTERVAL after that read gave up, shorter than the timeout)."""
    jwks_source.serve(ed_key)
    settings.KNOXGATE = {
        **settings.KNOXGATE,
        "JWKS_URL": jwks_source.url,
        "ASSERTION_AUDIENCE": AUDIENCE,
        "REQUIRE_ASSERTION": True,
        "JWKS_CACHE_SECONDS": 0.2,
        "JWKS_REFETCH_INTERVAL": 1,
        "JWKS_RETRY_INTERVAL": 1,
        "JWKS_TIMEOUT": 2,
    }
    token = ed_key.sign(str(alice.pk))
    assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)
    assert jwks_source.requests == 1
    jwks_source.mode = "hang"
    time.sleep(1.05)  # the keys are stale, and the periodic reload is due
    started = time.monotonic()
    assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)
    assert time.monotonic() - started >= 1.9, "this request waited for the reload"
    assert jwks_source.requests == 2
    started = time.monotonic()
    for _ in range(5):
        assert get(client, **{"X-Auth-Assertion": token}) == ok(alice.pk)
    assert jwks_source.requests == 2, "a retry was due at once: the wait was measured from its start"
    assert time.monotonic() - started < 1


def test_a_key_file_whose_read_hangs_is_given_up_after_jwks_timeout(tmp_path, ed_key):
    """JWKS_FILE on a network mount whose server is gone: open() and read() hang and take no
    timeout. Here a FIFO nobody writes hangs open() the same way. The read is given up after
    JWKS_TIMEOUT; until the stuck read returns, a due retry fails at once instead of leaving
    another thread on the file; once it returned, the file is read again."""
    path = tmp_path / "jwks.json"
    os.mkfifo(path)
    now = [0.0]
    keyset = assertion.KeySet(file=str(path), cache_seconds=300, refetch_interval=30,
                              retry_interval=5, timeout=0.5, clock=lambda: now[0])

    def judged_within(seconds: float) -> BaseException | None:
        """get(ed_key.kid) on a thread: what it raised, asserting it ended within ``seconds``."""
        outcome: list[BaseException | None] = []

        def ask() -> None:
            try:
                keyset.get(ed_key.kid)
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        asking.join(seconds)
        assert not asking.is_alive(), f"get() still waiting on the file after {seconds} s"
        return outcome[0]

    started = time.monotonic()
    assert isinstance(judged_within(5), assertion.KeysUnavailable)
    assert time.monotonic() - started >= 0.45, "given up before JWKS_TIMEOUT"
    assert keyset.fetches == 1

    # The retry is due; the first read still hangs: this one fails at once.
    now[0] += 5
    started = time.monotonic()
    assert isinstance(judged_within(5), assertion.KeysUnavailable)
    assert time.monotonic() - started < 0.3, "a second read queued behind the stuck one"
    assert keyset.fetches == 2
    stuck = [t for t in threading.enumerate() if t.name == "knoxgate-jwks-read"]
    assert len(stuck) == 1, f"{len(stuck)} threads reading the file"

    # The mount comes back: the stuck read returns (what it brought is not used), and the file,
    # a regular one now, is read at the next retry.
    with open(path, "wb") as writer:
        writer.write(b"{}")
    stuck[0].join(5)
    assert not stuck[0].is_alive()
    path.unlink()
    write_jwks(path, ed_key)
    now[0] += 10
    assert judged_within(5) is None
    assert keyset.get(ed_key.kid) is not None


def test_threads_with_an_unknown_kid_wait_for_the_read_running_and_start_no_other(jwks_source, ed_key):
    """gunicorn threads: a read of a hanging source is running; threads asking for a kid not
    held wait for that one read (JWKS_TIMEOUT) and get KeysUnavailable, instead of each reading
    in turn (the k-th thread waiting k × JWKS_TIMEOUT)."""
    jwks_source.serve(ed_key)
    keyset = assertion.KeySet(url=jwks_source.url, retry_interval=0.5, timeout=1)
    assert keyset.get(ed_key.kid) is not None
    jwks_source.mode = "hang"
    jwks_source.received.clear()
    outcomes: dict[int, tuple[str, float]] = {}

    def ask(i):
        started = time.monotonic()
        try:
            outcomes[i] = repr(keyset.get("rotated")), time.monotonic() - started
        except assertion.KeysUnavailable:
            outcomes[i] = "unavailable", time.monotonic() - started

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    assert jwks_source.received.wait(5)
    others = [threading.Thread(target=ask, args=(i,)) for i in range(1, 5)]
    for t in others:
        t.start()
    # A key held is answered at once meanwhile.
    started = time.monotonic()
    assert keyset.get(ed_key.kid) is not None
    assert time.monotonic() - started < 0.5
    for t in [first, *others]:
        t.join(10)
    assert sorted(outcomes) == [0, 1, 2, 3, 4]
    assert {outcome for outcome, _ in outcomes.values()} == {"unavailable"}
    assert jwks_source.requests == 2, "one read for all of them"
    assert max(took for _, took in outcomes.values()) < 1.9


def test_a_thread_that_waited_for_another_threads_read_does_not_read_again(jwks_source, ed_key):
    """A kid not held, asked for while another thread's reload (begun before the ask) is
    running: judged by what that reload brought. Not in it: KeysUnavailable (503; the key may
    have been published since), and the refetch is left to the next request."""
    now = [0.0]
    jwks_source.serve(ed_key)
    keyset = assertion.KeySet(url=jwks_source.url, cache_seconds=300, refetch_interval=30,
                              clock=lambda: now[0])
    assert keyset.get(ed_key.kid) is not None
    jwks_source.gate.clear()
    jwks_source.received.clear()
    now[0] = 310.0  # stale: the next get reloads
    reloader = threading.Thread(target=keyset.get, args=(ed_key.kid,))
    reloader.start()
    assert jwks_source.received.wait(5)
    now[0] = 311.0
    outcome = []

    def ask():
        try:
            outcome.append(keyset.get("rotated"))
        except assertion.KeysUnavailable as e:
            outcome.append(e)

    waiter = threading.Thread(target=ask)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive(), "the unknown kid waits for the read in progress"
    jwks_source.gate.set()
    reloader.join(10)
    waiter.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], assertion.KeysUnavailable)
    assert jwks_source.requests == 2, "no second read queued behind the first"
    # The next request with that kid has the refetch.
    now[0] = 312.0
    assert keyset.get("rotated") is None
    assert jwks_source.requests == 3


def test_a_source_that_trickles_its_headers_is_given_up_at_jwks_timeout(jwks_source):
    """JWKS_TIMEOUT bounds the whole fetch, status line and headers included: a source sending
    a header byte now and then is given up at the deadline, not kept for as long as it likes."""
    jwks_source.mode = "trickle-headers"
    keyset = assertion.KeySet(url=jwks_source.url, timeout=1)
    ended, outcome = _time_until_unavailable(keyset)
    assert ended, "still reading the headers 10 s after a 1 s JWKS_TIMEOUT"
    assert len(outcome) == 1 and 0.9 < outcome[0] < 1.5, outcome


_LOOKUP_IN_A_SILENT_RESOLVER = """
import socket, time
# The only name server this namespace knows: it hears every query and never answers one.
silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
silent.bind(("127.0.0.1", 53))
from knoxgate_django import assertion
started = time.monotonic()
try:
    assertion._fetch("http://jwks.knoxgate.test/.well-known/jwks.json", 1.0)
    outcome = "fetched"
except Exception as e:
    outcome = type(e).__name__
took = time.monotonic() - started
silent.settimeout(0)
try:
    silent.recv(512)
    asked = "asked"
except BlockingIOError:
    asked = "not-asked"
print(f"{took:.2f} {asked} {outcome}")
"""


def test_a_name_lookup_that_never_answers_is_given_up_at_jwks_timeout(tmp_path):
    """A JWKS host whose name server does not answer: the lookup is bounded by JWKS_TIMEOUT like
    the rest of the fetch, not by the resolver's own retries (here 2 x 5 s). Run in a network
    and mount namespace of its own (``unshare``), whose resolv.conf names a silent server."""
    ip = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)
    if not (ip and shutil.which("unshare")):
        pytest.skip("needs iproute2's ip and util-linux's unshare")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "--mount", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"this machine makes no user and network namespace: {probe.stderr.strip()}")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:2\n")
    inside = (f"{ip} link set lo up && mount --bind {resolv} /etc/resolv.conf && "
              f'exec "$0" -c "$1"')
    run = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", "--mount", "sh", "-c", inside,
         sys.executable, _LOOKUP_IN_A_SILENT_RESOLVER],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    took, asked, outcome = run.stdout.split()
    if asked != "asked":
        pytest.skip("name lookups here bypass resolv.conf's server (nscd or systemd-resolved)")
    assert outcome == "TimeoutError" and 0.9 < float(took) < 1.8, run.stdout


def test_a_host_name_the_resolver_cannot_encode_is_a_failed_fetch_that_says_why(caplog):
    """A label over 63 characters fails in the lookup itself (IDNA encoding, not an OSError):
    the fetch fails with that reason."""
    keyset = assertion.KeySet(url="http://" + "a" * 64 + ".example/jwks.json", timeout=2)
    with pytest.raises(assertion.KeysUnavailable):
        keyset.get("any")
    assert "label empty or too long" in _load_errors(caplog)


def _time_until_unavailable(keyset) -> tuple[bool, list[float]]:
    """Asks ``keyset`` for an unknown kid on a thread given 10 s: whether it ended, and how long
    it took to raise KeysUnavailable (empty if it did not)."""
    outcome = []

    def fetch():
        started = time.monotonic()
        try:
            keyset.get("any")
        except assertion.KeysUnavailable:
            outcome.append(time.monotonic() - started)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(10)
    return not thread.is_alive(), outcome


# --- A JWKS URL over HTTPS: the package's own TLS context, trusting a throwaway CA ---


class _CA:
    """A throwaway certificate authority (made with `cryptography`) that issues server
    certificates for given names, written as PEM files under ``directory``."""

    def __init__(self, directory, name: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self._x509, self._hashes, self._serialization, self._ec = x509, hashes, serialization, ec
        self._server_auth, self._cn = ExtendedKeyUsageOID.SERVER_AUTH, NameOID.COMMON_NAME
        self.directory, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            self._builder(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = directory / f"{name}.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject, issuer, public_key):
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            self._x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(self._x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server-side TLS context with a certificate this CA signed for ``names`` (DNS names,
        or IP addresses as IP SANs)."""
        x509 = self._x509
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        sans = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        cert = (
            self._builder(x509.Name([x509.NameAttribute(self._cn, names[0])]), self.cert.subject,
                          key.public_key())
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([self._server_auth]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, self._hashes.SHA256())
        )
        stem = self.directory / f"{self.name}-{'-'.join(names)}"
        cert_file, key_file = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_file.write_bytes(cert.public_bytes(self._serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(
            self._serialization.Encoding.PEM, self._serialization.PrivateFormat.PKCS8,
            self._serialization.NoEncryption()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        return context


@pytest.fixture
def trusted_ca(tmp_path, monkeypatch):
    """A throwaway CA that the package's own TLS context (``assertion._tls_context``, built with
    ``ssl.create_default_context()``) trusts for this test only: OpenSSL reads SSL_CERT_FILE
    when the context loads the default CA certificates, and the context is cached, so the cache
    is emptied before and after."""
    ca = _CA(tmp_path, "knoxgate-test-ca")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert_file))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-ca-dir"))  # the system's CAs are not needed
    assertion._tls_context.cache_clear()
    try:
        yield ca
    finally:
        assertion._tls_context.cache_clear()


@contextlib.contextmanager
def _https_source(context: ssl.SSLContext, host: str, *keys):
    source = JwksSource()
    source.serve(*keys)
    with _serving(source, tls=context, host=host):
        yield source


def _load_errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.name == "knoxgate_django" and r.levelname == "ERROR")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_jwks_url_over_https_with_a_trusted_certificate_is_loaded(trusted_ca, ed_key, caplog, host):
    """The certificate names both 127.0.0.1 (an IP SAN) and localhost (a DNS SAN), and a CA the
    package's TLS context trusts signed it: the keys are loaded."""
    context = trusted_ca.server_context("localhost", "127.0.0.1")
    with _https_source(context, host, ed_key) as source:
        assert source.url.startswith(f"https://{host}:")
        keyset = assertion.KeySet(url=source.url, timeout=5)
        key = keyset.get(ed_key.kid)
        assert key is not None and key.key_id == ed_key.kid
        assert source.requests == 1 and source.handshake_errors == []
        assert keyset.get("not-there") is None, "a successful read answers for unknown kids"
    assert _load_errors(caplog) == ""


def test_a_certificate_no_trusted_ca_signed_is_a_failed_fetch(trusted_ca, tmp_path, ed_key, caplog):
    """Same names, but signed by another CA, which the package does not trust: the JWKS is not
    read (no request gets through), the key is not loaded, and the failure is logged."""
    stranger = _CA(tmp_path, "untrusted-ca")
    with _https_source(stranger.server_context("localhost", "127.0.0.1"), "127.0.0.1", ed_key) as source:
        keyset = assertion.KeySet(url=source.url, timeout=5)
        with pytest.raises(assertion.KeysUnavailable):
            keyset.get(ed_key.kid)
        assert keyset.fetches == 1 and keyset._keys == {}
        assert source.requests == 0, "the HTTP request was sent over an unverified connection"
    errors = _load_errors(caplog)
    assert "cannot load https://127.0.0.1:" in errors
    assert "certificate verify failed" in errors, errors


@pytest.mark.parametrize(
    "host, names",
    [
        ("localhost", ["other.example"]),
        # An IP address is matched against IP SANs, not a DNS name that resolves to it.
        ("127.0.0.1", ["localhost"]),
    ],
)
def test_a_certificate_for_another_host_is_refused(trusted_ca, ed_key, caplog, host, names):
    """Signed by the trusted CA, but not for the host the URL names: refused like any failed
    fetch (the hostname is checked, not just the chain)."""
    with _https_source(trusted_ca.server_context(*names), host, ed_key) as source:
        keyset = assertion.KeySet(url=source.url, timeout=5)
        with pytest.raises(assertion.KeysUnavailable):
            keyset.get(ed_key.kid)
        assert keyset._keys == {}
        assert source.requests == 0, "the HTTP request was sent to a host the certificate is not for"
    errors = _load_errors(caplog)
    assert "certificate verify failed" in errors and "mismatch" in errors.lower(), errors


def test_a_tls_handshake_that_never_completes_is_given_up_at_jwks_timeout(trusted_ca):
    """A server that accepts the TCP connection and reads the ClientHello, but never answers it:
    the handshake is bounded by JWKS_TIMEOUT like the rest of the fetch."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop, client_hello = threading.Event(), threading.Event()
    held = []

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)
            conn.settimeout(5)
            try:
                if conn.recv(1) == b"\x16":  # a TLS handshake record: the ClientHello
                    client_hello.set()
            except OSError:
                pass

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        keyset = assertion.KeySet(url=f"https://127.0.0.1:{listener.getsockname()[1]}/jwks.json", timeout=1)
        ended, outcome = _time_until_unavailable(keyset)
        assert ended, "still in the TLS handshake 10 s after a 1 s JWKS_TIMEOUT"
        assert client_hello.is_set(), "the client never got to the handshake"
    finally:
        stop.set()
        acceptor.join(5)
        for conn in held:
            conn.close()
        listener.close()
    assert len(outcome) == 1 and 0.9 < outcome[0] < 2, outcome
