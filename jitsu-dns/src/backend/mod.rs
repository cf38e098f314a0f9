//! The backends that run VMs, behind one blocking trait.
//!
//! Owns the [`Backend`] trait, its result types and [`open`], which builds the backend chosen
//! by `-x/--backend` from `-c/--connect`. Every call blocks (libvirt is blocking FFI; the
//! process backend runs `ip` and waits for pid files; the QEMU backend waits for QMP answers
//! and exits), so the daemon calls them off the async runtime and turns results into fleet
//! events. Backends do not decide anything: when to
//! start, stop or resume is the fleet's.
//!
//! The trait is shaped for libvirt (issue 6) as much as for processes: a VM is looked up by
//! its uuid or name, `start` returns a domain id when there is one, `stop` takes the three
//! modes, the MAC and domain id come from the backend's own view (the domain XML), interface
//! counters feed idle detection, [`Backend::list`] serves reconciliation, and
//! [`Backend::subscribe`] lets a backend push lifecycle events instead of being polled.

pub mod libvirt;
pub mod process;
pub mod qemu;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use shared_proto::Mac;

use crate::config::{BackendKind, StopMode, VmConfig};
use crate::fleet::{IfCounters, Observed};

/// What a successful start, resume or unpause reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Started {
    /// The Xen domain id, for backends that have them.
    pub domid: Option<u32>,
    /// The host-side bridge port of its (first) interface, as it runs now: libvirt's
    /// `<target dev='vnet3'/>` of the live domain (`vif<domid>.<n>` under Xen), the process
    /// backend's veth. synjitsu takes the guest's announcement only from there.
    pub port: Option<String>,
}

/// A VM as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// Running, suspended, paused or off.
    pub state: Observed,
    /// The domain id, if running and the backend has them.
    pub domid: Option<u32>,
    /// The MACs of its interfaces, in order, from the backend's definition (none if it has
    /// no definition yet).
    pub macs: Vec<Mac>,
    /// The bridge port its interface will have at every start, where the backend names it
    /// before starting it (the process backend); `None` where it is known only once it runs
    /// (libvirt: see [`Started::port`]).
    pub fixed_port: Option<String>,
}

impl Domain {
    /// The first interface's MAC, the one the VM's `ip` is served on.
    pub fn mac(&self) -> Option<Mac> {
        self.macs.first().copied()
    }
}

/// A VM found by [`Backend::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its name in the backend.
    pub name: String,
    /// Its state.
    pub state: Observed,
}

/// A lifecycle change pushed by the backend (a guest crashed or shut itself down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// The VM's name.
    pub name: String,
    /// Its new state.
    pub state: Observed,
}

/// Where pushed lifecycle events go.
pub type EventSink = Box<dyn Fn(LifecycleEvent) + Send + Sync>;

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The `-c` URI does not fit the backend.
    #[error("backend URI {uri:?}: {why}")]
    Uri {
        /// The URI.
        uri: String,
        /// What is wrong.
        why: String,
    },
    /// The host lacks something the backend needs.
    #[error("{0}")]
    Host(String),
    /// An operation on one VM failed.
    #[error("VM {vm}: {what}: {detail}")]
    Vm {
        /// The VM.
        vm: String,
        /// The operation.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

impl BackendError {
    /// Operation `what` on `vm` failed because of `detail`.
    fn vm(vm: &VmConfig, what: &'static str, detail: String) -> BackendError {
        BackendError::Vm {
            vm: vm.name.to_string(),
            what,
            detail,
        }
    }
}

/// The `-c` URI `uri` is wrong: `why`.
fn uri_err(uri: &str, why: impl Into<String>) -> BackendError {
    BackendError::Uri {
        uri: uri.to_string(),
        why: why.into(),
    }
}

/// The `shutdown_grace` parameter of `uri` (every backend takes it): seconds, 0 to 3600.
fn parse_shutdown_grace(uri: &str, value: &str) -> Result<Duration, BackendError> {
    value
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| uri_err(uri, "shutdown_grace: seconds, 0 to 3600"))
}

/// The value of `key` in the `key=value` lines of a backend's record of a running VM.
fn record_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Creates a backend's runtime directory (`dir` of its URI), saying which if it cannot.
fn create_runtime_dir(dir: &std::path::Path) -> Result<(), BackendError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        BackendError::Host(format!(
            "cannot create runtime directory {}: {e}",
            dir.display()
        ))
    })
}

/// A way of running VMs. Every method blocks; none is called on the async runtime.
pub trait Backend: Send + Sync + fmt::Debug {
    /// `process`, `libvirt` or `qemu`, for logs.
    fn kind(&self) -> &'static str;

    /// Looks the VM up (by uuid if it has one, else by name) and reports its state.
    fn lookup(&self, vm: &VmConfig) -> Result<Domain, BackendError>;

    /// Boots the VM. Leftovers of an earlier run are cleared first.
    fn start(&self, vm: &VmConfig) -> Result<Started, BackendError>;

    /// Stops the VM: `Destroy` at once, `Shutdown` politely then destroy after a grace
    /// period, `Suspend` keeps it to be resumed. Stopping a VM that is off succeeds.
    fn stop(&self, vm: &VmConfig, mode: StopMode) -> Result<(), BackendError>;

    /// Resumes a suspended VM.
    fn resume(&self, vm: &VmConfig) -> Result<Started, BackendError>;

    /// Unpauses a paused VM.
    fn unpause(&self, vm: &VmConfig) -> Result<Started, BackendError>;

    /// The VM's state (a shorthand for [`Backend::lookup`]).
    fn state(&self, vm: &VmConfig) -> Result<Observed, BackendError> {
        self.lookup(vm).map(|d| d.state)
    }

    /// The VM's domain id, if it runs and the backend has them.
    fn domid(&self, vm: &VmConfig) -> Result<Option<u32>, BackendError> {
        self.lookup(vm).map(|d| d.domid)
    }

    /// Packet counters of the VM's interface; `None` where the backend cannot tell.
    fn counters(&self, vm: &VmConfig) -> Result<Option<IfCounters>, BackendError>;

    /// Every VM the backend runs or keeps, managed or not, for reconciliation.
    fn list(&self) -> Result<Vec<Listed>, BackendError>;

    /// Asks the backend to push lifecycle changes to `sink`. Returns false if it cannot,
    /// in which case the daemon polls [`Backend::state`].
    fn subscribe(&self, sink: EventSink) -> Result<bool, BackendError> {
        let _ = sink;
        Ok(false)
    }
}

/// Builds the backend `kind` from its URI (`-c`; `None` for the default).
pub fn open(kind: BackendKind, uri: Option<&str>) -> Result<Arc<dyn Backend>, BackendError> {
    match kind {
        BackendKind::Process => Ok(Arc::new(process::ProcessBackend::open(uri)?)),
        BackendKind::Libvirt => Ok(Arc::new(libvirt::LibvirtBackend::open(uri)?)),
        BackendKind::Qemu => Ok(Arc::new(qemu::QemuBackend::open(uri)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_is_opened_on_its_uri_and_refuses_the_process_backends() {
        let b = open(BackendKind::Libvirt, Some("test:///default")).unwrap();
        assert_eq!(b.kind(), "libvirt");
        let err = open(BackendKind::Libvirt, Some("process:///run/jitsu")).unwrap_err();
        assert!(err.to_string().contains("process backend URI"), "{err}");
        let err = open(BackendKind::Libvirt, Some("nosuchdriver:///x")).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot connect to libvirt at nosuchdriver:///x"),
            "{err}"
        );
    }
}
