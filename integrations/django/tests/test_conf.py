"""The KNOXGATE settings: defaults, validation at start-up, and the installed package."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

import knoxgate_django
from knoxgate_django.conf import parse

HERE = Path(__file__).resolve().parent


def test_tests_use_the_installed_package():
    # run-tests.sh installs the package into the venv; the source tree must not shadow it,
    # so that missing package data (the SQL files) would show.
    installed = Path(knoxgate_django.__file__).resolve()
    assert installed.is_relative_to(Path(sys.prefix).resolve()), installed
    assert (installed.parent / "sql" / "install.sql").is_file()


def test_defaults():
    c = parse({})
    assert c.user_id.meta == "HTTP_X_AUTH_USER_ID"
    assert c.assertion.meta == "HTTP_X_AUTH_ASSERTION"
    assert [str(n) for n in c.trusted_proxies] == ["127.0.0.1/32", "::1/128"]
    assert c.require_assertion is False and c.verifies_assertions is False
    assert c.attribute_headers == {}
    assert c.algorithms == ("EdDSA", "ES256") and c.issuer == "knoxgate"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"USER_ID_HEADERS": "x"}, "unknown keys"),
        ({"USER_ID_HEADER": "X_Auth_User_Id"}, "hyphens only"),
        ({"USER_ID_HEADER": ""}, "non-empty"),
        ({"USER_ID_HEADER": None}, "must be set"),
        ({"TRUSTED_PROXIES": "127.0.0.1/32"}, "list of CIDRs"),
        ({"TRUSTED_PROXIES": ["10.0.0.1/8"]}, "host bits"),
        ({"TRUSTED_PROXIES": ["localhost"]}, "localhost"),
        # An IPv4-mapped network wider than ::ffff:0:0/96 would reach outside the mapped range.
        ({"TRUSTED_PROXIES": ["::ffff:0:0/95"]}, "host bits"),
        ({"REQUIRE_ASSERTION": True}, "needs JWKS_FILE or JWKS_URL"),
        ({"REQUIRE_ASSERTION": "yes"}, "True or False"),
        ({"JWKS_FILE": "/x", "JWKS_URL": "http://x/"}, "not both"),
        ({"JWKS_URL": "file:///etc/passwd", "ASSERTION_AUDIENCE": "a"}, "http:// or https://"),
        # What the fetch could never use, or would use other than as written.
        ({"JWKS_URL": "http:///jwks.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*no host"),
        ({"JWKS_URL": "http://:9090/jwks.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*no host"),
        ({"JWKS_URL": "http://knoxgate:admin/jwks.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*port"),
        ({"JWKS_URL": "http://knoxgate:65536/jwks.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*port"),
        ({"JWKS_URL": "http://knoxgate:0/jwks.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*port"),
        ({"JWKS_URL": "http://[::1/jwks.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*not a URL"),
        ({"JWKS_URL": "http://admin:secret@knoxgate/jwks.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*credentials"),
        ({"JWKS_URL": "http://@knoxgate/jwks.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*credentials"),
        # urlsplit drops tabs and newlines without a word: the URL fetched would not be the one set.
        ({"JWKS_URL": "http://knox\tgate/jwks.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*whitespace"),
        ({"JWKS_URL": "http://knoxgate/jwks.json\n", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*whitespace"),
        ({"JWKS_URL": "http://knoxgate/jwks .json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*whitespace"),
        ({"JWKS_URL": "http://knoxgate/jwks\x00.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*control"),
        ({"JWKS_URL": "http://knoxgate/jwks\x7f.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*control"),
        # The request line is ASCII: every fetch would fail on the encoding.
        ({"JWKS_URL": "http://knoxgate/cl\u00e9s.json", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*non-ASCII"),
        ({"JWKS_URL": "http://knoxgate/jwks.json?v=\u00e9", "ASSERTION_AUDIENCE": "a"}, r"JWKS_URL.*non-ASCII"),
        ({"JWKS_FILE": "/x"}, "ASSERTION_AUDIENCE"),
        ({"ASSERTION_ALGORITHMS": ["HS256"]}, "subset"),
        ({"ASSERTION_ALGORITHMS": []}, "subset"),
        ({"JWKS_TIMEOUT": 0}, "JWKS_TIMEOUT"),
        ({"JWKS_RETRY_INTERVAL": -1}, "JWKS_RETRY_INTERVAL"),
        ({"ASSERTION_LEEWAY": True}, "ASSERTION_LEEWAY"),
        # NaN would compare false with every exp; an infinite timeout no socket takes.
        ({"ASSERTION_LEEWAY": float("nan")}, "finite"),
        ({"JWKS_TIMEOUT": float("inf")}, "finite"),
        # Past time_t, no socket or thread wait takes it: every fetch would fail.
        ({"JWKS_TIMEOUT": 1e10}, r"JWKS_TIMEOUT.*from 0.001 to 300"),
        ({"JWKS_TIMEOUT": 301}, r"JWKS_TIMEOUT.*from 0.001 to 300"),
        # Too large for a float: refused as E001, not an OverflowError out of the check.
        ({"JWKS_CACHE_SECONDS": 10**400}, "finite"),
        ({"JWKS_CACHE_SECONDS": float("nan")}, "finite"),
        # An unbounded leeway keeps every expired assertion good; 0 s intervals read the source
        # on every request with an unknown kid, or during an outage.
        ({"ASSERTION_LEEWAY": 61}, r"ASSERTION_LEEWAY.*from 0 to 60"),
        ({"ASSERTION_LEEWAY": 86400}, r"ASSERTION_LEEWAY.*from 0 to 60"),
        ({"ASSERTION_LEEWAY": -1}, r"ASSERTION_LEEWAY.*from 0 to 60"),
        ({"JWKS_REFETCH_INTERVAL": 0}, r"JWKS_REFETCH_INTERVAL.*>= 1"),
        ({"JWKS_REFETCH_INTERVAL": 0.5}, r"JWKS_REFETCH_INTERVAL.*>= 1"),
        ({"JWKS_RETRY_INTERVAL": 0}, r"JWKS_RETRY_INTERVAL.*>= 1"),
        ({"JWKS_RETRY_INTERVAL": 0.1}, r"JWKS_RETRY_INTERVAL.*>= 1"),
        # None or "" would make DRF answer 403, not 401; a newline cannot go into a header.
        ({"WWW_AUTHENTICATE": None}, "WWW_AUTHENTICATE.*non-empty string"),
        ({"WWW_AUTHENTICATE": ""}, "WWW_AUTHENTICATE.*non-empty string"),
        ({"WWW_AUTHENTICATE": " "}, "WWW_AUTHENTICATE.*non-empty string"),
        ({"WWW_AUTHENTICATE": 401}, "WWW_AUTHENTICATE.*non-empty string"),
        ({"WWW_AUTHENTICATE": "Token\r\nSet-Cookie: x=1"}, "WWW_AUTHENTICATE.*non-empty string"),
        ({"ASSERTION_ALGORITHMS": None}, "subset"),
        ({"ASSERTION_ALGORITHMS": 256}, "subset"),
        ({"ASSERTION_ALGORITHMS": "ES256"}, "subset"),
        # One header read as two things: a user id of 1 would be is_staff=True.
        ({"IS_STAFF_HEADER": "X-Auth-User-Id"}, "name the same header"),
        ({"USERNAME_HEADER": "X-Auth-Name", "EMAIL_HEADER": "x-auth-name"}, "name the same header"),
        ({"EMAIL_HEADER": "X-Auth-Assertion"}, "name the same header"),
    ],
)
def test_bad_settings(raw, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        parse(raw)


def test_limits_are_accepted_at_their_bounds():
    c = parse({"ASSERTION_LEEWAY": 60, "JWKS_REFETCH_INTERVAL": 1, "JWKS_RETRY_INTERVAL": 1,
               "JWKS_TIMEOUT": 300, "WWW_AUTHENTICATE": 'Bearer realm="api"'})
    assert c.leeway == 60 and c.jwks_refetch_interval == 1 and c.jwks_retry_interval == 1
    assert c.jwks_timeout == 300
    assert c.www_authenticate == 'Bearer realm="api"'
    assert parse({}).www_authenticate == "Token"


@pytest.mark.parametrize(
    "url",
    ["http://knoxgate:9090/.well-known/jwks.json", "https://[::1]:8443/jwks.json",
     "http://127.0.0.1/jwks.json?v=1", "https://knoxgate.example/jwks.json",
     "https://kn\u00f6xgate.example/jwks.json", "http://knoxgate/cl%C3%A9s.json"],
)
def test_a_jwks_url_the_fetch_can_use_is_accepted_as_written(url):
    assert parse({"JWKS_URL": url, "ASSERTION_AUDIENCE": "a"}).jwks_url == url


def test_ipv4_mapped_trusted_proxies_trust_the_ipv4_peer():
    """The peer address is compared as IPv4 when it is IPv4-mapped, so a mapped network is
    turned into its IPv4 equivalent: otherwise it would never match anything."""
    c = parse({"TRUSTED_PROXIES": ["::ffff:10.0.0.5/128", "::ffff:192.168.7.0/120"]})
    assert [str(n) for n in c.trusted_proxies] == ["10.0.0.5/32", "192.168.7.0/24"]
    for peer in ("10.0.0.5", "::ffff:10.0.0.5", "192.168.7.77", "::ffff:192.168.7.77"):
        assert c.peer_trusted(peer) is True, peer
    for peer in ("10.0.0.6", "::ffff:10.0.0.6", "192.168.8.1", "::10.0.0.5"):
        assert c.peer_trusted(peer) is False, peer


def _knoxgate_checks():
    return [m for m in checks.run_checks() if m.id.startswith("knoxgate_django")]


@pytest.mark.parametrize(
    "proxies", [["10.0.0.0/24"], ["127.0.0.1/32", "172.18.0.0/16"], ["0.0.0.0/0"], ["::/0"],
                ["fd00::/64"], ["10.0.0.2/31"]]
)
def test_a_trusted_network_wider_than_one_host_warns_without_require_assertion(settings, tmp_path, proxies):
    settings.KNOXGATE = {"TRUSTED_PROXIES": proxies}
    found = _knoxgate_checks()
    assert [m.id for m in found] == ["knoxgate_django.W001"]
    assert found[0].level == checks.WARNING
    assert "TRUSTED_PROXIES" in found[0].msg and "REQUIRE_ASSERTION" in found[0].msg
    wide = [p for p in proxies if not p.endswith(("/32", "/128"))]
    assert all(p in found[0].msg for p in wide)
    assert ("every address" in found[0].msg) == any(p.endswith("/0") for p in proxies)
    assert "/32" in found[0].hint and "/128" in found[0].hint
    # With REQUIRE_ASSERTION on, only a signature is believed: no warning.
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    settings.KNOXGATE = {"TRUSTED_PROXIES": proxies, "REQUIRE_ASSERTION": True,
                         "JWKS_FILE": str(jwks), "ASSERTION_AUDIENCE": "app"}
    assert _knoxgate_checks() == []


def test_single_host_trusted_proxies_do_not_warn(settings):
    settings.KNOXGATE = {"TRUSTED_PROXIES": ["172.18.0.5/32", "fd00::5/128", "127.0.0.1/32",
                                             "::ffff:10.0.0.5/128"]}
    assert _knoxgate_checks() == []
    settings.KNOXGATE = {"TRUSTED_PROXIES": []}
    assert _knoxgate_checks() == []


AUTH_MW = "django.contrib.auth.middleware.AuthenticationMiddleware"
KNOXGATE_MW = "knoxgate_django.middleware.KnoxgateMiddleware"
SESSION_MW = "django.contrib.sessions.middleware.SessionMiddleware"


@pytest.mark.django_db
def test_knoxgate_middleware_before_authentication_middleware_is_an_error(settings, client, django_user_model):
    # What the error prevents: the session's user taking the place of a refused identity.
    alice = django_user_model.objects.create_user("alice", "alice@example.com", "pw")
    settings.MIDDLEWARE = [SESSION_MW, KNOXGATE_MW, AUTH_MW]
    client.force_login(alice)
    assert client.get("/plain/whoami", headers={"X-Auth-User-Id": "5,1"}).json()["id"] == alice.pk

    found = _knoxgate_checks()
    assert [m.id for m in found] == ["knoxgate_django.E002"]
    assert found[0].level == checks.ERROR
    assert KNOXGATE_MW in found[0].msg and AUTH_MW in found[0].msg and "MIDDLEWARE" in found[0].msg
    # A subclass of either counts as it.
    settings.MIDDLEWARE = [SESSION_MW, "kgtest.middleware.MyKnoxgateMiddleware", AUTH_MW]
    assert [m.id for m in _knoxgate_checks()] == ["knoxgate_django.E002"]
    # In order, or without AuthenticationMiddleware: no error.
    for middleware in ([SESSION_MW, AUTH_MW, KNOXGATE_MW], [KNOXGATE_MW],
                       [SESSION_MW, AUTH_MW, "kgtest.middleware.MyKnoxgateMiddleware"]):
        settings.MIDDLEWARE = middleware
        assert _knoxgate_checks() == [], middleware
    settings.MIDDLEWARE = [SESSION_MW, AUTH_MW, KNOXGATE_MW]
    ordered = Client()  # a client loads the middleware once: a new one for the new order
    ordered.force_login(alice)
    assert ordered.get("/plain/whoami", headers={"X-Auth-User-Id": "5,1"}).json()["id"] is None


def test_session_authentication_before_knoxgate_authentication_warns(settings):
    session = "rest_framework.authentication.SessionAuthentication"
    knoxgate = "knoxgate_django.authentication.KnoxgateAuthentication"
    base = dict(settings.REST_FRAMEWORK)
    for classes in ([session, knoxgate], ["kgtest.middleware.MySessionAuthentication", knoxgate]):
        settings.REST_FRAMEWORK = {**base, "DEFAULT_AUTHENTICATION_CLASSES": classes}
        found = _knoxgate_checks()
        assert [m.id for m in found] == ["knoxgate_django.W002"], classes
        assert found[0].level == checks.WARNING
        assert "DEFAULT_AUTHENTICATION_CLASSES" in found[0].msg and "SessionAuthentication" in found[0].msg
    from rest_framework.authentication import SessionAuthentication

    from knoxgate_django.authentication import KnoxgateAuthentication

    settings.REST_FRAMEWORK = {**base, "DEFAULT_AUTHENTICATION_CLASSES": (SessionAuthentication, KnoxgateAuthentication)}
    assert [m.id for m in _knoxgate_checks()] == ["knoxgate_django.W002"]
    for classes in ([knoxgate, session], [knoxgate], [session], []):
        settings.REST_FRAMEWORK = {**base, "DEFAULT_AUTHENTICATION_CLASSES": classes}
        assert _knoxgate_checks() == [], classes


def test_a_jwks_file_that_cannot_be_read_is_an_error(settings, tmp_path):
    """Every assertion would be answered 503 (its keys cannot be read): said at deploy time."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    base = {"ASSERTION_AUDIENCE": "app"}
    settings.KNOXGATE = {**base, "JWKS_FILE": str(jwks)}
    assert _knoxgate_checks() == []
    for path in (tmp_path / "missing.json", tmp_path):
        settings.KNOXGATE = {**base, "JWKS_FILE": str(path)}
        found = _knoxgate_checks()
        assert [m.id for m in found] == ["knoxgate_django.E003"], path
        assert found[0].level == checks.ERROR
        assert "JWKS_FILE" in found[0].msg and str(path) in found[0].msg
        assert "not a regular file" in found[0].msg


@contextlib.contextmanager
def _unprivileged():
    """Run as a user that file permissions apply to: as root, with the effective uid of nobody
    for the duration (root reads any file)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_a_jwks_file_this_process_may_not_read_is_an_error(settings, tmp_path):
    # A directory everyone may search, holding a file nobody may read ...
    shared = Path(tempfile.mkdtemp(prefix="kgdj-jwks-"))
    try:
        shared.chmod(0o755)
        unreadable = shared / "jwks.json"
        unreadable.write_text('{"keys": []}')
        unreadable.chmod(0)
        # ... and a readable file in a directory only its owner may search.
        hidden = tmp_path / "private" / "jwks.json"
        hidden.parent.mkdir(mode=0o700)
        hidden.write_text('{"keys": []}')
        for path in (unreadable, hidden):
            settings.KNOXGATE = {"ASSERTION_AUDIENCE": "app", "JWKS_FILE": str(path)}
            with _unprivileged():
                found = _knoxgate_checks()
            assert [m.id for m in found] == ["knoxgate_django.E003"], path
            assert "cannot be read" in found[0].msg and "Permission denied" in found[0].msg
    finally:
        shutil.rmtree(shared)


def test_system_check_reports_bad_settings(settings):
    settings.KNOXGATE = {"TRUSTED_PROXIES": ["nonsense"]}
    errors = [e for e in checks.run_checks() if e.id == "knoxgate_django.E001"]
    assert len(errors) == 1 and "nonsense" in errors[0].msg
    settings.KNOXGATE = {"ASSERTION_ALGORITHMS": None}  # once a TypeError out of the check
    errors = [e for e in checks.run_checks() if e.id == "knoxgate_django.E001"]
    assert len(errors) == 1 and "ASSERTION_ALGORITHMS" in errors[0].msg
    settings.KNOXGATE = {}
    assert not [e for e in checks.run_checks() if e.id.startswith("knoxgate_django")]


@pytest.mark.django_db
def test_attribute_header_that_is_not_utf8_is_refused(client, django_user_model):
    u = django_user_model.objects.create_user("dave", "d@example.com", "pw")
    bad = b"\xff\xfe".decode("latin-1")
    r = client.get("/api/open", headers={"X-Auth-User-Id": str(u.pk), "X-Auth-Username": bad})
    assert r.status_code == 401
    r = client.get("/plain/whoami", headers={"X-Auth-User-Id": str(u.pk), "X-Auth-Username": bad})
    assert r.json() == {"authenticated": False, "id": None}


def test_peer_trust_is_remembered_per_address_and_stays_right_past_the_bound():
    from knoxgate_django import conf

    c = parse({"TRUSTED_PROXIES": ["10.1.0.0/16"]})
    assert c.peer_trusted("10.1.2.3") is True
    assert c.peer_trusted("10.2.0.1") is False
    assert c.peer_trusted(None) is False
    # More distinct peers than are remembered: the memory starts over, the answers stay right.
    for i in range(conf._TRUSTED_PEERS_REMEMBERED + 10):
        assert c.peer_trusted(f"10.{1 + i % 2}.{i // 256 % 256}.{i % 256}") is (i % 2 == 0)
    assert len(c._trusted_peers) <= conf._TRUSTED_PEERS_REMEMBERED
    assert c.peer_trusted("10.1.2.3") is True and c.peer_trusted("10.2.0.1") is False
    # Each Config has its own memory: a settings change is not answered from the old one.
    assert parse({"TRUSTED_PROXIES": []}).peer_trusted("10.1.2.3") is False


def test_a_trigger_sql_dir_with_the_files_is_accepted_and_read(tmp_path, settings):
    from knoxgate_django.triggers import trigger_sql

    for name in ("install.sql", "uninstall.sql"):
        (tmp_path / name).write_text(f"-- {name}\n")
    assert parse({"TRIGGER_SQL_DIR": str(tmp_path)})
    settings.KNOXGATE = {"TRIGGER_SQL_DIR": str(tmp_path)}
    assert trigger_sql("install.sql") == "-- install.sql\n"
    # Missing files: the migrations read them as Django loads its migration graph, before any
    # check runs; the error names the setting rather than being a bare FileNotFoundError.
    (tmp_path / "uninstall.sql").unlink()
    with pytest.raises(ImproperlyConfigured, match="TRIGGER_SQL_DIR"):
        trigger_sql("uninstall.sql")
    # Requests never read them: the settings stand, and the system check warns.
    from knoxgate_django.checks import check_settings

    assert parse({"TRIGGER_SQL_DIR": str(tmp_path)})
    warned = [m.id for m in check_settings()]
    assert warned == ["knoxgate_django.W003"], warned


def test_a_missing_trigger_sql_dir_does_not_stop_requests(client, settings, django_user_model):
    # Web processes may run where the migrations' SQL is not (a migrate job apart).
    settings.KNOXGATE = {**settings.KNOXGATE, "TRIGGER_SQL_DIR": "/only-in-the-migrate-job"}
    alice = django_user_model.objects.create_user("alice", "alice@example.com", "pw")
    assert client.get("/plain/whoami").status_code == 200
    r = client.get("/plain/whoami", headers={"X-Auth-User-Id": str(alice.pk)})
    assert r.json() == {"authenticated": True, "id": alice.pk}
