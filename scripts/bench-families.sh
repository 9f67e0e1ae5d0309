#!/usr/bin/env bash
# Issue 22's two shapes on random bf16 checkpoints in $BENCH_DIR (default /tmp/onehead-bench,
# written on first use, 2.0 and 2.5 GB): Gemma-3-1B-shaped (multi-query, sliding layers) and
# Llama-3.2-1B-shaped (8 K/V heads).
#   1. batch-1 decode: onehead-engine-bench against the streaming-read roofline and the kernels
#      alone, the two models alternated ROUNDS times (default 2);
#   2. concurrency 32 through a router: 64 requests of 256 random prompt tokens and 128
#      generated, after a warm-up request, one worker per model, alternated likewise.
# Results: $BENCH_DIR/families/, a table at the end.
#
#   bash scripts/bench-families.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
dir=${BENCH_DIR:-/tmp/onehead-bench}
out=$dir/families
rounds=${ROUNDS:-2}
models=(gemma-3-1b llama-3.2-1b)
mkdir -p "$out"
cargo build --release --locked -p onehead-worker -p onehead-router -p onehead-loadgen -p onehead-benches --bins
bin=target/release
for m in "${models[@]}"; do $bin/onehead-engine-bench --dir "$dir" --model "$m" --write-checkpoints; done

source scripts/lib/cluster.sh
trap stop EXIT
for round in $(seq "$rounds"); do
    for m in "${models[@]}"; do
        echo "== round $round, $m, batch 1"
        $bin/onehead-engine-bench --dir "$dir" --model "$m" --json "$out/engine-$m-$round.json" | tail -1
    done
    for m in "${models[@]}"; do
        echo "== round $round, $m, concurrency 32 through the router"
        serve "$m" "$dir/$m" --kv-cache-tokens $((32 * 448))
        $bin/onehead-bench --address "$cluster_router" --disable-progress --concurrency 32 --num-prompts 64 \
            --input-len 256 --output-len 128 --seed "$round" --result-file "$out/router-$m-$round.json" \
            >"$out/router-$m-$round.txt"
        stop
    done
done

python3 - "$out" "$rounds" "${models[@]}" <<'PY'
import json, sys
out, rounds, models = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
load = lambda name: json.load(open(f"{out}/{name}.json"))
print("\nbatch 1, context 128 (medians of 40 steps)")
print("| round | model | ms/step | kernels alone ms | streaming read GB/s | roofline ms | step at GB/s |\n|---|---|---|---|---|---|---|")
for r in range(1, rounds + 1):
    for m in models:
        e = load(f"engine-{m}-{r}")
        x = e["models"][0]
        gbs = (x["weight_bytes"] + x["kv_read_bytes"]) / x["step_ms"] / 1e6
        print(f"| {r} | {m} | {x['step_ms']:.1f} | {x['kernel_ms']:.1f} | {e['stream_read_gbs']:.1f} | {x['roofline_ms']:.1f} | {gbs:.1f} |")
print("\nconcurrency 32 through the router, 64 requests of 256 + 128 tokens")
print("| round | model | output tok/s | median TTFT ms | median TPOT ms | duration s | failed |\n|---|---|---|---|---|---|---|")
for r in range(1, rounds + 1):
    for m in models:
        b = load(f"router-{m}-{r}")
        print(f"| {r} | {m} | {b['output_throughput']:.1f} | {b['median_ttft_ms']:.0f} | {b.get('median_tpot_ms', float('nan')):.1f} | {b['duration']:.1f} | {b['failed']} |")
PY
