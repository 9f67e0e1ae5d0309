#!/usr/bin/env bash
# The run command: sets up LibTorch if needed, builds, and generates with the built-in model
# (or the model and flags given, e.g. `scripts/run.sh --model /path/to/santacoder --prompt "def"`).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
cargo build --release --locked -p onehead-worker --bin onehead-worker
if [[ $# -eq 0 ]]; then
    set -- --model builtin:tiny --prompt "def fibonacci(n):" --max-new-tokens 48 --temperature 0.8 --seed 1
fi
exec ./target/release/onehead-worker generate "$@"
