#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests (real Postgres and Redis), the Django interop
# suite, the nginx/Caddy end-to-end suite, nginx -> knoxgate -> Django with signed assertions,
# and the static checks of the deploy files.
#
#   ./scripts/test.sh
#
# Needs Postgres on 127.0.0.1:5432 (user postgres, trust auth) and Redis on 127.0.0.1:6379.
# Everything else (PgBouncer, Python packages, nginx, caddy, linters) the suites install
# themselves.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

failed=()
step() {
    local name=$1
    shift
    echo
    echo "=== $name"
    if ! "$@"; then
        failed+=("$name")
    fi
}

step "test tools" scripts/ensure-tools.sh
# --all-targets: the binary the suites below run is then the same build `cargo test` uses (the
# tests enable tokio's test-util), not a second variant of every tokio-based crate.
step "cargo build" cargo build --locked --all-targets
step "cargo test" cargo test --locked
step "django interop" tests/interop/run.sh
step "knoxgate-django" integrations/django/run-tests.sh
step "e2e django" tests/e2e-django/run.sh
# Deploy checks first: they install the linters and tools (promtool, a second Caddy) that the
# end-to-end suite uses too.
step "deploy files" scripts/validate-deploy.sh
step "e2e proxies" tests/e2e/run.sh
# Builds the Dockerfile and runs the image and the compose services with podman: about 15 min
# on an idle machine that has never run it, 1-4 min once podman's storage holds the images.
step "containers" scripts/container-test.sh

echo
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all suites passed"
