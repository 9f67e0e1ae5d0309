#!/usr/bin/env bash
# The test command: sets up LibTorch if needed, then runs every test of the workspace.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
# The end-to-end tests (tests/) start the worker and router binaries.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
# The deployment is checked offline too (kustomize, strict schemas, hadolint).
bash scripts/validate-deploy.sh
