"""``KnoxgateMiddleware``: ``request.user`` from knoxgate's headers for plain Django views.

Put it after ``django.contrib.auth.middleware.AuthenticationMiddleware`` when that is installed
(the admin's session login keeps working on requests that carry no knoxgate identity; placed
before it, a refused identity would fall back to the session's user, so ``manage.py check``
reports that order as error ``knoxgate_django.E002``)::

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
* an assertion that cannot be checked now (its JWKS source unreachable and its key not held):
  503, the view is not called; not knowing is not "anonymous".

``request.auser()`` (what async views and, from Django 5.1, ``login_required`` on them await)
answers the same user as ``request.user`` whenever this middleware set it.
"""

from __future__ import annotations

from typing import Any, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.contrib.auth.models import AnonymousUser
from django.http import JsonResponse

from knoxgate_django.conf import get_config
from knoxgate_django.identity import Identity, Refused, Unavailable, resolve
from knoxgate_django.user import user_for


def _set_user(request: Any, user: Any) -> None:
    request.user = user

    async def auser() -> Any:
        return user

    # AuthenticationMiddleware's auser() would answer the session's user.
    request.auser = auser


def _unavailable() -> JsonResponse:
    return JsonResponse(
        {"detail": "The identity from the authentication proxy cannot be checked now."},
        status=503,
    )


def _apply(request: Any) -> JsonResponse | None:
    """Sets the request's user; returns the response instead of the view's, if any."""
    result = resolve(request)
    if isinstance(result, Identity):
        _set_user(request, user_for(request, result.user_id, result.attributes))
        request.knoxgate = result
    elif isinstance(result, Refused):
        _set_user(request, AnonymousUser())
    elif isinstance(result, Unavailable):
        _set_user(request, AnonymousUser())
        return _unavailable()
    elif not hasattr(request, "user"):
        _set_user(request, AnonymousUser())
    return None


class KnoxgateMiddleware:
    """Sync and async capable: under ASGI no thread is needed, except to verify assertions."""

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
        answer = _apply(request)
        return answer if answer is not None else self.get_response(request)

    async def __acall__(self, request: Any) -> Any:
        if get_config().verifies_assertions:
            # Verifying may read the key source (a URL, or a file on a mount that can hang) or
            # wait for another thread reading it: keep that off the event loop.
            answer = await sync_to_async(_apply, thread_sensitive=False)(request)
        else:
            answer = _apply(request)
        return answer if answer is not None else await self.get_response(request)
