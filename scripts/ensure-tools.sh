#!/usr/bin/env bash
# Installs the servers and tools the Rust tests start themselves beside Postgres and Redis:
# PgBouncer (transaction pooling in front of Postgres), redis-server and redis-cli (private
# Redis Cluster and Sentinel deployments), ip and nft (packet loss in a network namespace).
# Idempotent; Debian packages.
#
#   ./scripts/ensure-tools.sh
set -euo pipefail

missing=()
command -v pgbouncer >/dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]] || missing+=(pgbouncer)
# The Redis TLS test makes its CA and server certificate with the openssl command.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v ip >/dev/null 2>&1 || [[ -x /usr/sbin/ip ]] || missing+=(iproute2)
# Without nft the packet-loss tests emulate loss in a proxy instead (and say so).
command -v nft >/dev/null 2>&1 || [[ -x /usr/sbin/nft ]] || missing+=(nftables)

if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # The package starts a system PgBouncer where systemd runs; the tests start their own.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now pgbouncer >/dev/null 2>&1 || true
    fi
fi
