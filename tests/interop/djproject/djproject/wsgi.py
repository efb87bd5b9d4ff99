"""WSGI entry point, served by gunicorn in the interop suite."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproject.settings")

application = get_wsgi_application()
