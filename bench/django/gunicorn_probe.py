"""gunicorn settings for `bench/e2e.sh` with `E2E_PROBE=1`: where a knoxgate configuration's
gunicorn workers spend their CPU.

Loaded with `gunicorn -c`. In each worker it counts, with the CPU time of the thread doing the
work (`time.thread_time`, so waiting for the GIL is not counted):

* `wsgi`: the call of Django's WSGI handler, per request (the response's `close()`, where
  `request_finished` handlers run, comes after it and is not counted);
* `resolve`: knoxgate-django reading the identity (header checks, the cached-verdict lookup and
  any signature check), per request;
* `checks`: signature checks, i.e. misses of the verdict cache: an assertion the worker had not
  verified, or whose verdict expired or was evicted (refused ones included).

Every 0.5 s a worker appends its running totals, with the time and its process CPU, as one JSON
line to `$E2E_PROBE_DIR/<E2E_PROBE_NAME>.<pid>.jsonl`; `bench/e2e.py` takes the difference across
each measured run. The probe costs every request two clock reads per counted function, so a
probed run is not one whose requests/s go in the report's ratios.
"""

import json
import os
import threading
import time

_totals = {"wsgi_n": 0, "wsgi_cpu": 0.0, "resolve_n": 0, "resolve_cpu": 0.0,
           "checks_n": 0, "checks_cpu": 0.0}
_lock = threading.Lock()


def _counted(fn, name):
    def wrapper(*args, **kwargs):
        started = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.thread_time() - started
            with _lock:
                _totals[name + "_n"] += 1
                _totals[name + "_cpu"] += spent
    return wrapper


def _sampler(path):
    while True:
        time.sleep(0.5)
        with _lock:
            sample = dict(_totals)
        sample["t"] = time.time()
        sample["process_cpu"] = sum(os.times()[:2])
        with open(path, "a") as f:
            f.write(json.dumps(sample) + "\n")


def post_worker_init(worker):
    from django.core.handlers import wsgi

    wsgi.WSGIHandler.__call__ = _counted(wsgi.WSGIHandler.__call__, "wsgi")
    if os.environ["E2E_AUTH"].startswith("knoxgate"):
        from knoxgate_django import assertion, identity

        identity._resolve = _counted(identity._resolve, "resolve")
        assertion._verify_uncached = _counted(assertion._verify_uncached, "checks")
    name = f"{os.environ['E2E_PROBE_NAME']}.{os.getpid()}.jsonl"
    path = os.path.join(os.environ["E2E_PROBE_DIR"], name)
    threading.Thread(target=_sampler, args=(path,), daemon=True, name="e2e-probe").start()
