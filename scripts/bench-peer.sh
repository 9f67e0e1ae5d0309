#!/usr/bin/env bash
# onehead against Hugging Face transformers on the same machine, checkpoint and prompts
# (issue 8): 32 requests of 256 random prompt tokens generating 128 each, on the SantaCoder-shaped
# random bf16 checkpoint in $BENCH_DIR (default /tmp/onehead-bench, written on first use).
#   - transformers: one static batch of the 32 with its KV cache (scripts/bench_hf_serving.py);
#   - onehead: a worker and a router on 127.0.0.1, driven by onehead-bench at concurrency 1
#     (4 requests), 8 and 32 (the 32 requests);
#   - an f32 spot check: the greedy ids of 4 prompts (16 tokens) from both must be equal.
#   - onehead's engine in process (onehead-batch-bench), for the same shape without gRPC.
# The machine's speed drifts by up to 2.5x within an hour (docs/benchmarks-history.md), so each transformers
# run sits between two onehead runs at concurrency 32 (c32-1, c32-2, c32-3), and its ratio is
# taken against their mean. Takes 15-30 minutes on a 2-core machine. Results: $BENCH_DIR/peer/.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
if ! .venv/bin/python -c 'import transformers' 2>/dev/null; then
    .venv/bin/pip install -q transformers==5.24.0
fi
dir=${BENCH_DIR:-/tmp/onehead-bench}
out=$dir/peer
mkdir -p "$out"
cargo build --release --locked -p onehead-worker -p onehead-router -p onehead-loadgen --bins
bin=target/release
$bin/onehead-engine-bench --dir "$dir" --write-checkpoints
ckpt=$dir/santacoder-mqa
# The shared prompt set: token ids, so that no tokenizer stands between the two.
.venv/bin/python - "$out" <<'PY'
import json, random, sys
rng = random.Random(8)
def write(name, n, prompt_len, output_len):
    with open(f"{sys.argv[1]}/{name}", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt_ids": [rng.randrange(49280) for _ in range(prompt_len)],
                                "output_len": output_len}) + "\n")
write("prompts.jsonl", 32, 256, 128)
PY
head -4 "$out/prompts.jsonl" | sed 's/"output_len": 128/"output_len": 16/' > "$out/spot.jsonl"

stop() {  # stops the worker and router, if running
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
}
trap stop EXIT
serve() {  # serve DTYPE: a worker and a router, returns once the router answers
    stop
    $bin/onehead-worker serve --model "$ckpt" --dtype "$1" --listen 127.0.0.1:50161 --max-batch-size 32 \
        --kv-cache-tokens $((32 * 400)) >"$out/worker-$1.log" 2>&1 &
    $bin/onehead-router --listen 127.0.0.1:8191 --worker http://127.0.0.1:50161 >"$out/router-$1.log" 2>&1 &
    for _ in $(seq 240); do
        if $bin/onehead-router client --addr http://127.0.0.1:8191 info >/dev/null 2>&1; then return; fi
        sleep 0.5
    done
    echo "the cluster did not come up in 2 minutes; see $out/worker-$1.log and $out/router-$1.log" >&2
    exit 1
}
bench() {  # bench NAME ARGS...
    local name=$1
    shift
    $bin/onehead-bench --address http://127.0.0.1:8191 --disable-progress --result-file "$out/$name.json" "$@" \
        | tee "$out/$name.txt"
}
echo "== onehead's engine in process (no gRPC), the same workload shape"
$bin/onehead-batch-bench --dir "$dir" --concurrency 32 --prompt-tokens 256 --new-tokens 128 --compare-steps 1 \
    | tee "$out/engine.txt"
echo "== onehead, f32 spot check"
serve f32
bench spot-f32 --dataset "$out/spot.jsonl" --concurrency 4 --warmup-requests 0
echo "== onehead, bf16"
serve bf16
bench c1 --dataset "$out/prompts.jsonl" --num-prompts 4 --concurrency 1
bench c8 --dataset "$out/prompts.jsonl" --concurrency 8
bench c32-1 --dataset "$out/prompts.jsonl" --concurrency 32
stop
echo "== transformers"
.venv/bin/python scripts/bench_hf_serving.py "$ckpt" "$out/prompts.jsonl" --spot-check 4 --json "$out/hf.json"
echo "== onehead, bf16, again"
serve bf16
bench c32-2 --dataset "$out/prompts.jsonl" --concurrency 32
stop
# Its eager attention path (K/V repeated for every head), where the issue's figure comes from.
echo "== transformers, eager attention"
.venv/bin/python scripts/bench_hf_serving.py "$ckpt" "$out/prompts.jsonl" --attn-implementation eager \
    --json "$out/hf-eager.json"
echo "== onehead, bf16, again"
serve bf16
bench c32-3 --dataset "$out/prompts.jsonl" --concurrency 32
stop

.venv/bin/python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
hf = json.load(open(f"{out}/hf.json"))
spot = json.load(open(f"{out}/spot-f32.json"))
same = spot["output_ids"] == hf["spot_check_f32_ids"]
print(f"\nf32 spot check, 4 prompts x 16 greedy tokens: {'identical' if same else 'DIFFERENT'}")
if not same:
    print("onehead:", spot["output_ids"], "\ntransformers:", hf["spot_check_f32_ids"])
print(f"\n| system | concurrency | requests | generated tok/s | decode ms/step (TPOT median) | end to end s |")
print("|---|---|---|---|---|---|")
print(f"| transformers (static batch) | 32 | 32 | {hf['generated_tokens_per_s']:.1f} | {hf['decode_step_ms_median']:.0f} | {hf['e2e_s']:.1f} |")
eager = json.load(open(f"{out}/hf-eager.json"))
print(f"| transformers, eager attention | 32 | 32 | {eager['generated_tokens_per_s']:.1f} | {eager['decode_step_ms_median']:.0f} | {eager['e2e_s']:.1f} |")
for name in ("c1", "c8", "c32-1", "c32-2", "c32-3"):
    r = json.load(open(f"{out}/{name}.json"))
    print(f"| onehead ({name}) | {r['max_concurrency']} | {r['completed']} | {r['output_throughput']:.1f} | {r['median_tpot_ms']:.0f} | {r['duration']:.1f} |")
c32 = [json.load(open(f"{out}/c32-{i}.json"))["output_throughput"] for i in (1, 2, 3)]
print()
for peer, runs, before, after in (("default", hf, c32[0], c32[1]), ("eager", eager, c32[1], c32[2])):
    tps = runs["generated_tokens_per_s"]
    print(f"onehead at concurrency 32 / transformers ({peer} attention): {(before + after) / 2 / tps:.2f}x generated "
          f"tokens/s on the mean of the runs before and after it ({before / tps:.2f}x before, {after / tps:.2f}x after)")
sys.exit(0 if same else 1)
PY
