"""The end-to-end benchmark's one endpoint: GET /api/whoami/ -> {"user_id": <id>}.

Authentication and permission come from REST_FRAMEWORK's defaults (e2e_settings), so every
configuration runs this same view.
"""

from django.urls import path
from rest_framework.response import Response
from rest_framework.views import APIView


class WhoAmI(APIView):
    def get(self, request):
        return Response({"user_id": request.user.pk})


urlpatterns = [path("api/whoami/", WhoAmI.as_view())]
