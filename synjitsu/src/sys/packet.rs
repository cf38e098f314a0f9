//! A raw `AF_PACKET` socket bound to one interface: the kernel BPF filter attached before any
//! frame can arrive, `PACKET_AUXDATA` on every frame (the checksum status), synjitsu's own
//! transmissions not looped back (`PACKET_IGNORE_OUTGOING`, and `PACKET_OUTGOING` frames
//! flagged anyway for kernels without it), and kernel drop statistics.
//!
//! Owns the file descriptor and every `unsafe` call on it. It does not parse frames
//! ([`crate::wire`]) or decide anything ([`crate::hold`]); the tokio shell wraps it in an
//! `AsyncFd`.
//!
//! Hand-written on `libc`, where synjitsu uses `rustix` for plain calls (its credentials):
//! `rustix` can neither attach a classic BPF program nor turn on `PACKET_AUXDATA` (the
//! checksum status of each frame, in a `tpacket_auxdata` control message) or
//! `PACKET_IGNORE_OUTGOING`, nor read `PACKET_STATISTICS`; `socket2` attaches the filter but
//! lacks the rest. Either would leave raw `setsockopt`s here, beside a second crate.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::check;
use crate::filter::SockFilter;

/// `TP_STATUS_CSUMNOTREADY`: the transport checksum is left to offload (partial).
pub const TP_STATUS_CSUMNOTREADY: u32 = libc::TP_STATUS_CSUMNOTREADY;
/// `TP_STATUS_CSUM_VALID`: the transport checksum was verified.
pub const TP_STATUS_CSUM_VALID: u32 = libc::TP_STATUS_CSUM_VALID;

/// What came with a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecvMeta {
    /// Bytes written to the buffer.
    pub len: usize,
    /// The frame was longer than the buffer (and cut).
    pub truncated: bool,
    /// The frame is one this host sent (never synjitsu's business).
    pub outgoing: bool,
    /// `tp_status` from `PACKET_AUXDATA` (0 if absent).
    pub status: u32,
    /// The interface the frame arrived on (the bound one, unless bound to all).
    pub ifindex: i32,
}

/// A packet socket; closed on drop.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live reference to a `T` of the size passed; the kernel copies it
    // and keeps no pointer.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    check(ret).map(|_| ())
}

/// Attaches `prog` to the socket `fd`, replacing any program it had (atomically: no frame
/// passes unfiltered in between).
fn attach(fd: RawFd, prog: &[SockFilter]) -> io::Result<()> {
    // `SockFilter` is `#[repr(C)]` with the kernel's `struct sock_filter` layout.
    const _: () = assert!(size_of::<SockFilter>() == size_of::<libc::sock_filter>());
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "filter too long"))?,
        filter: prog.as_ptr().cast_mut().cast::<libc::sock_filter>(),
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
}

impl PacketSocket {
    /// Opens a non-blocking packet socket on interface `ifindex` (0: every interface of the
    /// namespace) receiving every protocol, with `filter` attached (none: every frame, for the
    /// benchmark's comparison only) and a receive buffer of `rcvbuf` bytes.
    pub fn open(ifindex: i32, filter: Option<&[SockFilter]>, rcvbuf: usize) -> io::Result<Self> {
        // Protocol 0 receives nothing until bind(): the filter is in place before any frame.
        // SAFETY: plain syscall with constant arguments; the result is checked.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        // SAFETY: `raw` is a new descriptor this function owns and nothing else holds.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if let Some(prog) = filter {
            attach(raw, prog)?;
        }
        let one: libc::c_int = 1;
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_AUXDATA, &one)?;
        // Linux 4.20+; older kernels flag outgoing frames in recv() instead.
        let _ = setsockopt(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &one);
        let size = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
        if setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size).is_err() {
            setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, &size)?;
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a live sockaddr_ll and its size is passed.
        check(unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        Ok(PacketSocket { fd })
    }

    /// Receives one frame into `buf`; `WouldBlock` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<RecvMeta> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain old data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 8]>();
        // SAFETY: every pointer in `msg` refers to a live local or to `buf`, with its length;
        // they outlive the call. MSG_TRUNC makes the result the frame's real length.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let mut meta = RecvMeta {
            len: n.min(buf.len()),
            truncated: n > buf.len(),
            outgoing: sll.sll_pkttype == libc::PACKET_OUTGOING,
            status: 0,
            ifindex: sll.sll_ifindex,
        };
        // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay within
        // msg_control/msg_controllen, and a PACKET_AUXDATA message carries a
        // tpacket_auxdata, read unaligned because the kernel promises no alignment for it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET
                    && (*c).cmsg_type == libc::PACKET_AUXDATA
                    && (*c).cmsg_len as usize
                        >= libc::CMSG_LEN(size_of::<libc::tpacket_auxdata>() as u32) as usize
                {
                    let aux = std::ptr::read_unaligned(
                        libc::CMSG_DATA(c).cast::<libc::tpacket_auxdata>(),
                    );
                    meta.status = aux.tp_status;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok(meta)
    }

    /// Sends one complete Ethernet frame out of the bound interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is live for the call and its length is passed with it.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends one complete Ethernet frame out of interface `ifindex` (any interface, not only
    /// the bound one: a frame for a guest goes straight out of its bridge port).
    pub fn send_to(&self, ifindex: i32, frame: &[u8]) -> io::Result<()> {
        if frame.len() < 14 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a frame"));
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        // Already in network order in the frame: the kernel takes it as the skb's protocol.
        sll.sll_protocol = u16::from_ne_bytes([frame[12], frame[13]]);
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `sll` are live for the call and their lengths are passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Replaces the socket's kernel filter with `prog`.
    pub fn set_filter(&self, prog: &[SockFilter]) -> io::Result<()> {
        attach(self.fd.as_raw_fd(), prog)
    }

    /// Frames received and dropped by the kernel (buffer full) since the last call.
    pub fn stats(&self) -> io::Result<(u32, u32)> {
        // SAFETY: tpacket_stats is plain old data; all-zero is a valid value.
        let mut st: libc::tpacket_stats = unsafe { zeroed() };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `st` and `len` are live and `len` is its size.
        check(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        })?;
        Ok((st.tp_packets, st.tp_drops))
    }
}

impl PacketSocket {
    /// Registers the socket with the tokio reactor: readable, and errors (the kernel reports
    /// a vanished or downed interface as a socket error, not as data).
    pub fn into_async(self) -> io::Result<tokio::io::unix::AsyncFd<PacketSocket>> {
        let interest = tokio::io::Interest::READABLE | tokio::io::Interest::ERROR;
        // SAFETY: the descriptor is the `OwnedFd` inside `self`, open until the `AsyncFd`
        // (which owns `self`) drops it; `as_raw_fd` always returns that same descriptor.
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(self, interest) }
            .map_err(|e| e.into_parts().1)
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for PacketSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
