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
# The config it writes must be root's alone, or ARCH ignores it (reference: Trust).
umask 022
repo=$(cd "$(dirname "$0")/.." && pwd)
sizes=("${@:-64 512 2048}")
read -r -a sizes <<<"${sizes[*]}"
repeat=${REPEAT:-3}
layer_mib=${LAYER_MIB:-1024}
# ARCH_BIN_DIR: bench the arch-runc in that directory instead (e.g. an older build, side by side).
if [ -n "${ARCH_BIN_DIR:-}" ]; then
  bin=$ARCH_BIN_DIR
else
  (cd "$repo" && cargo build --release --quiet)
  bin=$(bash "$repo/scripts/bin-dir.sh")
fi
runc=$(command -v runc)
work=$(mktemp -d /var/tmp/arch-bench-ck.XXXXXX)
root=$work/runc-root
cleanup() {
  for id in $("$runc" --root "$root" list -q 2>/dev/null); do "$runc" --root "$root" delete -f "$id" >/dev/null 2>&1 || true; done
  grep -o " $work/[^ ]*/rootfs" /proc/self/mountinfo | while read -r m; do umount "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

rustc -O --edition 2021 --target x86_64-unknown-linux-musl -C target-feature=+crt-static \
  "$repo/bench/workload.rs" -o "$work/workload"
lower=$work/lower
mkdir -p "$lower/bin" "$lower/data" "$lower/tmp" "$lower/proc" "$lower/dev" "$lower/sys"
cp "$(command -v busybox)" "$lower/bin/busybox"; ln -s busybox "$lower/bin/sh"
cp "$work/workload" "$lower/workload"
cat >"$work/config.json" <<JSON
{"state_dir": "$work/state", "log_file": "$work/arch.log", "cache_dir": "$work/cache",
 "modules_dir": "$work/modules", "checkpoint_dir": "$work/checkpoints", "runc": "$runc", "keep_generations": 1,
 "mode": "${ARCH_BENCH_MODE:-basic}", "network_fs_dir": "$work/netfs"}
JSON
mkdir -p "$work/netfs"
export ARCH_CONFIG=$work/config.json
mkdir -p "$work/spec" && (cd "$work/spec" && "$runc" spec) && mv "$work/spec/config.json" "$work/spec.json"

n=0
# bundle NAME MEM [LAYER_MIB] -> a bundle whose rootfs is a fresh overlay (empty upperdir)
bundle() {
  local b=$work/b-$1
  mkdir -p "$b/rootfs" "$b/upper" "$b/ovl-work"
  mount -t overlay overlay -o "lowerdir=$lower,upperdir=$b/upper,workdir=$b/ovl-work" "$b/rootfs"
  python3 - "$work/spec.json" "$b/config.json" "$2" "${3:-$layer_mib}" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["process"]["terminal"] = False
c["process"]["args"] = ["/workload", sys.argv[3], sys.argv[4], "/data/layer"]
c["process"]["env"] += ["ARCH_ENABLE=1", f"ARCH_CHECKPOINT_KEY=bench-{sys.argv[3]}"]
c["root"] = {"path": "rootfs", "readonly": False}
json.dump(c, open(sys.argv[2], "w"))
PY
  echo "$b"
}
wait_ready() { for _ in $(seq 600); do [ -f "$1/upper/data/ready" ] && return; sleep 0.1; done; echo "workload not ready" >&2; exit 1; }
seconds() { python3 -c "import time; print(f'{time.time():.4f}')"; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }
ckroot=$work/checkpoints
[ "${ARCH_BENCH_MODE:-basic}" = network-fs ] && ckroot=$work/netfs
gen_meta() { find "$ckroot/bench-$1/.arch/generations" -name metadata.json | head -1; }
run_arch() { # run_arch ID BUNDLE: create through arch-runc (restores if a checkpoint exists), start
  "$bin/arch-runc" --root "$root" create --bundle "$2" "$1" </dev/null >/dev/null 2>&1
  "$bin/arch-runc" --root "$root" start "$1"
}
drop() { "$runc" --root "$root" delete -f "$1" >/dev/null 2>&1 || true; }

# Warm-up: compile every module into the cache, outside the measurements.
b=$(bundle warm 1 4); run_arch warm "$b"; wait_ready "$b"
"$bin/arch-runc" --root "$root" checkpoint warm; drop warm
b=$(bundle warm2 1 4); run_arch warm2 "$b"; drop warm2

results=()
for mem in "${sizes[@]}"; do
  declare -a ck_arch=() ck_plain=() ck_sync=() rs_arch=() rs_plain=() fr_arch=() fr_plain=()
  for r in $(seq "$repeat"); do
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
  med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
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
