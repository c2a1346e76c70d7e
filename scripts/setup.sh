#!/usr/bin/env bash
# Installs what ARCH needs on a Debian 12 machine, idempotently. Safe to run again.
#
#   setup.sh            what the demo needs: run (containerd, runc, CRIU 4.x, iptables, zstd),
#                       build (gcc, musl-tools, protobuf-compiler; the Rust targets if rustup
#                       is there) and the demo's test image (busybox-static, python3)
#   setup.sh --test     also what the test suite needs: hyperfine, promtool, python3's
#                       Prometheus parser, debootstrap (fresh-root checks), cargo-deb,
#                       docker.io (the Docker system tests run private dockerds of their own),
#                       and moto's DynamoDB-compatible server from PyPI in a venv of its own at
#                       /opt/arch-test/moto (the fleet tests start it: tests/process/fleet.rs)
#   setup.sh --list     prints every Debian package setup.sh may install, one per line, and exits
#
# Works with either apt source layout Debian 12 ships: deb822 (sources.list.d/debian.sources,
# as in the official container and cloud images) or one-line (sources.list, as the installer
# writes it). CRIU 3.17 (Debian 12's) fails on current kernels, so CRIU 4 comes from Debian 13
# ("trixie"), pinned at priority 100 so nothing else is taken from there unless asked for.
# Anything it cannot handle stops it with one line on stderr and a non-zero exit.
set -euo pipefail

RUST_MIN=1.85
PKGS_RUN=(containerd runc iptables zstd)
PKGS_BUILD=(gcc libc6-dev musl-tools protobuf-compiler)
PKGS_DEMO=(busybox-static python3)
# docker.io: on a systemd machine its install starts the system's dockerd (on the system
# containerd, /var/lib/docker, /run/docker). The tests never use it: their engines have their
# own data-root, exec-root, socket and containerd, and call /usr/bin/docker with that socket.
# python3-venv and ca-certificates: the venv moto is installed into, from PyPI over TLS.
# logrotate: runs deploy/logrotate/arch in a test (the .deb only recommends it).
PKGS_TEST=(hyperfine python3-prometheus-client debootstrap docker.io python3-venv ca-certificates logrotate)
# promtool comes out of this package's .deb without installing the package: installing it
# would start (and on systemd enable) a Prometheus server just to get a checker.
PKG_PROMTOOL=prometheus
PKG_CRIU=criu # from trixie
# moto's server plays DynamoDB in the fleet tests; pinned to a major version, in its own venv
# (Debian's python3 refuses pip installs into the system; the tests call it by this path).
MOTO_VENV=/opt/arch-test/moto
MOTO_REQ='moto[server]>=5,<6'

say() { printf 'setup: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

mode=demo
case "${1:-}" in
'') ;;
--test) mode=test ;;
--list)
  printf '%s\n' "${PKGS_RUN[@]}" "${PKGS_BUILD[@]}" "${PKGS_DEMO[@]}" "${PKGS_TEST[@]}" "$PKG_PROMTOOL" "$PKG_CRIU"
  exit 0
  ;;
*) die "usage: setup.sh [--test|--list]" ;;
esac

[ "$(id -u)" = 0 ] || die "must run as root (it installs Debian packages)"
# shellcheck disable=SC1091
os=$(. /etc/os-release 2>/dev/null && echo "${ID:-?} ${VERSION_ID:-?}") || os="unknown"
# CRIU 4 from trixie brings trixie's libc6 and with it trixie's base-files, so a Debian 12 this
# script has already run on says 13 in os-release; its own trixie source marks it.
trixie_list=/etc/apt/sources.list.d/arch-trixie.sources
[ "$os" = "debian 12" ] || { [ "$os" = "debian 13" ] && [ -f "$trixie_list" ]; } ||
  die "needs Debian 12 (bookworm); this is: $os"
export DEBIAN_FRONTEND=noninteractive

# apt-get update that fails when any archive cannot be reached (plain update only warns).
apt_update() {
  local out
  if ! out=$(apt-get update -q --error-on=any 2>&1); then
    die "package archive unreachable: $(grep -m1 -E '^(E|W|Err):' <<<"$out" || tail -n1 <<<"$out")"
  fi
}
installed() { dpkg-query -W -f '${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

want=("${PKGS_RUN[@]}" "${PKGS_BUILD[@]}" "${PKGS_DEMO[@]}")
[ "$mode" = test ] && want+=("${PKGS_TEST[@]}")
missing=()
for p in "${want[@]}"; do installed "$p" || missing+=("$p"); done
criu_ok() { command -v criu >/dev/null 2>&1 && criu --version 2>/dev/null | grep -q 'Version: [4-9]'; }
need_promtool=false
[ "$mode" = test ] && ! command -v promtool >/dev/null 2>&1 && need_promtool=true

updated=false
if [ ${#missing[@]} -gt 0 ] || ! criu_ok || $need_promtool; then
  apt_update
  updated=true
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install failed for: ${missing[*]}"
fi

# trixie beside the machine's own bookworm archive, whichever layout names it: apt itself says
# which URI serves bookworm, and a deb822 file works in both layouts.
add_trixie() {
  local uri keyring
  [ -f "$trixie_list" ] && return 0
  uri=$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Identifier: Packages' |
    awk '$1 == "bookworm" {print $2; exit}')
  [ -n "$uri" ] || die "no apt source for Debian 12's main archive (bookworm) is configured"
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [ -f "$keyring" ] || die "$keyring is missing (package debian-archive-keyring)"
  printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: %s\n' "$uri" "$keyring" >"$trixie_list"
  printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n' >/etc/apt/preferences.d/arch-trixie
  apt_update
}
if ! criu_ok; then
  add_trixie
  say "installing criu 4 from trixie"
  apt-get install -y -q --no-install-recommends -t trixie "$PKG_CRIU" >/dev/null ||
    die "apt-get install -t trixie criu failed"
  criu_ok || die "criu from trixie is not version 4 or later: $(criu --version 2>&1 | head -1)"
fi

if $need_promtool; then
  $updated || apt_update
  tmp=$(mktemp -d) && chmod 0755 "$tmp" # apt downloads as _apt
  (cd "$tmp" && apt-get download -q "$PKG_PROMTOOL" >/dev/null) || die "apt-get download $PKG_PROMTOOL failed"
  dpkg-deb --fsys-tarfile "$tmp"/"$PKG_PROMTOOL"_*.deb | tar -xO ./usr/bin/promtool >"$tmp/promtool"
  install -m 0755 "$tmp/promtool" /usr/local/bin/promtool
  rm -rf "$tmp"
  say "installed promtool from the $PKG_PROMTOOL package into /usr/local/bin"
fi

# Rust: the toolchain is the user's (rustup); setup adds the two targets ARCH builds for.
PATH=$PATH:${CARGO_HOME:-$HOME/.cargo}/bin
if ! command -v cargo >/dev/null 2>&1; then
  die "no Rust toolchain: install Rust >= $RUST_MIN with rustup (https://rustup.rs), then run this again"
fi
have=$(cargo --version | awk '{print $2}')
[ "$(printf '%s\n%s\n' "$RUST_MIN" "$have" | sort -V | head -1)" = "$RUST_MIN" ] ||
  die "Rust $have is older than $RUST_MIN: rustup update stable"
if command -v rustup >/dev/null 2>&1; then
  for t in wasm32-wasip2 x86_64-unknown-linux-musl; do
    rustup target list --installed | grep -qx "$t" || rustup target add "$t" >/dev/null ||
      die "rustup target add $t failed"
  done
fi
if [ "$mode" = test ] && ! command -v cargo-deb >/dev/null 2>&1; then
  say "installing cargo-deb (builds the Debian package)"
  cargo install --locked --quiet cargo-deb@3 || die "cargo install cargo-deb failed"
fi

if [ "$mode" = test ] && ! "$MOTO_VENV/bin/python" -c 'import moto.server' >/dev/null 2>&1; then
  say "installing moto's server (PyPI) into $MOTO_VENV"
  /usr/bin/python3 -m venv "$MOTO_VENV" || die "python3 -m venv $MOTO_VENV failed"
  "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check "$MOTO_REQ" ||
    die "pip install $MOTO_REQ into $MOTO_VENV failed"
  "$MOTO_VENV/bin/python" -c 'import moto.server' || die "moto's server does not import in $MOTO_VENV"
fi

# CRIU must work on this kernel, or no checkpoint will.
criu check >/dev/null 2>&1 || say "warning: 'criu check' fails here; checkpoints will fail: $(criu check 2>&1 | tail -1)"
say "ok: $(runc --version | head -1); containerd $(containerd --version | awk '{print $3}'); criu $(criu --version | awk '/Version/{print $2}')"
