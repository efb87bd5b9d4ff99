# shellcheck shell=bash
# Runs semantic.py and folds its PASS/FAIL/SKIP lines into the counts.

# --- semantic checks ----------------------------------------------------------------------------

# Everything a schema cannot say: the security-relevant settings of every proxy, the Kubernetes
# workloads' probes and hardening, and that names refer to things that exist.
SEMANTIC_OUT=$WORK/semantic.out
set +e
"$LINT_PY" "$VALIDATE_DIR/semantic.py" "$ROOT" "$WORK" "${K8S_VERSIONS[@]}" >"$SEMANTIC_OUT" 2>&1
SEMANTIC_RC=$?
set -e
cat "$SEMANTIC_OUT"
while read -r status _; do
    case $status in
        PASS) PASSED=$((PASSED + 1)) ;;
        FAIL) FAILED=$((FAILED + 1)) ;;
        SKIP) SKIPPED=$((SKIPPED + 1)) ;;
    esac
done <"$SEMANTIC_OUT"
if [[ $SEMANTIC_RC -ne 0 ]]; then
    report FAIL "semantic checks stopped early (exit $SEMANTIC_RC; traceback above)"
fi

