# shellcheck shell=bash
# kubectl kustomize of deploy/kubernetes (the schema and workload checks are in semantic.py).

# Rendered offline; the semantic checks below validate the rendered objects too.
kustomize_render() { "$LINT_VENV/bin/kubectl" kustomize deploy/kubernetes >"$WORK/kustomize.yaml"; }
check "kubectl $("$LINT_VENV/bin/kubectl" version --client 2>/dev/null | awk '/Client/ {print $3}') kustomize deploy/kubernetes (renders; resources listed exist)" \
    kustomize_render

