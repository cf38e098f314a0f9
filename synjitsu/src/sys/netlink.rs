//! A `NETLINK_ROUTE` socket: send one request, collect its answers.
//!
//! Owns the file descriptor and every `unsafe` call on it. It neither builds nor parses
//! messages beyond the netlink header ([`crate::fdb`] does); it only knows when a request's
//! answer is complete: its ACK (or error) for a change, `NLMSG_DONE` for a dump.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::check;

/// `NLMSG_ERROR`: an ACK (error 0) or a failure (negative errno).
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a dump.
const NLMSG_DONE: u16 = 3;
/// Length of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// The receive buffer: any datagram the kernel sends on this socket.
const RECV_BUF: usize = 64 * 1024;

/// A bound `NETLINK_ROUTE` socket; closed on drop.
pub struct NetlinkSocket {
    fd: OwnedFd,
    /// Where answers are received, reused by every [`NetlinkSocket::transact`].
    buf: Vec<u8>,
}

impl std::fmt::Debug for NetlinkSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetlinkSocket")
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

impl NetlinkSocket {
    /// Opens and binds a socket (the kernel picks its port id).
    pub fn open() -> io::Result<NetlinkSocket> {
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        })?;
        // SAFETY: `raw` is a fresh descriptor we own; OwnedFd closes it exactly once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_nl is valid (pid 0: the kernel assigns one).
        let mut addr: libc::sockaddr_nl = unsafe { zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl of the length passed; fd is open.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        Ok(NetlinkSocket {
            fd,
            buf: vec![0u8; RECV_BUF],
        })
    }

    /// Sends `msg` (one complete netlink message with sequence number `seq`) to the kernel and
    /// returns the messages that answer it, headers included: for a dump, every message up to
    /// `NLMSG_DONE`; for a change asked with `NLM_F_ACK`, nothing once acknowledged. A
    /// negative error in the answer becomes the `io::Error` of that errno.
    pub fn transact(&mut self, msg: &[u8], seq: u32, dump: bool) -> io::Result<Vec<Vec<u8>>> {
        // SAFETY: `msg` is a valid buffer of the length passed; the kernel (pid 0) is the
        // default destination of an unconnected netlink socket.
        let sent = check(unsafe {
            libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) as libc::c_int
        })?;
        if sent as usize != msg.len() {
            return Err(io::Error::other("short netlink send"));
        }
        let mut out = Vec::new();
        let buf = &mut self.buf;
        loop {
            // SAFETY: `buf` is a valid writable buffer of the length passed.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let ty = u16::from_ne_bytes([rest[4], rest[5]]);
                let mseq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(io::Error::other("malformed netlink answer"));
                }
                let m = &rest[..len];
                // Messages are 4-byte aligned; the last one may end the datagram unpadded.
                rest = &rest[((len + 3) & !3).min(rest.len())..];
                if mseq != seq {
                    // Not ours (a stale answer): skip it.
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = m
                            .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .ok_or_else(|| io::Error::other("short netlink error"))?;
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        if !dump {
                            return Ok(out);
                        }
                    }
                    _ => out.push(m.to_vec()),
                }
            }
        }
    }
}
