#!/usr/bin/env bash
# bench-checkpoint.sh [SIZES_MIB...]: ARCH checkpoint/restore vs the plain
# pair, side by side in one run, for a workload holding N MiB of memory
# (default 64 512 2048) with a ~1 GiB writable layer.
#   checkpoint: `arch-runc checkpoint` (images + layer + metadata, validated,
#               fsynced, published) vs `runc checkpoint` + `tar | zstd -1 -T0`
#               of the same upperdir;
#   restore:    `arch-runc create` (restores) vs `zstd -d | tar -x` into the
#               new rootfs + `runc restore --detach`;
#   freeze:     ARCH's frozen time with --leave-running (from its metadata) vs
#               `runc checkpoint --leave-running` + `cp -a` of the upperdir.
# ARCH_BENCH_MODE=network-fs benches Network FS mode (a local directory as the root).
# Each figure is the median of $REPEAT runs (default 3). Results go to
# target/bench/checkpoint.md. Needs root. Not a test.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
sizes=("${@:-64 512 2048}")
read -r -a sizes <<<"${sizes[*]}"
repeat=${REPEAT:-3}
layer_mib=${LAYER_MIB:-1024}
# shellcheck source=scripts/bench-lib.sh
. "$repo/scripts/bench-lib.sh"
bench_init arch-bench-ck
# shellcheck disable=SC2119 # no extra settings
bench_config

n=0
gen_meta() { find "$ckroot/bench-$1/.arch/generations" -name metadata.json | head -1; }

# Warm-up: compile every module into the cache, outside the measurements.
b=$(bundle warm 1 4); run_arch warm "$b"; wait_ready "$b"
"$bin/arch-runc" --root "$root" checkpoint warm; drop warm
b=$(bundle warm2 1 4); run_arch warm2 "$b"; drop warm2

results=()
for mem in "${sizes[@]}"; do
  declare -a ck_arch=() ck_plain=() ck_sync=() rs_arch=() rs_plain=() fr_arch=() fr_plain=()
  for _ in $(seq "$repeat"); do
    n=$((n + 1))
    rm -rf "$ckroot/bench-$mem"
    # ARCH checkpoint (no --leave-running: the container stops, as with plain runc)
    b=$(bundle "a$n" "$mem"); run_arch "a$n" "$b"; wait_ready "$b"
    t0=$(seconds); "$bin/arch-runc" --root "$root" checkpoint "a$n"; t1=$(seconds)
    ck_arch+=("$(elapsed "$t0" "$t1")"); drop "a$n"
    # ARCH restore: a new container with the same key
    b=$(bundle "ar$n" "$mem")
    t0=$(seconds); run_arch "ar$n" "$b"; t1=$(seconds)
    grep -q "create ar$n: restored" "$work/arch.log" || { echo "ARCH did not restore ar$n" >&2; exit 1; }
    rs_arch+=("$(elapsed "$t0" "$t1")"); drop "ar$n"
    # ARCH freeze with --leave-running (frozen: dump + uncompressed layer copy)
    b=$(bundle "af$n" "$mem"); run_arch "af$n" "$b"; wait_ready "$b"
    "$bin/arch-runc" --root "$root" checkpoint --leave-running "af$n"
    fr_arch+=("$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['phases_ms']['freeze']/1000)" "$(gen_meta "$mem")")")
    python3 -c "import json,sys; print('  ARCH --leave-running phases (ms):', json.load(open(sys.argv[1]))['phases_ms'])" "$(gen_meta "$mem")" >&2
    drop "af$n"
    # plain: runc checkpoint + tar | zstd of the upperdir
    b=$(bundle "p$n" "$mem"); "$runc" --root "$root" run -d --bundle "$b" "p$n" </dev/null >/dev/null 2>&1; wait_ready "$b"
    img=$work/plain-$n; mkdir -p "$img"
    t0=$(seconds)
    "$runc" --root "$root" checkpoint --image-path "$img/images" --work-path "$img/work" --file-locks "p$n"
    tar -C "$b/upper" -cf - . | zstd -1 -T0 -q >"$img/rootfs.tar.zst"
    t1=$(seconds); ck_plain+=("$(elapsed "$t0" "$t1")")
    sync -f "$img/rootfs.tar.zst"   # what ARCH pays to publish durably
    t2=$(seconds); ck_sync+=("$(elapsed "$t0" "$t2")"); drop "p$n"
    # plain restore: extract into the new rootfs, runc restore
    b=$(bundle "pr$n" "$mem")
    t0=$(seconds)
    zstd -dc -q "$img/rootfs.tar.zst" | tar -C "$b/rootfs" -xf -
    "$runc" --root "$root" restore --detach --image-path "$img/images" --work-path "$img/work-r" --bundle "$b" --file-locks "pr$n" </dev/null >/dev/null 2>&1
    t1=$(seconds); rs_plain+=("$(elapsed "$t0" "$t1")"); drop "pr$n"
    # plain freeze reference: dump with --leave-running + an uncompressed copy of the layer
    b=$(bundle "pf$n" "$mem"); "$runc" --root "$root" run -d --bundle "$b" "pf$n" </dev/null >/dev/null 2>&1; wait_ready "$b"
    t0=$(seconds)
    "$runc" --root "$root" checkpoint --leave-running --image-path "$img/images-f" --work-path "$img/work-f" --file-locks "pf$n"
    cp -a "$b/upper" "$img/upper-copy"
    t1=$(seconds); fr_plain+=("$(elapsed "$t0" "$t1")"); drop "pf$n"
    rm -rf "$img"
  done
  row=$(python3 - "$mem" "$(med "${ck_arch[@]}")" "$(med "${ck_plain[@]}")" "$(med "${ck_sync[@]}")" "$(med "${rs_arch[@]}")" "$(med "${rs_plain[@]}")" "$(med "${fr_arch[@]}")" "$(med "${fr_plain[@]}")" <<'PY'
import sys
m, ca, cp, cs, ra, rp, fa, fp = sys.argv[1], *map(float, sys.argv[2:])
print(f"| {m} MiB | {ca:.2f} s | {cp:.2f} s | {ca/cp:.2f}x | {cs:.2f} s | {ca/cs:.2f}x | {ra:.2f} s | {rp:.2f} s | {ra/rp:.2f}x | {fa:.2f} s | {fp:.2f} s | {fa/fp:.2f}x |")
PY
)
  results+=("$row")
  echo "$row"
done
mkdir -p "$repo/target/bench"
{
  echo "| memory | ARCH checkpoint | runc checkpoint + tar\|zstd | ratio | same + syncfs | ratio | ARCH restore | unzstd\|untar + runc restore | ratio | ARCH freeze | dump + cp -a | ratio |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${results[@]}"
  echo
  echo "Writable layer: ${layer_mib} MiB in $((layer_mib / 4)) files; medians of $repeat runs."
} | tee "$repo/target/bench/checkpoint.md"
