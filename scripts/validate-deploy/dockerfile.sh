# shellcheck shell=bash
# Dockerfile: hadolint, and the stub script its dependency layer relies on.

check "hadolint Dockerfile ($("$LINT_VENV/bin/hadolint" --version | grep -o '[0-9][0-9.]*' | head -n 1))" \
    "$LINT_VENV/bin/hadolint" Dockerfile

# The stub script must give every target that a manifest declares a file, or the dependency
# layer of the image build fails.
stub_test() {
    local dir=$WORK/stub
    rm -rf "$dir" && mkdir -p "$dir"
    cp Cargo.toml "$dir/"
    cat >>"$dir/Cargo.toml" <<'EOF'

[[bench]]
name = "verify_load"
harness = false

[[test]]
name = "integration"
path = "tests/main.rs"
EOF
    (cd "$dir" && sh "$ROOT/deploy/docker/stub-cargo-targets.sh" Cargo.toml)
    local f
    for f in src/main.rs benches/verify_load.rs tests/main.rs; do
        [[ -f $dir/$f ]] || { echo "no placeholder for $f"; return 1; }
    done
}
check "deploy/docker/stub-cargo-targets.sh stubs every declared cargo target" stub_test

# The base-image stand-ins of scripts/container-test.sh. They install Debian 12's current package
# versions on purpose (DL3008) and run as the Debian packages' named users (DL3066).
mapfile -t STANDIN_FILES < <(find scripts/container-test -name Containerfile | sort)
check "hadolint scripts/container-test/*/Containerfile (${#STANDIN_FILES[@]} stand-ins; DL3008, DL3066 ignored)" \
    "$LINT_VENV/bin/hadolint" --ignore DL3008 --ignore DL3066 "${STANDIN_FILES[@]}"
