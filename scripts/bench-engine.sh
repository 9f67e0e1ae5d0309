#!/usr/bin/env bash
# Batch-1 decode benchmark: onehead's engine against the roofline, LibTorch's kernels and
# Hugging Face transformers, on the same SantaCoder-shaped random bf16 checkpoints.
# Writes two 2-2.5 GB checkpoints to $BENCH_DIR (default /tmp/onehead-bench) on first run.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
dir=${BENCH_DIR:-/tmp/onehead-bench}
cargo build --release -p onehead-benches --bin onehead-engine-bench
./target/release/onehead-engine-bench --dir "$dir" --json "$dir/engine.json" "$@"
if ! .venv/bin/python -c 'import transformers' 2>/dev/null; then
    echo "installing transformers==5.24.0 into the torch environment, for the peer figure" >&2
    .venv/bin/pip install -q transformers==5.24.0
fi
.venv/bin/python scripts/bench_hf.py "$dir/santacoder-mqa" "$dir/santacoder-mha" --json "$dir/hf.json"
