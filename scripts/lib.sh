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
  # a real browser renders jitsu-dns's status page (headless; fonts for its screenshot)
  chromium fonts-dejavu-core
)

jitsu_log() { printf '==> %s\n' "$*" >&2; }

jitsu_require_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: run this as root: it installs packages and creates network namespaces" >&2
    exit 1
  fi
}

# Installs whichever of the given Debian packages is missing, and nothing else.
jitsu_install_missing() {
  local missing=() p
  for p in "$@"; do
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

# Installs whatever of JITSU_PACKAGES (plus any arguments) is missing.
jitsu_ensure_packages() {
  jitsu_install_missing "${JITSU_PACKAGES[@]}" "$@"
}

# The oldest Rust the workspace builds with (rust-version in Cargo.toml).
JITSU_RUST_MIN=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$JITSU_ROOT/Cargo.toml")

# True when `cargo` on PATH runs a rustc at least JITSU_RUST_MIN (and has clippy and rustfmt,
# which .ci/run needs).
jitsu_rust_ok() {
  command -v cargo >/dev/null 2>&1 || return 1
  local have
  have=$(cargo --version 2>/dev/null | awk '{print $2}') || return 1
  [ -n "$have" ] || return 1
  [ "$(printf '%s\n%s\n' "$JITSU_RUST_MIN" "${have%%-*}" | sort -V | head -n1)" = "$JITSU_RUST_MIN" ] || return 1
  cargo clippy --version >/dev/null 2>&1 && cargo fmt --version >/dev/null 2>&1
}

# Puts a Rust toolchain on PATH: rustup's in ~/.cargo/bin if there is one and it is recent
# enough, else Debian's own current one (rustc-web/cargo-web, which Debian 12 ships from its
# security archive for its browsers; the plain `cargo` package, 1.63, is too old).
jitsu_ensure_rust() {
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) export PATH="$HOME/.cargo/bin:$PATH" ;; esac
  fi
  if jitsu_rust_ok; then
    return 0
  fi
  jitsu_log "no Rust >= $JITSU_RUST_MIN with clippy and rustfmt on PATH: using Debian's rustc-web"
  jitsu_install_missing rustc-web cargo-web rust-web-clippy rustfmt-web
  # Debian's toolchain is in /usr/bin; an older one earlier on PATH must not shadow it.
  export PATH="/usr/bin:$PATH"
  if ! jitsu_rust_ok; then
    echo "error: no Rust >= $JITSU_RUST_MIN: Debian's rustc-web gave $(cargo --version 2>&1 || true)." >&2
    echo "       Enable the bookworm-security archive (it carries the current rustc-web), or install" >&2
    echo "       Rust with rustup (https://rustup.rs), then run this again." >&2
    exit 1
  fi
}

jitsu_prepare() {
  jitsu_require_root
  jitsu_ensure_packages "$@"
  jitsu_ensure_rust
  cd "$JITSU_ROOT"
}

# Builds jitsu-dns from commit REV (once: kept in target/baseline-<short REV>) for benchmarks
# that measure a change against what came before it in the same run; prints the binary.
jitsu_build_baseline() {
  local rev target src
  rev=$(git -C "$JITSU_ROOT" rev-parse --short "$1^{commit}")
  target="$JITSU_ROOT/target/baseline-$rev"
  if [ ! -x "$target/release/jitsu-dns" ]; then
    jitsu_log "building the baseline jitsu-dns from $rev (once; kept in $target)"
    src=$(mktemp -d /tmp/jitsu-baseline.XXXXXX)
    git -C "$JITSU_ROOT" archive "$rev" | tar -x -C "$src"
    CARGO_TARGET_DIR="$target" cargo build --release -q -p jitsu-dns --bin jitsu-dns \
      --manifest-path "$src/Cargo.toml" >&2
    rm -rf "$src"
  fi
  echo "$target/release/jitsu-dns"
}
