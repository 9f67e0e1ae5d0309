#!/usr/bin/env bash
# The test command: sets up LibTorch if needed, builds the binaries (the end-to-end tests in
# tests/ start them), runs every test of the workspace, checks deploy/ offline, and ends with
# one summary line.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
cargo build --workspace --bins --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
# The deployment is checked offline too (kustomize, strict schemas, hadolint).
bash scripts/validate-deploy.sh
count() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
echo "tests: $(count passed) passed, $(count failed) failed"
