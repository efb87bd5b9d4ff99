# shellcheck shell=bash
# knoxgate's own parser on the settings the manifests and compose file give it.

# The newest build under target/, used only when no source file is newer than it (a stale
# binary would judge the files against an older set of settings).
KNOXGATE_BIN=
for candidate in target/dist/knoxgate target/release/knoxgate target/debug/knoxgate; do
    if [[ -x $candidate && ( -z $KNOXGATE_BIN || $candidate -nt $KNOXGATE_BIN ) ]]; then
        KNOXGATE_BIN=$candidate
    fi
done
if [[ -z $KNOXGATE_BIN ]]; then
    report SKIP "knoxgate check-config of the ConfigMap, sidecar and compose settings: no knoxgate binary under target/ (build one to include this check)"
elif [[ -n $(find src Cargo.toml Cargo.lock -newer "$KNOXGATE_BIN" -print -quit) ]]; then
    report SKIP "knoxgate check-config of the ConfigMap, sidecar and compose settings: $KNOXGATE_BIN is older than src/ (rebuild to include this check)"
else
    # Each setting as the pod or container gets it: the ConfigMap's file, literal env values
    # from the manifests and compose file, and placeholders for the values of Secrets.
    "$LINT_PY" - "$WORK" <<'PY'
import os, sys, yaml
work = sys.argv[1]
cm = yaml.safe_load(open("deploy/kubernetes/configmap.yaml"))
open(os.path.join(work, "knoxgate.toml"), "w").write(cm["data"]["knoxgate.toml"])
example = yaml.safe_load(open("deploy/kubernetes/secret.example.yaml"))["stringData"]
secret = {"KNOXGATE_POSTGRES_URL": "postgres://django:x@127.0.0.1:5432/app",
          "KNOXGATE_REDIS_URL": "redis://127.0.0.1:6379/0",
          "KNOXGATE_REDIS_ENTRY_KEY": example["KNOXGATE_REDIS_ENTRY_KEY"]}

def write(name, env):
    with open(os.path.join(work, name), "w") as f:
        for k, v in env.items():
            f.write(f"{k}={v}\n")

def container_env(container):
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = secret[e["valueFrom"]["secretKeyRef"]["key"]]
    env["KNOXGATE_CONFIG"] = os.path.join(work, "knoxgate.toml")
    return env

for path, out in (("deploy/kubernetes/deployment.yaml", "env.deployment"),
                  ("deploy/kubernetes/sidecar.yaml", "env.sidecar")):
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                if "knoxgate" in c["image"] and c.get("args") == ["serve"]:
                    write(out, container_env(c))
compose = yaml.safe_load(open("docker-compose.yml"))
write("env.compose", compose["services"]["knoxgate"]["environment"])
PY
    for setting in deployment sidecar compose; do
        mapfile -t SETTING_ENV <"$WORK/env.$setting"
        check "$KNOXGATE_BIN check-config accepts the $setting settings (check-config connects nowhere)" \
            env -i PATH="$PATH" "${SETTING_ENV[@]}" "$KNOXGATE_BIN" check-config
    done
fi

