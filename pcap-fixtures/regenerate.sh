#!/usr/bin/env bash
# Makes every pcap fixture in this folder again, with real tools on a real bridge, then checks
# each file with check.py and only then replaces the committed files.
#
#   sudo pcap-fixtures/regenerate.sh           # regenerate, check, install (root, any directory)
#   pcap-fixtures/regenerate.sh --check        # only check the files already here (no root)
#   sudo pcap-fixtures/regenerate.sh noise.pcap  # make only the named fixtures again
#
# Each capture gets a fresh topology of network namespaces, all named jfx<pid>-<n>-<role> so
# that concurrent runs and tests never collide:
#
#   host ns:  br0 (STP off, forward_delay 0, multicast snooping off, IPv6 off, no address),
#             one veth port per member; tcpdump runs here, on br0, in promiscuous mode, so it
#             sees every frame the bridge floods or forwards.
#   client / guest / other ns:  eth0 with the fixed MAC and addresses of README.md's table.
#
# A topology only has the members its capture needs (the curl captures have no guest at all:
# nobody owns the VM's MAC, so the bridge floods the SYNs). Every namespace this script made
# is removed on exit, also on failure or Ctrl-C.
set -euo pipefail

HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
PY=/usr/bin/python3 # scapy imports only under Debian's own python3

FIXTURES=(curl-syn-v4.pcap curl-syn-v6.pcap curl-syn-v4-csum-partial.pcap garp-arping.pcap
  garp-arp-notify.pcap who-has.pcap noise.pcap)

CLIENT_MAC=02:77:00:00:01:02 CLIENT_V4=10.77.1.2 CLIENT_V6=fd77:1::2
GUEST_MAC=02:77:00:00:01:10 GUEST_V4=10.77.1.10 GUEST_V6=fd77:1::10
OTHER_MAC=02:77:00:00:01:03 OTHER_V4=10.77.1.3 OTHER_V6=fd77:1::3

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Fails, naming the Debian package, when a tool is missing (all are in scripts/lib.sh's
# JITSU_PACKAGES, which scripts/test installs).
require_tool() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package $2"
}

require_checker() {
  [ -x "$PY" ] || die "$PY not found: install the Debian package python3"
  "$PY" -c 'import scapy.all' 2>/dev/null || die "scapy does not import under $PY: install the Debian package python3-scapy"
}

if [ "${1:-}" = --check ]; then
  require_checker
  exec "$PY" "$HERE/check.py" "$HERE"
fi
WANTED=("$@")
[ ${#WANTED[@]} -gt 0 ] || WANTED=("${FIXTURES[@]}")
for f in "${WANTED[@]}"; do
  [[ " ${FIXTURES[*]} " == *" $f "* ]] || die "usage: $0 [--check | FIXTURE...]; fixtures: ${FIXTURES[*]}"
done
[ "$(id -u)" = 0 ] || die "run as root: it creates network namespaces and captures on a bridge"

require_tool ip iproute2
require_tool ss iproute2
require_tool sysctl procps
require_tool tcpdump tcpdump
require_tool curl curl
require_tool arping iputils-arping
require_tool ping iputils-ping
require_tool dig dnsutils
require_tool ethtool ethtool
require_checker

# ---------------------------------------------------------------------------------------------
# Clean-up: every namespace and background process this script started, and nothing else.

NAMESPACES=()
PIDS=()
WORK=$(mktemp -d /tmp/jitsu-pcap-fixtures.XXXXXX)

cleanup() {
  local status=$? pid ns
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  for ns in "${NAMESPACES[@]}"; do
    ip netns del "$ns" 2>/dev/null || true
  done
  if [ "$status" != 0 ] && [ -n "$(ls -A "$WORK")" ]; then
    log "the new captures are left in $WORK for inspection"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do
    [ "$p" = "$1" ] || keep+=("$p")
  done
  PIDS=("${keep[@]}")
}

# ---------------------------------------------------------------------------------------------
# Topology

SEQ=0
H=""

in_ns() {
  local ns=$1
  shift
  ip netns exec "$ns" "$@"
}
ns_of() { printf '%s' "jfx$$-$SEQ-$1"; }

# topo_up ROLE... : a fresh host namespace with br0 and one veth port per role. Each member's
# eth0 has its MAC but is still down.
topo_up() {
  SEQ=$((SEQ + 1))
  H=$(ns_of host)
  ip netns add "$H"
  NAMESPACES+=("$H")
  # The host namespace sends nothing: no IPv6 (no link-local, no MLD) on br0 or its ports, and
  # no IPv4 address.
  in_ns "$H" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip -n "$H" link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0
  ip -n "$H" link set br0 up
  local role ns mac
  for role in "$@"; do
    ns=$(ns_of "$role")
    ip netns add "$ns"
    NAMESPACES+=("$ns")
    ip -n "$ns" link set lo up
    case $role in
      client) mac=$CLIENT_MAC ;;
      guest) mac=$GUEST_MAC ;;
      other) mac=$OTHER_MAC ;;
      *) die "unknown role $role" ;;
    esac
    ip -n "$H" link add "v$role" type veth peer name eth0 netns "$ns"
    ip -n "$ns" link set eth0 address "$mac"
    ip -n "$H" link set "v$role" master br0 up
  done
}

addrs_of() {
  case $1 in
    client) printf '%s %s' "$CLIENT_V4" "$CLIENT_V6" ;;
    guest) printf '%s %s' "$GUEST_V4" "$GUEST_V6" ;;
    other) printf '%s %s' "$OTHER_V4" "$OTHER_V6" ;;
  esac
}

# member_up ROLE [offload] : the usual member: addresses usable at once (IPv6 nodad), no router
# solicitations (there is no router, and Linux repeats them forever, so they would land in
# every capture), TX checksum offload off so every checksum on the wire is complete unless
# `offload` is given, then the link up.
member_up() {
  local role=$1 offload=${2:-} ns v4 v6
  ns=$(ns_of "$role")
  read -r v4 v6 <<<"$(addrs_of "$role")"
  in_ns "$ns" sysctl -qw net.ipv6.conf.eth0.router_solicitations=0
  if [ "$offload" != offload ]; then
    in_ns "$ns" ethtool -K eth0 tx off >/dev/null
  fi
  ip -n "$ns" addr add "$v4/24" dev eth0
  ip -n "$ns" addr add "$v6/64" dev eth0 nodad
  ip -n "$ns" link set eth0 up
}

# Waits until no member has a tentative IPv6 address (the link-local one still does DAD), then
# for MLD's unsolicited report interval plus a second: the kernel repeats its MLD reports once
# within that interval after DAD, and those must not land in the capture that follows.
settle() {
  local role ns deadline=$((SECONDS + 10)) ms
  for role in "$@"; do
    ns=$(ns_of "$role")
    while [ -n "$(ip -n "$ns" -6 addr show dev eth0 tentative)" ]; do
      [ $SECONDS -lt $deadline ] || die "$ns: IPv6 addresses still tentative after 10 s"
      sleep 0.1
    done
  done
  ms=$(in_ns "$(ns_of "$1")" sysctl -n net.ipv6.conf.eth0.mldv2_unsolicited_report_interval)
  sleep "$(((ms + 1000) / 1000)).$(((ms + 1000) % 1000 / 100))"
}

topo_down() {
  local ns keep=()
  for ns in "${NAMESPACES[@]}"; do
    if [[ $ns == "jfx$$-$SEQ-"* ]]; then
      ip netns del "$ns"
    else
      keep+=("$ns")
    fi
  done
  NAMESPACES=("${keep[@]}")
}

# ---------------------------------------------------------------------------------------------
# Capture on br0 in the host namespace

# start_tcpdump IFACE FILE: tcpdump on IFACE in the host namespace, once it is listening;
# its pid in TCPDUMP_PID. --immediate-mode: hand each packet to tcpdump at once (otherwise
# libpcap's TPACKET_V3 ring passes packets up in blocks, retired every second, and the ones in
# a block still open when SIGINT comes are lost: a whole capture came out empty that way);
# -U: write each packet as it comes; -Z root: Debian's tcpdump would otherwise drop to the
# tcpdump user, which may not write here. No filter: the file holds what the interface saw.
TCPDUMP_PID=""
start_tcpdump() {
  local iface=$1 file=$2 err=$2.tcpdump.err deadline=$((SECONDS + 10))
  ip netns exec "$H" tcpdump -i "$iface" --immediate-mode -U -Z root -w "$file" 2>"$err" &
  TCPDUMP_PID=$!
  PIDS+=("$TCPDUMP_PID")
  until grep -qs "listening on $iface" "$err"; do
    kill -0 "$TCPDUMP_PID" 2>/dev/null || die "tcpdump did not start: $(cat "$err")"
    [ $SECONDS -lt $deadline ] || die "tcpdump not listening after 10 s: $(cat "$err")"
    sleep 0.05
  done
}

BR0_PID="" BR0_FILE=""
capture_start() {
  BR0_FILE=$WORK/$1
  start_tcpdump br0 "$BR0_FILE"
  BR0_PID=$TCPDUMP_PID
}

# Stops a tcpdump with SIGINT (so it flushes and closes its file) and waits for it.
stop_tcpdump() {
  local pid=$1 deadline=$((SECONDS + 5))
  kill -INT "$pid"
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
  kill -0 "$pid" 2>/dev/null && die "tcpdump $pid still running 5 s after SIGINT"
  wait "$pid" || die "tcpdump exited $?"
  forget_pid "$pid"
}

# Stops the capture after a short wait for the last frames to cross the bridge.
capture_stop() {
  sleep 0.5
  stop_tcpdump "$BR0_PID"
  log "$(grep -h 'packets captured' "$BR0_FILE.tcpdump.err")"
  rm -f "$WORK"/*.tcpdump.err
}

# Runs a command that is expected to exit with one of the listed statuses.
expect_status() {
  local want=$1 rc=0
  shift
  "$@" || rc=$?
  [[ " $want " == *" $rc "* ]] || die "'$*' exited $rc, expected one of: $want"
}

# ---------------------------------------------------------------------------------------------
# The fixtures

# curl's SYN to the VM and the kernel's retransmits (1 s, 3 s, 7 s); curl gives up at 8 s.
curl_syn() {
  local file=$1 family=$2 offload=${3:-} c vm url
  log "$file"
  topo_up client
  c=$(ns_of client)
  member_up client "$offload"
  if [ "$family" = 4 ]; then
    vm=$GUEST_V4 url=http://$GUEST_V4/
  else
    vm=$GUEST_V6 url=http://[$GUEST_V6]/
  fi
  # Without it the client would resolve the VM's address first and never send the SYN.
  ip -n "$c" neigh replace "$vm" lladdr "$GUEST_MAC" dev eth0 nud permanent
  # Recent kernels (6.18 here) retransmit the first SYNs every second by default
  # (tcp_syn_linear_timeouts=4: SYNs at 0, 1, 2, 3, 4, 5, 7 s); the fixtures hold the classic
  # exponential schedule (0, 1, 3, 7 s) of older kernels, which is this setting at 0. Kernels
  # without the setting need nothing.
  if in_ns "$c" test -e /proc/sys/net/ipv4/tcp_syn_linear_timeouts; then
    in_ns "$c" sysctl -qw net.ipv4.tcp_syn_linear_timeouts=0
  fi
  settle client
  capture_start "$file"
  # 28 = timed out: nobody answered.
  expect_status 28 in_ns "$c" curl -sS --noproxy '*' --connect-timeout 8 "$url"
  capture_stop
  topo_down
}

# The guest's gratuitous ARPs from arping: request form (-U), then reply form (-A).
garp_arping() {
  local file=garp-arping.pcap g
  log "$file"
  topo_up guest
  g=$(ns_of guest)
  member_up guest
  settle guest
  capture_start "$file"
  in_ns "$g" arping -q -U -c 2 -I eth0 "$GUEST_V4"
  in_ns "$g" arping -q -A -c 2 -I eth0 "$GUEST_V4"
  capture_stop
  topo_down
}

# A Linux guest's interface coming up with arp_notify and ndisc_notify, and ordinary DAD: the
# capture runs from before the link is up until a second after the VM's IPv6 address has left
# the tentative state (its DAD done, its unsolicited NA sent).
garp_arp_notify() {
  local file=garp-arp-notify.pcap g deadline
  log "$file"
  topo_up guest
  g=$(ns_of guest)
  in_ns "$g" sysctl -qw net.ipv4.conf.eth0.arp_notify=1 net.ipv6.conf.eth0.ndisc_notify=1
  ip -n "$g" addr add "$GUEST_V4/24" dev eth0
  ip -n "$g" addr add "$GUEST_V6/64" dev eth0
  capture_start "$file"
  # Also watch the guest's own port, below the bridge, to tell "not sent" from "not forwarded"
  # (see README.md: not part of the fixture).
  start_tcpdump vguest "$WORK/port.pcap"
  local port_pid=$TCPDUMP_PID
  ip -n "$g" link set eth0 up
  deadline=$((SECONDS + 10))
  until ip -n "$g" -6 addr show dev eth0 | grep -q "$GUEST_V6/64 scope global" &&
    [ -z "$(ip -n "$g" -6 addr show dev eth0 tentative)" ]; do
    [ $SECONDS -lt $deadline ] || die "$GUEST_V6 still tentative after 10 s"
    sleep 0.05
  done
  sleep 1
  stop_tcpdump "$port_pid"
  capture_stop
  "$PY" "$HERE/check.py" --port-report "$WORK/port.pcap" "$WORK/$file" >&2
  rm -f "$WORK/port.pcap"
  topo_down
}

# A client resolving the (absent) VM's addresses: ARP and IPv6 neighbour solicitation.
who_has() {
  local file=who-has.pcap c deadline
  log "$file"
  topo_up client
  c=$(ns_of client)
  member_up client
  settle client
  capture_start "$file"
  # 1 = no reply, as intended.
  expect_status 1 in_ns "$c" arping -q -c 3 -I eth0 "$GUEST_V4"
  expect_status 1 in_ns "$c" ping -q -n -c 2 -W 1 "$GUEST_V6" >/dev/null
  # The kernel keeps soliciting after ping has given up; wait for it to give up too.
  deadline=$((SECONDS + 10))
  until ip -n "$c" -6 neigh show "$GUEST_V6" | grep -q FAILED ||
    [ -z "$(ip -n "$c" -6 neigh show "$GUEST_V6")" ]; do
    [ $SECONDS -lt $deadline ] || die "neighbour entry for $GUEST_V6 did not fail in 10 s"
    sleep 0.1
  done
  capture_stop
  topo_down
}

# Unrelated traffic between the client and another host: pings, HTTP over IPv4 and IPv6 to a
# real server, and a DNS query to a closed port.
noise() {
  local file=noise.pcap c o www deadline body
  log "$file"
  topo_up client other
  c=$(ns_of client)
  o=$(ns_of other)
  member_up client
  member_up other
  www=$WORK/www
  mkdir -p "$www"
  printf 'hello from the other host\n' >"$www/index.html"
  # Python's http.server (on :: it takes IPv4 too): HTTP/1.0, so it closes after the response
  # and each exchange ends in FINs.
  (cd "$www" && exec ip netns exec "$o" "$PY" -m http.server --bind :: 80 >"$WORK/http.log" 2>&1) &
  local http_pid=$!
  PIDS+=("$http_pid")
  deadline=$((SECONDS + 10))
  until [ -n "$(in_ns "$o" ss -Hltn 'sport = :80')" ]; do
    kill -0 "$http_pid" 2>/dev/null || die "http.server did not start: $(cat "$WORK/http.log")"
    [ $SECONDS -lt $deadline ] || die "http.server not listening after 10 s"
    sleep 0.1
  done
  settle client other
  capture_start "$file"
  in_ns "$c" ping -q -n -c 2 -i 0.2 "$OTHER_V4" >/dev/null
  in_ns "$c" ping -q -n -c 2 -i 0.2 "$OTHER_V6" >/dev/null
  body=$(in_ns "$c" curl -sS --noproxy '*' "http://$OTHER_V4/")
  [ "$body" = "hello from the other host" ] || die "unexpected HTTP body over IPv4: $body"
  body=$(in_ns "$c" curl -sS --noproxy '*' "http://[$OTHER_V6]/")
  [ "$body" = "hello from the other host" ] || die "unexpected HTTP body over IPv6: $body"
  # 9 = no reply: the port is closed and the other host answers with ICMP port unreachable.
  expect_status "9" in_ns "$c" dig +tries=1 +timeout=1 -p 53 "@$OTHER_V4" example.test A >/dev/null
  capture_stop
  kill "$http_pid"
  wait "$http_pid" 2>/dev/null || true
  forget_pid "$http_pid"
  topo_down
}

make_fixture() {
  case $1 in
    curl-syn-v4.pcap) curl_syn "$1" 4 ;;
    curl-syn-v6.pcap) curl_syn "$1" 6 ;;
    curl-syn-v4-csum-partial.pcap) curl_syn "$1" 4 offload ;;
    garp-arping.pcap) garp_arping ;;
    garp-arp-notify.pcap) garp_arp_notify ;;
    who-has.pcap) who_has ;;
    noise.pcap) noise ;;
  esac
}

for f in "${WANTED[@]}"; do
  make_fixture "$f"
done

log "checking the new captures"
# Files not made again this run are checked as they are, beside the new ones.
for f in "${FIXTURES[@]}"; do
  [ -e "$WORK/$f" ] || [ ! -e "$HERE/$f" ] || cp "$HERE/$f" "$WORK/$f"
done
if ! "$PY" "$HERE/check.py" "$WORK"; then
  die "a check failed: the files in $HERE are unchanged"
fi
for f in "${WANTED[@]}"; do
  install -m 0644 "$WORK/$f" "$HERE/$f"
done
log "done: ${WANTED[*]} in $HERE"
