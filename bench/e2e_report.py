"""bench/out/e2e.md from one bench/e2e.py run: the tables, the per-round ratios and the Targets.

Only what the run recorded is shown; a configuration or step that did not run is listed as such.
"""

import statistics

TARGET_KNOX = 2.5       # knoxgate path req/s >= 2.5 x Django + knox
TARGET_FLOOR = 0.85     # knoxgate path req/s >= 0.85 x the no-auth floor
TARGET_SIGNED = 0.9     # hot /verify with signed assertions >= 0.9 x without


def fmt(x, digits=0):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cpu_columns(row, config):
    """CPU µs per request of a run, grouped: nginx, gunicorn (this configuration's), knoxgate
    (the instance this configuration uses; for auth-stub, the stub's nginx), redis, postgres,
    wrk, other (everything else we started, which should be idle), total."""
    c = row["cpu_us_per_req"]
    own_app = f"gunicorn-{config}"
    own_kg = {"knoxgate": "knoxgate-signed", "knoxgate-unsigned": "knoxgate-unsigned",
              "verify-signed": "knoxgate-signed", "verify-unsigned": "knoxgate-unsigned",
              "auth-stub": "auth-stub", "auth-stub-unix": "auth-stub",
              "knoxgate-floor": "knoxgate-unsigned"}.get(config)
    cols = {
        "nginx": c.get("nginx", 0.0),
        "gunicorn": c.get(own_app, 0.0),
        "knoxgate": c.get(own_kg, 0.0) if own_kg else 0.0,
        "redis": c.get("redis", 0.0),
        "postgres": c.get("postgres", 0.0),
        "wrk": c.get("wrk", 0.0),
    }
    named = {"nginx", own_app, own_kg, "redis", "postgres", "wrk"}
    cols["other"] = sum(v for k, v in c.items() if k not in named)
    cols["total"] = sum(c.values())
    return cols


def write_report(state, configs, info, p):
    runs = state["runs"]
    v = state.get("versions", {})
    sat = {c: [r for r in runs if r["tag"].startswith("sat") and r["config"] == c] for c in configs}
    fixed = {r["config"]: r for r in runs if r["tag"] == "fixed"}
    ver = {c: [r for r in runs if r["tag"].startswith("verify") and r["config"] == c]
           for c in ("verify-signed", "verify-unsigned")}
    L = []
    a = L.append
    a("# End to end: one DRF endpoint behind nginx, each way of authenticating")
    a("")
    a(f"One run of `bench/e2e.sh`, {v.get('date', '?')}, {fmt(p['elapsed'] / 60, 1)} minutes. "
      f"Machine: {v.get('cores', '?')} cores ({v.get('cpu', '?')}), shared: wrk, nginx, the "
      "gunicorns, knoxgate, Redis and Postgres all run on the same cores, so absolute figures "
      "move 10–20 % between runs; the ratios come from runs of the same rounds.")
    a("")
    a(f"- knoxgate: {v.get('knoxgate', '?')} (release build, git {v.get('git', '?')}); "
      f"{v.get('nginx', '?')}; PostgreSQL {v.get('postgres', '?')}; {v.get('redis', '?')}")
    a(f"- Python {v.get('python', '?')}")
    a(f"- gunicorn `{p['gunicorn']}` for every configuration; nginx {p['nginx_workers']} worker, "
      "no keep-alive from nginx to gunicorn (as `deploy/nginx/knoxgate.conf`), keep-alive 16 to "
      "knoxgate")
    a(f"- Load: `wrk -t2 -c{p['conns']}` for {p['duration']} s per run at saturation "
      f"({p['rounds']} interleaved rounds, order reversed every other round); fixed rate: "
      f"{fmt(state.get('fixed_rate'))} req/s with {p['rate_conns']} connections, paced by wrk's "
      "`delay()` (not corrected for coordinated omission). Each request carries "
      f"`Authorization: Token <t>`, t drawn at random from a hot set of {p['hot_set']} seeded "
      "knox tokens (warmed first: knox-redis's cache and knoxgate's in-process tier hold them).")
    a("")
    a("| configuration | what answers |")
    a("| --- | --- |")
    for c in configs:
        a(f"| `{c}` | {info[c][0]} |")
    a("")
    a("The view is the same everywhere (`bench/django/e2e_urls.py`: `GET /api/whoami/` → "
      "`{\"user_id\": …}`), as are Django's middleware, settings and database connections "
      "(`CONN_MAX_AGE=600`); only `REST_FRAMEWORK`'s authentication class differs "
      "(`bench/django/e2e_settings.py`). `floor` has none (AllowAny) and answers `null`, as "
      "does `auth-stub`, which puts a forward-auth server that does nothing in front of it: "
      "the cost of nginx's subrequest and of a separate process answering it, before any "
      "authentication.")
    a("")

    # --- saturation
    a("## Saturation")
    a("")
    a("Requests/s per round, then the median; p50/p99 are the medians over the rounds.")
    a("")
    rounds = sorted({r.get("round") for rs in sat.values() for r in rs})
    a("| configuration | " + " | ".join(f"round {n}" for n in rounds) +
      " | **median req/s** | p50 ms | p99 ms | errors / non-2xx |")
    a("| --- | " + " | ".join("---:" for _ in rounds) + " | ---: | ---: | ---: | ---: |")
    for c in configs:
        by = {r["round"]: r for r in sat[c]}
        a(f"| `{c}` | " + " | ".join(fmt(by[n]["rps"]) if n in by else "–" for n in rounds) +
          f" | **{fmt(med(r['rps'] for r in sat[c]))}** | {fmt(med(r['p50_ms'] for r in sat[c]), 1)}"
          f" | {fmt(med(r['p99_ms'] for r in sat[c]), 1)} | "
          f"{sum(r['errors'] for r in sat[c])} / {sum(r['non2xx'] for r in sat[c])} |")
    a("")

    def ratios(num, den):
        out = []
        for n in rounds:
            x = next((r for r in sat.get(num, []) if r["round"] == n), None)
            y = next((r for r in sat.get(den, []) if r["round"] == n), None)
            if x and y and y["rps"]:
                out.append(x["rps"] / y["rps"])
        return out

    pairs = [("knoxgate", "knox"), ("knoxgate", "floor"), ("knoxgate", "knox-redis"),
             ("knoxgate-unsigned", "floor"), ("knoxgate-unsigned", "knox"), ("knox", "floor"),
             ("knox-redis", "floor"), ("auth-stub", "floor"), ("knoxgate", "auth-stub"),
             ("knoxgate-unsigned", "auth-stub"), ("auth-stub-unix", "auth-stub"),
             ("knoxgate-floor", "auth-stub"), ("knoxgate-unsigned", "knoxgate-floor")]
    ratio = {}
    a("Ratios of requests/s within each round:")
    a("")
    for num, den in pairs:
        if num in configs and den in configs:
            rs = ratios(num, den)
            ratio[(num, den)] = med(rs)
            a(f"- `{num}` / `{den}`: median **{fmt(med(rs), 2)}×** "
              f"({', '.join(fmt(x, 2) for x in rs)})")
    a("")

    signed_runs = [r for r in sat.get("knoxgate", []) if "assertions_signed" in r]
    if signed_runs:
        a("Assertions knoxgate signed during each `knoxgate` run (renewals of assertions within "
          "`renew_before` of expiry; each gunicorn worker verifies a new one once): " +
          ", ".join(f"round {r['round']}: {fmt(r['assertions_signed'])}"
                    for r in sorted(signed_runs, key=lambda r: r["round"])) +
          f". An assertion lives 60 s and is renewed in its last 15, so a run that starts more "
          "than 45 s after the previous one renews every hot token's; steady traffic renews each "
          "active token's once per 45 s.")
        a("")

    # --- fixed rate
    a(f"## Fixed rate ({fmt(state.get('fixed_rate'))} req/s) and SQL per request")
    a("")
    a("*PG xacts / req*: `xact_commit + xact_rollback` of the bench database in "
      "`pg_stat_database` across the run, read after Postgres's statistics have settled "
      "(backends publish them up to 10 s late); Django runs in autocommit, so a transaction is "
      "a statement. It counts everything sent to that database: the floor's figure is what the "
      "view costs without authentication. *knoxgate SQL / req*: knoxgate's own "
      "`knoxgate_sql_statements_total` delta. *Redis / req*: `INFO commandstats` on the private "
      "redis-server.")
    a("")
    a("| configuration | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | PG xacts / req | "
      "knoxgate SQL / req | Redis / req | errors / non-2xx |")
    a("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in configs:
        r = fixed.get(c)
        if not r:
            a(f"| `{c}` | not run | | | | | | | | |")
            continue
        kgsql = sum(r.get("kg_sql_per_req", {}).values()) if r.get("kg_sql_per_req") else None
        a(f"| `{c}` | {fmt(r['rps'])} | {fmt(r['p50_ms'], 2)} | {fmt(r['p90_ms'], 2)} | "
          f"{fmt(r['p99_ms'], 2)} | {fmt(r['p999_ms'], 2)} | {fmt(r.get('pg_xact_per_req'), 3)} | "
          f"{fmt(kgsql, 3)} | {fmt(r.get('redis_per_req'), 3)} | {r['errors']} / {r['non2xx']} |")
    a("")

    # --- CPU
    a("## CPU per request, by process")
    a("")
    a("µs of CPU (user + system, `/proc/<pid>/stat`) per request: nginx (master and worker), "
      "the configuration's gunicorn (master and workers), the knoxgate instance it uses (for "
      "`auth-stub`: the stub's nginx), "
      "redis-server, the Postgres backends connected to the bench database, and wrk itself "
      "(the load generator, `getrusage`). *other*: every other process started by the run "
      "(idle gunicorns and knoxgate); should be ~0.")
    a("")
    cols = ["nginx", "gunicorn", "knoxgate", "redis", "postgres", "wrk", "other", "total"]
    for title, rows_of in (("At the fixed rate", lambda c: [fixed[c]] if c in fixed else []),
                           ("At saturation (median over the rounds)", lambda c: sat[c])):
        a(f"{title}:")
        a("")
        a("| configuration | " + " | ".join(cols) + " | total without wrk |")
        a("| --- | " + " | ".join("---:" for _ in cols) + " | ---: |")
        for c in configs:
            rs = rows_of(c)
            if not rs:
                continue
            cc = [cpu_columns(r, c) for r in rs]
            vals = {k: med(x[k] for x in cc) for k in cols}
            a(f"| `{c}` | " + " | ".join(fmt(vals[k]) for k in cols) +
              f" | {fmt(med(x['total'] - x['wrk'] for x in cc))} |")
        a("")

    # --- probe
    probed = [r for r in state["runs"] if r.get("probe")]
    if probed:
        a("## Where gunicorn's CPU goes (`E2E_PROBE=1`)")
        a("")
        a("Per request, from `bench/django/gunicorn_probe.py` in every worker: *gunicorn*, the "
          "worker processes' CPU (`os.times`); *Django handler*, the thread CPU of Django's WSGI "
          "handler; *knoxgate-django*, of reading the identity (cached verdict lookup and any "
          "signature check); *checks*, signature checks of assertions the worker had not "
          "verified before, and their thread CPU each and per request; *gc*, the thread CPU of "
          "Python's cyclic garbage collections per request, and of the full ones (which walk "
          "every object a worker holds) with their count; a collection set off inside Django's "
          "handler counts in both. This run's requests/s include the "
          "probe's own cost.")
        a("")
        a("| run | configuration | req/s | gunicorn µs | Django handler µs | knoxgate-django µs "
          "| checks | µs each | checks µs / req | gc µs | full gcs | full gc µs |")
        a("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in probed:
            pr = r["probe"]
            a(f"| {r['tag']} | `{r['config']}` | {fmt(r['rps'])} | {fmt(pr['process_us'])} | "
              f"{fmt(pr['wsgi_us'])} | {fmt(pr['package_us'])} | {fmt(pr['checks'])} | "
              f"{fmt(pr['check_us'])} | {fmt(pr['checks_us_per_req'])} | "
              f"{fmt(pr.get('gc_us'))} | {fmt(pr.get('gc_full'))} | {fmt(pr.get('gc_full_us'))} |")
        a("")

    # --- verify
    a("## Hot `/verify`: signed assertions on vs off")
    a("")
    a(f"`wrk -t2 -c{p['conns']}` straight to each knoxgate's `/verify` for "
      f"{p['verify_duration']} s, the same {p['hot_set']} hot tokens, {p['verify_rounds']} interleaved "
      f"rounds (order swapped every round). `signed`: `[assertion]` with {p['assertion_key']} (each "
      "cached token reuses its assertion until it nears expiry); `unsigned`: no `[assertion]`.")
    a("")
    vr = sorted({r["round"] for rs in ver.values() for r in rs})
    a("| knoxgate | " + " | ".join(f"round {n}" for n in vr) +
      " | **median req/s** | p50 ms | p99 ms | CPU µs / req (knoxgate) | errors / non-2xx |")
    a("| --- | " + " | ".join("---:" for _ in vr) + " | ---: | ---: | ---: | ---: | ---: |")
    for c, rs in ver.items():
        by = {r["round"]: r for r in rs}
        a(f"| {c.split('-', 1)[1]} | " + " | ".join(fmt(by[n]["rps"]) if n in by else "–"
                                                   for n in vr) +
          f" | **{fmt(med(r['rps'] for r in rs))}** | {fmt(med(r['p50_ms'] for r in rs), 2)} | "
          f"{fmt(med(r['p99_ms'] for r in rs), 2)} | "
          f"{fmt(med(cpu_columns(r, c)['knoxgate'] for r in rs), 1)} | "
          f"{sum(r['errors'] for r in rs)} / {sum(r['non2xx'] for r in rs)} |")
    vratios = []
    for n in vr:
        s_ = next((r for r in ver["verify-signed"] if r["round"] == n), None)
        u_ = next((r for r in ver["verify-unsigned"] if r["round"] == n), None)
        if s_ and u_ and u_["rps"]:
            vratios.append(s_["rps"] / u_["rps"])
    a("")
    a(f"signed / unsigned within each round: median **{fmt(med(vratios), 2)}×** "
      f"({', '.join(fmt(x, 2) for x in vratios)})")
    a("")

    # --- targets
    a("## Targets")
    a("")
    if p.get("probe"):
        a("A probed run (`E2E_PROBE=1`): its requests/s include the probe's cost, so these are "
          "not the figures a target is judged on.")
        a("")

    def verdict(ok):
        return "**met**" if ok else "**not met**"

    def line(text, value, target, higher=True):
        if value is None:
            a(f"- {text}: not measured")
        else:
            a(f"- {text}: {fmt(value, 2)}× (target ≥ {target}×) — {verdict(value >= target)}")

    line("knoxgate path / Django + knox, requests/s (median of per-round ratios)",
         ratio.get(("knoxgate", "knox")), TARGET_KNOX)
    line("knoxgate path / no-auth floor, requests/s (median of per-round ratios)",
         ratio.get(("knoxgate", "floor")), TARGET_FLOOR)
    if "knoxgate" in fixed and "floor" in fixed:
        kf, ff = fixed["knoxgate"], fixed["floor"]
        auth = kf["pg_xact_per_req"] - ff["pg_xact_per_req"]
        kgsql = kf.get("kg_sql_per_req", {}).get("signed")
        # Nothing knoxgate sent, and no more than the floor's statements reached Postgres.
        ok = kgsql == 0 and auth < 0.01
        a(f"- 0 auth SQL on the knoxgate path: knoxgate sent {fmt(kgsql, 3)} statements / request; "
          f"Postgres saw {fmt(kf['pg_xact_per_req'], 3)} transactions / request against the "
          f"floor's {fmt(ff['pg_xact_per_req'], 3)} (difference {fmt(auth, 3)}) — {verdict(ok)}")
    else:
        a("- 0 auth SQL on the knoxgate path: not measured")
    line("hot /verify, signed assertions on / off, requests/s (median of per-round ratios)",
         med(vratios), TARGET_SIGNED)
    a("")

    a("## Checks before measuring")
    a("")
    for ch in state["checks"]:
        detail = " ".join(ch["detail"].split())[:100]
        a(f"- {'ok' if ch['ok'] else 'FAILED'}: {ch['check']} ({detail})")
    a("")
    if state["failures"]:
        a("## Errors during the run")
        a("")
        for f in state["failures"]:
            a(f"- {f}")
        a("")
    if state["notes"]:
        a("## Notes")
        a("")
        for n in state["notes"]:
            a(f"- {n}")
        a("")
    return "\n".join(L)
