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
//! A VM with `rumprun_config` is started paused, given rumprun's configuration in Xenstore
//! ([`crate::rumprun`]) at its domain id, and only then resumed, as Jitsu's libxl backend did;
//! a domain that cannot be given it is destroyed, not left paused.
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
//!
//! Layout: `xml` writes and reads the domain XML, `lifecycle` maps libvirt's states and
//! events, `session` keeps the connection; this file is what the backend does with a domain.

mod lifecycle;
mod session;
mod xml;

pub use xml::{DEFAULT_MEMORY_KIB, Hypervisor, domain_xml};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use virt::domain::{Domain as VirDomain, DomainStateReason};
use virt::enumutil::Enum;
use virt::sys;

use super::{
    Backend, BackendError, Domain, EventSink, Listed, Started, parse_shutdown_grace, uri_err,
};
use crate::config::{StopMode, VmConfig};
use crate::fleet::{IfCounters, Observed};
use crate::rumprun;
use lifecycle::observed_of;
use session::{Inner, OpError, Session, connection_lost, ensure_event_loop, no_domain};
use xml::{first_interface, interface_macs};

/// How long `shutdown` waits for the guest when the URI does not say.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often `shutdown` looks whether the guest is off.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);

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

/// The libvirt backend.
#[derive(Debug, Clone)]
pub struct LibvirtBackend {
    inner: Arc<Inner>,
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

/// Brings a domain to running from whatever state it is in: a paused one is resumed, a
/// PM-suspended one woken, a shut-off one started (which restores a managed save), a crashed
/// one destroyed and started again. A VM with `rumprun_config` is started paused, given its
/// configuration in Xenstore, and only then resumed (a paused one gets it again before it is
/// resumed: it may have been started paused by an attempt that lost its connection).
fn bring_up(s: &Session, vm: &VmConfig, d: &VirDomain) -> Result<Started, OpError> {
    // Read before anything starts: a file gone since start-up fails the boot with nothing
    // to clean up.
    let cfg = vm
        .rumprun_config
        .as_deref()
        .map(rumprun::read_cfg)
        .transpose()
        .map_err(|e| OpError::Other(e.to_string()))?;
    let paused = if cfg.is_some() {
        sys::VIR_DOMAIN_START_PAUSED
    } else {
        0
    };
    let (state, _) = raw_state(d)?;
    match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => {}
        sys::VIR_DOMAIN_PAUSED => {
            if let Some(cfg) = &cfg {
                give_rumprun_config(d, cfg)?;
            }
            d.resume()?;
        }
        sys::VIR_DOMAIN_PMSUSPENDED => d.pm_wakeup(0)?,
        _ => {
            if state == sys::VIR_DOMAIN_CRASHED || d.is_active()? {
                destroy(d)?;
            }
            let saved = d.has_managed_save(0)?;
            if let Err(e) = create(s, d, paused) {
                if !saved || connection_lost(&e) {
                    return Err(e.into());
                }
                // A save that cannot be restored (another kernel, a disk that was full when
                // it was written) must not keep the VM down for ever: boot it afresh.
                tracing::warn!(vm = %vm.name, error = %e.message(), "restoring the managed save failed: discarding it and booting");
                create(s, d, paused | sys::VIR_DOMAIN_START_FORCE_BOOT)?;
            }
            if let Some(cfg) = &cfg {
                if let Err(e) = give_rumprun_config(d, cfg) {
                    // Jitsu left the paused domain behind; without its configuration it can
                    // never run as meant, and the next boot starts it afresh.
                    let destroyed = match destroy(d) {
                        Ok(()) => "the paused domain was destroyed".to_string(),
                        Err(de) => {
                            format!("destroying the paused domain failed too: {}", de.detail())
                        }
                    };
                    return Err(OpError::Other(format!("{}; {destroyed}", e.detail())));
                }
                d.resume()?;
            }
        }
    }
    // The port exists only now (libvirt names it vnetN at each start, Xen vif<domid>.<n>).
    let (_, port) = first_interface(&d.xml_desc(0)?);
    Ok(Started {
        domid: d.id(),
        port,
    })
}

/// Starts a domain with `flags` (`VIR_DOMAIN_START_*`). libvirt's test driver takes no start
/// flag (libvirt 9.0 refuses any) and runs no guest: there, starting paused is starting, then
/// pausing at once.
fn create(s: &Session, d: &VirDomain, flags: u32) -> Result<(), virt::error::Error> {
    let test_paused = s.hypervisor == Hypervisor::Test && flags & sys::VIR_DOMAIN_START_PAUSED != 0;
    let flags = if test_paused {
        flags & !sys::VIR_DOMAIN_START_PAUSED
    } else {
        flags
    };
    if flags == 0 {
        d.create()?;
    } else {
        d.create_with_flags(flags)?;
    }
    if test_paused {
        d.suspend()?;
    }
    Ok(())
}

/// Writes rumprun's configuration for the domain, which must have an id (it runs or is
/// paused).
fn give_rumprun_config(d: &VirDomain, cfg: &str) -> Result<(), OpError> {
    let domid = d
        .id()
        .ok_or_else(|| OpError::Other("started, but libvirt gives the domain no id".into()))?;
    rumprun::write_cfg(domid, cfg).map_err(|e| OpError::Other(e.to_string()))
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

pub(super) fn state_of(d: &VirDomain) -> Result<Observed, virt::error::Error> {
    let (state, paused) = raw_state(d)?;
    let saved = state == sys::VIR_DOMAIN_SHUTOFF && d.has_managed_save(0)?;
    Ok(observed_of(state, paused, d.id(), saved))
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
                    macs: Vec::new(),
                    fixed_port: None,
                });
            };
            let state = state_of(&d)?;
            let macs = interface_macs(&d.xml_desc(0)?);
            Ok(Domain {
                state,
                domid: d.id(),
                macs,
                fixed_port: None,
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
            bring_up(s, vm, &d)
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
            bring_up(s, vm, &d)
        })
    }

    fn unpause(&self, vm: &VmConfig) -> Result<Started, BackendError> {
        self.vm_op(vm, "unpause", |s| {
            let d = self.find_existing(s, vm)?;
            bring_up(s, vm, &d)
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
        self.spawn_reconnect(rx)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use virt::connect::Connect;

    use super::*;
    use crate::backend::LifecycleEvent;
    use crate::config::{Flags, merge};

    pub(super) fn vm(spec: &str) -> VmConfig {
        let f = Flags {
            backend: Some("libvirt".into()),
            specs: vec![spec.to_string()],
            ..Flags::default()
        };
        merge(&f, None).unwrap().vms.remove(0)
    }

    /// A domain name no other test (they share test:///default) uses.
    pub(super) fn unique(tag: &str) -> String {
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
        assert_eq!((d.state, d.domid, d.mac()), (Observed::Off, None, None));
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
        assert_eq!(d.mac(), Some(v.mac()), "the MAC from the domain's own XML");
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
    fn the_test_driver_defines_a_domain_from_jitsus_keys_as_jitsu_built_it() {
        // Jitsu's README example (rumprun nginx) with a loop device and two NICs, as a Xen PV
        // domain: libvirt stores what it means.
        let b = test_backend();
        let name = unique("jk");
        let v = vm(&format!(
            "name={name},dns={name}.example.org,ip=10.77.0.11,kernel=/k/nginx.bin,memory=64000,\
             disk=/dev/loop5@xvda,disk=/i/data.iso@xvdb,nic=br0,nic=br1,script=vif-bridge,\
             domain_type=xenpv"
        ));
        b.start(&v).unwrap();
        let xml = raw_domain(&name).xml_desc(0).unwrap();
        for want in [
            "<memory unit='KiB'>64000</memory>",
            "<kernel>/k/nginx.bin</kernel>",
            "<disk type='block' device='disk'>",
            "<source dev='/dev/loop5'/>",
            "<target dev='xvda' bus='xen'/>",
            "<source file='/i/data.iso'/>",
            "<target dev='xvdb' bus='xen'/>",
            "<source bridge='br1'/>",
            "<script path='vif-bridge'/>",
        ] {
            assert!(xml.contains(want), "{want} missing from\n{xml}");
        }
        assert!(!xml.contains("<readonly/>"), "read-write: {xml}");
        assert_eq!(
            xml.matches("<script path='vif-bridge'/>").count(),
            2,
            "{xml}"
        );
        // Every NIC's MAC comes back from the domain.
        let d = b.lookup(&v).unwrap();
        assert_eq!(d.macs, [v.mac(), v.nics[1].mac]);
        b.stop(&v, StopMode::Destroy).unwrap();
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
        assert_eq!(d.mac(), Some("02:aa:bb:cc:dd:01".parse().unwrap()));
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
