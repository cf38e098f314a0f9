// SPDX-License-Identifier: GPL-3.0-only
//! The guest's announcement: one gratuitous ARP, sent once it listens, in the request form
//! `arping -U` uses (sender and target address both the guest's, to broadcast). It tells the
//! bridge where the guest's MAC is and ends synjitsu's standing in for the guest.

use core::net::Ipv4Addr;

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr,
};

/// Bytes of the frame: the Ethernet minimum (42 bytes of header and ARP, zero-padded).
pub const GARP_LEN: usize = 60;

/// Writes the gratuitous ARP for `ip` at `mac` into `out` (at least [`GARP_LEN`] bytes).
pub fn gratuitous_arp(out: &mut [u8], mac: [u8; 6], ip: Ipv4Addr) {
    let out = &mut out[..GARP_LEN];
    out.fill(0);
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: ip,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(mac),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut frame = EthernetFrame::new_unchecked(&mut *out);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
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
}
