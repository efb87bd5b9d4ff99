# shellcheck shell=bash
# Generic linters: shellcheck, yamllint, and docker-compose's schema check.

# --- shell --------------------------------------------------------------------------------------

SHELL_FILES=(scripts/validate-deploy.sh scripts/validate-deploy/*.sh scripts/container-test.sh
    scripts/container-test/postgres/entrypoint.sh deploy/docker/stub-cargo-targets.sh)
# -x follows `source`, so the driver is checked together with the parts it runs.
check "shellcheck -x (${#SHELL_FILES[@]} files: validate-deploy, container-test, the postgres stand-in, the stub script)" \
    "$LINT_VENV/bin/shellcheck" -x -P SCRIPTDIR "${SHELL_FILES[@]}"

# --- YAML ---------------------------------------------------------------------------------------

mapfile -t YAML_FILES < <(find deploy -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
YAML_FILES=(docker-compose.yml "${YAML_FILES[@]}")
# Duplicate keys, which every YAML loader accepts silently, are the main catch here.
YAMLLINT_CONFIG='{extends: default, rules: {line-length: {max: 130}, document-start: disable,
  braces: {max-spaces-inside: 1}, brackets: {max-spaces-inside: 1}}}'
check "yamllint (${#YAML_FILES[@]} files: docker-compose.yml, deploy/**/*.y*ml)" \
    "$LINT_VENV/bin/yamllint" -s -d "$YAMLLINT_CONFIG" "${YAML_FILES[@]}"

# --- docker-compose.yml -------------------------------------------------------------------------

# docker-compose v1 (1.29.2) validates against the Compose Specification schema it ships, which
# already knows `depends_on: condition: service_completed_successfully`.
check "docker-compose 1.29.2 config -q (Compose Specification schema)" \
    "$COMPOSE_VENV/bin/docker-compose" -f docker-compose.yml config -q

