//! What the QEMU backend needs from the kernel that no safe wrapper offers: a tap device
//! opened with `TUNSETIFF`, and a child process that inherits chosen descriptors (the tap and
//! QMP's listening socket) in a session of its own.
//!
//! Everything else of that backend (netlink, files, signals) is safe code in
//! `backend::qemu`.

use std::ffi::c_int;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use rustix::io::{FdFlags, fcntl_setfd};
use rustix::ioctl::{Updater, ioctl, opcode};

/// `IFF_TAP`: an Ethernet device.
const IFF_TAP: u16 = 0x0002;
/// `IFF_NO_PI`: frames without the 4-byte packet information header.
const IFF_NO_PI: u16 = 0x1000;
/// `IFF_VNET_HDR`: frames with a virtio-net header, as QEMU opens its own taps.
const IFF_VNET_HDR: u16 = 0x4000;
/// `TUNSETIFF`, `_IOW('T', 202, int)`.
const TUNSETIFF: rustix::ioctl::Opcode = opcode::write::<c_int>(b'T', 202);
/// `IFNAMSIZ`.
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as `TUNSETIFF` reads and writes it: the name, the flags, and the rest of
/// the union (the kernel copies the whole 40 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` as a new tap device named after `pattern` (`jq%d`: the kernel takes
/// the first free number) and returns its descriptor (close-on-exec) and the name the kernel
/// gave it. The device is not persistent: it goes away when the last descriptor of it closes,
/// that is when the QEMU that inherits it exits, whatever the way.
pub(crate) fn open_tap(pattern: &str) -> io::Result<(OwnedFd, String)> {
    let bytes = pattern.as_bytes();
    if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name pattern {pattern:?}: 1 to 15 bytes, no NUL"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF takes a `struct ifreq`, which `IfReq` lays out in full (name, flags
    // and the rest of the union, 40 bytes, NUL-terminated name), and writes the chosen name
    // back into it; the buffer lives across the call.
    unsafe {
        ioctl(&file, Updater::<TUNSETIFF, IfReq>::new(&mut req))?;
    }
    let len = req.name.iter().position(|b| *b == 0).unwrap_or(IFNAMSIZ);
    let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
    Ok((OwnedFd::from(file), name))
}

/// Makes `cmd`'s child inherit `fds` (at the same numbers: only the child's copies lose
/// close-on-exec, so no other process this one starts meanwhile gets them) and start a
/// session of its own, so that it outlives jitsu-dns and no terminal signal reaches it.
pub(crate) fn inherit_in_new_session(cmd: &mut Command, fds: Vec<RawFd>) {
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (fcntl, setsid) through rustix, allocating nothing;
    // each raw descriptor is open in the parent for the whole spawn (the caller owns them),
    // so the child's copy is open too.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                let fd = BorrowedFd::borrow_raw(*fd);
                fcntl_setfd(fd, FdFlags::empty())?;
            }
            rustix::process::setsid()?;
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    #[test]
    fn tap_patterns_that_cannot_be_a_name_are_refused() {
        for bad in ["", "0123456789abcdef", "a\0b"] {
            let e = open_tap(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn a_child_inherits_only_the_descriptors_it_is_given() {
        let (keep_r, keep_w) = std::io::pipe().unwrap();
        let (other_r, other_w) = std::io::pipe().unwrap();
        let keep = keep_w.as_raw_fd();
        let other = other_w.as_raw_fd();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            // Through /proc: dash takes only one-digit descriptors in `>&N`.
            &format!(
                "echo kept > /proc/$$/fd/{keep}; echo leaked 2>/dev/null > /proc/$$/fd/{other}; \
                 exit 0"
            ),
        ]);
        inherit_in_new_session(&mut cmd, vec![keep]);
        let status = cmd.status().unwrap();
        assert!(status.success());
        drop((keep_w, other_w));
        let read = |r: std::io::PipeReader| std::io::read_to_string(r).unwrap();
        assert_eq!(read(keep_r), "kept\n");
        assert_eq!(
            read(other_r),
            "",
            "a descriptor not given leaked into the child"
        );
    }
}
