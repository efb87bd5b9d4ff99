"""``KnoxgateAuthentication``: the DRF authentication class.

    REST_FRAMEWORK = {
        "DEFAULT_AUTHENTICATION_CLASSES": ["knoxgate_django.authentication.KnoxgateAuthentication"],
    }

``authenticate`` returns ``(user, identity)``: ``request.user`` is the user model instance built
without a query, ``request.auth`` the ``knoxgate_django.identity.Identity`` (user id, the
attributes taken from headers, the verified assertion's claims or None). A request with no
identity headers is left to the next authentication class (or is anonymous); identity headers
that are refused end the request with 401, never falling back to another identity.
"""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions

from knoxgate_django.conf import get_config
from knoxgate_django.identity import Identity, Refused, Unavailable, resolve
from knoxgate_django.user import user_for


class IdentityUnavailable(exceptions.APIException):
    """The identity cannot be checked now: an outage, not a refusal (503, never 401)."""

    status_code = 503
    default_detail = "The identity from the authentication proxy cannot be checked now."
    default_code = "identity_unavailable"


class KnoxgateAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Any) -> tuple[Any, Identity] | None:
        # DRF's Request proxies META; the identity is cached on the underlying HttpRequest.
        result = resolve(request._request)
        if isinstance(result, Identity):
            return user_for(request._request, result.user_id, result.attributes), result
        if isinstance(result, Refused):
            raise exceptions.AuthenticationFailed("Identity from the authentication proxy refused.")
        if isinstance(result, Unavailable):
            raise IdentityUnavailable()
        return None

    def authenticate_header(self, request: Any) -> str:
        # Makes DRF answer 401 (not 403) to unauthenticated requests, as knox does.
        return get_config().www_authenticate
