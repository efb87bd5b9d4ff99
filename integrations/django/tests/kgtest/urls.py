from django.urls import path

from kgtest import views

urlpatterns = [
    path("plain/whoami", views.plain_whoami),
    path("plain/async-whoami", views.plain_async_whoami),
    path("plain/notes", views.plain_notes),
    path("plain/profile", views.plain_profile),
    path("api/whoami", views.api_whoami),
    path("api/notes", views.api_notes),
    path("api/admin", views.api_admin),
    path("api/names", views.api_names),
    path("api/profile", views.api_profile),
    path("api/open", views.api_open),
]
