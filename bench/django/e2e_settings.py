"""Settings of the end-to-end benchmark's Django site (bench/e2e.sh): one DRF view returning the
user's id, served in every configuration with the same middleware, database and gunicorn
settings; only the authentication differs.

Built on bench_settings (the interop project's settings with persistent database connections).
E2E_AUTH chooses the authentication:

  knox               knox.auth.TokenAuthentication (one token query and one user query)
  knox-redis         knox_redis.auth.TokenAuthentication (needs DJ_KNOX_REDIS=1: its app and cache)
  knoxgate           knoxgate_django.authentication.KnoxgateAuthentication with REQUIRE_ASSERTION:
                     the id comes from nginx's auth_request to knoxgate, the signed assertion is
                     verified against knoxgate's JWKS (E2E_JWKS_URL, E2E_AUDIENCE)
  knoxgate-unsigned  the same class trusting X-Auth-User-Id from the loopback proxy, no assertion
  none               no authentication at all (AllowAny): the floor; the view answers null
"""

import os

from bench_settings import *  # noqa: F401,F403
from bench_settings import INSTALLED_APPS, KNOX_REDIS

MODE = os.environ["E2E_AUTH"]
AUTH_CLASSES = {
    "knox": "knox.auth.TokenAuthentication",
    "knox-redis": "knox_redis.auth.TokenAuthentication",
    "knoxgate": "knoxgate_django.authentication.KnoxgateAuthentication",
    "knoxgate-unsigned": "knoxgate_django.authentication.KnoxgateAuthentication",
    "none": None,
}
if MODE not in AUTH_CLASSES:
    raise ValueError(f"E2E_AUTH must be one of {sorted(AUTH_CLASSES)}, not {MODE!r}")
if (MODE == "knox-redis") != KNOX_REDIS:
    raise ValueError("DJ_KNOX_REDIS=1 goes with E2E_AUTH=knox-redis, and only with it")

ROOT_URLCONF = "e2e_urls"

if MODE.startswith("knoxgate"):
    INSTALLED_APPS = [*INSTALLED_APPS, "knoxgate_django"]
    KNOXGATE = {"TRUSTED_PROXIES": ["127.0.0.1/32"]}
    if MODE == "knoxgate":
        KNOXGATE.update({
            "REQUIRE_ASSERTION": True,
            "JWKS_URL": os.environ["E2E_JWKS_URL"],
            "ASSERTION_AUDIENCE": os.environ["E2E_AUDIENCE"],
        })

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [AUTH_CLASSES[MODE]] if AUTH_CLASSES[MODE] else [],
    "DEFAULT_PERMISSION_CLASSES": [
        "rest_framework.permissions.AllowAny" if MODE == "none"
        else "rest_framework.permissions.IsAuthenticated"
    ],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
}
