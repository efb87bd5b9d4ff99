# shellcheck shell=bash
# The Grafana dashboard and the alert rules: promtool parses and unit-tests the rules, and every
# PromQL expression (dashboard panels and variables, alerts) is checked against the metric and
# label names that a live knoxgate's /metrics exposes.

DASHBOARD=deploy/grafana/knoxgate.json
ALERTS=deploy/prometheus/alerts.yml
# Names that come from other exporters: kube-state-metrics' readiness record.
EXTERNAL_METRICS=(kube_pod_status_ready)

if command -v promtool >/dev/null 2>&1; then
    check "promtool $PROMTOOL_VERSION check rules $ALERTS" promtool check rules "$ALERTS"
    # promtool resolves rule_files relative to the test file.
    check "promtool $PROMTOOL_VERSION test rules deploy/prometheus/alerts.test.yml (every alert firing and quiet)" \
        promtool test rules deploy/prometheus/alerts.test.yml
else
    report FAIL "promtool check/test rules: promtool (Debian package prometheus) is not installed and could not be"
fi

check "$DASHBOARD is valid JSON with panels" \
    "$LINT_PY" -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["panels"], "no panels"' "$DASHBOARD"

# A knoxgate of the current source: the build check-config used when it is fresh, else a debug
# build (`--all-targets`, as scripts/test.sh builds it first, so nothing is rebuilt). Labelled families appear
# in /metrics only once something bumps them, so it gets the traffic that does: a login, a
# /verify, a logout (feed events), and a private Redis that refuses writes (maxmemory 1,
# noeviction) for Redis errors.
free_port() { "$LINT_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
scrape_metrics() {
    local bin=$KNOXGATE_BIN db port admin redis_port pid redis_pid i rc=0 token
    if [[ -z $bin || -n $(find src Cargo.toml Cargo.lock -newer "$bin" -print -quit) ]]; then
        cargo build --locked --quiet --all-targets || return 1
        bin=target/debug/knoxgate
    fi
    db=knoxgate_vd_$$_$RANDOM
    port=$(free_port)
    admin=$(free_port)
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
        --maxmemory 1 --maxmemory-policy noeviction >"$WORK/scrape-redis.log" 2>&1 &
    redis_pid=$!
    local env=(KNOXGATE_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/$db"
        KNOXGATE_REDIS_URL="redis://127.0.0.1:$redis_port/0" KNOXGATE_SESSIONS_PASSWORD_ITERATIONS=1000
        KNOXGATE_LISTEN="127.0.0.1:$port" KNOXGATE_ADMIN_LISTEN="127.0.0.1:$admin")
    psql -h 127.0.0.1 -U postgres -qAt -c "CREATE DATABASE $db" >/dev/null || rc=1
    if [[ $rc -eq 0 ]] && env -i PATH="$PATH" "${env[@]}" "$bin" migrate >"$WORK/scrape-migrate.log" 2>&1 &&
        printf 'scrape-pw\n' | env -i PATH="$PATH" "${env[@]}" "$bin" user create --password-stdin scrape \
            >>"$WORK/scrape-migrate.log" 2>&1; then
        env -i PATH="$PATH" "${env[@]}" "$bin" serve >"$WORK/scrape-serve.log" 2>&1 &
        pid=$!
        for ((i = 0; i < 100; i++)); do
            # Ready, and Redis connected: a login before that would not write to Redis.
            curl -fsS "http://127.0.0.1:$admin/readyz" 2>/dev/null | grep -q '"redis":"connected"' && break
            sleep 0.1
        done
        token=$(curl -sS -X POST -u scrape:scrape-pw "http://127.0.0.1:$port/api/auth/login/" | "$LINT_PY" -c 'import json, sys; print(json.load(sys.stdin)["token"])') || rc=1
        curl -sS -o /dev/null -H "Authorization: Token $token" "http://127.0.0.1:$port/verify" || rc=1
        curl -sS -o /dev/null -X POST -H "Authorization: Token $token" "http://127.0.0.1:$port/api/auth/logout/" || rc=1
        curl -sS -o /dev/null "http://127.0.0.1:$port/verify" || rc=1
        # The feed applies the logout's revocation asynchronously.
        for ((i = 0; i < 50; i++)); do
            curl -fsS "http://127.0.0.1:$admin/metrics" >"$WORK/metrics.txt" || rc=1
            grep -q '^knoxgate_feed_events_total' "$WORK/metrics.txt" && break
            sleep 0.1
        done
        kill -TERM "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null || true
    else
        cat "$WORK/scrape-migrate.log"
        rc=1
    fi
    kill -TERM "$redis_pid" 2>/dev/null
    wait "$redis_pid" 2>/dev/null || true
    psql -h 127.0.0.1 -U postgres -qAt -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
    [[ $rc -eq 0 && -s $WORK/metrics.txt ]] || { tail -n 20 "$WORK/scrape-serve.log"; return 1; }
}

promql_names() {
    local args=("$WORK/metrics.txt") name
    for name in "${EXTERNAL_METRICS[@]}"; do args+=(--external "$name"); done
    "$LINT_PY" "$VALIDATE_DIR/promql_names.py" "${args[@]}" "$@"
}

# The checker must reject what it is meant to catch: a misspelt metric and a label the metric
# does not carry.
promql_names_rejects() {
    local bad=$WORK/bad-dashboard.json
    printf '%s\n' '{"panels": [{"targets": [{"expr": "sum(rate(knoxgate_verify_requests_total[5m]))"}]}]}' >"$bad"
    if promql_names --dashboard "$bad"; then echo "accepted a misspelt metric"; return 1; fi
    printf '%s\n' '{"panels": [{"targets": [{"expr": "sum by (outcome) (rate(knoxgate_logins_total[5m]))"}]}]}' >"$bad"
    if promql_names --dashboard "$bad"; then echo "accepted a label the metric lacks"; return 1; fi
}

if ! out=$(scrape_metrics 2>&1); then
    report FAIL "live /metrics scrape of knoxgate (for the dashboard and alert checks)"
    printf '%s\n' "$out" | tail -n 20 | indent
else
    report PASS "live /metrics scrape of knoxgate after a login, /verify, logout and a Redis error: $(grep -c '^# TYPE' "$WORK/metrics.txt") metric families"
    check "$DASHBOARD and $ALERTS: every metric and label name is one a live /metrics exposes" \
        promql_names --dashboard "$DASHBOARD" --rules "$ALERTS" --emit-rules "$WORK/dashboard-rules.yml"
    check "promql_names.py rejects a misspelt metric and a label the metric lacks" promql_names_rejects
    if command -v promtool >/dev/null 2>&1 && [[ -s $WORK/dashboard-rules.yml ]]; then
        check "promtool $PROMTOOL_VERSION parses every dashboard expression (as recording rules)" \
            promtool check rules "$WORK/dashboard-rules.yml"
    fi
fi
