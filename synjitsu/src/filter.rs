//! The classic BPF programs attached to synjitsu's packet sockets, so that only the frames it
//! may act on are copied to user space.
//!
//! [`program`], on synjitsu's port: ARP; ICMPv6 neighbour solicitations and advertisements
//! (next header directly ICMPv6); IPv4 and IPv6 TCP with SYN set and ACK clear; when probe
//! addresses are configured, any TCP to them (the guest's answers to probes); and any frame
//! sent to the MAC of a guest whose frames synjitsu passes on through its port (the program
//! is rebuilt and attached again when that set changes; past [`MAX_GUEST_MACS`], every
//! unicast frame).
//!
//! [`announcements`], on the watcher that sees every port: gratuitous ARPs (to broadcast, a
//! reply or sender address = target address) and unsolicited neighbour advertisements
//! (solicited flag clear), except on the interfaces that see each of them again after the
//! port it came in on (the bridge itself, synjitsu's own pair).
//!
//! Owns the programs as data ([`SockFilter`] instructions, the kernel's `struct sock_filter`
//! layout). Attaching them is [`crate::sys::packet`]'s. The tests run them through a small
//! interpreter of the instructions they use, on captured frames.
//!
//! Not matched: 802.1Q-tagged frames (the kernel strips the tag of frames on an untagged port
//! before the filter runs), IPv4 fragments after the first, and IPv6 with extension headers
//! before TCP or ICMPv6 (neighbour discovery never has them, nor do the SYNs worth holding).

use std::net::{Ipv4Addr, Ipv6Addr};

use shared_proto::Mac;

/// Guest MACs matched one by one at most (5 instructions each, well within the kernel's
/// 4096); past this, the program accepts every unicast frame instead.
pub const MAX_GUEST_MACS: usize = 256;

/// One instruction, laid out as the kernel's `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct SockFilter {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

// Opcode parts (linux/filter.h, linux/bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_LDX: u16 = 0x01;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_MISC: u16 = 0x07;
const BPF_TAX: u16 = 0x00;
const BPF_X: u16 = 0x08;
/// `SKF_AD_OFF + SKF_AD_IFINDEX`: loads the index of the interface the frame arrived on.
const SKF_AD_IFINDEX: u32 = 0xffff_f000 + 8;
const BPF_W: u16 = 0x00;
const BPF_H: u16 = 0x08;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_IND: u16 = 0x40;
const BPF_MSH: u16 = 0xa0;
const BPF_AND: u16 = 0x50;
#[cfg(test)]
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;

/// The snap length returned for an accepted frame: all of it.
pub const ACCEPT_LEN: u32 = 0x0004_0000;

/// A jump target while assembling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum L {
    Accept,
    Reject,
    Ipv4,
    Ipv6,
    Icmp6,
    V4Flags,
    V6Flags,
    Arp,
    Main,
    Next,
    /// Skip this many instructions (a jump within a small block).
    Skip(u8),
}

/// An instruction with symbolic jump targets.
#[derive(Debug, Clone, Copy)]
struct Ins {
    code: u16,
    jt: L,
    jf: L,
    k: u32,
    label: Option<L>,
}

struct Asm {
    ins: Vec<Ins>,
    pending_label: Option<L>,
}

impl Asm {
    fn label(&mut self, l: L) {
        self.pending_label = Some(l);
    }

    fn op(&mut self, code: u16, k: u32) {
        self.jmp(code, k, L::Next, L::Next);
    }

    fn jmp(&mut self, code: u16, k: u32, jt: L, jf: L) {
        let label = self.pending_label.take();
        self.ins.push(Ins {
            code,
            jt,
            jf,
            k,
            label,
        });
    }

    fn finish(self) -> Vec<SockFilter> {
        let at = |l: L| {
            self.ins
                .iter()
                .position(|i| i.label == Some(l))
                .expect("every jump target is defined")
        };
        self.ins
            .iter()
            .enumerate()
            .map(|(n, i)| {
                let rel = |l: L| -> u8 {
                    match l {
                        L::Next => return 0,
                        L::Skip(n) => return n,
                        _ => {}
                    }
                    let off = at(l) - n - 1;
                    u8::try_from(off).expect("the program is short: every jump fits in a byte")
                };
                SockFilter {
                    code: i.code,
                    jt: rel(i.jt),
                    jf: rel(i.jf),
                    k: i.k,
                }
            })
            .collect()
    }
}

const fn ld_abs(size: u16) -> u16 {
    BPF_LD | size | BPF_ABS
}

const JEQ: u16 = BPF_JMP | BPF_JEQ | BPF_K;

/// Builds the program for synjitsu's port. Probe addresses widen it to every TCP segment sent
/// to them; `guests` to every frame sent to one of these MACs.
pub fn program(
    probe_v4: Option<Ipv4Addr>,
    probe_v6: Option<Ipv6Addr>,
    guests: &[Mac],
) -> Vec<SockFilter> {
    let mut a = Asm {
        ins: Vec::new(),
        pending_label: None,
    };
    let jeq = JEQ;

    if guests.len() > MAX_GUEST_MACS {
        // The group bit of the destination: clear for unicast.
        a.op(ld_abs(BPF_B), 0);
        a.jmp(BPF_JMP | BPF_JSET | BPF_K, 0x01, L::Main, L::Accept);
    } else {
        for mac in guests {
            let o = mac.octets();
            // Each block self-contained (its own accept), so no jump grows with the list.
            a.op(ld_abs(BPF_H), 0);
            a.jmp(
                jeq,
                u32::from(u16::from_be_bytes([o[0], o[1]])),
                L::Next,
                L::Skip(3),
            );
            a.op(ld_abs(BPF_W), 2);
            a.jmp(
                jeq,
                u32::from_be_bytes([o[2], o[3], o[4], o[5]]),
                L::Next,
                L::Skip(1),
            );
            a.op(BPF_RET | BPF_K, ACCEPT_LEN);
        }
    }
    a.label(L::Main);
    a.op(ld_abs(BPF_H), 12);
    a.jmp(jeq, 0x0806, L::Accept, L::Next);
    a.jmp(jeq, 0x0800, L::Ipv4, L::Next);
    a.jmp(jeq, 0x86dd, L::Ipv6, L::Reject);

    a.label(L::Ipv4);
    a.op(ld_abs(BPF_B), 14 + 9);
    a.jmp(jeq, 6, L::Next, L::Reject);
    // Later fragments carry no TCP header.
    a.op(ld_abs(BPF_H), 14 + 6);
    a.jmp(BPF_JMP | BPF_JSET | BPF_K, 0x1fff, L::Reject, L::Next);
    if let Some(p) = probe_v4 {
        a.op(ld_abs(BPF_W), 14 + 16);
        a.jmp(jeq, u32::from(p), L::Accept, L::V4Flags);
    }
    a.label(L::V4Flags);
    // X = IPv4 header length; flags are at 14 + X + 13.
    a.op(BPF_LDX | BPF_B | BPF_MSH, 14);
    a.op(BPF_LD | BPF_B | BPF_IND, 14 + 13);
    a.op(BPF_ALU | BPF_AND | BPF_K, 0x12);
    a.jmp(jeq, 0x02, L::Accept, L::Reject);

    a.label(L::Ipv6);
    a.op(ld_abs(BPF_B), 14 + 6);
    a.jmp(jeq, 58, L::Icmp6, L::Next);
    a.jmp(jeq, 6, L::Next, L::Reject);
    if let Some(p) = probe_v6 {
        let o = p.octets();
        for w in 0..4 {
            let word = u32::from_be_bytes([o[w * 4], o[w * 4 + 1], o[w * 4 + 2], o[w * 4 + 3]]);
            a.op(ld_abs(BPF_W), 14 + 24 + 4 * w as u32);
            let jt = if w == 3 { L::Accept } else { L::Next };
            a.jmp(jeq, word, jt, L::V6Flags);
        }
    }
    a.label(L::V6Flags);
    a.op(ld_abs(BPF_B), 14 + 40 + 13);
    a.op(BPF_ALU | BPF_AND | BPF_K, 0x12);
    a.jmp(jeq, 0x02, L::Accept, L::Reject);

    a.label(L::Icmp6);
    a.op(ld_abs(BPF_B), 14 + 40);
    a.jmp(jeq, 135, L::Accept, L::Next);
    a.jmp(jeq, 136, L::Accept, L::Reject);

    a.label(L::Accept);
    a.op(BPF_RET | BPF_K, ACCEPT_LEN);
    a.label(L::Reject);
    a.op(BPF_RET | BPF_K, 0);
    a.finish()
}

/// Builds the program of the announcement watcher (a socket on every interface): gratuitous
/// ARPs and unsolicited neighbour advertisements, none arriving on an interface in `exclude`.
pub fn announcements(exclude: &[u32]) -> Vec<SockFilter> {
    let mut a = Asm {
        ins: Vec::new(),
        pending_label: None,
    };
    let jeq = JEQ;
    a.op(ld_abs(BPF_W), SKF_AD_IFINDEX);
    for ifindex in exclude {
        a.jmp(jeq, *ifindex, L::Reject, L::Next);
    }
    a.op(ld_abs(BPF_H), 12);
    a.jmp(jeq, 0x0806, L::Arp, L::Next);
    a.jmp(jeq, 0x86dd, L::Ipv6, L::Reject);

    a.label(L::Arp);
    a.op(ld_abs(BPF_W), 0);
    a.jmp(jeq, 0xffff_ffff, L::Next, L::Reject);
    a.op(ld_abs(BPF_H), 4);
    a.jmp(jeq, 0xffff, L::Next, L::Reject);
    // A reply to broadcast, or sender address = target address.
    a.op(ld_abs(BPF_H), 14 + 6);
    a.jmp(jeq, 2, L::Accept, L::Next);
    a.op(ld_abs(BPF_W), 14 + 14);
    a.op(BPF_MISC | BPF_TAX, 0);
    a.op(ld_abs(BPF_W), 14 + 24);
    a.jmp(BPF_JMP | BPF_JEQ | BPF_X, 0, L::Accept, L::Reject);

    a.label(L::Ipv6);
    a.op(ld_abs(BPF_B), 14 + 6);
    a.jmp(jeq, 58, L::Next, L::Reject);
    a.op(ld_abs(BPF_B), 14 + 40);
    a.jmp(jeq, 136, L::Next, L::Reject);
    // The solicited flag.
    a.op(ld_abs(BPF_B), 14 + 40 + 4);
    a.jmp(BPF_JMP | BPF_JSET | BPF_K, 0x40, L::Reject, L::Accept);

    a.label(L::Accept);
    a.op(BPF_RET | BPF_K, ACCEPT_LEN);
    a.label(L::Reject);
    a.op(BPF_RET | BPF_K, 0);
    a.finish()
}

/// Runs `prog` on `pkt` as the kernel would, for the instructions [`program`] and
/// [`announcements`] use, the frame having arrived on interface `ifindex`; returns the number
/// of bytes accepted (0: dropped). A load past the end drops the frame, as in the kernel.
/// Only the tests need it.
#[cfg(test)]
fn run_on(prog: &[SockFilter], pkt: &[u8], ifindex: u32) -> u32 {
    let (mut acc, mut x, mut pc) = (0u32, 0u32, 0usize);
    let load = |at: usize, size: usize| -> Option<u32> {
        let b = pkt.get(at..at.checked_add(size)?)?;
        Some(b.iter().fold(0u32, |v, byte| (v << 8) | u32::from(*byte)))
    };
    while let Some(i) = prog.get(pc) {
        pc += 1;
        let size = |code: u16| match code & 0x18 {
            BPF_W => 4,
            BPF_H => 2,
            _ => 1,
        };
        match i.code & 0x07 {
            BPF_LD if i.code & 0xe0 == BPF_ABS && i.k == SKF_AD_IFINDEX => acc = ifindex,
            BPF_LD => {
                let at = match i.code & 0xe0 {
                    BPF_ABS => i.k as usize,
                    BPF_IND => x as usize + i.k as usize,
                    _ => return 0,
                };
                match load(at, size(i.code)) {
                    Some(v) => acc = v,
                    None => return 0,
                }
            }
            BPF_LDX if i.code & 0xe0 == BPF_MSH => match load(i.k as usize, 1) {
                Some(v) => x = (v & 0x0f) * 4,
                None => return 0,
            },
            BPF_ALU if i.code & 0xf0 == BPF_AND => acc &= i.k,
            BPF_MISC if i.code & 0xf8 == BPF_TAX => x = acc,
            BPF_JMP => {
                let operand = if i.code & BPF_X != 0 { x } else { i.k };
                let hit = match i.code & 0xf0 {
                    BPF_JA => {
                        pc += i.k as usize;
                        continue;
                    }
                    BPF_JEQ => acc == operand,
                    BPF_JSET => acc & operand != 0,
                    _ => return 0,
                };
                pc += usize::from(if hit { i.jt } else { i.jf });
            }
            BPF_RET => return i.k,
            _ => return 0,
        }
    }
    0
}

/// [`run_on`] for a frame whose interface does not matter.
#[cfg(test)]
fn run(prog: &[SockFilter], pkt: &[u8]) -> u32 {
    run_on(prog, pkt, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::{NS, SYN_V4, SYN_V4_PARTIAL, SYN_V6, WHO_HAS};

    fn probes() -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        (
            Some(Ipv4Addr::new(10, 77, 1, 250)),
            Some("fd77:1::fa".parse().unwrap()),
        )
    }

    #[test]
    fn syns_arp_and_neighbour_discovery_pass() {
        for prog in [
            program(None, None, &[]),
            program(probes().0, probes().1, &[]),
        ] {
            for f in [&SYN_V4[..], &SYN_V4_PARTIAL, &SYN_V6, &WHO_HAS, &NS] {
                assert_eq!(run(&prog, f), ACCEPT_LEN, "{f:02x?}");
            }
        }
    }

    #[test]
    fn acks_other_protocols_and_runts_are_dropped() {
        let prog = program(None, None, &[]);
        let mut synack = SYN_V4;
        synack[47] = 0x12;
        let mut ack = SYN_V6;
        ack[67] = 0x10;
        let mut udp = SYN_V4;
        udp[23] = 17;
        let mut frag = SYN_V4;
        frag[21] = 0x10; // fragment offset 16
        let mut echo = NS;
        echo[54] = 128; // ICMPv6 echo request
        let mut lldp = WHO_HAS;
        lldp[12] = 0x88;
        lldp[13] = 0xcc;
        for f in [
            &synack[..],
            &ack,
            &udp,
            &frag,
            &echo,
            &lldp,
            &SYN_V4[..40],
            &[][..],
        ] {
            assert_eq!(run(&prog, f), 0, "{f:02x?}");
        }
    }

    #[test]
    fn an_ipv4_header_with_options_is_followed_to_the_flags() {
        // IHL 6: four option bytes (NOPs) shift the TCP header; the filter must use IHL.
        let mut f = SYN_V4[..34].to_vec();
        f[14] = 0x46;
        f.extend_from_slice(&[1, 1, 1, 1]);
        f.extend_from_slice(&SYN_V4[34..]);
        let prog = program(None, None, &[]);
        assert_eq!(run(&prog, &f), ACCEPT_LEN);
        f[38 + 13] = 0x12;
        assert_eq!(run(&prog, &f), 0);
    }

    #[test]
    fn answers_to_the_probe_address_pass_only_with_probes_configured() {
        let (p4, p6) = probes();
        // A RST+ACK from the guest to the probe address.
        let mut rst4 = SYN_V4;
        rst4[47] = 0x14;
        rst4[30..34].copy_from_slice(&p4.unwrap().octets());
        let mut synack6 = SYN_V6;
        synack6[67] = 0x12;
        synack6[38..54].copy_from_slice(&p6.unwrap().octets());
        let plain = program(None, None, &[]);
        let with = program(p4, p6, &[]);
        for f in [&rst4[..], &synack6] {
            assert_eq!(run(&plain, f), 0);
            assert_eq!(run(&with, f), ACCEPT_LEN);
        }
        // Only the probe address, not its neighbours.
        let mut near = synack6;
        near[53] ^= 1;
        assert_eq!(run(&with, &near), 0);
        let mut near4 = rst4;
        near4[33] ^= 1;
        assert_eq!(run(&with, &near4), 0);
    }

    #[test]
    fn frames_to_a_guest_passed_through_its_port_pass_and_no_others() {
        let guest: Mac = "02:77:00:00:01:10".parse().unwrap();
        let other: Mac = "02:77:00:00:01:99".parse().unwrap();
        // A SYN-ACK to the guest (an answer on a connection it opened): not a SYN.
        let mut synack = SYN_V4;
        synack[47] = 0x12;
        assert_eq!(run(&program(None, None, &[]), &synack), 0);
        assert_eq!(run(&program(None, None, &[other]), &synack), 0);
        let prog = program(None, None, &[other, guest]);
        assert_eq!(run(&prog, &synack), ACCEPT_LEN);
        // Only that MAC: one bit off in either half is another.
        for at in [1, 5] {
            let mut near = synack;
            near[at] ^= 1;
            assert_eq!(run(&prog, &near), 0, "byte {at}");
        }
        // The rest of the program still runs after the guests' blocks.
        for f in [&SYN_V4[..], &SYN_V6, &WHO_HAS, &NS] {
            assert_eq!(run(&prog, f), ACCEPT_LEN);
        }
        // Past the bound: every unicast frame, and still no multicast one but ND.
        let many: Vec<Mac> = (0..=MAX_GUEST_MACS as u32)
            .map(|n| {
                let b = n.to_be_bytes();
                Mac([2, 0, b[0], b[1], b[2], b[3]])
            })
            .collect();
        let wide = program(None, None, &many);
        assert!(wide.len() < 100);
        assert_eq!(run(&wide, &synack), ACCEPT_LEN);
        let mut mcast = synack;
        mcast[0] = 0x33;
        assert_eq!(run(&wide, &mcast), 0);
        assert_eq!(run(&wide, &NS), ACCEPT_LEN);
        let bounded = program(None, None, &many[..MAX_GUEST_MACS]);
        assert!(bounded.len() <= 4096, "{}", bounded.len());
    }

    #[test]
    fn the_watcher_passes_gratuitous_arps_and_unsolicited_nas_from_ports_only() {
        let exclude = [3, 4, 5];
        let prog = announcements(&exclude);
        let vm: Mac = "02:77:00:00:01:10".parse().unwrap();
        let ip: Ipv4Addr = "10.77.1.10".parse().unwrap();
        let mut garp = [0u8; crate::garp::MAX_LEN];
        let n = crate::garp::gratuitous_arp(&mut garp, vm, ip);
        let garp = &garp[..n];
        // arping -U: a request, sender address = target address.
        let mut request = garp.to_vec();
        request[21] = 1;
        let mut unsolicited = [0u8; crate::garp::MAX_LEN];
        let n = crate::garp::neighbour_advertisement(
            &mut unsolicited,
            vm,
            "fd77:1::10".parse().unwrap(),
            crate::garp::NaTo::AllNodes,
        );
        let unsolicited = &unsolicited[..n];
        for f in [garp, &request, unsolicited] {
            assert_eq!(run_on(&prog, f, 7), ACCEPT_LEN, "{f:02x?}");
            for e in exclude {
                assert_eq!(run_on(&prog, f, e), 0, "seen again on {e}");
            }
        }
        let mut solicited = [0u8; crate::garp::MAX_LEN];
        let n = crate::garp::neighbour_advertisement(
            &mut solicited,
            vm,
            "fd77:1::10".parse().unwrap(),
            crate::garp::NaTo::Asker {
                ip: "fd77:1::2".parse().unwrap(),
                mac: "02:77:00:00:01:02".parse().unwrap(),
            },
        );
        // A question for another address, a reply to one asker, ND questions, SYNs: no.
        let mut unicast_garp = garp.to_vec();
        unicast_garp[0] = 0x02;
        for f in [
            &WHO_HAS[..],
            &unicast_garp,
            &solicited[..n],
            &NS,
            &SYN_V4,
            &SYN_V6,
            &[][..],
        ] {
            assert_eq!(run_on(&prog, f, 7), 0, "{f:02x?}");
        }
    }
}
