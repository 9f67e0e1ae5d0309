#!/usr/bin/env bash
# The one GPU check: everything onehead claims about CUDA, run in one go from binaries that
# scripts/gpu-pack.sh built elsewhere (nothing builds here), on a machine with an NVIDIA GPU, no
# network, and torch 2.11.0 for its python3, whose LibTorch and NCCL the binaries then use. Made
# for one call of the device tool, under ten minutes on an H200:
#
#   scripts/gpu-check.sh [--device cuda|cpu] [PACK_DIR]     (PACK_DIR default: gpu-pack)
#
# `--device cpu` is the dry run: the same sections on the CPU with small sizes (one to two
# minutes on two cores); scripts/test.sh runs it in CI on the debug pack, so the script
# is known to work before a GPU session spends its minutes on it.
#
# Each section runs under `timeout`, within an overall budget (GPU_CHECK_SECS, default 480 s on
# cuda, 420 on cpu): a section that would start past it is NOT RUN, and one that is cut off is
# TIMEOUT. A failing section does not stop the next.
#
# Output, under $OUT (default /tmp/onehead-gpu-check), seven files, within the eight the device
# tool brings back; summary.md is rewritten after every section, so a run cut off still returns
# the rows it finished:
#   summary.md   the machine and the pack, then the table below (also printed at the end)
#   parity.log   the parity test binary on the device (three runs), then `onehead-worker generate`
#   nccl.log     parallel::nccl's one-rank test
#   serve.log    worker/tests/serve.rs batched_equals_alone_* against the packed onehead-worker
#   decode.log   onehead-engine-bench (batch 1) and onehead-batch-bench (batch 32)
#   decode.json  {"device", "bandwidth_gbs", "engine": engine-bench's --json, "batch": batch-bench's}
#   kvpool.log   two `onehead-worker serve` starts: the KV pool each sized from free memory
#
# The table, `| check | result | figure | comparison |`, one row each:
#   parity f32: TP 1                         engine/tests/parity.rs's reference tests (greedy,
#                                            full forward, chunked prefill) on the device: TP 1
#                                            on one GPU (on cpu TP 1-4, as threads)
#   parity f32: greedy, TP 1-3 on one device the greedy ones with every shard on cuda:0
#                                            (ONEHEAD_TEST_SHARDS_ON_ONE_DEVICE=1)
#        both: ids equal, logprobs within 1e-4 of the f32 reference (transformers, CPU)
#   parity binary: its other tests           the rest of parity.rs, shards on one device
#   parity bf16: generate, TP 1-3            `onehead-worker generate --dtype bf16` on mqa_bf16
#                                            and falcon_gqa_hd32: ids equal, logprobs within
#                                            0.1 + 0.05 |reference|
#   NCCL: one rank                           PASS on cuda; SKIP on cpu (needs a GPU)
#   batched == alone: worker serve           a real `onehead-worker serve --device ...`: 12
#                                            staggered requests each equal to the model alone
#   decode batch 1, MQA|MHA, context C       ms/step (median), against the roofline: the
#   decode batch 32, MQA|MHA, context C      weights + the K/V bytes a step reads, over the
#                                            measured bandwidth (a device-to-device copy on cuda,
#                                            the streaming read on cpu), and the fraction reached.
#                                            The SantaCoder shape in bf16 on cuda, C = 128 and
#                                            2048; its smoke shape on cpu, C = 32 and 256
#   batching: 32 concurrent requests         generated tokens/s through the engine's scheduler
#   (a benchmark that fails gives one FAIL row, "decode batch 1 (onehead-engine-bench)" or
#   "decode batch 32 (onehead-batch-bench)", with its last line)
#   KV pool: TP 1 | TP 2 on one device       the auto pool in tokens per shard, against what the
#                                            printed free memory allows (less a tenth, at least
#                                            1 GiB, split between the device's shards)
# result: PASS, FAIL, TIMEOUT, NOT RUN (out of budget), or SKIP. Decode and batching rows are
# measurements: they pass when the benchmark ran. Exits 1 unless every row is PASS or SKIP.
#
#   OUT               where the files go
#   GPU_CHECK_SECS    the overall budget in seconds
#   PYTHON            the python whose torch provides LibTorch and NCCL (default python3; on cpu
#                     the repo's .venv when there, else the binaries' own rpath)
#   ONEHEAD_BENCH_DIR the benchmarks' random checkpoints (default /tmp/onehead-bench, reused)
set -uo pipefail

device=cuda
pack=
while (($#)); do
    case $1 in
        --device) device=${2:-}; shift 2 || exit 2 ;;
        --device=*) device=${1#--device=}; shift ;;
        -h | --help) sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        -*) echo "usage: scripts/gpu-check.sh [--device cuda|cpu] [PACK_DIR]" >&2; exit 2 ;;
        *) pack=$1; shift ;;
    esac
done
[[ $device == cuda || $device == cpu ]] || { echo "gpu-check: --device cuda or cpu, not '$device'" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pack=${pack:-$repo/gpu-pack}
for f in onehead-worker onehead-engine-bench onehead-batch-bench parity engine-lib serve tests/fixtures BUILD; do
    [[ -e $pack/$f ]] || { echo "gpu-check: $pack/$f is missing: run scripts/gpu-pack.sh" >&2; exit 2; }
done
pack=$(cd "$pack" && pwd)
out=${OUT:-/tmp/onehead-gpu-check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/{summary.md,parity.log,nccl.log,serve.log,decode.log,decode.json,kvpool.log}
work=$(mktemp -d "${TMPDIR:-/tmp}/onehead-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
: >"$work/rows"
export NO_COLOR=1
started=$SECONDS
end=$((SECONDS + ${GPU_CHECK_SECS:-$([[ $device == cuda ]] && echo 480 || echo 420)}))
bench_dir=${ONEHEAD_BENCH_DIR:-/tmp/onehead-bench}
fixtures=$pack/tests/fixtures

# The table, rewritten into summary.md after every row.
render() {
    {
        echo "# onehead GPU check, --device $device ($((SECONDS - started)) s so far)"
        echo
        cat "$work/header"
        echo
        echo "| check | result | figure | comparison |"
        echo "|---|---|---|---|"
        while IFS=$'\t' read -r check result figure comparison; do
            echo "| $check | $result | $figure | $comparison |"
        done <"$work/rows"
    } >"$out/summary.md"
}

# row CHECK RESULT FIGURE COMPARISON
row() {
    local cells=("${@//|/\\|}")
    printf '%s\t%s\t%s\t%s\n' "${cells[@]//$'\t'/ }" >>"$work/rows"
    render
    echo "== $1: $2 - $3"
}

# The seconds a section may take: WANT, or what the budget has left (keeping 15 s for the end).
limit() {
    local left=$((end - SECONDS - 15))
    echo $((left < $1 ? left : $1))
}

# run SECS LOG CMD...: CMD under `timeout`, printed as it goes and appended to LOG (its output
# alone also in $work/last); returns CMD's status (124 or 137: cut off).
run() {
    local secs=$1 log=$2 rc
    shift 2
    echo "\$ $*" | tee -a "$log"
    if ((secs <= 0)); then
        echo "(not run: out of budget)" | tee -a "$log" "$work/last"
        return 125
    fi
    timeout --kill-after=10 "$secs" "$@" 2>&1 | tee "$work/last"
    rc=${PIPESTATUS[0]}
    cat "$work/last" >>"$log"
    echo "(exit $rc)" >>"$log"
    return "$rc"
}

# verdict RC: the result column for a command's status.
verdict() {
    case $1 in
        0) echo PASS ;;
        124 | 137) echo TIMEOUT ;;
        125) echo "NOT RUN" ;;
        *) echo FAIL ;;
    esac
}

# libtest's counts in $work/last, and the first failure with its message.
# The line of $work/last that says why a binary failed: anyhow's `Error: ...`, a panic's message,
# or the worker's `onehead-worker: ...`; else the last line.
failure_line() {
    local line
    line=$(grep -m1 -E '^(Error: |onehead-worker: )' "$work/last")
    [[ -n $line ]] || line=$(grep -m1 -A1 'panicked at' "$work/last" | sed -n 2p)
    [[ -n $line ]] || line=$(grep -v '^\s*$' "$work/last" | tail -1)
    echo "${line:0:160}"
}

tests_figure() {
    local passed failed first why
    passed=$(grep -E '^test result:' "$work/last" | grep -oE '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')
    failed=$(grep -E '^test result:' "$work/last" | grep -oE '[0-9]+ failed' | awk '{s += $1} END {print s + 0}')
    echo -n "$passed passed, $failed failed"
    first=$(grep -oE '^test [^ ]+ \.\.\. FAILED' "$work/last" | head -1 | cut -d' ' -f2)
    if [[ -n $first ]]; then
        why=$(grep -A1 -E "^thread '$first'.* panicked at" "$work/last" | sed -n 2p | cut -c1-160)
        echo -n "; first: $first: $why"
    fi
    echo
}

# tests_result RC: the result column for a libtest run in $work/last: PASS needs a test that passed.
tests_result() {
    local passed
    passed=$(grep -E '^test result:' "$work/last" | grep -oE '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')
    if [[ $1 == 0 && $passed == 0 ]]; then
        echo FAIL
    else
        verdict "$1"
    fi
}

# --- The machine, and the LibTorch the binaries load ------------------------------------------
python=${PYTHON:-python3}
if [[ -z ${PYTHON:-} && $device == cpu && -x $repo/.venv/bin/python ]]; then
    python=$repo/.venv/bin/python
fi
{
    echo "- pack: $(tr '\n' ';' <"$pack/BUILD" | sed 's/;$//; s/;/; /g')"
    echo "- run: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), budget $((end - SECONDS)) s"
} >"$work/header"
if torch=$("$python" -c 'import os, torch; d = os.path.dirname(torch.__file__); print(d); print(torch.__version__, torch.version.cuda)' 2>/dev/null); then
    torch_dir=$(sed -n 1p <<<"$torch")
    nccl_dir=$(dirname "$torch_dir")/nvidia/nccl/lib
    libs=$torch_dir/lib
    # The wheel ships libnccl.so.2 only, and cudarc opens libnccl.so: link it where we may write.
    if [[ -f $nccl_dir/libnccl.so.2 ]]; then
        mkdir -p "$work/nccl"
        ln -s "$nccl_dir/libnccl.so.2" "$work/nccl/libnccl.so"
        libs=$work/nccl:$libs:$nccl_dir
    fi
    # The binaries' rpath names the build machine's torch; this machine's comes first.
    export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "- torch $(sed -n 2p <<<"$torch") from $torch_dir$([[ -d $work/nccl ]] && echo ", NCCL from $nccl_dir")" >>"$work/header"
else
    echo "- no torch for $python: the binaries use the LibTorch of their rpath" >>"$work/header"
fi
if [[ $device == cuda ]]; then
    gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
    gpu=${gpu:-"nvidia-smi gave nothing"}
    echo "- GPU: $gpu" >>"$work/header"
else
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores" >>"$work/header"
    echo "- the dry run: small shapes and few steps, so its figures show only that each section runs" >>"$work/header"
fi
render
cat "$work/header"

# --- Parity, f32: engine/tests/parity.rs on the device ------------------------------------------
# Three runs of the one binary: the fixtures' reference tests as they run on one GPU (TP 1), the
# greedy ones again with every shard on that GPU (TP 1-3), and the binary's other tests (batched
# decodes, shard shapes, bf16 kernels; TP up to 4) likewise. On the CPU the shards are threads
# and the first run already goes up to TP 4.
log=$out/parity.log
test_threads=$([[ $device == cuda ]] && echo 4 || echo 2)
parity=(env ONEHEAD_FIXTURES="$fixtures" ONEHEAD_TEST_DEVICE="$device" ONEHEAD_SKIPPED="$work/skipped.parity")
reference="ids equal, logprobs within 1e-4 of the f32 reference (transformers, CPU)"
run "$(limit 120)" "$log" "${parity[@]}" "$pack/parity" matches_reference --test-threads "$test_threads"
rc=$?
row "parity f32: TP 1" "$(tests_result $rc)" "$(tests_figure)" \
    "$reference: greedy, full forward, chunked prefill$([[ $device == cpu ]] && echo "; TP 1-4 as threads")"
run "$(limit 120)" "$log" "${parity[@]}" ONEHEAD_TEST_SHARDS_ON_ONE_DEVICE=1 "$pack/parity" \
    greedy_matches_reference --test-threads "$test_threads"
rc=$?
row "parity f32: greedy, TP 1-3 on one device" "$(tests_result $rc)" "$(tests_figure)" \
    "$reference; every shard on $device, exchanging through host memory$([[ $device == cpu ]] && echo " (TP 1-4 as threads)")"
run "$(limit 120)" "$log" "${parity[@]}" ONEHEAD_TEST_SHARDS_ON_ONE_DEVICE=1 "$pack/parity" \
    --skip matches_reference --test-threads "$test_threads"
rc=$?
row "parity binary: its other tests" "$(tests_result $rc)" "$(tests_figure)" \
    "decodes batched == alone (1e-4), shard shapes, bf16 against f32; TP up to 4 on one device"

# --- Parity, bf16: the worker's own generate, as served ---------------------------------------
# mqa_hd32_bf16 is left out: its greedy path meets a near-tie at step 8 that bf16 resolves the
# other way (on the CPU too), after which the ids cannot be compared.
bf16_runs=()
for fixture in mqa_bf16 falcon_gqa_hd32; do
    prompt=$(python3 -c 'import json, sys; print(",".join(map(str, json.load(open(sys.argv[1]))["prompt_ids"])))' \
        "$fixtures/$fixture/reference.json")
    for tp in 1 2 3; do
        flags=(--model "$fixtures/$fixture" --dtype bf16 --device "$device" --tp "$tp")
        ((tp > 1)) && flags+=(--shards-on-one-device)
        run "$(limit 60)" "$log" "$pack/onehead-worker" generate "${flags[@]}" --prompt-ids "$prompt" \
            --max-new-tokens 20 --ignore-eos --json
        rc=$?
        grep '^{' "$work/last" | tail -1 >"$work/gen-$fixture-$tp.json"
        bf16_runs+=("$fixture" "$tp" "$rc")
    done
done
bf16=$(python3 - "$fixtures" "$work" "${bf16_runs[@]}" 2>>"$log" <<'EOF'
import json, sys
fixtures, work, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
ok = total = 0
worst = (0.0, 0.0)  # (|diff|, |diff| / tolerance)
notes = []
for fixture, tp, rc in zip(runs[0::3], runs[1::3], runs[2::3]):
    total += 1
    what = f"{fixture} TP {tp}"
    ref = json.load(open(f"{fixtures}/{fixture}/reference.json"))
    try:
        got = json.load(open(f"{work}/gen-{fixture}-{tp}.json"))
    except (OSError, ValueError):
        notes.append(f"{what}: no output (exit {rc})")
        continue
    if got["new_ids"] != ref["new_ids"]:
        at = next(i for i, (a, b) in enumerate(zip(got["new_ids"], ref["new_ids"] + [None])) if a != b)
        notes.append(f"{what}: ids differ from step {at}")
        continue
    diffs = [(abs(a - e), abs(a - e) / (0.1 + 0.05 * abs(e))) for a, e in zip(got["logprobs"], ref["logprobs"])]
    d = max(diffs, key=lambda x: x[1])
    worst = max(worst, d, key=lambda x: x[1])
    if d[1] > 1:
        notes.append(f"{what}: logprob off by {d[0]:.3f}")
        continue
    ok += 1
print("PASS" if ok == total else "FAIL")
figure = f"{ok}/{total} runs: ids equal, max logprob diff {worst[0]:.3f} ({worst[1]:.2f} of the tolerance)"
print(figure + ("; " + "; ".join(notes[:3]) if notes else ""))
EOF
)
[[ -n $bf16 ]] || bf16=$'FAIL\nthe comparison itself failed (see parity.log)'
echo "$bf16" >>"$log"
row "parity bf16: generate, TP 1-3 on one device" "$(sed -n 1p <<<"$bf16")" "$(sed -n 2p <<<"$bf16")" \
    "mqa_bf16 and falcon_gqa_hd32; ids equal, logprobs within 0.1 + 0.05 x reference"

# --- NCCL: one rank through the real library ---------------------------------------------------
log=$out/nccl.log
run "$(limit 60)" "$log" env ONEHEAD_SKIPPED="$work/skipped.nccl" "$pack/engine-lib" \
    parallel::nccl::tests::one_rank_collectives_through_the_real_library --exact
rc=$?
result=$(tests_result $rc)
figure=$(tests_figure)
if [[ $result == PASS && -s $work/skipped.nccl ]]; then
    why=$(sed 's/^[^:]*: //' "$work/skipped.nccl" | head -1)
    if [[ $device == cpu ]]; then
        result=SKIP figure="skipped on cpu ($why)"
    else
        result=FAIL figure="skipped on cuda: $why"
    fi
fi
row "NCCL: one rank" "$result" "$figure" "all_reduce and broadcast in f32, bf16, f16; all_gather; a poisoned group refuses"

# --- Batched serving equals each request alone, through a real worker --------------------------
log=$out/serve.log
# worker/tests/serve.rs finds the fixtures under the build machine's repository (a path compiled
# in); where that path is missing here, it is made to point at the pack's fixtures.
build_root=$(sed -n 's/^build root: //p' "$pack/BUILD")
if [[ -n $build_root && ! -e $build_root/tests/fixtures ]]; then
    if mkdir -p "$build_root/worker" "$build_root/tests" 2>/dev/null && ln -s "$fixtures" "$build_root/tests/fixtures"; then
        echo "linked $build_root/tests/fixtures to $fixtures" | tee -a "$log"
    else
        echo "could not link $build_root/tests/fixtures: the serve tests will not find their fixtures" | tee -a "$log"
    fi
fi
if [[ $device == cuda ]]; then
    serve_tests=(batched_equals_alone --test-threads 3)
    which="every batched_equals_alone test (its fixture and TP; TP > 1 on one device)"
else
    # The dry run checks the path; cargo test has run all six on the CPU already.
    serve_tests=(batched_equals_alone_mqa_tp2 --exact --test-threads 1)
    which="one fixture at TP 2 (the dry run)"
fi
run "$(limit 180)" "$log" env ONEHEAD_BIN_DIR="$pack" ONEHEAD_TEST_DEVICE="$device" ONEHEAD_TEST_SHARDS_ON_ONE_DEVICE=1 \
    ONEHEAD_SKIPPED="$work/skipped.serve" "$pack/serve" "${serve_tests[@]}"
rc=$?
row "batched == alone: worker serve --device $device" "$(tests_result $rc)" "$(tests_figure)" \
    "$which; 12 staggered requests, ids equal and logprobs within 1e-4 of the model alone, at least 3 in one step"

# --- Decode: batch 1 and batch 32 of the SantaCoder shape against the roofline -----------------
log=$out/decode.log
if [[ $device == cuda ]]; then
    size=()
    engine_args=(--device cuda --stream-gib 4 --steps 100)
    batch_args=(--device cuda --concurrency 1,32 --compare-batch 32 --compare-context 2048 --compare-steps 20)
    ckpt=$bench_dir/santacoder-mqa
else
    size=(--smoke)
    engine_args=(--device cpu --stream-gib 0.25 --steps 5 --context 32)
    batch_args=(--device cpu --concurrency 1,32 --prompt-tokens 16 --new-tokens 8 --compare-batch 32
        --compare-context 256 --compare-steps 4)
    ckpt=$bench_dir/santacoder-mqa-smoke
fi
# --kernel-layers 24 is every layer of the shape (the default, None, overflows a multiplication
# in engine_bench.rs's KernelPass::load, which panics in the debug build of the CPU dry run).
run "$(limit 200)" "$log" "$pack/onehead-engine-bench" --dir "$bench_dir" "${size[@]}" "${engine_args[@]}" \
    --kernel-layers 24 --json "$work/engine.json"
engine_rc=$?
engine_tail=$(failure_line)
# The same with --quantize int8 (issue 24): its row is missing if it fails (see decode.log).
run "$(limit 120)" "$log" "$pack/onehead-engine-bench" --dir "$bench_dir" "${size[@]}" "${engine_args[@]}" \
    --kernel-layers 24 --quantize int8 --json "$work/engine-int8.json"
run "$(limit 150)" "$log" "$pack/onehead-batch-bench" --dir "$bench_dir" "${size[@]}" "${batch_args[@]}" \
    --json "$work/batch.json"
batch_rc=$?
batch_tail=$(failure_line)
python3 - "$device" "$work" "$out/decode.json" >"$work/decode.rows" 2>>"$log" <<'EOF'
import json, sys
device, work, out = sys.argv[1:]
def load(name):
    try:
        return json.load(open(f"{work}/{name}.json"))
    except (OSError, ValueError):
        return None
engine, batch, int8 = load("engine"), load("batch"), load("engine-int8")
gbs = engine and engine["stream_read_gbs"]
json.dump({"device": device, "bandwidth_gbs": gbs, "engine": engine, "batch": batch, "engine_int8": int8},
          open(out, "w"), indent=2)
how = "device copy" if device == "cuda" else "streaming read"
def rows(check, ms, weight_bytes, kv_bytes, extra=""):
    if not gbs:
        return print(f"{check}\tPASS\t{ms:.2f} ms/step\tno bandwidth measured (engine bench failed){extra}")
    roof = (weight_bytes + kv_bytes) / gbs / 1e6
    print(f"{check}\tPASS\t{ms:.2f} ms/step\troofline {roof:.2f} ms ({weight_bytes / 1e9:.3f} GB weights + "
          f"{kv_bytes / 1e6:.1f} MB KV at {gbs:.3g} GB/s, {how}): {roof / ms:.0%} of it{extra}")
if engine:
    for m in engine["models"]:
        rows(f"decode batch 1, {m['model'].upper()}, context {engine['context']}", m["step_ms"],
             m["weight_bytes"], m["kv_read_bytes"])
for m in (int8 or {}).get("models", []):
    rows(f"decode batch 1, {m['model'].upper()}, int8 weights", m["step_ms"], m["weight_bytes"], m["kv_read_bytes"])
if batch:
    c = batch["compare"]
    # The comparison's bytes: the model's weights plus every cached K/V byte once; the split
    # comes from the engine bench, which loaded the same checkpoints.
    weights = {m["model"]: m["weight_bytes"] for m in engine["models"]} if engine else {}
    for name in ("mqa", "mha"):
        extra = ""
        if name == "mha":
            extra = f"; MHA/MQA {c['measured_ratio']:.2f}x measured, {c['predicted_ratio']:.2f}x in bytes"
        if name in weights:
            rows(f"decode batch {c['batch']}, {name.upper()}, context {c['context']}", c[f"{name}_ms"],
                 weights[name], c[f"{name}_bytes"] - weights[name], extra)
        else:
            print(f"decode batch {c['batch']}, {name.upper()}, context {c['context']}\tPASS\t{c[name + '_ms']:.2f} ms/step\t"
                  f"{c[name + '_bytes'] / 1e9:.3f} GB a step; no bandwidth measured{extra}")
    runs = {r["concurrency"]: r for r in batch["throughput"]}
    top = runs[max(runs)]
    base = runs[min(runs)]
    print(f"batching: {top['concurrency']} concurrent requests\tPASS\t{top['tokens_per_sec']:.0f} generated tokens/s, "
          f"{top['decode_step_ms']:.2f} ms/decode step\t{base['concurrency']} request: {base['tokens_per_sec']:.0f} tokens/s, "
          f"{base['decode_step_ms']:.2f} ms/step")
EOF
if (($? != 0)); then
    row "decode: the benchmarks' results" FAIL "could not read engine.json or batch.json" "see decode.log"
fi
if ((engine_rc != 0)); then
    row "decode batch 1 (onehead-engine-bench)" "$(verdict $engine_rc)" "$engine_tail" "see decode.log"
fi
if ((batch_rc != 0)); then
    row "decode batch 32 (onehead-batch-bench)" "$(verdict $batch_rc)" "$batch_tail" "see decode.log"
fi
while IFS=$'\t' read -r check result figure comparison; do
    row "$check" "$result" "$figure" "$comparison"
done <"$work/decode.rows"

# --- The KV pool sized from free memory ---------------------------------------------------------
log=$out/kvpool.log
# A batch that cannot fit, so that on cuda the memory decides: 8192 x 2048 tokens of 12 KiB
# is 192 GiB. On cpu the host budget (half of MemAvailable) is far above the small one asked.
max_batch=$([[ $device == cuda ]] && echo 8192 || echo 64)
run "$(limit 120)" "$log" "$pack/onehead-engine-bench" --dir "$bench_dir" "${size[@]}" --write-checkpoints
for tp in 1 2; do
    check="KV pool: TP $tp$( ((tp > 1)) && echo " on one device")"
    secs=$(limit 90)
    if ((secs <= 0)); then
        row "$check" "NOT RUN" "out of budget" ""
        continue
    fi
    flags=(--model "$ckpt" --dtype bf16 --device "$device" --tp "$tp" --listen 127.0.0.1:0
        --metrics-listen 127.0.0.1:0 --max-batch-size "$max_batch" --max-step-tokens "$max_batch"
        --shutdown-grace-secs 1)
    ((tp > 1)) && flags+=(--shards-on-one-device)
    echo "\$ $pack/onehead-worker serve ${flags[*]}" | tee -a "$log"
    "$pack/onehead-worker" serve "${flags[@]}" >"$work/kv.out" 2>&1 &
    pid=$!
    # Ready once the engine allocated the pool and ran its warm-up step: the capacity gauge is set.
    ready=0 deadline=$((SECONDS + secs))
    while ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null; do
        metrics=$(sed -n 's|^metrics on \(http://.*\)$|\1|p' "$work/kv.out")
        if [[ -n $metrics ]] && python3 -c 'import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=2).read().decode()
sys.exit(not any(l.startswith("onehead_kv_cache_capacity_tokens ") and float(l.split()[1]) > 0 for l in text.splitlines()))' \
            "$metrics" 2>/dev/null; then
            ready=1
            break
        fi
        sleep 1
    done
    host_available=$(($(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) * 1024))
    used=""
    if [[ $device == cuda ]]; then
        used=$(nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader 2>/dev/null | head -1)
        echo "nvidia-smi while serving: ${used:-nothing}" >>"$log"
    fi
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    cat "$work/kv.out" | tee -a "$log"
    kv=$(python3 - "$work/kv.out" "$ckpt/config.json" "$ready" "$max_batch" "$host_available" "$used" 2>>"$log" <<'EOF'
import json, re, sys
path, config, ready, max_batch, host_available, used = sys.argv[1:]
text = open(path).read()
pool = re.search(r"KV pool per shard: (\d+) tokens, ([\d.]+) MiB \((\d+) bytes a token", text)
devices = re.findall(r"cuda:(\d+): ([\d.]+) GiB free of ([\d.]+) GiB after the weights, for (\d+) shard", text)
if not pool:
    lines = [l for l in text.splitlines() if l.strip()] or ["no output"]
    why = next((l for l in lines if l.startswith("onehead-worker: ")), lines[-1])
    sys.exit(print(f"FAIL\nno KV pool line; {why[:140]}\n"))
tokens, mib, per_token = int(pool[1]), float(pool[2]), int(pool[3])
gib = 2**30
# What the worker's auto pool should be: max-batch-size full contexts, capped by the budget.
asked = int(max_batch) * json.load(open(config))["n_positions"]
if devices:
    # worker/src/serve.rs: free less a tenth of the device (at least 1 GiB), split between its shards.
    budget = min((float(free) - max(float(total) / 10, 1.0)) / int(s) for _, free, total, s in devices)
    where = "; ".join(f"cuda:{i} {free} of {total} GiB free after the weights, {s} shard(s)" for i, free, total, s in devices)
else:
    budget = int(host_available) / 2 / gib
    where = f"host: half of {int(host_available) / gib:.1f} GiB available"
allowed = int(budget * gib / per_token)
expected = min(asked, allowed)
decides = "memory" if allowed < asked else "the batch asked"
# The printed GiB are rounded to 0.1, and host memory moves: 1% either way.
ok = ready == "1" and abs(tokens - expected) <= 0.01 * expected
figure = f"{tokens} tokens a shard ({mib / 1024:.2f} GiB, {per_token} B a token)" + (f"; nvidia-smi: {used} used" if used else "")
comparison = (f"{where}: {budget:.1f} GiB a shard = {allowed} tokens; asked {max_batch} x {asked // int(max_batch)} = {asked}; "
              f"{decides} decides" + ("" if ready == "1" else "; the worker never became ready"))
print("PASS" if ok else "FAIL"); print(figure); print(comparison)
EOF
)
    [[ -n $kv ]] || kv=$'FAIL\nthe worker\'s output could not be read (see kvpool.log)'
    row "$check" "$(sed -n 1p <<<"$kv")" "$(sed -n 2p <<<"$kv")" "$(sed -n 3p <<<"$kv")"
done

# --- The end ------------------------------------------------------------------------------------
render
echo
cat "$out/summary.md"
echo
echo "gpu-check: $((SECONDS - started)) s; files in $out: $(cd "$out" && ls | tr '\n' ' ')"
# Anything but PASS and SKIP fails the run (an empty result too: a section that broke itself).
! cut -f2 "$work/rows" | grep -qvE '^(PASS|SKIP)$'
