#!/usr/bin/env bash
# Builds the Debian package arch-runc_<version>-1_amd64.deb into target/debian/ with cargo-deb
# (installed by `scripts/setup.sh --test`): arch-runc and archctl (builtin modules embedded),
# /etc/arch/config.json as a conffile, the arch-watch unit, shell completions and the docs.
# Prints the package's path on stdout.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
PATH=$PATH:${CARGO_HOME:-$HOME/.cargo}/bin
command -v cargo-deb >/dev/null || { echo "build-deb: cargo-deb missing (scripts/setup.sh --test)" >&2; exit 1; }

target=$(sed -n 's/^target = "\(.*\)"/\1/p' .cargo/config.toml | head -1)
cargo build --release --quiet -p arch-host --bins
bin=$(bash scripts/bin-dir.sh)
# Completions come from archctl itself, so they always match its flags.
mkdir -p "$bin/completions"
"$bin/archctl" completions bash >"$bin/completions/archctl.bash"
"$bin/archctl" completions zsh >"$bin/completions/_archctl"
"$bin/archctl" completions fish >"$bin/completions/archctl.fish"

mkdir -p target/debian
cargo deb --quiet -p arch-host --no-build --target "$target" --output target/debian/ >/dev/null
ls -t target/debian/arch-runc_*.deb | head -1
