//! Frames on the bridge as the pipe's tests write and read them, through etherparse (code
//! nobody here wrote): a client's ARP request and TCP SYN, the guest's gratuitous ARP and its
//! answers to a probe; and what synjitsu sent, read back with every checksum checked.
//!
//! It knows nothing of synjitsu's own frame code (`synjitsu::wire`, `synjitsu::garp`): a
//! layout or checksum both got wrong the same way would pass unnoticed otherwise.

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{
    ArpEthIpv4Packet, ArpOperation, LinkSlice, NetSlice, PacketBuilder, SlicedPacket,
    TcpOptionElement, TransportSlice,
};
use shared_proto::Mac;

/// A machine on the bridge: its MAC and IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub mac: Mac,
    pub ip: Ipv4Addr,
}

/// An ARP request from `from` for `target`, broadcast.
pub fn arp_request(from: Host, target: Ipv4Addr) -> Vec<u8> {
    arp(from, Mac::BROADCAST, Mac([0; 6]), target)
}

/// `host`'s own gratuitous ARP, in the request form `arping -U` and most stacks send: sender
/// and target are its address.
pub fn gratuitous_arp(host: Host) -> Vec<u8> {
    arp(host, Mac::BROADCAST, Mac::BROADCAST, host.ip)
}

fn arp(from: Host, eth_dst: Mac, target_mac: Mac, target_ip: Ipv4Addr) -> Vec<u8> {
    let packet = ArpEthIpv4Packet {
        operation: ArpOperation::REQUEST,
        sender_mac: from.mac.0,
        sender_ipv4: from.ip.octets(),
        target_mac: target_mac.0,
        target_ipv4: target_ip.octets(),
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(from.mac.0, eth_dst.0)
        .arp(packet.into())
        .write_to_vec(&mut out)
        .expect("an ARP request fits a frame");
    out
}

/// A Linux client's SYN from `from:src_port` to `to_mac`/`to`, with Linux's options: MSS
/// 1460, SACK permitted, a timestamp, window scale 7.
pub fn client_syn(from: Host, src_port: u16, to_mac: Mac, to: SocketAddrV4, isn: u32) -> Vec<u8> {
    let options = [
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::SelectiveAcknowledgementPermitted,
        TcpOptionElement::Timestamp(CLIENT_TSVAL, 0),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
    ];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(from.mac.0, to_mac.0)
        .ipv4(from.ip.octets(), to.ip().octets(), 64)
        .tcp(src_port, to.port(), isn, CLIENT_WINDOW)
        .syn()
        .options(&options)
        .expect("four options fit a TCP header")
        .write_to_vec(&mut out, &[])
        .expect("a SYN fits a frame");
    out
}

/// The window of [`client_syn`].
pub const CLIENT_WINDOW: u16 = 64240;
/// The timestamp value of [`client_syn`].
pub const CLIENT_TSVAL: u32 = 123_456;

/// The guest's answer to `probe` (a SYN synjitsu sent it): a SYN-ACK when its port listens,
/// else a RST-ACK, from the guest's MAC back to the probe's source.
pub fn answer_to_probe(probe: &Tcp, listening: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let builder = PacketBuilder::ethernet2(probe.eth_dst.0, probe.eth_src.0)
        .ipv4(probe.dst.ip().octets(), probe.src.ip().octets(), 64)
        .tcp(probe.dst.port(), probe.src.port(), 0x6e57_0001, 65160);
    let builder = if listening {
        builder.syn().ack(probe.seq.wrapping_add(1))
    } else {
        builder.rst().ack(probe.seq.wrapping_add(1))
    };
    builder
        .write_to_vec(&mut out, &[])
        .expect("a SYN-ACK fits a frame");
    out
}

/// An ARP packet synjitsu sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arp {
    pub eth_src: Mac,
    pub eth_dst: Mac,
    pub reply: bool,
    pub sender: Host,
    pub target: Host,
}

/// A TCP segment synjitsu sent, its IPv4 and TCP checksums checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tcp {
    pub eth_src: Mac,
    pub eth_dst: Mac,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub syn: bool,
    pub has_ack: bool,
    pub rst: bool,
}

/// What a frame synjitsu sent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Arp(Arp),
    Tcp(Tcp),
}

/// Reads a frame synjitsu sent; fails the test on anything etherparse refuses, anything but
/// ARP or TCP over IPv4, and a wrong checksum.
pub fn read(frame: &[u8]) -> Sent {
    let sliced = SlicedPacket::from_ethernet(frame).expect("etherparse reads the frame");
    let Some(LinkSlice::Ethernet2(eth)) = &sliced.link else {
        panic!("not an Ethernet II frame: {frame:02x?}");
    };
    let (eth_src, eth_dst) = (Mac(eth.source()), Mac(eth.destination()));
    match (&sliced.net, &sliced.transport) {
        (Some(NetSlice::Arp(a)), _) => {
            let a = a.to_packet().try_eth_ipv4().expect("Ethernet/IPv4 ARP");
            Sent::Arp(Arp {
                eth_src,
                eth_dst,
                reply: a.operation == ArpOperation::REPLY,
                sender: Host {
                    mac: Mac(a.sender_mac),
                    ip: a.sender_ipv4_addr(),
                },
                target: Host {
                    mac: Mac(a.target_mac),
                    ip: a.target_ipv4_addr(),
                },
            })
        }
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) => {
            let h = ip.header();
            assert_eq!(
                h.header_checksum(),
                h.to_header().calc_header_checksum(),
                "IPv4 header checksum"
            );
            let (src, dst) = (h.source_addr(), h.destination_addr());
            assert_eq!(
                tcp.checksum(),
                tcp.calc_checksum_ipv4(src.octets(), dst.octets())
                    .expect("a small segment"),
                "TCP checksum"
            );
            Sent::Tcp(Tcp {
                eth_src,
                eth_dst,
                src: SocketAddrV4::new(src, tcp.source_port()),
                dst: SocketAddrV4::new(dst, tcp.destination_port()),
                seq: tcp.sequence_number(),
                ack: tcp.acknowledgment_number(),
                syn: tcp.syn(),
                has_ack: tcp.ack(),
                rst: tcp.rst(),
            })
        }
        _ => panic!("neither ARP nor TCP over IPv4: {frame:02x?}"),
    }
}

/// The TCP segments among `frames`, read; the rest (ARP) skipped.
pub fn tcp_segments(frames: &[Vec<u8>]) -> Vec<Tcp> {
    frames
        .iter()
        .filter_map(|f| match read(f) {
            Sent::Tcp(t) => Some(t),
            Sent::Arp(_) => None,
        })
        .collect()
}
