#!/usr/bin/env bash
# bench-incremental.sh [SIZES_MIB...]: what chunks storage saves a second
# checkpoint, and what it costs elsewhere, against files storage (the previous
# design), plain runc and Podman, side by side in one run. A workload holding
# N MiB of memory (default 2048) with a writable layer of $LAYER_MIB (default
# 1024) in a runc container on a real overlay:
#   incremental: `arch-runc checkpoint --leave-running` (gen 1), then the
#                workload changes a tenth of its memory and writes 50 MiB of
#                new files (a step), then the same again (gen 2): each one's
#                time and what it wrote (chunks: metadata `written_bytes`;
#                files: `du -sb` of the generation), with chunks and with files;
#   freeze:      gen 2's frozen time (metadata `phases_ms.freeze`) vs `runc
#                checkpoint --leave-running` alone of the same container, stepped;
#   restore:     `arch-runc create` + start restoring gen 2, chunks vs files;
#   first:       a first checkpoint (the container stops, nothing to share):
#                chunks vs files in Basic mode; in Network FS mode (a local
#                directory as the root) chunks vs `runc checkpoint` +
#                `tar | zstd -1 -T0` of the upperdir + `sync -f`;
#   podman:      for $PODMAN_SIZES (default 64 512 2048; empty: none), ARCH's
#                Network FS chunks checkpoint and restore vs `podman container
#                checkpoint --export F --compress zstd` and `podman container
#                restore --import F` of the same workload (an image imported
#                from the same files).
# The incremental, freeze and restore rows are measured in each of
# $ARCH_BENCH_MODES (default: basic network-fs).
# Every figure is the median of $REPEAT runs (default 3); the page cache is
# flushed (`sync`) before each timed step. Results go to
# target/bench/incremental.md. Needs root. Not a test.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
sizes=("${@:-2048}")
read -r -a sizes <<<"${sizes[*]}"
read -r -a podman_sizes <<<"${PODMAN_SIZES-64 512 2048}"
repeat=${REPEAT:-3}
layer_mib=${LAYER_MIB:-1024}
read -r -a modes <<<"${ARCH_BENCH_MODES:-basic network-fs}"
# The comparison needs Podman (setup.sh does not install it: the suite does not use it).
if [ "${#podman_sizes[@]}" -gt 0 ] && ! command -v podman >/dev/null; then
  apt-get install -y -q --no-install-recommends podman >/dev/null
fi
# shellcheck source=scripts/bench-lib.sh
. "$repo/scripts/bench-lib.sh"
bench_init arch-bench-inc

# use_config STORAGE MODE: ARCH's config with that checkpoint_storage and mode
# (written once, then switched to), and $ckroot for it.
use_config() {
  local f=$work/config-$1-$2.json ARCH_BENCH_MODE=$2
  if [ ! -f "$f" ]; then
    bench_config "\"checkpoint_storage\": \"$1\""
    mv "$work/config.json" "$f"
  fi
  export ARCH_CONFIG=$f
  ckroot=$work/checkpoints
  if [ "$2" = network-fs ]; then ckroot=$work/netfs; fi
}
newest_gen() { find "$ckroot/$1/.arch/generations" -mindepth 1 -maxdepth 1 -type d | sort | tail -1; }
meta() { # meta KEY FIELD[.SUB]: from the newest generation's metadata.json
  python3 - "$(newest_gen "$1")/metadata.json" "$2" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v[k]
print(v)
PY
}
# written STORAGE KEY: what the newest generation added to the root (chunks:
# its new chunks and own files, from its metadata; files: the whole generation)
written() {
  if [ "$1" = chunks ]; then meta "$2" written_bytes; else du -sb "$(newest_gen "$2")" | cut -f1; fi
}
phases() { echo "  $1: phases (ms) $(meta "$2" phases_ms); layer files read $(meta "$2" layer_files_read 2>/dev/null || echo -)" >&2; }
# step BUNDLE: the workload's next step (a tenth of its memory, 50 MiB of files), waited for
step() {
  rm -f "$1/rootfs/data/stepped"
  : >"$1/rootfs/data/step"
  for _ in $(seq 1200); do [ -f "$1/upper/data/stepped" ] && return; sleep 0.1; done
  echo "the workload did not step" >&2; exit 1
}
# restored ID [KEY/GENERATION]: ARCH's log says the create of ID restored (that generation)
restored() { grep -q "create $1: restored from ${2:-}" "$work/arch.log" || { echo "ARCH did not restore $1 ${2:-}" >&2; exit 1; }; }
checkpoint() { "$bin/arch-runc" --root "$root" checkpoint "$@"; }
runs=$work/runs.json
: >"$runs"
record() { echo "$1" >>"$runs"; }
n=0

# Warm-up: compile every module into the cache, outside the measurements.
use_config chunks basic
b=$(bundle warm 1 4 bench-warm); run_arch warm "$b"; wait_ready "$b"
checkpoint warm; drop warm
b=$(bundle warm2 1 4 bench-warm); run_arch warm2 "$b"; drop warm2
unbundle warm; unbundle warm2; rm -rf "${ckroot:?}/bench-warm"

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for mem in "${sizes[@]}"; do
  for r in $(seq "$repeat"); do
    # --- incremental, freeze, restore: gen 1, a step, gen 2, restore of gen 2 ---
    for mode in "${modes[@]}"; do
      for storage in chunks files; do
        use_config "$storage" "$mode"
        n=$((n + 1)); id=i$n; key=inc-$storage-$n
        b=$(bundle "$id" "$mem" "$layer_mib" "$key"); run_arch "$id" "$b"; wait_ready "$b"
        sync; t0=$(seconds); checkpoint --leave-running "$id"; t1=$(seconds)
        g1_s=$(elapsed "$t0" "$t1"); g1_bytes=$(written "$storage" "$key"); g1_freeze=$(meta "$key" phases_ms.freeze)
        phases "$storage gen 1 ($mem MiB, run $r)" "$key"
        step "$b"
        sync; t0=$(seconds); checkpoint --leave-running "$id"; t1=$(seconds)
        g2_s=$(elapsed "$t0" "$t1"); g2_bytes=$(written "$storage" "$key"); g2_freeze=$(meta "$key" phases_ms.freeze)
        phases "$storage gen 2 ($mem MiB, run $r)" "$key"
        g2_name=$(basename "$(newest_gen "$key")")
        drop "$id"; unbundle "$id"
        b=$(bundle "${id}r" "$mem" "$layer_mib" "$key")
        sync; t0=$(seconds); run_arch "${id}r" "$b"; t1=$(seconds)
        restored "${id}r" "$key/$g2_name"; rs_s=$(elapsed "$t0" "$t1"); drop "${id}r"; unbundle "${id}r"
        rm -rf "${ckroot:?}/$key"
        record "{\"kind\": \"inc\", \"mem\": $mem, \"mode\": \"$mode\", \"storage\": \"$storage\", \"g1_s\": $g1_s, \"g1_bytes\": $g1_bytes, \"g1_freeze_ms\": $g1_freeze, \"g2_s\": $g2_s, \"g2_bytes\": $g2_bytes, \"g2_freeze_ms\": $g2_freeze, \"restore_s\": $rs_s}"
        echo "  $storage $mode, $mem MiB, run $r: gen 1 ${g1_s} s, $g1_bytes B; gen 2 ${g2_s} s, $g2_bytes B, frozen $g2_freeze ms; restore ${rs_s} s" >&2
      done
    done
    # plain freeze: the same container, stepped, `runc checkpoint --leave-running` alone
    n=$((n + 1)); id=p$n; img=$work/plain-$n
    b=$(bundle "$id" "$mem" "$layer_mib" "plain-$n")
    "$runc" --root "$root" run -d --bundle "$b" "$id" </dev/null >/dev/null 2>&1; wait_ready "$b"
    step "$b"
    sync; t0=$(seconds)
    "$runc" --root "$root" checkpoint --leave-running --image-path "$img/images" --work-path "$img/work" --file-locks "$id"
    t1=$(seconds); drop "$id"; unbundle "$id"; rm -rf "$img"
    record "{\"kind\": \"plain-freeze\", \"mem\": $mem, \"secs\": $(elapsed "$t0" "$t1")}"

    # --- first checkpoint, the container stops: chunks vs files (Basic), chunks (Network FS) ---
    for cfg in "chunks basic" "files basic" "chunks network-fs" "files network-fs"; do
      read -r storage m <<<"$cfg"
      use_config "$storage" "$m"
      n=$((n + 1)); id=f$n; key=first-$n
      b=$(bundle "$id" "$mem" "$layer_mib" "$key"); run_arch "$id" "$b"; wait_ready "$b"
      sync; t0=$(seconds); checkpoint "$id"; t1=$(seconds)
      record "{\"kind\": \"first\", \"mem\": $mem, \"what\": \"$storage $m\", \"secs\": $(elapsed "$t0" "$t1"), \"bytes\": $(written "$storage" "$key")}"
      phases "first, $storage $m ($mem MiB, run $r)" "$key"
      drop "$id"; unbundle "$id"; rm -rf "${ckroot:?}/$key"
    done
    # ... vs runc checkpoint + tar | zstd of the upperdir + sync -f
    n=$((n + 1)); id=f$n; img=$work/plain-$n; mkdir -p "$img"
    b=$(bundle "$id" "$mem" "$layer_mib" "plain-$n")
    "$runc" --root "$root" run -d --bundle "$b" "$id" </dev/null >/dev/null 2>&1; wait_ready "$b"
    sync; t0=$(seconds)
    "$runc" --root "$root" checkpoint --image-path "$img/images" --work-path "$img/work" --file-locks "$id"
    tar -C "$b/upper" -cf - . | zstd -1 -T0 -q >"$img/rootfs.tar.zst"
    t1=$(seconds); sync -f "$img/rootfs.tar.zst"; t2=$(seconds)
    record "{\"kind\": \"first\", \"mem\": $mem, \"what\": \"plain\", \"secs\": $(elapsed "$t0" "$t2"), \"unsynced_secs\": $(elapsed "$t0" "$t1"), \"bytes\": $(du -sb "$img" | cut -f1)}"
    drop "$id"; unbundle "$id"; rm -rf "$img"
  done
done

# --- against Podman: checkpoint --export --compress zstd, restore --import ---
podman_error=
if [ "${#podman_sizes[@]}" -gt 0 ]; then
  if ! command -v podman >/dev/null; then
    podman_error="podman is not installed"
  else
    image=localhost/arch-bench-inc-$$
    pname=arch-bench-inc-$$
    # shellcheck disable=SC2016 # hooks expand when they run
    on_cleanup 'podman ps -aq --filter "name=^$pname-" | xargs -r podman rm -f -t 0 >/dev/null 2>&1; podman rmi -f "$image" >/dev/null 2>&1'
    podman_out=$work/podman.out
    # podman_run NAME MEM: the workload in a Podman container, ready
    podman_run() {
      podman run -d --name "$1" --network none --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
        "$image" /workload "$2" "$layer_mib" /data/layer >/dev/null 2>"$podman_out" || return 1
      for _ in $(seq 600); do
        podman exec "$1" /bin/sh -c 'test -f /data/ready' 2>/dev/null && return 0
        sleep 0.1
      done
      echo "the workload in $1 is not ready" >"$podman_out"; return 1
    }
    if ! tar -C "$lower" -c . | podman import - "$image" >/dev/null 2>"$podman_out"; then
      podman_error="podman import: $(cat "$podman_out")"
    fi
  fi
  for mem in "${podman_sizes[@]}"; do
    for r in $(seq "$repeat"); do
      # ARCH, Network FS mode, chunks: a first checkpoint (the container stops), then its restore
      use_config chunks network-fs
      n=$((n + 1)); id=a$n; key=podman-$n
      b=$(bundle "$id" "$mem" "$layer_mib" "$key"); run_arch "$id" "$b"; wait_ready "$b"
      sync; t0=$(seconds); checkpoint "$id"; t1=$(seconds); ck=$(elapsed "$t0" "$t1")
      drop "$id"; unbundle "$id"
      b=$(bundle "${id}r" "$mem" "$layer_mib" "$key")
      sync; t0=$(seconds); run_arch "${id}r" "$b"; t1=$(seconds)
      restored "${id}r"; rs=$(elapsed "$t0" "$t1"); drop "${id}r"; unbundle "${id}r"; rm -rf "${ckroot:?}/$key"
      record "{\"kind\": \"arch-podman\", \"mem\": $mem, \"ck_s\": $ck, \"restore_s\": $rs}"
      echo "  ARCH Network FS chunks, $mem MiB, run $r: checkpoint $ck s, restore $rs s" >&2
      [ -z "$podman_error" ] || continue
      # Podman: the same workload, checkpoint exported with zstd, removed, restored from the export
      name=$pname-$n; export_file=$work/podman-$n.tar.zst
      if ! podman_run "$name" "$mem"; then
        podman_error="podman run: $(cat "$podman_out")"; continue
      fi
      sync; t0=$(seconds)
      if ! podman container checkpoint --export "$export_file" --compress zstd "$name" >/dev/null 2>"$podman_out"; then
        podman_error="podman container checkpoint --export --compress zstd: $(cat "$podman_out")"
        podman rm -f -t 0 "$name" >/dev/null 2>&1 || true; continue
      fi
      t1=$(seconds); sync -f "$export_file"; t2=$(seconds)
      ck=$(elapsed "$t0" "$t1"); ck_sync=$(elapsed "$t0" "$t2")
      podman rm -f -t 0 "$name" >/dev/null
      sync; t0=$(seconds)
      if ! podman container restore --import "$export_file" >/dev/null 2>"$podman_out"; then
        podman_error="podman container restore --import: $(cat "$podman_out")"
        podman rm -f -t 0 "$name" >/dev/null 2>&1 || true; rm -f "$export_file"; continue
      fi
      t1=$(seconds); rs=$(elapsed "$t0" "$t1")
      podman rm -f -t 0 "$name" >/dev/null; rm -f "$export_file"
      record "{\"kind\": \"podman\", \"mem\": $mem, \"ck_s\": $ck, \"ck_sync_s\": $ck_sync, \"restore_s\": $rs}"
      echo "  Podman, $mem MiB, run $r: checkpoint $ck s ($ck_sync s with sync -f), restore $rs s" >&2
    done
  done
  if [ -n "$podman_error" ]; then echo "Podman failed: $podman_error" >&2; fi
fi

mkdir -p "$repo/target/bench"
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
versions="$("$runc" --version | head -1); CRIU $(criu --version | sed -n 's/^Version: //p')"
if command -v podman >/dev/null; then versions="$versions; $(podman --version)"; fi
printf '%s' "$podman_error" >"$work/podman-error"
python3 - "$runs" "$layer_mib" "$repeat" "${modes[*]}" "$(nproc)" "$load_start" "$load_end" "$versions" \
  "$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)" "$work/podman-error" <<'PY' | tee "$repo/target/bench/incremental.md"
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
layer, repeat, modes, cores, load_start, load_end, versions, commit = sys.argv[2:10]
podman_error = open(sys.argv[10]).read().strip()

def med(xs):
    xs = sorted(xs)
    return xs[(len(xs) - 1) // 2]
def pick(kind, mem, field, **match):
    return med([r[field] for r in runs if r["kind"] == kind and r["mem"] == mem
                and all(r.get(k) == v for k, v in match.items())])
def mib(b):
    return f"{b / 2**20:.1f} MiB" if b < 10 * 2**20 else f"{b / 2**20:.0f} MiB"
def verdict(ratio, target):
    return "met" if ratio <= target else "**not met**"
mems = lambda kind: sorted({r["mem"] for r in runs if r["kind"] == kind})

for mode in modes.split():
    print(f"### Second checkpoint (`--leave-running`, after a step), {mode} mode")
    print()
    print("| memory | storage | gen 1 time | gen 1 written | gen 2 time | gen 2 written "
          "| gen 2 / gen 1 written (target ≤ 15%) | gen 2 / gen 1 time (target ≤ 50%) |")
    print("|---|---|---|---|---|---|---|---|")
    for m in mems("inc"):
        for s in ("chunks", "files"):
            g1s, g1b, g2s, g2b = (pick("inc", m, f, storage=s, mode=mode) for f in ("g1_s", "g1_bytes", "g2_s", "g2_bytes"))
            wr, tr = g2b / g1b, g2s / g1s
            tail = f"{wr:.1%} ({verdict(wr, 0.15)}) | {tr:.0%} ({verdict(tr, 0.50)})" if s == "chunks" else f"{wr:.0%} | {tr:.0%}"
            print(f"| {m} MiB | {s} | {g1s:.2f} s | {mib(g1b)} | {g2s:.2f} s | {mib(g2b)} | {tail} |")
    print()
    print(f"### Frozen time of gen 2 and its restore, {mode} mode")
    print()
    print("| memory | chunks: gen 2 frozen | files: gen 2 frozen | `runc checkpoint --leave-running` alone "
          "| chunks / runc (target ≤ 1.10x) | restore of gen 2, chunks | same, files | chunks / files (target ≤ 1.10x) |")
    print("|---|---|---|---|---|---|---|---|")
    for m in mems("inc"):
        fc, ff = (pick("inc", m, "g2_freeze_ms", storage=s, mode=mode) / 1000 for s in ("chunks", "files"))
        fp = pick("plain-freeze", m, "secs")
        rc, rf = (pick("inc", m, "restore_s", storage=s, mode=mode) for s in ("chunks", "files"))
        print(f"| {m} MiB | {fc:.2f} s | {ff:.2f} s | {fp:.2f} s | {fc / fp:.2f}x ({verdict(fc / fp, 1.10)}) "
              f"| {rc:.2f} s | {rf:.2f} s | {rc / rf:.2f}x ({verdict(rc / rf, 1.10)}) |")
    print()
print("### First checkpoint (the container stops; nothing to share)")
print()
print("| memory | mode | chunks | written | against | its time | written | chunks / it (target ≤ 1.10x) |")
print("|---|---|---|---|---|---|---|---|")
for m in mems("first"):
    for md, other, label in (("basic", "files basic", "files storage"),
                             ("network-fs", "files network-fs", "files storage"),
                             ("network-fs", "plain", "`runc checkpoint` + tar\\|zstd + `sync -f`")):
        cs, cb = (pick("first", m, f, what=f"chunks {md}") for f in ("secs", "bytes"))
        os_, ob = (pick("first", m, f, what=other) for f in ("secs", "bytes"))
        print(f"| {m} MiB | {md} | {cs:.2f} s | {mib(cb)} | {label} | {os_:.2f} s | {mib(ob)} "
              f"| {cs / os_:.2f}x ({verdict(cs / os_, 1.10)}) |")
print()
print("Without its `sync -f`, the plain pair took " + ", ".join(
    f"{pick('first', m, 'unsynced_secs', what='plain'):.2f} s at {m} MiB" for m in mems("first")) + ".")
print()
pm = mems("arch-podman")
if pm:
    print("### Against Podman (`podman container checkpoint --export F --compress zstd`, `podman container restore --import F`)")
    print()
    print("| memory | ARCH checkpoint (Network FS, chunks) | Podman checkpoint | same + `sync -f` | Podman / ARCH "
          "| ARCH restore | Podman restore | Podman / ARCH |")
    print("|---|---|---|---|---|---|---|---|")
    for m in pm:
        ac, ar = pick("arch-podman", m, "ck_s"), pick("arch-podman", m, "restore_s")
        if any(r["kind"] == "podman" and r["mem"] == m for r in runs):
            pc, ps, pr = (pick("podman", m, f) for f in ("ck_s", "ck_sync_s", "restore_s"))
            print(f"| {m} MiB | {ac:.2f} s | {pc:.2f} s | {ps:.2f} s | {pc / ac:.2f}x | {ar:.2f} s | {pr:.2f} s | {pr / ar:.2f}x |")
        else:
            print(f"| {m} MiB | {ac:.2f} s | failed (below) | | | {ar:.2f} s | failed (below) | |")
    print()
    if podman_error:
        print("Podman did not complete on this machine; its error (the rows without Podman figures "
              "were not measured):")
        print()
        print("```")
        print(podman_error[-3000:])
        print("```")
        print()
print(f"Writable layer: {layer} MiB in {int(layer) // 4} files; a step rewrites a contiguous tenth of the "
      f"memory and writes 50 MiB of new files. Medians of {repeat} runs; ratios are of the medians. "
      f"`sync` before each timed step. {cores} cores; {versions}; ARCH at {commit}. "
      f"Load average (1, 5, 15 min) before the runs: {load_start}; after: {load_end}.")
PY
