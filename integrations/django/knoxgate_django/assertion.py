"""Verifying knoxgate's signed identity assertion (a compact JWS, EdDSA or ES256) with PyJWT.

Public keys come from a JWKS document: a file, or knoxgate's admin endpoint
``/.well-known/jwks.json``. They are cached for ``JWKS_CACHE_SECONDS``; an assertion signed
with a key id the cache does not hold triggers a refetch, so that rotation works at once.

A key id not held is judged by one rule: knoxgate publishes a key before it signs with it, so
a read of the source that began after the assertion arrived holds the key of any genuine
assertion. A kid that such a read (the reload or the refetch this request made, or another
thread's read begun after the request asked) does not hold is refused. Otherwise the source is
reread for it, but unknown kids reread it at most once per ``JWKS_REFETCH_INTERVAL`` seconds,
so forged key ids cannot hammer it; while that limit holds, the kid cannot be judged and
raises ``KeysUnavailable`` (the application answers 503: it cannot know, which is not the
same as "not authenticated"). Forged kids then get 503 instead of 401, which costs only their
sender; a rotated-in key is never refused, at worst answered 503 until the next refetch. The
periodic reload has its own timing and does not use up the refetch.

A fetch that fails is retried after ``JWKS_RETRY_INTERVAL``; while it fails, the keys already
held keep working, and an assertion whose key is not held raises ``KeysUnavailable``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.request
from collections import OrderedDict
from typing import Any, Callable

import jwt
from django.core.signals import setting_changed
from jwt import PyJWK

from knoxgate_django.conf import Config, get_config

logger = logging.getLogger("knoxgate_django")

#: knoxgate sends user ids as canonical decimal integers; anything else is refused.
USER_ID_RE = re.compile(r"(?:0|[1-9][0-9]{0,18})\Z", re.ASCII)

#: An assertion longer than this is refused before any parsing.
MAX_ASSERTION_BYTES = 8192
#: A JWKS document larger than this is refused.
MAX_JWKS_BYTES = 1 << 20

#: (kty, crv) -> the only algorithm such a key may verify.
_KEY_ALGORITHMS = {("OKP", "Ed25519"): "EdDSA", ("EC", "P-256"): "ES256"}


class AssertionRefused(Exception):
    """The assertion is absent, malformed, unverifiable or not for this audience."""


class KeysUnavailable(Exception):
    """The key source cannot be read, and the assertion's key is not among the keys held: whether
    the assertion is good cannot be known until the source answers again."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        # Keys come from the configured URL only: a redirect is a failed fetch (HTTPError).
        return None


#: Fetches the JWKS URL directly: no HTTP(S)_PROXY from the environment, no redirects.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def _parse_jwks(document: bytes) -> dict[str, tuple[PyJWK, str]]:
    """kid -> (key, its JWK as canonical JSON) for every usable signing key; keys that do not
    fit are left out and logged."""
    data = json.loads(document)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str, tuple[PyJWK, str]] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        alg = _KEY_ALGORITHMS.get((jwk.get("kty"), jwk.get("crv")))
        if not isinstance(kid, str) or not kid or alg is None:
            logger.warning("knoxgate JWKS: ignoring a key without kid or of an unsupported type")
            continue
        if jwk.get("alg", alg) != alg or jwk.get("use", "sig") != "sig" or "d" in jwk:
            logger.warning("knoxgate JWKS: ignoring key %r (alg/use mismatch or private)", kid)
            continue
        try:
            keys[kid] = PyJWK(jwk, algorithm=alg), json.dumps(jwk, sort_keys=True)
        except jwt.exceptions.PyJWTError as e:
            logger.warning("knoxgate JWKS: ignoring key %r: %s", kid, e)
    return keys


class KeySet:
    """A cached JWKS from a file or a URL. Thread-safe."""

    def __init__(
        self,
        *,
        file: str | None = None,
        url: str | None = None,
        cache_seconds: float = 300,
        refetch_interval: float = 30,
        retry_interval: float = 1,
        timeout: float = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if bool(file) == bool(url):
            raise ValueError("exactly one of file and url")
        self.file, self.url = file, url
        self.cache_seconds = cache_seconds
        self.refetch_interval = refetch_interval
        self.retry_interval = retry_interval
        self.timeout = timeout
        self.clock = clock
        self._keys: dict[str, PyJWK] = {}
        #: kid -> the key's JWK as canonical JSON: a refetch that brings the same key keeps the
        #: same PyJWK object, so a cached verdict can tell "same key" by identity.
        self._jwk_texts: dict[str, str] = {}
        #: When the source was last read successfully, and last read at all.
        self._loaded_at: float | None = None
        self._attempted_at: float | None = None
        #: When the source was last read for an unknown kid: the rate limit of those reads, apart
        #: from the periodic reload's, so that a reload does not delay a rotated-in key.
        self._refetched_at: float | None = None
        #: Whether the last read of the source failed.
        self._failing = False
        self._lock = threading.Lock()
        #: How many times the source was read (successfully or not).
        self.fetches = 0

    def _read(self) -> bytes:
        if self.file:
            with open(self.file, "rb") as f:
                return f.read(MAX_JWKS_BYTES + 1)
        # urllib's timeout bounds each socket operation, not the fetch: a source that trickles
        # its body would hold every request waiting for an unknown kid. The whole fetch gets
        # JWKS_TIMEOUT, checked between reads (a read waits up to JWKS_TIMEOUT itself, so a
        # fetch ends within twice JWKS_TIMEOUT at worst).
        deadline = time.monotonic() + self.timeout
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        with _OPENER.open(request, timeout=self.timeout) as response:
            body = bytearray()
            while len(body) <= MAX_JWKS_BYTES:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"JWKS fetch took longer than {self.timeout} s")
                chunk = response.read1(MAX_JWKS_BYTES + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            return bytes(body)

    def _refresh(self) -> None:
        """Reread the source; on failure keep the keys already held."""
        self._attempted_at = self.clock()
        self.fetches += 1
        try:
            document = self._read()
            if len(document) > MAX_JWKS_BYTES:
                raise ValueError("JWKS document too large")
            parsed = _parse_jwks(document)
        except Exception as e:  # noqa: BLE001 - any failure leaves the previous keys in place
            logger.error("knoxgate JWKS: cannot load %s: %s", self.file or self.url, e)
            self._failing = True
            return
        keys = {}
        for kid, (key, text) in parsed.items():
            same = self._jwk_texts.get(kid) == text
            keys[kid] = self._keys[kid] if same else key
        self._keys = keys
        self._jwk_texts = {kid: text for kid, (_, text) in parsed.items()}
        self._loaded_at = self._attempted_at
        self._failing = False

    def _may_reload(self, now: float) -> bool:
        """Whether a stale cache may be reloaded now (a cache_seconds shorter than
        refetch_interval does not make every request read the source)."""
        if self._attempted_at is None:
            return True
        wait = self.retry_interval if self._failing else self.refetch_interval
        return now - self._attempted_at >= wait

    def _may_refetch(self, now: float) -> bool:
        """Whether an unknown kid may have the source reread now."""
        if self._failing:
            # Whatever the last read was for: an outage ends as soon as the source answers.
            return now - self._attempted_at >= self.retry_interval
        return self._refetched_at is None or now - self._refetched_at >= self.refetch_interval

    def _read_since(self, asked_at: float) -> bool:
        """Whether the source was read successfully at or after ``asked_at``."""
        return self._loaded_at is not None and self._loaded_at >= asked_at

    def get(self, kid: str) -> PyJWK | None:
        """The key with this id, or None when the source, read successfully after this call
        began, does not hold it. Reads the source when the cache is older than cache_seconds,
        and for an unknown kid at most once per refetch_interval (retry_interval after a failed
        read). Raises KeysUnavailable for a kid not held that cannot be looked up now: the
        source cannot be read, or was read for an unknown kid less than refetch_interval ago."""
        return self._get(kid, refetch=True)

    def _get(self, kid: str, *, refetch: bool) -> PyJWK | None:
        asked_at = self.clock()
        # Every request of every thread asks for a key: a fresh key is answered without the lock
        # (a refresh replaces the dict whole, and reading an attribute is atomic), so the threads
        # of a worker do not queue behind each other.
        keys, loaded_at = self._keys, self._loaded_at
        if loaded_at is not None and asked_at - loaded_at < self.cache_seconds:
            key = keys.get(kid)
            if key is not None:
                return key
        if not self._lock.acquire(blocking=False):
            # Another thread is reading the source (for up to JWKS_TIMEOUT): a key already held,
            # stale or not, serves meanwhile; only an unknown kid waits for the read.
            key = keys.get(kid)
            if key is not None:
                return key
            self._lock.acquire()
        try:
            now = self.clock()
            stale = self._loaded_at is None or now - self._loaded_at >= self.cache_seconds
            if stale and self._may_reload(now):
                self._refresh()
            key = self._keys.get(kid)
            if key is not None or not refetch:
                return key
            # A read made since this request asked (the reload just above included) already
            # answers for this kid; reading again would only cost the source a request.
            if not self._read_since(asked_at) and self._may_refetch(now):
                self._refetched_at = now
                self._refresh()
                key = self._keys.get(kid)
                if key is not None:
                    return key
            if self._read_since(asked_at):
                # Read after the assertion arrived, so after its key, if genuine, was published.
                return None
            if self._failing:
                raise KeysUnavailable(f"key {kid!r} not held and the JWKS source cannot be read")
            # Not held when the source was last read, but that was before this assertion arrived:
            # it may be signed with a key rotated in since. Known at the next refetch.
            raise KeysUnavailable(
                f"key {kid!r} not held, and the JWKS source was read for an unknown key id less "
                f"than {self.refetch_interval} s ago"
            )
        finally:
            self._lock.release()

    def same_key(self, kid: str, key: PyJWK) -> bool:
        """Whether ``kid`` still names ``key`` (for a verdict reached with it). A kid no longer
        held ends the verdict without a refetch or KeysUnavailable: verifying the assertion
        again finds out whether the kid is gone or cannot be judged yet."""
        return self._get(kid, refetch=False) is key


_keysets: dict[tuple, KeySet] = {}
_keysets_lock = threading.Lock()


def keyset_for(config: Config) -> KeySet:
    ident = (config.jwks_file, config.jwks_url, config.jwks_cache_seconds,
             config.jwks_refetch_interval, config.jwks_retry_interval, config.jwks_timeout)
    ks = _keysets.get(ident)
    if ks is not None:
        return ks
    with _keysets_lock:
        ks = _keysets.get(ident)
        if ks is None:
            ks = _keysets[ident] = KeySet(
                file=config.jwks_file,
                url=config.jwks_url,
                cache_seconds=config.jwks_cache_seconds,
                refetch_interval=config.jwks_refetch_interval,
                retry_interval=config.jwks_retry_interval,
                timeout=config.jwks_timeout,
            )
        return ks


def reset_keysets() -> None:
    with _keysets_lock:
        _keysets.clear()
    with _verified_lock:
        _verified.clear()
    _headers.clear()


#: (kid, key, claims) of assertions already verified, by their exact text and the settings the
#: verdict depends on, oldest first. An entry serves only until the assertion's own ``exp`` (plus
#: leeway) and while its kid still names the very key that verified it, so a retired key stops
#: it as soon as the JWKS cache drops the key, and a key replaced under the same kid at once. Read without the lock (a lookup is atomic), so the threads of a
#: worker do not queue behind each other; changed under it. When full, the oldest entry goes:
#: knoxgate hands out assertions of one lifetime, so that is the one closest to its exp. (An
#: OrderedDict, not a dict: taking a dict's first item scans past every slot freed before it.)
_verified: OrderedDict[tuple, tuple[str, PyJWK, dict[str, Any]]] = OrderedDict()
_verified_lock = threading.Lock()


#: (alg, kid) by the header segment of an assertion that verified. Every assertion one key signs
#: has the same header, so this spares parsing it a second time (``jwt.decode`` parses it again
#: and checks it with the signature); only headers of verified assertions are kept, so the
#: number of entries is bounded by the keys knoxgate has used.
_headers: dict[str, tuple[Any, Any]] = {}
_HEADERS_REMEMBERED = 64


def _reset(*, setting: str, **kwargs: Any) -> None:
    # The key cache depends on the JWKS source, which KNOXGATE names.
    if setting == "KNOXGATE":
        reset_keysets()


setting_changed.connect(_reset)


def verify(token: str, config: Config | None = None) -> dict[str, Any]:
    """The verified claims of an assertion; raises AssertionRefused on any doubt, and
    KeysUnavailable when its key cannot be known because the key source cannot be read.

    Checks: size, header (alg among the allowed ones and matching the key's type, kid known),
    signature, ``exp`` and ``iat`` (with leeway), ``aud``, ``iss``, and ``sub`` being a user id.
    An assertion verified before is answered from ``_verified`` until its ``exp``.
    """
    config = config or get_config()
    # Everything the verdict depends on besides the keys (which only ever remove a verdict).
    key = (token, config.audience, config.issuer, config.algorithms, config.jwks_file,
           config.jwks_url)
    if config.assertion_cache_size and config.verifies_assertions:
        hit = _verified.get(key)
        if hit is not None:
            kid, verified_with, claims = hit
            if (time.time() <= claims["exp"] + config.leeway
                    and keyset_for(config).same_key(kid, verified_with)):
                return dict(claims)
            with _verified_lock:
                _verified.pop(key, None)
    kid, verified_with, claims = _verify_uncached(token, config)
    if config.assertion_cache_size:
        with _verified_lock:
            _verified[key] = (kid, verified_with, claims)
            while len(_verified) > config.assertion_cache_size:
                _verified.popitem(last=False)
    return dict(claims)


def _verify_uncached(token: str, config: Config) -> tuple[str, PyJWK, dict[str, Any]]:
    if not config.verifies_assertions:
        raise AssertionRefused("no JWKS configured")
    if not token or len(token) > MAX_ASSERTION_BYTES or not token.isascii():
        raise AssertionRefused("empty, oversized or non-ASCII assertion")
    header_segment = token.partition(".")[0]
    parsed = _headers.get(header_segment)
    if parsed is None:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.PyJWTError as e:
            raise AssertionRefused(f"malformed assertion: {e}") from None
        parsed = header.get("alg"), header.get("kid")
    alg, kid = parsed
    if alg not in config.algorithms:
        raise AssertionRefused(f"algorithm {alg!r} not allowed")
    if not isinstance(kid, str) or not kid:
        raise AssertionRefused("assertion has no kid")
    key = keyset_for(config).get(kid)
    if key is None:
        raise AssertionRefused(f"unknown key id {kid!r}")
    if key.algorithm_name != alg:
        raise AssertionRefused(f"key {kid!r} is not an {alg} key")
    try:
        claims = jwt.decode(
            token,
            key=key.key,
            algorithms=[alg],
            audience=config.audience,
            issuer=config.issuer,
            leeway=config.leeway,
            options={"require": ["sub", "iat", "exp", "aud", "iss"], "verify_signature": True},
        )
    except jwt.exceptions.PyJWTError as e:
        raise AssertionRefused(f"assertion rejected: {e}") from None
    # PyJWT checks iss too, but 2.10.0 took a string issuer as a sequence and accepted any
    # substring of it (CVE-2024-53861): compared here as well, exactly.
    if claims.get("iss") != config.issuer:
        raise AssertionRefused("assertion issuer is not the configured one")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USER_ID_RE.match(sub):
        raise AssertionRefused("assertion subject is not a user id")
    if header_segment not in _headers:
        if len(_headers) >= _HEADERS_REMEMBERED:
            _headers.clear()
        _headers[header_segment] = parsed
    return kid, key, claims
