#!/usr/bin/env bash
# drain.sh [GRACE_SECONDS]: maintenance drain of a host whose containers run
# on containerd directly (ctr, or your own scheduler). Every running task gets
# SIGTERM; arch-runc turns that into a checkpoint first for ARCH containers
# with the stop trigger on (checkpoint_on_stop, or ARCH_CHECKPOINT_ON_STOP=1),
# then delivers it. Tasks still running after GRACE_SECONDS (default 90: more
# than stop_checkpoint_deadline_secs plus the jobs' own shutdown) get SIGKILL.
# Stop your scheduler from placing new work here first. Kubernetes nodes:
# kubectl drain; Docker: docker stop -t.
set -euo pipefail
grace=${1:-90}
address=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}

running() {
    local ns
    for ns in $(ctr --address "$address" namespaces ls -q); do
        ctr --address "$address" -n "$ns" task ls | awk -v ns="$ns" 'NR > 1 && $3 == "RUNNING" { print ns, $1 }'
    done
}

signal_all() {
    local ns id
    while read -r ns id; do
        echo "drain: $1 to $ns/$id"
        ctr --address "$address" -n "$ns" task kill --signal "$1" "$id" &
    done < <(running)
    wait
}

signal_all SIGTERM
deadline=$((SECONDS + grace))
while [ -n "$(running)" ] && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 2
done
signal_all SIGKILL
echo "drain: done"
