"""Reading the identity knoxgate forwarded, refusing anything doubtful.

``resolve(request)`` is shared by the middleware and the DRF class. It returns one of:

* ``ABSENT``: no identity header at all (the request did not pass through knoxgate's verify);
* ``Refused(reason)``: identity headers are present but not believable; never another user;
* ``Unavailable(reason)``: the assertion cannot be checked now (its key source cannot be read),
  so whether to believe it is unknown: the application answers 503, not 401;
* ``Identity(user_id, attributes, claims)``: a user id knoxgate vouched for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Union

from knoxgate_django import assertion
from knoxgate_django.conf import Config, Header, get_config
from knoxgate_django.user import user_model

logger = logging.getLogger("knoxgate_django")

_FLAGS = {"true": True, "false": False, "1": True, "0": False}


@dataclass(frozen=True)
class Identity:
    user_id: int
    #: model attribute -> value, from the attribute headers that were sent (and are trusted)
    attributes: dict[str, Any] = field(default_factory=dict)
    #: the verified assertion's claims, or None when no assertion was verified
    claims: dict[str, Any] | None = None


@dataclass(frozen=True)
class Refused:
    reason: str


@dataclass(frozen=True)
class Unavailable:
    reason: str


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()
Result = Union[Identity, Refused, Unavailable, _Absent]

#: Where the outcome is cached on the Django request, so the middleware and DRF agree.
_CACHE_ATTR = "_knoxgate_identity"


#: What ``_raw_headers`` answers for an ASGI scope whose headers cannot be read again.
UNREADABLE = object()


def _raw_headers(request: Any) -> list[tuple[bytes, bytes]] | None | object:
    """The header list as the ASGI server delivered it, None under WSGI, or ``UNREADABLE``
    when the scope's headers (ASGI allows any iterable) were a one-shot iterator that Django
    consumed to build META: then nothing is left to check the spellings against."""
    scope = getattr(request, "scope", None)
    if not isinstance(scope, dict) or "headers" not in scope:
        return None
    headers = scope["headers"]
    if isinstance(headers, (list, tuple)):
        return list(headers)
    try:
        if iter(headers) is headers:
            return UNREADABLE
        return list(headers)
    except TypeError:
        return UNREADABLE


def _spelling_problem(raw: list[tuple[bytes, bytes]], header: Header) -> str | None:
    """Under ASGI, every header that lands on ``header.meta`` must be spelled as configured
    (any case) and occur once. An underscore twin (X_Auth_User_Id) or a second copy is refused:
    Django would otherwise merge them into one comma-joined META value."""
    seen = 0
    for name, _ in raw:
        text = name.decode("latin-1")
        if "HTTP_" + text.upper().replace("-", "_") != header.meta:
            continue
        if text.lower() != header.name:
            return f"header {text!r} imitates {header.name!r}"
        seen += 1
    if seen > 1:
        return f"header {header.name!r} sent {seen} times"
    return None


def _decode(value: str) -> str:
    """Header values arrive as latin-1 text (PEP 3333; Django's ASGI handler does the same);
    knoxgate sends UTF-8 bytes."""
    return value.encode("latin-1").decode("utf-8")


def _targets() -> dict[str, str]:
    """Attribute (header setting or claim) -> the user model field it sets."""
    model = user_model()
    return {
        "username": model.USERNAME_FIELD,
        "email": model.get_email_field_name(),
        "is_staff": "is_staff",
        "is_superuser": "is_superuser",
    }


#: The user attributes knoxgate signs into the assertion beside ``sub`` (those it is configured
#: to send as headers), with the JSON type each must have.
_SIGNED_ATTRIBUTES = {"username": str, "email": str, "is_staff": bool, "is_superuser": bool}


def _signed_attributes(claims: dict[str, Any]) -> dict[str, Any] | Refused:
    targets = None
    attributes: dict[str, Any] = {}
    for claim, kind in _SIGNED_ATTRIBUTES.items():
        if claim not in claims:
            continue
        value = claims[claim]
        if type(value) is not kind:
            return Refused(f"assertion claim {claim!r} is not a {kind.__name__}")
        targets = targets or _targets()
        problem = _set_once(attributes, targets[claim], value)
        if problem:
            return Refused(f"assertion claims {problem}")
    return attributes


def _set_once(attributes: dict[str, Any], field_name: str, value: Any) -> str | None:
    """Sets a model field from one attribute; what is wrong if another attribute (a user model
    whose USERNAME_FIELD is its email field) set it to something else."""
    if attributes.get(field_name, value) != value:
        return f"two values for the field {field_name!r}"
    attributes[field_name] = value
    return None


def _read_attributes(request: Any, config: Config) -> dict[str, Any] | Refused:
    headers = config.attribute_headers
    if not headers:
        return {}
    targets = _targets()
    attributes: dict[str, Any] = {}
    for attr, header in headers.items():
        value = request.META.get(header.meta)
        if value is None or value == "":
            continue  # not sent: the field stays deferred and loads from the database
        if attr in ("is_staff", "is_superuser"):
            if value not in _FLAGS:
                return Refused(f"header {header.name!r} is not true/false")
            decoded: Any = _FLAGS[value]
        else:
            try:
                decoded = _decode(value)
            except UnicodeError:
                return Refused(f"header {header.name!r} is not UTF-8")
        problem = _set_once(attributes, targets[attr], decoded)
        if problem:
            return Refused(f"attribute headers give {problem}")
    return attributes


def _resolve(request: Any, config: Config) -> Result:
    meta = request.META
    raw_id = meta.get(config.user_id.meta)
    raw_assertion = meta.get(config.assertion.meta)
    if raw_id is None and raw_assertion is None:
        return ABSENT
    if not config.peer_trusted(meta.get("REMOTE_ADDR")):
        return Refused(f"identity headers from an untrusted peer {meta.get('REMOTE_ADDR')!r}")

    raw = _raw_headers(request)
    if raw is UNREADABLE:
        return Refused("the ASGI scope's headers cannot be read again to check their spelling")
    if raw is not None:
        checked = [config.user_id, config.assertion, *config.attribute_headers.values()]
        for header in checked:
            problem = _spelling_problem(raw, header)
            if problem:
                return Refused(problem)

    header_id: int | None = None
    if raw_id is not None:
        if not assertion.USER_ID_RE.match(raw_id):
            return Refused(f"header {config.user_id.name!r} is not a single user id")
        header_id = int(raw_id)

    claims = None
    if raw_assertion is not None and config.verifies_assertions:
        try:
            claims = assertion.verify(raw_assertion, config)
        except assertion.AssertionRefused as e:
            return Refused(str(e))
        except assertion.KeysUnavailable as e:
            return Unavailable(str(e))
        signed_id = int(claims["sub"])
        if header_id is not None and header_id != signed_id:
            return Refused("assertion subject differs from the user id header")
        header_id = signed_id
    elif config.require_assertion:
        return Refused("no signed assertion and REQUIRE_ASSERTION is on")

    if header_id is None:
        # An assertion header without anything to verify it with is not an identity.
        return Refused(f"header {config.assertion.name!r} present but no JWKS configured")

    signed = _signed_attributes(claims) if claims is not None else {}
    if isinstance(signed, Refused):
        return signed
    if config.require_assertion:
        # Only signed data is believed: unsigned attribute headers could have been supplied by
        # whoever can reach this process, so fields not signed load from the database instead.
        return Identity(header_id, signed, claims)
    attributes = _read_attributes(request, config)
    if isinstance(attributes, Refused):
        return attributes
    if raw is None:
        # A WSGI server joins a repeated header with a comma and says nothing: in a username or
        # email no signature vouches for, a comma may be a client's copy joined to knoxgate's.
        # (Under ASGI the raw headers were checked for copies above.)
        for name, value in attributes.items():
            if isinstance(value, str) and "," in value and name not in signed:
                return Refused(f"attribute {name!r} holds a comma: a header sent twice, joined")
    for name, value in signed.items():
        if attributes.get(name, value) != value:
            return Refused(f"attribute header for {name!r} differs from the signed assertion")
    return Identity(header_id, {**attributes, **signed}, claims)


def resolve(request: Any) -> Result:
    """The identity on this Django ``HttpRequest`` (cached on it); logs every refusal."""
    cached = getattr(request, _CACHE_ATTR, None)
    if cached is not None:
        return cached
    result = _resolve(request, get_config())
    if isinstance(result, Refused):
        logger.warning("knoxgate identity refused: %s", result.reason)
    elif isinstance(result, Unavailable):
        logger.error("knoxgate identity cannot be checked: %s", result.reason)
    setattr(request, _CACHE_ATTR, result)
    return result
