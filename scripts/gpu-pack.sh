#!/usr/bin/env bash
# Packs everything scripts/gpu-check.sh runs into gpu-pack/ (git-ignored), so that nothing
# builds on the GPU machine: the binaries, the test binaries it runs and the fixtures, stripped
# to fit the device tool's 64 MiB transfer (`carry: ["gpu-pack"]`).
#
#   scripts/gpu-pack.sh [--debug] [DIR]
#
# The release build by default (what a GPU session carries); with --debug, the debug build that
# `cargo build --workspace --bins` and `cargo test --workspace` made (scripts/test.sh, before its
# dry run of gpu-check.sh): with the same flags cargo rebuilds nothing. DIR (default gpu-pack,
# in the repository) then holds:
#   onehead-worker  onehead-engine-bench  onehead-batch-bench
#   parity          engine/tests/parity.rs (the fixtures' parity tests)
#   engine-lib      the engine's unit tests (for parallel::nccl's one-rank test)
#   serve           worker/tests/serve.rs (batched == alone through a real `onehead-worker serve`)
#   tests/fixtures/ the fixtures with their reference.json
#   BUILD           profile, commit, and the build's repository root (serve looks for the
#                   fixtures under that path, which gpu-check.sh links there when it is missing)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
profile=release
dest=gpu-pack
for arg in "$@"; do
    case $arg in
        --debug) profile=debug ;;
        -*) echo "usage: scripts/gpu-pack.sh [--debug] [DIR]" >&2; exit 2 ;;
        *) dest=$arg ;;
    esac
done
bash scripts/setup-libtorch.sh
if [[ $profile == release ]]; then
    cargo build --release --locked -p onehead-worker -p onehead-benches --bins
    tests=(cargo test --release --locked -p onehead-engine -p onehead-worker --lib --test parity --test serve)
else
    # The flags of scripts/test.sh, so that this finds its build and compiles nothing.
    cargo build --workspace --bins --locked
    tests=(cargo test --workspace --locked)
fi
# The test executables, as cargo reports them (their file names carry a hash).
executables=$("${tests[@]}" --no-run --message-format=json | python3 -c '
import json, os, sys
found = {}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-message" and m["message"]["level"] == "error":
        sys.stderr.write(m["message"]["rendered"])
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    crate = os.path.basename(os.path.dirname(m["manifest_path"]))
    name, kind = m["target"]["name"], m["target"]["kind"]
    if (crate, name) == ("engine", "parity"):
        found["parity"] = m["executable"]
    elif (crate, name) == ("engine", "onehead_engine") and "lib" in kind:
        found["engine-lib"] = m["executable"]
    elif (crate, name) == ("worker", "serve"):
        found["serve"] = m["executable"]
missing = {"parity", "engine-lib", "serve"} - found.keys()
if missing:
    sys.exit("gpu-pack: cargo reported no test executable for " + ", ".join(sorted(missing)))
for k, v in sorted(found.items()):
    print(k, v)
')
rm -rf "$dest"
mkdir -p "$dest/tests"
cp "target/$profile/onehead-worker" "target/$profile/onehead-engine-bench" "target/$profile/onehead-batch-bench" "$dest/"
while read -r name path; do
    cp "$path" "$dest/$name"
done <<<"$executables"
cp -r tests/fixtures "$dest/tests/"
{
    echo "profile: $profile"
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "build root: $repo"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
} >"$dest/BUILD"
# Without symbols the pack fits a 64 MiB transfer.
(cd "$dest" && strip onehead-worker onehead-engine-bench onehead-batch-bench parity engine-lib serve)
size_kib=$(du -sk "$dest" | cut -f1)
echo "$dest ($profile): $((size_kib / 1024)) MiB (the device tool carries at most 64 MiB)"
if [[ $profile == release && $size_kib -gt $((56 * 1024)) ]]; then
    echo "gpu-pack: over 56 MiB, too close to the 64 MiB a device call carries" >&2
    exit 1
fi
