"""Settings of the test project: real Postgres, the package's middleware and DRF class.

Environment: KGDJ_PG_HOST / KGDJ_PG_PORT / KGDJ_PG_USER (default 127.0.0.1 / 5432 / postgres)
and KGDJ_TEST_DB, the throwaway database pytest-django creates and drops.
"""

import os

SECRET_KEY = "knoxgate-django-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "kgtest.urls"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "rest_framework",
    "knox",
    "knoxgate_django",
    "kgtest",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "knoxgate_django.middleware.KnoxgateMiddleware",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("KGDJ_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("KGDJ_PG_PORT", "5432"),
        "USER": os.environ.get("KGDJ_PG_USER", "postgres"),
        "NAME": "postgres",
        "TEST": {"NAME": os.environ.get("KGDJ_TEST_DB", "test_knoxgate_django")},
    }
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["knoxgate_django.authentication.KnoxgateAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
}

KNOXGATE = {
    "USERNAME_HEADER": "X-Auth-Username",
    "EMAIL_HEADER": "X-Auth-Email",
    "IS_STAFF_HEADER": "X-Auth-Is-Staff",
    "IS_SUPERUSER_HEADER": "X-Auth-Is-Superuser",
}

# tests/test_servers.py starts gunicorn and uvicorn with these to verify assertions through
# real servers (the pytest process sets KNOXGATE per test instead).
if os.environ.get("KGTEST_JWKS_FILE"):
    KNOXGATE.update({
        "JWKS_FILE": os.environ["KGTEST_JWKS_FILE"],
        "ASSERTION_AUDIENCE": os.environ["KGTEST_AUDIENCE"],
        "REQUIRE_ASSERTION": True,
    })

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"knoxgate_django": {"handlers": ["console"], "level": "WARNING"}},
}
