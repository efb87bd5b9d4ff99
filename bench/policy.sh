#!/usr/bin/env bash
# Hot /verify with and without a per-route policy: interleaved wrk rounds against one knoxgate,
# every token staff and in group "ops", so both URLs answer 200 from the in-process cache.
#
#   bench/policy.sh
#
#   KNOXGATE_BIN    binary to measure (default: cargo build --release, target/release/knoxgate)
#   ROUNDS=5        rounds; each runs the plain URL then the policy URL (order alternates)
#   DURATION=5s     wrk duration per run
#   CONNECTIONS=64  wrk connections (2 threads)
#   TOKENS=1000     users, one token each
#   POLICY_PATH     the policy URL (default /verify?require=staff&group=ops)
#
# Needs Postgres on 127.0.0.1:5432 (user postgres, trust) and Redis on 127.0.0.1:6379; installs
# wrk with apt-get when missing (root). Prints one line per run and the medians; results in
# bench/POLICY.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-64}
TOKENS=${TOKENS:-1000}
POLICY_PATH=${POLICY_PATH:-"/verify?require=staff&group=ops"}

bench_install wrk:wrk psql:postgresql-client python3:python3
bench_knoxgate

WORK=$(mktemp -d "${TMPDIR:-/tmp}/knoxgate-policy-bench.XXXXXX")
DB=knoxgate_policy_bench_$$
PREFIX=kgpolicybench$$
PG=(psql -h 127.0.0.1 -p 5432 -U postgres -v ON_ERROR_STOP=1 -qAt)
KG_PID=
cleanup() {
    set +e
    if [[ -n $KG_PID ]]; then kill -TERM "$KG_PID" 2>/dev/null; wait "$KG_PID" 2>/dev/null; fi
    "${PG[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1
    redis-cli -h 127.0.0.1 --scan --pattern "$PREFIX:*" 2>/dev/null | xargs -r redis-cli -h 127.0.0.1 DEL >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

read -r PORT ADMIN <<<"$(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')"
ENV=(env -i PATH="$PATH" HOME="$WORK"
    KNOXGATE_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/$DB"
    KNOXGATE_REDIS_KEY_PREFIX="$PREFIX"
    KNOXGATE_LISTEN="127.0.0.1:$PORT" KNOXGATE_ADMIN_LISTEN="127.0.0.1:$ADMIN"
    KNOXGATE_LOG_LEVEL=warn)

"${PG[@]}" -d postgres -c "CREATE DATABASE $DB"
"${ENV[@]}" "$KNOXGATE_BIN" migrate >/dev/null
# Users and knox-format tokens (sha512 of the token, token_key = its first 15 characters).
python3 - "$TOKENS" "$WORK/tokens.txt" >"$WORK/seed.sql" <<'PY'
import hashlib, secrets, sys
n, out = int(sys.argv[1]), sys.argv[2]
print("INSERT INTO auth_group (name) VALUES ('ops');")
print("INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, "
      "is_staff, is_active, date_joined) SELECT '!', false, 'u' || i, '', '', '', true, true, now() "
      f"FROM generate_series(1, {n}) i;")
print("INSERT INTO auth_user_groups (user_id, group_id) SELECT u.id, g.id FROM auth_user u, auth_group g;")
with open(out, "w") as f:
    for i in range(1, n + 1):
        t = secrets.token_hex(32)
        f.write(t + "\n")
        print("INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) VALUES "
              f"('{hashlib.sha512(t.encode()).hexdigest()}', now(), "
              f"(SELECT id FROM auth_user WHERE username = 'u{i}'), now() + interval '10 hours', '{t[:15]}');")
PY
"${PG[@]}" -d "$DB" -f "$WORK/seed.sql" >/dev/null

"${ENV[@]}" "$KNOXGATE_BIN" serve >"$WORK/knoxgate.log" 2>&1 &
KG_PID=$!
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fs "http://127.0.0.1:$ADMIN/readyz" >/dev/null || { tail "$WORK/knoxgate.log"; exit 1; }
t=$(head -n 1 "$WORK/tokens.txt")
for path in /verify "$POLICY_PATH"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Token $t" "http://127.0.0.1:$PORT$path")
    [[ $code == 200 ]] || { echo "bench: $path answered $code, not 200" >&2; exit 1; }
done

run() { # run LABEL PATH: one wrk run; prints "LABEL rps p50 p99"
    BENCH_TOKENS="$WORK/tokens.txt" BENCH_PATH="$2" BENCH_THREADS=2 \
        wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency -s bench/verify.lua "http://127.0.0.1:$PORT" \
        >"$WORK/wrk.txt" 2>&1
    if grep -q "Non-2xx" "$WORK/wrk.txt"; then
        echo "bench: non-2xx answers for $2" >&2
        cat "$WORK/wrk.txt" >&2
        exit 1
    fi
    python3 - "$1" "$WORK/wrk.txt" <<'PY'
import re, sys
label, text = sys.argv[1], open(sys.argv[2]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
def pct(p):
    m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    v, unit = float(m.group(1)), m.group(2)
    return v * {"us": 1e-3, "ms": 1, "s": 1e3}[unit]
print(f"{label} {rps:.0f} {pct(50):.3f} {pct(99):.3f}")
PY
}

# Warm-up: every token cached in memory.
run warmup /verify >/dev/null
echo "# round label requests/s p50_ms p99_ms"
: >"$WORK/results"
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then order=(plain policy); else order=(policy plain); fi
    for which in "${order[@]}"; do
        path=/verify
        [[ $which == policy ]] && path=$POLICY_PATH
        line=$(run "$which" "$path")
        echo "$r $line"
        echo "$line" >>"$WORK/results"
    done
done
python3 - "$WORK/results" "$POLICY_PATH" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for label in ("plain", "policy"):
    mine = [r for r in rows if r[0] == label]
    med = lambda i: statistics.median(float(r[i]) for r in mine)
    name = "/verify" if label == "plain" else sys.argv[2]
    print(f"median {name}: {med(1):.0f} req/s, p50 {med(2):.3f} ms, p99 {med(3):.3f} ms ({len(mine)} runs)")
PY
sql=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^knoxgate_sql_statements_total/ {s += $2} END {print s + 0}')
echo "SQL statements sent during the whole run (seeding loads included): $sql"
