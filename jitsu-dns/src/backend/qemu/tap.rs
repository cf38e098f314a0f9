//! A VM's tap device: opened by jitsu-dns (not persistent, so it lives exactly as long as
//! the QEMU that inherits its descriptor), then made a port of the VM's bridge and brought up
//! with one netlink request, before the guest runs: its first frame (its gratuitous ARP, a few
//! milliseconds after QEMU's start) reaches a forwarding port. A standby QEMU's tap stays down
//! and off the bridge until the guest is woken.
//!
//! Owns the netlink request (pure: [`enslave_request`]) and the one round trip it takes. The
//! `TUNSETIFF` itself is [`crate::sys::qemu::open_tap`]; when QEMU runs is the backend's.
//!
//! `ip link set` would cost a process (a few milliseconds) on the path from a DNS query to
//! QEMU's start; the netlink request takes tens of microseconds.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use shared_proto::Mac;

use crate::backend::process::PORT_MAC;

/// Why a tap could not be made a port of its bridge.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TapError {
    /// The VM's `nic` names no bridge in jitsu-dns's network namespace.
    #[error("there is no bridge {0} in jitsu-dns's network namespace (the VM's nic)")]
    NoBridge(String),
    /// Opening the tap failed.
    #[error("creating a tap device ({pattern}): {source}")]
    Open {
        /// The name pattern.
        pattern: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The netlink request failed.
    #[error("making tap {tap} a port of {bridge}: {source}")]
    Enslave {
        /// The tap.
        tap: String,
        /// The bridge.
        bridge: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A tap device, up on its bridge. Dropping it closes jitsu-dns's descriptor: the device
/// goes once no QEMU holds it either.
#[derive(Debug)]
pub(crate) struct Tap {
    /// The descriptor QEMU inherits.
    pub(crate) fd: OwnedFd,
    /// The name the kernel gave it.
    pub(crate) name: String,
}

/// The interface index of `name`, from sysfs.
fn ifindex(name: &str) -> Option<u32> {
    fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A new tap named after `pattern` (`jq%d`), a port of `bridge`, up, with the bridge-port MAC
/// of the process backend's ports and no IPv6 of its own (so the host sends nothing into it).
pub(crate) fn create(pattern: &str, bridge: &str) -> Result<Tap, TapError> {
    let bridge_index = bridge_index(bridge)?;
    let tap = open(pattern)?;
    attach_to(&tap.name, bridge, bridge_index)?;
    Ok(tap)
}

/// A new tap named after `pattern`, down and on no bridge (a standby QEMU's: nothing queues
/// for a guest that does not run yet), with no IPv6 of its own.
pub(crate) fn open(pattern: &str) -> Result<Tap, TapError> {
    let (fd, name) = crate::sys::qemu::open_tap(pattern).map_err(|source| TapError::Open {
        pattern: pattern.to_string(),
        source,
    })?;
    // Before it is up: addrconf would otherwise start (router solicitations, MLD) at once.
    let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    Ok(Tap { fd, name })
}

/// Makes the existing tap `name` a port of `bridge`, up.
pub(crate) fn attach(name: &str, bridge: &str) -> Result<(), TapError> {
    attach_to(name, bridge, bridge_index(bridge)?)
}

fn bridge_index(bridge: &str) -> Result<u32, TapError> {
    fs::metadata(format!("/sys/class/net/{bridge}/bridge"))
        .ok()
        .and_then(|_| ifindex(bridge))
        .ok_or_else(|| TapError::NoBridge(bridge.to_string()))
}

fn attach_to(name: &str, bridge: &str, bridge_index: u32) -> Result<(), TapError> {
    let enslave = |source| TapError::Enslave {
        tap: name.to_string(),
        bridge: bridge.to_string(),
        source,
    };
    let index = ifindex(name).ok_or_else(|| enslave(io::Error::other("no ifindex")))?;
    let mac: Mac = PORT_MAC.parse().map_err(|_| {
        enslave(io::Error::other(
            "the bridge-port MAC constant does not parse",
        ))
    })?;
    request(&enslave_request(1, index, bridge_index, mac), 1).map_err(enslave)
}

/// `RTM_NEWLINK` on link `index`: up, a port of `bridge`, with `mac`, acknowledged.
pub(crate) fn enslave_request(seq: u32, index: u32, bridge: u32, mac: Mac) -> Vec<u8> {
    let mut m = LinkMessage::default();
    m.header.interface_family = AddressFamily::Unspec;
    m.header.index = index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    m.attributes
        .push(LinkAttribute::Address(mac.octets().to_vec()));
    m.attributes.push(LinkAttribute::Controller(bridge));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::NewLink(m)),
    );
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

/// What the kernel answered to request `seq`: `Ok` for an acknowledgement, the errno's error
/// for a refusal, `None` for a message that is not the answer.
pub(crate) fn parse_ack(msg: &[u8], seq: u32) -> Option<io::Result<()>> {
    let buf = NetlinkBuffer::new_checked(msg).ok()?;
    if buf.sequence_number() != seq {
        return None;
    }
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(msg)
        .ok()?
        .payload
    {
        NetlinkPayload::Error(e) => Some(match e.code {
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            None => Ok(()),
        }),
        _ => None,
    }
}

/// Sends one request on a fresh `NETLINK_ROUTE` socket and waits for its acknowledgement.
fn request(msg: &[u8], seq: u32) -> io::Result<()> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind(&SocketAddr::new(0, 0))?;
    if sock.send(msg, 0)? != msg.len() {
        return Err(io::Error::other("short netlink send"));
    }
    let mut rx = Vec::with_capacity(8192);
    loop {
        rx.clear();
        match sock.recv(&mut rx, 0) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let mut rest = rx.as_slice();
        while !rest.is_empty() {
            let len = NetlinkBuffer::new_checked(rest)
                .map_err(|_| io::Error::other("malformed netlink answer"))?
                .length() as usize;
            if let Some(answer) = parse_ack(&rest[..len], seq) {
                return answer;
            }
            // Messages are 4-byte aligned; the last one may end the datagram unpadded.
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = Mac([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]);

    #[test]
    fn the_request_sets_up_master_and_address_on_the_link() {
        let b = enslave_request(7, 42, 3, MAC);
        // struct nlmsghdr: length, RTM_NEWLINK (16), REQUEST|ACK, sequence 7.
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 16);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7);
        // struct ifinfomsg: index 42, flags IFF_UP, change IFF_UP.
        assert_eq!(i32::from_ne_bytes(b[20..24].try_into().unwrap()), 42);
        assert_eq!(u32::from_ne_bytes(b[24..28].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(b[28..32].try_into().unwrap()), 1);
        let m = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&b)
            .unwrap()
            .payload
        {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(m.attributes.contains(&LinkAttribute::Controller(3)));
        assert!(
            m.attributes
                .contains(&LinkAttribute::Address(MAC.octets().to_vec()))
        );
    }

    /// `struct nlmsgerr` answers: error 0 (an acknowledgement) and -19 (ENODEV), sequence 7.
    fn answer(errno: i32, seq: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&36u32.to_ne_bytes());
        b.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&errno.to_ne_bytes());
        b.extend_from_slice(&[0; 16]); // the request's header, as the kernel echoes it
        b
    }

    #[test]
    fn acknowledgements_and_refusals_of_our_request_are_read() {
        assert!(matches!(parse_ack(&answer(0, 7), 7), Some(Ok(()))));
        let e = parse_ack(&answer(-19, 7), 7).unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(19));
        assert!(
            parse_ack(&answer(0, 8), 7).is_none(),
            "another request's answer"
        );
        assert!(parse_ack(&[1, 2, 3], 7).is_none());
    }
}
