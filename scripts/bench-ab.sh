#!/usr/bin/env bash
# bench-ab.sh BEFORE_DIR AFTER_DIR [ROUNDS]: two builds of arch-runc side by side, interleaved.
# Each round runs bench.sh --quick and bench-checkpoint.sh (REPEAT=1, 64 and 512 MiB) once
# with BEFORE's binaries and once with AFTER's, alternating which goes first, so that drift
# in the machine's state lands on both. Prints the median of every figure per build
# (also saved to target/bench/ab.md). Needs root. Not a test.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
before=$(realpath "$1") after=$(realpath "$2") rounds=${3:-3}
out=$(mktemp -d /var/tmp/arch-bench-ab.XXXXXX)
for r in $(seq "$rounds"); do
  order=(before after); [ $((r % 2)) = 0 ] && order=(after before)
  for build in "${order[@]}"; do
    dir=$before; [ "$build" = after ] && dir=$after
    echo "round $r: $build" >&2
    ARCH_BIN_DIR=$dir bash "$repo/scripts/bench.sh" --quick >/dev/null
    cp "$repo/target/bench/results.md" "$out/pass-$build-$r.md"
    ARCH_BIN_DIR=$dir REPEAT=1 bash "$repo/scripts/bench-checkpoint.sh" 64 512 >/dev/null
    cp "$repo/target/bench/checkpoint.md" "$out/ck-$build-$r.md"
  done
done
mkdir -p "$repo/target/bench"
python3 - "$out" "$rounds" <<'PY' | tee "$repo/target/bench/ab.md"
import glob, re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
num = re.compile(r"([0-9.]+) (ms|s)\b")
def figures(path, pick):
    """Every row's numbers (ms or s), keyed by the row's first cell."""
    rows = {}
    for line in open(path):
        if line.startswith("| ") and not line.startswith("| what") and not line.startswith("| memory"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = [float(num.match(cells[i]).group(1)) for i in pick]
    return rows
def medians(kind, build, pick):
    runs = [figures(f"{out}/{kind}-{build}-{r}.md", pick) for r in range(1, rounds + 1)]
    return {k: [statistics.median(run[k][i] for run in runs) for i in range(len(pick))] for k in runs[0]}
# bench.sh: runc median, arch-runc median. bench-checkpoint.sh: ARCH checkpoint, plain pair,
# ARCH restore, plain restore, ARCH freeze, plain freeze.
for kind, pick, head in (("pass", [1, 2], ["runc", "arch-runc"]),
                         ("ck", [1, 2, 6, 7, 9, 10], ["ARCH checkpoint", "plain pair", "ARCH restore", "plain restore", "ARCH freeze", "plain freeze"])):
    b, a = medians(kind, "before", pick), medians(kind, "after", pick)
    print(f"| {'what' if kind == 'pass' else 'memory'} | " + " | ".join(f"{h} before → after" for h in head) + " |")
    print("|---|" + "---|" * len(head))
    unit = "ms" if kind == "pass" else "s"
    for k in b:
        print(f"| {k} | " + " | ".join(f"{x:.2f} → {y:.2f} {unit}" for x, y in zip(b[k], a[k])) + " |")
    print()
print(f"Medians of {rounds} interleaved rounds; raw tables in {out}.")
PY
