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

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.contrib.auth.models import AnonymousUser

from knoxgate_django.conf import get_config
from knoxgate_django.identity import Identity, Refused, resolve
from knoxgate_django.user import user_for


def _apply(request: Any) -> None:
    result = resolve(request)
    if isinstance(result, Identity):
        request.user = user_for(request, result.user_id, result.attributes)
        request.knoxgate = result
    elif isinstance(result, Refused):
        request.user = AnonymousUser()
    elif not hasattr(request, "user"):
        request.user = AnonymousUser()


class KnoxgateMiddleware:
    """Sync and async capable: under ASGI no thread is needed, except to fetch a JWKS URL."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        _apply(request)
        return self.get_response(request)

    async def __acall__(self, request: Any) -> Any:
        if get_config().jwks_url:
            # Verifying may fetch the JWKS over the network: keep that off the event loop.
            await sync_to_async(_apply, thread_sensitive=False)(request)
        else:
            _apply(request)
        return await self.get_response(request)
