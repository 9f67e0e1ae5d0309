#!/usr/bin/env bash
# Prefix caching (issue 21), on the SantaCoder-shaped random bf16 checkpoint in $BENCH_DIR
# (default /tmp/onehead-bench, written on first use), a worker and a router on 127.0.0.1:
#   (a) time to first token of a request whose 1,500-token prefix is cached (a warm-up request
#       with the same prefix went first) against the same requests on a worker without prefix
#       caching: 5 requests of 1,500 shared + 16 own tokens, one at a time;
#   (b) 32 requests sharing a 1,024-token prefix (+ 64 own tokens, 64 generated) at
#       concurrency 32, after one warm-up request: throughput and TTFT, with and without.
# Each pair runs with and without prefix caching back to back, ROUNDS times (default 2),
# alternating which goes first. Results: $BENCH_DIR/prefix/, a table at the end.
#
#   bash scripts/bench-prefix.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
dir=${BENCH_DIR:-/tmp/onehead-bench}
out=$dir/prefix
rounds=${ROUNDS:-2}
mkdir -p "$out"
cargo build --release --locked -p onehead-worker -p onehead-router -p onehead-loadgen -p onehead-benches --bins
bin=target/release
$bin/onehead-engine-bench --dir "$dir" --write-checkpoints
ckpt=$dir/santacoder-mqa

stop() {  # stops the worker and router, if running
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
}
trap stop EXIT
serve() {  # serve NAME [WORKER FLAGS...]: a worker and a router; returns once the router answers
    local name=$1
    shift
    stop
    $bin/onehead-worker serve --model "$ckpt" --listen 127.0.0.1:50171 --max-batch-size 32 \
        --kv-cache-tokens $((32 * 1184)) "$@" >"$out/worker-$name.log" 2>&1 &
    $bin/onehead-router --listen 127.0.0.1:8201 --worker http://127.0.0.1:50171 >"$out/router-$name.log" 2>&1 &
    for _ in $(seq 240); do
        if $bin/onehead-router client --addr http://127.0.0.1:8201 info >/dev/null 2>&1; then return; fi
        sleep 0.5
    done
    echo "the cluster did not come up in 2 minutes; see $out/worker-$name.log" >&2
    exit 1
}
bench() {  # bench NAME ARGS...
    local name=$1
    shift
    $bin/onehead-bench --address http://127.0.0.1:8201 --disable-progress --result-file "$out/$name.json" "$@" \
        >"$out/$name.txt"
}
run() {  # run MODE ROUND: (a) and (b) on a fresh worker, prefix caching on or off
    local mode=$1 round=$2 flags=()
    [[ $mode == off ]] && flags=(--no-prefix-caching)
    echo "== round $round, prefix caching $mode"
    serve "$mode-$round" "${flags[@]}"
    bench "a-$mode-$round" --concurrency 1 --num-prompts 5 --shared-prefix-len 1500 --input-len 16 --output-len 4 --seed 1
    bench "b-$mode-$round" --concurrency 32 --num-prompts 32 --shared-prefix-len 1024 --input-len 64 --output-len 64 \
        --seed 2
    stop
}
for round in $(seq "$rounds"); do
    if ((round % 2)); then run on "$round"; run off "$round"; else run off "$round"; run on "$round"; fi
done

python3 - "$out" "$rounds" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
load = lambda name: json.load(open(f"{out}/{name}.json"))
print("\n(a) TTFT, 1,500 tokens of shared prefix + 16, one request at a time (5 requests, median ms)")
print("| round | cached | cold | cached / cold |\n|---|---|---|---|")
for r in range(1, rounds + 1):
    on, off = load(f"a-on-{r}")["median_ttft_ms"], load(f"a-off-{r}")["median_ttft_ms"]
    print(f"| {r} | {on:.0f} | {off:.0f} | {on / off:.3f} |")
print("\n(b) 32 requests sharing 1,024 tokens (+ 64 own, 64 generated), concurrency 32")
print("| round | prefix caching | output tok/s | median TTFT ms | p99 TTFT ms | duration s |\n|---|---|---|---|---|---|")
for r in range(1, rounds + 1):
    for mode in ("on", "off"):
        b = load(f"b-{mode}-{r}")
        print(f"| {r} | {mode} | {b['output_throughput']:.1f} | {b['median_ttft_ms']:.0f} | {b['p99_ttft_ms']:.0f} | {b['duration']:.1f} |")
PY
