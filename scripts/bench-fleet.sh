#!/usr/bin/env bash
# bench-fleet.sh [--quick]: what the fleet catalog costs.
#   1. arch-runc's path: an ARCH-handled call that records a fleet event (`arch-runc
#      checkpoint` of an ARCH container, against a fake runc so that only ARCH's own work is
#      timed: the take fails at once and is recorded) with fleet_table unset and set, in the
#      order set, unset, unset, set (so that drift over the run cancels); and a pass-through
#      call (`arch-runc state`) with it unset and set.
#   2. shipping: 10,000 queued events (100 keys) to moto's DynamoDB-compatible server by
#      `archctl fleet ship` (one round of what `archctl watch` does), wall time.
# Needs hyperfine and moto (scripts/setup.sh --test). Prints a markdown table (also saved to
# target/bench/fleet.md); the recorded figures live in docs/performance.md. Not a test.
set -euo pipefail
umask 022
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=1000 events=10000
[ "${1:-}" = --quick ] && runs=100 events=2000
moto=${ARCH_MOTO_SERVER:-/opt/arch-test/moto/bin/moto_server}
command -v hyperfine >/dev/null || { echo "bench-fleet: needs hyperfine (scripts/setup.sh --test)" >&2; exit 1; }
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
config() { # config NAME [FLEET_JSON]
  cat >"$work/$1.json" <<JSON
{"state_dir": "$work/state-$1", "log_file": "$work/arch-$1.log", "cache_dir": "$work/cache",
 "modules_dir": "$work/modules", "runc": "$work/runc", "checkpoint_dir": "$work/ck-$1" ${2:+, $2}}
JSON
}
fleet='"fleet_table": "arch-bench", "fleet_region": "us-east-1", "fleet_endpoint": "http://127.0.0.1:'$port'", "fleet_node": "bench"'
config off
config on "$fleet, \"fleet_outbox_bytes\": 1073741824"
for c in off on; do
  ARCH_CONFIG=$work/$c.json "$bin/arch-runc" create --bundle "$work/bundle" bench >/dev/null 2>&1
done

mkdir -p "$repo/target/bench"
out=$repo/target/bench/fleet.md
hyperfine -N --warmup 20 --runs "$runs" --export-markdown "$work/path.md" \
  -n "checkpoint (ARCH-handled), fleet set, 1st" "env ARCH_CONFIG=$work/on.json $bin/arch-runc checkpoint bench" \
  -n "checkpoint (ARCH-handled), fleet unset, 1st" "env ARCH_CONFIG=$work/off.json $bin/arch-runc checkpoint bench" \
  -n "checkpoint (ARCH-handled), fleet unset, 2nd" "env ARCH_CONFIG=$work/off.json $bin/arch-runc checkpoint bench" \
  -n "checkpoint (ARCH-handled), fleet set, 2nd" "env ARCH_CONFIG=$work/on.json $bin/arch-runc checkpoint bench" \
  -n "state (pass-through), fleet unset" "env ARCH_CONFIG=$work/off.json $bin/arch-runc state bench" \
  -n "state (pass-through), fleet set" "env ARCH_CONFIG=$work/on.json $bin/arch-runc state bench" >/dev/null
queued=$(ARCH_CONFIG=$work/on.json "$bin/archctl" fleet status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pending"])')

# Shipping: a fresh outbox of $events events, 100 keys.
rm -rf "$work/state-on/fleet-outbox"
mkdir -p "$work/state-on/fleet-outbox"
python3 - "$work/state-on/fleet-outbox/current" "$events" <<'PY'
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

# ARCH's own time per call (its log's duration_us: argv in to exit or exec), medians.
own=$(python3 - "$work" <<'PY'
import json, statistics, sys
work = sys.argv[1]
def own(config, sub):
    xs = [r["duration_us"] / 1000 for r in map(json.loads, open(f"{work}/arch-{config}.log"))
          if r.get("target") == "arch::invocation" and r.get("subcommand") == sub]
    return statistics.median(xs) if xs else float("nan")
c_off, c_on, s_off, s_on = own("off", "checkpoint"), own("on", "checkpoint"), own("off", "state"), own("on", "state")
print("| ARCH's own time (median, from its log) | fleet unset | fleet set | difference |")
print("|---|---|---|---|")
print(f"| `checkpoint` (ARCH-handled, one event appended) | {c_off:.3f} ms | {c_on:.3f} ms | {c_on - c_off:+.3f} ms |")
print(f"| `state` (pass-through) | {s_off:.3f} ms | {s_on:.3f} ms | {s_on - s_off:+.3f} ms |")
PY
)

{
  echo "arch-runc's path ($runs runs each; the checkpoint calls appended $queued events in all):"
  echo
  cat "$work/path.md"
  echo
  echo "$own"
  echo
  echo "| shipping | events | wall time | events/s | result |"
  echo "|---|---|---|---|---|"
  echo "| \`archctl fleet ship\` to moto_server | $events | ${ship_s} s | $rate | $shipped |"
} | tee "$out"
