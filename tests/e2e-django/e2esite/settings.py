"""The end-to-end Django site: the package's test app (kgtest) behind nginx and knoxgate, with
REQUIRE_ASSERTION on and the keys fetched from knoxgate's admin port.

Environment: E2E_DB (the database knoxgate uses too), E2E_JWKS_URL, E2E_AUDIENCE.
"""

import os

from kgtest.settings import *  # noqa: F403 - the test app's settings, overridden below

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": "5432",
        "USER": "postgres",
        "NAME": os.environ["E2E_DB"],
        # A connection per request, closed at its end: every statement Django sends is counted
        # by Postgres when the connection ends.
        "CONN_MAX_AGE": 0,
    }
}

# knoxgate writes pbkdf2_sha256 hashes; the iteration count the run uses, so Django never
# rehashes on login.
PASSWORD_HASHERS = ["e2esite.hashers.FastPBKDF2PasswordHasher"]

KNOXGATE = {
    "REQUIRE_ASSERTION": True,
    "JWKS_URL": os.environ["E2E_JWKS_URL"],
    "ASSERTION_AUDIENCE": os.environ["E2E_AUDIENCE"],
    # No leeway: the expired-assertion check must not depend on it.
    "ASSERTION_LEEWAY": 0,
}
