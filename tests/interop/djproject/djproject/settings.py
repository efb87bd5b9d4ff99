"""Settings of the interop test project, taken entirely from environment variables.

A test points each Django process at its own database and Redis DB, and chooses the knox
settings that knoxgate is started with, through:

  DJ_DB_NAME             Postgres database (required)
  DJ_DB_HOST/PORT/USER   default 127.0.0.1 / 5432 / postgres (trust auth, no password)
  DJ_REDIS_URL           e.g. redis://127.0.0.1:6379/11 (used when DJ_KNOX_REDIS=1)
  DJ_KNOX_REDIS          1 = django-rest-knox-redis authentication + django-redis cache, 0 = plain knox
  DJ_REDIS_KEY_PREFIX    REST_KNOX_REDIS REDIS_KEY_PREFIX (default 'knox')
  DJ_MAX_TOKEN_CACHE_TTL REST_KNOX_REDIS MAX_TOKEN_CACHE_TTL in seconds (default 300)
  DJ_TOKEN_PREFIX        REST_KNOX TOKEN_PREFIX (default '')
  DJ_HASH                sha512 | sha256 | sha3_512 -> REST_KNOX SECURE_HASH_ALGORITHM 'hashlib.<name>'
  DJ_TOKEN_TTL_SECONDS   empty = knox default (10 h), 'none' = never expires, else seconds
  DJ_PASSWORD_HASHERS    comma list of preferred hashers (pbkdf2_sha256, pbkdf2_sha1, argon2,
                         bcrypt_sha256, bcrypt, scrypt, md5); they go first in PASSWORD_HASHERS,
                         followed by Django's defaults
  DJ_TIME_ZONE           TIME_ZONE (default 'UTC')
  DJ_EXPIRY_DATETIME_FORMAT  REST_KNOX EXPIRY_DATETIME_FORMAT (default 'iso-8601'; 'none' = None)
"""

import os
from datetime import timedelta


def env(name, default=None):
    value = os.environ.get(name)
    return default if value is None else value


def env_flag(name, default="0"):
    value = env(name, default).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name} must be 0 or 1, not {value!r}")


def token_ttl(value):
    value = value.strip()
    if value == "":
        return timedelta(hours=10)  # knox's own default, stated to make the choice visible
    if value.lower() == "none":
        return None
    return timedelta(seconds=float(value))


HASHER_CLASSES = {
    "pbkdf2_sha256": "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    "pbkdf2_sha1": "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
    "argon2": "django.contrib.auth.hashers.Argon2PasswordHasher",
    "bcrypt_sha256": "django.contrib.auth.hashers.BCryptSHA256PasswordHasher",
    "bcrypt": "django.contrib.auth.hashers.BCryptPasswordHasher",
    "scrypt": "django.contrib.auth.hashers.ScryptPasswordHasher",
    "md5": "django.contrib.auth.hashers.MD5PasswordHasher",
}
DJANGO_DEFAULT_HASHERS = [
    HASHER_CLASSES[name]
    for name in ("pbkdf2_sha256", "pbkdf2_sha1", "argon2", "bcrypt_sha256", "scrypt")
]


def password_hashers(value):
    preferred = []
    for name in filter(None, (part.strip() for part in value.split(","))):
        if name not in HASHER_CLASSES:
            raise ValueError(f"DJ_PASSWORD_HASHERS: unknown hasher {name!r}")
        preferred.append(HASHER_CLASSES[name])
    return preferred + [h for h in DJANGO_DEFAULT_HASHERS if h not in preferred]


HASH_ALGORITHMS = {"sha512", "sha256", "sha3_512"}

KNOX_REDIS = env_flag("DJ_KNOX_REDIS")
HASH = env("DJ_HASH", "sha512")
if HASH not in HASH_ALGORITHMS:
    raise ValueError(f"DJ_HASH must be one of {sorted(HASH_ALGORITHMS)}, not {HASH!r}")

SECRET_KEY = "interop-tests-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    *(["knox_redis"] if KNOX_REDIS else []),
    "interop_app",
]

# startproject's middleware, as in the recorded knox behaviour (FACTS.md section 5)
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "djproject.urls"
WSGI_APPLICATION = "djproject.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["DJ_DB_NAME"],
        "HOST": env("DJ_DB_HOST", "127.0.0.1"),
        "PORT": env("DJ_DB_PORT", "5432"),
        "USER": env("DJ_DB_USER", "postgres"),
        "PASSWORD": env("DJ_DB_PASSWORD", ""),
        # One connection per request: nothing stays connected when a test drops the database.
        "CONN_MAX_AGE": 0,
    }
}

if KNOX_REDIS:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": env("DJ_REDIS_URL", "redis://127.0.0.1:6379/11"),
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

PASSWORD_HASHERS = password_hashers(env("DJ_PASSWORD_HASHERS", ""))

AUTH_PASSWORD_VALIDATORS = []

LANGUAGE_CODE = "en-us"
USE_I18N = True
USE_TZ = True
TIME_ZONE = env("DJ_TIME_ZONE", "UTC")

STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if KNOX_REDIS:
    TOKEN_AUTHENTICATION = "interop_app.auth.ObservedRedisTokenAuthentication"
else:
    TOKEN_AUTHENTICATION = "knox.auth.TokenAuthentication"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [TOKEN_AUTHENTICATION],
}

REST_KNOX = {
    "SECURE_HASH_ALGORITHM": f"hashlib.{HASH}",
    "TOKEN_PREFIX": env("DJ_TOKEN_PREFIX", ""),
    "TOKEN_TTL": token_ttl(env("DJ_TOKEN_TTL_SECONDS", "")),
    "AUTO_REFRESH": False,
    "EXPIRY_DATETIME_FORMAT": (
        None if env("DJ_EXPIRY_DATETIME_FORMAT", "iso-8601") == "none"
        else env("DJ_EXPIRY_DATETIME_FORMAT", "iso-8601")
    ),
}

REST_KNOX_REDIS = {
    "CACHE_ALIAS": "default",
    "REDIS_KEY_PREFIX": env("DJ_REDIS_KEY_PREFIX", "knox"),
    "CACHE_ENABLED": True,
    "MAX_TOKEN_CACHE_TTL": int(env("DJ_MAX_TOKEN_CACHE_TTL", "300")),
}

# Errors go to stderr, which the test driver keeps in a log file and shows on failure.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django": {"handlers": ["stderr"], "level": "WARNING"},
        "knox_redis": {"handlers": ["stderr"], "level": "WARNING"},
    },
}
