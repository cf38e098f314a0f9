//! The validated configuration: [`Config`], each VM's [`VmConfig`], the zones, the small
//! enums their keys take, and the defaults.
//!
//! Plain typed data: turning what was given into it, and refusing what is wrong, is the other
//! modules' ([`super::load`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::Name;
use ipnet::IpNet;
use shared_proto::Mac;

use super::ConfigError;

/// Default address the DNS server binds (Jitsu's default).
pub const DEFAULT_BIND: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Default DNS port.
pub const DEFAULT_LISTEN: u16 = 53;
/// Default port of the forwarders.
pub const DEFAULT_FORWARDER_PORT: u16 = 53;
/// Default response delay (Jitsu's `-d 0.1`).
pub const DEFAULT_DELAY: Duration = Duration::from_millis(100);
/// Default TTL of answers, in seconds; VMs idle for twice this are stopped.
pub const DEFAULT_TTL: u32 = 60;
/// Default wait for a guest's announcement (or synjitsu) before answering anyway.
pub const DEFAULT_WAIT_FOR_TIMEOUT: Duration = Duration::from_secs(10);
/// Default wait for a readiness key before answering anyway: Jitsu's, hard-coded there.
pub const DEFAULT_KEY_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time a synjitsu-tracked guest has to announce itself before its boot is failed.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `max_boot_attempts`: failed boots in a row before the VM is held back.
pub const DEFAULT_MAX_BOOT_ATTEMPTS: u32 = 3;
/// Default `boot_backoff`: the first wait once `max_boot_attempts` boots failed in a row.
pub const DEFAULT_BOOT_BACKOFF: Duration = Duration::from_secs(10);
/// The longest back-off: the wait doubles with each further failure up to this.
pub const MAX_BOOT_BACKOFF: Duration = Duration::from_secs(600);
/// Default control socket.
pub const DEFAULT_CONTROL: &str = "/run/jitsu/control.sock";
/// Default bridge a process-backend VM joins.
pub const DEFAULT_NIC: &str = "br0";
/// Default share of the VMs a reload may remove (more is refused unless the file allows it).
pub const DEFAULT_MAX_REMOVED_SHARE: f64 = 0.5;
/// Default log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default bound on forwarded queries in flight (dnsmasq's `dns-forward-max` is 150).
pub const DEFAULT_FORWARD_MAX: usize = 150;
/// Default bound on DNS-over-TCP connections at once (BIND's `tcp-clients` is 150).
pub const DEFAULT_TCP_MAX_CLIENTS: usize = 150;
/// Default bound on DNS-over-TCP connections from one client: a resolver needs one or two.
pub const DEFAULT_TCP_MAX_PER_CLIENT: usize = 16;

/// How a VM is stopped when idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopMode {
    /// Killed at once.
    Destroy,
    /// Frozen (process backend) or saved (libvirt); the next query resumes it.
    Suspend,
    /// Asked to stop (SIGTERM, ACPI), then destroyed after a grace period.
    Shutdown,
}

impl StopMode {
    /// The word used in flags, specs, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            StopMode::Destroy => "destroy",
            StopMode::Suspend => "suspend",
            StopMode::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for StopMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StopMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "destroy" => Ok(StopMode::Destroy),
            "suspend" => Ok(StopMode::Suspend),
            "shutdown" => Ok(StopMode::Shutdown),
            _ => Err("expected destroy, suspend or shutdown".into()),
        }
    }
}

/// What a drained VM's names get while it is not running (`drained=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DrainedAnswer {
    /// SERVFAIL: resolvers try again later (the VM is out for a while).
    #[default]
    ServFail,
    /// NXDOMAIN with the zone's SOA: the name is gone (cached for the SOA's minimum).
    NxDomain,
}

impl DrainedAnswer {
    /// The word used in keys, the store and `ctl`.
    pub fn as_str(self) -> &'static str {
        match self {
            DrainedAnswer::ServFail => "servfail",
            DrainedAnswer::NxDomain => "nxdomain",
        }
    }
}

impl fmt::Display for DrainedAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DrainedAnswer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "servfail" => Ok(DrainedAnswer::ServFail),
            "nxdomain" => Ok(DrainedAnswer::NxDomain),
            _ => Err("expected servfail or nxdomain".into()),
        }
    }
}

/// Which backend runs the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// libvirt (issue 6).
    Libvirt,
    /// A command in a network namespace of its own.
    Process,
    /// QEMU `microvm` started directly, on a tap port of the VM's bridge (issue 13).
    Qemu,
}

impl BackendKind {
    /// The word used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Libvirt => "libvirt",
            BackendKind::Process => "process",
            BackendKind::Qemu => "qemu",
        }
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "libvirt" => Ok(BackendKind::Libvirt),
            "process" => Ok(BackendKind::Process),
            "qemu" => Ok(BackendKind::Qemu),
            _ => Err("expected libvirt, process or qemu".into()),
        }
    }
}

/// When the guest announces itself (its gratuitous ARP), which is what synjitsu may take it
/// to mean (`announce=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Announce {
    /// As it boots, perhaps before it listens (a Linux guest's `arping` at `ifup`): synjitsu
    /// probes each held port from its own address before re-sending the SYNs.
    #[default]
    Boot,
    /// Only once every port it serves listens (the project's Rust unikernel, MirageOS guests,
    /// the test guest): synjitsu re-sends the held SYNs at the announcement, without a probe.
    Listening,
}

impl Announce {
    /// The word used in keys and `--check`.
    pub fn as_str(self) -> &'static str {
        match self {
            Announce::Boot => "boot",
            Announce::Listening => "listening",
        }
    }
}

impl fmt::Display for Announce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Announce {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "boot" => Ok(Announce::Boot),
            "listening" => Ok(Announce::Listening),
            _ => Err("expected boot or listening".into()),
        }
    }
}

/// How synjitsu hands the held SYNs to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverKind {
    /// Re-sent on the bridge once the guest listens.
    Wire,
    /// Written to Xenstore for a guest that replays them (needs a Xen domain id).
    Xenstore,
}

/// Who configures the guest's interface (process backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ifup {
    /// jitsu-dns adds the addresses and brings `eth0` up before the command starts.
    Jitsu,
    /// The command brings `eth0` up itself, as a unikernel configures its own NIC.
    Guest,
}

/// The kind of domain the libvirt backend defines for a VM that has none yet, or the
/// accelerator the QEMU backend runs it with (`qemu`, also written `tcg`, or `kvm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainType {
    /// QEMU with TCG (software emulation): `<domain type='qemu'>`, machine `pc`.
    Qemu,
    /// QEMU with KVM: `<domain type='kvm'>`, machine `pc`.
    Kvm,
    /// A Xen PVH guest (`xenpvh`), as MirageOS 4 and Linux boot on Xen today.
    XenPvh,
    /// A Xen PV guest (`xenpv`), as older unikernels (MirageOS 2/3, Rumprun) boot.
    XenPv,
}

impl DomainType {
    /// The word used in specs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Qemu => "qemu",
            DomainType::Kvm => "kvm",
            DomainType::XenPvh => "xenpvh",
            DomainType::XenPv => "xenpv",
        }
    }
}

impl FromStr for DomainType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            // TCG is what libvirt's type 'qemu' means; the QEMU backend's own word for it.
            "qemu" | "tcg" => Ok(DomainType::Qemu),
            "kvm" => Ok(DomainType::Kvm),
            "xenpvh" => Ok(DomainType::XenPvh),
            "xenpv" => Ok(DomainType::XenPv),
            _ => Err("expected qemu (or tcg), kvm, xenpvh or xenpv".into()),
        }
    }
}

/// One of a VM's network interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The bridge it joins.
    pub bridge: String,
    /// The vif hotplug script (Xen), if not the default.
    pub script: Option<String>,
    /// Its MAC: the `mac` key's (or one derived from the VM's name) for the first, one
    /// derived from the name and the place for the others, or the domain's own once read.
    pub mac: Mac,
}

/// What backs a guest's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// An image file (libvirt `type='file'`).
    File,
    /// A block device of the host, a path under `/dev/` (libvirt `type='block'`), such as the
    /// loop devices Jitsu's README suggests.
    Block,
}

/// One `disk`: Jitsu's `<dev-or-file>@<vdev>`, attached raw (or qcow2 for a `.qcow2` file)
/// and read-write, as Jitsu's libxl backend attached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image or device, an absolute path (a relative one was resolved when read).
    pub source: PathBuf,
    /// The guest's device (`xvda`, `vdb`, `sda`, `hdc`); `None`: the next free one.
    pub vdev: Option<String>,
    /// File or block device.
    pub kind: DiskKind,
}

impl Disk {
    /// The disk's format: qcow2 for a `.qcow2` file, raw for anything else (Jitsu's only).
    pub fn format(&self) -> &'static str {
        if self.kind == DiskKind::File && self.source.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        }
    }
}

/// Extra masking conditions beyond the fixed delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// Answer when synjitsu reports the guest's own gratuitous ARP.
    Announce,
    /// Answer when the guest accepts a TCP connection on this port, probed from the host
    /// (`tcp:PORT`): for unmodified guests, without synjitsu.
    Tcp(u16),
}

/// Where queries for names outside the owned zones go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forwarders {
    /// The nameservers of `/etc/resolv.conf` (`-f ""`, the default).
    System,
    /// Nowhere: such queries are REFUSED (`-f 0.0.0.0`).
    Off,
    /// These servers, in order.
    List(Vec<IpAddr>),
}

/// A zone jitsu-dns is authoritative for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneConfig {
    /// The apex, lower-case, fully qualified.
    pub name: Name,
    /// The name served as NS (default `ns.<zone>`).
    pub ns: Name,
    /// Addresses served for the NS name when it lies inside the zone.
    pub ns_addresses: Vec<IpAddr>,
}

/// One VM, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Unique name; the key of everything else.
    pub name: Arc<str>,
    /// The names it answers to, lower-case, fully qualified.
    pub dns: Vec<Name>,
    /// The zone its names are in, if set explicitly with `zone=`.
    pub zone: Option<Name>,
    /// IPv4 address and prefix length (the prefix is used by the process backend).
    pub ip: Ipv4Addr,
    /// Prefix length of `ip`.
    pub ip_prefix: u8,
    /// IPv6 address, if any.
    pub ip6: Option<Ipv6Addr>,
    /// Prefix length of `ip6`.
    pub ip6_prefix: u8,
    /// Masking by a fixed delay after the backend started the VM.
    pub response_delay: Duration,
    /// Xenstore key whose appearance means the guest is ready (relative keys live under
    /// `/local/domain/<domid>/`).
    pub wait_for_key: Option<String>,
    /// Masking by synjitsu's report of the guest's gratuitous ARP.
    pub wait_for: Option<WaitFor>,
    /// How long `wait_for_key` / `wait_for` wait before answering anyway (for a key, the
    /// response delay follows, as in Jitsu).
    pub wait_for_timeout: Duration,
    /// Masking by synjitsu holding the SYNs.
    pub use_synjitsu: bool,
    /// A synjitsu-tracked guest that has not announced itself this long after the backend
    /// started it never came up: it is destroyed and marked failed, and the next query boots
    /// it again.
    pub boot_timeout: Duration,
    /// How the VM is stopped when idle.
    pub stop_mode: StopMode,
    /// Stopped after this long without queries or traffic; `None`: twice the TTL.
    pub idle_timeout: Option<Duration>,
    /// Never stopped for idleness (`ctl pin`/`unpin` override it, kept in the store).
    pub pin: bool,
    /// What its names get while it is drained and not running.
    pub drained: DrainedAnswer,
    /// Failed boots in a row after which queries no longer boot it until a back-off
    /// passed; `None`: every query retries (`max_boot_attempts=0`).
    pub max_boot_attempts: Option<u32>,
    /// The first back-off, doubled with each further failure up to [`MAX_BOOT_BACKOFF`].
    pub boot_backoff: Duration,
    /// How synjitsu hands over held SYNs.
    pub handover: HandoverKind,
    /// When the guest announces itself: at boot (synjitsu probes before handing over) or
    /// only once it listens (handed over at the announcement).
    pub announce: Announce,
    /// Who brings the interface up (process backend).
    pub ifup: Ifup,
    /// Default route of the guest (process backend with `ifup=jitsu`).
    pub gateway: Option<IpAddr>,
    /// Its NICs, at least one, in order. The first is the one whose `ip` is served, whose
    /// MAC synjitsu steers and idle detection counts.
    pub nics: Vec<Nic>,
    /// The command that is the VM (process backend).
    pub command: Option<String>,
    /// Kernel image (libvirt, qemu), an absolute path (a relative one was resolved when read).
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (libvirt, qemu), an absolute path (a relative one was resolved when read).
    pub initrd: Option<PathBuf>,
    /// Memory in KiB (libvirt, qemu), as Jitsu's `memory` (libxl's `max_memkb`).
    pub memory_kib: Option<u64>,
    /// Disks (libvirt), in the order given.
    pub disks: Vec<Disk>,
    /// Domain UUID (libvirt).
    pub uuid: Option<String>,
    /// Kernel command line (libvirt, qemu).
    pub cmdline: Option<String>,
    /// File the guest's serial console is written to (libvirt on QEMU, qemu), an absolute path.
    pub console_log: Option<PathBuf>,
    /// The kind of domain defined for the VM when it has none (libvirt; default from the
    /// connection's hypervisor), or its accelerator (qemu: TCG unless `kvm`).
    pub domain_type: Option<DomainType>,
    /// Rumprun's JSON configuration (libvirt, Xen), a path resolved like `kernel`'s: its
    /// content goes to the domain's Xenstore at `rumprun/cfg` before the guest runs, as in
    /// Jitsu (issue 11 item 4).
    pub rumprun_config: Option<PathBuf>,
    /// The keys as given, for the state store's `config/` subtree.
    pub raw: Vec<(String, String)>,
}

impl VmConfig {
    /// True if synjitsu is told about this VM (it masks with synjitsu or waits for its
    /// announcement).
    pub fn synjitsu_tracked(&self) -> bool {
        self.use_synjitsu || self.wait_for == Some(WaitFor::Announce)
    }

    /// The MAC of the first NIC, the guest's on the bridge where its `ip` is served: the one
    /// synjitsu steers.
    pub fn mac(&self) -> Mac {
        self.nics[0].mac
    }

    /// The bridge of the first NIC.
    pub fn nic(&self) -> &str {
        &self.nics[0].bridge
    }

    /// This VM with the MACs its domain gives its NICs, in order (a domain with fewer
    /// interfaces leaves the rest as they were; one with more says nothing of NICs the keys
    /// do not declare).
    pub fn with_macs(&self, macs: &[Mac]) -> VmConfig {
        let mut v = self.clone();
        for (nic, mac) in v.nics.iter_mut().zip(macs) {
            nic.mac = *mac;
        }
        v
    }
}

/// The whole configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address of the DNS server.
    pub bind: IpAddr,
    /// Port of the DNS server.
    pub listen: u16,
    /// Where other names go.
    pub forwarders: Forwarders,
    /// Port of the forwarders.
    pub forwarder_port: u16,
    /// Default response delay.
    pub delay: Duration,
    /// TTL of answers in seconds.
    pub ttl: u32,
    /// Default stop mode.
    pub mode: StopMode,
    /// The backend.
    pub backend: BackendKind,
    /// The backend's URI.
    pub connect: Option<String>,
    /// How the backend was chosen when `-x` did not name it outright (`-x libxl`, or the
    /// scheme of `-c`), for the log.
    pub backend_why: Option<String>,
    /// synjitsu's control socket.
    pub synjitsu: Option<PathBuf>,
    /// The state store's git repository.
    pub persistdb: Option<PathBuf>,
    /// Address of the metrics endpoint (and the status page).
    pub metrics: Option<SocketAddr>,
    /// The control socket `jitsu-dns ctl` talks to.
    pub control: PathBuf,
    /// `control` was given, so failing to bind it is fatal (the default is not).
    pub control_given: bool,
    /// The non-root uid allowed on the control socket.
    pub control_allow_uid: Option<u32>,
    /// Log filter (`info`, `debug`, or an `EnvFilter` directive).
    pub log_level: String,
    /// At most this many VMs booting or running.
    pub max_running: Option<usize>,
    /// At most this many boots per second.
    pub max_boots_per_second: Option<u32>,
    /// A reload may remove at most this share of the running configuration's VMs.
    pub max_removed_share: f64,
    /// Zones, explicit and implicit.
    pub zones: Vec<ZoneConfig>,
    /// The VMs.
    pub vms: Vec<VmConfig>,
    /// The file read, if any (re-read on SIGHUP).
    pub file: Option<PathBuf>,
    /// Clients that may use the forwarders; `None`: loopback and the networks of `bind`
    /// (which only the daemon can look up).
    pub forward_clients: Option<Vec<IpNet>>,
    /// At most this many forwarded queries in flight.
    pub forward_max: usize,
    /// At most this many DNS-over-TCP connections at once.
    pub tcp_max_clients: usize,
    /// At most this many DNS-over-TCP connections from one client.
    pub tcp_max_per_client: usize,
}

impl Config {
    /// The zone a name belongs to: the longest owned zone containing it.
    pub fn zone_of(&self, name: &Name) -> Option<&ZoneConfig> {
        self.zones
            .iter()
            .filter(|z| z.name.zone_of(name))
            .max_by_key(|z| z.name.num_labels())
    }

    /// The server's socket address.
    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.listen)
    }

    /// The configuration a reload runs with: this one (just read) with the settings that
    /// need new sockets, another backend or another store kept as `running` has them, and
    /// the names of those this one would have changed.
    pub fn for_reload(mut self, running: &Config) -> (Config, Vec<&'static str>) {
        let mut kept = Vec::new();
        macro_rules! restart_only {
            ($($setting:ident),*) => {$(
                if self.$setting != running.$setting {
                    kept.push(stringify!($setting));
                    self.$setting = running.$setting.clone();
                }
            )*};
        }
        restart_only!(
            bind,
            listen,
            backend,
            connect,
            synjitsu,
            persistdb,
            metrics,
            control,
            control_allow_uid,
            tcp_max_clients,
            tcp_max_per_client
        );
        (self, kept)
    }

    /// Refuses this configuration (just read) as a reload of `running` if it would remove
    /// more than its `max_removed_share` of the running VMs: an emptied or truncated file
    /// must not leave the fleet unmanaged. Setting the share to 1.0 says so explicitly.
    pub fn check_removals(&self, running: &Config) -> Result<(), ConfigError> {
        let removed: Vec<&str> = running
            .vms
            .iter()
            .filter(|v| !self.vms.iter().any(|n| n.name == v.name))
            .map(|v| &*v.name)
            .collect();
        let total = running.vms.len();
        if removed.is_empty() || removed.len() as f64 <= self.max_removed_share * total as f64 {
            return Ok(());
        }
        const SHOWN: usize = 10;
        let mut names = removed[..removed.len().min(SHOWN)].join(", ");
        if removed.len() > SHOWN {
            names.push_str(&format!(" and {} more", removed.len() - SHOWN));
        }
        Err(ConfigError::TooManyRemoved {
            removed: removed.len(),
            total,
            names,
            share: self.max_removed_share,
        })
    }
}
