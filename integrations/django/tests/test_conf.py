"""The KNOXGATE settings: defaults, validation at start-up, and the installed package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

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
        ({"REQUIRE_ASSERTION": True}, "needs JWKS_FILE or JWKS_URL"),
        ({"REQUIRE_ASSERTION": "yes"}, "True or False"),
        ({"JWKS_FILE": "/x", "JWKS_URL": "http://x/"}, "not both"),
        ({"JWKS_URL": "file:///etc/passwd", "ASSERTION_AUDIENCE": "a"}, "http:// or https://"),
        ({"JWKS_FILE": "/x"}, "ASSERTION_AUDIENCE"),
        ({"ASSERTION_ALGORITHMS": ["HS256"]}, "subset"),
        ({"ASSERTION_ALGORITHMS": []}, "subset"),
        ({"JWKS_TIMEOUT": 0}, "JWKS_TIMEOUT"),
        ({"JWKS_RETRY_INTERVAL": -1}, "JWKS_RETRY_INTERVAL"),
        ({"ASSERTION_LEEWAY": True}, "ASSERTION_LEEWAY"),
        # NaN would compare false with every exp; an infinite timeout no socket takes.
        ({"ASSERTION_LEEWAY": float("nan")}, "finite"),
        ({"JWKS_TIMEOUT": float("inf")}, "finite"),
        ({"JWKS_CACHE_SECONDS": float("nan")}, "finite"),
        ({"ASSERTION_ALGORITHMS": None}, "subset"),
        ({"ASSERTION_ALGORITHMS": 256}, "subset"),
        ({"ASSERTION_ALGORITHMS": "ES256"}, "subset"),
        ({"TRIGGER_SQL_DIR": "/nonexistent/knoxgate-sql"}, "has no install.sql or uninstall.sql"),
        # One header read as two things: a user id of 1 would be is_staff=True.
        ({"IS_STAFF_HEADER": "X-Auth-User-Id"}, "name the same header"),
        ({"USERNAME_HEADER": "X-Auth-Name", "EMAIL_HEADER": "x-auth-name"}, "name the same header"),
        ({"EMAIL_HEADER": "X-Auth-Assertion"}, "name the same header"),
    ],
)
def test_bad_settings(raw, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        parse(raw)


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
    with pytest.raises(ImproperlyConfigured, match="uninstall.sql"):
        parse({"TRIGGER_SQL_DIR": str(tmp_path)})
    with pytest.raises(ImproperlyConfigured, match="TRIGGER_SQL_DIR"):
        trigger_sql("uninstall.sql")
