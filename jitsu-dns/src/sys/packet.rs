//! One Ethernet broadcast sent from a link of the calling thread's network namespace: the
//! process backend's gratuitous ARP for a guest whose address it configured. An `AF_PACKET`
//! datagram socket, whose address (`sockaddr_ll`) neither rustix nor socket2 builds.
//!
//! Owns the socket for the length of one send, and its close, which is left to a thread of
//! its own: closing a packet socket waits for an RCU grace period (`synchronize_net`, 8-33
//! ms each on the loaded machine), which a boot need not wait for. What is sent is the
//! caller's (`backend::process_net::gratuitous_arp`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The stack of a thread that only closes a descriptor.
const CLOSER_STACK: usize = 16 * 1024;

/// Sends `payload` (an ARP packet, no Ethernet header: the kernel adds it with the link's own
/// MAC as source) to the Ethernet broadcast address from the link `ifindex`.
pub(crate) fn broadcast_arp(ifindex: u32, payload: &[u8]) -> io::Result<()> {
    let proto = (libc::ETH_P_ARP as u16).to_be();
    let ifindex = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index too large"))?;
    // Protocol 0: the socket receives nothing (no hook on the namespace's traffic while it
    // is open); what it sends is ARP by the address's `sll_protocol`.
    // SAFETY: socket(2) takes no pointers; its result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
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
    let result = if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    // Without a thread, the closure is dropped here, closing the socket in this one.
    let _ = std::thread::Builder::new()
        .name("close packet socket".into())
        .stack_size(CLOSER_STACK)
        .spawn(move || drop(fd));
    result
}
