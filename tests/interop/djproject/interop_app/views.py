"""knox's views wired as its documentation shows (LoginView with BasicAuthentication).

With DJ_KNOX_REDIS=1 the django-rest-knox-redis views and authenticator are used instead,
as that package's README shows.
"""

from django.conf import settings
from django.utils.module_loading import import_string
from rest_framework.authentication import BasicAuthentication
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

if settings.KNOX_REDIS:
    from knox_redis import views as knox_views
else:
    from knox import views as knox_views

TokenAuthentication = import_string(settings.TOKEN_AUTHENTICATION)

#: response header telling which path django-rest-knox-redis took (only with DJ_KNOX_REDIS=1)
CACHE_OUTCOME_HEADER = "X-Interop-Knox-Redis"


class LoginView(knox_views.LoginView):
    authentication_classes = (BasicAuthentication,)


class LogoutView(knox_views.LogoutView):
    authentication_classes = (TokenAuthentication,)


class LogoutAllView(knox_views.LogoutAllView):
    authentication_classes = (TokenAuthentication,)


class ProtectedView(APIView):
    authentication_classes = (TokenAuthentication,)
    permission_classes = (IsAuthenticated,)

    def get(self, request):
        response = Response({"username": request.user.get_username(), "user_id": request.user.pk})
        outcome = getattr(request.successful_authenticator, "cache_outcome", None)
        if outcome is not None:
            response[CACHE_OUTCOME_HEADER] = outcome
        return response
