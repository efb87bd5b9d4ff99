"""The ``KNOXGATE`` settings dict, validated once and re-read when tests change settings.

Every key, its default and its meaning is listed in ``DEFAULTS``; the README repeats them.
"""

from __future__ import annotations

import ipaddress
import math
import urllib.parse
from pathlib import Path
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

#: Every accepted key with its default.
DEFAULTS: dict[str, Any] = {
    # Header knoxgate puts the user id in (knoxgate's verify.user_id_header).
    "USER_ID_HEADER": "X-Auth-User-Id",
    # Optional attribute headers; None means knoxgate does not send them.
    "USERNAME_HEADER": None,
    "EMAIL_HEADER": None,
    "IS_STAFF_HEADER": None,
    "IS_SUPERUSER_HEADER": None,
    # The identity headers are believed only from a peer (REMOTE_ADDR) inside one of these
    # networks: the proxy that talks to this Django process.
    "TRUSTED_PROXIES": ["127.0.0.1/32", "::1/128"],
    # Signed identity assertion (a compact JWS).
    "ASSERTION_HEADER": "X-Auth-Assertion",
    "REQUIRE_ASSERTION": False,
    "JWKS_FILE": None,
    "JWKS_URL": None,
    "JWKS_CACHE_SECONDS": 300,
    # Unknown key ids reread the JWKS source at most this often (seconds, >= 1).
    "JWKS_REFETCH_INTERVAL": 30,
    # After a failed read of the JWKS source, how long after it ended the source may be read
    # again (seconds, >= 1); doubled with each failure in a row, up to JWKS_REFETCH_INTERVAL.
    "JWKS_RETRY_INTERVAL": 1,
    "JWKS_TIMEOUT": 5,
    "ASSERTION_AUDIENCE": None,
    "ASSERTION_ISSUER": "knoxgate",
    "ASSERTION_ALGORITHMS": ["EdDSA", "ES256"],
    # Clock skew allowed on exp and iat (seconds, 0 to MAX_LEEWAY).
    "ASSERTION_LEEWAY": 5,
    # Verified assertions kept (by their exact bytes, until their exp): knoxgate reuses one
    # assertion per token until it nears expiry, so a hot token's is checked once. 0: off.
    "ASSERTION_CACHE_SIZE": 10000,
    # DRF: the WWW-Authenticate challenge, so that unauthenticated API calls get 401, not 403.
    "WWW_AUTHENTICATE": "Token",
    # Directory holding install.sql / uninstall.sql for the trigger migration; None: the SQL
    # shipped in this package (knoxgate's default table names knox_authtoken / auth_user).
    "TRIGGER_SQL_DIR": None,
}

SUPPORTED_ALGORITHMS = ("EdDSA", "ES256")

#: The largest ASSERTION_LEEWAY accepted (seconds): the leeway lengthens every assertion's life,
#: and a clock off by more than this is a fault to fix, not to tolerate.
MAX_LEEWAY = 60
#: The shortest JWKS_REFETCH_INTERVAL and JWKS_RETRY_INTERVAL accepted (seconds): shorter, a
#: stream of forged key ids, or an outage, would have every request read the source.
MIN_JWKS_INTERVAL = 1
#: The longest JWKS_TIMEOUT accepted (seconds): a request whose kid is not held may wait this
#: long, and a socket or thread wait takes no more than the platform's time_t allows.
MAX_JWKS_TIMEOUT = 300

#: The files a ``TRIGGER_SQL_DIR`` must hold (``knoxgate migrate --print-sql`` output).
TRIGGER_SQL_FILES = ("install.sql", "uninstall.sql")


def meta_key(header: str) -> str:
    """The ``request.META`` key a header name arrives under (WSGI and ASGI alike)."""
    return "HTTP_" + header.upper().replace("-", "_")


@dataclass(frozen=True)
class Header:
    """A configured header: its spelling and its META key."""

    name: str
    meta: str

    @classmethod
    def of(cls, key: str, value: Any) -> Header | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ImproperlyConfigured(f"KNOXGATE[{key!r}] must be a non-empty header name or None")
        if not all(c.isascii() and (c.isalnum() or c == "-") for c in value):
            # An underscore would make the header indistinguishable from a spoofed twin.
            raise ImproperlyConfigured(
                f"KNOXGATE[{key!r}] = {value!r}: use letters, digits and hyphens only"
            )
        return cls(value.lower(), meta_key(value))


@dataclass(frozen=True)
class Config:
    user_id: Header
    username: Header | None
    email: Header | None
    is_staff: Header | None
    is_superuser: Header | None
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    assertion: Header
    require_assertion: bool
    jwks_file: str | None
    jwks_url: str | None
    jwks_cache_seconds: float
    jwks_refetch_interval: float
    jwks_retry_interval: float
    jwks_timeout: float
    audience: str | None
    issuer: str
    algorithms: tuple[str, ...]
    leeway: float
    assertion_cache_size: int
    www_authenticate: str
    trigger_sql_dir: str | None

    @property
    def verifies_assertions(self) -> bool:
        return bool(self.jwks_file or self.jwks_url)

    # Worked out on first use and kept with the Config (a cached_property writes the instance's
    # __dict__, which a frozen dataclass allows): each request would otherwise rebuild them.

    @cached_property
    def attribute_headers(self) -> dict[str, Header]:
        """Attribute name -> header, for the attribute headers that are configured."""
        pairs = {
            "username": self.username,
            "email": self.email,
            "is_staff": self.is_staff,
            "is_superuser": self.is_superuser,
        }
        return {k: v for k, v in pairs.items() if v is not None}

    @cached_property
    def _trusted_peers(self) -> dict[str, bool]:
        return {}

    def peer_trusted(self, remote_addr: Any) -> bool:
        """Whether ``remote_addr`` (``REMOTE_ADDR``) lies in ``trusted_proxies``. Remembered per
        address: behind a proxy every request comes from one of a few addresses, and parsing
        one costs more than the rest of the identity check."""
        if not isinstance(remote_addr, str):
            return False
        known = self._trusted_peers.get(remote_addr)
        if known is None:
            known = _address_in(remote_addr, self.trusted_proxies)
            if len(self._trusted_peers) >= _TRUSTED_PEERS_REMEMBERED:
                # Many distinct peers means no proxy in front; start over rather than grow.
                self._trusted_peers.clear()
            self._trusted_peers[remote_addr] = known
        return known


#: How many peer addresses ``Config.peer_trusted`` remembers.
_TRUSTED_PEERS_REMEMBERED = 1024


def _address_in(remote_addr: str, networks: tuple[Any, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


#: Where IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) live.
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _as_ipv4_if_mapped(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped IPv6 network as the IPv4 network it maps: a peer address is compared as
    IPv4 when it is IPv4-mapped (``_address_in``), so the mapped form would never match. (A
    mapped network shorter than /96 never gets here: strict parsing refuses it, its ffff bits
    being host bits.)"""
    if network.version != 6 or not network.subnet_of(_IPV4_MAPPED):
        return network
    return ipaddress.IPv4Network(
        (network.network_address.ipv4_mapped, network.prefixlen - _IPV4_MAPPED.prefixlen)
    )


def _check_jwks_url(url: str) -> None:
    """Refuses a JWKS_URL the fetch could not use, or would not use as written."""

    def refuse(problem: str) -> ImproperlyConfigured:
        return ImproperlyConfigured(f"KNOXGATE['JWKS_URL'] = {url!r}: {problem}")

    # Before urlsplit, which drops tabs and newlines without a word.
    if any(c.isspace() for c in url):
        raise refuse("contains whitespace (percent-encode it)")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in url):
        raise refuse("contains control characters")
    if not url.startswith(("http://", "https://")):
        raise refuse("must be an http:// or https:// URL")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:  # an unclosed [IPv6 address]
        raise refuse(f"not a URL ({e})") from None
    if not (parts.path + parts.query).isascii():
        # The request line is sent as ASCII: such a URL fails at every fetch. (A non-ASCII
        # host name is fine: it is encoded for DNS, TLS and the Host header.)
        raise refuse("non-ASCII characters in the path or query (percent-encode them)")
    if "@" in parts.netloc:
        raise refuse("credentials in the URL are not supported")
    if not parts.hostname:
        raise refuse("no host")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise refuse("the port is not a number from 1 to 65535")


def _number(key: str, value: Any, minimum: float = 0, maximum: float | None = None) -> float:
    # NaN compares false with everything (a NaN leeway would let every expired assertion
    # through) and an infinite timeout cannot be given to a socket: both are refused, as is an
    # int too large for a float (isfinite raises OverflowError on it).
    try:
        finite = isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:
        finite = False
    if (isinstance(value, bool) or not finite or value < minimum
            or (maximum is not None and value > maximum)):
        allowed = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ImproperlyConfigured(
            f"KNOXGATE[{key!r}] = {value!r}: must be a finite number of seconds {allowed}"
        )
    return float(value)


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImproperlyConfigured(f"KNOXGATE[{key!r}] must be a whole number >= 0")
    return value


def parse(raw: Any) -> Config:
    """Validate a ``KNOXGATE`` dict; raises ImproperlyConfigured on anything doubtful."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ImproperlyConfigured("KNOXGATE must be a dict")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ImproperlyConfigured(f"KNOXGATE has unknown keys: {', '.join(unknown)}")
    s = {**DEFAULTS, **raw}

    user_id = Header.of("USER_ID_HEADER", s["USER_ID_HEADER"])
    if user_id is None:
        raise ImproperlyConfigured("KNOXGATE['USER_ID_HEADER'] must be set")
    assertion = Header.of("ASSERTION_HEADER", s["ASSERTION_HEADER"])
    if assertion is None:
        raise ImproperlyConfigured("KNOXGATE['ASSERTION_HEADER'] must be set")

    proxies = s["TRUSTED_PROXIES"]
    if isinstance(proxies, str) or not isinstance(proxies, (list, tuple)):
        raise ImproperlyConfigured("KNOXGATE['TRUSTED_PROXIES'] must be a list of CIDRs")
    networks = []
    for cidr in proxies:
        try:
            networks.append(_as_ipv4_if_mapped(ipaddress.ip_network(cidr, strict=True)))
        except (TypeError, ValueError) as e:
            raise ImproperlyConfigured(f"KNOXGATE['TRUSTED_PROXIES']: {cidr!r}: {e}") from None

    raw_algorithms = s["ASSERTION_ALGORITHMS"]
    algorithms = tuple(raw_algorithms) if isinstance(raw_algorithms, (list, tuple)) else ()
    if not algorithms or any(a not in SUPPORTED_ALGORITHMS for a in algorithms):
        raise ImproperlyConfigured(
            f"KNOXGATE['ASSERTION_ALGORITHMS'] must be a non-empty subset of {SUPPORTED_ALGORITHMS}"
        )

    for key in ("JWKS_FILE", "JWKS_URL", "ASSERTION_AUDIENCE", "TRIGGER_SQL_DIR"):
        if s[key] is not None and (not isinstance(s[key], str) or not s[key]):
            raise ImproperlyConfigured(f"KNOXGATE[{key!r}] must be a non-empty string or None")
    # Whether TRIGGER_SQL_DIR holds its files is not checked here: only `migrate` reads them,
    # and web processes may run where they are not (a migrate job apart). `checks` warns.
    if s["JWKS_FILE"] and s["JWKS_URL"]:
        raise ImproperlyConfigured("KNOXGATE: set JWKS_FILE or JWKS_URL, not both")
    if s["JWKS_URL"]:
        _check_jwks_url(s["JWKS_URL"])
    if not isinstance(s["ASSERTION_ISSUER"], str) or not s["ASSERTION_ISSUER"]:
        raise ImproperlyConfigured("KNOXGATE['ASSERTION_ISSUER'] must be a non-empty string")
    www_authenticate = s["WWW_AUTHENTICATE"]
    if (not isinstance(www_authenticate, str) or not www_authenticate.strip()
            or not all(" " <= c <= "~" for c in www_authenticate)):
        # None or "" would make DRF answer 403 instead of 401 to unauthenticated requests; a
        # control character cannot go into a header.
        raise ImproperlyConfigured(
            "KNOXGATE['WWW_AUTHENTICATE'] must be a non-empty string of printable ASCII (the "
            "challenge's scheme, e.g. \"Token\")"
        )
    if not isinstance(s["REQUIRE_ASSERTION"], bool):
        raise ImproperlyConfigured("KNOXGATE['REQUIRE_ASSERTION'] must be True or False")
    verifies = bool(s["JWKS_FILE"] or s["JWKS_URL"])
    if s["REQUIRE_ASSERTION"] and not verifies:
        raise ImproperlyConfigured("KNOXGATE['REQUIRE_ASSERTION'] needs JWKS_FILE or JWKS_URL")
    if verifies and not s["ASSERTION_AUDIENCE"]:
        raise ImproperlyConfigured(
            "KNOXGATE['ASSERTION_AUDIENCE'] must be set when assertions are verified"
        )

    attribute_headers = {
        key: Header.of(key, s[key])
        for key in ("USERNAME_HEADER", "EMAIL_HEADER", "IS_STAFF_HEADER", "IS_SUPERUSER_HEADER")
    }
    # Two settings naming one header would read one value as two things (a user id of 1 as
    # is_staff=True, say).
    named: dict[str, str] = {}
    for key, header in [("USER_ID_HEADER", user_id), ("ASSERTION_HEADER", assertion),
                        *attribute_headers.items()]:
        if header is None:
            continue
        if header.meta in named:
            raise ImproperlyConfigured(
                f"KNOXGATE[{key!r}] and KNOXGATE[{named[header.meta]!r}] name the same header"
            )
        named[header.meta] = key

    return Config(
        user_id=user_id,
        username=attribute_headers["USERNAME_HEADER"],
        email=attribute_headers["EMAIL_HEADER"],
        is_staff=attribute_headers["IS_STAFF_HEADER"],
        is_superuser=attribute_headers["IS_SUPERUSER_HEADER"],
        trusted_proxies=tuple(networks),
        assertion=assertion,
        require_assertion=s["REQUIRE_ASSERTION"],
        jwks_file=s["JWKS_FILE"],
        jwks_url=s["JWKS_URL"],
        jwks_cache_seconds=_number("JWKS_CACHE_SECONDS", s["JWKS_CACHE_SECONDS"]),
        jwks_refetch_interval=_number("JWKS_REFETCH_INTERVAL", s["JWKS_REFETCH_INTERVAL"],
                                      minimum=MIN_JWKS_INTERVAL),
        jwks_retry_interval=_number("JWKS_RETRY_INTERVAL", s["JWKS_RETRY_INTERVAL"],
                                    minimum=MIN_JWKS_INTERVAL),
        jwks_timeout=_number("JWKS_TIMEOUT", s["JWKS_TIMEOUT"], minimum=0.001,
                             maximum=MAX_JWKS_TIMEOUT),
        audience=s["ASSERTION_AUDIENCE"],
        issuer=s["ASSERTION_ISSUER"],
        algorithms=algorithms,
        leeway=_number("ASSERTION_LEEWAY", s["ASSERTION_LEEWAY"], maximum=MAX_LEEWAY),
        assertion_cache_size=_count("ASSERTION_CACHE_SIZE", s["ASSERTION_CACHE_SIZE"]),
        www_authenticate=www_authenticate,
        trigger_sql_dir=s["TRIGGER_SQL_DIR"],
    )


@lru_cache(maxsize=1)
def get_config() -> Config:
    return parse(getattr(settings, "KNOXGATE", None))


def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "KNOXGATE":
        # The assertion module drops its key cache on the same signal.
        get_config.cache_clear()


setting_changed.connect(_reset)
