"""``KnoxgateMiddleware``: ``request.user`` from knoxgate's headers for plain Django views.

Put it after ``django.contrib.auth.middleware.AuthenticationMiddleware`` when that is installed
(the admin's session login keeps working on requests that carry no knoxgate identity)::

    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "knoxgate_django.middleware.KnoxgateMiddleware",
        ...,
    ]

* knoxgate identity present and believable: ``request.user`` is that user (no query).
* identity headers present but refused: ``request.user`` is ``AnonymousUser``; never the
  session's user, never another user.
* no identity headers: ``request.user`` is left as AuthenticationMiddleware set it, or
  ``AnonymousUser`` without that middleware.
"""

from __future__ import annotations

from typing import Any, Callable

from django.contrib.auth.models import AnonymousUser

from knoxgate_django.identity import Identity, Refused, resolve
from knoxgate_django.user import user_for


class KnoxgateMiddleware:
    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        result = resolve(request)
        if isinstance(result, Identity):
            request.user = user_for(request, result.user_id, result.attributes)
            request.knoxgate = result
        elif isinstance(result, Refused):
            request.user = AnonymousUser()
        elif not hasattr(request, "user"):
            request.user = AnonymousUser()
        return self.get_response(request)
