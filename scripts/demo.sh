#!/usr/bin/env bash
# The README's main job: on a fresh Debian 12 machine (as root), install what
# is needed, build arch-runc, start a private containerd, run one container
# without and one with ARCH_ENABLE=1 through arch-runc, then checkpoint a
# counter, kill and delete it, run it again and watch it continue counting;
# then let it finish (exit 0) while `archctl watch` follows containerd, which
# removes its checkpoints, and show what archctl reports.
# Everything lives under $ARCH_DEMO_DIR (default /tmp/arch-demo); the machine's
# own containerd and /etc/arch are not touched.
set -euo pipefail
# The config it writes must be root's alone, or ARCH ignores it (reference: Trust).
umask 022
repo=$(cd "$(dirname "$0")/.." && pwd)
demo=${ARCH_DEMO_DIR:-/tmp/arch-demo}
ns=arch-demo

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing dependencies (scripts/setup.sh)"
bash "$repo/scripts/setup.sh"
say "building arch-runc (release)"
(cd "$repo" && cargo build --release --quiet)
bin=$(bash "$repo/scripts/bin-dir.sh")
arch_runc=$bin/arch-runc

bash "$repo/scripts/private-containerd.sh" stop "$demo/containerd" 2>/dev/null || true
rm -rf "$demo"
mkdir -p "$demo"
# The embedded default configuration, moved under the demo dir.
cat >"$demo/config.json" <<JSON
{
  "state_dir": "$demo/state",
  "log_file": "$demo/arch-runc.log",
  "cache_dir": "$demo/cache",
  "modules_dir": "$demo/modules",
  "checkpoint_dir": "$demo/checkpoints"
}
JSON
export ARCH_CONFIG=$demo/config.json
trap 'bash "$repo/scripts/private-containerd.sh" stop "$demo/containerd"' EXIT

say "starting a private containerd under $demo/containerd"
bash "$repo/scripts/private-containerd.sh" start "$demo/containerd"
ctr() { command ctr --address "$demo/containerd/containerd.sock" -n "$ns" "$@"; }

say "building and importing a busybox image (no registry)"
bash "$repo/scripts/make-image.sh" "$demo/image.tar"
ctr images import "$demo/image.tar"

say "a plain container through arch-runc (exit code 3 expected)"
set +e
ctr run --rm --runc-binary "$arch_runc" localhost/arch-busybox:latest plain \
  sh -c 'echo "hello from a plain container"; exit 3'
echo "ctr exit code: $?"
say "an ARCH-enabled container through arch-runc (exit code 4 expected)"
ctr run --rm --runc-binary "$arch_runc" --env ARCH_ENABLE=1 localhost/arch-busybox:latest armed \
  sh -c 'echo "hello from an ARCH-enabled container"; exit 4'
echo "ctr exit code: $?"
set -e

counter='i=0; [ -f /data/count ] && i=$(cat /data/count); while [ ! -f /stop ]; do i=$((i+1)); echo $i > /data/count; sleep 0.2; done'
count() { ctr tasks exec --exec-id "read-$RANDOM" counter cat /data/count; }
wait_stopped() { for _ in $(seq 50); do ctr tasks ls | grep -q "^counter .*STOPPED" && return; sleep 0.1; done; }

say "archctl watch follows containerd's task exits (the checkpoint lifecycle)"
"$bin/archctl" watch --containerd "$demo/containerd/containerd.sock" --sweep-secs 1 &
watch_pid=$!
trap 'kill $watch_pid 2>/dev/null; bash "$repo/scripts/private-containerd.sh" stop "$demo/containerd"' EXIT

say "a counter with ARCH_ENABLE=1, counting every 0.2 s in its writable layer (/data/count)"
ctr run -d --runc-binary "$arch_runc" --env ARCH_ENABLE=1 localhost/arch-busybox:latest counter sh -c "$counter"
sleep 3
echo "count now: $(count)"
say "checkpoint it (ctr task checkpoint: pause, checkpoint, resume)"
ctr tasks checkpoint counter >/dev/null 2>&1 || true
echo "count just after the checkpoint: $(count)"
find "$demo/checkpoints" -path '*generations/gen-*' -maxdepth 5 -type d | sed 's/^/published: /'
sleep 1
say "kill it (as a Spot reclaim would) and delete it"
echo "count before the kill: $(count)"
ctr tasks kill -s SIGKILL counter
wait_stopped
ctr tasks delete counter >/dev/null
ctr containers delete counter
say "run the same container again: ARCH restores the checkpoint instead of starting anew"
ctr run -d --runc-binary "$arch_runc" --env ARCH_ENABLE=1 localhost/arch-busybox:latest counter sh -c "$counter"
sleep 1
echo "count after the restore: $(count)   (a fresh start would be near 5)"
sleep 1
echo "and still counting:      $(count)"

say "archctl list / inspect: the counter's checkpoint"
"$bin/archctl" list
"$bin/archctl" inspect "$ns/counter" | sed -n '1,20p'
say "a kill keeps the checkpoints; the job finishing (exit 0) removes them"
ctr tasks exec --exec-id "stop-$RANDOM" counter touch /stop
wait_stopped
sleep 1.5
"$bin/archctl" list
grep -h '"arch::lifecycle"' "$demo/arch-runc.log" | sed 's/^/lifecycle: /'
say "metrics (archctl metrics, non-zero counters)"
"$bin/archctl" metrics | grep -v '^#' | grep -v ' 0$' | grep -v '_bucket' || true

say "ARCH's log ($ARCH_CONFIG -> $demo/arch-runc.log): one line per runc call"
python3 - "$demo/arch-runc.log" <<'PY' 2>/dev/null || cat "$demo/arch-runc.log"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("target") == "arch::invocation":
        print(f'{r["subcommand"] or "-":<8} {r["id"] or "-":<7} arch={str(r["arch_enabled"]).lower():<5} '
              f'{r["decision"]:<13} {r["reason"] or r["module"]:<32} {r["duration_us"]:>6} us')
    else:
        print(f'   {r["level"]:<5} {r.get("message", "")}')
PY
say "modules serving each subcommand (archctl modules list)"
"$bin/archctl" modules list
ctr tasks kill -s SIGKILL counter >/dev/null 2>&1 || true
