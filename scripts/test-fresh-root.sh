#!/usr/bin/env bash
# Proves the install path on Debian 12 roots that have nothing installed (debootstrap
# --variant=minbase), so a package this machine happens to have cannot hide a missing step:
#   - every package scripts/setup.sh may install exists (apt-get install --simulate);
#   - setup.sh refuses, in one line, a non-root user, another release, an unreachable archive;
#   - `setup.sh --test` works in both apt source layouts Debian 12 ships (deb822
#     debian.sources; one-line sources.list), and a second run installs nothing;
#   - the Debian package (scripts/build-deb.sh) installs with `apt-get install ./arch-runc_*.deb`
#     into a fresh root, dependencies resolved by apt, and works there.
# The pristine root is cached in $ARCH_FRESH_ROOT_CACHE (default /var/cache/arch-fresh-root),
# with the .debs every root downloads. The host's Rust toolchain (a prerequisite, not something
# setup.sh installs) is bind-mounted read-only into each root. Needs root and the package archive.
# Prints "fresh-root: N passed, N failed"; exits 1 if anything failed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${ARCH_FRESH_ROOT_CACHE:-/var/cache/arch-fresh-root}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
deb=${1:-}

say() { printf 'fresh-root: %s\n' "$*"; }
passed=0 failed=0
ok() { passed=$((passed + 1)); say "ok: $1"; }
bad() { failed=$((failed + 1)); say "FAILED: $1"; }
check() { # check NAME CMD...: one assertion; what CMD printed is shown only if it fails
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then ok "$name"; else bad "$name"; tail -n 5 <<<"$out" | sed 's/^/    /'; fi
}

[ "$(id -u)" = 0 ] || { say "must run as root (debootstrap, chroot, mounts)"; exit 1; }
for tool in debootstrap chroot findmnt; do
  command -v "$tool" >/dev/null || { say "missing $tool (scripts/setup.sh --test)"; exit 1; }
done

# The archives this machine already uses (whatever mirror or proxy it is set up with).
archive() { apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Identifier: Packages' | awk -v r="$1" '$1 == r {print $2; exit}'; }
mirror=$(archive bookworm)
security=$(archive bookworm-security)
[ -n "$mirror" ] || { say "this machine has no apt source for bookworm"; exit 1; }

mkdir -p "$cache/archives/partial"
work=$(mktemp -d /var/tmp/arch-fresh-root.XXXXXX)
cleanup() {
  local m
  for m in $(findmnt -rn -o TARGET | grep -F "$work/" | sort -r); do umount -l "$m" 2>/dev/null || true; done
  # Never delete through a mount that is still there.
  if findmnt -rn -o TARGET | grep -qF "$work/"; then say "left $work (still mounted)"; else rm -rf "$work"; fi
}
trap cleanup EXIT

pristine=$cache/bookworm-minbase.tar
if [ ! -s "$pristine" ]; then
  say "debootstrap --variant=minbase bookworm (cached in $pristine)"
  debootstrap --variant=minbase --cache-dir="$cache/archives" bookworm "$work/bootstrap" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -5 "$work/debootstrap.log"; say "debootstrap failed"; exit 1; }
  tar -C "$work/bootstrap" -cf "$pristine.tmp" . && mv "$pristine.tmp" "$pristine"
  rm -rf "$work/bootstrap"
fi

# new_root NAME LAYOUT: a fresh copy of the pristine root with its apt sources in LAYOUT
# (deb822 | one-line), ready for chroot.
new_root() {
  local root=$work/$1
  mkdir -p "$root"
  tar -C "$root" -xf "$pristine"
  rm -f "$root/etc/apt/sources.list" "$root/etc/apt/sources.list.d/"*
  if [ "$2" = deb822 ]; then
    {
      printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\n' "$mirror"
      printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
      [ -z "$security" ] || printf '\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$security"
    } >"$root/etc/apt/sources.list.d/debian.sources"
  else
    {
      printf 'deb %s bookworm main\n' "$mirror"
      [ -z "$security" ] || printf 'deb %s bookworm-security main\n' "$security"
      printf 'deb %s bookworm-updates main\n' "$mirror"
    } >"$root/etc/apt/sources.list"
  fi
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # This machine's TLS trust, like its resolver: setup.sh --test fetches moto from PyPI, and a
  # machine behind an intercepting proxy trusts its CA in its own bundle (the root's
  # ca-certificates makes a bundle of its own, so this one stays apart, for pip: in_root).
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/arch-host-ca.crt"
  fi
  # No daemon a package installs may start inside the chroot.
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod 0755 "$root/usr/sbin/policy-rc.d"
  install -m 0755 "$repo/scripts/setup.sh" "$root/usr/local/sbin/arch-setup.sh"
  mount -t proc proc "$root/proc"
  mount --rbind /dev "$root/dev"
  mount --bind "$cache/archives" "$root/var/cache/apt/archives"
  for d in "$cargo_home" "$rustup_home"; do
    [ -d "$d" ] || continue
    mkdir -p "$root$d"
    mount --bind "$d" "$root$d" && mount -o remount,bind,ro "$root$d"
  done
}

# in ROOT [--user UID] CMD...: run CMD in ROOT with a clean environment.
in_root() {
  local root=$work/$1 spec=()
  shift
  if [ "$1" = --user ]; then spec=(--userspec="$2:$2"); shift 2; fi
  local trust=()
  if [ -f "$root/etc/arch-host-ca.crt" ]; then trust=(PIP_CERT=/etc/arch-host-ca.crt); fi
  chroot "${spec[@]}" "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
    PATH="$cargo_home/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    CARGO_HOME="$cargo_home" RUSTUP_HOME="$rustup_home" "${trust[@]}" "$@"
}

# refuses ROOT WHY PATTERN [--user UID]: setup.sh exits non-zero with exactly one line matching PATTERN.
refuses() {
  local root=$1 why=$2 pattern=$3 rc=0 err
  shift 3
  err=$(in_root "$root" "$@" bash /usr/local/sbin/arch-setup.sh 2>&1 >/dev/null) || rc=$?
  if [ "$rc" -ne 0 ] && [ "$(wc -l <<<"$err")" -eq 1 ] && grep -qE "$pattern" <<<"$err"; then
    ok "setup.sh refuses $why in one line ($err)"
  else
    bad "setup.sh on $why: exit $rc, said: $err"
  fi
}

# sets_up NAME LAYOUT: setup.sh --test on a fresh root, then what it promised is there.
sets_up() {
  local name=$1 layout=$2 log=$work/$1-setup.log
  new_root "$name" "$layout"
  say "setup.sh --test in a fresh $layout root (log: $log)"
  if ! in_root "$name" bash /usr/local/sbin/arch-setup.sh --test >"$log" 2>&1; then
    tail -5 "$log"
    bad "setup.sh --test, $layout layout"
    return
  fi
  ok "setup.sh --test, $layout layout"
  check "$layout: criu 4" in_root "$name" sh -c 'criu --version | grep -q "Version: [4-9]"'
  check "$layout: runc, containerd, ctr" in_root "$name" sh -c 'runc --version && containerd --version && ctr --version'
  check "$layout: build tools (musl-gcc, protoc, gcc)" in_root "$name" sh -c 'musl-gcc --version && protoc --version && gcc --version'
  check "$layout: test tools (busybox, zstd, hyperfine, promtool, prometheus_client, debootstrap)" in_root "$name" \
    sh -c '[ -x /bin/busybox ] && zstd --version && hyperfine --version && promtool --version && python3 -c "import prometheus_client" && command -v debootstrap'
  check "$layout: moto's server for the fleet tests" in_root "$name" \
    sh -c '/opt/arch-test/moto/bin/python -c "import moto.server" && [ -x /opt/arch-test/moto/bin/moto_server ]'
  check "$layout: docker.io (dockerd in sbin, Debian's docker client)" in_root "$name" \
    sh -c '[ -x /usr/sbin/dockerd ] && /usr/bin/docker --version | grep -q "^Docker version 20\."'
  check "$layout: trixie is pinned low (bookworm's bash stays the candidate)" in_root "$name" \
    sh -c 'apt-cache policy bash | grep -q "Candidate: 5.2.15"'
  local again
  again=$(in_root "$name" bash /usr/local/sbin/arch-setup.sh --test 2>&1) || true
  if grep -q '^setup: ok' <<<"$again" && ! grep -q 'installing' <<<"$again"; then
    ok "$layout: a second run installs nothing"
  else
    bad "$layout: second run said: $again"
  fi
}

# 1. Every package setup.sh may install exists: simulated from nothing in a fresh root, and on
#    this machine (whatever it already has; criu from trixie, which setup.sh added here).
new_root probe deb822
in_root probe apt-get update -q >/dev/null 2>&1 || true
mapfile -t pkgs < <(bash "$repo/scripts/setup.sh" --list | grep -vx criu)
check "every Debian 12 package setup.sh names resolves in a fresh root (${pkgs[*]})" \
  in_root probe apt-get install --simulate -q "${pkgs[@]}"
check "every package setup.sh names resolves on this machine, criu from trixie" \
  sh -c 'apt-get install --simulate -q "$@" >/dev/null && apt-get install --simulate -q -t trixie criu >/dev/null' _ "${pkgs[@]}"

# 2. One clear line on what setup.sh cannot handle.
refuses probe "a non-root user" 'must run as root' --user 65534
os_release=$work/probe/usr/lib/os-release
cp "$os_release" "$work/os-release.saved"
sed -i -e 's/^VERSION_ID=.*/VERSION_ID="11"/' "$os_release"
refuses probe "Debian 11" 'needs Debian 12.*debian 11'
cp "$work/os-release.saved" "$os_release"
mv "$work/probe/etc/apt/sources.list.d/debian.sources" "$work/debian.sources.saved"
printf 'deb http://127.0.0.1:9/debian bookworm main\n' >"$work/probe/etc/apt/sources.list"
refuses probe "an unreachable package archive" 'package archive unreachable'
rm "$work/probe/etc/apt/sources.list"
mv "$work/debian.sources.saved" "$work/probe/etc/apt/sources.list.d/debian.sources"

# 3. setup.sh in both layouts.
sets_up deb822 deb822
sets_up oneline one-line

# 4. The Debian package, into a root that has nothing else.
if [ -z "$deb" ]; then deb=$(bash "$repo/scripts/build-deb.sh"); fi
if [ ! -f "$deb" ]; then
  bad "no package to install ($deb)"
else
  cp "$deb" "$work/probe/tmp/"
  pkg=/tmp/$(basename "$deb")
  if in_root probe sh -c "apt-get update -q && apt-get install -y -q --no-install-recommends $pkg" >"$work/deb-install.log" 2>&1; then
    ok "apt-get install ./$(basename "$deb") in a fresh root (runc, zstd pulled in by apt)"
  else
    tail -5 "$work/deb-install.log"
    bad "apt-get install ./$(basename "$deb")"
  fi
  check "archctl modules list shows the five builtin modules" in_root probe \
    sh -c 'out=$(archctl modules list) && for m in create start checkpoint resume delete; do echo "$out" | grep -qw "$m" || exit 1; done'
  check "arch-runc --version passes through to runc, byte for byte" in_root probe \
    sh -c '[ "$(arch-runc --version 2>&1; echo "rc=$?")" = "$(/usr/sbin/runc --version 2>&1; echo "rc=$?")" ]'
  check "/etc/arch/modules is an empty root-owned directory, 0755" in_root probe \
    sh -c '[ "$(stat -c %u:%g:%a /etc/arch/modules)" = 0:0:755 ] && [ -z "$(ls -A /etc/arch/modules)" ]'
  check "/etc/arch/config.json and /etc/logrotate.d/arch are conffiles" in_root probe \
    sh -c "dpkg-query -W -f '\${Conffiles}' arch-runc | grep -q '/etc/arch/config.json' && dpkg-query -W -f '\${Conffiles}' arch-runc | grep -q '/etc/logrotate.d/arch'"
  check "depends on runc and zstd, recommends criu (>= 4)" in_root probe \
    sh -c "dpkg-query -W -f '\${Depends}|\${Recommends}' arch-runc | grep -Eq '^runc.*zstd.*\|criu \(>= 4\)'"
  check "arch-watch unit installed and enabled, running /usr/bin/archctl watch" in_root probe \
    sh -c 'grep -q "^ExecStart=/usr/bin/archctl watch" /lib/systemd/system/arch-watch.service && [ -L /etc/systemd/system/multi-user.target.wants/arch-watch.service ]'
  check "completions (bash, zsh, fish) and docs installed" in_root probe \
    sh -c '[ -s /usr/share/bash-completion/completions/archctl ] && [ -s /usr/share/zsh/vendor-completions/_archctl ] && [ -s /usr/share/fish/vendor_completions.d/archctl.fish ] && [ -s /usr/share/doc/arch-runc/user-guide.md ] && [ -s /usr/share/doc/arch-runc/reference.md ]'
  check "apt-get purge removes it, and the empty module directory with it" in_root probe \
    sh -c 'apt-get purge -y -q arch-runc >/dev/null 2>&1 && ! command -v arch-runc && [ ! -e /etc/arch/modules ]'
fi

say "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
