//! One Ethernet broadcast sent from a link of the calling thread's network namespace: the
//! process backend's gratuitous ARP for a guest whose address it configured. An `AF_PACKET`
//! datagram socket, whose address (`sockaddr_ll`) neither rustix nor socket2 builds.
//!
//! Owns the socket for the length of one send. What is sent is the caller's
//! (`backend::process_net::gratuitous_arp`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Sends `payload` (an ARP packet, no Ethernet header: the kernel adds it with the link's own
/// MAC as source) to the Ethernet broadcast address from the link `ifindex`.
pub(crate) fn broadcast_arp(ifindex: u32, payload: &[u8]) -> io::Result<()> {
    let proto = (libc::ETH_P_ARP as u16).to_be();
    let ifindex = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index too large"))?;
    // SAFETY: socket(2) takes no pointers; its result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor socket(2) just returned, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `sockaddr_ll` is plain data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `payload` and `addr` are valid for reads of the lengths passed, for the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
