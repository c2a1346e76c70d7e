#!/usr/bin/env bash
# Installs what ARCH needs on a Debian 12 machine, idempotently:
# containerd, runc, CRIU 4.x (from trixie, pinned low), iptables, busybox-static,
# zstd, hyperfine, python3, musl-tools (arch-runc is a static musl binary),
# protobuf-compiler (containerd's gRPC API is generated at build time),
# promtool and python3-prometheus-client (tests parse ARCH's metrics), and
# the wasm32-wasip2 and x86_64-unknown-linux-musl Rust targets. Safe to run again.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
export DEBIAN_FRONTEND=noninteractive

need_apt=()
for bin in containerd:containerd runc:runc iptables-restore:iptables busybox:busybox-static zstd:zstd \
  hyperfine:hyperfine python3:python3 musl-gcc:musl-tools protoc:protobuf-compiler promtool:promtool; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || need_apt+=("${bin##*:}")
done
[ -x /bin/busybox ] || need_apt+=(busybox-static)
/usr/bin/python3 -c 'import prometheus_client' 2>/dev/null || need_apt+=(python3 python3-prometheus-client)

criu_ok() { command -v criu >/dev/null 2>&1 && criu --version 2>/dev/null | grep -q 'Version: [4-9]'; }

if [ ${#need_apt[@]} -gt 0 ] || ! criu_ok; then
  apt-get update -q
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

# CRIU 3.17 (bookworm) fails on this kernel; 4.x comes from trixie, pinned so
# that nothing else is taken from trixie unless asked for.
if ! criu_ok; then
  src=/etc/apt/sources.list.d/debian.sources
  if [ ! -f /etc/apt/sources.list.d/arch-trixie.sources ]; then
    # First stanza only: the main archive (the security archive names suites differently).
    awk 'NF==0 {exit} {print}' "$src" | sed -e 's/^Suites:.*/Suites: trixie/' \
      >/etc/apt/sources.list.d/arch-trixie.sources
    printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n' >/etc/apt/preferences.d/arch-trixie
    apt-get update -q
  fi
  log "installing criu from trixie"
  apt-get install -y -q --no-install-recommends -t trixie criu
fi

if command -v rustup >/dev/null 2>&1; then
  for t in wasm32-wasip2 x86_64-unknown-linux-musl; do
    rustup target list --installed | grep -qx "$t" || rustup target add "$t"
  done
fi

# CRIU must work on this kernel, or nothing else will.
criu check >/dev/null 2>&1 || { log "criu check failed:"; criu check || true; }
log "ok: $(runc --version | head -1); containerd $(containerd --version | awk '{print $3}'); criu $(criu --version | awk '/Version/{print $2}')"
