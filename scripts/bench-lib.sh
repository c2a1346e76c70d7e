# bench-lib.sh: what the checkpoint benchmarks share. Sourced (not run) by
# bench-checkpoint.sh, bench-spot.sh and bench-incremental.sh, after `set -euo pipefail`, with
# $repo set to the repository. Needs root.
#
#   bench_init PREFIX    binaries ($bin, or $ARCH_BIN_DIR), $runc, a work
#                        directory $work under /var/tmp with its runc root
#                        $root, the static workload, the busybox lower dir,
#                        runc's default spec; installs the cleanup trap
#   bench_config [JSON]  writes $work/config.json (ARCH's host config for the
#                        bench, plus the extra `"field": value` pairs given),
#                        exports ARCH_CONFIG and sets $ckroot (where the
#                        generations go: Basic or Network FS mode, from
#                        $ARCH_BENCH_MODE)
#   bundle NAME MEM [LAYER_MIB] [KEY]   a bundle on a fresh overlay
#   unbundle NAME        unmounts and removes it
#   wait_ready BUNDLE    until its workload has filled memory and layer
#   run_arch ID BUNDLE   arch-runc create + start
#   drop ID              runc delete -f
#   seconds, elapsed T0 T1, med VALUES...
#   on_cleanup COMMAND   run COMMAND first when the script exits, however it exits
#
# The variables set here are for the callers; $repo and $layer_mib are theirs.
# shellcheck shell=bash disable=SC2034,SC2154

# The config must be root's alone, or ARCH ignores it (reference: Trust).
umask 022

cleanup_hooks=()
on_cleanup() { cleanup_hooks+=("$1"); }

bench_cleanup() {
  local hook id m
  set +e
  for hook in "${cleanup_hooks[@]}"; do eval "$hook"; done
  if [ -n "${work:-}" ] && [ -d "$work" ]; then
    for id in $("$runc" --root "$root" list -q 2>/dev/null); do
      "$runc" --root "$root" delete -f "$id" >/dev/null 2>&1
    done
    grep -o " $work/[^ ]*/rootfs" /proc/self/mountinfo | while read -r m; do umount "$m" 2>/dev/null; done
    rm -rf "$work"
  fi
}

bench_init() {
  # ARCH_BIN_DIR: bench the arch-runc in that directory instead (e.g. an older build, side by side).
  if [ -n "${ARCH_BIN_DIR:-}" ]; then
    bin=$ARCH_BIN_DIR
  else
    (cd "$repo" && cargo build --release --quiet)
    bin=$(bash "$repo/scripts/bin-dir.sh")
  fi
  runc=$(command -v runc)
  work=$(mktemp -d "/var/tmp/$1.XXXXXX")
  root=$work/runc-root
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  rustc -O --edition 2021 --target x86_64-unknown-linux-musl -C target-feature=+crt-static \
    "$repo/bench/workload.rs" -o "$work/workload"
  lower=$work/lower
  mkdir -p "$lower/bin" "$lower/data" "$lower/tmp" "$lower/proc" "$lower/dev" "$lower/sys"
  cp "$(command -v busybox)" "$lower/bin/busybox"; ln -s busybox "$lower/bin/sh"
  cp "$work/workload" "$lower/workload"
  mkdir -p "$work/spec" && (cd "$work/spec" && "$runc" spec) && mv "$work/spec/config.json" "$work/spec.json"
}

bench_config() {
  cat >"$work/config.json" <<JSON
{"state_dir": "$work/state", "log_file": "$work/arch.log", "cache_dir": "$work/cache",
 "modules_dir": "$work/modules", "checkpoint_dir": "$work/checkpoints", "runc": "$runc", "keep_generations": 1,
 "mode": "${ARCH_BENCH_MODE:-basic}", "network_fs_dir": "$work/netfs"${1:+,
 $1}}
JSON
  mkdir -p "$work/netfs"
  export ARCH_CONFIG=$work/config.json
  ckroot=$work/checkpoints
  if [ "${ARCH_BENCH_MODE:-basic}" = network-fs ]; then ckroot=$work/netfs; fi
}

# bundle NAME MEM [LAYER_MIB] [KEY] -> a bundle whose rootfs is a fresh overlay
# (empty upperdir), running the workload with MEM MiB of memory and a layer of
# LAYER_MIB (default $layer_mib), ARCH-enabled with key KEY (default bench-MEM)
bundle() {
  local b=$work/b-$1
  mkdir -p "$b/rootfs" "$b/upper" "$b/ovl-work"
  mount -t overlay overlay -o "lowerdir=$lower,upperdir=$b/upper,workdir=$b/ovl-work" "$b/rootfs"
  python3 - "$work/spec.json" "$b/config.json" "$2" "${3:-$layer_mib}" "${4:-bench-$2}" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["process"]["terminal"] = False
c["process"]["args"] = ["/workload", sys.argv[3], sys.argv[4], "/data/layer"]
c["process"]["env"] += ["ARCH_ENABLE=1", f"ARCH_CHECKPOINT_KEY={sys.argv[5]}"]
c["root"] = {"path": "rootfs", "readonly": False}
json.dump(c, open(sys.argv[2], "w"))
PY
  echo "$b"
}
unbundle() { umount "$work/b-$1/rootfs" 2>/dev/null || true; rm -rf "${work:?}/b-$1"; }
wait_ready() { for _ in $(seq 600); do [ -f "$1/upper/data/ready" ] && return; sleep 0.1; done; echo "workload not ready" >&2; exit 1; }
run_arch() { # run_arch ID BUNDLE: create through arch-runc (restores if a checkpoint exists), start
  "$bin/arch-runc" --root "$root" create --bundle "$2" "$1" </dev/null >/dev/null 2>&1
  "$bin/arch-runc" --root "$root" start "$1"
}
drop() { "$runc" --root "$root" delete -f "$1" >/dev/null 2>&1 || true; }
seconds() { python3 -c "import time; print(f'{time.time():.4f}')"; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
