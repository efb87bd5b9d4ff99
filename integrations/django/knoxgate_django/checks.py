"""A system check that validates ``KNOXGATE`` at start-up (``manage.py check``, runserver,
migrate), so a typo fails the deploy instead of the first request."""

from __future__ import annotations

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from knoxgate_django.conf import get_config


@checks.register(checks.Tags.security)
def check_settings(app_configs=None, **kwargs):
    try:
        get_config()
    except ImproperlyConfigured as e:
        return [checks.Error(str(e), id="knoxgate_django.E001")]
    return []
