//! The neighbour frames synjitsu sends while it stands in for a guest: gratuitous ARP, ARP
//! replies, and IPv6 neighbour advertisements (unsolicited and solicited).
//!
//! Owns their exact bytes. Every frame is a complete, padded Ethernet frame of at least 60
//! bytes (a veth pads nothing, and some stacks ignore runts). It does not decide when to send
//! them: that is [`crate::hold`]'s.

use std::net::{Ipv4Addr, Ipv6Addr};

use shared_proto::Mac;

use crate::wire::{
    self, ARP_LEN, ArpOp, ArpRepr, ETH_HDR, ETHERTYPE_ARP, ETHERTYPE_IPV6, ICMPV6_NA, IPV6_HDR,
    MIN_FRAME, PROTO_ICMPV6,
};

/// The length of every ARP frame built here.
pub const ARP_FRAME_LEN: usize = MIN_FRAME;
/// The length of every neighbour advertisement built here: 14 + 40 + 24 + 8 (target
/// link-layer address option).
pub const NA_FRAME_LEN: usize = ETH_HDR + IPV6_HDR + 32;
/// A buffer large enough for any frame of this module.
pub const MAX_LEN: usize = NA_FRAME_LEN;

/// `33:33:00:00:00:01`, the Ethernet group of all IPv6 nodes.
const ALL_NODES_MAC: Mac = Mac([0x33, 0x33, 0, 0, 0, 1]);
/// `ff02::1`.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

fn arp(out: &mut [u8], eth_dst: Mac, arp: &ArpRepr) -> usize {
    wire::write_eth(out, eth_dst, arp.sender_mac, ETHERTYPE_ARP);
    wire::write_arp(out, arp);
    wire::pad(out, ETH_HDR + ARP_LEN)
}

/// A gratuitous ARP announcing that `ip` is at `mac`: the reply form (RFC 5227 allows both;
/// a reply is what the original Synjitsu sent and what every cache accepts), sender and target
/// protocol address both `ip`, to broadcast.
pub fn gratuitous_arp(out: &mut [u8], mac: Mac, ip: Ipv4Addr) -> usize {
    arp(
        out,
        Mac::BROADCAST,
        &ArpRepr {
            op: ArpOp::Reply,
            sender_mac: mac,
            sender_ip: ip,
            target_mac: Mac::BROADCAST,
            target_ip: ip,
        },
    )
}

/// The answer to `req` (an ARP request for `ip`): `ip` is at `mac`, sent to the asker only.
pub fn arp_reply(out: &mut [u8], mac: Mac, ip: Ipv4Addr, req: &ArpRepr) -> usize {
    arp(
        out,
        req.sender_mac,
        &ArpRepr {
            op: ArpOp::Reply,
            sender_mac: mac,
            sender_ip: ip,
            target_mac: req.sender_mac,
            target_ip: req.sender_ip,
        },
    )
}

/// Where a neighbour advertisement goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NaTo {
    /// Unsolicited, to all nodes.
    AllNodes,
    /// The answer to a solicitation from `ip` at `mac`.
    Asker {
        /// The solicitation's source address.
        ip: Ipv6Addr,
        /// Its link-layer address.
        mac: Mac,
    },
}

/// A neighbour advertisement that `ip` is at `mac`, with the override flag (synjitsu speaks
/// for the guest's own MAC, so overriding is always right) and a target link-layer address
/// option; solicited if it answers someone.
pub fn neighbour_advertisement(out: &mut [u8], mac: Mac, ip: Ipv6Addr, to: NaTo) -> usize {
    let (eth_dst, dst_ip, solicited) = match to {
        NaTo::AllNodes => (ALL_NODES_MAC, ALL_NODES, false),
        NaTo::Asker { ip, mac } => (mac, ip, true),
    };
    wire::write_eth(out, eth_dst, mac, ETHERTYPE_IPV6);
    let icmp_len = NA_FRAME_LEN - ETH_HDR - IPV6_HDR;
    // RFC 4861: neighbour discovery is only believed with a hop limit of 255.
    wire::write_ipv6(out, ip, dst_ip, PROTO_ICMPV6, 255, icmp_len as u16);
    let icmp = &mut out[ETH_HDR + IPV6_HDR..NA_FRAME_LEN];
    icmp[0] = ICMPV6_NA;
    icmp[1] = 0;
    icmp[2..4].copy_from_slice(&[0, 0]);
    icmp[4] = if solicited { 0x60 } else { 0x20 };
    icmp[5..8].copy_from_slice(&[0, 0, 0]);
    icmp[8..24].copy_from_slice(&ip.octets());
    // Target link-layer address option: type 2, length 1 (8 bytes).
    icmp[24] = 2;
    icmp[25] = 1;
    icmp[26..32].copy_from_slice(&mac.0);
    let sum = wire::pseudo_sum(ip.into(), dst_ip.into(), PROTO_ICMPV6, icmp_len as u32);
    let c = !wire::fold(wire::sum_words(icmp, sum));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    NA_FRAME_LEN
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{NdpKind, Packet, parse};

    fn vm_mac() -> Mac {
        "02:77:00:00:01:10".parse().unwrap()
    }

    #[test]
    fn gratuitous_arp_is_exactly_60_bytes_of_reply_to_broadcast() {
        let mut out = [0xaau8; MAX_LEN];
        let n = gratuitous_arp(&mut out, vm_mac(), Ipv4Addr::new(10, 77, 1, 10));
        assert_eq!(n, 60);
        #[rustfmt::skip]
        let want: [u8; 60] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x77, 0x00, 0x00, 0x01, 0x10, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x02,
            0x02, 0x77, 0x00, 0x00, 0x01, 0x10, 0x0a, 0x4d, 0x01, 0x0a,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0a, 0x4d, 0x01, 0x0a,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(out[..n], want[..]);
        // etherparse reads the same ARP.
        let sliced = etherparse::SlicedPacket::from_ethernet(&out[..n]).unwrap();
        let Some(etherparse::NetSlice::Arp(a)) = sliced.net else {
            panic!("etherparse sees no ARP")
        };
        assert_eq!(a.operation(), etherparse::ArpOperation::REPLY);
        assert_eq!(a.sender_protocol_addr(), &[10, 77, 1, 10]);
    }

    #[test]
    fn arp_reply_goes_to_the_asker() {
        let Packet::Arp(req) = parse(&crate::wire::tests::WHO_HAS, false).unwrap().packet else {
            panic!()
        };
        let mut out = [0u8; MAX_LEN];
        let n = arp_reply(&mut out, vm_mac(), req.target_ip, &req);
        assert_eq!(n, 60);
        let f = parse(&out[..n], false).unwrap();
        assert_eq!(f.eth.dst, req.sender_mac);
        assert_eq!(f.eth.src, vm_mac());
        let Packet::Arp(rep) = f.packet else { panic!() };
        assert_eq!(rep.op, ArpOp::Reply);
        assert_eq!((rep.sender_mac, rep.sender_ip), (vm_mac(), req.target_ip));
        assert_eq!(
            (rep.target_mac, rep.target_ip),
            (req.sender_mac, req.sender_ip)
        );
    }

    #[test]
    fn neighbour_advertisements_parse_back_with_valid_checksums() {
        let ip: Ipv6Addr = "fd77:1::10".parse().unwrap();
        let asker: Ipv6Addr = "fd77:1::2".parse().unwrap();
        let asker_mac: Mac = "02:77:00:00:01:02".parse().unwrap();
        for (to, solicited) in [
            (NaTo::AllNodes, false),
            (
                NaTo::Asker {
                    ip: asker,
                    mac: asker_mac,
                },
                true,
            ),
        ] {
            let mut out = [0u8; MAX_LEN];
            let n = neighbour_advertisement(&mut out, vm_mac(), ip, to);
            assert_eq!(n, 86);
            // Checksum verified (not trusted) by our parser.
            let f = parse(&out[..n], false).unwrap();
            let Packet::Ndp(na) = f.packet else { panic!() };
            assert_eq!(
                na.kind,
                NdpKind::Advertisement {
                    router: false,
                    solicited,
                    override_: true
                }
            );
            assert_eq!(na.target, ip);
            assert_eq!(na.lladdr, Some(vm_mac()));
            assert_eq!(f.eth.src, vm_mac());
            if solicited {
                assert_eq!((f.eth.dst, na.dst_ip), (asker_mac, asker));
            } else {
                assert_eq!(f.eth.dst.to_string(), "33:33:00:00:00:01");
                assert_eq!(na.dst_ip, ALL_NODES);
            }
            // And by etherparse's.
            let sliced = etherparse::SlicedPacket::from_ethernet(&out[..n]).unwrap();
            let (
                Some(etherparse::NetSlice::Ipv6(ip6)),
                Some(etherparse::TransportSlice::Icmpv6(icmp)),
            ) = (sliced.net, sliced.transport)
            else {
                panic!("etherparse sees no ICMPv6")
            };
            let h = ip6.header();
            assert_eq!(
                icmp.header()
                    .icmp_type
                    .calc_checksum(h.source(), h.destination(), icmp.payload())
                    .unwrap(),
                icmp.checksum()
            );
        }
    }
}
