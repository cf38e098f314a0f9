//! The libvirt backend: each VM is a libvirt domain, on QEMU/KVM, Xen or any driver libvirt
//! has, through the `virt` crate.
//!
//! URI (`-c`): any libvirt URI (`qemu:///system`, `xen:///system`, `test:///default`,
//! `qemu+ssh://host/system`), plus one parameter of ours, removed before libvirt sees it:
//! `shutdown_grace=<seconds>` (default 10), how long `shutdown` waits for the guest to power
//! off before destroying it. Without `-c`, libvirt picks its default (`LIBVIRT_DEFAULT_URI`,
//! then `uri_default` in libvirt.conf, then probing), as `virsh` does.
//!
//! A VM is the domain with its `uuid` key if it has one, else the domain with its name. A
//! domain that exists is used as it is defined, never redefined; one that does not exist is
//! defined (persistently) at the VM's first start from its keys (`kernel`, `initrd`,
//! `cmdline`, `memory`, `disk`, `nic`, `mac`, `uuid`, `console_log`, `domain_type`), as
//! Jitsu's libxl backend built its domains: see [`domain_xml`].
//!
//! Stop modes: `destroy` is `virDomainDestroy`; `shutdown` asks the guest (ACPI power button
//! on QEMU, a PV shutdown on Xen) and destroys it after the grace period; `suspend` is a
//! managed save (the guest's memory goes to a file under libvirt's save directory and QEMU
//! exits, freeing it), and resuming starts the domain, which restores it. A paused domain
//! (`virsh suspend`, an I/O error) is reported as paused, and unpausing resumes it.
//!
//! Lifecycle events (started, paused, resumed, stopped, saved, crashed, shut down by the
//! guest) are pushed to the fleet from libvirt's event loop ([`Backend::subscribe`]), so the
//! daemon does not poll states. The connection is shared by every blocking caller (libvirt
//! connections are thread-safe). If it closes (libvirtd restarted), the next call opens a new
//! one, a reconnect thread does so at once when events are subscribed, and every known VM's
//! current state is pushed again, since events were lost in between.
//!
//! Interface counters come from `virDomainInterfaceStats` on the first interface's target
//! device (`vnetN`), which libvirt reports from the guest's side: its `tx` is what the guest
//! sent, our [`IfCounters::rx_packets`], as the process backend's veth counters are.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, mpsc};
use std::time::{Duration, Instant};

use shared_proto::Mac;
use virt::connect::Connect;
use virt::domain::{Domain as VirDomain, DomainStateReason};
use virt::enumutil::Enum;
use virt::sys;

use super::{
    Backend, BackendError, Domain, EventSink, LifecycleEvent, Listed, Started,
    parse_shutdown_grace, uri_err,
};
use crate::config::{DomainType, StopMode, VmConfig};
use crate::fleet::{IfCounters, Observed};
use crate::sys::libvirt::{
    CloseRegistration, LifecycleRegistration, RawLifecycle, register_close, register_lifecycle,
};

/// How long `shutdown` waits for the guest when the URI does not say.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Memory of a domain defined from keys without `memory`, in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// How often `shutdown` looks whether the guest is off.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);
/// Reconnect attempts after a lost connection: first after this, then doubling...
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
/// ...up to this.
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Keepalive: a probe every 5 s, the connection is dead after 3 unanswered ones.
const KEEPALIVE_INTERVAL: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// The parsed `-c` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtUri {
    /// What libvirt is given (`None`: its default).
    pub connect: Option<String>,
    /// Grace period of `shutdown`.
    pub shutdown_grace: Duration,
}

/// Parses a libvirt URI, taking our own `shutdown_grace` parameter out of it.
pub fn parse_uri(uri: Option<&str>) -> Result<LibvirtUri, BackendError> {
    let mut out = LibvirtUri {
        connect: None,
        shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
    };
    let Some(uri) = uri.filter(|u| !u.is_empty()) else {
        return Ok(out);
    };
    if uri.starts_with("process:") {
        return Err(uri_err(
            uri,
            "this is a process backend URI; libvirt takes e.g. qemu:///system, xen:///system \
             or test:///default",
        ));
    }
    let scheme_ok = uri.split_once(':').is_some_and(|(s, _)| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    });
    if !scheme_ok {
        return Err(uri_err(
            uri,
            "not a libvirt URI (they look like qemu:///system or xen:///system)",
        ));
    }
    let (base, query) = uri.split_once('?').unwrap_or((uri, ""));
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("shutdown_grace", v)) => out.shutdown_grace = parse_shutdown_grace(uri, v)?,
            // Everything else is libvirt's (socket=, keyfile=, no_verify=...).
            _ => kept.push(pair),
        }
    }
    out.connect = Some(if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    });
    Ok(out)
}

/// The hypervisor behind a connection, from `virConnectGetType`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hypervisor {
    /// QEMU or KVM (`QEMU`).
    Qemu,
    /// Xen through libxl (`Xen`).
    Xen,
    /// libvirt's test driver (`Test`).
    Test,
    /// Anything else (LXC, VirtualBox...): domains are used, never defined.
    Other(String),
}

impl Hypervisor {
    /// From the driver's name as `virConnectGetType` gives it.
    pub fn from_driver(t: &str) -> Hypervisor {
        match t.to_ascii_lowercase().as_str() {
            "qemu" | "kvm" => Hypervisor::Qemu,
            "xen" | "libxl" | "xenlight" => Hypervisor::Xen,
            "test" => Hypervisor::Test,
            _ => Hypervisor::Other(t.to_string()),
        }
    }
}

/// Escapes text for an XML attribute or element.
fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

fn path_text(p: &Path) -> String {
    xml_escape(&p.to_string_lossy())
}

/// The shape of a domain defined from keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// A PC (`hvm`, machine `pc`) of this libvirt domain type (`qemu`, `kvm`, `test`).
    Pc(&'static str),
    XenPvh,
    XenPv,
}

/// The domain XML for `vm` on `hv`: what jitsu-dns defines when the VM has no domain.
///
/// QEMU: a `pc` machine (libvirt 9 refuses `microvm` without PCI) of domain type `qemu`
/// (TCG) unless `domain_type=kvm`, direct kernel boot (`kernel`, `initrd`, `cmdline`) or BIOS
/// from the first disk, ACPI (so `shutdown` works), no USB controller and no memballoon (a
/// unikernel has no driver for either), virtio disks and a virtio NIC on the `nic` bridge
/// with the VM's MAC, and the serial console to `console_log` (else a pty).
/// Xen: PVH (`xenpvh`, the default) or PV (`domain_type=xenpv`) with `kernel` required, `xvd*`
/// disks, a vif on the bridge, and a pty console (libxl has no file consoles).
pub fn domain_xml(vm: &VmConfig, hv: &Hypervisor) -> Result<String, String> {
    let layout = match (vm.domain_type, hv) {
        (None, Hypervisor::Test) => Layout::Pc("test"),
        (None | Some(DomainType::Qemu), Hypervisor::Qemu) => Layout::Pc("qemu"),
        (Some(DomainType::Kvm), Hypervisor::Qemu) => Layout::Pc("kvm"),
        (None | Some(DomainType::XenPvh), Hypervisor::Xen) => Layout::XenPvh,
        (Some(DomainType::XenPv), Hypervisor::Xen) => Layout::XenPv,
        (Some(t), Hypervisor::Qemu | Hypervisor::Xen) => {
            return Err(format!(
                "domain_type={} does not run on this connection's hypervisor ({hv:?})",
                t.as_str()
            ));
        }
        // The test driver takes any shape: it lets the other layouts be exercised.
        (Some(DomainType::Qemu | DomainType::Kvm), Hypervisor::Test) => Layout::Pc("test"),
        (Some(DomainType::XenPvh), Hypervisor::Test) => Layout::XenPvh,
        (Some(DomainType::XenPv), Hypervisor::Test) => Layout::XenPv,
        (_, Hypervisor::Other(t)) => {
            return Err(format!(
                "jitsu-dns defines domains for QEMU/KVM and Xen only, and this connection's \
                 driver is {t}: define the domain {} yourself",
                vm.name
            ));
        }
    };
    let xen = matches!(layout, Layout::XenPvh | Layout::XenPv);
    if vm.kernel.is_none() && (xen || vm.disks.is_empty()) {
        return Err(if xen {
            "a Xen domain is defined from a `kernel` key, and the VM has none".to_string()
        } else {
            "a domain is defined from a `kernel` (or at least a `disk`) key, and the VM has \
             neither"
                .to_string()
        });
    }
    if xen && vm.console_log.is_some() {
        return Err(
            "console_log: libxl gives Xen guests pty consoles only (read them with \
                    `virsh console` or `xl console`)"
                .to_string(),
        );
    }
    let virt_type = match layout {
        Layout::Pc(t) => t,
        _ if *hv == Hypervisor::Test => "test",
        _ => "xen",
    };
    let mut x = String::with_capacity(2048);
    let _ = writeln!(x, "<domain type='{virt_type}'>");
    let _ = writeln!(x, "  <name>{}</name>", xml_escape(&vm.name));
    if let Some(u) = &vm.uuid {
        let _ = writeln!(x, "  <uuid>{}</uuid>", xml_escape(u));
    }
    let _ = writeln!(
        x,
        "  <description>Defined by jitsu-dns from the keys of VM {}.</description>",
        xml_escape(&vm.name)
    );
    let _ = writeln!(
        x,
        "  <memory unit='MiB'>{}</memory>",
        vm.memory.unwrap_or(DEFAULT_MEMORY_MIB)
    );
    x.push_str("  <vcpu>1</vcpu>\n  <os>\n");
    let arch = std::env::consts::ARCH;
    match layout {
        Layout::Pc(_) => {
            let machine = match arch {
                "x86_64" | "x86" => " machine='pc'",
                "aarch64" => " machine='virt'",
                _ => "",
            };
            // The test driver knows no machine types.
            let machine = if *hv == Hypervisor::Test { "" } else { machine };
            let _ = writeln!(x, "    <type arch='{arch}'{machine}>hvm</type>");
        }
        Layout::XenPvh => {
            let _ = writeln!(x, "    <type arch='{arch}' machine='xenpvh'>xenpvh</type>");
        }
        Layout::XenPv => {
            let _ = writeln!(x, "    <type arch='{arch}' machine='xenpv'>xen</type>");
        }
    }
    if let Some(k) = &vm.kernel {
        let _ = writeln!(x, "    <kernel>{}</kernel>", path_text(k));
        if let Some(i) = &vm.initrd {
            let _ = writeln!(x, "    <initrd>{}</initrd>", path_text(i));
        }
        if let Some(c) = &vm.cmdline {
            let _ = writeln!(x, "    <cmdline>{}</cmdline>", xml_escape(c));
        }
    } else {
        x.push_str("    <boot dev='hd'/>\n");
    }
    x.push_str("  </os>\n");
    if !xen {
        // Without it libvirt runs QEMU with -no-acpi, and the power button does nothing.
        x.push_str("  <features>\n    <acpi/>\n  </features>\n");
    }
    x.push_str(
        "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  \
         <on_crash>destroy</on_crash>\n  <devices>\n",
    );
    if !xen {
        x.push_str("    <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n");
    }
    for (i, d) in vm.disks.iter().enumerate() {
        let letter = char::from(b'a' + (i % 26) as u8);
        let format = if d.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        let (dev, bus) = if xen {
            (format!("xvd{letter}"), "xen")
        } else {
            (format!("vd{letter}"), "virtio")
        };
        let _ = writeln!(
            x,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{format}'/>\n      \
             <source file='{}'/>\n      <target dev='{dev}' bus='{bus}'/>\n    </disk>",
            path_text(d)
        );
    }
    let _ = writeln!(
        x,
        "    <interface type='bridge'>\n      <mac address='{}'/>\n      <source bridge='{}'/>",
        vm.mac,
        xml_escape(&vm.nic)
    );
    if !xen {
        x.push_str("      <model type='virtio'/>\n");
    }
    x.push_str("    </interface>\n");
    if xen {
        x.push_str(
            "    <console type='pty'>\n      <target type='xen' port='0'/>\n    </console>\n",
        );
    } else if let Some(log) = &vm.console_log {
        let _ = writeln!(
            x,
            "    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>",
            path_text(log)
        );
    } else {
        x.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n");
    }
    x.push_str("  </devices>\n</domain>\n");
    Ok(x)
}

/// The value of attribute `name` in the start tag `tag` (`<mac address='..'/>`).
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = tag;
    while let Some(i) = rest.find(name) {
        let before = rest[..i].chars().last();
        let after = &rest[i + name.len()..];
        let after_eq = after.trim_start().strip_prefix('=').map(str::trim_start);
        if before.is_some_and(char::is_whitespace)
            && let Some(v) = after_eq
            && let Some(q) = v.chars().next().filter(|q| *q == '\'' || *q == '"')
        {
            let v = &v[1..];
            return v.find(q).map(|end| &v[..end]);
        }
        rest = &rest[i + name.len()..];
    }
    None
}

/// The first start tag `<name ...>` in `text`.
fn start_tag<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}");
    let mut from = 0;
    while let Some(i) = text[from..].find(&open) {
        let at = from + i;
        let next = text[at + open.len()..].chars().next();
        if next.is_some_and(|c| c.is_whitespace() || c == '>' || c == '/') {
            let end = text[at..].find('>')?;
            return Some(&text[at..=at + end]);
        }
        from = at + open.len();
    }
    None
}

/// The first `<interface>` of a domain's XML: its MAC and (while running) its host-side
/// device. libvirt writes this XML itself, so a scan for two tags suffices.
fn first_interface(xml: &str) -> (Option<Mac>, Option<String>) {
    let Some(start) = xml.find("<interface ") else {
        return (None, None);
    };
    let body = &xml[start..];
    let body = &body[..body.find("</interface>").unwrap_or(body.len())];
    let mac = start_tag(body, "mac")
        .and_then(|t| attr(t, "address"))
        .and_then(|a| a.parse().ok());
    let dev = start_tag(body, "target")
        .and_then(|t| attr(t, "dev"))
        .map(str::to_string);
    (mac, dev)
}

/// What libvirt's domain state means to the fleet. `paused_reason` is the reason of a paused
/// domain, `saved` whether a shut-off one has a managed save.
fn observed_of(state: u32, paused_reason: Option<u32>, id: Option<u32>, saved: bool) -> Observed {
    match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED | sys::VIR_DOMAIN_SHUTDOWN => {
            Observed::Running { domid: id }
        }
        sys::VIR_DOMAIN_PAUSED => match paused_reason {
            // Paused on its way into a managed save: saved, as far as anyone should act.
            Some(sys::VIR_DOMAIN_PAUSED_SAVE) => Observed::Suspended,
            // Paused only while QEMU starts it.
            Some(sys::VIR_DOMAIN_PAUSED_STARTING_UP) => Observed::Running { domid: id },
            _ => Observed::Paused,
        },
        sys::VIR_DOMAIN_PMSUSPENDED => Observed::Paused,
        sys::VIR_DOMAIN_SHUTOFF if saved => Observed::Suspended,
        // Xen's "no state" is a domain that runs but is not scheduled right now.
        sys::VIR_DOMAIN_NOSTATE if id.is_some() => Observed::Running { domid: id },
        // Shut off, crashed (nothing runs; destroying it is the clean-up), unknown.
        _ => Observed::Off,
    }
}

/// What a lifecycle event says the domain now is; `None` for events that change nothing
/// (defined, undefined, a guest-initiated shutdown that has not stopped it yet).
fn observed_from_event(event: i32, detail: i32, id: Option<u32>) -> Option<Observed> {
    let (event, detail) = (u32::try_from(event).ok()?, u32::try_from(detail).ok()?);
    match event {
        sys::VIR_DOMAIN_EVENT_STARTED | sys::VIR_DOMAIN_EVENT_RESUMED => {
            Some(Observed::Running { domid: id })
        }
        sys::VIR_DOMAIN_EVENT_SUSPENDED | sys::VIR_DOMAIN_EVENT_PMSUSPENDED => {
            Some(Observed::Paused)
        }
        sys::VIR_DOMAIN_EVENT_STOPPED if detail == sys::VIR_DOMAIN_EVENT_STOPPED_SAVED => {
            Some(Observed::Suspended)
        }
        sys::VIR_DOMAIN_EVENT_STOPPED | sys::VIR_DOMAIN_EVENT_CRASHED => Some(Observed::Off),
        _ => None,
    }
}

/// The event's name and detail for logs.
fn event_words(event: i32, detail: i32) -> (&'static str, i32) {
    let name = match u32::try_from(event).unwrap_or(u32::MAX) {
        sys::VIR_DOMAIN_EVENT_DEFINED => "defined",
        sys::VIR_DOMAIN_EVENT_UNDEFINED => "undefined",
        sys::VIR_DOMAIN_EVENT_STARTED => "started",
        sys::VIR_DOMAIN_EVENT_SUSPENDED => "suspended",
        sys::VIR_DOMAIN_EVENT_RESUMED => "resumed",
        sys::VIR_DOMAIN_EVENT_STOPPED => "stopped",
        sys::VIR_DOMAIN_EVENT_SHUTDOWN => "shutdown",
        sys::VIR_DOMAIN_EVENT_PMSUSPENDED => "pmsuspended",
        sys::VIR_DOMAIN_EVENT_CRASHED => "crashed",
        _ => "unknown",
    };
    (name, detail)
}

/// True for errors that mean the connection is gone (libvirtd exited, socket closed).
fn connection_lost(e: &virt::error::Error) -> bool {
    let code = e.code().to_raw();
    let domain = e.domain().to_raw();
    domain == sys::VIR_FROM_RPC
        || matches!(
            code,
            sys::VIR_ERR_SYSTEM_ERROR
                | sys::VIR_ERR_RPC
                | sys::VIR_ERR_NO_CONNECT
                | sys::VIR_ERR_INVALID_CONN
        )
}

fn no_domain(e: &virt::error::Error) -> bool {
    e.code().to_raw() == sys::VIR_ERR_NO_DOMAIN
}

/// An open connection and what is registered on it.
#[derive(Debug)]
struct Session {
    // Field order is drop order: the registrations (each holding a reference of its own to
    // the connection) go first.
    lifecycle: Mutex<Option<LifecycleRegistration>>,
    _close: Option<CloseRegistration>,
    conn: Connect,
    hypervisor: Hypervisor,
    /// Set by the close callback.
    closed: Arc<AtomicBool>,
}

/// Everything the backend's threads share.
struct Inner {
    uri: LibvirtUri,
    session: Mutex<Option<Arc<Session>>>,
    /// Domain UUID -> VM name, for VMs whose domain has been seen: events name domains.
    known: Mutex<HashMap<String, Arc<str>>>,
    /// Where lifecycle events go, once subscribed.
    sink: Mutex<Option<Arc<EventSink>>>,
    /// Told when a connection closes, by the close callback.
    lost: Mutex<Option<mpsc::Sender<()>>>,
    /// Host-side interface of each running domain (UUID -> domain id, device), so that
    /// polling counters does not fetch the domain's XML every time.
    devices: Mutex<HashMap<String, (u32, String)>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("uri", &self.uri)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

/// The libvirt backend.
#[derive(Debug, Clone)]
pub struct LibvirtBackend {
    inner: Arc<Inner>,
}

static EVENT_LOOP: Once = Once::new();

/// Registers libvirt's default event loop and runs it on a thread of its own, once per
/// process. It must precede opening a connection for that connection to deliver events
/// and keepalives.
fn ensure_event_loop() {
    EVENT_LOOP.call_once(|| {
        // libvirt's default handler prints every error on stderr; ours go through tracing.
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(error = %e.message(), "libvirt event loop unavailable: no lifecycle events");
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!(error = %e.message(), "libvirt event loop iteration failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the libvirt event thread: no lifecycle events");
        }
    });
}

impl LibvirtBackend {
    /// Parses the URI and connects, failing clearly if libvirt cannot be reached.
    pub fn open(uri: Option<&str>) -> Result<LibvirtBackend, BackendError> {
        let uri = parse_uri(uri)?;
        ensure_event_loop();
        let b = LibvirtBackend {
            inner: Arc::new(Inner {
                uri,
                session: Mutex::new(None),
                known: Mutex::new(HashMap::new()),
                sink: Mutex::new(None),
                lost: Mutex::new(None),
                devices: Mutex::new(HashMap::new()),
            }),
        };
        let s = b.session()?;
        tracing::info!(
            uri = b.inner.uri.connect.as_deref().unwrap_or("(libvirt's default)"),
            hypervisor = ?s.hypervisor,
            "libvirt connected"
        );
        Ok(b)
    }

    /// The hypervisor of the current connection.
    pub fn hypervisor(&self) -> Result<Hypervisor, BackendError> {
        Ok(self.session()?.hypervisor.clone())
    }

    /// The current connection, or a new one if there is none or it closed.
    fn session(&self) -> Result<Arc<Session>, BackendError> {
        let mut slot = self.inner.session.lock().expect("session lock poisoned");
        if let Some(s) = slot.as_ref()
            && !s.closed.load(Ordering::Acquire)
        {
            return Ok(s.clone());
        }
        let replaced = slot.take().is_some();
        let s = Arc::new(self.connect()?);
        *slot = Some(s.clone());
        drop(slot);
        if replaced {
            tracing::info!("libvirt reconnected");
            self.resync(&s);
        }
        Ok(s)
    }

    fn connect(&self) -> Result<Session, BackendError> {
        let uri = self.inner.uri.connect.as_deref();
        let shown = uri.unwrap_or("(libvirt's default)");
        let conn = Connect::open(uri).map_err(|e| {
            BackendError::Host(format!(
                "cannot connect to libvirt at {shown}: {}",
                e.message()
            ))
        })?;
        let hypervisor = Hypervisor::from_driver(&conn.driver_type().map_err(|e| {
            BackendError::Host(format!("libvirt at {shown}: driver type: {}", e.message()))
        })?);
        // Only remote connections have keepalives; the others say so, harmlessly.
        if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT) {
            tracing::debug!(error = %e.message(), "no libvirt keepalive");
        }
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let inner = Arc::downgrade(&self.inner);
        let close = register_close(&conn, move |reason| {
            // Our own close (dropping the session) is not a loss.
            if u32::try_from(reason).ok() == Some(sys::VIR_CONNECT_CLOSE_REASON_CLIENT) {
                return;
            }
            flag.store(true, Ordering::Release);
            tracing::warn!(reason, "the libvirt connection closed");
            if let Some(inner) = inner.upgrade()
                && let Some(tx) = inner.lost.lock().expect("lost lock poisoned").as_ref()
            {
                let _ = tx.send(());
            }
        })
        .map_err(|e| tracing::debug!(error = %e.message(), "no libvirt close callback"))
        .ok();
        let s = Session {
            conn,
            hypervisor,
            closed,
            lifecycle: Mutex::new(None),
            _close: close,
        };
        if self
            .inner
            .sink
            .lock()
            .expect("sink lock poisoned")
            .is_some()
        {
            self.register_events(&s)?;
        }
        Ok(s)
    }

    /// Registers the lifecycle callback on `s`, once.
    fn register_events(&self, s: &Session) -> Result<(), BackendError> {
        let mut slot = s.lifecycle.lock().expect("lifecycle lock poisoned");
        if slot.is_some() {
            return Ok(());
        }
        let inner = Arc::downgrade(&self.inner);
        let reg = register_lifecycle(&s.conn, move |ev: RawLifecycle| {
            if let Some(inner) = inner.upgrade() {
                inner.on_event(ev);
            }
        })
        .map_err(|e| {
            BackendError::Host(format!(
                "cannot register for libvirt lifecycle events: {}",
                e.message()
            ))
        })?;
        *slot = Some(reg);
        Ok(())
    }

    /// After a reconnect: events were lost, so every known VM's state is pushed again.
    fn resync(&self, s: &Session) {
        let Some(sink) = self.inner.sink.lock().expect("sink lock poisoned").clone() else {
            return;
        };
        let known: Vec<(String, Arc<str>)> = self
            .inner
            .known
            .lock()
            .expect("known lock poisoned")
            .iter()
            .map(|(u, n)| (u.clone(), n.clone()))
            .collect();
        for (uuid, name) in known {
            let state = match s.conn.lookup_domain_by_uuid_string(&uuid) {
                Ok(d) => match state_of(&d) {
                    Ok(st) => st,
                    Err(e) => {
                        tracing::debug!(vm = %name, error = %e.message(), "state after reconnect");
                        continue;
                    }
                },
                Err(e) if no_domain(&e) => Observed::Off,
                Err(e) => {
                    tracing::debug!(vm = %name, error = %e.message(), "lookup after reconnect");
                    continue;
                }
            };
            sink(LifecycleEvent {
                name: name.to_string(),
                state,
            });
        }
    }

    /// Runs `op` on the connection; if it failed because the connection was lost, once more
    /// on a new one. Every operation reads the domain's state first, so a retry is safe.
    fn with_session<T>(&self, op: impl Fn(&Session) -> Result<T, OpError>) -> Result<T, OpError> {
        let first = self.session().map_err(OpError::NoConnection)?;
        match op(&first) {
            Err(e) if e.lost() || first.closed.load(Ordering::Acquire) => {
                first.closed.store(true, Ordering::Release);
                tracing::info!(error = %e.detail(), "libvirt call failed on a lost connection: reconnecting");
                let second = self.session().map_err(OpError::NoConnection)?;
                op(&second)
            }
            other => other,
        }
    }

    /// [`Self::with_session`] for an operation on `vm`, its failure named `what`.
    fn vm_op<T>(
        &self,
        vm: &VmConfig,
        what: &'static str,
        op: impl Fn(&Session) -> Result<T, OpError>,
    ) -> Result<T, BackendError> {
        self.with_session(op)
            .map_err(|e| BackendError::vm(vm, what, e.detail()))
    }

    fn remember(&self, d: &VirDomain, vm: &VmConfig) {
        if let Ok(u) = d.uuid_string() {
            self.inner
                .known
                .lock()
                .expect("known lock poisoned")
                .insert(u.to_ascii_lowercase(), vm.name.clone());
        }
    }

    /// The VM's domain, if defined.
    fn find(&self, s: &Session, vm: &VmConfig) -> Result<Option<VirDomain>, OpError> {
        let found = match &vm.uuid {
            Some(u) => s.conn.lookup_domain_by_uuid_string(u),
            None => s.conn.lookup_domain_by_name(&vm.name),
        };
        match found {
            Ok(d) => {
                self.remember(&d, vm);
                Ok(Some(d))
            }
            Err(e) if no_domain(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The VM's domain, or an error saying it has none.
    fn find_existing(&self, s: &Session, vm: &VmConfig) -> Result<VirDomain, OpError> {
        self.find(s, vm)?.ok_or_else(|| {
            OpError::Other(format!(
                "no domain {} is defined",
                vm.uuid.as_deref().unwrap_or(&vm.name)
            ))
        })
    }

    /// The VM's domain, defining it from its keys if it has none.
    fn find_or_define(&self, s: &Session, vm: &VmConfig) -> Result<VirDomain, OpError> {
        if let Some(d) = self.find(s, vm)? {
            return Ok(d);
        }
        let xml = domain_xml(vm, &s.hypervisor).map_err(|why| {
            OpError::Other(format!(
                "no domain {} is defined, and none can be defined from the VM's keys: {why}",
                vm.uuid.as_deref().unwrap_or(&vm.name)
            ))
        })?;
        let d = s.conn.define_domain_xml(&xml).map_err(|e| {
            if connection_lost(&e) {
                OpError::Libvirt(e)
            } else {
                OpError::Other(format!(
                    "defining the domain from the VM's keys: {}",
                    e.message()
                ))
            }
        })?;
        tracing::info!(vm = %vm.name, hypervisor = ?s.hypervisor, "defined a domain from the VM's keys");
        self.remember(&d, vm);
        Ok(d)
    }
}

impl LibvirtBackend {
    /// The guest-side counters of the VM's first interface, `None` while it does not run.
    fn interface_counters(
        &self,
        s: &Session,
        vm: &VmConfig,
    ) -> Result<Option<IfCounters>, OpError> {
        let Some(d) = self.find(s, vm)? else {
            return Ok(None);
        };
        let Some(id) = d.id() else {
            return Ok(None);
        };
        let uuid = d.uuid_string()?.to_ascii_lowercase();
        let cached = self
            .inner
            .devices
            .lock()
            .expect("devices lock poisoned")
            .get(&uuid)
            .filter(|(i, _)| *i == id)
            .map(|(_, dev)| dev.clone());
        let dev = match cached {
            Some(dev) => dev,
            None => {
                let Some(dev) = first_interface(&d.xml_desc(0)?).1 else {
                    return Ok(None);
                };
                self.inner
                    .devices
                    .lock()
                    .expect("devices lock poisoned")
                    .insert(uuid, (id, dev.clone()));
                dev
            }
        };
        let st = d.interface_stats(&dev)?;
        // libvirt counts from the guest's side: what it transmitted came from it.
        Ok(Some(IfCounters {
            rx_packets: u64::try_from(st.tx_packets).unwrap_or(0),
            tx_packets: u64::try_from(st.rx_packets).unwrap_or(0),
        }))
    }
}

/// Why a libvirt operation failed.
#[derive(Debug)]
enum OpError {
    /// libvirt said no.
    Libvirt(virt::error::Error),
    /// No connection could be opened.
    NoConnection(BackendError),
    /// Something else, explained.
    Other(String),
}

impl From<virt::error::Error> for OpError {
    fn from(e: virt::error::Error) -> OpError {
        OpError::Libvirt(e)
    }
}

impl OpError {
    fn lost(&self) -> bool {
        matches!(self, OpError::Libvirt(e) if connection_lost(e))
    }

    fn detail(&self) -> String {
        match self {
            OpError::Libvirt(e) => e.message().to_string(),
            OpError::NoConnection(e) => e.to_string(),
            OpError::Other(s) => s.clone(),
        }
    }
}

/// Brings a domain to running from whatever state it is in: a paused one is resumed, a
/// PM-suspended one woken, a shut-off one started (which restores a managed save), a crashed
/// one destroyed and started again.
fn bring_up(vm: &VmConfig, d: &VirDomain) -> Result<Started, OpError> {
    let (state, _) = raw_state(d)?;
    match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => {}
        sys::VIR_DOMAIN_PAUSED => d.resume()?,
        sys::VIR_DOMAIN_PMSUSPENDED => d.pm_wakeup(0)?,
        _ => {
            if state == sys::VIR_DOMAIN_CRASHED || d.is_active()? {
                destroy(d)?;
            }
            let saved = d.has_managed_save(0)?;
            if let Err(e) = d.create() {
                if !saved || connection_lost(&e) {
                    return Err(e.into());
                }
                // A save that cannot be restored (another kernel, a disk that was full when
                // it was written) must not keep the VM down for ever: boot it afresh.
                tracing::warn!(vm = %vm.name, error = %e.message(), "restoring the managed save failed: discarding it and booting");
                d.create_with_flags(sys::VIR_DOMAIN_START_FORCE_BOOT)?;
            }
        }
    }
    Ok(Started { domid: d.id() })
}

/// Destroys a domain; one that stopped in the meantime is no error.
fn destroy(d: &VirDomain) -> Result<(), OpError> {
    match d.destroy() {
        Ok(()) => Ok(()),
        Err(e) if e.code().to_raw() == sys::VIR_ERR_OPERATION_INVALID && !d.is_active()? => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The domain's raw state and, if paused, the raw pause reason.
fn raw_state(d: &VirDomain) -> Result<(u32, Option<u32>), virt::error::Error> {
    let (state, reason) = d.state()?;
    let raw = state.to_raw();
    // virt's `state()` swallows the call's error and reports state -1: make it one again.
    if raw == u32::MAX {
        return Err(virt::error::Error::last_error());
    }
    let paused = match reason {
        Enum::Known(DomainStateReason::Paused(r)) => Some(r.to_raw()),
        _ => None,
    };
    Ok((raw, paused))
}

fn state_of(d: &VirDomain) -> Result<Observed, virt::error::Error> {
    let (state, paused) = raw_state(d)?;
    let saved = state == sys::VIR_DOMAIN_SHUTOFF && d.has_managed_save(0)?;
    Ok(observed_of(state, paused, d.id(), saved))
}

impl Inner {
    fn on_event(&self, ev: RawLifecycle) {
        let (word, detail) = event_words(ev.event, ev.detail);
        let name = self
            .known
            .lock()
            .expect("known lock poisoned")
            .get(&ev.uuid)
            .map(|n| n.to_string())
            .unwrap_or_else(|| ev.name.clone());
        tracing::debug!(vm = %name, domain = %ev.name, event = word, detail, "libvirt lifecycle event");
        let Some(state) = observed_from_event(ev.event, ev.detail, ev.id) else {
            return;
        };
        let sink = self.sink.lock().expect("sink lock poisoned").clone();
        if let Some(sink) = sink {
            sink(LifecycleEvent { name, state });
        }
    }
}

impl Backend for LibvirtBackend {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    fn lookup(&self, vm: &VmConfig) -> Result<Domain, BackendError> {
        self.vm_op(vm, "lookup", |s| {
            let Some(d) = self.find(s, vm)? else {
                return Ok(Domain {
                    state: Observed::Off,
                    domid: None,
                    mac: None,
                });
            };
            let state = state_of(&d)?;
            let (mac, _) = first_interface(&d.xml_desc(0)?);
            Ok(Domain {
                state,
                domid: d.id(),
                mac,
            })
        })
    }

    fn state(&self, vm: &VmConfig) -> Result<Observed, BackendError> {
        self.vm_op(vm, "state", |s| match self.find(s, vm)? {
            Some(d) => Ok(state_of(&d)?),
            None => Ok(Observed::Off),
        })
    }

    fn start(&self, vm: &VmConfig) -> Result<Started, BackendError> {
        self.vm_op(vm, "start", |s| {
            let d = self.find_or_define(s, vm)?;
            bring_up(vm, &d)
        })
    }

    fn stop(&self, vm: &VmConfig, mode: StopMode) -> Result<(), BackendError> {
        match mode {
            StopMode::Destroy => self.vm_op(vm, "destroy", |s| {
                if let Some(d) = self.find(s, vm)?
                    && d.is_active()?
                {
                    destroy(&d)?;
                }
                Ok(())
            }),
            StopMode::Suspend => self.vm_op(vm, "suspend", |s| {
                let d = self.find_existing(s, vm)?;
                if !d.is_active()? {
                    // Saved already (a retry after a lost connection finds it so).
                    return if d.has_managed_save(0)? {
                        Ok(())
                    } else {
                        Err(OpError::Other("not running (nothing to save)".into()))
                    };
                }
                // Saved running, whatever it is now: a resume must give a running guest.
                d.managed_save(sys::VIR_DOMAIN_SAVE_RUNNING)?;
                Ok(())
            }),
            StopMode::Shutdown => {
                let asked = self.vm_op(vm, "shutdown", |s| {
                    let Some(d) = self.find(s, vm)? else {
                        return Ok(false);
                    };
                    if !d.is_active()? {
                        return Ok(false);
                    }
                    if let Err(e) = d.shutdown() {
                        tracing::info!(vm = %vm.name, error = %e.message(), "the guest cannot be asked to shut down: destroying it");
                        destroy(&d)?;
                        return Ok(false);
                    }
                    Ok(true)
                })?;
                if !asked {
                    return Ok(());
                }
                let grace = self.inner.uri.shutdown_grace;
                let deadline = Instant::now() + grace;
                loop {
                    let active = self.vm_op(vm, "shutdown", |s| match self.find(s, vm)? {
                        Some(d) => Ok(d.is_active()?),
                        None => Ok(false),
                    })?;
                    if !active {
                        return Ok(());
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(SHUTDOWN_POLL);
                }
                tracing::info!(vm = %vm.name, ?grace, "still running after the shutdown request: destroying");
                self.stop(vm, StopMode::Destroy)
            }
        }
    }

    fn resume(&self, vm: &VmConfig) -> Result<Started, BackendError> {
        self.vm_op(vm, "resume", |s| {
            let d = self.find_existing(s, vm)?;
            if !d.has_managed_save(0)? && !d.is_active()? {
                tracing::warn!(vm = %vm.name, "no managed save to resume from: booting afresh");
            }
            bring_up(vm, &d)
        })
    }

    fn unpause(&self, vm: &VmConfig) -> Result<Started, BackendError> {
        self.vm_op(vm, "unpause", |s| {
            let d = self.find_existing(s, vm)?;
            bring_up(vm, &d)
        })
    }

    fn counters(&self, vm: &VmConfig) -> Result<Option<IfCounters>, BackendError> {
        self.vm_op(vm, "counters", |s| {
            // The test driver's counters are made up and grow with the clock: they would
            // keep every VM busy for ever. Without them, idle means no queries.
            if s.hypervisor == Hypervisor::Test {
                return Ok(None);
            }
            self.interface_counters(s, vm)
        })
    }

    fn list(&self) -> Result<Vec<Listed>, BackendError> {
        let listed = self.with_session(|s| {
            let mut out = Vec::new();
            for d in s.conn.list_all_domains(0)? {
                let uuid = d.uuid_string()?.to_ascii_lowercase();
                let known = self
                    .inner
                    .known
                    .lock()
                    .expect("known lock poisoned")
                    .get(&uuid)
                    .map(|n| n.to_string());
                let name = match known {
                    Some(n) => n,
                    None => d.name()?,
                };
                out.push(Listed {
                    name,
                    state: state_of(&d)?,
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        });
        listed.map_err(|e| BackendError::Host(format!("listing libvirt domains: {}", e.detail())))
    }

    fn subscribe(&self, sink: EventSink) -> Result<bool, BackendError> {
        *self.inner.sink.lock().expect("sink lock poisoned") = Some(Arc::new(sink));
        let (tx, rx) = mpsc::channel();
        *self.inner.lost.lock().expect("lost lock poisoned") = Some(tx);
        let s = self.session()?;
        self.register_events(&s)?;
        // Events flow only over an open connection: after a loss, reconnect at once rather
        // than at the next call, which may be a long time away when nothing runs.
        let inner = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("libvirt-reconnect".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let mut wait = RECONNECT_FIRST;
                    let mut warned = false;
                    loop {
                        std::thread::sleep(wait);
                        let Some(inner) = inner.upgrade() else {
                            return;
                        };
                        match (LibvirtBackend { inner }).session() {
                            Ok(_) => break,
                            Err(e) => {
                                if !warned {
                                    tracing::warn!(error = %e, "libvirt unreachable: retrying");
                                    warned = true;
                                }
                                wait = (wait * 2).min(RECONNECT_MAX);
                            }
                        }
                    }
                }
            })
            .map_err(|e| BackendError::Host(format!("cannot start the reconnect thread: {e}")))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::config::{Flags, merge};

    fn vm(spec: &str) -> VmConfig {
        let f = Flags {
            backend: Some("libvirt".into()),
            specs: vec![spec.to_string()],
            ..Flags::default()
        };
        merge(&f, None).unwrap().vms.remove(0)
    }

    /// A domain name no other test (they share test:///default) uses.
    fn unique(tag: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!(
            "{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        )
    }

    #[test]
    fn uris_keep_libvirts_parameters_and_take_ours_out() {
        let u = parse_uri(Some("qemu:///system")).unwrap();
        assert_eq!(u.connect.as_deref(), Some("qemu:///system"));
        assert_eq!(u.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        let u = parse_uri(Some(
            "qemu+ssh://root@h/system?keyfile=/k&shutdown_grace=2.5&no_verify=1",
        ))
        .unwrap();
        assert_eq!(
            u.connect.as_deref(),
            Some("qemu+ssh://root@h/system?keyfile=/k&no_verify=1")
        );
        assert_eq!(u.shutdown_grace, Duration::from_millis(2500));
        let u = parse_uri(Some("xen:///system?shutdown_grace=0")).unwrap();
        assert_eq!(u.connect.as_deref(), Some("xen:///system"));
        assert_eq!(u.shutdown_grace, Duration::ZERO);
        assert_eq!(parse_uri(None).unwrap().connect, None);
        assert_eq!(parse_uri(Some("")).unwrap().connect, None);
        for bad in [
            "process:///run/jitsu",
            "/var/run/libvirt/libvirt-sock",
            "qemu:///system?shutdown_grace=-1",
            "qemu:///system?shutdown_grace=soon",
        ] {
            let e = parse_uri(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn hypervisors_come_from_the_driver_name() {
        assert_eq!(Hypervisor::from_driver("QEMU"), Hypervisor::Qemu);
        assert_eq!(Hypervisor::from_driver("Xen"), Hypervisor::Xen);
        assert_eq!(Hypervisor::from_driver("TEST"), Hypervisor::Test);
        assert_eq!(
            Hypervisor::from_driver("LXC"),
            Hypervisor::Other("LXC".into())
        );
    }

    const GUEST: &str = "name=www,dns=www.example.org,ip=10.77.0.10/24,mac=02:77:00:00:00:10,\
                         kernel=/g/vmlinux,initrd=/g/initramfs.cpio.gz,memory=96,\
                         cmdline=console=ttyS0 jitsu.ip=10.77.0.10/24 jitsu.name=<www&co>";

    /// Runs libvirt's schema check (virt-xml-validate) on `xml`.
    fn validate(xml: &str) {
        let dir = std::env::temp_dir().join(unique("jitsu-xml"));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("domain.xml");
        std::fs::write(&f, xml).unwrap();
        let out = Command::new("virt-xml-validate")
            .arg(&f)
            .arg("domain")
            .output()
            .expect(
                "virt-xml-validate (Debian packages libvirt-clients and libxml2-utils) runs; \
                 scripts/test installs them",
            );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "libvirt's domain schema refuses:\n{xml}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn qemu_domains_are_pcs_with_direct_kernel_boot_on_the_bridge() {
        let x = domain_xml(&vm(GUEST), &Hypervisor::Qemu).unwrap();
        validate(&x);
        for want in [
            "<domain type='qemu'>",
            "<name>www</name>",
            "<memory unit='MiB'>96</memory>",
            "machine='pc'>hvm</type>",
            "<kernel>/g/vmlinux</kernel>",
            "<initrd>/g/initramfs.cpio.gz</initrd>",
            "<cmdline>console=ttyS0 jitsu.ip=10.77.0.10/24 jitsu.name=&lt;www&amp;co&gt;</cmdline>",
            "<acpi/>",
            "<controller type='usb' model='none'/>",
            "<memballoon model='none'/>",
            "<mac address='02:77:00:00:00:10'/>",
            "<source bridge='br0'/>",
            "<model type='virtio'/>",
            "<serial type='pty'>",
        ] {
            assert!(x.contains(want), "{want} missing from\n{x}");
        }
        assert!(!x.contains("<uuid>") && !x.contains("<disk"), "{x}");
        // KVM only when asked, a UUID when given, disks, a console file.
        let x = domain_xml(
            &vm(&format!(
                "{GUEST},domain_type=kvm,uuid=4dea22b3-1d52-d8f3-2516-782e98ab3fa0,\
                 disk=/d/root.qcow2,disk=/d/data.img,console_log=/var/log/www.console,nic=xenbr1"
            )),
            &Hypervisor::Qemu,
        )
        .unwrap();
        validate(&x);
        for want in [
            "<domain type='kvm'>",
            "<uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>",
            "<driver name='qemu' type='qcow2'/>\n      <source file='/d/root.qcow2'/>\n      <target dev='vda' bus='virtio'/>",
            "<driver name='qemu' type='raw'/>\n      <source file='/d/data.img'/>\n      <target dev='vdb' bus='virtio'/>",
            "<serial type='file'>\n      <source path='/var/log/www.console'/>",
            "<source bridge='xenbr1'/>",
        ] {
            assert!(x.contains(want), "{want} missing from\n{x}");
        }
        // A disk alone boots through the BIOS.
        let x = domain_xml(
            &vm("name=d,dns=d.example.org,ip=10.0.0.2,disk=/d/disk.img"),
            &Hypervisor::Qemu,
        )
        .unwrap();
        validate(&x);
        assert!(
            x.contains("<boot dev='hd'/>") && !x.contains("<kernel>"),
            "{x}"
        );
        assert!(x.contains(&format!("<memory unit='MiB'>{DEFAULT_MEMORY_MIB}</memory>")));
    }

    #[test]
    fn xen_domains_are_pvh_or_pv_with_xen_devices() {
        // Xen cannot run on this machine: the XML is checked against libvirt's schema and
        // for the shape libxl needs.
        let pvh = domain_xml(&vm(&format!("{GUEST},disk=/d/a.img")), &Hypervisor::Xen).unwrap();
        validate(&pvh);
        for want in [
            "<domain type='xen'>",
            "machine='xenpvh'>xenpvh</type>",
            "<kernel>/g/vmlinux</kernel>",
            "<target dev='xvda' bus='xen'/>",
            "<source bridge='br0'/>",
            "<console type='pty'>\n      <target type='xen' port='0'/>",
        ] {
            assert!(pvh.contains(want), "{want} missing from\n{pvh}");
        }
        for absent in ["<acpi/>", "usb", "memballoon", "virtio", "<serial"] {
            assert!(!pvh.contains(absent), "{absent} in\n{pvh}");
        }
        let pv = domain_xml(&vm(&format!("{GUEST},domain_type=xenpv")), &Hypervisor::Xen).unwrap();
        validate(&pv);
        assert!(pv.contains("machine='xenpv'>xen</type>"), "{pv}");
    }

    #[test]
    fn domains_that_cannot_be_defined_say_why() {
        let nothing = vm("name=n,dns=n.example.org,ip=10.0.0.3");
        let e = domain_xml(&nothing, &Hypervisor::Qemu).unwrap_err();
        assert!(e.contains("`kernel`"), "{e}");
        let disk_only = vm("name=n,dns=n.example.org,ip=10.0.0.3,disk=/d/a.img");
        let e = domain_xml(&disk_only, &Hypervisor::Xen).unwrap_err();
        assert!(e.contains("Xen domain is defined from a `kernel`"), "{e}");
        let e = domain_xml(&vm(&format!("{GUEST},console_log=/l")), &Hypervisor::Xen).unwrap_err();
        assert!(e.contains("pty consoles only"), "{e}");
        let e = domain_xml(
            &vm(&format!("{GUEST},domain_type=xenpvh")),
            &Hypervisor::Qemu,
        )
        .unwrap_err();
        assert!(e.contains("domain_type=xenpvh"), "{e}");
        let e = domain_xml(&vm(GUEST), &Hypervisor::Other("LXC".into())).unwrap_err();
        assert!(
            e.contains("driver is LXC: define the domain www yourself"),
            "{e}"
        );
    }

    #[test]
    fn the_first_interface_gives_mac_and_device() {
        let xml = "<domain type='qemu' id='3'>\n  <name>www</name>\n  <devices>\n\
            <disk type='file' device='disk'><target dev='vda' bus='virtio'/></disk>\n\
            <interface type='bridge'>\n      <mac address='02:77:00:00:00:10'/>\n\
            <source bridge='br0'/>\n      <target dev='vnet7'/>\n      <model type='virtio'/>\n\
            <alias name='net0'/>\n    </interface>\n\
            <interface type='network'><mac address='52:54:00:00:00:99'/><target dev='vnet8'/></interface>\n\
            </devices>\n</domain>";
        assert_eq!(
            first_interface(xml),
            (
                Some("02:77:00:00:00:10".parse().unwrap()),
                Some("vnet7".to_string())
            )
        );
        // Off: no target yet. Double quotes are XML too.
        let off = r#"<domain><devices><interface type="bridge"><mac address="02:00:00:00:00:01"/><source bridge="br0"/></interface></devices></domain>"#;
        assert_eq!(
            first_interface(off),
            (Some("02:00:00:00:00:01".parse().unwrap()), None)
        );
        assert_eq!(first_interface("<domain><devices/></domain>"), (None, None));
        // A <target> outside the interface is not its device.
        let stray = "<interface type='bridge'><mac address='zz'/></interface><target dev='x'/>";
        assert_eq!(first_interface(stray), (None, None));
        assert_eq!(attr("<x naddress='1' address='2'/>", "address"), Some("2"));
        assert_eq!(
            start_tag("<macro/><mac address='a'/>", "mac"),
            Some("<mac address='a'/>")
        );
    }

    #[test]
    fn domain_states_map_to_the_fleets() {
        let run = Observed::Running { domid: Some(4) };
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_RUNNING, None, Some(4), false),
            run
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_BLOCKED, None, Some(4), false),
            run
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_SHUTDOWN, None, Some(4), false),
            run
        );
        assert_eq!(
            observed_of(
                sys::VIR_DOMAIN_PAUSED,
                Some(sys::VIR_DOMAIN_PAUSED_USER),
                Some(4),
                false
            ),
            Observed::Paused
        );
        assert_eq!(
            observed_of(
                sys::VIR_DOMAIN_PAUSED,
                Some(sys::VIR_DOMAIN_PAUSED_SAVE),
                Some(4),
                false
            ),
            Observed::Suspended
        );
        assert_eq!(
            observed_of(
                sys::VIR_DOMAIN_PAUSED,
                Some(sys::VIR_DOMAIN_PAUSED_STARTING_UP),
                Some(4),
                false
            ),
            run
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_PMSUSPENDED, None, Some(4), false),
            Observed::Paused
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_SHUTOFF, None, None, true),
            Observed::Suspended
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_SHUTOFF, None, None, false),
            Observed::Off
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_CRASHED, None, Some(4), false),
            Observed::Off
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_NOSTATE, None, Some(4), false),
            run
        );
        assert_eq!(
            observed_of(sys::VIR_DOMAIN_NOSTATE, None, None, false),
            Observed::Off
        );
    }

    #[test]
    fn lifecycle_events_map_to_the_fleets_states() {
        let ev = |e: u32, d: u32| observed_from_event(e as i32, d as i32, Some(9));
        let run = Some(Observed::Running { domid: Some(9) });
        assert_eq!(
            ev(
                sys::VIR_DOMAIN_EVENT_STARTED,
                sys::VIR_DOMAIN_EVENT_STARTED_BOOTED
            ),
            run
        );
        assert_eq!(
            ev(
                sys::VIR_DOMAIN_EVENT_STARTED,
                sys::VIR_DOMAIN_EVENT_STARTED_RESTORED
            ),
            run
        );
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_RESUMED, 0), run);
        assert_eq!(
            ev(sys::VIR_DOMAIN_EVENT_SUSPENDED, 0),
            Some(Observed::Paused)
        );
        assert_eq!(
            ev(sys::VIR_DOMAIN_EVENT_PMSUSPENDED, 0),
            Some(Observed::Paused)
        );
        assert_eq!(
            ev(
                sys::VIR_DOMAIN_EVENT_STOPPED,
                sys::VIR_DOMAIN_EVENT_STOPPED_SAVED
            ),
            Some(Observed::Suspended)
        );
        for detail in [
            sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN,
            sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED,
            sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED,
            sys::VIR_DOMAIN_EVENT_STOPPED_FAILED,
        ] {
            assert_eq!(
                ev(sys::VIR_DOMAIN_EVENT_STOPPED, detail),
                Some(Observed::Off)
            );
        }
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_CRASHED, 0), Some(Observed::Off));
        // The guest asked to power off: it stops a moment later, with its own event.
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_SHUTDOWN, 0), None);
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_DEFINED, 0), None);
        assert_eq!(ev(sys::VIR_DOMAIN_EVENT_UNDEFINED, 0), None);
        assert_eq!(observed_from_event(-1, 0, None), None);
        assert_eq!(observed_from_event(999, 0, None), None);
    }

    // The API mapping, against libvirt's test driver (no daemon; every connection to
    // test:///default in this process shares one driver state, hence unique names).

    fn test_backend() -> LibvirtBackend {
        LibvirtBackend::open(Some("test:///default")).unwrap()
    }

    fn test_vm(name: &str, extra: &str) -> VmConfig {
        vm(&format!(
            "name={name},dns={name}.example.org,ip=10.77.0.10,mac=02:77:00:00:00:10,\
             kernel=/g/vmlinux,initrd=/g/initrd,cmdline=console=ttyS0{extra}"
        ))
    }

    /// Defines a domain as a person would, with virt directly.
    fn define_by_hand(name: &str, uuid: &str, mac: &str) {
        let c = Connect::open(Some("test:///default")).unwrap();
        c.define_domain_xml(&format!(
            "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>\
             <memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>\
             <interface type='bridge'><mac address='{mac}'/><source bridge='br9'/></interface>\
             </devices></domain>"
        ))
        .unwrap();
    }

    fn raw_domain(name: &str) -> VirDomain {
        let c = Connect::open(Some("test:///default")).unwrap();
        c.lookup_domain_by_name(name).unwrap()
    }

    #[test]
    fn the_test_driver_defines_starts_and_stops_a_vm_from_its_keys() {
        let b = test_backend();
        assert_eq!(b.hypervisor().unwrap(), Hypervisor::Test);
        let name = unique("kv");
        let v = test_vm(&name, "");
        let d = b.lookup(&v).unwrap();
        assert_eq!((d.state, d.domid, d.mac), (Observed::Off, None, None));
        assert!(
            b.with_session(|s| b.interface_counters(s, &v))
                .unwrap()
                .is_none(),
            "no counters while off"
        );
        b.stop(&v, StopMode::Destroy).unwrap();

        let started = b.start(&v).unwrap();
        assert!(started.domid.is_some());
        let d = b.lookup(&v).unwrap();
        assert_eq!(
            d.state,
            Observed::Running {
                domid: started.domid
            }
        );
        assert_eq!(d.domid, started.domid);
        assert_eq!(d.mac, Some(v.mac), "the MAC from the domain's own XML");
        let xml = raw_domain(&name).xml_desc(0).unwrap();
        assert!(xml.contains("<kernel>/g/vmlinux</kernel>"), "{xml}");
        assert!(xml.contains("Defined by jitsu-dns"), "{xml}");
        assert!(raw_domain(&name).is_persistent().unwrap());
        // The test driver's counters grow with time: bracketed by two readings of its own, the
        // guest's side (what it transmitted) is our received and the other way round.
        let dev = first_interface(&xml).1.expect("a running domain's device");
        let before = raw_domain(&name).interface_stats(&dev).unwrap();
        let c = b
            .with_session(|s| b.interface_counters(s, &v))
            .unwrap()
            .expect("counters of a running domain");
        assert_eq!(b.counters(&v).unwrap(), None, "not the test driver's");
        let after = raw_domain(&name).interface_stats(&dev).unwrap();
        assert!(
            (before.tx_packets as u64..=after.tx_packets as u64).contains(&c.rx_packets),
            "{before:?} {c:?} {after:?}"
        );
        assert!(
            (before.rx_packets as u64..=after.rx_packets as u64).contains(&c.tx_packets),
            "{before:?} {c:?} {after:?}"
        );
        assert!(
            b.list()
                .unwrap()
                .iter()
                .any(|l| l.name == name && l.state == d.state)
        );

        // Starting what runs boots nothing twice.
        assert_eq!(b.start(&v).unwrap(), started);
        b.stop(&v, StopMode::Destroy).unwrap();
        assert_eq!(b.state(&v).unwrap(), Observed::Off);
        b.stop(&v, StopMode::Destroy).unwrap();
        assert!(
            b.list()
                .unwrap()
                .iter()
                .any(|l| l.name == name && l.state == Observed::Off)
        );
        // The second start uses the domain the first one defined.
        b.start(&v).unwrap();
        b.stop(&v, StopMode::Shutdown).unwrap();
        assert_eq!(b.state(&v).unwrap(), Observed::Off);
        raw_domain(&name).undefine().unwrap();
    }

    #[test]
    fn the_test_driver_saves_resumes_pauses_and_unpauses() {
        let b = test_backend();
        let name = unique("ks");
        let v = test_vm(&name, "");
        b.start(&v).unwrap();
        b.stop(&v, StopMode::Suspend).unwrap();
        assert_eq!(b.state(&v).unwrap(), Observed::Suspended);
        let raw = raw_domain(&name);
        assert!(raw.has_managed_save(0).unwrap() && !raw.is_active().unwrap());
        // A retry of the same save (after a lost connection) finds it done.
        b.stop(&v, StopMode::Suspend).unwrap();
        let r = b.resume(&v).unwrap();
        assert!(r.domid.is_some());
        assert_eq!(b.state(&v).unwrap(), Observed::Running { domid: r.domid });
        assert!(
            !raw.has_managed_save(0).unwrap(),
            "restored: the save is gone"
        );

        // Paused by someone else: reported as paused, unpaused on demand.
        raw.suspend().unwrap();
        assert_eq!(b.state(&v).unwrap(), Observed::Paused);
        assert_eq!(b.unpause(&v).unwrap().domid, r.domid);
        assert_eq!(b.state(&v).unwrap(), Observed::Running { domid: r.domid });

        b.stop(&v, StopMode::Destroy).unwrap();
        let e = b.stop(&v, StopMode::Suspend).unwrap_err().to_string();
        assert!(e.contains("nothing to save"), "{e}");
        raw.undefine().unwrap();
        let e = b.resume(&v).unwrap_err().to_string();
        assert!(
            e.contains(&format!("VM {name}: resume: no domain {name} is defined")),
            "{e}"
        );
    }

    #[test]
    fn existing_domains_are_used_as_they_are_and_found_by_uuid() {
        let b = test_backend();
        let dom = unique("kd");
        let uuid = "4dea22b3-1d52-d8f3-2516-782e98ab3f01";
        define_by_hand(&dom, uuid, "02:aa:bb:cc:dd:01");
        // The VM has another name, the domain's UUID and a MAC of its own: the domain wins.
        let v = test_vm(&unique("kvm"), &format!(",uuid={uuid}"));
        let d = b.lookup(&v).unwrap();
        assert_eq!(d.state, Observed::Off);
        assert_eq!(d.mac, Some("02:aa:bb:cc:dd:01".parse().unwrap()));
        b.start(&v).unwrap();
        let xml = raw_domain(&dom).xml_desc(0).unwrap();
        assert!(
            !xml.contains("jitsu-dns") && xml.contains("br9"),
            "redefined:\n{xml}"
        );
        // Listed under the VM's name, as reconciliation knows it.
        let listed = b.list().unwrap();
        assert!(listed.iter().any(|l| *l.name == *v.name), "{listed:?}");
        b.stop(&v, StopMode::Destroy).unwrap();
        raw_domain(&dom).undefine().unwrap();

        // A VM with nothing to define a domain from says so.
        let bare = vm(&format!(
            "name={},dns=b.example.org,ip=10.0.0.9",
            unique("kb")
        ));
        let e = b.start(&bare).unwrap_err().to_string();
        assert!(e.contains("none can be defined from the VM's keys"), "{e}");
    }

    #[test]
    fn the_test_driver_pushes_lifecycle_events() {
        let b = test_backend();
        let got: Arc<Mutex<Vec<LifecycleEvent>>> = Arc::default();
        let g = got.clone();
        assert!(
            b.subscribe(Box::new(move |e| g.lock().unwrap().push(e)))
                .unwrap()
        );
        let name = unique("ke");
        let v = test_vm(&name, "");
        let wait = |want: Observed| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                {
                    let mut evs = got.lock().unwrap();
                    if let Some(i) = evs.iter().position(|e| e.name == name && e.state == want) {
                        evs.drain(..=i);
                        return;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "no {want:?} event for {name}: {:?}",
                    got.lock().unwrap()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        b.start(&v).unwrap();
        wait(Observed::Running {
            domid: b.domid(&v).unwrap(),
        });
        // Changes made by others arrive too.
        raw_domain(&name).suspend().unwrap();
        wait(Observed::Paused);
        raw_domain(&name).resume().unwrap();
        wait(Observed::Running {
            domid: b.domid(&v).unwrap(),
        });
        b.stop(&v, StopMode::Suspend).unwrap();
        wait(Observed::Suspended);
        b.resume(&v).unwrap();
        raw_domain(&name).destroy().unwrap();
        wait(Observed::Off);
        raw_domain(&name).undefine().unwrap();
    }
}
