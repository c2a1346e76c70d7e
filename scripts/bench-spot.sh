#!/usr/bin/env bash
# bench-spot.sh: from a Spot interruption notice to published checkpoints.
# For 1 and 4 containers (COUNTS) of 512 MiB of memory each (MEM_MIB) with a
# 16 MiB writable layer (LAYER_MIB), side by side in one run:
#   spot:  `archctl watch` polling a stand-in for EC2's metadata service
#          (IMDSv2, in this script) at the default interval; the bench arms an
#          interruption notice at T0 and watch takes the final checkpoints
#          (up to max_concurrent_checkpoints, default 4, at once). Measured
#          from T0: watch saw it (trigger_fired_unix_ms), the first dump
#          started (created_unix_ms - phases_ms.dump), every generation
#          published (watch's "checkpoint published" lines);
#   hand:  `arch-runc checkpoint` of each of as many fresh containers, one
#          after another: total wall time;
#   plain: `runc checkpoint` + `tar | zstd -1 -T0` of the upperdir, one
#          after another: total wall time, and the same followed by `sync -f`.
# Also the bytes ARCH wrote (metadata: images_bytes + rootfs_archive_bytes),
# the write rate, and the memory that fits in a two-minute notice at that
# rate, after a margin (MARGIN_SECS, default 30) and the poll interval.
# ARCH_BENCH_MODE=network-fs benches Network FS mode (a local directory as the
# root). Medians of $REPEAT runs (default 3). Results go to
# target/bench/spot.md (spot-network-fs.md). Needs root. Not a test.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
read -r -a counts <<<"${COUNTS:-1 4}"
mem=${MEM_MIB:-512}
layer_mib=${LAYER_MIB:-16}
repeat=${REPEAT:-3}
margin=${MARGIN_SECS:-30}
mode=${ARCH_BENCH_MODE:-basic}
poll=2 # spot_poll_interval_secs: the default, not written to the config
# shellcheck source=scripts/bench-lib.sh
. "$repo/scripts/bench-lib.sh"
bench_init arch-bench-spot

# The stand-in for IMDSv2: a token for PUT /latest/api/token, 401 without it,
# 404 everywhere except the instance action once the bench has armed a notice
# (the file $work/notice exists; its content is the answer). Each GET of the
# instance action is noted (unix ms, status) in $work/imds-polls.
cat >"$work/imds.py" <<'PY'
import http.server, os, secrets, sys, time
notice, polls, port_file = sys.argv[1:4]
token = secrets.token_hex(16).encode()
class Imds(http.server.BaseHTTPRequestHandler):
    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_PUT(self):
        ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self.answer(200, token) if ok else self.answer(400)
    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token", "").encode() != token:
            return self.answer(401)
        if self.path != "/latest/meta-data/spot/instance-action":
            return self.answer(404)
        try:
            body, status = open(notice, "rb").read(), 200
        except FileNotFoundError:
            body, status = b"", 404
        with open(polls, "a") as f:
            f.write(f"{int(time.time() * 1000)} {status}\n")
        self.answer(status, body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Imds)
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.rename(port_file + ".tmp", port_file)
server.serve_forever()
PY
python3 "$work/imds.py" "$work/notice" "$work/imds-polls" "$work/imds-port" >"$work/imds.out" 2>&1 &
# shellcheck disable=SC2034 # imds_pid is read by the cleanup hook
imds_pid=$!
# shellcheck disable=SC2016 # hooks expand when they run
on_cleanup 'kill "$imds_pid" 2>/dev/null; wait "$imds_pid" 2>/dev/null'
for _ in $(seq 100); do [ -s "$work/imds-port" ] && break; sleep 0.1; done
[ -s "$work/imds-port" ] || { echo "the IMDS stand-in did not start: $(cat "$work/imds.out")" >&2; exit 1; }
bench_config "\"spot_metadata_endpoint\": \"http://127.0.0.1:$(cat "$work/imds-port")\""
log=$work/arch.log
touch "$log"

# watch runs without containerd (nothing listens at this socket): its Spot
# poller starts before it connects, and records come from `arch-runc create`.
watch_pid=
start_watch() {
  local from
  from=$(wc -l <"$log")
  "$bin/archctl" watch --containerd "$work/no-containerd.sock" --sweep-secs 3600 >>"$work/watch.out" 2>&1 &
  watch_pid=$!
  for _ in $(seq 100); do
    tail -n +"$((from + 1))" "$log" | grep -q '"message":"watching the metadata service for Spot notices"' && return
    sleep 0.1
  done
  echo "archctl watch is not polling the stand-in; its output: $(cat "$work/watch.out")" >&2; exit 1
}
# Stops watch, and lets any arch-runc it started finish first (up to 5 minutes).
stop_watch() {
  [ -n "$watch_pid" ] || return 0
  local children c
  children=$(cat /proc/"$watch_pid"/task/*/children 2>/dev/null || true)
  kill "$watch_pid" 2>/dev/null || true
  wait "$watch_pid" 2>/dev/null || true
  for c in $children; do timeout 300 tail --pid="$c" -f /dev/null || true; done
  watch_pid=
}
# shellcheck disable=SC2016
on_cleanup 'rm -f "$work/notice"; stop_watch'

# ARCH's delete moves its record to ended/, as through containerd: watch does
# not ask runc about containers long gone at every notice.
arch_drop() { "$bin/arch-runc" --root "$root" delete -f "$1" >/dev/null 2>&1 || drop "$1"; }
# start_containers TAG N [plain]: N fresh containers TAG-1..N (keys
# bench-TAG-i), through arch-runc (or plain runc), each with its workload ready.
start_containers() {
  local i b
  for i in $(seq "$2"); do
    b=$(bundle "$1-$i" "$mem" "$layer_mib" "bench-$1-$i")
    if [ "${3:-}" = plain ]; then
      "$runc" --root "$root" run -d --bundle "$b" "$1-$i" </dev/null >/dev/null 2>&1
    else
      run_arch "$1-$i" "$b"
    fi
  done
  for i in $(seq "$2"); do wait_ready "$work/b-$1-$i"; done
}
remove_containers() { # TAG N
  local i
  for i in $(seq "$2"); do arch_drop "$1-$i"; unbundle "$1-$i"; rm -rf "${ckroot:?}/bench-$1-$i"; done
}
now_ms() { python3 -c "import time; print(int(time.time() * 1000))"; }

# Warm-up: compile every module into the cache, outside the measurements.
b=$(bundle warm 1 4); run_arch warm "$b"; wait_ready "$b"
"$bin/arch-runc" --root "$root" checkpoint warm; arch_drop warm
b=$(bundle warm2 1 4); run_arch warm2 "$b"; arch_drop warm2
rm -rf "${ckroot:?}/bench-1"

runs=$work/runs.json
: >"$runs"
# Anything else running on the machine shows here (the table notes it).
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$repeat"); do
  for n in "${counts[@]}"; do
    # --- spot: watch takes the final checkpoints -----------------------------
    tag=s$n-$r
    start_watch
    start_containers "$tag" "$n"
    sync
    # Arm at a random point of the poll cycle.
    sleep "$(python3 -c "import random; print(round(random.uniform(0, $poll), 3))")"
    from=$(wc -l <"$log")
    t0=$(python3 - "$work/notice" <<'PY'
import json, os, sys, time
t0 = time.time()
at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 + 120))
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump({"action": "terminate", "time": at}, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
print(int(t0 * 1000))
PY
)
    ended=0
    for _ in $(seq 6000); do
      ended=$(tail -n +"$((from + 1))" "$log" | grep -c '"message":"checkpoint \(not \)\?published"' || true)
      [ "$ended" -ge "$n" ] && break
      sleep 0.1
    done
    # The round's own report ("final checkpoints done") follows the last one.
    for _ in $(seq 50); do
      tail -n +"$((from + 1))" "$log" | grep -q '"message":"final checkpoints done"' && break
      sleep 0.1
    done
    rm -f "$work/notice"
    stop_watch
    [ "$ended" -ge "$n" ] || { echo "watch ended $ended of $n checkpoints in 10 minutes" >&2; exit 1; }
    tail -n +"$((from + 1))" "$log" >"$work/spot-log"
    python3 - "$runs" "$ckroot" "$tag" "$n" "$t0" "$work/spot-log" "$work/imds-polls" "$mode" <<'PY'
import glob, json, sys
runs, ckroot, tag, n, t0, log, polls, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7], sys.argv[8]
keys = {f"bench-{tag}-{i}" for i in range(1, n + 1)}
metas = []
for k in sorted(keys):
    found = glob.glob(f"{ckroot}/{k}/.arch/generations/*/metadata.json")
    if not found:
        sys.exit(f"no generation for {k}")
    metas.append(json.load(open(found[0])))
published, failed = {}, []
for line in open(log):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("target") == "arch::watch" and e.get("key") in keys:
        if e.get("message") == "checkpoint published":
            published[e["key"]] = e["published_unix_ms"]
        elif e.get("message") == "checkpoint not published":
            failed.append(e)
if failed or len(published) != n:
    sys.exit(f"{tag}: {len(published)} published, failed: {failed}")
served = min(int(t) for t, s in (l.split() for l in open(polls)) if s == "200" and int(t) >= t0)
for m in metas:
    assert m["trigger"] == "spot-interruption" and not m["leave_running"], m
run = {
    "kind": "spot", "n": n, "tag": tag,
    "served_ms": served - t0,
    "seen_ms": min(m["trigger_fired_unix_ms"] for m in metas) - t0,
    "first_dump_ms": min(m["created_unix_ms"] - m["phases_ms"]["dump"] for m in metas) - t0,
    "last_dump_start_ms": max(m["created_unix_ms"] - m["phases_ms"]["dump"] for m in metas) - t0,
    "published_ms": max(published.values()) - t0,
    # each container's dump start → its generation published (ms)
    "spans_ms": sorted(published[m["key"]] - (m["created_unix_ms"] - m["phases_ms"]["dump"]) for m in metas),
    "bytes": sum(m["images_bytes"] + (m["rootfs_archive_bytes"] or 0) for m in metas),
    "phases_ms": [m["phases_ms"] for m in metas],
}
open(runs, "a").write(json.dumps(run) + "\n")
print(f"  {tag} ({mode}): served {run['served_ms']} ms, seen {run['seen_ms']} ms, first dump {run['first_dump_ms']} ms, "
      f"published {run['published_ms']} ms after the notice; {run['bytes'] / 2**20:.0f} MiB; phases {run['phases_ms']}", file=sys.stderr)
PY
    remove_containers "$tag" "$n"

    # --- hand: arch-runc checkpoint, one after another ----------------------
    tag=h$n-$r
    start_containers "$tag" "$n"
    sync
    t0=$(seconds)
    for i in $(seq "$n"); do "$bin/arch-runc" --root "$root" checkpoint "$tag-$i"; done
    t1=$(seconds)
    python3 - "$runs" "$n" "$tag" "$(elapsed "$t0" "$t1")" "$ckroot" <<'PY'
import glob, json, sys
runs, n, tag, secs, ckroot = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]
metas = [json.load(open(glob.glob(f"{ckroot}/bench-{tag}-{i}/.arch/generations/*/metadata.json")[0])) for i in range(1, n + 1)]
run = {"kind": "hand", "n": n, "tag": tag, "secs": secs,
       "bytes": sum(m["images_bytes"] + (m["rootfs_archive_bytes"] or 0) for m in metas),
       "phases_ms": [m["phases_ms"] for m in metas]}
open(runs, "a").write(json.dumps(run) + "\n")
print(f"  {tag}: {secs:.2f} s; phases {run['phases_ms']}", file=sys.stderr)
PY
    remove_containers "$tag" "$n"

    # --- plain: runc checkpoint + tar | zstd, one after another --------------
    tag=p$n-$r
    start_containers "$tag" "$n" plain
    sync
    t0=$(seconds)
    for i in $(seq "$n"); do
      img=$work/plain-$tag-$i; mkdir -p "$img"
      "$runc" --root "$root" checkpoint --image-path "$img/images" --work-path "$img/work" --file-locks "$tag-$i"
      tar -C "$work/b-$tag-$i/upper" -cf - . | zstd -1 -T0 -q >"$img/rootfs.tar.zst"
    done
    t1=$(seconds)
    sync -f "$work/plain-$tag-1/rootfs.tar.zst" # what ARCH pays to publish durably
    t2=$(seconds)
    printf '{"kind": "plain", "n": %s, "tag": "%s", "secs": %s, "synced_secs": %s}\n' \
      "$n" "$tag" "$(elapsed "$t0" "$t1")" "$(elapsed "$t0" "$t2")" >>"$runs"
    echo "  $tag: $(elapsed "$t0" "$t1") s, $(elapsed "$t0" "$t2") s with sync -f" >&2
    remove_containers "$tag" "$n"
    rm -rf "$work"/plain-"$tag"-*
  done
done

mkdir -p "$repo/target/bench"
out=$repo/target/bench/spot.md
[ "$mode" = basic ] || out=$repo/target/bench/spot-$mode.md
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$runs" "$mem" "$layer_mib" "$repeat" "$mode" "$poll" "$margin" "$(nproc)" "$load_start" "$load_end" <<'PY' | tee "$out"
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
mem, layer, repeat, mode, poll, margin, cores = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], float(sys.argv[6]), float(sys.argv[7]), sys.argv[8]
def med(xs):
    xs = sorted(xs)
    return xs[(len(xs) - 1) // 2]
print("| containers | notice → seen by watch | notice → first dump starts | notice → all published "
      "| first dump → all published | written (images + layer) | write rate | `arch-runc checkpoint`, one after another "
      "| `runc checkpoint` + tar\\|zstd, one after another | same + `sync -f` |")
print("|---|---|---|---|---|---|---|---|---|---|")
notes = []
for n in sorted({r["n"] for r in runs}):
    spot = [r for r in runs if r["kind"] == "spot" and r["n"] == n]
    hand = [r for r in runs if r["kind"] == "hand" and r["n"] == n]
    plain = [r for r in runs if r["kind"] == "plain" and r["n"] == n]
    work_s = [(r["published_ms"] - r["first_dump_ms"]) / 1000 for r in spot]
    rate = [r["bytes"] / 2**20 / w for r, w in zip(spot, work_s)]
    mem_rate = [n * mem / 1024 / w for w in work_s]  # GiB of container memory per second
    overhead = med([(r["first_dump_ms"] - r["seen_ms"]) / 1000 for r in spot])
    print(f"| {n} × {mem} MiB | {med([r['seen_ms'] for r in spot]) / 1000:.2f} s "
          f"| {med([r['first_dump_ms'] for r in spot]) / 1000:.2f} s | {med([r['published_ms'] for r in spot]) / 1000:.2f} s "
          f"| {med(work_s):.2f} s | {med([r['bytes'] for r in spot]) / 2**20:.0f} MiB | {med(rate):.0f} MiB/s "
          f"| {med([r['secs'] for r in hand]):.2f} s | {med([r['secs'] for r in plain]):.2f} s "
          f"| {med([r['synced_secs'] for r in plain]):.2f} s |")
    usable = 120 - poll - overhead - margin
    notes.append(f"- {n} at once: {med(mem_rate) * 60:.1f} GiB of container memory per minute; in the "
                 f"{usable:.0f} s left of a two-minute notice after a {poll:g} s poll, {overhead:.2f} s to the first dump "
                 f"and a {margin:g} s margin: **{med(mem_rate) * usable:.1f} GiB per node**.")
print()
print(f"Mode {mode}; {mem} MiB of memory and a {layer} MiB layer per container; {cores} cores; medians of {repeat} runs; "
      f"spot_poll_interval_secs {poll:g} (default), max_concurrent_checkpoints 4 (default). "
      f"Load average (1, 5, 15 min) before the runs: {sys.argv[9]}; after: {sys.argv[10]}.")
print("Memory that fits in a notice at the measured rate (first dump → all published):")
print("\n".join(notes))
print()
print("Runs (ms after the notice; served = the stand-in first answered the notice):")
for r in runs:
    if r["kind"] == "spot":
        dumps = sorted(p["dump"] for p in r["phases_ms"])
        print(f"- {r['tag']}: served {r['served_ms']}, seen {r['seen_ms']}, first dump {r['first_dump_ms']}, "
              f"last dump starts {r['last_dump_start_ms']}, all published {r['published_ms']}; "
              f"each: dump {dumps} ms, dump start → published {r['spans_ms']} ms")
    elif r["kind"] == "hand":
        print(f"- {r['tag']}: {r['secs']:.2f} s; each: dump {[p['dump'] for p in r['phases_ms']]} ms")
    else:
        print(f"- {r['tag']}: {r['secs']:.2f} s, {r['synced_secs']:.2f} s with sync -f")
PY

# What ARCH logged at WARN or ERROR during the bench, counted by message.
echo
echo "ARCH log lines at WARN or ERROR (count, level, target, message):"
python3 - "$log" <<'PY' | tee "${out%.md}-warnings.txt"
import collections, json, sys
seen = collections.Counter()
first = {}
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("level") in ("WARN", "ERROR"):
        k = (e["level"], e.get("target"), e.get("message"))
        seen[k] += 1
        first.setdefault(k, line.strip())
for k, c in seen.most_common():
    print(f"{c:5d} {k[0]} {k[1]}: {k[2]}\n      first: {first[k]}")
if not seen:
    print("  none")
PY
