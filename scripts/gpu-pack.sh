#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs (release binaries, the parity test binary and its
# fixtures) into gpu-pack/ (git-ignored), to carry to a GPU machine.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
cargo build --release --locked -p onehead-worker -p onehead-benches --bins
parity=$(cargo test --release --locked -p onehead-engine --test parity --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == "parity"][-1])')
rm -rf gpu-pack
mkdir -p gpu-pack/tests
cp target/release/onehead-worker target/release/onehead-engine-bench gpu-pack/
cp "$parity" gpu-pack/parity
cp -r tests/fixtures gpu-pack/tests/
# Without symbols the pack fits a 64 MiB transfer.
strip gpu-pack/onehead-worker gpu-pack/onehead-engine-bench gpu-pack/parity
echo "gpu-pack/: $(du -sh gpu-pack | cut -f1)"
