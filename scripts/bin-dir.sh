#!/usr/bin/env bash
# Prints the directory of the release binaries (the target is pinned in .cargo/config.toml).
repo=$(cd "$(dirname "$0")/.." && pwd)
target=$(sed -n 's/^target = "\(.*\)"/\1/p' "$repo/.cargo/config.toml" | head -1)
echo "$repo/target/${target:+$target/}release"
