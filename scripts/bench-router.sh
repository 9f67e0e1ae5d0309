#!/usr/bin/env bash
# What the router adds: a worker on the built-in model and a router on 127.0.0.1, then
# onehead-router-bench against both, and against the router's OpenAI-compatible HTTP API.
# Everything is stopped at the end.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
cargo build --release --locked -p onehead-worker -p onehead-router -p onehead-loadgen --bins
bin=target/release
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
$bin/onehead-worker serve --model builtin:tiny --listen 127.0.0.1:50151 --threads 1 >/dev/null 2>&1 &
$bin/onehead-router --listen 127.0.0.1:8181 --http-listen 127.0.0.1:8182 --worker http://127.0.0.1:50151 >/dev/null 2>&1 &
until $bin/onehead-router client --addr http://127.0.0.1:8181 info >/dev/null 2>&1; do sleep 0.2; done
$bin/onehead-router-bench --router http://127.0.0.1:8181 --worker http://127.0.0.1:50151 --http 127.0.0.1:8182 "$@"
