#!/bin/sh
# Creates a placeholder source file for every build target that Cargo.toml declares, so that the
# image build can compile the dependencies in a layer of their own, before the real sources are
# copied in. Cargo refuses a manifest whose declared targets (a [[bench]] or [[test]] with
# harness = false, say) have no file, even when it is asked to build something else.
#
#   stub-cargo-targets.sh [Cargo.toml]
set -eu

manifest=${1:-Cargo.toml}

awk '
function flush() {
    if (kind != "") {
        p = path
        if (p == "") {
            if (kind == "lib") p = "src/lib.rs"
            else if (kind == "bin") p = (name == "" ? "src/main.rs" : "src/bin/" name ".rs")
            else if (kind == "bench") p = "benches/" name ".rs"
            else p = kind "s/" name ".rs"
        }
        print kind, p
    }
    kind = ""; name = ""; path = ""
}
/^\[\[(bin|test|bench|example)\]\]/ { flush(); kind = $0; gsub(/[][]/, "", kind); sub(/[ \t#].*/, "", kind); next }
/^\[lib\]/                          { flush(); kind = "lib"; next }
/^\[/                               { flush(); next }
kind != "" && /^[ \t]*name[ \t]*=/  { name = $0; sub(/^[^"]*"/, "", name); sub(/".*/, "", name) }
kind != "" && /^[ \t]*path[ \t]*=/  { path = $0; sub(/^[^"]*"/, "", path); sub(/".*/, "", path) }
END { flush() }
' "$manifest" | while read -r kind path; do
    mkdir -p "$(dirname "$path")"
    if [ "$kind" = lib ]; then
        : > "$path"
    else
        echo 'fn main() {}' > "$path"
    fi
done

# The package needs at least one target; src/main.rs is Cargo's default binary.
if [ ! -e src/main.rs ] && [ ! -e src/lib.rs ]; then
    mkdir -p src
    echo 'fn main() {}' > src/main.rs
fi
