from django.apps import AppConfig


class InteropAppConfig(AppConfig):
    """Views and the `interop` management command used by the test driver; no models."""

    name = "interop_app"
    default_auto_field = "django.db.models.BigAutoField"
