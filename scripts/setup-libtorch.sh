#!/usr/bin/env bash
# Installs torch 2.11.0 from PyPI into a cache folder outside the repo (once), and links the
# repo's `.libtorch` to it, so that plain `cargo build` finds LibTorch via .cargo/config.toml,
# and the wheel's libnccl.so.2 as libnccl.so, the name cudarc opens.
#
#   ONEHEAD_CACHE   cache root (default: ~/.cache/onehead)
#   PYTHON          interpreter used to make the virtual environment (default: python3)
#
# Re-running is cheap: an existing, complete install is reused.
set -euo pipefail

TORCH_VERSION=2.11.0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ONEHEAD_CACHE:-$HOME/.cache/onehead}
venv=$cache/torch-$TORCH_VERSION
python=${PYTHON:-python3}
stamp=$venv/.onehead-complete

if [[ ! -f $stamp ]]; then
    echo "onehead setup: installing torch==$TORCH_VERSION from PyPI into $venv (about 3.6 GB, once)" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar on \
        "torch==$TORCH_VERSION" numpy >&2
    touch "$stamp"
fi

torch_dir=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
[[ -f $torch_dir/lib/libtorch_cpu.so ]] || { echo "onehead setup: $torch_dir has no lib/libtorch_cpu.so" >&2; exit 1; }
# cudarc opens NCCL as libnccl.so (or .so.13, .12, ...), never as the wheel's libnccl.so.2; the
# binaries' rpath reaches this folder (engine/build.rs, worker/build.rs). Checked on every run,
# as an existing install is reused, and left alone when right: the build scripts watch the folder.
nccl_lib=$(dirname "$torch_dir")/nvidia/nccl/lib
if [[ -f $nccl_lib/libnccl.so.2 && $(readlink "$nccl_lib/libnccl.so" || true) != libnccl.so.2 ]]; then
    ln -sfn libnccl.so.2 "$nccl_lib/libnccl.so"
    echo "onehead setup: linked $nccl_lib/libnccl.so to libnccl.so.2" >&2
fi
ln -sfn "$torch_dir" "$repo/.libtorch"
ln -sfn "$venv" "$repo/.venv"
echo "onehead setup: LibTorch at $torch_dir (linked as $repo/.libtorch)" >&2
