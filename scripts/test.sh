#!/usr/bin/env bash
# The test command: sets up LibTorch if needed, checks formatting and lints, builds the binaries
# (the end-to-end tests in tests/ start them), runs every test of the workspace, a one-minute
# soak (scripts/soak.sh) and the GPU check's dry run on the CPU, checks deploy/ offline, and ends
# with one summary line. A test that cannot check anything on this machine (no AMX, too few GPUs)
# passes but is counted as skipped, and named.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
# The official OpenAI SDK, pinned, for tests/openai_sdk.py (the HTTP API's end-to-end test), and
# transformers, which loads back what onehead-convert writes (engine/tests/parity.rs).
.venv/bin/python -m pip install --disable-pip-version-check -q -r tests/openai-requirements.txt \
    -r scripts/reference-requirements.txt
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
log=$(mktemp)
export ONEHEAD_SKIPPED
ONEHEAD_SKIPPED=$(mktemp)
trap 'rm -f "$log" "$ONEHEAD_SKIPPED"' EXIT
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
# A one-minute soak of a router and two workers on the debug binaries built above: a failed
# request, a dead server or an unclean stop fails it; 60 s is too short to judge memory growth,
# which scripts/soak.sh reports but judges only in runs of 10 minutes or more.
SOAK_PROFILE=debug bash scripts/soak.sh 60
# The GPU check's dry run on the CPU (small sizes, a few minutes): the script a GPU session
# runs, on the debug binaries built above, so that it is known to work before a GPU sees it.
# The pack goes to a temporary folder, leaving a release gpu-pack/ made for a GPU session alone.
gpu_dry=$(mktemp -d)
trap 'rm -rf "$log" "$ONEHEAD_SKIPPED" "$gpu_dry"' EXIT
bash scripts/gpu-pack.sh --debug "$gpu_dry/pack"
OUT=$gpu_dry/out bash scripts/gpu-check.sh --device cpu "$gpu_dry/pack"
# The deployment is checked offline too (kustomize, strict schemas, hadolint).
bash scripts/validate-deploy.sh
count() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
skipped=$(sort -u "$ONEHEAD_SKIPPED" | wc -l)
if [[ $skipped -gt 0 ]]; then
    echo "skipped here (they passed without checking anything):"
    sort -u "$ONEHEAD_SKIPPED" | sed 's/^/  /'
fi
echo "tests: $(($(count passed) - skipped)) passed, $(count failed) failed, $skipped skipped"
