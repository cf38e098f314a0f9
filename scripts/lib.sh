# Shared by the README's commands (scripts/demo, scripts/test) and .ci/run. Sourced, not run.
# Everything here is idempotent: a second run installs nothing and changes nothing.

set -euo pipefail

JITSU_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export JITSU_ROOT

# Debian packages the build, the tests and the demo need; one list, so the two commands agree.
JITSU_PACKAGES=(
  # build
  build-essential pkg-config libvirt-dev git ca-certificates
  # namespaces, bridges, probes
  iproute2 iputils-arping iputils-ping procps psmisc kmod ethtool
  # real clients and tools the tests drive
  curl dnsutils knot-dnsutils tcpdump tcpreplay dnsperf xenstore-utils python3-scapy bind9
  # guest images (guest/build-image) and the test guest's peers
  busybox-static cpio lz4 xz-utils zstd
  # libvirt with QEMU guests (the libvirt backend and its tests)
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
  # libvirt's schema check of the domain XML jitsu-dns generates (virt-xml-validate)
  libxml2-utils
)

jitsu_log() { printf '==> %s\n' "$*" >&2; }

jitsu_require_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: run this as root: it installs packages and creates network namespaces" >&2
    exit 1
  fi
}

# Installs whatever of JITSU_PACKAGES (plus any arguments) is missing, and nothing else.
jitsu_ensure_packages() {
  local missing=() p
  for p in "${JITSU_PACKAGES[@]}" "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  jitsu_log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Puts cargo on PATH or says how to get it: Debian's own cargo is too old for the dependencies.
jitsu_ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: no Rust toolchain: install one with rustup (https://rustup.rs), then run this again" >&2
    exit 1
  fi
}

jitsu_prepare() {
  jitsu_require_root
  jitsu_ensure_packages "$@"
  jitsu_ensure_rust
  cd "$JITSU_ROOT"
}
