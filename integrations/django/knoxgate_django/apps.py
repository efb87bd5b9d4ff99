from django.apps import AppConfig


class KnoxgateConfig(AppConfig):
    name = "knoxgate_django"
    label = "knoxgate_django"
    verbose_name = "knoxgate"

    def ready(self) -> None:
        from knoxgate_django import checks  # noqa: F401  (registers the system checks)
