#!/usr/bin/env bash
# Installs the servers the Rust tests start themselves beside Postgres and Redis: PgBouncer
# (tests/integration: transaction pooling in front of Postgres). Idempotent; Debian packages.
#
#   ./scripts/ensure-tools.sh
set -euo pipefail

missing=()
command -v pgbouncer >/dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]] || missing+=(pgbouncer)
# The Redis TLS test makes its CA and server certificate with the openssl command.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)

if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # The package starts a system PgBouncer where systemd runs; the tests start their own.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now pgbouncer >/dev/null 2>&1 || true
    fi
fi
