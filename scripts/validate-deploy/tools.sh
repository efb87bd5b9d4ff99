# shellcheck shell=bash
# Variables set here are read by the parts sourced after it.
# shellcheck disable=SC2034
# Installs (first run) or reuses the linters and Debian tools; stops the run when that fails.

COMPOSE_VENV=$TOOLS/compose
LINT_VENV=$TOOLS/lint
TOOLS_OK=1
ensure_venv "$COMPOSE_VENV" "${COMPOSE_PINS[*]} ${COMPOSE_BUILD_PINS[*]}" install_compose || TOOLS_OK=
ensure_venv "$LINT_VENV" "${LINT_PINS[*]}" install_lint || TOOLS_OK=
ensure_apt nginx:nginx caddy:caddy promtool:prometheus
if [[ -z $TOOLS_OK ]]; then
    report FAIL "tool installation (see the logs next to the venvs in $TOOLS)"
    echo "validate-deploy: $PASSED passed, $FAILED failed, $SKIPPED skipped"
    exit 1
fi
LINT_PY=$LINT_VENV/bin/python

