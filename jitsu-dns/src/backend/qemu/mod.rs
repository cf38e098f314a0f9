//! The QEMU backend: each VM is a `qemu-system-x86_64 -M microvm` that jitsu-dns starts
//! itself, as Jitsu's libxl backend went around libvirt (whose domain start alone takes
//! about 0.4 s here, ten times a unikernel's whole boot).
//!
//! URI (`-x qemu -c ...`):
//! `qemu:///run/jitsu/qemu?shutdown_grace=10&qemu=qemu-system-x86_64&tap_prefix=jq&standby=off`.
//! The path is the run directory; `qemu:///system` and `qemu:///session` are libvirt's and
//! refused here. Per VM it holds `<vm>.state` (the record: pid and its start time, tap,
//! accelerator, start instant), `<vm>.pid` (QEMU's own pidfile, which QEMU keeps locked: a
//! second QEMU for the same VM cannot start), `<vm>.qmp` (the QMP socket) and `<vm>.log`
//! (QEMU's messages).
//!
//! A start, on the path from the DNS query to the guest's first instruction, runs no other
//! program and waits for nothing: a tap device is opened (not persistent, so it lives exactly
//! as long as the QEMU holding it: no stray tap after any stop or crash), made a port of the
//! VM's `nic` bridge with the bridge-port MAC and brought up in one netlink request; the QMP
//! socket is bound and connected to (QEMU accepts on it once it runs, and the greeting
//! waits in the socket); QEMU is started with both descriptors inherited, in a session of its
//! own; the record is written. Keys: `kernel` (booted with PVH), `initrd`, `cmdline`,
//! `memory` (default 128 MiB), `mac`, `nic`, `console_log` (the serial console, else
//! nowhere), `domain_type` (`kvm` runs on KVM when `/dev/kvm` opens,
//! otherwise, and by default, TCG).
//!
//! Lifecycle comes from QMP, not from polling: one connection per VM, read by a thread of its
//! own, that carries the commands and the events. Its end is QEMU's exit: a QEMU killed from
//! outside, or a guest that powers off, is pushed to the fleet as off at once. `STOP` and
//! `RESUME` that jitsu-dns did not ask for (an I/O error, a guest panic) are pushed as paused
//! and running. Stop modes: `destroy` is QMP `quit` (SIGKILL if QEMU has not exited 5 s
//! later); `suspend` is QMP `stop`, the guest paused in memory, and resuming is `cont` (the
//! fastest resume there is; a snapshot to a file frees the memory but restores in a new QEMU,
//! see the README); `shutdown` is `system_powerdown`, then `destroy` after the grace.
//!
//! `standby=on` trades memory for latency: each VM that is off keeps a QEMU started paused
//! before the guest's first instruction (`-S`), its tap down and off the bridge; a boot
//! attaches the tap and sends `cont`, skipping QEMU's own start (most of a cold start under
//! TCG). A standby is started when the VM is first looked up and after each stop; one whose
//! command line no longer matches the VM's keys (a reload changed them) is replaced at the
//! boot; one of a VM no longer configured is destroyed at jitsu-dns's next start.
//!
//! A restarted jitsu-dns adopts the QEMUs its records name (pid and start time match, so a
//! reused pid is never taken for a VM), connects to their QMP sockets again and asks whether
//! each runs or is paused; records of QEMUs that are gone are removed at start, and a QEMU
//! that its pidfile names but no record does (jitsu-dns stopped between starting and
//! recording it) is destroyed.
//!
//! Layout: `launch` builds the command line and the record, `qmp` speaks QMP, `tap` makes
//! the tap a bridge port; this file is what the backend does with a VM. The `unsafe` (the tap
//! ioctl, descriptor inheritance) is in [`crate::sys::qemu`].

mod launch;
mod qmp;
mod tap;

pub use launch::{Accel, MACHINE, NO_ACPI, Plan, Record, SANDBOX, fingerprint, machine, qemu_args};

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsRawFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open};

use super::process::{kill, parse_net_dev, proc_stat, tail};
use super::{
    Backend, BackendError, Domain, EventSink, LifecycleEvent, Listed, Started, create_runtime_dir,
    parse_shutdown_grace, uri_err,
};
use crate::config::{DomainType, StopMode, VmConfig};
use crate::fleet::{IfCounters, Observed};
use qmp::{Notice, Qmp, QmpError};

/// The run directory when the URI names none.
pub const DEFAULT_RUN_DIR: &str = "/run/jitsu/qemu";
/// The QEMU binary when the URI names none (found on `PATH`).
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
/// The start of the tap devices' names (`jq0`, `jq1`...).
pub const DEFAULT_TAP_PREFIX: &str = "jq";
/// How long `shutdown` waits for the guest after the power button.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a QMP command may take to be answered.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QEMU may take to exit after `quit`, and again after SIGKILL.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// The longest Unix socket path (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The parsed `-c` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUri {
    /// The run directory.
    pub dir: PathBuf,
    /// The QEMU binary: a path, or a name looked up on `PATH`.
    pub qemu: PathBuf,
    /// The tap devices' name prefix.
    pub tap_prefix: String,
    /// Grace period of `shutdown`.
    pub shutdown_grace: Duration,
    /// Keep a paused QEMU ready for each VM that is off.
    pub standby: bool,
}

/// Parses `qemu://<absolute run dir>?shutdown_grace=..&qemu=..&tap_prefix=..&standby=..`.
pub fn parse_uri(uri: &str) -> Result<QemuUri, BackendError> {
    let rest = uri.strip_prefix("qemu://").ok_or_else(|| {
        uri_err(
            uri,
            "the qemu backend takes qemu://<run directory>, e.g. qemu:///run/jitsu/qemu",
        )
    })?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let dir = match path {
        "" => PathBuf::from(DEFAULT_RUN_DIR),
        "/system" | "/session" | "/embed" => {
            return Err(uri_err(
                uri,
                "this is libvirt's QEMU URI: use -x libvirt for it, or give the qemu backend \
                 its run directory (qemu:///run/jitsu/qemu)",
            ));
        }
        p if p.starts_with('/') => PathBuf::from(p),
        _ => {
            return Err(uri_err(
                uri,
                "the qemu backend runs QEMU on this host: qemu:///<absolute run directory> \
                 (three slashes, no host)",
            ));
        }
    };
    let mut out = QemuUri {
        dir,
        qemu: PathBuf::from(DEFAULT_QEMU),
        tap_prefix: DEFAULT_TAP_PREFIX.to_string(),
        shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        standby: false,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| uri_err(uri, format!("query parameter {pair:?} is not key=value")))?;
        match k {
            "shutdown_grace" => out.shutdown_grace = parse_shutdown_grace(uri, v)?,
            "standby" => {
                out.standby = match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(uri_err(uri, "standby: on or off")),
                }
            }
            "qemu" if !v.is_empty() => out.qemu = PathBuf::from(v),
            "tap_prefix" => {
                // With the kernel's number after it, a name fits IFNAMSIZ.
                let ok = (1..=10).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
                if !ok {
                    return Err(uri_err(uri, "tap_prefix: 1 to 10 characters from a-z 0-9"));
                }
                out.tap_prefix = v.to_string();
            }
            other => {
                return Err(uri_err(
                    uri,
                    format!(
                        "unknown parameter {other:?}; known: shutdown_grace, qemu, tap_prefix, \
                         standby"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// A VM's files in the run directory.
#[derive(Debug, Clone)]
struct Files {
    record: PathBuf,
    pid: PathBuf,
    qmp: PathBuf,
    log: PathBuf,
}

/// What jitsu-dns itself did to a VM, whose events are therefore not news to the fleet.
#[derive(Debug, Default, Clone, Copy)]
struct Expect {
    stop: bool,
    resume: bool,
    exit: bool,
}

/// A VM whose QEMU this jitsu-dns started or adopted.
#[derive(Debug)]
struct Slot {
    rec: Record,
    /// Which connection's notices count (a new one for each start or adoption).
    conn: u64,
    qmp: Option<Arc<Qmp>>,
    /// The QEMU, when this jitsu-dns started it: reaped when it exits.
    child: Option<Child>,
    paused: bool,
    expect: Expect,
    /// Its start has not returned yet: an exit now fails the start instead of being pushed.
    starting: bool,
    /// QEMU has exited; the fleet's clean-up removes the slot.
    exited: bool,
}

impl Slot {
    /// A QEMU known from now on through connection `conn`, running, with no QMP yet.
    fn new(rec: Record, conn: u64, child: Option<Child>) -> Slot {
        Slot {
            rec,
            conn,
            qmp: None,
            child,
            paused: false,
            expect: Expect::default(),
            starting: false,
            exited: false,
        }
    }
}

/// Everything the backend's threads share.
struct Inner {
    uri: QemuUri,
    /// The QEMU binary, resolved.
    qemu: PathBuf,
    /// `/dev/kvm` opens read-write (the host has KVM and may use it).
    kvm: bool,
    vms: Mutex<HashMap<Arc<str>, Slot>>,
    /// One lock per VM: operations on one VM do not interleave.
    ops: Mutex<HashMap<Arc<str>, Arc<Mutex<()>>>>,
    sink: Mutex<Option<Arc<EventSink>>>,
    next_conn: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("uri", &self.uri)
            .field("qemu", &self.qemu)
            .field("kvm", &self.kvm)
            .finish_non_exhaustive()
    }
}

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    inner: Arc<Inner>,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// True while the process `pid` started at `start` runs (not a zombie, not a reused pid).
fn alive(pid: u32, start: u64) -> bool {
    matches!(proc_stat(pid), Some((state, s)) if s == start && !matches!(state, 'Z' | 'X' | 'x'))
}

/// Waits, without polling, until the process `pid` started at `start` has exited, at most
/// `limit`; true if it has (or was gone already).
fn wait_exit(pid: u32, start: u64, limit: Duration) -> bool {
    let Some(p) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return true;
    };
    let pidfd = match pidfd_open(p, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(Errno::SRCH) => return true,
        // No pidfds (a kernel before 5.3): what the record says is all there is.
        Err(_) => return !alive(pid, start),
    };
    // Opened after the check would be another process's: look once the descriptor is held.
    if !alive(pid, start) {
        return true;
    }
    let timeout = Timespec::try_from(limit).unwrap_or(Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    });
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    loop {
        match poll(&mut fds, Some(&timeout)) {
            Ok(n) => return n > 0 || !alive(pid, start),
            Err(Errno::INTR) => continue,
            Err(_) => return !alive(pid, start),
        }
    }
}

/// Writes `rec` to `path` whole (a reader never sees half a record).
fn write_record(path: &Path, rec: &Record) -> Result<(), String> {
    let tmp = path.with_extension("state.tmp");
    fs::write(&tmp, rec.to_text())
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Finds `program` as `Command` would: a path as it is, a name on `PATH`.
fn resolve(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

impl QemuBackend {
    /// Opens the backend: parses the URI, creates the run directory, finds QEMU, and removes
    /// what QEMUs that are gone left behind (and any QEMU jitsu-dns lost track of while
    /// starting it).
    pub fn open(uri: Option<&str>) -> Result<QemuBackend, BackendError> {
        let default = format!("qemu://{DEFAULT_RUN_DIR}");
        let uri = parse_uri(uri.unwrap_or(&default))?;
        create_runtime_dir(&uri.dir)?;
        let missing = || {
            BackendError::Host(format!(
                "the qemu backend needs {} (Debian package qemu-system-x86)",
                uri.qemu.display()
            ))
        };
        let qemu = resolve(&uri.qemu).ok_or_else(missing)?;
        let version = Command::new(&qemu)
            .arg("--version")
            .output()
            .map_err(|_| missing())?;
        let version = String::from_utf8_lossy(&version.stdout);
        let kvm = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        tracing::info!(
            qemu = %qemu.display(),
            version = version.lines().next().unwrap_or("?"),
            dir = %uri.dir.display(),
            kvm,
            "qemu backend"
        );
        let b = QemuBackend {
            inner: Arc::new(Inner {
                uri,
                qemu,
                kvm,
                vms: Mutex::new(HashMap::new()),
                ops: Mutex::new(HashMap::new()),
                sink: Mutex::new(None),
                next_conn: AtomicU64::new(1),
            }),
        };
        b.sweep();
        Ok(b)
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.inner.uri.dir
    }

    /// The record of `vm`'s QEMU, if its file holds one.
    pub fn record(&self, vm: &str) -> Option<Record> {
        let text = fs::read_to_string(self.files(vm).record).ok()?;
        Record::parse(&text)
    }

    /// The tap of `vm`'s QEMU, from the table or else its record.
    fn tap(&self, vm: &VmConfig) -> Option<String> {
        self.vms()
            .get(&vm.name)
            .map(|s| s.rec.tap.clone())
            .or_else(|| self.record(&vm.name).map(|r| r.tap))
    }

    /// What a start or resume of `vm` reports: its tap is its bridge port, the only one
    /// synjitsu then takes its announcement from.
    fn started(&self, vm: &VmConfig) -> Started {
        Started {
            domid: None,
            port: self.tap(vm),
        }
    }

    fn files(&self, vm: &str) -> Files {
        let f = |ext: &str| self.inner.uri.dir.join(format!("{vm}.{ext}"));
        Files {
            record: f("state"),
            pid: f("pid"),
            qmp: f("qmp"),
            log: f("log"),
        }
    }

    fn vms(&self) -> MutexGuard<'_, HashMap<Arc<str>, Slot>> {
        self.inner.vms.lock().expect("VM table lock poisoned")
    }

    /// The lock that keeps operations on `vm` from interleaving.
    fn op_lock(&self, vm: &Arc<str>) -> Arc<Mutex<()>> {
        self.inner
            .ops
            .lock()
            .expect("op table lock poisoned")
            .entry(vm.clone())
            .or_default()
            .clone()
    }

    /// Removes the files of every VM whose QEMU is gone, and destroys QEMUs their pidfile
    /// names without a record.
    fn sweep(&self) {
        let Ok(entries) = fs::read_dir(&self.inner.uri.dir) else {
            return;
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                let ext = p.extension()?.to_str()?;
                matches!(ext, "state" | "pid" | "qmp")
                    .then(|| p.file_stem()?.to_str().map(str::to_string))
                    .flatten()
            })
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            if !self.record(&name).is_some_and(|r| alive(r.pid, r.start)) {
                self.destroy_orphan(&name);
                self.remove_files(&name);
            }
        }
    }

    /// A QEMU of `vm` that its pidfile names (with that pidfile on its command line) but no
    /// record does: jitsu-dns stopped between starting and recording it. Destroyed.
    fn destroy_orphan(&self, vm: &str) {
        let f = self.files(vm);
        let Some(pid) = fs::read_to_string(&f.pid)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        else {
            return;
        };
        let ours = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                let needle = f.pid.as_os_str().as_encoded_bytes();
                c.split(|b| *b == 0).any(|arg| arg == needle)
            })
            .unwrap_or(false);
        let Some((_, start)) = proc_stat(pid).filter(|_| ours) else {
            return;
        };
        tracing::warn!(
            vm,
            pid,
            "a QEMU with no record (jitsu-dns stopped while starting it): destroying it"
        );
        if kill(pid, Signal::KILL).is_ok() && !wait_exit(pid, start, EXIT_WAIT) {
            tracing::warn!(vm, pid, "the unrecorded QEMU is still there after SIGKILL");
        }
    }

    fn remove_files(&self, vm: &str) {
        let f = self.files(vm);
        for p in [&f.record, &f.pid, &f.qmp] {
            let _ = fs::remove_file(p);
        }
    }

    fn push(&self, vm: &str, state: Observed) {
        let sink = self.inner.sink.lock().expect("sink lock poisoned").clone();
        if let Some(sink) = sink {
            sink(LifecycleEvent {
                name: vm.to_string(),
                state,
            });
        }
    }

    /// What the reader thread of connection `conn` of `vm` calls with each notice.
    fn notices(&self, vm: Arc<str>, conn: u64) -> impl FnMut(Notice) + Send + 'static {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        move |n| {
            if let Some(inner) = weak.upgrade() {
                QemuBackend { inner }.on_notice(&vm, conn, n);
            }
        }
    }

    fn on_notice(&self, vm: &Arc<str>, conn: u64, notice: Notice) {
        let state = match notice {
            Notice::Event(event) => {
                let mut vms = self.vms();
                let Some(s) = vms.get_mut(vm).filter(|s| s.conn == conn) else {
                    return;
                };
                match event.as_str() {
                    "STOP" if std::mem::take(&mut s.expect.stop) => return,
                    "RESUME" if std::mem::take(&mut s.expect.resume) => return,
                    "STOP" => {
                        s.paused = true;
                        Observed::Paused
                    }
                    "RESUME" => {
                        s.paused = false;
                        Observed::Running { domid: None }
                    }
                    other => {
                        tracing::debug!(vm = %vm, event = other, "QMP event");
                        return;
                    }
                }
            }
            Notice::Closed => {
                let (child, rec) = {
                    let mut vms = self.vms();
                    let Some(s) = vms.get_mut(vm).filter(|s| s.conn == conn) else {
                        return;
                    };
                    (s.child.take(), s.rec.clone())
                };
                // The connection ends as QEMU exits: wait for the exit itself (and reap
                // our own child), so that "off" means gone, tap included.
                let gone = match child {
                    Some(mut c) => c.wait().is_ok(),
                    None => wait_exit(rec.pid, rec.start, EXIT_WAIT),
                };
                let mut vms = self.vms();
                let Some(s) = vms.get_mut(vm).filter(|s| s.conn == conn) else {
                    return;
                };
                s.qmp = None;
                if !gone {
                    tracing::warn!(vm = %vm, pid = rec.pid, "QEMU closed its QMP connection but still runs: it is managed by signals");
                    return;
                }
                s.exited = true;
                // A standby is off to the fleet already.
                if s.expect.exit || s.starting || s.rec.standby {
                    return;
                }
                drop(vms);
                tracing::info!(vm = %vm, pid = rec.pid, log = %tail(&self.files(vm).log), "QEMU exited by itself");
                Observed::Off
            }
        };
        self.push(vm, state);
    }

    /// The VM's QEMU as this jitsu-dns knows it, adopting it from its record if it runs and
    /// is not known yet; `None` if none runs (a standby does not run).
    fn observe(&self, vm: &VmConfig) -> Option<Observed> {
        {
            let vms = self.vms();
            if let Some(s) = vms.get(&vm.name) {
                let runs = !s.exited && !s.rec.standby && alive(s.rec.pid, s.rec.start);
                return runs.then_some(if s.paused {
                    Observed::Suspended
                } else {
                    Observed::Running { domid: None }
                });
            }
        }
        match self.record(&vm.name) {
            Some(rec) if alive(rec.pid, rec.start) => self.adopt(vm, rec),
            _ => {
                self.destroy_orphan(&vm.name);
                self.remove_files(&vm.name);
                None
            }
        }
    }

    /// Takes over the running QEMU `rec` of `vm`: connects to its QMP socket and asks
    /// whether it runs or is paused (paused only ever by a suspend); a standby is kept as one
    /// (`None`: the VM is off).
    fn adopt(&self, vm: &VmConfig, rec: Record) -> Option<Observed> {
        let conn = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let pid = rec.pid;
        let standby = rec.standby;
        self.vms()
            .insert(vm.name.clone(), Slot::new(rec, conn, None));
        let path = self.files(&vm.name).qmp;
        let connected = Qmp::connect(&path, self.notices(vm.name.clone(), conn)).and_then(|q| {
            let status = q.execute("query-status", None, QMP_TIMEOUT)?;
            Ok((q, status["running"].as_bool() == Some(false)))
        });
        let mut vms = self.vms();
        let s = vms.get_mut(&vm.name).filter(|s| s.conn == conn)?;
        match connected {
            Ok((q, _)) if standby => {
                tracing::info!(vm = %vm.name, pid, "adopted a standby QEMU");
                s.qmp = Some(q);
                return None;
            }
            Ok((q, paused)) => {
                tracing::info!(vm = %vm.name, pid, paused, qemu = q.version().as_deref().unwrap_or("?"), "adopted a running QEMU");
                s.qmp = Some(q);
                s.paused = paused;
            }
            Err(e) => {
                tracing::warn!(vm = %vm.name, pid, standby, error = %e, "adopted a QEMU without QMP: it is managed by signals");
            }
        }
        if s.exited || standby {
            None
        } else if s.paused {
            Some(Observed::Suspended)
        } else {
            Some(Observed::Running { domid: None })
        }
    }

    /// Starts a standby QEMU for `vm` if the URI asks for them and it has none; a failure is
    /// logged (the boot then starts QEMU the usual way, and says what is wrong).
    fn prepare(&self, vm: &VmConfig) {
        if !self.inner.uri.standby {
            return;
        }
        let live = self
            .vms()
            .get(&vm.name)
            .is_some_and(|s| !s.exited && alive(s.rec.pid, s.rec.start));
        if live {
            return;
        }
        if let Err(e) = self.launch(vm, true) {
            tracing::warn!(vm = %vm.name, error = %e, "no standby QEMU");
            let _ = self.destroy(vm);
        }
    }

    /// Boots `vm` from its standby QEMU, if it has one started with its current keys:
    /// attaches the tap and sends `cont`. `Ok(false)` if there is none to wake.
    fn wake(&self, vm: &VmConfig) -> Result<bool, BackendError> {
        let err = |detail: String| BackendError::vm(vm, "wake standby", detail);
        let f = self.files(&vm.name);
        let want = fingerprint(vm, self.accel(vm), &f.pid);
        let found = {
            let vms = self.vms();
            vms.get(&vm.name)
                .filter(|s| {
                    s.rec.standby
                        && !s.exited
                        && s.rec.config == want
                        && alive(s.rec.pid, s.rec.start)
                })
                .and_then(|s| Some((s.rec.clone(), s.qmp.clone()?)))
        };
        let Some((mut rec, q)) = found else {
            return Ok(false);
        };
        tap::attach(&rec.tap, vm.nic()).map_err(|e| err(e.to_string()))?;
        if let Some(s) = self.vms().get_mut(&vm.name) {
            s.expect.resume = true;
        }
        let woken_ns = now_ns();
        q.execute("cont", None, QMP_TIMEOUT)
            .map_err(|e| err(e.to_string()))?;
        rec.standby = false;
        rec.spawned_ns = woken_ns;
        if let Some(s) = self.vms().get_mut(&vm.name) {
            s.rec = rec.clone();
        }
        write_record(&f.record, &rec).map_err(err)?;
        tracing::debug!(vm = %vm.name, pid = rec.pid, tap = %rec.tap, "standby QEMU woken");
        Ok(true)
    }

    /// Stops the VM's QEMU (`quit`, SIGKILL if it lingers) and removes its files. Nothing
    /// running is no error.
    fn destroy(&self, vm: &VmConfig) -> Result<(), BackendError> {
        let target = {
            let mut vms = self.vms();
            match vms.get_mut(&vm.name) {
                Some(s) => {
                    s.expect.exit = true;
                    Some((s.rec.clone(), s.qmp.clone()))
                }
                None => self.record(&vm.name).map(|r| (r, None)),
            }
        };
        if let Some((rec, qmp)) = target
            && alive(rec.pid, rec.start)
        {
            if let Some(q) = qmp.filter(|q| !q.is_closed()) {
                match q.execute("quit", None, QMP_TIMEOUT) {
                    Ok(_) | Err(QmpError::Closed) => {}
                    Err(e) => tracing::debug!(vm = %vm.name, error = %e, "quit"),
                }
            } else {
                let _ = kill(rec.pid, Signal::KILL);
            }
            if !wait_exit(rec.pid, rec.start, EXIT_WAIT) {
                tracing::info!(vm = %vm.name, pid = rec.pid, "QEMU still runs after quit: killing it");
                kill(rec.pid, Signal::KILL)
                    .map_err(|e| BackendError::vm(vm, "destroy", e.to_string()))?;
                if !wait_exit(rec.pid, rec.start, EXIT_WAIT) {
                    return Err(BackendError::vm(
                        vm,
                        "destroy",
                        format!("QEMU {} still runs after SIGKILL", rec.pid),
                    ));
                }
            }
        }
        let slot = self.vms().remove(&vm.name);
        if let Some(mut c) = slot.and_then(|s| s.child) {
            let _ = c.wait();
        }
        self.destroy_orphan(&vm.name);
        self.remove_files(&vm.name);
        Ok(())
    }

    /// The VM's live QMP connection, adopting its QEMU if need be.
    fn qmp_of(&self, vm: &VmConfig, what: &'static str) -> Result<Arc<Qmp>, BackendError> {
        if self.observe(vm).is_none() {
            return Err(BackendError::vm(vm, what, "not running".into()));
        }
        self.vms()
            .get(&vm.name)
            .and_then(|s| s.qmp.clone())
            .filter(|q| !q.is_closed())
            .ok_or_else(|| BackendError::vm(vm, what, "its QEMU has no QMP connection".into()))
    }

    /// Runs `command` on the VM's QMP, telling the reader that the `expect`ed event is ours.
    fn command(
        &self,
        vm: &VmConfig,
        what: &'static str,
        command: &str,
        expect: fn(&mut Expect) -> &mut bool,
    ) -> Result<(), BackendError> {
        let q = self.qmp_of(vm, what)?;
        if let Some(s) = self.vms().get_mut(&vm.name) {
            *expect(&mut s.expect) = true;
        }
        let result = q.execute(command, None, QMP_TIMEOUT);
        if let Some(s) = self.vms().get_mut(&vm.name) {
            if result.is_err() {
                *expect(&mut s.expect) = false;
            } else if command == "stop" || command == "cont" {
                s.paused = command == "stop";
            }
        }
        result
            .map(|_| ())
            .map_err(|e| BackendError::vm(vm, what, e.to_string()))
    }

    fn accel(&self, vm: &VmConfig) -> Accel {
        match vm.domain_type {
            Some(DomainType::Kvm) if self.inner.kvm => Accel::Kvm,
            Some(DomainType::Kvm) => {
                tracing::warn!(vm = %vm.name, "domain_type=kvm, but /dev/kvm cannot be opened: TCG");
                Accel::Tcg
            }
            _ => Accel::Tcg,
        }
    }

    /// Starts QEMU for `vm` (a standby: paused, its tap down and off the bridge); the caller
    /// holds its op lock and cleared what was left.
    fn launch(&self, vm: &VmConfig, standby: bool) -> Result<(), BackendError> {
        let err = |what, detail: String| BackendError::vm(vm, what, detail);
        let f = self.files(&vm.name);
        if f.qmp.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(err(
                "start",
                format!(
                    "the QMP socket path {} is longer than a Unix socket allows: use a \
                     shorter run directory",
                    f.qmp.display()
                ),
            ));
        }
        let accel = self.accel(vm);
        let pattern = format!("{}%d", self.inner.uri.tap_prefix);
        let tap = if standby {
            tap::open(&pattern)
        } else {
            tap::create(&pattern, vm.nic())
        }
        .map_err(|e| err("start", e.to_string()))?;
        let listener = UnixListener::bind(&f.qmp)
            .map_err(|e| err("bind QMP socket", format!("{}: {e}", f.qmp.display())))?;
        // Connected before QEMU runs: its greeting waits in the socket until it accepts.
        let client = UnixStream::connect(&f.qmp)
            .map_err(|e| err("connect QMP socket", format!("{}: {e}", f.qmp.display())))?;
        let plan = Plan {
            accel,
            tap_fd: tap.fd.as_raw_fd(),
            qmp_fd: listener.as_raw_fd(),
            pidfile: &f.pid,
            standby,
        };
        let args = qemu_args(vm, &plan).ok_or_else(|| {
            err(
                "start",
                "no kernel (the qemu backend boots the VM's kernel)".into(),
            )
        })?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&f.log)
            .map_err(|e| err("open log", format!("{}: {e}", f.log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| err("open log", e.to_string()))?;
        let mut cmd = Command::new(&self.inner.qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        crate::sys::qemu::inherit_in_new_session(&mut cmd, vec![plan.tap_fd, plan.qmp_fd]);
        let spawned_ns = now_ns();
        let mut child = cmd
            .spawn()
            .map_err(|e| err("start QEMU", format!("{}: {e}", self.inner.qemu.display())))?;
        // QEMU holds both now; ours would keep the tap (and the socket) past its exit.
        drop(listener);
        let tap_name = tap.name.clone();
        drop(tap);
        let pid = child.id();
        let Some((_, start)) = proc_stat(pid) else {
            let _ = child.wait();
            return Err(err(
                "start QEMU",
                format!("it exited at once; its log says: {}", tail(&f.log)),
            ));
        };
        let rec = Record {
            pid,
            start,
            tap: tap_name,
            accel,
            spawned_ns,
            standby,
            config: fingerprint(vm, accel, &f.pid),
        };
        if let Err(e) = write_record(&f.record, &rec) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err("write record", e));
        }
        let conn = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(vm = %vm.name, pid, tap = %rec.tap, accel = accel.as_str(), standby, "QEMU started");
        // In the table before its reader runs, so that no notice of it is missed.
        let mut slot = Slot::new(rec, conn, Some(child));
        slot.starting = true;
        self.vms().insert(vm.name.clone(), slot);
        let qmp = Qmp::over(client, self.notices(vm.name.clone(), conn));
        let mut vms = self.vms();
        let s = vms
            .get_mut(&vm.name)
            .expect("the slot was inserted above under the VM's op lock");
        s.starting = false;
        match qmp {
            Ok(q) => s.qmp = Some(q),
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %e, "no QMP reader: the VM is managed by signals")
            }
        }
        if s.exited {
            return Err(err(
                "start QEMU",
                format!("it exited at once; its log says: {}", tail(&f.log)),
            ));
        }
        Ok(())
    }
}

impl Backend for QemuBackend {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn lookup(&self, vm: &VmConfig) -> Result<Domain, BackendError> {
        let lock = self.op_lock(&vm.name);
        let _g = lock.lock().expect("op lock poisoned");
        let state = self.observe(vm);
        if state.is_none() {
            self.prepare(vm);
        }
        Ok(Domain {
            state: state.unwrap_or(Observed::Off),
            domid: None,
            macs: vec![vm.mac()],
            // The kernel numbers each QEMU's tap as it is made: its name is known at the
            // start (Started::port), not before.
            fixed_port: None,
        })
    }

    fn start(&self, vm: &VmConfig) -> Result<Started, BackendError> {
        let lock = self.op_lock(&vm.name);
        let _g = lock.lock().expect("op lock poisoned");
        if self.inner.uri.standby {
            match self.wake(vm) {
                Ok(true) => return Ok(self.started(vm)),
                Ok(false) => {}
                Err(e) => tracing::warn!(vm = %vm.name, error = %e, "starting a new QEMU instead"),
            }
        }
        self.destroy(vm)?;
        match self.launch(vm, false) {
            Ok(()) => Ok(self.started(vm)),
            Err(e) => {
                // Leave nothing half-made behind.
                if let Err(t) = self.destroy(vm) {
                    tracing::warn!(vm = %vm.name, error = %t, "cleaning up after a failed start");
                }
                Err(e)
            }
        }
    }

    fn stop(&self, vm: &VmConfig, mode: StopMode) -> Result<(), BackendError> {
        let lock = self.op_lock(&vm.name);
        let _g = lock.lock().expect("op lock poisoned");
        match mode {
            StopMode::Destroy => {
                self.destroy(vm)?;
                self.prepare(vm);
                Ok(())
            }
            StopMode::Suspend => self.command(vm, "suspend", "stop", |e| &mut e.stop),
            StopMode::Shutdown => {
                if let Some(state) = self.observe(vm) {
                    if state == Observed::Suspended {
                        self.command(vm, "shutdown", "cont", |e| &mut e.resume)?;
                    }
                    self.command(vm, "shutdown", "system_powerdown", |e| &mut e.exit)?;
                    let rec = self.vms().get(&vm.name).map(|s| s.rec.clone());
                    if let Some(r) = rec
                        && !wait_exit(r.pid, r.start, self.inner.uri.shutdown_grace)
                    {
                        tracing::info!(vm = %vm.name, grace = ?self.inner.uri.shutdown_grace, "still running after the power button: destroying");
                    }
                }
                self.destroy(vm)?;
                self.prepare(vm);
                Ok(())
            }
        }
    }

    fn resume(&self, vm: &VmConfig) -> Result<Started, BackendError> {
        let lock = self.op_lock(&vm.name);
        let _g = lock.lock().expect("op lock poisoned");
        self.command(vm, "resume", "cont", |e| &mut e.resume)?;
        Ok(self.started(vm))
    }

    fn unpause(&self, vm: &VmConfig) -> Result<Started, BackendError> {
        // Paused and suspended are one state of QEMU's: stopped vCPUs, memory kept.
        self.resume(vm)
    }

    fn counters(&self, vm: &VmConfig) -> Result<Option<IfCounters>, BackendError> {
        let Some(tap) = self.tap(vm) else {
            return Ok(None);
        };
        let text = fs::read_to_string("/proc/net/dev")
            .map_err(|e| BackendError::vm(vm, "counters", format!("/proc/net/dev: {e}")))?;
        Ok(parse_net_dev(&text, &tap))
    }

    fn list(&self) -> Result<Vec<Listed>, BackendError> {
        let entries = fs::read_dir(&self.inner.uri.dir).map_err(|e| {
            BackendError::Host(format!("cannot list {}: {e}", self.inner.uri.dir.display()))
        })?;
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("state") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let known = self.vms().get(name).map(|s| s.paused);
            let state = match self.record(name).filter(|r| alive(r.pid, r.start)) {
                None => Observed::Off,
                Some(rec) if rec.standby => {
                    // Every configured VM has been looked up (its standby adopted) before the
                    // daemon lists: this one's VM is no longer configured.
                    if known.is_none() {
                        tracing::info!(
                            vm = name,
                            pid = rec.pid,
                            "a standby QEMU of a VM that is not configured: destroying it"
                        );
                        if kill(rec.pid, Signal::KILL).is_ok() {
                            wait_exit(rec.pid, rec.start, EXIT_WAIT);
                        }
                        self.remove_files(name);
                    }
                    Observed::Off
                }
                Some(_) if known == Some(true) => Observed::Suspended,
                Some(_) => Observed::Running { domid: None },
            };
            out.push(Listed {
                name: name.to_string(),
                state,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn subscribe(&self, sink: EventSink) -> Result<bool, BackendError> {
        *self.inner.sink.lock().expect("sink lock poisoned") = Some(Arc::new(sink));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_parsed_and_libvirts_are_refused() {
        let u = parse_uri("qemu:///run/jitsu/qemu").unwrap();
        assert_eq!(u.dir, PathBuf::from("/run/jitsu/qemu"));
        assert_eq!(u.qemu, PathBuf::from(DEFAULT_QEMU));
        assert_eq!(u.tap_prefix, "jq");
        assert_eq!(u.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        let u = parse_uri(
            "qemu:///tmp/q?shutdown_grace=0.5&qemu=/opt/qemu/bin/qemu-system-x86_64&tap_prefix=t1",
        )
        .unwrap();
        assert_eq!(u.dir, PathBuf::from("/tmp/q"));
        assert_eq!(u.qemu, PathBuf::from("/opt/qemu/bin/qemu-system-x86_64"));
        assert_eq!(u.tap_prefix, "t1");
        assert_eq!(u.shutdown_grace, Duration::from_millis(500));
        assert!(!u.standby);
        assert!(parse_uri("qemu:///q?standby=on").unwrap().standby);
        assert_eq!(
            parse_uri("qemu://").unwrap().dir,
            PathBuf::from(DEFAULT_RUN_DIR)
        );
        let e = parse_uri("qemu:///system").unwrap_err().to_string();
        assert!(
            e.contains("this is libvirt's QEMU URI: use -x libvirt"),
            "{e}"
        );
        for bad in [
            "process:///run/jitsu",
            "qemu://host/run/q",
            "qemu:///x?tap_prefix=TAP",
            "qemu:///x?tap_prefix=waytoolongname",
            "qemu:///x?shutdown_grace=-1",
            "qemu:///x?standby=yes",
            "qemu:///x?colour=blue",
            "qemu:///x?flag",
        ] {
            let e = parse_uri(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn programs_are_found_on_the_path_or_as_given() {
        assert!(resolve(Path::new("sh")).is_some());
        assert_eq!(
            resolve(Path::new("/bin/sh")),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(resolve(Path::new("/no/such/qemu")), None);
        assert_eq!(resolve(Path::new("no-such-program-jitsu")), None);
    }

    #[test]
    fn an_exit_is_waited_for_and_a_reused_pid_is_not_the_process() {
        let mut child = Command::new("sleep").arg("100").spawn().unwrap();
        let pid = child.id();
        let (_, start) = proc_stat(pid).unwrap();
        assert!(alive(pid, start));
        assert!(
            !alive(pid, start + 1),
            "another start time is another process"
        );
        // Another start time is gone already, whatever runs at that pid.
        assert!(wait_exit(pid, start + 1, Duration::from_secs(10)));
        kill(pid, Signal::KILL).unwrap();
        assert!(wait_exit(pid, start, Duration::from_secs(10)));
        child.wait().unwrap();
        assert!(!alive(pid, start));
    }
}
