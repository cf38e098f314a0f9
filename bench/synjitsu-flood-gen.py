#!/usr/bin/python3
"""Writes the captures bench/synjitsu-flood replays (classic pcap, Ethernet).

  synjitsu-flood-gen.py flood OUT.pcap FLOOD LEGIT [SEED]
      FLOOD SYNs to the booting VM 10.77.1.10:80 (MAC 02:77:00:00:01:10) from random
      addresses in 198.18.0.0/15, random ports and ISNs, never repeated (spoofed sources do
      not retransmit), with LEGIT SYNs from the client 10.77.1.2 (distinct ports) spread
      evenly over the first half, and each one's retransmission (same port and ISN, as a
      real client sends it a second later) spread over the second half. Checksums complete.
      SEED (default 1) picks the spoofed sources: captures with different seeds share none
      of their SYNs.
  synjitsu-flood-gen.py noise OUT.pcap COUNT
      COUNT frames of traffic that is none of synjitsu's business, sent to MACs the bridge
      has never seen (so it floods them to every port, synjitsu's included): TCP data
      segments with ACK set, UDP datagrams and ICMP echo, between other hosts.

Plain struct packing rather than scapy objects: a hundred thousand frames in seconds.
"""

import random
import struct
import sys

VM_MAC = bytes.fromhex("027700000110")
CLIENT_MAC = bytes.fromhex("027700000102")
VM_IP = bytes([10, 77, 1, 10])
CLIENT_IP = bytes([10, 77, 1, 2])


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def ipv4(src, dst, proto, payload, ident):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0, src, dst)
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + payload


def tcp(src, dst, sport, dport, seq, ack, flags, payload=b"", options=b""):
    off = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 64240, 0, 0) + options
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(hdr) + len(payload))
    c = csum(pseudo + hdr + payload)
    return hdr[:16] + struct.pack("!H", c) + hdr[18:] + payload


SYN_OPTIONS = bytes([2, 4, 0x05, 0xB4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7])


def syn_frame(src_mac, src_ip, sport, isn, ident):
    seg = tcp(src_ip, VM_IP, sport, 80, isn, 0, 0x02, options=SYN_OPTIONS)
    return VM_MAC + src_mac + b"\x08\x00" + ipv4(src_ip, VM_IP, 6, seg, ident)


def write_pcap(path, frames):
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, fr in enumerate(frames):
            f.write(struct.pack("<IIII", i // 1000000, i % 1000000, len(fr), len(fr)))
            f.write(fr)


def flood(out, n_flood, n_legit, seed=1):
    rnd = random.Random(seed)
    legit = [(20000 + i, rnd.getrandbits(32)) for i in range(n_legit)]
    # Where each legitimate SYN goes: originals in the first half, retransmissions in the
    # second, evenly spaced.
    half = n_flood // 2
    step = max(1, half // max(1, n_legit))
    slots = {}
    for i, (port, isn) in enumerate(legit):
        slots.setdefault(i * step + step // 2, []).append((port, isn))
        slots.setdefault(half + i * step + step // 2, []).append((port, isn))
    frames = []
    for i in range(n_flood):
        for port, isn in slots.get(i, []):
            frames.append(syn_frame(CLIENT_MAC, CLIENT_IP, port, isn, i & 0xFFFF))
        src = bytes([198, 18 + rnd.getrandbits(1), rnd.getrandbits(8), rnd.getrandbits(8)])
        mac = bytes([0x02, 0x66]) + src
        frames.append(syn_frame(mac, src, 1024 + rnd.getrandbits(15), rnd.getrandbits(32), i & 0xFFFF))
    write_pcap(out, frames)


def noise(out, n):
    rnd = random.Random(2)
    frames = []
    a, b = bytes([10, 77, 3, 1]), bytes([10, 77, 3, 2])
    # Never seen on the bridge: flooded everywhere.
    mac_a, mac_b = bytes.fromhex("027700000301"), bytes.fromhex("027700000399")
    payload = bytes(rnd.getrandbits(8) for _ in range(1400))
    seq = 1000
    for i in range(n):
        kind = i % 10
        if kind < 8:
            seg = tcp(a, b, 40000, 5001, seq, 1, 0x10, payload)
            seq = (seq + len(payload)) & 0xFFFFFFFF
            fr = mac_b + mac_a + b"\x08\x00" + ipv4(a, b, 6, seg, i & 0xFFFF)
        elif kind == 8:
            udp = struct.pack("!HHHH", 5353, 9999, 8 + 64, 0) + payload[:64]
            fr = mac_b + mac_a + b"\x08\x00" + ipv4(a, b, 17, udp, i & 0xFFFF)
        else:
            icmp = struct.pack("!BBHHH", 8, 0, 0, 7, i & 0xFFFF) + payload[:56]
            icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
            fr = mac_b + mac_a + b"\x08\x00" + ipv4(a, b, 1, icmp, i & 0xFFFF)
        frames.append(fr)
    write_pcap(out, frames)


if __name__ == "__main__":
    if sys.argv[1] == "flood":
        flood(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    elif sys.argv[1] == "noise":
        noise(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: synjitsu-flood-gen.py flood|noise OUT ...")
