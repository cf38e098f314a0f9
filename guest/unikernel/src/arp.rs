// SPDX-License-Identifier: GPL-3.0-only
//! ARP frames the kernel makes itself: its announcement, one gratuitous ARP sent once it
//! listens, in the request form `arping -U` uses (sender and target address both the
//! guest's, to broadcast), which tells the bridge where the guest's MAC is and ends synjitsu's
//! standing in for the guest; the request for its gateway's MAC it sends as it boots; and the
//! ARP reply the server hands smoltcp for a client whose addresses a SYN just showed (it never
//! goes on the wire).

use core::net::Ipv4Addr;

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr,
};

/// Bytes of the gratuitous ARP: the Ethernet minimum (42 bytes of header and ARP,
/// zero-padded).
pub const GARP_LEN: usize = 60;
/// Bytes of an ARP reply that stays inside the kernel (no padding).
pub const ARP_REPLY_LEN: usize = 42;

/// Writes into `out`, zero-padded, an Ethernet frame from `sender` to `dst` carrying the ARP
/// `operation` from `sender` to `target` (each a MAC and an address).
fn emit(
    out: &mut [u8],
    dst: EthernetAddress,
    operation: ArpOperation,
    sender: ([u8; 6], Ipv4Addr),
    target: ([u8; 6], Ipv4Addr),
) {
    out.fill(0);
    let arp = ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr: EthernetAddress(sender.0),
        source_protocol_addr: sender.1,
        target_hardware_addr: EthernetAddress(target.0),
        target_protocol_addr: target.1,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(sender.0),
        dst_addr: dst,
        ethertype: EthernetProtocol::Arp,
    };
    let mut frame = EthernetFrame::new_unchecked(out);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
}

/// Writes the gratuitous ARP for `ip` at `mac` into `out` (at least [`GARP_LEN`] bytes).
pub fn gratuitous_arp(out: &mut [u8], mac: [u8; 6], ip: Ipv4Addr) {
    arp_request(out, (mac, ip), ip);
}

/// Writes into `out` (at least [`GARP_LEN`] bytes) the broadcast ARP request from `us` (MAC,
/// address) for `target`'s MAC.
pub fn arp_request(out: &mut [u8], us: ([u8; 6], Ipv4Addr), target: Ipv4Addr) {
    emit(
        &mut out[..GARP_LEN],
        EthernetAddress::BROADCAST,
        ArpOperation::Request,
        us,
        ([0; 6], target),
    );
}

/// The MAC in `frame` if it is an ARP reply from `ip` (the gateway's answer to
/// [`arp_request`]); `None` for any other frame, malformed ones included.
pub fn reply_from(frame: &[u8], ip: Ipv4Addr) -> Option<[u8; 6]> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Arp {
        return None;
    }
    let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()?;
    match arp {
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr,
            source_protocol_addr,
            ..
        } if source_protocol_addr == ip => Some(source_hardware_addr.0),
        _ => None,
    }
}

/// Writes into `out` (at least [`ARP_REPLY_LEN`] bytes) the ARP reply `peer` would send
/// `us`: `(MAC, address)` of each.
pub fn arp_reply(out: &mut [u8], peer: ([u8; 6], Ipv4Addr), us: ([u8; 6], Ipv4Addr)) {
    let to = EthernetAddress(us.0);
    emit(&mut out[..ARP_REPLY_LEN], to, ArpOperation::Reply, peer, us);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_an_arp_request_for_the_guest_s_own_address_to_broadcast() {
        let mut out = [0xaa; 64];
        gratuitous_arp(
            &mut out,
            [2, 0x77, 0, 9, 0, 0x10],
            Ipv4Addr::new(10, 77, 9, 10),
        );
        #[rustfmt::skip]
        let want: [u8; GARP_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0x77, 0, 9, 0, 0x10, 0x08, 0x06,
            0, 1, 0x08, 0, 6, 4, 0, 1,
            2, 0x77, 0, 9, 0, 0x10, 10, 77, 9, 10,
            0, 0, 0, 0, 0, 0, 10, 77, 9, 10,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(out[..GARP_LEN], want);
        assert_eq!(out[GARP_LEN..], [0xaa; 4], "nothing written past the frame");
    }

    #[test]
    fn the_reply_a_client_would_send_is_addressed_to_the_guest() {
        let mut out = [0xaa; ARP_REPLY_LEN];
        let client = ([2, 0x77, 0, 9, 0, 2], Ipv4Addr::new(10, 77, 9, 2));
        let guest = ([2, 0x77, 0, 9, 0, 0x10], Ipv4Addr::new(10, 77, 9, 10));
        arp_reply(&mut out, client, guest);
        #[rustfmt::skip]
        let want: [u8; ARP_REPLY_LEN] = [
            2, 0x77, 0, 9, 0, 0x10, 2, 0x77, 0, 9, 0, 2, 0x08, 0x06,
            0, 1, 0x08, 0, 6, 4, 0, 2,
            2, 0x77, 0, 9, 0, 2, 10, 77, 9, 2,
            2, 0x77, 0, 9, 0, 0x10, 10, 77, 9, 10,
        ];
        assert_eq!(out, want);
    }

    #[test]
    fn the_request_for_the_gateway_asks_for_its_address_to_broadcast() {
        let mut out = [0xaa; GARP_LEN];
        let guest = ([2, 0x77, 0, 9, 0, 0x10], Ipv4Addr::new(10, 77, 9, 10));
        arp_request(&mut out, guest, Ipv4Addr::new(10, 77, 0, 1));
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0x77, 0, 9, 0, 0x10, 0x08, 0x06,
            0, 1, 0x08, 0, 6, 4, 0, 1,
            2, 0x77, 0, 9, 0, 0x10, 10, 77, 9, 10,
            0, 0, 0, 0, 0, 0, 10, 77, 0, 1,
        ];
        assert_eq!(out[..42], want);
        assert_eq!(
            out[42..],
            [0; GARP_LEN - 42],
            "zero-padded to the Ethernet minimum"
        );
    }

    #[test]
    fn the_gateway_s_mac_is_read_from_its_reply_and_from_nothing_else() {
        let gw = ([2, 0x77, 0, 9, 0, 1], Ipv4Addr::new(10, 77, 0, 1));
        let guest = ([2, 0x77, 0, 9, 0, 0x10], Ipv4Addr::new(10, 77, 9, 10));
        let mut reply = [0u8; ARP_REPLY_LEN];
        arp_reply(&mut reply, gw, guest);
        assert_eq!(reply_from(&reply, gw.1), Some(gw.0));
        assert_eq!(
            reply_from(&reply, Ipv4Addr::new(10, 77, 0, 2)),
            None,
            "another sender"
        );
        let mut request = [0u8; GARP_LEN];
        arp_request(&mut request, gw, guest.1);
        assert_eq!(reply_from(&request, gw.1), None, "a request");
        assert_eq!(reply_from(&reply[..30], gw.1), None, "truncated");
        let mut not_arp = reply;
        not_arp[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(reply_from(&not_arp, gw.1), None, "IPv4, not ARP");
    }
}
