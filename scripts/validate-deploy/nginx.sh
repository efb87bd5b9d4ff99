# shellcheck shell=bash
# nginx -t of every nginx configuration in the repository.

# nginx_t NAME CONF: nginx -t as an unprivileged user, every path under a fresh temp prefix.
# nginx -t binds the listen addresses, so the copies listen on a unix socket in the prefix:
# no privileged port, no clash with anything running on this machine.
nginx_t() {
    local name=$1 conf=$2 prefix
    prefix=$(dirname "$conf")
    if [[ $EUID -eq 0 ]]; then chown -R 65534:65534 "$prefix"; fi
    check "$name" unprivileged nginx -t -q -p "$prefix/" -e "$prefix/error.log" -c "$conf"
}

if command -v nginx >/dev/null 2>&1; then
    NGINX_VERSION=$(nginx -v 2>&1 | sed 's/.*nginx\///')

    # deploy/nginx/knoxgate.conf: the placeholders filled as the e2e tests do.
    mkdir -p "$WORK/nginx-e2e"
    sed -e "s|@LISTEN_PORT@|unix:$WORK/nginx-e2e/nginx.sock|g; s|@KNOXGATE@|127.0.0.1:18081|g" \
        -e "s|@UPSTREAM@|127.0.0.1:18082|g; s|@PREFIX@|$WORK/nginx-e2e|g" \
        deploy/nginx/knoxgate.conf >"$WORK/nginx-e2e/nginx.conf"
    if grep -qE '@[A-Z_]+@' "$WORK/nginx-e2e/nginx.conf"; then
        report FAIL "deploy/nginx/knoxgate.conf: unknown placeholders left after substitution"
        grep -nE '@[A-Z_]+@' "$WORK/nginx-e2e/nginx.conf" | indent
    else
        nginx_t "nginx $NGINX_VERSION -t deploy/nginx/knoxgate.conf (placeholders filled, non-root, temp prefix)" \
            "$WORK/nginx-e2e/nginx.conf"
    fi

    # deploy/compose/nginx.conf: compose service names point at loopback, /tmp at the prefix,
    # and the logs go to files (an unprivileged nginx cannot reopen root's /dev/stderr pipe).
    mkdir -p "$WORK/nginx-compose"
    sed -e "s|knoxgate:8080|127.0.0.1:18081|g; s|app:80;|127.0.0.1:18082;|g" \
        -e "s|/tmp/|$WORK/nginx-compose/|g; s|/dev/stderr|$WORK/nginx-compose/error.log|" \
        -e "s|/dev/stdout|$WORK/nginx-compose/access.log|; s|listen 80;|listen unix:$WORK/nginx-compose/nginx.sock;|" \
        deploy/compose/nginx.conf >"$WORK/nginx-compose/nginx.conf"
    nginx_t "nginx $NGINX_VERSION -t deploy/compose/nginx.conf (service names -> loopback, non-root)" \
        "$WORK/nginx-compose/nginx.conf"

    # The nginx.conf in sidecar.yaml's ConfigMap.
    mkdir -p "$WORK/nginx-sidecar"
    "$LINT_PY" -c '
import sys, yaml
for doc in yaml.safe_load_all(open("deploy/kubernetes/sidecar.yaml")):
    if doc and doc.get("kind") == "ConfigMap" and "nginx.conf" in doc.get("data", {}):
        sys.stdout.write(doc["data"]["nginx.conf"])
' | sed -e "s|/tmp/|$WORK/nginx-sidecar/|g; s|/dev/stderr|$WORK/nginx-sidecar/error.log|" \
        -e "s|/dev/stdout|$WORK/nginx-sidecar/access.log|; s|listen 8000;|listen unix:$WORK/nginx-sidecar/nginx.sock;|" \
        >"$WORK/nginx-sidecar/nginx.conf"
    nginx_t "nginx $NGINX_VERSION -t nginx.conf of deploy/kubernetes/sidecar.yaml (non-root)" \
        "$WORK/nginx-sidecar/nginx.conf"
else
    report FAIL "nginx -t: nginx is not installed and could not be (apt-get install nginx needs root)"
fi

