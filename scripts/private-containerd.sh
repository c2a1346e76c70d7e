#!/usr/bin/env bash
# private-containerd.sh start|stop|restart DIR: a containerd of its own (root, state,
# sockets and log under DIR) so that tests and the demo never touch the
# machine's containerd. `start` prints nothing and returns once the socket
# answers; the address is DIR/containerd.sock. Environment (ARCH_CONFIG...)
# is inherited by the shims and so by arch-runc. `restart` stops only the
# containerd process (tasks and their shims live on) and starts it again.
set -euo pipefail
cmd=$1
dir=$(realpath -m "$2")
sock=$dir/containerd.sock

stop_daemon() {
  if [ -f "$dir/containerd.pid" ]; then
    pid=$(cat "$dir/containerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/containerd.pid"
  fi
}

if [ "$cmd" = restart ]; then
  stop_daemon
  exec bash "$0" start "$dir"
fi

case $cmd in
start)
  mkdir -p "$dir"
  cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = "$dir/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
TOML
  setsid containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 </dev/null &
  echo $! >"$dir/containerd.pid"
  for _ in $(seq 100); do
    ctr --address "$sock" version >/dev/null 2>&1 && exit 0
    sleep 0.1
  done
  echo "private containerd did not start; see $dir/containerd.log" >&2
  tail -20 "$dir/containerd.log" >&2
  exit 1
  ;;
stop)
  if [ -S "$sock" ]; then
    for ns in $(ctr --address "$sock" namespaces ls -q 2>/dev/null); do
      for t in $(ctr --address "$sock" -n "$ns" tasks ls -q 2>/dev/null); do
        ctr --address "$sock" -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
        ctr --address "$sock" -n "$ns" tasks delete -f "$t" >/dev/null 2>&1 || true
      done
      for c in $(ctr --address "$sock" -n "$ns" containers ls -q 2>/dev/null); do
        ctr --address "$sock" -n "$ns" containers delete "$c" >/dev/null 2>&1 || true
      done
    done
  fi
  stop_daemon
  # Snapshots and shm mounts left by killed tasks would keep DIR busy.
  { grep -o " $dir/[^ ]*" /proc/self/mountinfo || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  ;;
*)
  echo "usage: $0 start|stop|restart DIR" >&2
  exit 2
  ;;
esac
