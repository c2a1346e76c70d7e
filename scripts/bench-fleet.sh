#!/usr/bin/env bash
# bench-fleet.sh [--quick]: what the fleet catalog costs.
#   1. arch-runc's path: an ARCH-handled call that records a fleet event (`arch-runc
#      checkpoint` of an ARCH container, against a fake runc so that only ARCH's own work is
#      timed: the take fails at once and is recorded) with fleet_table unset and set, as
#      pairs of calls back to back (which goes first alternates); and a pass-through call
#      (`arch-runc state`) the same way.
#   2. shipping: 10,000 queued events (100 keys) to moto's DynamoDB-compatible server by
#      `archctl fleet ship` (one round of what `archctl watch` does), wall time.
#   With ARCH_BEFORE_BIN_DIR set (an older build's binaries): also that build against this
#   one, fleet unset, the same calls in the same pairs (what the change costs with no fleet).
# Needs moto (scripts/setup.sh --test). Prints a markdown table (also saved to
# target/bench/fleet.md); the recorded figures live in docs/performance.md. Not a test.
set -euo pipefail
umask 022
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=1000 events=10000
[ "${1:-}" = --quick ] && runs=100 events=2000
moto=${ARCH_MOTO_SERVER:-/opt/arch-test/moto/bin/moto_server}
[ -x "$moto" ] || { echo "bench-fleet: needs moto at $moto (scripts/setup.sh --test)" >&2; exit 1; }
if [ -n "${ARCH_BIN_DIR:-}" ]; then
  bin=$ARCH_BIN_DIR
else
  (cd "$repo" && cargo build --release --quiet)
  bin=$(bash "$repo/scripts/bin-dir.sh")
fi

work=$(mktemp -d /tmp/arch-bench-fleet.XXXXXX)
chmod 755 "$work"
moto_pid=
cleanup() {
  [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# A runc that does nothing and succeeds: the calls time ARCH alone.
printf '#!/bin/sh\nexit 0\n' >"$work/runc"
chmod 755 "$work/runc"
mkdir -p "$work/bundle/rootfs" "$work/modules"
python3 - "$work/bundle/config.json" <<'PY'
import json, sys
json.dump({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
           "process": {"args": ["true"], "env": ["ARCH_ENABLE=1"], "cwd": "/", "user": {"uid": 0, "gid": 0}}},
          open(sys.argv[1], "w"))
PY
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
config() { # config NAME [FLEET_JSON]: both configs share every directory, only the log differs
  cat >"$work/$1.json" <<JSON
{"state_dir": "$work/state", "log_file": "$work/arch-$1.log", "cache_dir": "$work/cache",
 "modules_dir": "$work/modules", "runc": "$work/runc", "checkpoint_dir": "$work/ck" ${2:+, $2}}
JSON
}
fleet='"fleet_table": "arch-bench", "fleet_region": "us-east-1", "fleet_endpoint": "http://127.0.0.1:'$port'", "fleet_node": "bench"'
config off
config on "$fleet, \"fleet_outbox_bytes\": 1073741824"
ARCH_CONFIG=$work/off.json "$bin/arch-runc" create --bundle "$work/bundle" bench >/dev/null 2>&1

mkdir -p "$repo/target/bench"
out=$repo/target/bench/fleet.md
# Calls in pairs, fleet set and unset one after the other, which one goes first alternating:
# timing whole blocks of one kind after another measured the machine's drift between blocks
# (0.4 to 0.8 ms either way), not the fleet. Warm-up first, not counted.
# Both builds run from fresh copies side by side in $work: the same binary ran 0.2 ms slower
# per call from its place in target/ than from a fresh copy (measured; where a file's pages
# sit matters at this scale), which is larger than what is measured here.
before_bin=${ARCH_BEFORE_BIN_DIR:-}
mkdir -p "$work/this" "$work/before"
cp "$bin/arch-runc" "$work/this/"
[ -n "$before_bin" ] && cp "$before_bin/arch-runc" "$work/before/"
call() { # call NAME SUB: NAME's config, with the before build's arch-runc for "before"
  local b=$work/this; [ "$1" = before ] && b=$work/before
  ARCH_CONFIG=$work/$1.json "$b/arch-runc" "$2" bench >/dev/null 2>&1 || true
}
pairs() { # pairs A B: $runs pairs of each call, A and B back to back; logs kept as pairs-A-B-*.log
  for _ in $(seq 20); do call "$1" checkpoint; call "$2" checkpoint; call "$1" state; call "$2" state; done
  : >"$work/arch-$1.log"; : >"$work/arch-$2.log"
  for i in $(seq "$runs"); do
    first=$1 second=$2; [ $((i % 2)) = 0 ] && first=$2 second=$1
    call "$first" checkpoint; call "$second" checkpoint
    call "$first" state; call "$second" state
  done
  cp "$work/arch-$1.log" "$work/pairs-$1-$2-a.log"; cp "$work/arch-$2.log" "$work/pairs-$1-$2-b.log"
}
pairs off on
if [ -n "$before_bin" ]; then
  config before
  pairs before off
fi
queued=$(ARCH_CONFIG=$work/on.json "$bin/archctl" fleet status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pending"])')

# Shipping: a fresh outbox of $events events, 100 keys.
rm -rf "$work/state/fleet-outbox"
mkdir -p "$work/state/fleet-outbox"
python3 - "$work/state/fleet-outbox/current" "$events" <<'PY'
import json, sys, time
path, n = sys.argv[1], int(sys.argv[2])
now = int(time.time() * 1000)
with open(path, "w") as f:
    for i in range(n):
        f.write(json.dumps({"kind": "checkpoint", "at_ms": now + i, "node": "bench", "id": f"1-{i}",
                            "key": f"default/job{i % 100}", "outcome": "success", "generation": f"g{i}",
                            "container": f"default/job{i % 100}", "trigger": "interval",
                            "images_bytes": 123456789, "rootfs_bytes": 4567, "written_bytes": 89012,
                            "duration_ms": 1234}) + "\n")
PY
"$moto" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto_pid=$!
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && break; sleep 0.2; done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_EC2_METADATA_DISABLED=true
ARCH_CONFIG=$work/on.json "$bin/archctl" fleet create-table >/dev/null
t0=$(date +%s.%N)
shipped=$(ARCH_CONFIG=$work/on.json "$bin/archctl" fleet ship)
t1=$(date +%s.%N)
ship_s=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
rate=$(python3 -c "print(int($events / ($t1 - $t0)))")

# ARCH's own time per call (its log's duration_us: argv in to exit or exec): medians, and
# the median of the pairs' differences (each pair run back to back).
own=$(python3 - "$work" "${before_bin:+before}" <<'PY'
import json, statistics, sys
work, before = sys.argv[1], sys.argv[2]
def own(path, sub):
    return [r["duration_us"] / 1000 for r in map(json.loads, open(path))
            if r.get("target") == "arch::invocation" and r.get("subcommand") == sub]
def table(a, b, head_a, head_b):
    print(f"| ARCH's own time per call | {head_a} (median) | {head_b} (median) | second minus first, median of pairs |")
    print("|---|---|---|---|")
    for sub, what in (("checkpoint", "`checkpoint` (ARCH-handled; one event appended with the fleet set)"),
                      ("state", "`state` (pass-through)")):
        xs, ys = own(f"{work}/pairs-{a}-{b}-a.log", sub), own(f"{work}/pairs-{a}-{b}-b.log", sub)
        pairs = statistics.median(y - x for x, y in zip(xs, ys))
        print(f"| {what} | {statistics.median(xs):.3f} ms | {statistics.median(ys):.3f} ms | {pairs * 1000:+.0f} µs ({len(xs)} pairs) |")
table("off", "on", "fleet unset", "fleet set")
if before:
    print()
    table("before", "off", "before build, fleet unset", "this build, fleet unset")
PY
)

{
  echo "arch-runc's path ($runs pairs of each call; the checkpoint calls appended $queued events in all):"
  echo
  echo "$own"
  echo
  echo "| shipping | events | wall time | events/s | result |"
  echo "|---|---|---|---|---|"
  echo "| \`archctl fleet ship\` to moto_server | $events | ${ship_s} s | $rate | $shipped |"
} | tee "$out"
