"""URLs as in knox's documentation, plus one protected view."""

from django.urls import path

from interop_app import views

urlpatterns = [
    path("api/auth/login/", views.LoginView.as_view(), name="knox_login"),
    path("api/auth/logout/", views.LogoutView.as_view(), name="knox_logout"),
    path("api/auth/logoutall/", views.LogoutAllView.as_view(), name="knox_logoutall"),
    path("api/protected/", views.ProtectedView.as_view(), name="protected"),
]
