"""Views that exercise request.user the ways applications do."""

from django.http import JsonResponse
from rest_framework import permissions
from rest_framework.decorators import api_view, permission_classes
from rest_framework.response import Response

from kgtest.models import Note


def _whoami(user):
    return {"authenticated": user.is_authenticated, "id": user.pk}


# --- plain Django views (KnoxgateMiddleware) ---


def plain_whoami(request):
    return JsonResponse(_whoami(request.user))


async def plain_async_whoami(request):
    """What async views (and login_required on them, Django >= 5.1) see: request.auser()."""
    return JsonResponse(_whoami(await request.auser()))


def plain_notes(request):
    """POST: create a note owned by request.user (FK assignment); both: count the user's notes."""
    if not request.user.is_authenticated:
        return JsonResponse({"error": "anonymous"}, status=401)
    if request.method == "POST":
        note = Note(text="hello")
        note.owner = request.user
        note.save()
    return JsonResponse({"count": Note.objects.filter(owner=request.user).count()})


def plain_profile(request):
    """Reads fields knoxgate never sends: the row loads, once."""
    u = request.user
    return JsonResponse(
        {"first_name": u.first_name, "last_name": u.last_name, "joined": u.date_joined.isoformat()}
    )


# --- DRF views (KnoxgateAuthentication) ---


@api_view(["GET"])
def api_whoami(request):
    return Response({**_whoami(request.user), "has_claims": request.auth.claims is not None})


@api_view(["GET", "POST"])
def api_notes(request):
    if request.method == "POST":
        Note.objects.create(owner=request.user, text="api")
    return Response({"count": Note.objects.filter(owner=request.user).count()})


@api_view(["GET"])
@permission_classes([permissions.IsAdminUser])
def api_admin(request):
    return Response({"id": request.user.pk})


@api_view(["GET"])
def api_names(request):
    u = request.user
    return Response(
        {
            "username": u.get_username(),
            "email": u.email,
            "is_staff": u.is_staff,
            "is_superuser": u.is_superuser,
        }
    )


@api_view(["GET"])
def api_profile(request):
    u = request.user
    return Response({"first_name": u.first_name, "last_name": u.last_name})


@api_view(["GET"])
@permission_classes([permissions.AllowAny])
def api_open(request):
    return Response(_whoami(request.user))
