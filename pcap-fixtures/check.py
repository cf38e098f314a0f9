#!/usr/bin/python3
"""Checks that each pcap fixture holds the frames README.md says it holds.

    /usr/bin/python3 check.py DIR            check the seven fixtures in DIR; exit 1 on a failure
    /usr/bin/python3 check.py --port-report PORT.pcap BR0.pcap
                                             say where the guest's arp_notify ARP was seen

regenerate.sh runs it on new captures before replacing the committed ones. scapy dissects
(Debian's python3-scapy, which imports only under /usr/bin/python3); checksums are recomputed
here from the raw bytes, so "correct" and "partial" do not depend on scapy's own opinion.
"""

import struct
import sys

from scapy.all import ARP, IP, TCP, UDP, Ether, ICMP, IPv6, PcapReader  # noqa: E402
from scapy.layers.inet6 import (  # noqa: E402
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
)

CLIENT_MAC, CLIENT_V4, CLIENT_V6 = "02:77:00:00:01:02", "10.77.1.2", "fd77:1::2"
GUEST_MAC, GUEST_V4, GUEST_V6 = "02:77:00:00:01:10", "10.77.1.10", "fd77:1::10"
OTHER_MAC, OTHER_V4, OTHER_V6 = "02:77:00:00:01:03", "10.77.1.3", "fd77:1::3"
BROADCAST = "ff:ff:ff:ff:ff:ff"
KNOWN_MACS = {CLIENT_MAC, GUEST_MAC, OTHER_MAC}

# curl's SYN, then the kernel's retransmits after an initial RTO of 1 s, doubling.
SYN_TIMES = [0.0, 1.0, 3.0, 7.0]
SYN_SLACK = 0.3


class Failed(Exception):
    pass


def need(cond, what):
    if not cond:
        raise Failed(what)


# --- raw bytes ------------------------------------------------------------------------------


def read(path):
    """(frames, linktype): frames as (relative time, raw bytes, scapy Ether)."""
    with open(path, "rb") as f:
        head = f.read(24)
    need(len(head) == 24, "shorter than a pcap header")
    magic, _, _, _, _, _, linktype = struct.unpack("<IHHiIII", head)
    need(magic == 0xA1B2C3D4, f"not a little-endian microsecond pcap (magic {magic:#x})")
    need(linktype == 1, f"link type {linktype}, want 1 (Ethernet)")
    frames = []
    with PcapReader(path) as r:
        for p in r:
            raw = bytes(p.original)
            frames.append((float(p.time), raw, Ether(raw)))
    need(frames, "no frames")
    t0 = frames[0][0]
    return [(t - t0, raw, e) for t, raw, e in frames]


def ones_sum(data):
    """The folded 16-bit one's complement sum (not inverted)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def l4_of(raw):
    """(proto, pseudo-header bytes or None, l4 bytes, l4 offset) of an IP frame, else None.
    Also checks the IPv4 header checksum, which Linux always computes itself."""
    ethertype = struct.unpack("!H", raw[12:14])[0]
    if ethertype == 0x0800:
        ihl = (raw[14] & 0x0F) * 4
        total = struct.unpack("!H", raw[16:18])[0]
        need(ones_sum(raw[14 : 14 + ihl]) == 0xFFFF, "IPv4 header checksum wrong")
        proto = raw[23]
        l4 = raw[14 + ihl : 14 + total]
        pseudo = raw[26:34] + struct.pack("!BBH", 0, proto, len(l4))
        return proto, (None if proto == 1 else pseudo), l4, 14 + ihl
    if ethertype == 0x86DD:
        plen = struct.unpack("!H", raw[18:20])[0]
        nh, off = raw[20], 54
        end = 54 + plen
        while nh in (0, 43, 60):  # hop-by-hop (MLD), routing, destination options
            nh, off = raw[off], off + (raw[off + 1] + 1) * 8
        l4 = raw[off:end]
        pseudo = raw[22:54] + struct.pack("!IxxxB", len(l4), nh)
        return nh, pseudo, l4, off
    return None


def checksum_state(raw):
    """'ok', 'partial' (the field holds only the pseudo-header sum), 'bad', or None (not IP)."""
    got = l4_of(raw)
    if got is None:
        return None
    proto, pseudo, l4, _ = got
    if proto not in (1, 6, 17, 58):
        return "ok"
    if ones_sum((pseudo or b"") + l4) == 0xFFFF:
        return "ok"
    field_at = {6: 16, 17: 6}.get(proto)
    if field_at is not None and pseudo is not None:
        field = struct.unpack("!H", l4[field_at : field_at + 2])[0]
        if field == ones_sum(pseudo):
            return "partial"
    return "bad"


def tcp_field(raw):
    _, _, l4, _ = l4_of(raw)
    return struct.unpack("!H", l4[16:18])[0]


# --- predicates ------------------------------------------------------------------------------


def is_syn(e):
    return TCP in e and (int(e[TCP].flags) & 0x12) == 0x02


def is_garp(e):
    return (
        ARP in e
        and e[ARP].psrc == GUEST_V4
        and e[ARP].pdst == GUEST_V4
        and e[ARP].hwsrc == GUEST_MAC
        and e.src == GUEST_MAC
    )


def is_unsolicited_na(e):
    if ICMPv6ND_NA not in e:
        return False
    na = e[ICMPv6ND_NA]
    opt = e[ICMPv6NDOptDstLLAddr].lladdr if ICMPv6NDOptDstLLAddr in e else None
    return (
        na.tgt == GUEST_V6
        and na.O == 1
        and na.S == 0
        and e[IPv6].dst == "ff02::1"
        and e.src == GUEST_MAC
        and opt == GUEST_MAC
    )


def only_known_macs(frames):
    for t, _, e in frames:
        need(e.src in KNOWN_MACS, f"frame at {t:.3f} s from unexpected MAC {e.src}")


def all_checksums(frames, want):
    for t, raw, e in frames:
        state = checksum_state(raw)
        if state is not None:
            need(state == want, f"frame at {t:.3f} s ({e.summary()}): checksum {state}, want {want}")


# --- per fixture -------------------------------------------------------------------------------


def check_curl_syn(frames, family, csum):
    ipl = IP if family == 4 else IPv6
    dst = GUEST_V4 if family == 4 else GUEST_V6
    src = CLIENT_V4 if family == 4 else CLIENT_V6
    for t, _, e in frames:
        need(
            ipl in e and is_syn(e) and e[ipl].src == src and e[ipl].dst == dst,
            f"frame at {t:.3f} s is not the client's SYN to {dst}: {e.summary()}",
        )
        need(e.src == CLIENT_MAC and e.dst == GUEST_MAC, f"frame at {t:.3f} s: MACs {e.src} > {e.dst}")
        need(e[TCP].dport == 80, f"frame at {t:.3f} s: port {e[TCP].dport}")
    need(len(frames) >= 3, f"{len(frames)} SYNs, want at least 3")
    keys = {(e[TCP].sport, e[TCP].seq) for _, _, e in frames}
    need(len(keys) == 1, f"SYNs differ in source port or ISN: {keys}")
    times = [t for t, _, _ in frames]
    for i, t in enumerate(times):
        need(i < len(SYN_TIMES) and abs(t - SYN_TIMES[i]) <= SYN_SLACK, f"SYN {i + 1} at {t:.3f} s")
    all_checksums(frames, csum)
    sport, isn = keys.pop()
    fields = sorted({tcp_field(raw) for _, raw, _ in frames})
    return (
        f"{len(frames)} SYNs at " + ", ".join(f"{t:.3f}" for t in times)
        + f" s, sport {sport}, ISN {isn}, TCP checksum {csum} ("
        + ", ".join(f"{f:#06x}" for f in fields) + ")"
    )


def check_garp_arping(frames):
    ops = []
    for t, _, e in frames:
        need(is_garp(e), f"frame at {t:.3f} s is not the guest's gratuitous ARP: {e.summary()}")
        need(e.dst == BROADCAST, f"frame at {t:.3f} s to {e.dst}")
        ops.append(e[ARP].op)
    need(ops == [1, 1, 2, 2], f"ARP ops {ops}, want two requests (-U) then two replies (-A)")
    return f"{len(frames)} gratuitous ARPs: 2 requests (arping -U), 2 replies (arping -A)"


def check_arp_notify(frames):
    for t, _, e in frames:
        need(e.src == GUEST_MAC, f"frame at {t:.3f} s from {e.src}")
    all_checksums(frames, "ok")
    nas = [t for t, _, e in frames if is_unsolicited_na(e)]
    need(nas, f"no unsolicited NA (override, not solicited, to ff02::1) for {GUEST_V6}")
    garps = [t for t, _, e in frames if is_garp(e)]
    for t, _, e in frames:
        if ARP in e:
            need(is_garp(e), f"ARP at {t:.3f} s is not a gratuitous ARP: {e.summary()}")
    return (
        f"{len(frames)} frames; unsolicited NA for {GUEST_V6} at "
        + ", ".join(f"{t:.3f}" for t in nas) + " s; gratuitous ARP: "
        + (", ".join(f"{t:.3f} s" for t in garps) if garps else "none reached br0")
    )


def check_who_has(frames):
    only_known_macs(frames)
    all_checksums(frames, "ok")
    arps, nss = [], []
    for t, _, e in frames:
        need(e.src == CLIENT_MAC, f"frame at {t:.3f} s from {e.src}: nobody but the client may send")
        if ARP in e:
            a = e[ARP]
            need(a.op == 1 and a.psrc == CLIENT_V4 and a.pdst == GUEST_V4, f"ARP at {t:.3f} s: {e.summary()}")
            arps.append(t)
        elif ICMPv6ND_NS in e:
            need(e[ICMPv6ND_NS].tgt == GUEST_V6, f"NS at {t:.3f} s for {e[ICMPv6ND_NS].tgt}")
            need(e[IPv6].dst == "ff02::1:ff00:10", f"NS at {t:.3f} s to {e[IPv6].dst}")
            nss.append(t)
        else:
            raise Failed(f"unexpected frame at {t:.3f} s: {e.summary()}")
    need(len(arps) == 3, f"{len(arps)} ARP requests, want 3 (arping -c 3)")
    need(nss, "no neighbour solicitation for the VM")
    return (
        f"{len(arps)} ARP who-has at " + ", ".join(f"{t:.3f}" for t in arps)
        + f" s; {len(nss)} NS at " + ", ".join(f"{t:.3f}" for t in nss) + " s"
    )


def check_noise(frames):
    only_known_macs(frames)
    all_checksums(frames, "ok")
    seen = set()
    for t, _, e in frames:
        need(GUEST_MAC not in (e.src, e.dst), f"frame at {t:.3f} s involves the VM's MAC")
        if ARP in e:
            need(GUEST_V4 not in (e[ARP].psrc, e[ARP].pdst), f"ARP about the VM at {t:.3f} s")
        for layer in (ICMPv6ND_NS, ICMPv6ND_NA):
            if layer in e:
                need(e[layer].tgt != GUEST_V6, f"neighbour discovery about the VM at {t:.3f} s")
        if is_syn(e):
            dst = e[IP].dst if IP in e else e[IPv6].dst
            need(dst not in (GUEST_V4, GUEST_V6), f"SYN to the VM at {t:.3f} s")
        fam = "v4" if IP in e else "v6" if IPv6 in e else None
        if ICMP in e and e[ICMP].type in (0, 8):
            seen.add(f"ping {e[ICMP].type}")
        if ICMPv6EchoRequest in e:
            seen.add("ping6 128")
        if ICMPv6EchoReply in e:
            seen.add("ping6 129")
        if TCP in e:
            f = int(e[TCP].flags)
            if f & 0x12 == 0x02:
                seen.add(f"syn {fam}")
            if f & 0x12 == 0x12:
                seen.add(f"synack {fam}")
            if f & 0x01:
                seen.add(f"fin {fam}")
            data = bytes(e[TCP].payload)
            if data.startswith(b"GET / HTTP/1.1"):
                seen.add(f"request {fam}")
            if data.startswith(b"HTTP/1.0 200"):
                seen.add(f"response {fam}")
        if UDP in e and e[UDP].dport == 53 and ICMP not in e:
            seen.add("dns query")
        if ICMP in e and e[ICMP].type == 3 and e[ICMP].code == 3:
            seen.add("port unreachable")
    want = {"ping 8", "ping 0", "ping6 128", "ping6 129", "dns query", "port unreachable"}
    for fam in ("v4", "v6"):
        want |= {f"{k} {fam}" for k in ("syn", "synack", "fin", "request", "response")}
    need(want <= seen, f"missing: {sorted(want - seen)}")
    return f"{len(frames)} frames, all of: {', '.join(sorted(want))}; nothing about the VM"


CHECKS = {
    "curl-syn-v4.pcap": lambda f: check_curl_syn(f, 4, "ok"),
    "curl-syn-v6.pcap": lambda f: check_curl_syn(f, 6, "ok"),
    "curl-syn-v4-csum-partial.pcap": lambda f: check_curl_syn(f, 4, "partial"),
    "garp-arping.pcap": check_garp_arping,
    "garp-arp-notify.pcap": check_arp_notify,
    "who-has.pcap": check_who_has,
    "noise.pcap": check_noise,
}


def port_report(port_path, br_path):
    port = [t for t, _, e in read(port_path) if is_garp(e)]
    br = [t for t, _, e in read(br_path) if is_garp(e)]
    print(
        f"    arp_notify's gratuitous ARP: {len(port)} seen on the guest's bridge port, "
        f"{len(br)} on br0"
        + (" (sent before the port was forwarding: see README.md)" if port and not br else "")
    )


def main(argv):
    if len(argv) == 4 and argv[1] == "--port-report":
        port_report(argv[2], argv[3])
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    failed = 0
    for name, check in CHECKS.items():
        path = f"{argv[1]}/{name}"
        try:
            print(f"ok   {name}: {check(read(path))}")
        except (Failed, OSError) as err:
            print(f"FAIL {name}: {err}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
