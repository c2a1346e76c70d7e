#!/usr/bin/env bash
# bench.sh [--quick]: arch-runc vs plain runc, side by side in one run.
#   1. pass-through: `arch-runc state ID` vs `runc state ID` (a running container)
#   2. create of an ARCH-enabled container, warm module cache: `arch-runc create`
#      vs `runc create` of the same bundle
#   3. create of a plain container (arch-runc reads config.json, then execs runc)
#   4. ARCH's own time inside arch-runc (its log's duration_us: argv in to exec)
# Prints a markdown table (also saved to target/bench/results.md); the recorded
# figures live in docs/performance.md. Not a test: nothing here fails on time.
set -euo pipefail
# The config it writes must be root's alone, or ARCH ignores it (reference: Trust).
umask 022
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=2000 create_runs=200
[ "${1:-}" = --quick ] && runs=200 create_runs=20
command -v hyperfine >/dev/null || apt-get install -y -q hyperfine >/dev/null
# ARCH_BIN_DIR: bench the arch-runc in that directory instead (an older build, side by side).
if [ -n "${ARCH_BIN_DIR:-}" ]; then
  bin=$ARCH_BIN_DIR
else
  (cd "$repo" && cargo build --release --quiet)
  bin=$(bash "$repo/scripts/bin-dir.sh")
fi
runc=$(command -v runc)

work=$(mktemp -d /tmp/arch-bench.XXXXXX)
root=$work/runc-root
cleanup() {
  "$runc" --root "$root" delete -f bench-state >/dev/null 2>&1 || true
  "$runc" --root "$root" delete -f bench-create >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

make_bundle() { # make_bundle DIR ENV...
  local dir=$1; shift
  mkdir -p "$dir/rootfs/bin"
  cp "$(command -v busybox)" "$dir/rootfs/bin/busybox"
  ln -s busybox "$dir/rootfs/bin/sh"; ln -s busybox "$dir/rootfs/bin/sleep"
  (cd "$dir" && "$runc" spec)
  python3 - "$dir/config.json" "$@" <<'PY'
import json, sys
path, env = sys.argv[1], sys.argv[2:]
c = json.load(open(path))
c["process"]["terminal"] = False
c["process"]["args"] = ["sleep", "1000000"]
c["process"]["env"] += env
json.dump(c, open(path, "w"))
PY
}
make_bundle "$work/plain"
make_bundle "$work/armed" ARCH_ENABLE=1
cat >"$work/config.json" <<JSON
{"state_dir": "$work/state", "log_file": "$work/arch.log", "cache_dir": "$work/cache",
 "modules_dir": "$work/modules", "runc": "$runc"}
JSON
export ARCH_CONFIG=$work/config.json
printf '#!/bin/sh\n"%s" --root "%s" delete -f bench-create >/dev/null 2>&1\nexit 0\n' "$runc" "$root" >"$work/reset.sh"

"$runc" --root "$root" run -d --bundle "$work/plain" bench-state </dev/null >/dev/null 2>&1
# Warm the module cache once.
"$bin/arch-runc" --root "$root" create --bundle "$work/armed" bench-create </dev/null
sh "$work/reset.sh"
: >"$work/arch.log"

hyperfine -N --warmup 50 --runs "$runs" --export-json "$work/state.json" \
  "$runc --root $root state bench-state" "$bin/arch-runc --root $root state bench-state" >/dev/null
hyperfine -N --warmup 3 --runs "$create_runs" --prepare "sh $work/reset.sh" --export-json "$work/create.json" \
  "$runc --root $root create --bundle $work/armed bench-create" \
  "$bin/arch-runc --root $root create --bundle $work/armed bench-create" >/dev/null
hyperfine -N --warmup 3 --runs "$create_runs" --prepare "sh $work/reset.sh" --export-json "$work/create-plain.json" \
  "$runc --root $root create --bundle $work/plain bench-create" \
  "$bin/arch-runc --root $root create --bundle $work/plain bench-create" >/dev/null

mkdir -p "$repo/target/bench"
python3 - "$work" "$runs" "$create_runs" <<'PY' | tee "$repo/target/bench/results.md"
import json, statistics, sys
work, runs, create_runs = sys.argv[1], sys.argv[2], sys.argv[3]
def medians(name):
    r = json.load(open(f"{work}/{name}.json"))["results"]
    return [statistics.median(x["times"]) * 1000 for x in r]
s_runc, s_arch = medians("state")
c_runc, c_arch = medians("create")
p_runc, p_arch = medians("create-plain")
own = {"state": [], "create": [], "plain": []}
for line in open(f"{work}/arch.log"):
    rec = json.loads(line)
    if rec.get("target") == "arch::invocation" and rec["subcommand"] in ("state", "create"):
        key = rec["subcommand"] if rec["arch_enabled"] or rec["subcommand"] == "state" else "plain"
        own[key].append(rec["duration_us"] / 1000)
med = lambda xs: statistics.median(xs) if xs else float("nan")
print("| what | runc (median) | arch-runc (median) | ratio | arch-runc minus runc |")
print("|---|---|---|---|---|")
print(f"| `state` of a running container, pass-through ({runs} runs) | {s_runc:.2f} ms | {s_arch:.2f} ms | {s_arch/s_runc:.3f}x | {s_arch-s_runc:+.2f} ms |")
print(f"| `create` of an ARCH-enabled container, warm cache ({create_runs} runs) | {c_runc:.2f} ms | {c_arch:.2f} ms | {c_arch/c_runc:.3f}x | {c_arch-c_runc:+.2f} ms |")
print(f"| `create` of a plain container, pass-through ({create_runs} runs) | {p_runc:.2f} ms | {p_arch:.2f} ms | {p_arch/p_runc:.3f}x | {p_arch-p_runc:+.2f} ms |")
print()
print(f"ARCH's own time inside arch-runc (argv in to exec, from its log): pass-through `state` "
      f"{med(own['state']):.3f} ms, plain `create` {med(own['plain']):.3f} ms, ARCH-enabled `create` with the "
      f"module decision {med(own['create']):.3f} ms (the decision adds {med(own['create']) - med(own['plain']):.3f} ms).")
PY
