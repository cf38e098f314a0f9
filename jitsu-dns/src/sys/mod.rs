//! The only `unsafe` in jitsu-dns: thin, checked wrappers over the system calls std lacks
//! and the libvirt callbacks the `virt` crate does not wrap ([`libvirt`]).
//!
//! Owns signalling a process by pid. Everything else (files, sockets, child processes) goes
//! through std or tokio.

#![allow(unsafe_code)]

pub(crate) mod libvirt;

use std::io;

/// Signals the process backend sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Ask to stop.
    Term,
    /// Stop now.
    Kill,
}

/// Sends `sig` to process `pid`. A process that is already gone is not an error.
pub(crate) fn kill(pid: u32, sig: Signal) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a process id"))?;
    let signo = match sig {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; `pid` is positive,
    // so it names one process and never a process group or every process.
    let rc = unsafe { libc::kill(pid, signo) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_pids_that_would_signal_groups() {
        assert!(kill(0, Signal::Term).is_err());
        assert!(kill(u32::MAX, Signal::Term).is_err());
    }

    #[test]
    fn signals_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        kill(child.id(), Signal::Kill).unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success());
    }
}
