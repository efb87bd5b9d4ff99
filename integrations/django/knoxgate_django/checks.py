"""System checks run at start-up (``manage.py check``, runserver, migrate), so that a typo or a
dangerous layout fails or warns at deploy time instead of showing at the first request.

* ``knoxgate_django.E001``: ``KNOXGATE`` is invalid (the message names the setting).
* ``knoxgate_django.E002``: ``KnoxgateMiddleware`` comes before Django's
  ``AuthenticationMiddleware`` in ``MIDDLEWARE``.
* ``knoxgate_django.E003``: ``JWKS_FILE`` does not exist, is not a regular file, or cannot be
  read.
* ``knoxgate_django.W001``: ``TRUSTED_PROXIES`` holds a network wider than one host while
  ``REQUIRE_ASSERTION`` is off.
* ``knoxgate_django.W002``: DRF's ``SessionAuthentication`` comes before
  ``KnoxgateAuthentication`` in ``DEFAULT_AUTHENTICATION_CLASSES``.
* ``knoxgate_django.W003``: ``TRIGGER_SQL_DIR`` lacks ``install.sql`` or ``uninstall.sql``, so
  ``migrate`` would fail here (a warning: web processes may run where migrations do not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from knoxgate_django.conf import TRIGGER_SQL_FILES, Config, get_config

AUTHENTICATION_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"
KNOXGATE_MIDDLEWARE = "knoxgate_django.middleware.KnoxgateMiddleware"
SESSION_AUTHENTICATION = "rest_framework.authentication.SessionAuthentication"
KNOXGATE_AUTHENTICATION = "knoxgate_django.authentication.KnoxgateAuthentication"


@checks.register(checks.Tags.security)
def check_settings(app_configs=None, **kwargs):
    try:
        config = get_config()
    except ImproperlyConfigured as e:
        return [checks.Error(str(e), id="knoxgate_django.E001")]
    return _check_jwks_file(config) + _check_trusted_proxies(config) + _check_trigger_sql_dir(config)


def _check_trigger_sql_dir(config: Config) -> list[checks.CheckMessage]:
    """The files ``migrate`` reads. Only a warning: requests never need them, and web processes
    may well run where they are not (migrations run by a job of their own)."""
    if config.trigger_sql_dir is None:
        return []
    missing = [n for n in TRIGGER_SQL_FILES if not (Path(config.trigger_sql_dir) / n).is_file()]
    if not missing:
        return []
    return [
        checks.Warning(
            f"KNOXGATE['TRIGGER_SQL_DIR'] = {config.trigger_sql_dir!r} has no "
            f"{' or '.join(missing)}: manage.py migrate cannot run here",
            hint="Put `knoxgate migrate --print-sql` output there, or run migrations where it is.",
            id="knoxgate_django.W003",
        )
    ]


def _check_jwks_file(config: Config) -> list[checks.CheckMessage]:
    """A JWKS_FILE that cannot be read would have every assertion answered 503. Checked here,
    not in the settings, because the file may be put in place after the settings are read."""
    if config.jwks_file is None:
        return []
    path = Path(config.jwks_file)
    try:
        # is_file() first: opening a FIFO would wait for a writer. It raises, rather than
        # answering False, for a directory on the way that this process may not search.
        if not path.is_file():
            problem = "does not exist or is not a regular file"
        else:
            with path.open("rb"):
                return []
    except OSError as e:
        problem = f"cannot be read: {e}"
    return [
        checks.Error(
            f"KNOXGATE['JWKS_FILE'] = {config.jwks_file!r} {problem}: no assertion can be "
            "verified, and each is answered 503.",
            hint="Point JWKS_FILE at a copy of knoxgate's /.well-known/jwks.json that this "
            "process can read, or use JWKS_URL.",
            id="knoxgate_django.E003",
        )
    ]


def _check_trusted_proxies(config: Config) -> list[checks.CheckMessage]:
    wide = [str(n) for n in config.trusted_proxies if n.prefixlen < n.max_prefixlen]
    if wide and not config.require_assertion:
        everything = [n for n in wide if n.endswith("/0")]
        message = (
            f"KNOXGATE['TRUSTED_PROXIES'] holds {', '.join(wide)}, wider than a single host, "
            "while KNOXGATE['REQUIRE_ASSERTION'] is off: anything that connects to Django from "
            "an address in it can name any user in the identity headers. A published Docker "
            "port or a Kubernetes NodePort can reach Django from such an address (Docker's "
            "userland proxy, the SNAT of externalTrafficPolicy Cluster)."
        )
        if everything:
            message += (f" {' and '.join(everything)} trusts every address of its family: any "
                        "client that reaches Django at all.")
        return [
            checks.Warning(
                message,
                hint="List the proxy's own fixed addresses, each as a single host (/32 for IPv4, "
                "/128 for IPv6), or turn REQUIRE_ASSERTION on so that only a signed assertion "
                "is believed.",
                id="knoxgate_django.W001",
            )
        ]
    return []


def _position(entries: Any, wanted: str) -> int | None:
    """Index of the first entry that is ``wanted`` or a subclass of it (entries are dotted paths
    or, in REST_FRAMEWORK, classes); entries that do not import are skipped."""
    try:
        base = import_string(wanted)
    except ImportError:
        return None
    for i, entry in enumerate(entries):
        if entry == wanted:
            return i
        try:
            cls = import_string(entry) if isinstance(entry, str) else entry
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, base):
            return i
    return None


@checks.register(checks.Tags.security)
def check_order(app_configs=None, **kwargs):
    errors: list[checks.CheckMessage] = []
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    knoxgate, auth = _position(middleware, KNOXGATE_MIDDLEWARE), _position(
        middleware, AUTHENTICATION_MIDDLEWARE
    )
    if knoxgate is not None and auth is not None and knoxgate < auth:
        errors.append(
            checks.Error(
                f"MIDDLEWARE lists {middleware[knoxgate]!r} before {middleware[auth]!r}: "
                "AuthenticationMiddleware would then replace the user KnoxgateMiddleware set, "
                "so a refused identity falls back to the session's user.",
                hint=f"Put {KNOXGATE_MIDDLEWARE!r} after {AUTHENTICATION_MIDDLEWARE!r}.",
                id="knoxgate_django.E002",
            )
        )
    rest = getattr(settings, "REST_FRAMEWORK", None)
    classes = rest.get("DEFAULT_AUTHENTICATION_CLASSES") if isinstance(rest, dict) else None
    if isinstance(classes, (list, tuple)):
        knoxgate = _position(classes, KNOXGATE_AUTHENTICATION)
        session = _position(classes, SESSION_AUTHENTICATION)
        if knoxgate is not None and session is not None and session < knoxgate:
            errors.append(
                checks.Warning(
                    "REST_FRAMEWORK['DEFAULT_AUTHENTICATION_CLASSES'] lists SessionAuthentication "
                    "before KnoxgateAuthentication: a request with a session cookie is "
                    "authenticated as the session's user, and knoxgate's identity (refused or "
                    "not) is never looked at.",
                    hint=f"Put {KNOXGATE_AUTHENTICATION!r} first.",
                    id="knoxgate_django.W002",
                )
            )
    return errors
