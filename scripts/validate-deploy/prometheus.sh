# shellcheck shell=bash
# promtool on the scrape configurations.

if command -v promtool >/dev/null 2>&1; then
    PROMTOOL_VERSION=$(promtool --version 2>&1 | awk 'NR == 1 {print $3}')
    check "promtool $PROMTOOL_VERSION check config deploy/prometheus/prometheus.yml" \
        promtool check config deploy/prometheus/prometheus.yml
    # Debian builds Prometheus without Kubernetes service discovery, so its promtool rejects
    # kubernetes_sd_configs. Check everything else (relabelling included) with static targets.
    sed 's/^\( *\)kubernetes_sd_configs:$/\1static_configs:/; s/^\( *\)- role: pod$/\1- targets: ["127.0.0.1:9090"]/' \
        deploy/prometheus/prometheus-kubernetes.yml >"$WORK/prometheus-kubernetes.yml"
    if grep -q kubernetes_sd_configs "$WORK/prometheus-kubernetes.yml"; then
        report FAIL "deploy/prometheus/prometheus-kubernetes.yml: kubernetes_sd_configs not in the expected shape"
    else
        check "promtool $PROMTOOL_VERSION check config deploy/prometheus/prometheus-kubernetes.yml (kubernetes_sd_configs swapped for static_configs: Debian's promtool has no Kubernetes discovery)" \
            promtool check config "$WORK/prometheus-kubernetes.yml"
    fi
else
    report SKIP "promtool check config: promtool (Debian package prometheus) is not installed and could not be"
fi

