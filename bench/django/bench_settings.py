"""Benchmark settings for the interop Django project (tests/interop/djproject).

Everything comes from that project's settings (same env variables: DJ_DB_NAME, DJ_KNOX_REDIS,
DJ_REDIS_URL, ...). The one change: persistent database connections. The interop project uses
CONN_MAX_AGE=0 (a new Postgres connection per request) so that tests can drop their databases;
a production deployment keeps connections open, and measuring connection setup would make the
Django anchor look worse than it is. DJ_BENCH_CONN_MAX_AGE overrides (0 = per-request connections).
"""

import os

from djproject.settings import *  # noqa: F401,F403
from djproject.settings import DATABASES

DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ.get("DJ_BENCH_CONN_MAX_AGE", "600"))
