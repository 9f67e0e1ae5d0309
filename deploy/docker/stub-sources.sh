#!/bin/sh
# Gives every workspace member whose manifest has been copied an empty library and an empty
# main for each binary it declares, so that `cargo build --locked -p CRATE` can build the
# dependencies of CRATE in a cached layer before the real sources are copied. The workspace
# and the lock file stay as they are: cargo resolves the whole workspace, so every member's
# manifest must be there, but it compiles only what CRATE needs.
set -eu
for manifest in */Cargo.toml; do
    dir=${manifest%/Cargo.toml}
    mkdir -p "$dir/src"
    [ -f "$dir/src/lib.rs" ] || : > "$dir/src/lib.rs"
    sed -n 's/^path = "\(.*\)"$/\1/p' "$manifest" | while read -r bin; do
        mkdir -p "$(dirname "$dir/$bin")"
        echo 'fn main() {}' > "$dir/$bin"
    done
done
