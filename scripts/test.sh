#!/usr/bin/env bash
# The test command: sets up LibTorch if needed, then runs every test of the workspace.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
cargo test --workspace --locked "$@"
