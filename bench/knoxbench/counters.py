"""What one run costs, read before and after it: the counters and the memory figures.

- Postgres: `xact_commit + xact_rollback` of the bench database in pg_stat_database (`pg_xacts`,
  read once the counter has settled).
- Redis: `INFO commandstats` after `CONFIG RESETSTAT` on the private redis-server.
- knoxgate: its own Prometheus counters from the admin listener (`metrics`, `delta`).
- RSS / peak RSS from /proc, for one process or a process tree (nginx, gunicorn).
"""

import re
import time
from pathlib import Path

from .config import DB, PG_SETTLE
from .procs import http_get, psql, redis_cli


def pg_xacts(settle=True):
    """xact_commit + xact_rollback of the bench DB, read once it has stopped moving.

    PG15 backends publish their counters lazily: a backend that goes idle less than 1 s after
    its last flush keeps the rest pending for PGSTAT_IDLE_INTERVAL (10 s). So we wait
    BENCH_PG_SETTLE seconds after any DB activity, then poll until two reads 1.5 s apart agree."""
    def read():
        return int(psql(f"SELECT xact_commit + xact_rollback FROM pg_stat_database "
                        f"WHERE datname = '{DB}'", db="postgres"))
    if settle:
        time.sleep(PG_SETTLE)
    prev = read()
    for _ in range(10):
        time.sleep(1.5)
        cur = read()
        if cur - prev <= 1:   # our own read is one transaction
            return cur
        prev = cur
    return prev


def redis_reset():
    redis_cli("CONFIG", "RESETSTAT")


def redis_commands():
    """Total calls since RESETSTAT, minus our own INFO/CONFIG."""
    total, per = 0, {}
    for line in redis_cli("INFO", "commandstats").splitlines():
        m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
        if m and m.group(1).split("|")[0] not in ("info", "config"):
            per[m.group(1)] = int(m.group(2))
            total += int(m.group(2))
    return total, per


def metrics(admin):
    status, body = http_get(f"http://{admin}/metrics", timeout=5)
    sql, lookups, redis_ops = 0.0, {}, {}
    for line in body.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^(\S+?)(\{[^}]*\})?\s+(\S+)$", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if name.endswith("sql_statements_total"):
            sql += value
            lookups["sql:" + lab.get("statement", "?")] = lookups.get("sql:" + lab.get("statement", "?"), 0) + value
        elif name.endswith("cache_lookups_total"):
            k = f"{lab.get('tier')}/{lab.get('result')}"
            lookups[k] = lookups.get(k, 0) + value
        elif name.endswith("redis_commands_total"):
            redis_ops[lab.get("op", "?")] = redis_ops.get(lab.get("op", "?"), 0) + value
        elif name.endswith("memory_cache_entries"):
            lookups["memory_entries"] = value
        elif name.endswith("coalesced_misses_total"):
            lookups["coalesced_miss"] = value
        elif name.endswith("assertions_signed_total"):
            lookups["assertions_signed"] = value
        elif name.endswith("load_shed_total"):
            lookups["load_shed"] = value
        elif name.endswith("verify_total"):
            k = "verify:" + ",".join(f"{a}={b}" for a, b in sorted(lab.items()))
            lookups[k] = lookups.get(k, 0) + value
    return {"sql": sql, "detail": lookups, "redis_ops": redis_ops}


def delta(after, before):
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
            if k != "memory_entries" and after.get(k, 0) - before.get(k, 0)}


def tree_pids(pid):
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(d.name))
            except (OSError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        x = todo.pop()
        out.append(x)
        todo.extend(children.get(x, []))
    return out


def proc_status_kib(pid, field):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib(pid, tree=False):
    pids = tree_pids(pid) if tree else [pid]
    vals = [proc_status_kib(p, "VmRSS") for p in pids]
    vals = [v for v in vals if v is not None]
    return round(sum(vals) / 1024, 1) if vals else None
