//! Reading and writing the frames synjitsu deals in: Ethernet II carrying ARP, IPv4 or IPv6;
//! TCP segments over either; ICMPv6 neighbour solicitations and advertisements.
//!
//! Owns the byte layouts, the Internet checksum (including completing a TCP checksum the
//! sender left partial for offload), and a typed [`WireError`] for every way a frame can be
//! malformed. It does not decide anything: which frames matter is [`crate::hold`]'s, and the
//! ARP/NA frames synjitsu sends are built in [`crate::garp`].
//!
//! Hand-written rather than built on `etherparse`: the parser must name the exact reason for
//! every drop (a metric label), look only as deep as synjitsu needs, and give the byte offsets
//! at which a held SYN's checksum is completed in place. `etherparse` checks our output in the
//! tests instead, as an independent reader.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use shared_proto::Mac;

/// Ethernet II header length.
pub const ETH_HDR: usize = 14;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IPv6 next header of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// The shortest Ethernet frame without its FCS; shorter ones are padded on the wire.
pub const MIN_FRAME: usize = 60;
/// ARP over Ethernet/IPv4 body length.
pub const ARP_LEN: usize = 28;
/// IPv4 header without options.
pub const IPV4_HDR: usize = 20;
/// IPv6 fixed header.
pub const IPV6_HDR: usize = 40;
/// TCP header without options.
pub const TCP_HDR: usize = 20;

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// ICMPv6 neighbour solicitation.
pub const ICMPV6_NS: u8 = 135;
/// ICMPv6 neighbour advertisement.
pub const ICMPV6_NA: u8 = 136;

/// Every way a frame can be malformed. Each is a drop reason, counted under its
/// [`WireError::as_str`] name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WireError {
    /// Shorter than an Ethernet header.
    #[error("frame shorter than an Ethernet header")]
    TruncatedEthernet,
    /// ARP body shorter than 28 bytes.
    #[error("truncated ARP")]
    TruncatedArp,
    /// ARP that is not Ethernet/IPv4 (hardware/protocol types or lengths).
    #[error("ARP that is not Ethernet/IPv4")]
    BadArp,
    /// IPv4 header or its announced total length runs past the frame.
    #[error("truncated IPv4")]
    TruncatedIpv4,
    /// IPv4 version, header length or total length is impossible.
    #[error("bad IPv4 header")]
    BadIpv4Header,
    /// IPv4 header checksum is wrong (never offloaded, so always checkable).
    #[error("bad IPv4 header checksum")]
    BadIpv4Checksum,
    /// IPv6 header or its announced payload runs past the frame.
    #[error("truncated IPv6")]
    TruncatedIpv6,
    /// IPv6 version is not 6.
    #[error("bad IPv6 header")]
    BadIpv6Header,
    /// TCP header or its options run past the IP payload.
    #[error("truncated TCP")]
    TruncatedTcp,
    /// TCP data offset below 5 words.
    #[error("bad TCP header")]
    BadTcpHeader,
    /// ICMPv6 neighbour discovery message shorter than its fixed part.
    #[error("truncated neighbour discovery message")]
    TruncatedNdp,
    /// Neighbour discovery that RFC 4861 says to ignore: hop limit not 255, code not 0, or an
    /// option of length zero or running past the message.
    #[error("invalid neighbour discovery message")]
    BadNdp,
    /// ICMPv6 checksum is wrong.
    #[error("bad ICMPv6 checksum")]
    BadIcmpv6Checksum,
}

impl WireError {
    /// Every variant, for metrics.
    pub const ALL: [WireError; 13] = [
        WireError::TruncatedEthernet,
        WireError::TruncatedArp,
        WireError::BadArp,
        WireError::TruncatedIpv4,
        WireError::BadIpv4Header,
        WireError::BadIpv4Checksum,
        WireError::TruncatedIpv6,
        WireError::BadIpv6Header,
        WireError::TruncatedTcp,
        WireError::BadTcpHeader,
        WireError::TruncatedNdp,
        WireError::BadNdp,
        WireError::BadIcmpv6Checksum,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            WireError::TruncatedEthernet => "truncated_ethernet",
            WireError::TruncatedArp => "truncated_arp",
            WireError::BadArp => "bad_arp",
            WireError::TruncatedIpv4 => "truncated_ipv4",
            WireError::BadIpv4Header => "bad_ipv4_header",
            WireError::BadIpv4Checksum => "bad_ipv4_checksum",
            WireError::TruncatedIpv6 => "truncated_ipv6",
            WireError::BadIpv6Header => "bad_ipv6_header",
            WireError::TruncatedTcp => "truncated_tcp",
            WireError::BadTcpHeader => "bad_tcp_header",
            WireError::TruncatedNdp => "truncated_ndp",
            WireError::BadNdp => "bad_ndp",
            WireError::BadIcmpv6Checksum => "bad_icmpv6_checksum",
        }
    }
}

/// The Ethernet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthHeader {
    /// Destination.
    pub dst: Mac,
    /// Source.
    pub src: Mac,
    /// What follows.
    pub ethertype: u16,
}

/// ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOp {
    /// 1.
    Request,
    /// 2.
    Reply,
    /// Anything else (RARP and friends): never answered.
    Other(u16),
}

impl ArpOp {
    fn to_u16(self) -> u16 {
        match self {
            ArpOp::Request => 1,
            ArpOp::Reply => 2,
            ArpOp::Other(v) => v,
        }
    }
}

/// An Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpRepr {
    /// Request, reply or other.
    pub op: ArpOp,
    /// Sender hardware address.
    pub sender_mac: Mac,
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: Mac,
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
}

/// Which neighbour discovery message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NdpKind {
    /// Neighbour solicitation (135).
    Solicitation,
    /// Neighbour advertisement (136) with its flags.
    Advertisement {
        /// R: the sender is a router.
        router: bool,
        /// S: an answer to a solicitation.
        solicited: bool,
        /// O: replace cached link-layer addresses.
        override_: bool,
    },
}

/// A neighbour solicitation or advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NdpRepr {
    /// IPv6 source (`::` in duplicate address detection).
    pub src_ip: Ipv6Addr,
    /// IPv6 destination.
    pub dst_ip: Ipv6Addr,
    /// Solicitation or advertisement.
    pub kind: NdpKind,
    /// The address asked about or advertised.
    pub target: Ipv6Addr,
    /// Source (NS) or target (NA) link-layer address option, if present.
    pub lladdr: Option<Mac>,
}

/// A TCP segment, seen in place inside its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpRepr<'a> {
    /// IP source.
    pub src_ip: IpAddr,
    /// IP destination.
    pub dst_ip: IpAddr,
    /// TCP source port.
    pub src_port: u16,
    /// TCP destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flag bits ([`tcp_flags`]).
    pub flags: u8,
    /// Advertised window, unscaled.
    pub window: u16,
    /// The checksum field as received.
    pub checksum: u16,
    /// The options area (may contain NOP/EOL padding).
    pub options: &'a [u8],
    /// Offset of the TCP header in the frame.
    pub tcp_offset: usize,
    /// TCP header plus payload length.
    pub tcp_len: usize,
}

impl TcpRepr<'_> {
    /// SYN set, ACK clear: a connection attempt.
    pub fn is_syn(&self) -> bool {
        self.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
    }

    /// The frame length that carries this segment, without Ethernet padding.
    pub fn frame_len(&self) -> usize {
        self.tcp_offset + self.tcp_len
    }
}

/// What a frame carries, as far as synjitsu looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// ARP.
    Arp(ArpRepr),
    /// IPv6 neighbour discovery (NS or NA).
    Ndp(NdpRepr),
    /// TCP over IPv4 or IPv6.
    Tcp(TcpRepr<'a>),
    /// Anything else: not synjitsu's business.
    Other,
}

/// A parsed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The Ethernet header.
    pub eth: EthHeader,
    /// What it carries.
    pub packet: Packet<'a>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn mac_at(b: &[u8], at: usize) -> Mac {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[at..at + 6]);
    Mac(m)
}

fn v4_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn v6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(a)
}

/// Parses a frame. `checksums_trusted` skips verifying the ICMPv6 checksum (the kernel said
/// it was valid or is still to be computed by offload); the TCP checksum is never checked
/// here, because whether it must be depends on what synjitsu does with the segment.
pub fn parse(frame: &[u8], checksums_trusted: bool) -> Result<Frame<'_>, WireError> {
    if frame.len() < ETH_HDR {
        return Err(WireError::TruncatedEthernet);
    }
    let eth = EthHeader {
        dst: mac_at(frame, 0),
        src: mac_at(frame, 6),
        ethertype: be16(frame, 12),
    };
    let packet = match eth.ethertype {
        ETHERTYPE_ARP => Packet::Arp(parse_arp(&frame[ETH_HDR..])?),
        ETHERTYPE_IPV4 => parse_ipv4(frame)?,
        ETHERTYPE_IPV6 => parse_ipv6(frame, checksums_trusted)?,
        _ => Packet::Other,
    };
    Ok(Frame { eth, packet })
}

fn parse_arp(b: &[u8]) -> Result<ArpRepr, WireError> {
    if b.len() < ARP_LEN {
        return Err(WireError::TruncatedArp);
    }
    // Ethernet (1) / IPv4, 6-byte and 4-byte addresses: the only ARP on this bridge.
    if be16(b, 0) != 1 || be16(b, 2) != ETHERTYPE_IPV4 || b[4] != 6 || b[5] != 4 {
        return Err(WireError::BadArp);
    }
    let op = match be16(b, 6) {
        1 => ArpOp::Request,
        2 => ArpOp::Reply,
        other => ArpOp::Other(other),
    };
    Ok(ArpRepr {
        op,
        sender_mac: mac_at(b, 8),
        sender_ip: v4_at(b, 14),
        target_mac: mac_at(b, 18),
        target_ip: v4_at(b, 24),
    })
}

fn parse_ipv4(frame: &[u8]) -> Result<Packet<'_>, WireError> {
    let ip = &frame[ETH_HDR..];
    if ip.len() < IPV4_HDR {
        return Err(WireError::TruncatedIpv4);
    }
    if ip[0] >> 4 != 4 {
        return Err(WireError::BadIpv4Header);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    if ihl < IPV4_HDR || total < ihl {
        return Err(WireError::BadIpv4Header);
    }
    if ip.len() < ihl || ip.len() < total {
        return Err(WireError::TruncatedIpv4);
    }
    // The IPv4 header checksum is never offloaded on receive paths: a wrong one is damage.
    if fold(sum_words(&ip[..ihl], 0)) != 0xffff {
        return Err(WireError::BadIpv4Checksum);
    }
    let frag = be16(ip, 6);
    let more_fragments = frag & 0x2000 != 0;
    let offset = frag & 0x1fff;
    if ip[9] != PROTO_TCP || more_fragments || offset != 0 {
        // Fragments are not ours to reassemble: no client fragments a SYN.
        return Ok(Packet::Other);
    }
    let src = IpAddr::V4(v4_at(ip, 12));
    let dst = IpAddr::V4(v4_at(ip, 16));
    parse_tcp(frame, ETH_HDR + ihl, total - ihl, src, dst).map(Packet::Tcp)
}

fn parse_ipv6(frame: &[u8], checksums_trusted: bool) -> Result<Packet<'_>, WireError> {
    let ip = &frame[ETH_HDR..];
    if ip.len() < IPV6_HDR {
        return Err(WireError::TruncatedIpv6);
    }
    if ip[0] >> 4 != 6 {
        return Err(WireError::BadIpv6Header);
    }
    let payload = usize::from(be16(ip, 4));
    if ip.len() < IPV6_HDR + payload {
        return Err(WireError::TruncatedIpv6);
    }
    let src = v6_at(ip, 8);
    let dst = v6_at(ip, 24);
    // Only a next header of TCP or ICMPv6 directly after the fixed header: neighbour
    // discovery never carries extension headers, and neither do the SYNs we hold.
    match ip[6] {
        PROTO_TCP => parse_tcp(
            frame,
            ETH_HDR + IPV6_HDR,
            payload,
            IpAddr::V6(src),
            IpAddr::V6(dst),
        )
        .map(Packet::Tcp),
        PROTO_ICMPV6 => {
            let icmp = &ip[IPV6_HDR..IPV6_HDR + payload];
            parse_ndp(icmp, ip[7], src, dst, checksums_trusted)
        }
        _ => Ok(Packet::Other),
    }
}

fn parse_tcp(
    frame: &[u8],
    at: usize,
    len: usize,
    src_ip: IpAddr,
    dst_ip: IpAddr,
) -> Result<TcpRepr<'_>, WireError> {
    // `at + len` is within the frame: both IP parsers checked their announced lengths.
    let t = &frame[at..at + len];
    if t.len() < TCP_HDR {
        return Err(WireError::TruncatedTcp);
    }
    let data_offset = usize::from(t[12] >> 4) * 4;
    if data_offset < TCP_HDR {
        return Err(WireError::BadTcpHeader);
    }
    if data_offset > t.len() {
        return Err(WireError::TruncatedTcp);
    }
    Ok(TcpRepr {
        src_ip,
        dst_ip,
        src_port: be16(t, 0),
        dst_port: be16(t, 2),
        seq: be32(t, 4),
        ack: be32(t, 8),
        flags: t[13],
        window: be16(t, 14),
        checksum: be16(t, 16),
        options: &t[TCP_HDR..data_offset],
        tcp_offset: at,
        tcp_len: len,
    })
}

fn parse_ndp(
    icmp: &[u8],
    hop_limit: u8,
    src_ip: Ipv6Addr,
    dst_ip: Ipv6Addr,
    checksums_trusted: bool,
) -> Result<Packet<'static>, WireError> {
    let Some(&ty) = icmp.first() else {
        return Err(WireError::TruncatedNdp);
    };
    if ty != ICMPV6_NS && ty != ICMPV6_NA {
        return Ok(Packet::Other);
    }
    // Type, code, checksum, 4 bytes of flags/reserved, then the 16-byte target.
    if icmp.len() < 24 {
        return Err(WireError::TruncatedNdp);
    }
    // RFC 4861 7.1.1/7.1.2: a hop limit below 255 means it crossed a router; ignore it.
    if hop_limit != 255 || icmp[1] != 0 {
        return Err(WireError::BadNdp);
    }
    if !checksums_trusted {
        let sum = pseudo_sum_v6(&src_ip, &dst_ip, PROTO_ICMPV6, icmp.len() as u32);
        if fold(sum_words(icmp, sum)) != 0xffff {
            return Err(WireError::BadIcmpv6Checksum);
        }
    }
    let want_opt = if ty == ICMPV6_NS { 1 } else { 2 };
    let mut lladdr = None;
    let mut opts = &icmp[24..];
    while !opts.is_empty() {
        if opts.len() < 2 {
            return Err(WireError::BadNdp);
        }
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return Err(WireError::BadNdp);
        }
        if opts[0] == want_opt && len >= 8 {
            lladdr = Some(mac_at(opts, 2));
        }
        opts = &opts[len..];
    }
    let kind = if ty == ICMPV6_NS {
        NdpKind::Solicitation
    } else {
        NdpKind::Advertisement {
            router: icmp[4] & 0x80 != 0,
            solicited: icmp[4] & 0x40 != 0,
            override_: icmp[4] & 0x20 != 0,
        }
    };
    Ok(Packet::Ndp(NdpRepr {
        src_ip,
        dst_ip,
        kind,
        target: v6_at(icmp, 8),
        lladdr,
    }))
}

/// Adds `data` as big-endian 16-bit words to `sum` (an odd last byte is padded with zero).
pub fn sum_words(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        // Fold early: a jumbo segment of 0xffff words would overflow u32 otherwise.
        if sum > 0xffff_0000 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// Folds a 32-bit one's-complement sum to 16 bits (not complemented).
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn pseudo_sum_v4(src: &Ipv4Addr, dst: &Ipv4Addr, proto: u8, len: u32) -> u32 {
    let mut s = sum_words(&src.octets(), 0);
    s = sum_words(&dst.octets(), s);
    s + u32::from(proto) + len
}

fn pseudo_sum_v6(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, len: u32) -> u32 {
    let mut s = sum_words(&src.octets(), 0);
    s = sum_words(&dst.octets(), s);
    s + (len >> 16) + (len & 0xffff) + u32::from(proto)
}

/// The pseudo-header sum of a transport segment between `src` and `dst`.
pub fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: u32) -> u32 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => pseudo_sum_v4(&s, &d, proto, len),
        (IpAddr::V6(s), IpAddr::V6(d)) => pseudo_sum_v6(&s, &d, proto, len),
        // A segment never mixes families; the parser cannot produce one.
        _ => 0,
    }
}

/// True if the TCP checksum of `tcp` (parsed from `frame`) is correct.
pub fn tcp_checksum_ok(frame: &[u8], tcp: &TcpRepr<'_>) -> bool {
    let seg = &frame[tcp.tcp_offset..tcp.frame_len()];
    let sum = pseudo_sum(tcp.src_ip, tcp.dst_ip, PROTO_TCP, seg.len() as u32);
    fold(sum_words(seg, sum)) == 0xffff
}

/// The correct TCP checksum for the segment, whatever its checksum field holds now.
pub fn tcp_checksum(frame: &[u8], tcp: &TcpRepr<'_>) -> u16 {
    let seg = &frame[tcp.tcp_offset..tcp.frame_len()];
    let mut sum = pseudo_sum(tcp.src_ip, tcp.dst_ip, PROTO_TCP, seg.len() as u32);
    sum = sum_words(&seg[..16], sum);
    sum = sum_words(&seg[18..], sum);
    !fold(sum)
}

/// Writes the correct TCP checksum into `frame`. A sender that left the checksum to offload
/// (Linux `CHECKSUM_PARTIAL`: the field holds only the pseudo-header sum) is completed this
/// way; the result does not depend on what the field held.
pub fn complete_tcp_checksum(frame: &mut [u8], tcp: &TcpRepr<'_>) {
    let c = tcp_checksum(frame, tcp);
    let at = tcp.tcp_offset + 16;
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Completes the TCP or UDP checksum of an unfragmented IPv4 or IPv6 (no extension header)
/// datagram in `frame`, in place, whatever the field held: a frame passed on whose sender
/// left its checksum to offload (`CHECKSUM_PARTIAL`) must carry a complete one where it goes
/// next. False, and `frame` untouched, for anything else (which has no checksum to finish).
pub fn complete_transport_checksum(frame: &mut [u8]) -> bool {
    let Some((at, len, proto, src, dst)) = transport_of(frame) else {
        return false;
    };
    let field = if proto == PROTO_TCP { 16 } else { 6 };
    let seg = &mut frame[at..at + len];
    if seg.len() < field + 2 {
        return false;
    }
    seg[field] = 0;
    seg[field + 1] = 0;
    let mut c = !fold(sum_words(seg, pseudo_sum(src, dst, proto, len as u32)));
    // RFC 768: a computed 0 is sent as all ones (0 means "no checksum" in UDP over IPv4).
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    seg[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Where the TCP or UDP segment of `frame` is: offset, length, protocol, addresses.
fn transport_of(frame: &[u8]) -> Option<(usize, usize, u8, IpAddr, IpAddr)> {
    let ip = frame.get(ETH_HDR..)?;
    match be16(frame.get(..ETH_HDR)?, 12) {
        ETHERTYPE_IPV4 if ip.len() >= IPV4_HDR && ip[0] >> 4 == 4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(be16(ip, 2));
            let frag = be16(ip, 6);
            let unfragmented = frag & 0x2000 == 0 && frag & 0x1fff == 0;
            let proto = ip[9];
            (ihl >= IPV4_HDR
                && total >= ihl
                && ip.len() >= total
                && unfragmented
                && (proto == PROTO_TCP || proto == PROTO_UDP))
                .then(|| {
                    let (src, dst) = (v4_at(ip, 12), v4_at(ip, 16));
                    let at = ETH_HDR + ihl;
                    (at, total - ihl, proto, IpAddr::V4(src), IpAddr::V4(dst))
                })
        }
        ETHERTYPE_IPV6 if ip.len() >= IPV6_HDR && ip[0] >> 4 == 6 => {
            let payload = usize::from(be16(ip, 4));
            let proto = ip[6];
            (ip.len() >= IPV6_HDR + payload && (proto == PROTO_TCP || proto == PROTO_UDP)).then(
                || {
                    let (src, dst) = (v6_at(ip, 8), v6_at(ip, 24));
                    let at = ETH_HDR + IPV6_HDR;
                    (at, payload, proto, IpAddr::V6(src), IpAddr::V6(dst))
                },
            )
        }
        _ => None,
    }
}

/// Recomputes the TCP checksum of the segment in `frame` in place (for frames built or
/// edited by hand: tests, tools); false if `frame` holds no TCP segment.
pub fn fix_tcp_checksum(frame: &mut [u8]) -> bool {
    let Ok(Frame {
        packet: Packet::Tcp(t),
        ..
    }) = parse(frame, true)
    else {
        return false;
    };
    let (at, len, src, dst) = (t.tcp_offset, t.tcp_len, t.src_ip, t.dst_ip);
    let seg = &mut frame[at..at + len];
    seg[16] = 0;
    seg[17] = 0;
    let c = !fold(sum_words(seg, pseudo_sum(src, dst, PROTO_TCP, len as u32)));
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    true
}

/// Writes an Ethernet header at the start of `out`.
pub fn write_eth(out: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    out[0..6].copy_from_slice(&dst.0);
    out[6..12].copy_from_slice(&src.0);
    out[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// Writes an ARP body at `out[ETH_HDR..]`.
pub fn write_arp(out: &mut [u8], arp: &ArpRepr) {
    let b = &mut out[ETH_HDR..ETH_HDR + ARP_LEN];
    b[0..2].copy_from_slice(&1u16.to_be_bytes());
    b[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    b[4] = 6;
    b[5] = 4;
    b[6..8].copy_from_slice(&arp.op.to_u16().to_be_bytes());
    b[8..14].copy_from_slice(&arp.sender_mac.0);
    b[14..18].copy_from_slice(&arp.sender_ip.octets());
    b[18..24].copy_from_slice(&arp.target_mac.0);
    b[24..28].copy_from_slice(&arp.target_ip.octets());
}

/// Writes an IPv6 header (no flow label, traffic class 0) at `out[ETH_HDR..]`.
pub fn write_ipv6(
    out: &mut [u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    hop_limit: u8,
    payload_len: u16,
) {
    let ip = &mut out[ETH_HDR..ETH_HDR + IPV6_HDR];
    ip[0..4].copy_from_slice(&0x6000_0000u32.to_be_bytes());
    ip[4..6].copy_from_slice(&payload_len.to_be_bytes());
    ip[6] = next_header;
    ip[7] = hop_limit;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
}

/// A TCP segment without payload to emit (RSTs and probe SYNs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOut {
    /// Ethernet source.
    pub eth_src: Mac,
    /// Ethernet destination.
    pub eth_dst: Mac,
    /// IP source; same family as `dst_ip`.
    pub src_ip: IpAddr,
    /// IP destination.
    pub dst_ip: IpAddr,
    /// TCP source port.
    pub src_port: u16,
    /// TCP destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags.
    pub flags: u8,
    /// Window.
    pub window: u16,
    /// Options bytes, a multiple of 4 long.
    pub options: &'static [u8],
}

/// The largest frame [`write_tcp`] makes (IPv6, 20 bytes of options).
pub const TCP_OUT_MAX: usize = ETH_HDR + IPV6_HDR + TCP_HDR + 20;

/// Writes a TCP segment as a complete frame into `out` (at least [`TCP_OUT_MAX`] bytes),
/// with correct checksums, padded to [`MIN_FRAME`]; returns the frame length.
pub fn write_tcp(out: &mut [u8], seg: &TcpOut) -> usize {
    debug_assert!(seg.options.len().is_multiple_of(4) && seg.options.len() <= 20);
    let tcp_len = TCP_HDR + seg.options.len();
    let (ethertype, tcp_at) = match (seg.src_ip, seg.dst_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = &mut out[ETH_HDR..ETH_HDR + IPV4_HDR];
            ip[0] = 0x45;
            ip[1] = 0;
            ip[2..4].copy_from_slice(&((IPV4_HDR + tcp_len) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&[0, 0]);
            // Don't fragment, as Linux sends its own RSTs and SYNs.
            ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = PROTO_TCP;
            ip[10..12].copy_from_slice(&[0, 0]);
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = !fold(sum_words(ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            (ETHERTYPE_IPV4, ETH_HDR + IPV4_HDR)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            write_ipv6(out, s, d, PROTO_TCP, 64, tcp_len as u16);
            (ETHERTYPE_IPV6, ETH_HDR + IPV6_HDR)
        }
        // The callers build both addresses from one family.
        _ => return 0,
    };
    write_eth(out, seg.eth_dst, seg.eth_src, ethertype);
    let t = &mut out[tcp_at..tcp_at + tcp_len];
    t[0..2].copy_from_slice(&seg.src_port.to_be_bytes());
    t[2..4].copy_from_slice(&seg.dst_port.to_be_bytes());
    t[4..8].copy_from_slice(&seg.seq.to_be_bytes());
    t[8..12].copy_from_slice(&seg.ack.to_be_bytes());
    t[12] = ((tcp_len / 4) as u8) << 4;
    t[13] = seg.flags;
    t[14..16].copy_from_slice(&seg.window.to_be_bytes());
    t[16..20].copy_from_slice(&[0, 0, 0, 0]);
    t[TCP_HDR..].copy_from_slice(seg.options);
    let sum = pseudo_sum(seg.src_ip, seg.dst_ip, PROTO_TCP, tcp_len as u32);
    let c = !fold(sum_words(t, sum));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    pad(out, tcp_at + tcp_len)
}

/// Zero-pads a frame of `len` bytes to [`MIN_FRAME`]; returns the padded length.
pub fn pad(out: &mut [u8], len: usize) -> usize {
    if len < MIN_FRAME {
        out[len..MIN_FRAME].fill(0);
        MIN_FRAME
    } else {
        len
    }
}

/// The IPv4 of `ip` if it is one.
pub fn as_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// curl's SYN to 10.77.1.10:80 from 10.77.1.2:40436 as captured on the bridge, with a
    /// complete checksum (0x1bc1); mss 1460, sackOK, TS, nop, wscale 10.
    pub(crate) const SYN_V4: [u8; 74] = [
        0x02, 0x77, 0x00, 0x00, 0x01, 0x10, 0x02, 0x77, 0x00, 0x00, 0x01, 0x02, 0x08, 0x00, 0x45,
        0x00, 0x00, 0x3c, 0x73, 0xa8, 0x40, 0x00, 0x40, 0x06, 0xb0, 0x6e, 0x0a, 0x4d, 0x01, 0x02,
        0x0a, 0x4d, 0x01, 0x0a, 0x9d, 0xf4, 0x00, 0x50, 0x66, 0xf7, 0x51, 0xf8, 0x00, 0x00, 0x00,
        0x00, 0xa0, 0x02, 0xfa, 0xf0, 0x1b, 0xc1, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x04, 0x02,
        0x08, 0x0a, 0x1e, 0x5f, 0xa5, 0x12, 0x00, 0x00, 0x00, 0x00, 0x01, 0x03, 0x03, 0x0a,
    ];

    /// The same SYN as sent with checksum offload on: the field holds the folded
    /// pseudo-header sum (0x16d4); the complete checksum is 0x4c76.
    pub(crate) const SYN_V4_PARTIAL: [u8; 74] = [
        0x02, 0x77, 0x00, 0x00, 0x01, 0x10, 0x02, 0x77, 0x00, 0x00, 0x01, 0x02, 0x08, 0x00, 0x45,
        0x00, 0x00, 0x3c, 0x22, 0x2e, 0x40, 0x00, 0x40, 0x06, 0x01, 0xe9, 0x0a, 0x4d, 0x01, 0x02,
        0x0a, 0x4d, 0x01, 0x0a, 0x94, 0xfc, 0x00, 0x50, 0x85, 0x13, 0x74, 0x3d, 0x00, 0x00, 0x00,
        0x00, 0xa0, 0x02, 0xfa, 0xf0, 0x16, 0xd4, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x04, 0x02,
        0x08, 0x0a, 0x15, 0x48, 0x46, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x01, 0x03, 0x03, 0x0a,
    ];

    /// curl's SYN to [fd77:1::10]:80 from [fd77:1::2]:39004, complete checksum.
    pub(crate) const SYN_V6: [u8; 94] = [
        0x02, 0x77, 0x00, 0x00, 0x01, 0x10, 0x02, 0x77, 0x00, 0x00, 0x01, 0x02, 0x86, 0xdd, 0x60,
        0x0c, 0x76, 0x3d, 0x00, 0x28, 0x06, 0x40, 0xfd, 0x77, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0xfd, 0x77, 0x00, 0x01, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x98, 0x5c, 0x00, 0x50, 0xe9, 0x6d,
        0xf0, 0x78, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfd, 0x20, 0xd7, 0x39, 0x00, 0x00, 0x02,
        0x04, 0x05, 0xa0, 0x04, 0x02, 0x08, 0x0a, 0xf4, 0x41, 0x11, 0xde, 0x00, 0x00, 0x00, 0x00,
        0x01, 0x03, 0x03, 0x0a,
    ];

    /// ARP who-has 10.77.1.10 tell 10.77.1.2 (unpadded, as a veth delivers it).
    pub(crate) const WHO_HAS: [u8; 42] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x77, 0x00, 0x00, 0x01, 0x02, 0x08, 0x06, 0x00,
        0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x02, 0x77, 0x00, 0x00, 0x01, 0x02, 0x0a, 0x4d,
        0x01, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0a, 0x4d, 0x01, 0x0a,
    ];

    /// Neighbour solicitation for fd77:1::10 from fd77:1::2 (with a source link-layer option).
    pub(crate) const NS: [u8; 86] = [
        0x33, 0x33, 0xff, 0x00, 0x00, 0x10, 0x02, 0x77, 0x00, 0x00, 0x01, 0x02, 0x86, 0xdd, 0x60,
        0x00, 0x00, 0x00, 0x00, 0x20, 0x3a, 0xff, 0xfd, 0x77, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x01, 0xff, 0x00, 0x00, 0x10, 0x87, 0x00, 0x7b, 0x12, 0x00, 0x00,
        0x00, 0x00, 0xfd, 0x77, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x10, 0x01, 0x01, 0x02, 0x77, 0x00, 0x00, 0x01, 0x02,
    ];

    /// The neighbour solicitation as captured.
    pub(crate) fn ns_frame() -> Vec<u8> {
        NS.to_vec()
    }

    #[test]
    fn a_v4_syn_parses() {
        let f = parse(&SYN_V4, false).unwrap();
        assert_eq!(f.eth.dst.to_string(), "02:77:00:00:01:10");
        assert_eq!(f.eth.src.to_string(), "02:77:00:00:01:02");
        let Packet::Tcp(t) = f.packet else {
            panic!("not TCP: {f:?}")
        };
        assert!(t.is_syn());
        assert_eq!(t.src_ip, "10.77.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(t.dst_ip, "10.77.1.10".parse::<IpAddr>().unwrap());
        assert_eq!((t.src_port, t.dst_port), (40436, 80));
        assert_eq!(t.seq, 1_727_484_408);
        assert_eq!(t.window, 64240);
        assert_eq!(t.options.len(), 20);
        assert_eq!(t.frame_len(), 74);
        assert!(tcp_checksum_ok(&SYN_V4, &t));
        assert_eq!(tcp_checksum(&SYN_V4, &t), 0x1bc1);
    }

    #[test]
    fn a_v6_syn_parses() {
        let f = parse(&SYN_V6, false).unwrap();
        let Packet::Tcp(t) = f.packet else {
            panic!("not TCP")
        };
        assert!(t.is_syn());
        assert_eq!(t.dst_ip, "fd77:1::10".parse::<IpAddr>().unwrap());
        assert_eq!((t.src_port, t.dst_port), (39004, 80));
        assert_eq!(t.seq, 3_916_296_312);
        assert!(tcp_checksum_ok(&SYN_V6, &t));
        // Recomputing a correct checksum changes nothing.
        let mut again = SYN_V6;
        complete_tcp_checksum(&mut again, &t);
        assert_eq!(again, SYN_V6);
        // An independent reader agrees.
        let sliced = etherparse::SlicedPacket::from_ethernet(&SYN_V6).unwrap();
        let (Some(etherparse::NetSlice::Ipv6(ip)), Some(etherparse::TransportSlice::Tcp(tcp))) =
            (sliced.net, sliced.transport)
        else {
            panic!("etherparse disagrees on the layout")
        };
        let want = tcp
            .to_header()
            .calc_checksum_ipv6(&ip.header().to_header(), tcp.payload())
            .unwrap();
        assert_eq!(t.checksum, want);
    }

    #[test]
    fn a_partial_checksum_is_completed_to_the_correct_one() {
        let f = parse(&SYN_V4_PARTIAL, false).unwrap();
        let Packet::Tcp(t) = f.packet else {
            panic!("not TCP")
        };
        assert!(!tcp_checksum_ok(&SYN_V4_PARTIAL, &t));
        // What Linux leaves for offload: the folded, uncomplemented pseudo-header sum.
        let pseudo = pseudo_sum(t.src_ip, t.dst_ip, PROTO_TCP, t.tcp_len as u32);
        assert_eq!(t.checksum, fold(pseudo));
        let mut done = SYN_V4_PARTIAL;
        complete_tcp_checksum(&mut done, &t);
        assert_eq!(&done[50..52], &0x4c76u16.to_be_bytes(), "tcpdump's value");
        let Packet::Tcp(t2) = parse(&done, false).unwrap().packet else {
            unreachable!()
        };
        assert!(tcp_checksum_ok(&done, &t2));
        // Completing the way offload hardware would (sum from the partial value) agrees.
        let seg = &SYN_V4_PARTIAL[t.tcp_offset..];
        assert_eq!(!fold(sum_words(seg, 0)), 0x4c76);
        // Nothing but the checksum changed.
        assert_eq!(&done[..50], &SYN_V4_PARTIAL[..50]);
        assert_eq!(&done[52..], &SYN_V4_PARTIAL[52..]);
    }

    #[test]
    fn arp_parses_and_round_trips() {
        let f = parse(&WHO_HAS, false).unwrap();
        let Packet::Arp(a) = f.packet else {
            panic!("not ARP")
        };
        assert_eq!(a.op, ArpOp::Request);
        assert_eq!(a.sender_ip, Ipv4Addr::new(10, 77, 1, 2));
        assert_eq!(a.target_ip, Ipv4Addr::new(10, 77, 1, 10));
        assert_eq!(a.target_mac, Mac::BROADCAST);
        let mut out = [0u8; 60];
        write_eth(&mut out, f.eth.dst, f.eth.src, ETHERTYPE_ARP);
        write_arp(&mut out, &a);
        assert_eq!(&out[..42], &WHO_HAS[..]);
        // Padding does not change what it says.
        let Packet::Arp(b) = parse(&out, false).unwrap().packet else {
            panic!()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn ns_parses_with_its_link_layer_option() {
        let f = ns_frame();
        let p = parse(&f, false).unwrap();
        let Packet::Ndp(n) = p.packet else {
            panic!("not NDP: {p:?}")
        };
        assert_eq!(n.kind, NdpKind::Solicitation);
        assert_eq!(n.target, "fd77:1::10".parse::<Ipv6Addr>().unwrap());
        assert_eq!(n.src_ip, "fd77:1::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(n.lladdr, Some("02:77:00:00:01:02".parse().unwrap()));
        // A damaged checksum is caught unless the kernel vouched for it.
        let mut bad = f.clone();
        bad[70] ^= 1;
        assert_eq!(parse(&bad, false), Err(WireError::BadIcmpv6Checksum));
        assert!(parse(&bad, true).is_ok());
        // Hop limit below 255: crossed a router.
        let mut hop = f.clone();
        hop[21] = 64;
        assert_eq!(parse(&hop, true), Err(WireError::BadNdp));
        // An option of length 0 would loop forever in a naive reader.
        let mut zero = f.clone();
        zero[79] = 0;
        assert_eq!(parse(&zero, true), Err(WireError::BadNdp));
    }

    #[test]
    fn transport_checksums_are_completed_for_tcp_and_udp_in_both_families() {
        let mut tcp = SYN_V4_PARTIAL;
        assert!(complete_transport_checksum(&mut tcp));
        assert_eq!(&tcp[50..52], &0x4c76u16.to_be_bytes(), "tcpdump's value");
        let mut v6 = SYN_V6;
        v6[70] = 0x12;
        v6[71] = 0x34;
        assert!(complete_transport_checksum(&mut v6));
        assert_eq!(v6, SYN_V6);
        // UDP, as a DHCP or DNS answer to the guest would be, checked by etherparse.
        for v4 in [true, false] {
            let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
            let b = if v4 {
                b.ipv4([10, 77, 1, 1], [10, 77, 1, 10], 64)
            } else {
                b.ipv6([0xfd; 16], [0xfe; 16], 64)
            };
            let b = b.udp(53, 40000);
            let mut f = Vec::new();
            b.write(&mut f, b"an answer").unwrap();
            let at = f.len() - b"an answer".len() - 8 + 6;
            let want = [f[at], f[at + 1]];
            f[at] = 0;
            f[at + 1] = 0;
            assert!(complete_transport_checksum(&mut f));
            assert_eq!([f[at], f[at + 1]], want, "v4 {v4}");
        }
        // Nothing to complete in ARP.
        let mut arp = [0u8; 42];
        arp[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        assert!(!complete_transport_checksum(&mut arp));
        assert_eq!(arp[14..], [0u8; 28]);
    }

    #[test]
    fn emitted_rst_is_read_back_by_etherparse() {
        for (src, dst) in [("10.77.1.10", "10.77.1.2"), ("fd77:1::10", "fd77:1::2")] {
            let seg = TcpOut {
                eth_src: "02:77:00:00:01:10".parse().unwrap(),
                eth_dst: "02:77:00:00:01:02".parse().unwrap(),
                src_ip: src.parse().unwrap(),
                dst_ip: dst.parse().unwrap(),
                src_port: 80,
                dst_port: 40436,
                seq: 0,
                ack: 1_727_484_409,
                flags: tcp_flags::RST | tcp_flags::ACK,
                window: 0,
                options: &[],
            };
            let mut out = [0u8; TCP_OUT_MAX];
            let n = write_tcp(&mut out, &seg);
            assert!(n >= MIN_FRAME);
            let p = parse(&out[..n], false).unwrap();
            let Packet::Tcp(t) = p.packet else { panic!() };
            assert!(tcp_checksum_ok(&out[..n], &t));
            assert_eq!((t.flags, t.ack, t.src_port), (0x14, 1_727_484_409, 80));
            let sliced = etherparse::SlicedPacket::from_ethernet(&out[..n]).unwrap();
            let Some(etherparse::TransportSlice::Tcp(tcp)) = sliced.transport else {
                panic!()
            };
            assert!(tcp.rst() && tcp.ack() && !tcp.syn());
            assert_eq!(tcp.acknowledgment_number(), 1_727_484_409);
            let want = match sliced.net {
                Some(etherparse::NetSlice::Ipv4(ip)) => {
                    let h = ip.header().to_header();
                    assert_eq!(h.calc_header_checksum(), h.header_checksum);
                    tcp.to_header()
                        .calc_checksum_ipv4(&h, tcp.payload())
                        .unwrap()
                }
                Some(etherparse::NetSlice::Ipv6(ip)) => tcp
                    .to_header()
                    .calc_checksum_ipv6(&ip.header().to_header(), tcp.payload())
                    .unwrap(),
                other => panic!("{other:?}"),
            };
            assert_eq!(tcp.checksum(), want);
        }
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let frames: Vec<Vec<u8>> = vec![
            SYN_V4.to_vec(),
            SYN_V6.to_vec(),
            WHO_HAS.to_vec(),
            ns_frame(),
        ];
        for f in frames {
            for cut in 0..f.len() {
                assert!(parse(&f[..cut], false).is_err(), "cut at {cut} of {f:02x?}");
            }
        }
    }

    #[test]
    fn impossible_headers_are_refused() {
        let mut v = SYN_V4;
        v[14] = 0x44; // IHL 4 words
        assert_eq!(parse(&v, false), Err(WireError::BadIpv4Header));
        let mut v = SYN_V4;
        v[14] = 0x65; // version 6 in an IPv4 frame
        assert_eq!(parse(&v, false), Err(WireError::BadIpv4Header));
        let mut v = SYN_V4;
        v[17] = 0x3d; // total length one past the frame
        assert_eq!(parse(&v, false), Err(WireError::TruncatedIpv4));
        let mut v = SYN_V4;
        v[22] = 0x3f; // TTL changed, header checksum now wrong
        assert_eq!(parse(&v, false), Err(WireError::BadIpv4Checksum));
        let mut v = SYN_V6;
        v[14] = 0x40;
        assert_eq!(parse(&v, false), Err(WireError::BadIpv6Header));
        let mut v = SYN_V6;
        v[66] = 0x40; // data offset 4 words
        assert_eq!(parse(&v, false), Err(WireError::BadTcpHeader));
        let mut v = SYN_V6;
        v[66] = 0xf0; // data offset 60 bytes, past the segment
        assert_eq!(parse(&v, false), Err(WireError::TruncatedTcp));
        let mut a = WHO_HAS;
        a[19] = 16; // 16-byte protocol addresses
        assert_eq!(parse(&a, false), Err(WireError::BadArp));
    }

    #[test]
    fn other_traffic_is_other() {
        let mut v = SYN_V4;
        v[12] = 0x88;
        v[13] = 0xcc; // LLDP
        assert_eq!(parse(&v, false).unwrap().packet, Packet::Other);
    }
}
