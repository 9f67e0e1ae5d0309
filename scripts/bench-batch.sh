#!/usr/bin/env bash
# Continuous-batching benchmark: throughput at concurrency 1, 8, 32, and MQA against MHA at
# batch 8, context ~2048, on SantaCoder-shaped random bf16 checkpoints in $BENCH_DIR.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
dir=${BENCH_DIR:-/tmp/onehead-bench}
cargo build --release --locked -p onehead-benches --bin onehead-batch-bench
./target/release/onehead-batch-bench --dir "$dir" --json "$dir/batch.json" "$@"
