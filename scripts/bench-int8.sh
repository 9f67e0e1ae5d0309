#!/usr/bin/env bash
# Issue 24: --quantize int8 against bf16 on the SantaCoder-shaped random checkpoint in $BENCH_DIR
# (default /tmp/onehead-bench, written on first use), alternated ROUNDS times (default 2):
#   1. batch-1 decode and a 128-token prefill: onehead-engine-bench (MQA and MHA), each way;
#   2. concurrency 32 through a router: 64 requests of 256 random prompt tokens and 128
#      generated, each way.
# Results: $BENCH_DIR/int8/, a table at the end.
#
#   bash scripts/bench-int8.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
dir=${BENCH_DIR:-/tmp/onehead-bench}
out=$dir/int8
rounds=${ROUNDS:-2}
mkdir -p "$out"
cargo build --release --locked -p onehead-worker -p onehead-router -p onehead-loadgen -p onehead-benches --bins
bin=target/release
$bin/onehead-engine-bench --dir "$dir" --write-checkpoints
source scripts/lib/cluster.sh
trap stop EXIT
flags() { [[ $1 == int8 ]] && echo --quantize int8 || true; }
for round in $(seq "$rounds"); do
    for w in bf16 int8; do
        echo "== round $round, $w, batch 1"
        # shellcheck disable=SC2046
        $bin/onehead-engine-bench --dir "$dir" --steps 30 $(flags $w) --json "$out/engine-$w-$round.json" | tail -2
    done
    for w in bf16 int8; do
        echo "== round $round, $w, concurrency 32 through the router"
        # shellcheck disable=SC2046
        serve "$w" "$dir/santacoder-mqa" --kv-cache-tokens $((32 * 448)) $(flags $w)
        $bin/onehead-bench --address "$cluster_router" --disable-progress --concurrency 32 --num-prompts 64 \
            --input-len 256 --output-len 128 --seed "$round" --result-file "$out/router-$w-$round.json" \
            >"$out/router-$w-$round.txt"
        stop
    done
done

python3 - "$out" "$rounds" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
load = lambda name: json.load(open(f"{out}/{name}.json"))
print("\nbatch 1, context 128 (medians of 30 steps), and a 128-token prefill")
print("| round | weights | model | ms/step | products alone ms | GB a step | prefill tok/s |\n|---|---|---|---|---|---|---|")
for r in range(1, rounds + 1):
    for w in ("bf16", "int8"):
        for x in load(f"engine-{w}-{r}")["models"]:
            print(f"| {r} | {w} | {x['model']} | {x['step_ms']:.1f} | {x['kernel_ms']:.1f} | {x['weight_bytes'] / 1e9:.3f} | {x['prefill_tok_s']:.0f} |")
print("\nconcurrency 32 through the router (MQA), 64 requests of 256 + 128 tokens")
print("| round | weights | output tok/s | median TTFT ms | median TPOT ms | failed |\n|---|---|---|---|---|---|")
for r in range(1, rounds + 1):
    for w in ("bf16", "int8"):
        b = load(f"router-{w}-{r}")
        print(f"| {r} | {w} | {b['output_throughput']:.1f} | {b['median_ttft_ms']:.0f} | {b.get('median_tpot_ms', float('nan')):.1f} | {b['failed']} |")
PY
