#!/usr/bin/env bash
# The CUDA check, in one go, on a machine with an NVIDIA GPU, no network, and torch 2.11.0+cu130
# installed for its python3. It takes binaries built elsewhere by `scripts/gpu-pack.sh` (their
# LibTorch comes from that python3's torch), runs the parity tests on cuda at TP 1, the batch-1
# decode benchmark on cuda, and prints a short table.
#
#   scripts/gpu-check.sh [PACK_DIR]        (default: gpu-pack, next to this script's repo)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pack=${1:-$repo/gpu-pack}
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count(), torch.cuda.get_device_name(0))'
# The binaries' rpath points at the build machine's cache; use this machine's torch instead.
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ONEHEAD_CACHE=${ONEHEAD_CACHE:-/tmp/onehead-cache}
out=${OUT:-/tmp/onehead-gpu-check}
mkdir -p "$out"

echo "== the worker reports the GPU"
"$pack/onehead-worker" generate --device cuda --model builtin:tiny --prompt-ids 1,2,3 --max-new-tokens 8 --json 2>&1 | tail -2

echo "== parity tests on cuda, TP 1"
(cd "$pack" && ONEHEAD_FIXTURES="$pack/tests/fixtures" ONEHEAD_TEST_DEVICE=cuda ./parity --test-threads 1 greedy full_forward chunked 2>&1 | tee "$out/parity.log" | tail -25)

echo "== batch-1 decode on cuda (SantaCoder shape, bf16)"
"$pack/onehead-engine-bench" --device cuda --dir /tmp/onehead-bench --stream-gib 4 --steps 100 --json "$out/engine.json" 2>&1 | tee "$out/engine.log"

echo "== summary"
passed=$(grep -c '\.\.\. ok$' "$out/parity.log" || true)
failed=$(grep -c '\.\.\. FAILED$' "$out/parity.log" || true)
printf '| check | result |\n|---|---|\n'
printf '| parity tests on cuda (TP 1) | %s passed, %s failed |\n' "$passed" "$failed"
grep -E '^(mqa|mha):' "$out/engine.log" | sed 's/^/| decode | /; s/$/ |/'
[[ $failed == 0 ]]
