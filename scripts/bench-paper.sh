#!/usr/bin/env bash
# Shazeer's table on onehead: multi-head, grouped (4) and multi-query attention at SantaCoder's
# width and depth, batch 1/8/32, context 512/2048. Writes three 2.2-2.6 GB random checkpoints to
# $BENCH_DIR (default /tmp/onehead-bench) on first run; needs about 16 GB of memory (the
# multi-head cache at batch 32, context 2048).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
dir=${BENCH_DIR:-/tmp/onehead-bench}
cargo build --release --locked -p onehead-benches --bin onehead-paper-bench
./target/release/onehead-paper-bench --dir "$dir" --json "$dir/paper.json" "$@"
