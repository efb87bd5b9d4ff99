"""Verifying knoxgate's signed identity assertion (a compact JWS, EdDSA or ES256) with PyJWT.

Public keys come from a JWKS document: a file, or knoxgate's admin endpoint
``/.well-known/jwks.json``. They are cached for ``JWKS_CACHE_SECONDS``; an assertion signed
with a key id the cache does not hold triggers a refetch, so that rotation works at once.

Only an assertion whose claims could be good gets as far as its key: one they condemn
(expired, for another audience, unreadable) is refused whatever its key id. A key id not held
is judged by one rule: knoxgate publishes a key before it signs with it, so
a read of the source that began after the assertion arrived holds the key of any genuine
assertion. A kid that such a read (the reload or the refetch this request made, or another
thread's read begun after the request asked) does not hold is refused. Otherwise the source is
reread for it, but unknown kids reread it at most once per ``JWKS_REFETCH_INTERVAL`` seconds,
so forged key ids cannot hammer it; while that limit holds, the kid cannot be judged and
raises ``KeysUnavailable`` (the application answers 503: it cannot know, which is not the
same as "not authenticated"). Forged kids then get 503 instead of 401, which costs only their
sender; a rotated-in key is never refused, at worst answered 503 until the next refetch. The
periodic reload has its own timing and does not use up the refetch.

A fetch that fails is retried ``JWKS_RETRY_INTERVAL`` after it ENDED, and the wait doubles with
each failure in a row, up to ``JWKS_REFETCH_INTERVAL``; until the retry is due the source is not
read in the request path. While it fails, the keys already held keep working, stale or not, and
an assertion whose key is not held raises ``KeysUnavailable``. One read runs at a time: threads
that find one running go on with the keys held, or, for a kid not held, wait for that read and
never start another. A fetch of a URL has ``JWKS_TIMEOUT`` as a whole: name lookup, connecting,
status line and headers included; so has a read of a file (a stuck network mount).
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Callable

import jwt
from django.core.signals import setting_changed
from jwt import PyJWK

from knoxgate_django.conf import MIN_JWKS_INTERVAL, Config, get_config

logger = logging.getLogger("knoxgate_django")

#: knoxgate sends user ids as canonical decimal integers; anything else is refused.
USER_ID_RE = re.compile(r"(?:0|[1-9][0-9]{0,18})\Z", re.ASCII)

#: An assertion longer than this is refused before any parsing.
MAX_ASSERTION_BYTES = 8192
#: A JWKS document larger than this is refused.
MAX_JWKS_BYTES = 1 << 20

#: (kty, crv) -> the only algorithm such a key may verify.
_KEY_ALGORITHMS = {("OKP", "Ed25519"): "EdDSA", ("EC", "P-256"): "ES256"}

#: The JWK members this package reads, each a string when present.
_STRING_MEMBERS = ("kid", "kty", "crv", "alg", "use")

#: The claims every assertion carries.
_REQUIRED_CLAIMS = ("sub", "iat", "exp", "aud", "iss")

#: What reading an assertion can raise besides PyJWTError, on input anyone can send: PyJWT
#: 2.13 lets through the TypeError and OverflowError of a time that is a list or Infinity, and
#: the RecursionError of JSON nested too deep.
_UNREADABLE = (jwt.exceptions.PyJWTError, ValueError, TypeError, OverflowError, RecursionError)


class AssertionRefused(Exception):
    """The assertion is absent, malformed, unverifiable or not for this audience."""


class KeysUnavailable(Exception):
    """The key source cannot be read, and the assertion's key is not among the keys held: whether
    the assertion is good cannot be known until the source answers again."""


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
        # A list or an object where a string belongs would otherwise fail the lookup below
        # (unhashable), and with it the whole document.
        not_strings = [m for m in _STRING_MEMBERS if m in jwk and not isinstance(jwk[m], str)]
        if not_strings:
            logger.warning("knoxgate JWKS: ignoring a key whose %s is not a string",
                           ", ".join(not_strings))
            continue
        kid = jwk.get("kid")
        alg = _KEY_ALGORITHMS.get((jwk.get("kty"), jwk.get("crv")))
        if not kid or alg is None:
            logger.warning("knoxgate JWKS: ignoring a key without kid or of an unsupported type")
            continue
        if jwk.get("alg", alg) != alg or jwk.get("use", "sig") != "sig" or "d" in jwk:
            logger.warning("knoxgate JWKS: ignoring key %r (alg/use mismatch or private)", kid)
            continue
        try:
            keys[kid] = PyJWK(jwk, algorithm=alg), json.dumps(jwk, sort_keys=True)
        except (jwt.exceptions.PyJWTError, ValueError, TypeError, KeyError) as e:
            # PyJWT 2.13 raises TypeError for a coordinate that is not a string: one bad key
            # is left out, never the document.
            logger.warning("knoxgate JWKS: ignoring key %r: %s", kid, e)
    return keys


class _DeadlineReader(io.RawIOBase):
    """The reading side of a connection: every read waits at most until the fetch's deadline,
    so the status line and headers are bounded as much as the body."""

    def __init__(self, sock: Any, deadline: float, timeout: float) -> None:
        self._sock, self._deadline, self._timeout = sock, deadline, timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(_remaining(self._deadline, self._timeout))
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            raise TimeoutError(f"JWKS fetch took longer than {self._timeout} s") from None


class _DeadlineSocket:
    """What http.client reads and writes through: the connection's socket, with every read
    (``makefile``, which the response reads from) and write limited to the fetch's deadline.
    Closing it leaves the socket open for the response still reading; ``_fetch`` closes it."""

    def __init__(self, sock: Any, deadline: float, timeout: float) -> None:
        self.sock, self._deadline, self._timeout = sock, deadline, timeout

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"unsupported mode {mode!r}")
        return io.BufferedReader(_DeadlineReader(self.sock, self._deadline, self._timeout))

    def sendall(self, data: Any) -> None:
        self.sock.settimeout(_remaining(self._deadline, self._timeout))
        self.sock.sendall(data)

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def _remaining(deadline: float, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"JWKS fetch took longer than {timeout} s")
    return left


def _resolve(host: str, port: int, deadline: float, timeout: float) -> list[tuple]:
    """``getaddrinfo`` within the fetch's deadline. It takes no timeout of its own: a resolver
    that does not answer holds it for the resolver's own retries (10 s and more with glibc's
    defaults). It runs on a thread of its own, which such a resolver keeps until it gives up;
    fetches are one at a time and spaced by their retry waits, so few such threads can exist."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def ask() -> None:
        try:
            outcome["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as e:  # UnicodeError too (a label over 63 characters): the caller's
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=ask, name="knoxgate-jwks-resolve", daemon=True).start()
    if not done.wait(_remaining(deadline, timeout)):
        raise TimeoutError(f"JWKS host {host!r} not resolved within {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["addresses"]


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, *, deadline: float, timeout: float) -> None:
        super().__init__(host, port, timeout=_remaining(deadline, timeout))
        self.deadline, self.total_timeout, self.raw_sock = deadline, timeout, None
        # What connect() opens the socket with (socket.create_connection by default, whose
        # name lookup has no timeout).
        self._create_connection = self._open_within_deadline

    def _open_within_deadline(self, address: tuple[str, int], *_: Any) -> socket.socket:
        """A TCP connection to the first of the host's addresses that accepts one, name lookup
        and every attempt within the fetch's deadline."""
        host, port = address
        failures: list[OSError] = []
        for family, kind, proto, _name, sockaddr in _resolve(
                host, port, self.deadline, self.total_timeout):
            left = _remaining(self.deadline, self.total_timeout)
            sock = None
            try:
                # Inside the try: an address family the kernel lacks (IPv6 disabled) is one
                # address that failed, as in socket.create_connection.
                sock = socket.socket(family, kind, proto)
                sock.settimeout(left)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                if sock is not None:
                    sock.close()
                failures.append(e)
        if not failures:
            raise OSError(f"no address for JWKS host {host!r}")
        raise failures[-1]

    def connect(self) -> None:
        super().connect()
        self.raw_sock = self.sock
        self.sock = _DeadlineSocket(self.sock, self.deadline, self.total_timeout)


class _HTTPSConnection(_HTTPConnection):
    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.raw_sock = self.sock
        # The TLS handshake gets what is left of the deadline (CPython bounds a whole handshake
        # by the socket's timeout).
        self.sock.settimeout(_remaining(self.deadline, self.total_timeout))
        self.raw_sock = _tls_context().wrap_socket(self.sock, server_hostname=self.host)
        self.sock = _DeadlineSocket(self.raw_sock, self.deadline, self.total_timeout)


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    # The system's CA certificates, hostname checked: what urllib uses by default.
    return ssl.create_default_context()


def _fetch(url: str, timeout: float) -> bytes:
    """GET ``url`` directly (no HTTP(S)_PROXY from the environment, no redirect: anything but
    200 is a failed fetch), all of it within ``timeout`` seconds: the name lookup, connecting, the
    status line and headers, the body. Each socket operation waits only for what is left of the
    deadline, so a source that trickles bytes is given up at the deadline, not per read."""
    deadline = time.monotonic() + timeout
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the JWKS URL are not supported")
    if not parts.hostname:
        raise ValueError("no host in the JWKS URL")
    https = parts.scheme == "https"
    connection_class = _HTTPSConnection if https else _HTTPConnection
    port = parts.port or (http.client.HTTPS_PORT if https else http.client.HTTP_PORT)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = connection_class(parts.hostname, port, deadline=deadline, timeout=timeout)
    try:
        conn.request("GET", target, headers={"Accept": "application/json", "Connection": "close"})
        with conn.getresponse() as response:
            if response.status != 200:
                raise OSError(f"HTTP {response.status} {response.reason}")
            body = bytearray()
            while len(body) <= MAX_JWKS_BYTES:
                chunk = response.read1(MAX_JWKS_BYTES + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            return bytes(body)
    finally:
        conn.close()
        if conn.raw_sock is not None:
            conn.raw_sock.close()


#: After this many failed reads in a row the wait between retries stops doubling (it has
#: reached its cap long before: 2 ** 16 retry intervals).
_MAX_DOUBLINGS = 16


class KeySet:
    """A cached JWKS from a file or a URL. Thread-safe.

    At most one read of the source runs at a time, and the lock is not held while it runs:
    threads that find a read running use the keys held, stale or not; a thread whose kid is not
    held waits for that read to end and judges by what it brought, never starting another."""

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
        #: When the read that brought the keys held began, and when the last read began.
        self._loaded_at: float | None = None
        self._attempted_at: float | None = None
        #: When the source was last read for an unknown kid: the rate limit of those reads, apart
        #: from the periodic reload's, so that a reload does not delay a rotated-in key.
        self._refetched_at: float | None = None
        #: Failed reads in a row (0: the last read succeeded, or none was made), and when the
        #: source may be read again after them: measured from the END of the last failed read,
        #: so a read that hangs for JWKS_TIMEOUT does not leave the next one due at once.
        self._failures = 0
        self._retry_at: float | None = None
        #: Guards everything above; never held while the source is read.
        self._lock = threading.Condition(threading.Lock())
        self._reading = False
        #: The thread of the last read of JWKS_FILE (see _read_file).
        self._file_reader: threading.Thread | None = None
        #: Reads ended so far (successfully or not): what a thread waiting for a read watches.
        self._reads_ended = 0
        #: How many times the source was read (successfully or not).
        self.fetches = 0

    @property
    def _failing(self) -> bool:
        """Whether the last read of the source failed."""
        return self._failures > 0

    def retry_wait(self) -> float:
        """How long after a failed read the source is next read: JWKS_RETRY_INTERVAL after the
        first failure, doubling with each failure in a row up to JWKS_REFETCH_INTERVAL (so that,
        once the source answers again, an unknown kid waits no longer than it would anyway)."""
        if not self._failures:
            return 0.0
        doubled = self.retry_interval * 2 ** min(self._failures - 1, _MAX_DOUBLINGS)
        return min(doubled, max(self.retry_interval, self.refetch_interval))

    def _read(self) -> bytes:
        if self.file:
            return self._read_file()
        return _fetch(self.url, self.timeout)

    def _read_file(self) -> bytes:
        """JWKS_FILE's content, within JWKS_TIMEOUT. Reading a file can hang (a network mount
        whose server is gone, a FIFO nobody writes) and takes no timeout of its own: the read
        runs on a thread of its own, which such a file keeps until it returns. Until that thread
        returns, later reads fail at once instead of leaving one more thread on the same file
        per retry."""
        stuck = self._file_reader
        if stuck is not None and stuck.is_alive():
            raise TimeoutError(f"an earlier read of {self.file} has not returned yet")
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def read() -> None:
            try:
                with open(self.file, "rb") as f:
                    outcome["document"] = f.read(MAX_JWKS_BYTES + 1)
            except BaseException as e:  # handed to the caller, which logs it
                outcome["error"] = e
            finally:
                done.set()

        self._file_reader = threading.Thread(target=read, name="knoxgate-jwks-read", daemon=True)
        self._file_reader.start()
        if not done.wait(self.timeout):
            raise TimeoutError(f"{self.file} not read within {self.timeout} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["document"]

    def _refresh(self) -> None:
        """Reread the source, with the lock held on entry and on return but released while
        reading; on failure keep the keys already held."""
        started = self._attempted_at = self.clock()
        self._reading = True
        self.fetches += 1
        parsed = error = None
        self._lock.release()
        try:
            try:
                document = self._read()
                if len(document) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS document too large")
                parsed = _parse_jwks(document)
            except Exception as e:  # noqa: BLE001 - any failure leaves the previous keys in place
                error = e
        finally:
            self._lock.acquire()
            self._reading = False
            self._reads_ended += 1
            self._lock.notify_all()
        if parsed is None:
            self._failures += 1
            self._retry_at = self.clock() + self.retry_wait()
            logger.error("knoxgate JWKS: cannot load %s (next try in %.0f s): %s",
                         self.file or self.url, self.retry_wait(), error)
            return
        keys = {}
        for kid, (key, text) in parsed.items():
            same = self._jwk_texts.get(kid) == text
            keys[kid] = self._keys[kid] if same else key
        # The keys before the time: readers without the lock read the time first.
        self._keys = keys
        self._jwk_texts = {kid: text for kid, (_, text) in parsed.items()}
        self._loaded_at = started
        self._failures = 0
        self._retry_at = None

    def _retry_due(self, now: float) -> bool:
        return self._retry_at is None or now >= self._retry_at

    def _may_reload(self, now: float) -> bool:
        """Whether a stale cache may be reloaded now: after a failed read, once the retry is
        due; otherwise once MIN_JWKS_INTERVAL has passed since the last read began, so that a
        cache_seconds below it (0 included) does not make every request read the source."""
        if self._failing:
            return self._retry_due(now)
        return self._attempted_at is None or now - self._attempted_at >= MIN_JWKS_INTERVAL

    def _may_refetch(self, now: float) -> bool:
        """Whether an unknown kid may have the source reread now."""
        if self._failing:
            # Whatever the last read was for: an outage ends as soon as the retry is due.
            return self._retry_due(now)
        return self._refetched_at is None or now - self._refetched_at >= self.refetch_interval

    def _read_since(self, asked_at: float) -> bool:
        """Whether the source was read successfully at or after ``asked_at``."""
        return self._loaded_at is not None and self._loaded_at >= asked_at

    def get(self, kid: str, *, asked_at: float | None = None) -> PyJWK | None:
        """The key with this id, or None when the source, read successfully after this call
        began (or after ``asked_at``, on this key set's clock, when given), does not hold it.
        Reads the source when the cache is older than cache_seconds (at most once per
        MIN_JWKS_INTERVAL), and for an unknown kid at most once per refetch_interval (after a
        failed read, once the retry is due: see retry_wait). Raises KeysUnavailable for a kid
        not held that cannot be looked up now: the source cannot be read, or was read for an
        unknown kid less than refetch_interval ago, or another thread's read, begun before this
        call, did not hold it."""
        return self._get(kid, refetch=True, asked_at=asked_at)

    def _get(self, kid: str, *, refetch: bool, asked_at: float | None = None) -> PyJWK | None:
        if asked_at is None:
            asked_at = self.clock()
        # Every request of every thread asks for a key: a fresh key is answered without the lock
        # (a refresh replaces the dict whole, and reading an attribute is atomic), so the threads
        # of a worker do not queue behind each other. The time first: a refresh stores the keys
        # before it, so keys read after a time are never older than it.
        loaded_at, keys = self._loaded_at, self._keys
        if loaded_at is not None and asked_at - loaded_at < self.cache_seconds:
            key = keys.get(kid)
            if key is not None:
                return key
        with self._lock:
            if self._reading:
                # Another thread is reading the source (for up to JWKS_TIMEOUT): a key already
                # held, stale or not, serves meanwhile; an unknown kid waits for that read to
                # end, and is judged by what it brought: no second read queues behind it.
                key = self._keys.get(kid)
                if key is not None:
                    return key
                ended = self._reads_ended
                while self._reads_ended == ended:
                    self._lock.wait()
                return self._judge(kid, asked_at, refetch)
            now = self.clock()
            stale = self._loaded_at is None or now - self._loaded_at >= self.cache_seconds
            if stale and self._may_reload(now):
                # A stale set whose last read failed is served as it is until the retry is due.
                self._refresh()
                now = self.clock()
            key = self._keys.get(kid)
            if key is not None or not refetch:
                return key
            # A read made since this request asked (the reload just above included) already
            # answers for this kid; reading again would only cost the source a request.
            if not self._read_since(asked_at) and self._may_refetch(now):
                self._refetched_at = now
                self._refresh()
            return self._judge(kid, asked_at, refetch)

    def _judge(self, kid: str, asked_at: float, refetch: bool) -> PyJWK | None:
        """The verdict on ``kid`` from the keys held now, without reading the source."""
        key = self._keys.get(kid)
        if key is not None or not refetch:
            return key
        if self._read_since(asked_at):
            # Read after the assertion arrived, so after its key, if genuine, was published.
            return None
        if self._failing:
            raise KeysUnavailable(f"key {kid!r} not held and the JWKS source cannot be read")
        # Not held when the source was last read, but that was before this assertion arrived:
        # it may be signed with a key rotated in since. Known at the next refetch.
        raise KeysUnavailable(
            f"key {kid!r} not held, and the JWKS source was last read before this assertion "
            f"arrived (an unknown key id rereads it at most every {self.refetch_interval} s)"
        )

    def fresh(self, kid: str) -> PyJWK | None:
        """The key with this id if the keys held are fresh (read less than cache_seconds ago)
        and hold it, else None. Never reads the source nor waits: ``get`` does that."""
        loaded_at, keys = self._loaded_at, self._keys  # in this order: see _get
        if loaded_at is not None and self.clock() - loaded_at < self.cache_seconds:
            return keys.get(kid)
        return None

    def same_key(self, kid: str, key: PyJWK, *, asked_at: float | None = None) -> bool:
        """Whether ``kid`` still names ``key`` (for a verdict reached with it). A kid no longer
        held ends the verdict without a refetch or KeysUnavailable: verifying the assertion
        again, with the same ``asked_at``, finds out whether the kid is gone or cannot be
        judged yet."""
        return self._get(kid, refetch=False, asked_at=asked_at) is key


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
#: verdict depends on, oldest first. An entry serves only until the assertion's own ``exp`` (its
#: whole second, plus leeway, as PyJWT judges it) and while its kid still names the very key
#: that verified it, so a retired key stops it as soon as the JWKS cache drops the key, and a
#: key replaced under the same kid at once. Read without the lock (a lookup is atomic), so the
#: threads of a worker do not queue behind each other; changed under it. When full, the oldest
#: entry goes: knoxgate hands out assertions of one lifetime, so that is the one closest to its
#: exp. (An OrderedDict, not a dict: taking a dict's first item scans past every slot freed
#: before it.)
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
    asked_at = None
    if config.assertion_cache_size and config.verifies_assertions:
        hit = _verified.get(key)
        if hit is not None:
            kid, verified_with, claims = hit
            keyset = keyset_for(config)
            # When the verdict ends, the check below is of the same request: a reload that
            # same_key makes counts as a read made after it arrived.
            asked_at = keyset.clock()
            # As PyJWT judges exp (refused once int(exp) <= now - leeway).
            if (time.time() < int(claims["exp"]) + config.leeway
                    and keyset.same_key(kid, verified_with, asked_at=asked_at)):
                return dict(claims)
            with _verified_lock:
                _verified.pop(key, None)
    kid, verified_with, claims = _verify_uncached(token, config, asked_at)
    if config.assertion_cache_size:
        with _verified_lock:
            _verified[key] = (kid, verified_with, claims)
            while len(_verified) > config.assertion_cache_size:
                _verified.popitem(last=False)
    return dict(claims)


def _verify_uncached(token: str, config: Config,
                     asked_at: float | None = None) -> tuple[str, PyJWK, dict[str, Any]]:
    """(kid, key, claims) of an assertion checked in full. ``asked_at``: when the request
    arrived, on the key set's clock, if that was before this call (see ``KeySet.get``)."""
    if not config.verifies_assertions:
        raise AssertionRefused("no JWKS configured")
    if not token or len(token) > MAX_ASSERTION_BYTES or not token.isascii():
        raise AssertionRefused("empty, oversized or non-ASCII assertion")
    header_segment = token.partition(".")[0]
    parsed = _headers.get(header_segment)
    if parsed is None:
        try:
            header = jwt.get_unverified_header(token)
        except _UNREADABLE as e:
            raise AssertionRefused(f"malformed assertion: {e}") from None
        parsed = header.get("alg"), header.get("kid")
    alg, kid = parsed
    if alg not in config.algorithms:
        raise AssertionRefused(f"algorithm {alg!r} not allowed")
    if not isinstance(kid, str) or not kid:
        raise AssertionRefused("assertion has no kid")
    keyset = keyset_for(config)
    key = keyset.fresh(kid)
    if key is None:
        # The claims first, unverified: an assertion they condemn is refused whatever its key.
        # A kid not held may be answered KeysUnavailable (503, "cannot know yet"), which only
        # an assertion that could be good deserves. With a fresh key held, the one decode below
        # checks claims and signature together: it refuses what the claims condemn all the same.
        _decode(token, config, alg, key=None)
        key = keyset.get(kid, asked_at=asked_at)
        if key is None:
            raise AssertionRefused(f"unknown key id {kid!r}")
    if key.algorithm_name != alg:
        raise AssertionRefused(f"key {kid!r} is not an {alg} key")
    claims = _decode(token, config, alg, key=key)
    if header_segment not in _headers:
        if len(_headers) >= _HEADERS_REMEMBERED:
            _headers.clear()
        _headers[header_segment] = parsed
    return kid, key, claims


def _decode(token: str, config: Config, alg: str, *, key: PyJWK | None) -> dict[str, Any]:
    """The claims of ``token`` if they are acceptable: all present, ``exp`` and ``iat`` numbers
    within the leeway, ``aud`` and ``iss`` the configured ones, ``sub`` a user id. With ``key``,
    the signature is verified too; without, the payload is only read."""
    try:
        claims = jwt.decode(
            token,
            key=key.key if key is not None else None,
            algorithms=[alg],
            audience=config.audience,
            issuer=config.issuer,
            leeway=config.leeway,
            # A new dict each time: PyJWT 2.13 writes defaults into the one it is given. Every
            # check named, since without the signature PyJWT skips those not named.
            options={
                "verify_signature": key is not None,
                "verify_exp": True,
                "verify_nbf": True,
                "verify_iat": True,
                "verify_aud": True,
                "verify_iss": True,
                "require": list(_REQUIRED_CLAIMS),
            },
        )
    except _UNREADABLE as e:
        raise AssertionRefused(f"assertion rejected: {e}") from None
    # PyJWT checks iss too, but 2.10.0 took a string issuer as a sequence and accepted any
    # substring of it (CVE-2024-53861): compared here as well, exactly.
    if claims.get("iss") != config.issuer:
        raise AssertionRefused("assertion issuer is not the configured one")
    # PyJWT takes any value int() takes ("1700000000", true) for a time; a verdict kept in
    # _verified is later compared with the clock as a number.
    for name in ("exp", "iat"):
        if isinstance(claims[name], bool) or not isinstance(claims[name], (int, float)):
            raise AssertionRefused(f"assertion {name} is not a number")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USER_ID_RE.match(sub):
        raise AssertionRefused("assertion subject is not a user id")
    return claims
