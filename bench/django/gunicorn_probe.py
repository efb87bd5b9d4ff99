"""gunicorn settings for `bench/e2e.sh` with `E2E_PROBE=1`: where a knoxgate configuration's
gunicorn workers spend their CPU.

Loaded with `gunicorn -c`. In each worker it counts, with the CPU time of the thread doing the
work (`time.thread_time`, so waiting for the GIL is not counted):

* `wsgi`: the call of Django's WSGI handler, per request (the response's `close()`, where
  `request_finished` handlers run, comes after it and is not counted);
* `resolve`: knoxgate-django reading the identity (header checks, the cached-verdict lookup and
  any signature check), per request;
* `checks`: signature checks, i.e. misses of the verdict cache: an assertion the worker had not
  verified, or whose verdict expired or was evicted (refused ones included);
* `gc`: Python's cyclic garbage collections, whichever thread they interrupt (`gc.callbacks`),
  and among them `gc2`, the full ones, which walk every object the worker holds (one set off
  inside a counted function counts there too).

Every 0.5 s a worker appends its running totals, with the time and its process CPU, as one JSON
line to `$E2E_PROBE_DIR/<E2E_PROBE_NAME>.<pid>.jsonl`; `bench/e2e.py` takes the difference across
each measured run. The probe costs every request two clock reads per counted function, so a
probed run is not one whose requests/s go in the report's ratios.
"""

import gc
import json
import os
import threading
import time

_totals = {"wsgi_n": 0, "wsgi_cpu": 0.0, "resolve_n": 0, "resolve_cpu": 0.0,
           "checks_n": 0, "checks_cpu": 0.0, "gc_n": 0, "gc_cpu": 0.0, "gc2_n": 0, "gc2_cpu": 0.0}
# Reentrant: a collection can start inside `with _lock` (dict(_totals) allocates) and count itself.
_lock = threading.RLock()
_gc_started = threading.local()


def _count_gc(phase, info):
    # A collection runs to its end in the thread that set it off, holding the GIL.
    if phase == "start":
        _gc_started.at = time.thread_time()
        return
    spent = time.thread_time() - getattr(_gc_started, "at", time.thread_time())
    with _lock:
        _totals["gc_n"] += 1
        _totals["gc_cpu"] += spent
        if info["generation"] == 2:
            _totals["gc2_n"] += 1
            _totals["gc2_cpu"] += spent


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
    gc.callbacks.append(_count_gc)
    name = f"{os.environ['E2E_PROBE_NAME']}.{os.getpid()}.jsonl"
    path = os.path.join(os.environ["E2E_PROBE_DIR"], name)
    threading.Thread(target=_sampler, args=(path,), daemon=True, name="e2e-probe").start()
