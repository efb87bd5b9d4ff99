"""Which header values make an identity: exactly one canonical integer, from a trusted peer,
under the configured name; everything else is "not authenticated", never another user."""

from __future__ import annotations

import pytest
from django.test import Client

from conftest import asgi_get

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", "alice@example.com", "pw")


def whoami(client: Client, path: str = "/plain/whoami", **headers):
    response = client.get(path, headers=headers)
    return response.status_code, response.json()


def test_header_gives_that_user(client, alice):
    assert whoami(client, **{"X-Auth-User-Id": str(alice.pk)}) == (200, {"authenticated": True, "id": alice.pk})
    status, body = whoami(client, "/api/whoami", **{"X-Auth-User-Id": str(alice.pk)})
    assert (status, body["id"]) == (200, alice.pk)


def test_no_header_is_anonymous(client):
    assert whoami(client) == (200, {"authenticated": False, "id": None})
    # DRF: 401 with knox's challenge, not 403.
    response = client.get("/api/whoami")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


BAD_VALUES = [
    "",
    " ",
    "abc",
    "1.0",
    "-1",
    "+1",
    " 1",
    "1 ",
    "01",
    "1_000",
    "0x1",
    "1e3",
    "1,2",
    "1, 2",
    "\u0661",  # ARABIC-INDIC DIGIT ONE: int() accepts it
    "99999999999999999999999",
]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_malformed_user_id_is_refused(client, alice, value):
    # The plain middleware: anonymous. DRF: 401 even though the view would allow anyone.
    assert whoami(client, **{"X-Auth-User-Id": value}) == (200, {"authenticated": False, "id": None})
    assert client.get("/api/open", headers={"X-Auth-User-Id": value}).status_code == 401


def test_refused_header_does_not_fall_back_to_session(client, alice):
    client.force_login(alice)
    assert whoami(client) == (200, {"authenticated": True, "id": alice.pk})
    assert whoami(client, **{"X-Auth-User-Id": "1,2"}) == (200, {"authenticated": False, "id": None})


def test_async_views_await_the_same_user(client, alice):
    """request.auser() (async views; login_required on them from Django 5.1) answers the
    knoxgate user, and for a refused identity AnonymousUser, never the session's user."""
    r = client.get("/plain/async-whoami", headers={"X-Auth-User-Id": str(alice.pk)})
    assert r.json() == {"authenticated": True, "id": alice.pk}
    client.force_login(alice)
    r = client.get("/plain/async-whoami", headers={"X-Auth-User-Id": "1,2"})
    assert r.json() == {"authenticated": False, "id": None}


def test_async_views_under_asgi(alice):
    headers = [(b"x-auth-user-id", str(alice.pk).encode())]
    assert asgi_get("/plain/async-whoami", headers) == (200, {"authenticated": True, "id": alice.pk})
    assert asgi_get("/plain/async-whoami", [(b"x-auth-user-id", b"01")]) == (
        200,
        {"authenticated": False, "id": None},
    )


def test_untrusted_peer_is_refused(client, alice):
    r = client.get("/plain/whoami", headers={"X-Auth-User-Id": str(alice.pk)}, REMOTE_ADDR="192.0.2.7")
    assert r.json() == {"authenticated": False, "id": None}
    r = client.get("/api/open", headers={"X-Auth-User-Id": str(alice.pk)}, REMOTE_ADDR="192.0.2.7")
    assert r.status_code == 401


@pytest.mark.parametrize(
    "proxies, peer, trusted",
    [
        (["10.1.0.0/16"], "10.1.2.3", True),
        (["10.1.0.0/16"], "10.2.0.1", False),
        (["10.1.0.0/16"], "::ffff:10.1.2.3", True),  # IPv4-mapped IPv6 peer
        (["2001:db8::/32"], "2001:db8::5", True),
        (["127.0.0.1/32", "::1/128"], "::1", True),
        (["127.0.0.1/32", "::1/128"], "127.0.0.2", False),
        ([], "127.0.0.1", False),
        (["127.0.0.1/32"], "", False),
        (["127.0.0.1/32"], "not-an-ip", False),
    ],
)
def test_trusted_proxies(client, settings, alice, proxies, peer, trusted):
    settings.KNOXGATE = {**settings.KNOXGATE, "TRUSTED_PROXIES": proxies}
    r = client.get("/plain/whoami", headers={"X-Auth-User-Id": str(alice.pk)}, REMOTE_ADDR=peer)
    assert r.json()["authenticated"] is trusted


def test_only_the_configured_header_name(client, settings, alice):
    settings.KNOXGATE = {**settings.KNOXGATE, "USER_ID_HEADER": "X-Gate-User"}
    assert whoami(client, **{"X-Auth-User-Id": str(alice.pk)})[1]["authenticated"] is False
    assert whoami(client, **{"X-Gate-User": str(alice.pk)}) == (200, {"authenticated": True, "id": alice.pk})


def test_unknown_user_id_authenticates_but_loading_fails(client, alice):
    # knoxgate only sends ids of existing, active users; a deleted row shows up as soon as
    # something reads a field that was not sent.
    status, body = whoami(client, **{"X-Auth-User-Id": str(alice.pk + 1000)})
    assert (status, body) == (200, {"authenticated": True, "id": alice.pk + 1000})


def test_wsgi_comma_in_an_unsigned_username_or_email_is_refused(client, alice):
    # A client's copy and knoxgate's, joined by the WSGI server: the client's comes first.
    for header, joined in (
        ("X-Auth-Email", "attacker@evil.example,alice@example.com"),
        ("X-Auth-Username", "root,alice"),
    ):
        headers = {"X-Auth-User-Id": str(alice.pk), header: joined}
        assert whoami(client, **headers) == (200, {"authenticated": False, "id": None}), header
        assert client.get("/api/open", headers=headers).status_code == 401, header


# --- ASGI: Django merges duplicates with a comma and maps X_Auth_User_Id onto the same key ---


def test_asgi_single_header_works(alice):
    assert asgi_get("/plain/whoami", [(b"x-auth-user-id", str(alice.pk).encode())]) == (
        200,
        {"authenticated": True, "id": alice.pk},
    )
    # Header names are case-insensitive.
    assert asgi_get("/plain/whoami", [(b"X-AUTH-USER-ID", str(alice.pk).encode())])[1]["authenticated"]


@pytest.mark.parametrize(
    "headers",
    [
        # the underscore twin alone
        [(b"x_auth_user_id", b"{pk}")],
        # the proxy's header and a client's underscore copy, in either order
        [(b"x-auth-user-id", b"{pk}"), (b"x_auth_user_id", b"{other}")],
        [(b"x_auth_user_id", b"{other}"), (b"x-auth-user-id", b"{pk}")],
        # the header twice (Django joins them with a comma), even with the same value
        [(b"x-auth-user-id", b"{pk}"), (b"x-auth-user-id", b"{pk}")],
        [(b"x-auth-user-id", b"{pk}"), (b"X-Auth-User-Id", b"{other}")],
    ],
)
def test_asgi_spoofed_spellings_are_refused(alice, django_user_model, headers):
    other = django_user_model.objects.create_user("mallory", "m@example.com", "pw")
    headers = [
        (n, v.replace(b"{pk}", str(alice.pk).encode()).replace(b"{other}", str(other.pk).encode()))
        for n, v in headers
    ]
    assert asgi_get("/plain/whoami", headers) == (200, {"authenticated": False, "id": None})
    status, body = asgi_get("/api/open", headers)
    # Refused (401), or, where Django itself drops the underscore twin, simply anonymous.
    assert status == 401 or (status, body) == (200, {"authenticated": False, "id": None})


def test_asgi_underscore_twin_of_an_attribute_header_is_refused(alice):
    headers = [(b"x-auth-user-id", str(alice.pk).encode()), (b"x_auth_is_staff", b"true")]
    assert asgi_get("/plain/whoami", headers) == (200, {"authenticated": False, "id": None})


def test_middleware_runs_natively_in_async_stacks(rf, alice):
    import asyncio

    from knoxgate_django.middleware import KnoxgateMiddleware

    async def view(request):
        return request.user

    mw = KnoxgateMiddleware(view)
    assert asyncio.iscoroutinefunction(mw)
    request = rf.get("/", headers={"X-Auth-User-Id": str(alice.pk)})
    user = asyncio.run(mw(request))
    assert user.pk == alice.pk and user.is_authenticated

    sync_mw = KnoxgateMiddleware(lambda request: request.user)
    assert not asyncio.iscoroutinefunction(sync_mw)
    assert sync_mw(rf.get("/", headers={"X-Auth-User-Id": "x"})).is_anonymous


def test_under_asgi_assertions_are_verified_off_the_event_loop(rf, alice, assertion_settings, ed_key):
    """With a JWKS file as with a URL: reading it (a mount that hangs, another thread reading
    it) must not stall every request of the worker."""
    import asyncio
    import threading

    from knoxgate_django import middleware

    threads = {}
    apply = middleware._apply

    def recording_apply(request):
        threads["apply"] = threading.get_ident()
        return apply(request)

    async def view(request):
        threads["loop"] = threading.get_ident()
        return request.user

    mw = middleware.KnoxgateMiddleware(view)
    request = rf.get("/", headers={"X-Auth-Assertion": ed_key.sign(str(alice.pk))})
    original, middleware._apply = middleware._apply, recording_apply
    try:
        user = asyncio.run(mw(request))
    finally:
        middleware._apply = original
    assert user.pk == alice.pk
    assert threads["apply"] != threads["loop"]


def test_refusals_are_logged(client, alice, caplog):
    with caplog.at_level("WARNING", logger="knoxgate_django"):
        client.get("/plain/whoami", headers={"X-Auth-User-Id": "1,2"})
    assert [r.getMessage() for r in caplog.records if r.name == "knoxgate_django"] == [
        "knoxgate identity refused: header 'x-auth-user-id' is not a single user id"
    ]


class _Headers:
    """An ASGI server's own header container: iterable again and again, not a list."""

    def __init__(self, items):
        self._items = list(items)

    def __iter__(self):
        return iter(self._items)


@pytest.mark.parametrize("headers_as", [_Headers, lambda items: (item for item in items)], ids=["iterable", "iterator"])
def test_asgi_headers_in_any_iterable_are_checked_or_refused(alice, headers_as):
    """ASGI allows any iterable of headers: one that can be read again is checked like a list;
    one that cannot (Django read it up to build META) leaves nothing to check, so identity
    headers are refused rather than trusted unchecked."""
    twin = [(b"x_auth_user_id", str(alice.pk).encode())]
    assert asgi_get("/plain/whoami", twin, headers_as=headers_as) == (200, {"authenticated": False, "id": None})
    single = [(b"x-auth-user-id", str(alice.pk).encode())]
    expected = (200, {"authenticated": True, "id": alice.pk}) if headers_as is _Headers else (
        200,
        {"authenticated": False, "id": None},
    )
    assert asgi_get("/plain/whoami", single, headers_as=headers_as) == expected
