#!/usr/bin/env bash
# Issue 25's models, trained on the Python standard library by scripts/train_code_model.py
# (seeded: the same machine gives the same models):
#   1. builtin:code, a GPTBigCode MQA model, into engine/assets/builtin-code, and the CI check's
#      fixture tests/fixtures/builtin_code_validation.json (about 25 minutes);
#   2. the quality table's three: Llama architecture, 4 layers of 256 with 8 query heads, and
#      8 (multi-head), 4 (grouped) and 1 (multi-query) K/V heads, the same steps each;
#   3. the multi-head one converted by onehead-convert to 4 and 1 K/V heads, evaluated, then
#      uptrained for 5% of its steps and evaluated again;
#   4. decode ms/step of the three at batch 8 and 32 (onehead-paper-bench --models).
# Everything goes to $TRAIN_DIR (default /tmp/onehead-train); summary.jsonl has every model's
# validation perplexity, table-speed.txt the decode steps.
#
#   scripts/train-models.sh [builtin] [table]     (default: both)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
.venv/bin/python -m pip install --disable-pip-version-check -q -r scripts/reference-requirements.txt
out=${TRAIN_DIR:-/tmp/onehead-train}
steps=${TABLE_STEPS:-400}
uptrain=$((steps / 20))
py=".venv/bin/python scripts/train_code_model.py"
mkdir -p "$out"
what=${*:-builtin table}
for w in $what; do
    [[ $w == builtin || $w == table ]] || { echo "train-models.sh: unknown part '$w' (builtin, table)" >&2; exit 2; }
done

if [[ $what == *builtin* ]]; then
    $py builtin "$out/builtin-code"
    mkdir -p engine/assets/builtin-code
    cp "$out"/builtin-code/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,training.json} \
        engine/assets/builtin-code/
    $py fixture "$out/builtin-code" tests/fixtures/builtin_code_validation.json
fi

if [[ $what == *table* ]]; then
    cargo build --release --locked -p onehead-convert -p onehead-benches --bin onehead-convert --bin onehead-paper-bench
    for kv in 8 4 1; do
        $py train "$out/table-kv$kv" --kv-heads "$kv" --steps "$steps"
    done
    for kv in 4 1; do
        rm -rf "$out/converted-kv$kv"
        ./target/release/onehead-convert --kv-heads "$kv" "$out/table-kv8" "$out/converted-kv$kv"
        $py train "$out/uptrained-kv$kv" --kv-heads "$kv" --steps "$uptrain" --init "$out/converted-kv$kv"
    done
    ./target/release/onehead-paper-bench --models "$out/table-kv8,$out/table-kv4,$out/table-kv1" \
        --batch 8,32 --context 256,480 --steps 10 --json "$out/table-speed.json" | tee "$out/table-speed.txt"
    # Every figure of the table from the saved (bf16) weights, evaluated the same way.
    names="table-kv8 table-kv4 table-kv1 converted-kv4 converted-kv1 uptrained-kv4 uptrained-kv1"
    $py eval $(for n in $names; do echo "$out/$n"; done) | tee "$out/summary.jsonl"
fi
