#!/usr/bin/env bash
# The run command: a local cluster (one worker on the built-in model, and a router in front of
# it) on 127.0.0.1. Sets up LibTorch if needed and builds first. Ctrl-C stops both.
#
#   ONEHEAD_MODEL   model folder, builtin:code (default: a small model trained on Python) or
#                   builtin:tiny (random)
#   ROUTER_PORT     public port (default 8080); WORKER_PORT (default 50051)
#
# With arguments, runs `onehead-worker generate ARGS` instead (one prompt, no servers).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup-libtorch.sh
cargo build --release --locked -p onehead-worker -p onehead-router --bins
bin=target/release
if [[ $# -gt 0 ]]; then
    exec $bin/onehead-worker generate "$@"
fi

model=${ONEHEAD_MODEL:-builtin:code}
router_port=${ROUTER_PORT:-8080}
worker_port=${WORKER_PORT:-50051}
http_port=${HTTP_PORT:-8000}
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT INT TERM
$bin/onehead-worker serve --model "$model" --listen "127.0.0.1:$worker_port" &
$bin/onehead-router --listen "127.0.0.1:$router_port" --http-listen "127.0.0.1:$http_port" --worker "http://127.0.0.1:$worker_port" &
for _ in $(seq 100); do
    if $bin/onehead-router client --addr "http://127.0.0.1:$router_port" info >/dev/null 2>&1; then break; fi
    sleep 0.2
done
cat <<MSG

onehead is serving $model at 127.0.0.1:$router_port (router; OpenAI-compatible HTTP on
127.0.0.1:$http_port) -> 127.0.0.1:$worker_port (worker).
A first completion:
MSG
$bin/onehead-router client --addr "http://127.0.0.1:$router_port" generate --stream --max-new-tokens 48 --temperature 0.8 --seed 1 "def fibonacci(n):"
cat <<MSG

Call it yourself:
  $bin/onehead-router client --addr http://127.0.0.1:$router_port generate --stream "def hello():"
  grpcurl -plaintext -d '{"text": "def hello():", "parameters": {"max_new_tokens": 16}}' \\
      127.0.0.1:$router_port onehead.v1.TextGeneration/GenerateStream
  curl http://127.0.0.1:$http_port/v1/completions -H 'content-type: application/json' \\
      -d '{"model": "$model", "prompt": "def hello():", "max_tokens": 16}'
Ctrl-C stops the cluster.
MSG
wait
