#!/usr/bin/env bash
# The README's test command: on a fresh Debian 12 machine (as root), install
# what is needed, then run formatting and lint checks, every test (unit,
# module, integration, and the system tests on a private real containerd with
# real runc and CRIU), and a short benchmark run as a smoke check.
# With CI=true a missing dependency fails the run instead of skipping tests.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

step() { printf '\n== %s\n' "$*"; }

step "setup"
bash scripts/setup.sh --test
step "rustfmt"
cargo fmt --all --check
step "clippy (host, its DynamoDB client)"
cargo clippy --release -p arch-host -p arch-dynamodb --all-targets --quiet -- -D warnings
step "clippy (guests, wasm32-wasip2)"
cargo clippy --release --target wasm32-wasip2 --quiet \
  -p arch-guest-sdk -p arch-module-create -p arch-module-start -p arch-module-checkpoint \
  -p arch-module-resume -p arch-module-delete -p arch-module-kill -p arch-module-example-vendor -p arch-fixture-misbehave -p arch-fixture-v0-1 \
  -- -D warnings
step "tests"
cargo test --release --no-fail-fast 2>&1 | tee target/test-output.txt
step "fresh Debian 12 roots: setup.sh in both apt layouts, the Debian package installed"
bash scripts/test-fresh-root.sh 2>&1 | tee target/fresh-root-output.txt
step "benchmark smoke run (figures: docs/performance.md, scripts/bench.sh)"
bash scripts/bench.sh --quick
python3 - <<'PY' 2>/dev/null || true
import re
text = open("target/test-output.txt").read()
p = sum(int(x) for x in re.findall(r"test result: \w+\. (\d+) passed", text))
f = sum(int(x) for x in re.findall(r"; (\d+) failed", text))
fresh = re.search(r"^fresh-root: (\d+) passed, (\d+) failed", open("target/fresh-root-output.txt").read(), re.M)
p, f = p + int(fresh[1]), f + int(fresh[2])
print(f"\ntests: {p} passed, {f} failed")
PY
