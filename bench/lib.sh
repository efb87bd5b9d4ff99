# Shared by bench/run.sh, bench/login.sh and bench/soak.sh (sourced, not run).

# bench_install PAIRS...: each PAIR is command:debian-package. Installs the packages whose
# command is missing (root only; otherwise says what to install and exits 2). policy-rc.d keeps
# a package such as nginx from starting a system-wide service on port 80.
bench_install() {
    local missing=() pair policy_created=
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $EUID -ne 0 ]]; then
        echo "bench: missing ${missing[*]}; install them (apt-get install -y ${missing[*]})" >&2
        exit 2
    fi
    echo "bench: apt-get install ${missing[*]}" >&2
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        policy_created=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    if [[ -n $policy_created ]]; then rm -f /usr/sbin/policy-rc.d; fi
}

# bench_knoxgate: exports KNOXGATE_BIN, building target/release/knoxgate first unless a binary
# is named (a stale release build would otherwise be measured silently).
bench_knoxgate() {
    if [[ -z "${KNOXGATE_BIN:-}" ]]; then
        echo "bench: building knoxgate (cargo build --release --locked)" >&2
        timeout 1800 cargo build --release --locked
        KNOXGATE_BIN="$PWD/target/release/knoxgate"
    fi
    [[ -x "$KNOXGATE_BIN" ]] || { echo "bench: $KNOXGATE_BIN not found" >&2; exit 2; }
    export KNOXGATE_BIN
}
