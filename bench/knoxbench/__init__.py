"""The knoxgate benchmark driver's parts; bench/bench.py runs them (through bench/run.sh).

Modules, each importing only those above it:

- config:   paths and BENCH_* knobs, read from the environment once at import time; log, budget
- procs:    subprocesses (run, psql, redis-cli), HTTP probes, start/stop of everything started
- counters: Postgres transactions, Redis commandstats, knoxgate metrics, RSS from /proc
- results:  the rows, rounds, notes and failures of this run; results.json
- wrk:      one wrk run parsed (wrk), and one measured run with its counters (measure)
- servers:  redis-server, knoxgate, the nginx floor, Django under gunicorn
- seed:     the fresh database and its seeded knox tokens (also used by soak.py and login.py)
- targets:  one function per benchmark step
- report:   results.md, with the Targets verdicts
- chart:    chart.png
"""
