//! Configuration: Jitsu's flags, its `name=www,dns=www.example.org,ip=10.0.0.1,...` VM specs
//! and a TOML file with the same settings, turned into typed values at start-up.
//!
//! This module owns parsing and validation only: every value is checked here, once, and a bad
//! one is refused naming where it came from (flag, spec, or file and line), the key, the value
//! and why. It does not open sockets, read `/etc/resolv.conf` or ask the backend anything.
//!
//! Precedence: a flag beats the file, the file beats the default. VMs come from both the
//! positional specs and the file's `[[vm]]` tables; a name defined twice is refused.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::Name;
use serde::Deserialize;
use shared_proto::Mac;
use toml::Spanned;

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
/// Default wait for a readiness key or a guest's announcement before answering anyway.
pub const DEFAULT_WAIT_FOR_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a synjitsu-tracked guest has to announce itself before its boot is failed.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bridge a process-backend VM joins.
pub const DEFAULT_NIC: &str = "br0";
/// Default log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Longest accepted duration value (one day): anything longer is a typo.
const MAX_SECONDS: f64 = 86_400.0;

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

/// Which backend runs the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// libvirt (issue 6).
    Libvirt,
    /// A command in a network namespace of its own.
    Process,
}

impl BackendKind {
    /// The word used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Libvirt => "libvirt",
            BackendKind::Process => "process",
        }
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "libvirt" => Ok(BackendKind::Libvirt),
            "process" => Ok(BackendKind::Process),
            _ => Err("expected libvirt or process".into()),
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

/// The kind of domain the libvirt backend defines for a VM that has none yet.
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
            "qemu" => Ok(DomainType::Qemu),
            "kvm" => Ok(DomainType::Kvm),
            "xenpvh" => Ok(DomainType::XenPvh),
            "xenpv" => Ok(DomainType::XenPv),
            _ => Err("expected qemu, kvm, xenpvh or xenpv".into()),
        }
    }
}

/// Extra masking conditions beyond the fixed delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// Answer when synjitsu reports the guest's own gratuitous ARP.
    Announce,
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
    /// The guest's MAC (default derived from the name).
    pub mac: Mac,
    /// Masking by a fixed delay after the backend started the VM.
    pub response_delay: Duration,
    /// Xenstore key whose appearance means the guest is ready (relative keys live under
    /// `/local/domain/<domid>/`).
    pub wait_for_key: Option<String>,
    /// Masking by synjitsu's report of the guest's gratuitous ARP.
    pub wait_for: Option<WaitFor>,
    /// How long `wait_for_key` / `wait_for` wait before answering anyway.
    pub wait_for_timeout: Duration,
    /// Masking by synjitsu holding the SYNs.
    pub use_synjitsu: bool,
    /// A synjitsu-tracked guest that has not announced itself this long after the backend
    /// started it never came up: it is destroyed and marked failed, and the next query boots
    /// it again.
    pub boot_timeout: Duration,
    /// How the VM is stopped when idle.
    pub stop_mode: StopMode,
    /// How synjitsu hands over held SYNs.
    pub handover: HandoverKind,
    /// Who brings the interface up (process backend).
    pub ifup: Ifup,
    /// Default route of the guest (process backend with `ifup=jitsu`).
    pub gateway: Option<IpAddr>,
    /// The bridge the VM joins.
    pub nic: String,
    /// The command that is the VM (process backend).
    pub command: Option<String>,
    /// Kernel image (libvirt), an absolute path.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (libvirt), an absolute path.
    pub initrd: Option<PathBuf>,
    /// Memory in MiB (libvirt).
    pub memory: Option<u64>,
    /// Disk images (libvirt), absolute paths.
    pub disks: Vec<PathBuf>,
    /// Domain UUID (libvirt).
    pub uuid: Option<String>,
    /// Kernel command line (libvirt).
    pub cmdline: Option<String>,
    /// File the guest's serial console is written to (libvirt, QEMU), an absolute path.
    pub console_log: Option<PathBuf>,
    /// The kind of domain defined for the VM when it has none (libvirt; default from the
    /// connection's hypervisor).
    pub domain_type: Option<DomainType>,
    /// The keys as given, for the state store's `config/` subtree.
    pub raw: Vec<(String, String)>,
}

impl VmConfig {
    /// True if synjitsu is told about this VM (it masks with synjitsu or waits for its
    /// announcement).
    pub fn synjitsu_tracked(&self) -> bool {
        self.use_synjitsu || self.wait_for == Some(WaitFor::Announce)
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
    /// synjitsu's control socket.
    pub synjitsu: Option<PathBuf>,
    /// The state store's git repository.
    pub persistdb: Option<PathBuf>,
    /// Address of the metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// Log filter (`info`, `debug`, or an `EnvFilter` directive).
    pub log_level: String,
    /// At most this many VMs booting or running.
    pub max_running: Option<usize>,
    /// At most this many boots per second.
    pub max_boots_per_second: Option<u32>,
    /// Zones, explicit and implicit.
    pub zones: Vec<ZoneConfig>,
    /// The VMs.
    pub vms: Vec<VmConfig>,
    /// The file read, if any (re-read on SIGHUP).
    pub file: Option<PathBuf>,
}

/// The command line as given: strings, validated by [`load`] so that flags, file and specs
/// share one parser and one kind of error message.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `-b/--bind`.
    pub bind: Option<String>,
    /// `-l/--listen`.
    pub listen: Option<String>,
    /// `-f/--forwarder`.
    pub forwarder: Option<String>,
    /// `-p/--forwarder-port`.
    pub forwarder_port: Option<String>,
    /// `-d/--delay`.
    pub delay: Option<String>,
    /// `-t/--ttl`.
    pub ttl: Option<String>,
    /// `-m/--mode`.
    pub mode: Option<String>,
    /// `-x/--backend`.
    pub backend: Option<String>,
    /// `-c/--connect`.
    pub connect: Option<String>,
    /// `--synjitsu`.
    pub synjitsu: Option<String>,
    /// `--persistdb`.
    pub persistdb: Option<String>,
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--metrics`.
    pub metrics: Option<String>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// `--max-running`.
    pub max_running: Option<String>,
    /// `--max-boots-per-second`.
    pub max_boots_per_second: Option<String>,
    /// Positional VM specs.
    pub specs: Vec<String>,
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag.
    Flag(&'static str),
    /// A positional VM spec (1-based), with the VM's name once known.
    Spec {
        /// 1-based position among the specs.
        index: usize,
        /// The VM's name, if the spec has one.
        vm: Option<String>,
    },
    /// A line of the configuration file, with the VM's name if inside a `[[vm]]`.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The VM's name, if inside a `[[vm]]` that has one.
        vm: Option<String>,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "flag {flag}"),
            Origin::Spec { index, vm: None } => write!(f, "VM spec {index}"),
            Origin::Spec {
                index,
                vm: Some(vm),
            } => write!(f, "VM spec {index} ({vm})"),
            Origin::File { path, line, vm } => {
                write!(f, "{} line {line}", path.display())?;
                if let Some(vm) = vm {
                    write!(f, " (vm {vm})")?;
                }
                Ok(())
            }
        }
    }
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown or mistyped setting.
    #[error("{} line {line}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A value is wrong.
    #[error("{origin}: {key} = {value:?}: {why}")]
    Invalid {
        /// Where it was given.
        origin: Box<Origin>,
        /// The key or flag.
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// A required key is absent.
    #[error("{origin}: {key} is missing: {why}")]
    Missing {
        /// Where it should have been.
        origin: Box<Origin>,
        /// The key.
        key: &'static str,
        /// Why it is needed.
        why: &'static str,
    },
}

fn invalid(origin: &Origin, key: &str, value: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: Box::new(origin.clone()),
        key: key.to_string(),
        value: value.to_string(),
        why: why.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The file.

/// The TOML file: top-level keys are the long flags with `_`, plus `[[vm]]` and `[[zone]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    bind: Option<Spanned<toml::Value>>,
    listen: Option<Spanned<toml::Value>>,
    forwarder: Option<Spanned<toml::Value>>,
    forwarder_port: Option<Spanned<toml::Value>>,
    delay: Option<Spanned<toml::Value>>,
    ttl: Option<Spanned<toml::Value>>,
    mode: Option<Spanned<toml::Value>>,
    backend: Option<Spanned<toml::Value>>,
    connect: Option<Spanned<toml::Value>>,
    synjitsu: Option<Spanned<toml::Value>>,
    persistdb: Option<Spanned<toml::Value>>,
    metrics: Option<Spanned<toml::Value>>,
    log_level: Option<Spanned<toml::Value>>,
    max_running: Option<Spanned<toml::Value>>,
    max_boots_per_second: Option<Spanned<toml::Value>>,
    #[serde(default)]
    vm: Vec<Spanned<BTreeMap<String, Spanned<toml::Value>>>>,
    #[serde(default)]
    zone: Vec<Spanned<ZoneFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ZoneFile {
    name: Spanned<String>,
    ns: Option<Spanned<String>>,
    ns_address: Option<Spanned<toml::Value>>,
}

/// A value with where it came from.
#[derive(Debug, Clone)]
struct Given {
    value: String,
    origin: Origin,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|t| t.bytes().filter(|b| *b == b'\n').count() + 1)
        .unwrap_or(1)
}

/// Renders a scalar TOML value (or an array of them, for repeatable keys) as the strings a
/// spec would carry.
fn toml_strings(v: &toml::Value) -> Result<Vec<String>, String> {
    match v {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Integer(i) => Ok(vec![i.to_string()]),
        toml::Value::Float(x) => Ok(vec![x.to_string()]),
        toml::Value::Boolean(b) => Ok(vec![b.to_string()]),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| match i {
                toml::Value::Array(_) | toml::Value::Table(_) => {
                    Err("nested arrays and tables are not accepted here".to_string())
                }
                other => toml_strings(other).map(|mut v| v.remove(0)),
            })
            .collect(),
        toml::Value::Table(_) => Err("expected a value, found a table".into()),
        toml::Value::Datetime(d) => Ok(vec![d.to_string()]),
    }
}

/// Parses a configuration file's text; `path` names it in messages.
pub fn from_toml(text: &str, path: &Path) -> Result<FileSettings, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
        message: e.message().trim().to_string(),
    })?;
    let origin = |span: std::ops::Range<usize>, vm: Option<String>| Origin::File {
        path: path.to_path_buf(),
        line: line_of(text, span.start),
        vm,
    };
    let scalar =
        |key: &str, v: &Option<Spanned<toml::Value>>| -> Result<Option<Given>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            let o = origin(v.span(), None);
            let strings = toml_strings(v.get_ref()).map_err(|why| invalid(&o, key, "", why))?;
            // A list is accepted where a flag takes a comma-separated list (forwarder).
            Ok(Some(Given {
                value: strings.join(","),
                origin: o,
            }))
        };
    let mut given: HashMap<&'static str, Given> = HashMap::new();
    for (key, v) in [
        ("bind", &file.bind),
        ("listen", &file.listen),
        ("forwarder", &file.forwarder),
        ("forwarder_port", &file.forwarder_port),
        ("delay", &file.delay),
        ("ttl", &file.ttl),
        ("mode", &file.mode),
        ("backend", &file.backend),
        ("connect", &file.connect),
        ("synjitsu", &file.synjitsu),
        ("persistdb", &file.persistdb),
        ("metrics", &file.metrics),
        ("log_level", &file.log_level),
        ("max_running", &file.max_running),
        ("max_boots_per_second", &file.max_boots_per_second),
    ] {
        if let Some(g) = scalar(key, v)? {
            given.insert(key, g);
        }
    }
    let mut vms = Vec::new();
    for table in &file.vm {
        let name = table
            .get_ref()
            .get("name")
            .and_then(|v| v.get_ref().as_str())
            .map(str::to_string);
        let mut entries = Vec::new();
        for (key, v) in table.get_ref() {
            let o = origin(v.span(), name.clone());
            let strings = toml_strings(v.get_ref()).map_err(|why| invalid(&o, key, "", why))?;
            for value in strings {
                entries.push(Entry {
                    key: key.clone(),
                    value,
                    origin: o.clone(),
                });
            }
        }
        entries.push(Entry {
            key: TABLE_MARK.into(),
            value: String::new(),
            origin: origin(table.span(), name),
        });
        vms.push(entries);
    }
    let mut zones = Vec::new();
    for z in &file.zone {
        let z = z.get_ref();
        let mut entries = vec![Entry {
            key: "name".into(),
            value: z.name.get_ref().clone(),
            origin: origin(z.name.span(), None),
        }];
        if let Some(ns) = &z.ns {
            entries.push(Entry {
                key: "ns".into(),
                value: ns.get_ref().clone(),
                origin: origin(ns.span(), None),
            });
        }
        if let Some(a) = &z.ns_address {
            let o = origin(a.span(), None);
            for value in
                toml_strings(a.get_ref()).map_err(|why| invalid(&o, "ns_address", "", why))?
            {
                entries.push(Entry {
                    key: "ns_address".into(),
                    value,
                    origin: o.clone(),
                });
            }
        }
        zones.push(entries);
    }
    let get = |k: &str| given.get(k).map(|g| g.value.clone());
    // The file's scalar settings travel as flags, with their lines kept for messages.
    let flags = Flags {
        bind: get("bind"),
        listen: get("listen"),
        forwarder: get("forwarder"),
        forwarder_port: get("forwarder_port"),
        delay: get("delay"),
        ttl: get("ttl"),
        mode: get("mode"),
        backend: get("backend"),
        connect: get("connect"),
        synjitsu: get("synjitsu"),
        persistdb: get("persistdb"),
        config: None,
        metrics: get("metrics"),
        log_level: get("log_level"),
        max_running: get("max_running"),
        max_boots_per_second: get("max_boots_per_second"),
        specs: Vec::new(),
    };
    // Zones ride along as entry lists marked by a first `ZONE_MARK` entry.
    let mut tables = vms;
    for mut z in zones {
        let origin = z[0].origin.clone();
        z.insert(
            0,
            Entry {
                key: ZONE_MARK.into(),
                value: String::new(),
                origin,
            },
        );
        tables.push(z);
    }
    Ok(FileSettings {
        flags,
        origins: given.into_iter().map(|(k, g)| (k, g.origin)).collect(),
        tables,
        path: path.to_path_buf(),
    })
}

/// A parsed configuration file, not yet merged with the flags.
#[derive(Debug, Clone)]
pub struct FileSettings {
    /// The top-level settings, as flags would carry them.
    flags: Flags,
    /// Where each top-level setting is in the file.
    origins: HashMap<&'static str, Origin>,
    /// `[[vm]]` and `[[zone]]` tables as entries.
    tables: Vec<Vec<Entry>>,
    /// The file.
    path: PathBuf,
}

/// Reads and parses a configuration file.
pub fn read(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    from_toml(&text, path)
}

const TABLE_MARK: &str = "\u{0}table";
const ZONE_MARK: &str = "\u{0}zone";

/// One `key=value` of a VM spec or `[[vm]]` table, with its origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value, unquoted.
    pub value: String,
    /// Where it was given.
    pub origin: Origin,
}

/// Splits a spec `name=www,dns=www.example.org,...` into entries. Commas inside single or
/// double quotes do not split, and a value wholly inside quotes loses them, so
/// `command="sleep 1, then more"` and `command=sh -c 'a, b'` both work.
pub fn parse_spec(text: &str, index: usize) -> Result<Vec<Entry>, ConfigError> {
    let origin = Origin::Spec { index, vm: None };
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match (quote, c) {
            (None, ',') => parts.push(std::mem::take(&mut cur)),
            (None, '\'' | '"') => {
                quote = Some(c);
                cur.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                cur.push(c);
            }
            _ => cur.push(c),
        }
    }
    if quote.is_some() {
        return Err(invalid(&origin, "spec", text, "unterminated quote"));
    }
    parts.push(cur);
    let mut entries = Vec::new();
    for part in parts {
        if part.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = part.split_once('=') else {
            return Err(invalid(
                &origin,
                part.trim(),
                "",
                "expected key=value (specs look like name=www,dns=www.example.org,ip=10.0.0.1)",
            ));
        };
        let key = key.trim();
        let mut value = value.trim();
        for q in ['"', '\''] {
            if value.len() >= 2 && value.starts_with(q) && value.ends_with(q) {
                value = &value[1..value.len() - 1];
            }
        }
        entries.push(Entry {
            key: key.to_string(),
            value: value.to_string(),
            origin: origin.clone(),
        });
    }
    let name = entries
        .iter()
        .find(|e| e.key == "name")
        .map(|e| e.value.clone());
    for e in &mut entries {
        e.origin = Origin::Spec {
            index,
            vm: name.clone(),
        };
    }
    Ok(entries)
}

// ---------------------------------------------------------------------------------------------
// Values.

fn parse_seconds(origin: &Origin, key: &str, v: &str) -> Result<Duration, ConfigError> {
    let x: f64 = v
        .trim_end_matches('s')
        .parse()
        .map_err(|_| invalid(origin, key, v, "expected a number of seconds, e.g. 0.1"))?;
    if !x.is_finite() || x < 0.0 {
        return Err(invalid(origin, key, v, "must be zero or more seconds"));
    }
    if x > MAX_SECONDS {
        return Err(invalid(origin, key, v, "must be at most one day (86400 s)"));
    }
    Ok(Duration::from_secs_f64(x))
}

fn parse_positive_seconds(origin: &Origin, key: &str, v: &str) -> Result<Duration, ConfigError> {
    let t = parse_seconds(origin, key, v)?;
    if t.is_zero() {
        return Err(invalid(origin, key, v, "must be more than zero"));
    }
    Ok(t)
}

fn parse_bool(origin: &Origin, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(invalid(origin, key, v, "expected true or false")),
    }
}

fn parse_u64(origin: &Origin, key: &str, v: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    let n: u64 = v
        .parse()
        .map_err(|_| invalid(origin, key, v, "expected a whole number"))?;
    if n < min || n > max {
        return Err(invalid(
            origin,
            key,
            v,
            format!("must be between {min} and {max}"),
        ));
    }
    Ok(n)
}

fn split_prefix<'a>(
    origin: &Origin,
    key: &str,
    v: &'a str,
    max: u8,
    default: u8,
) -> Result<(&'a str, u8), ConfigError> {
    match v.split_once('/') {
        None => Ok((v, default)),
        Some((addr, p)) => {
            let p: u8 = p
                .parse()
                .ok()
                .filter(|p| (1..=max).contains(p))
                .ok_or_else(|| {
                    invalid(origin, key, v, format!("prefix length must be 1 to {max}"))
                })?;
            Ok((addr, p))
        }
    }
}

fn parse_ipv4(origin: &Origin, key: &str, v: &str) -> Result<(Ipv4Addr, u8), ConfigError> {
    let (addr, prefix) = split_prefix(origin, key, v, 32, 24)?;
    let ip: Ipv4Addr = addr.parse().map_err(|_| {
        invalid(
            origin,
            key,
            v,
            "not an IPv4 address (like 10.0.0.1 or 10.0.0.1/24)",
        )
    })?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
        return Err(invalid(origin, key, v, "cannot be a guest's address"));
    }
    Ok((ip, prefix))
}

fn parse_ipv6(origin: &Origin, key: &str, v: &str) -> Result<(Ipv6Addr, u8), ConfigError> {
    let (addr, prefix) = split_prefix(origin, key, v, 128, 64)?;
    let ip: Ipv6Addr = addr.parse().map_err(|_| {
        invalid(
            origin,
            key,
            v,
            "not an IPv6 address (like fd00::1 or fd00::1/64)",
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(invalid(origin, key, v, "cannot be a guest's address"));
    }
    Ok((ip, prefix))
}

/// A lower-case, fully qualified name with at least two labels (so it has a parent zone).
fn parse_dns_name(origin: &Origin, key: &str, v: &str) -> Result<Name, ConfigError> {
    if v.contains('*') {
        return Err(invalid(origin, key, v, "wildcards are not supported"));
    }
    let valid_chars = v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !valid_chars {
        return Err(invalid(
            origin,
            key,
            v,
            "not a domain name: use letters, digits, '-', '_' and '.'",
        ));
    }
    let mut name = Name::from_ascii(v)
        .map_err(|e| invalid(origin, key, v, format!("not a domain name: {e}")))?
        .to_lowercase();
    name.set_fqdn(true);
    Ok(name)
}

fn parse_vm_dns_name(origin: &Origin, key: &str, v: &str) -> Result<Name, ConfigError> {
    let name = parse_dns_name(origin, key, v)?;
    if name.num_labels() < 2 {
        return Err(invalid(
            origin,
            key,
            v,
            "needs at least two labels (like www.example.org) so that it lies in a zone",
        ));
    }
    Ok(name)
}

fn is_xenstore_path(p: &str) -> bool {
    !p.is_empty()
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_@-".contains(&b))
        && !p.contains("//")
        && !p.ends_with('/')
}

fn is_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Keys every VM accepts.
const COMMON_KEYS: &[&str] = &[
    "name",
    "dns",
    "zone",
    "ip",
    "ip6",
    "mac",
    "response_delay",
    "wait_for_key",
    "wait_for",
    "wait_for_timeout",
    "boot_timeout",
    "use_synjitsu",
    "stop_mode",
    "handover",
    "nic",
];
/// Keys only the process backend uses.
const PROCESS_KEYS: &[&str] = &["command", "ifup", "gateway"];
/// Keys only the libvirt backend uses.
const LIBVIRT_KEYS: &[&str] = &[
    "kernel",
    "initrd",
    "memory",
    "disk",
    "uuid",
    "cmdline",
    "console_log",
    "domain_type",
];
/// Keys that may be given more than once.
const REPEATABLE: &[&str] = &["dns", "disk"];

/// Defaults a VM inherits from the global settings.
#[derive(Debug, Clone, Copy)]
struct VmDefaults {
    delay: Duration,
    mode: StopMode,
    backend: BackendKind,
}

fn build_vm(entries: &[Entry], d: VmDefaults) -> Result<VmConfig, ConfigError> {
    let table_origin = entries
        .iter()
        .find(|e| e.key == TABLE_MARK)
        .map(|e| e.origin.clone());
    let entries: Vec<&Entry> = entries.iter().filter(|e| e.key != TABLE_MARK).collect();
    let whole = table_origin
        .clone()
        .or_else(|| entries.first().map(|e| e.origin.clone()))
        .unwrap_or(Origin::Spec { index: 0, vm: None });
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for e in &entries {
        let known = COMMON_KEYS.contains(&e.key.as_str())
            || PROCESS_KEYS.contains(&e.key.as_str())
            || LIBVIRT_KEYS.contains(&e.key.as_str());
        if !known {
            return Err(invalid(
                &e.origin,
                &e.key,
                &e.value,
                "unknown key; VMs take name, dns, ip, ip6, mac, response_delay, wait_for_key, \
                 wait_for, wait_for_timeout, boot_timeout, use_synjitsu, stop_mode, handover, \
                 zone, nic, and for the process backend command, ifup, gateway, for libvirt \
                 kernel, initrd, memory, disk, uuid, cmdline, console_log, domain_type",
            ));
        }
        let (wrong, right) = match d.backend {
            BackendKind::Process => (LIBVIRT_KEYS, "libvirt"),
            BackendKind::Libvirt => (PROCESS_KEYS, "process"),
        };
        if wrong.contains(&e.key.as_str()) {
            return Err(invalid(
                &e.origin,
                &e.key,
                &e.value,
                format!(
                    "this key is for the {right} backend; the {} backend does not use it",
                    d.backend.as_str()
                ),
            ));
        }
        if !seen.insert(e.key.as_str()) && !REPEATABLE.contains(&e.key.as_str()) {
            return Err(invalid(&e.origin, &e.key, &e.value, "given twice"));
        }
    }
    let get = |k: &str| entries.iter().find(|e| e.key == k).copied();
    let name_entry = get("name").ok_or(ConfigError::Missing {
        origin: Box::new(whole.clone()),
        key: "name",
        why: "every VM needs a name",
    })?;
    if !shared_proto::vm::is_valid_name(&name_entry.value) {
        return Err(invalid(
            &name_entry.origin,
            "name",
            &name_entry.value,
            format!(
                "use 1 to {} characters from A-Z a-z 0-9 . _ -",
                shared_proto::vm::MAX_NAME_LEN
            ),
        ));
    }
    let name: Arc<str> = Arc::from(name_entry.value.as_str());
    let dns = entries
        .iter()
        .filter(|e| e.key == "dns")
        .map(|e| parse_vm_dns_name(&e.origin, "dns", &e.value))
        .collect::<Result<Vec<_>, _>>()?;
    if dns.is_empty() {
        return Err(ConfigError::Missing {
            origin: Box::new(whole.clone()),
            key: "dns",
            why: "every VM needs at least one name to answer to",
        });
    }
    let ip_entry = get("ip").ok_or(ConfigError::Missing {
        origin: Box::new(whole.clone()),
        key: "ip",
        why: "every VM needs an IPv4 address",
    })?;
    let (ip, ip_prefix) = parse_ipv4(&ip_entry.origin, "ip", &ip_entry.value)?;
    let (ip6, ip6_prefix) = match get("ip6") {
        Some(e) => {
            let (a, p) = parse_ipv6(&e.origin, "ip6", &e.value)?;
            (Some(a), p)
        }
        None => (None, 64),
    };
    let mac = match get("mac") {
        Some(e) => {
            let m: Mac = e
                .value
                .parse()
                .map_err(|err: shared_proto::MacParseError| {
                    invalid(&e.origin, "mac", &e.value, err.to_string())
                })?;
            if m.is_multicast() || m == Mac::ZERO {
                return Err(invalid(
                    &e.origin,
                    "mac",
                    &e.value,
                    "a guest's MAC must be unicast and not all zeros",
                ));
            }
            m
        }
        None => Mac::derived_from(name.as_bytes()),
    };
    let response_delay = match get("response_delay") {
        Some(e) => parse_seconds(&e.origin, "response_delay", &e.value)?,
        None => d.delay,
    };
    let wait_for_key = match get("wait_for_key") {
        Some(e) => {
            if !is_xenstore_path(&e.value) {
                return Err(invalid(
                    &e.origin,
                    "wait_for_key",
                    &e.value,
                    "not a Xenstore path: use A-Z a-z 0-9 / _ @ -",
                ));
            }
            if d.backend == BackendKind::Process && !e.value.starts_with('/') {
                return Err(invalid(
                    &e.origin,
                    "wait_for_key",
                    &e.value,
                    "a relative key lives under /local/domain/<domid>/, and the process backend \
                     has no Xen domain ids: give an absolute path",
                ));
            }
            Some(e.value.clone())
        }
        None => None,
    };
    let wait_for = match get("wait_for") {
        Some(e) if e.value == "announce" => Some(WaitFor::Announce),
        Some(e) => {
            return Err(invalid(
                &e.origin,
                "wait_for",
                &e.value,
                "the only value is announce (answer when synjitsu sees the guest's own \
                 gratuitous ARP)",
            ));
        }
        None => None,
    };
    let wait_for_timeout = match get("wait_for_timeout") {
        Some(e) => parse_positive_seconds(&e.origin, "wait_for_timeout", &e.value)?,
        None => DEFAULT_WAIT_FOR_TIMEOUT,
    };
    let boot_timeout = match get("boot_timeout") {
        Some(e) => parse_positive_seconds(&e.origin, "boot_timeout", &e.value)?,
        None => DEFAULT_BOOT_TIMEOUT,
    };
    let use_synjitsu = match get("use_synjitsu") {
        Some(e) => parse_bool(&e.origin, "use_synjitsu", &e.value)?,
        None => false,
    };
    let stop_mode = match get("stop_mode") {
        Some(e) => e
            .value
            .parse()
            .map_err(|why: String| invalid(&e.origin, "stop_mode", &e.value, why))?,
        None => d.mode,
    };
    let handover = match get("handover") {
        Some(e) => match e.value.as_str() {
            "wire" => HandoverKind::Wire,
            "xenstore" if d.backend == BackendKind::Process => {
                return Err(invalid(
                    &e.origin,
                    "handover",
                    &e.value,
                    "xenstore hand-over needs a Xen domain id, and the process backend has none",
                ));
            }
            "xenstore" => HandoverKind::Xenstore,
            _ => {
                return Err(invalid(
                    &e.origin,
                    "handover",
                    &e.value,
                    "expected wire or xenstore",
                ));
            }
        },
        None => HandoverKind::Wire,
    };
    let ifup = match get("ifup") {
        Some(e) => match e.value.as_str() {
            "jitsu" => Ifup::Jitsu,
            "guest" => Ifup::Guest,
            _ => {
                return Err(invalid(
                    &e.origin,
                    "ifup",
                    &e.value,
                    "expected jitsu or guest",
                ));
            }
        },
        None => Ifup::Jitsu,
    };
    let gateway = match get("gateway") {
        Some(e) => Some(
            e.value
                .parse::<IpAddr>()
                .map_err(|_| invalid(&e.origin, "gateway", &e.value, "not an IP address"))?,
        ),
        None => None,
    };
    let nic = match get("nic") {
        Some(e) if is_ifname(&e.value) => e.value.clone(),
        Some(e) => {
            return Err(invalid(
                &e.origin,
                "nic",
                &e.value,
                "not an interface name (1 to 15 characters from A-Z a-z 0-9 - _ .)",
            ));
        }
        None => DEFAULT_NIC.to_string(),
    };
    let command = match get("command") {
        Some(e) if e.value.trim().is_empty() => {
            return Err(invalid(&e.origin, "command", &e.value, "must not be empty"));
        }
        Some(e) => Some(e.value.clone()),
        None if d.backend == BackendKind::Process => {
            return Err(ConfigError::Missing {
                origin: Box::new(whole.clone()),
                key: "command",
                why: "the process backend runs each VM as its command",
            });
        }
        None => None,
    };
    let zone = match get("zone") {
        Some(e) => {
            let z = parse_dns_name(&e.origin, "zone", &e.value)?;
            if let Some(outside) = dns.iter().find(|n| !z.zone_of(n)) {
                return Err(invalid(
                    &e.origin,
                    "zone",
                    &e.value,
                    format!("the VM's name {outside} is not inside this zone"),
                ));
            }
            Some(z)
        }
        None => None,
    };
    // libvirtd (or QEMU, as another user, in another directory) opens these: a relative path
    // would name another file there.
    let absolute = |e: &Entry| -> Result<PathBuf, ConfigError> {
        if e.value.starts_with('/') {
            Ok(PathBuf::from(&e.value))
        } else {
            Err(invalid(
                &e.origin,
                &e.key,
                &e.value,
                "must be an absolute path (libvirt opens it, not jitsu-dns)",
            ))
        }
    };
    let kernel = get("kernel").map(absolute).transpose()?;
    let initrd = get("initrd").map(absolute).transpose()?;
    let console_log = get("console_log").map(absolute).transpose()?;
    let memory = match get("memory") {
        Some(e) => Some(parse_u64(&e.origin, "memory", &e.value, 1, 1 << 24)?),
        None => None,
    };
    let disks = entries
        .iter()
        .filter(|e| e.key == "disk")
        .map(|e| absolute(e))
        .collect::<Result<Vec<_>, _>>()?;
    let domain_type = match get("domain_type") {
        Some(e) => Some(
            e.value
                .parse()
                .map_err(|why: String| invalid(&e.origin, "domain_type", &e.value, why))?,
        ),
        None => None,
    };
    let uuid = match get("uuid") {
        Some(e) if is_uuid(&e.value) => Some(e.value.to_ascii_lowercase()),
        Some(e) => {
            return Err(invalid(
                &e.origin,
                "uuid",
                &e.value,
                "not a UUID (like 4dea22b3-1d52-d8f3-2516-782e98ab3fa0)",
            ));
        }
        None => None,
    };
    let cmdline = get("cmdline").map(|e| e.value.clone());
    let raw = entries
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    Ok(VmConfig {
        name,
        dns,
        zone,
        ip,
        ip_prefix,
        ip6,
        ip6_prefix,
        mac,
        response_delay,
        wait_for_key,
        wait_for,
        wait_for_timeout,
        boot_timeout,
        use_synjitsu,
        stop_mode,
        handover,
        ifup,
        gateway,
        nic,
        command,
        kernel,
        initrd,
        memory,
        disks,
        uuid,
        cmdline,
        console_log,
        domain_type,
        raw,
    })
}

fn build_zone(entries: &[Entry], bind: IpAddr) -> Result<ZoneConfig, ConfigError> {
    let mut name = None;
    let mut ns = None;
    let mut ns_addresses = Vec::new();
    for e in entries {
        match e.key.as_str() {
            "name" => name = Some((parse_dns_name(&e.origin, "name", &e.value)?, e)),
            "ns" => ns = Some(parse_dns_name(&e.origin, "ns", &e.value)?),
            "ns_address" => ns_addresses.push(
                e.value
                    .parse::<IpAddr>()
                    .map_err(|_| invalid(&e.origin, "ns_address", &e.value, "not an IP address"))?,
            ),
            _ => {}
        }
    }
    let (name, e) = name.expect("a [[zone]] always has a name (serde requires it)");
    if name.is_root() {
        return Err(invalid(
            &e.origin,
            "name",
            &e.value,
            "jitsu-dns does not serve the root zone",
        ));
    }
    Ok(zone_with_defaults(name, ns, ns_addresses, bind))
}

fn zone_with_defaults(
    name: Name,
    ns: Option<Name>,
    mut ns_addresses: Vec<IpAddr>,
    bind: IpAddr,
) -> ZoneConfig {
    let ns = ns.unwrap_or_else(|| {
        name.prepend_label("ns")
            .expect("a zone of a valid VM name has room for one more label")
    });
    if ns_addresses.is_empty() && !bind.is_unspecified() && name.zone_of(&ns) {
        // The server's own address is the best answer for its own name.
        ns_addresses.push(bind);
    }
    ZoneConfig {
        name,
        ns,
        ns_addresses,
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Reads the file named by `flags.config` (if any), merges it under the flags, and validates
/// everything.
pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
    let file = match &flags.config {
        Some(path) => Some(read(path)?),
        None => None,
    };
    merge(flags, file.as_ref())
}

/// Merges a parsed file (if any) under `flags` and validates everything.
pub fn merge(flags: &Flags, file: Option<&FileSettings>) -> Result<Config, ConfigError> {
    let empty = (Flags::default(), HashMap::new(), Vec::new());
    let (file_flags, origins, tables) = match file {
        Some(f) => (&f.flags, &f.origins, &f.tables[..]),
        None => (&empty.0, &empty.1, &empty.2[..]),
    };
    let mut cfg = build(flags, file_flags, tables, origins)?;
    cfg.file = file.map(|f| f.path.clone());
    Ok(cfg)
}

fn build(
    flags: &Flags,
    file: &Flags,
    tables: &[Vec<Entry>],
    file_origins: &HashMap<&'static str, Origin>,
) -> Result<Config, ConfigError> {
    // A setting comes from the flag if given, else from the file (with its line), else None.
    let pick = |flag: &Option<String>,
                from_file: &Option<String>,
                flag_name: &'static str,
                key: &'static str|
     -> Option<(String, Origin)> {
        match (flag, from_file) {
            (Some(v), _) => Some((v.clone(), Origin::Flag(flag_name))),
            (None, Some(v)) => Some((
                v.clone(),
                file_origins
                    .get(key)
                    .cloned()
                    .unwrap_or(Origin::Flag(flag_name)),
            )),
            (None, None) => None,
        }
    };

    let bind = match pick(&flags.bind, &file.bind, "--bind", "bind") {
        Some((v, o)) => v
            .parse::<IpAddr>()
            .map_err(|_| invalid(&o, "bind", &v, "not an IP address"))?,
        None => DEFAULT_BIND,
    };
    let listen = match pick(&flags.listen, &file.listen, "--listen", "listen") {
        Some((v, o)) => parse_u64(&o, "listen", &v, 1, 65535)? as u16,
        None => DEFAULT_LISTEN,
    };
    let forwarders = match pick(
        &flags.forwarder,
        &file.forwarder,
        "--forwarder",
        "forwarder",
    ) {
        None => Forwarders::System,
        Some((v, _)) if v.trim().is_empty() => Forwarders::System,
        Some((v, o)) => {
            let list = v
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse::<IpAddr>()
                        .map_err(|_| invalid(&o, "forwarder", &v, "not an IP address (or a comma-separated list of them; 0.0.0.0 turns forwarding off, empty uses /etc/resolv.conf)"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if list.iter().all(IpAddr::is_unspecified) {
                Forwarders::Off
            } else if list.iter().any(IpAddr::is_unspecified) {
                return Err(invalid(
                    &o,
                    "forwarder",
                    &v,
                    "0.0.0.0 (no forwarding) cannot be mixed with servers",
                ));
            } else {
                Forwarders::List(list)
            }
        }
    };
    let forwarder_port = match pick(
        &flags.forwarder_port,
        &file.forwarder_port,
        "--forwarder-port",
        "forwarder_port",
    ) {
        Some((v, o)) => parse_u64(&o, "forwarder_port", &v, 1, 65535)? as u16,
        None => DEFAULT_FORWARDER_PORT,
    };
    let delay = match pick(&flags.delay, &file.delay, "--delay", "delay") {
        Some((v, o)) => parse_seconds(&o, "delay", &v)?,
        None => DEFAULT_DELAY,
    };
    let ttl = match pick(&flags.ttl, &file.ttl, "--ttl", "ttl") {
        // RFC 2181: TTLs are at most 2^31 - 1.
        Some((v, o)) => parse_u64(&o, "ttl", &v, 1, (1 << 31) - 1)? as u32,
        None => DEFAULT_TTL,
    };
    let mode = match pick(&flags.mode, &file.mode, "--mode", "mode") {
        Some((v, o)) => v
            .parse()
            .map_err(|why: String| invalid(&o, "mode", &v, why))?,
        None => StopMode::Destroy,
    };
    let backend = match pick(&flags.backend, &file.backend, "--backend", "backend") {
        Some((v, o)) => v
            .parse()
            .map_err(|why: String| invalid(&o, "backend", &v, why))?,
        // The process backend is the one that works everywhere; libvirt is chosen explicitly.
        None => BackendKind::Process,
    };
    let connect = pick(&flags.connect, &file.connect, "--connect", "connect").map(|(v, _)| v);
    let synjitsu = match pick(&flags.synjitsu, &file.synjitsu, "--synjitsu", "synjitsu") {
        Some((v, o)) if v.is_empty() => {
            return Err(invalid(
                &o,
                "synjitsu",
                &v,
                "expected the path of synjitsu's control socket",
            ));
        }
        Some((v, _)) => Some(PathBuf::from(v)),
        None => None,
    };
    let persistdb = match pick(
        &flags.persistdb,
        &file.persistdb,
        "--persistdb",
        "persistdb",
    ) {
        Some((v, o)) if v.is_empty() => {
            return Err(invalid(&o, "persistdb", &v, "expected a directory"));
        }
        Some((v, _)) => Some(PathBuf::from(v)),
        None => None,
    };
    let metrics = match pick(&flags.metrics, &file.metrics, "--metrics", "metrics") {
        Some((v, o)) => Some(v.parse::<SocketAddr>().map_err(|_| {
            invalid(
                &o,
                "metrics",
                &v,
                "expected address:port, like 127.0.0.1:9153",
            )
        })?),
        None => None,
    };
    let log_level = pick(
        &flags.log_level,
        &file.log_level,
        "--log-level",
        "log_level",
    )
    .map(|(v, _)| v)
    .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
    let max_running = match pick(
        &flags.max_running,
        &file.max_running,
        "--max-running",
        "max_running",
    ) {
        Some((v, o)) => Some(parse_u64(&o, "max_running", &v, 1, 1 << 20)? as usize),
        None => None,
    };
    let max_boots_per_second = match pick(
        &flags.max_boots_per_second,
        &file.max_boots_per_second,
        "--max-boots-per-second",
        "max_boots_per_second",
    ) {
        Some((v, o)) => Some(parse_u64(&o, "max_boots_per_second", &v, 1, 1 << 20)? as u32),
        None => None,
    };

    let defaults = VmDefaults {
        delay,
        mode,
        backend,
    };
    let mut vms = Vec::new();
    let mut explicit_zones = Vec::new();
    for (i, spec) in flags.specs.iter().enumerate() {
        let entries = parse_spec(spec, i + 1)?;
        vms.push((build_vm(&entries, defaults)?, entries));
    }
    for t in tables {
        if t.first().map(|e| e.key.as_str()) == Some(ZONE_MARK) {
            explicit_zones.push((build_zone(&t[1..], bind)?, t[1].origin.clone()));
        } else {
            vms.push((build_vm(t, defaults)?, t.clone()));
        }
    }

    // Names, addresses and MACs identify a VM on the bridge and in DNS: no two may share one.
    let mut names: HashSet<Arc<str>> = HashSet::new();
    let mut dns_owner: HashMap<Name, Arc<str>> = HashMap::new();
    let mut ip_owner: HashMap<IpAddr, Arc<str>> = HashMap::new();
    let mut mac_owner: HashMap<Mac, Arc<str>> = HashMap::new();
    for (vm, entries) in &vms {
        let at = |key: &str| {
            entries
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.origin.clone())
                .unwrap_or(Origin::Spec { index: 0, vm: None })
        };
        if !names.insert(vm.name.clone()) {
            return Err(invalid(
                &at("name"),
                "name",
                &vm.name,
                "another VM has this name",
            ));
        }
        for n in &vm.dns {
            if let Some(other) = dns_owner.insert(n.clone(), vm.name.clone()) {
                return Err(invalid(
                    &at("dns"),
                    "dns",
                    &n.to_string(),
                    format!("VM {other} already answers to this name"),
                ));
            }
        }
        let mut addrs = vec![IpAddr::V4(vm.ip)];
        addrs.extend(vm.ip6.map(IpAddr::V6));
        for a in addrs {
            if let Some(other) = ip_owner.insert(a, vm.name.clone()) {
                let key = if a.is_ipv4() { "ip" } else { "ip6" };
                return Err(invalid(
                    &at(key),
                    key,
                    &a.to_string(),
                    format!("VM {other} has this address"),
                ));
            }
        }
        if let Some(other) = mac_owner.insert(vm.mac, vm.name.clone()) {
            return Err(invalid(
                &at("mac"),
                "mac",
                &vm.mac.to_string(),
                format!("VM {other} has this MAC"),
            ));
        }
    }
    let mut seen_zone = BTreeSet::new();
    for (z, origin) in &explicit_zones {
        if !seen_zone.insert(z.name.clone()) {
            return Err(invalid(
                origin,
                "name",
                &z.name.to_string(),
                "zone defined twice",
            ));
        }
    }
    let zones = zones_for(
        explicit_zones.into_iter().map(|(z, _)| z).collect(),
        vms.iter().map(|(v, _)| v),
        bind,
    );

    Ok(Config {
        bind,
        listen,
        forwarders,
        forwarder_port,
        delay,
        ttl,
        mode,
        backend,
        connect,
        synjitsu,
        persistdb,
        metrics,
        log_level,
        max_running,
        max_boots_per_second,
        zones,
        vms: vms.into_iter().map(|(v, _)| v).collect(),
        file: None,
    })
}

/// The zones served: the explicit ones, each VM's `zone=`, and for other names their parent
/// (`www.example.org` -> `example.org`). An implicit zone inside another zone is folded into
/// it, so `a.www.example.org` and `www.example.org` share `example.org`.
fn zones_for<'a>(
    explicit: Vec<ZoneConfig>,
    vms: impl Iterator<Item = &'a VmConfig>,
    bind: IpAddr,
) -> Vec<ZoneConfig> {
    let mut zones = explicit;
    let mut implicit: BTreeSet<Name> = BTreeSet::new();
    for vm in vms {
        if let Some(z) = &vm.zone {
            if !zones.iter().any(|e| &e.name == z) {
                zones.push(zone_with_defaults(z.clone(), None, Vec::new(), bind));
            }
            continue;
        }
        for n in &vm.dns {
            if !zones.iter().any(|z| z.name.zone_of(n)) {
                implicit.insert(n.base_name());
            }
        }
    }
    let all: Vec<Name> = implicit.iter().cloned().collect();
    for z in &implicit {
        let inside_other =
            all.iter().any(|o| o != z && o.zone_of(z)) || zones.iter().any(|e| e.name.zone_of(z));
        if !inside_other {
            zones.push(zone_with_defaults(z.clone(), None, Vec::new(), bind));
        }
    }
    zones
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(specs: &[&str]) -> Flags {
        Flags {
            specs: specs.iter().map(|s| s.to_string()).collect(),
            ..Flags::default()
        }
    }

    fn www() -> &'static str {
        "name=www,dns=www.example.org,ip=10.0.0.1,command=sleep 100"
    }

    fn err(f: &Flags) -> String {
        build(f, &Flags::default(), &[], &HashMap::new())
            .unwrap_err()
            .to_string()
    }

    fn ok(f: &Flags) -> Config {
        build(f, &Flags::default(), &[], &HashMap::new()).unwrap()
    }

    #[test]
    fn defaults_are_jitsus() {
        let c = ok(&flags(&[www()]));
        assert_eq!(c.bind, DEFAULT_BIND);
        assert_eq!(c.listen, 53);
        assert_eq!(c.forwarders, Forwarders::System);
        assert_eq!(c.forwarder_port, 53);
        assert_eq!(c.delay, Duration::from_millis(100));
        assert_eq!(c.ttl, 60);
        assert_eq!(c.mode, StopMode::Destroy);
        assert_eq!(c.backend, BackendKind::Process);
        let vm = &c.vms[0];
        assert_eq!(&*vm.name, "www");
        assert_eq!(vm.dns, vec![Name::from_ascii("www.example.org.").unwrap()]);
        assert_eq!((vm.ip, vm.ip_prefix), ("10.0.0.1".parse().unwrap(), 24));
        assert_eq!(vm.mac, Mac::derived_from(b"www"));
        assert_eq!(vm.response_delay, Duration::from_millis(100));
        assert_eq!(vm.stop_mode, StopMode::Destroy);
        assert_eq!(vm.handover, HandoverKind::Wire);
        assert_eq!(vm.ifup, Ifup::Jitsu);
        assert_eq!(vm.nic, "br0");
        assert_eq!(vm.wait_for_timeout, DEFAULT_WAIT_FOR_TIMEOUT);
        assert_eq!(vm.boot_timeout, DEFAULT_BOOT_TIMEOUT);
        assert!(!vm.use_synjitsu && vm.wait_for.is_none() && vm.wait_for_key.is_none());
        assert_eq!(c.zones.len(), 1);
        assert_eq!(c.zones[0].name, Name::from_ascii("example.org.").unwrap());
        assert_eq!(c.zones[0].ns, Name::from_ascii("ns.example.org.").unwrap());
        assert_eq!(c.zones[0].ns_addresses, vec![DEFAULT_BIND]);
    }

    #[test]
    fn every_flag_is_parsed() {
        let f = Flags {
            bind: Some("10.9.0.1".into()),
            listen: Some("5353".into()),
            forwarder: Some("9.9.9.9,1.1.1.1".into()),
            forwarder_port: Some("5300".into()),
            delay: Some("0.25".into()),
            ttl: Some("1".into()),
            mode: Some("suspend".into()),
            backend: Some("process".into()),
            connect: Some("process:///tmp/x?netns_prefix=t-".into()),
            synjitsu: Some("/run/synjitsu.sock".into()),
            persistdb: Some("/var/lib/jitsu".into()),
            metrics: Some("127.0.0.1:9153".into()),
            log_level: Some("debug".into()),
            max_running: Some("4".into()),
            max_boots_per_second: Some("2".into()),
            specs: vec![www().into()],
            config: None,
        };
        let c = ok(&f);
        assert_eq!(c.bind, "10.9.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(c.listen, 5353);
        assert_eq!(
            c.forwarders,
            Forwarders::List(vec!["9.9.9.9".parse().unwrap(), "1.1.1.1".parse().unwrap()])
        );
        assert_eq!(c.forwarder_port, 5300);
        assert_eq!(c.delay, Duration::from_millis(250));
        assert_eq!(c.ttl, 1);
        assert_eq!(c.mode, StopMode::Suspend);
        assert_eq!(c.vms[0].stop_mode, StopMode::Suspend);
        assert_eq!(c.vms[0].response_delay, Duration::from_millis(250));
        assert_eq!(
            c.connect.as_deref(),
            Some("process:///tmp/x?netns_prefix=t-")
        );
        assert_eq!(c.synjitsu, Some(PathBuf::from("/run/synjitsu.sock")));
        assert_eq!(c.persistdb, Some(PathBuf::from("/var/lib/jitsu")));
        assert_eq!(c.metrics, Some("127.0.0.1:9153".parse().unwrap()));
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.max_running, Some(4));
        assert_eq!(c.max_boots_per_second, Some(2));
        assert_eq!(
            c.zones[0].ns_addresses,
            vec!["10.9.0.1".parse::<IpAddr>().unwrap()]
        );

        let mut off = flags(&[www()]);
        off.forwarder = Some("0.0.0.0".into());
        assert_eq!(ok(&off).forwarders, Forwarders::Off);
        off.forwarder = Some(String::new());
        assert_eq!(ok(&off).forwarders, Forwarders::System);
    }

    #[test]
    fn every_vm_key_is_parsed() {
        let spec = "name=mirage,dns=Mirage.Example.org,dns=m.example.org,ip=10.0.0.2/16,\
                    ip6=fd00::2/80,mac=00:16:3e:00:00:02,response_delay=0.5,\
                    wait_for_key=/local/domain/7/data/ready,wait_for=announce,\
                    wait_for_timeout=3,boot_timeout=4.5,use_synjitsu=yes,stop_mode=shutdown,\
                    handover=wire,\
                    ifup=guest,gateway=10.0.0.254,nic=br1,command='sh -c \"a, b\"',\
                    zone=example.org";
        let c = ok(&flags(&[spec]));
        let vm = &c.vms[0];
        assert_eq!(vm.dns.len(), 2);
        assert_eq!(vm.dns[0].to_string(), "mirage.example.org.");
        assert_eq!(vm.dns[1].to_string(), "m.example.org.");
        assert_eq!((vm.ip.to_string().as_str(), vm.ip_prefix), ("10.0.0.2", 16));
        assert_eq!(vm.ip6, Some("fd00::2".parse().unwrap()));
        assert_eq!(vm.ip6_prefix, 80);
        assert_eq!(vm.mac.to_string(), "00:16:3e:00:00:02");
        assert_eq!(vm.response_delay, Duration::from_millis(500));
        assert_eq!(
            vm.wait_for_key.as_deref(),
            Some("/local/domain/7/data/ready")
        );
        assert_eq!(vm.wait_for, Some(WaitFor::Announce));
        assert_eq!(vm.wait_for_timeout, Duration::from_secs(3));
        assert_eq!(vm.boot_timeout, Duration::from_millis(4500));
        assert!(vm.use_synjitsu && vm.synjitsu_tracked());
        assert_eq!(vm.stop_mode, StopMode::Shutdown);
        assert_eq!(vm.ifup, Ifup::Guest);
        assert_eq!(vm.gateway, Some("10.0.0.254".parse().unwrap()));
        assert_eq!(vm.nic, "br1");
        assert_eq!(vm.command.as_deref(), Some("sh -c \"a, b\""));
        assert_eq!(vm.zone, Some(Name::from_ascii("example.org.").unwrap()));
    }

    #[test]
    fn libvirt_keys_are_parsed_for_libvirt() {
        let mut f = flags(&[
            "name=rump,dns=nginx.example.org,ip=10.0.0.3,kernel=/k/nginx.bin,memory=64,\
             disk=/d/a.img,disk=/d/b.img,uuid=4DEA22B3-1D52-D8F3-2516-782E98AB3FA0,\
             cmdline=console=hvc0,handover=xenstore,wait_for_key=data/ready,initrd=/k/initrd,\
             console_log=/var/log/jitsu/rump.console,domain_type=xenpv",
        ]);
        f.backend = Some("libvirt".into());
        let c = ok(&f);
        let vm = &c.vms[0];
        assert_eq!(vm.kernel, Some(PathBuf::from("/k/nginx.bin")));
        assert_eq!(vm.initrd, Some(PathBuf::from("/k/initrd")));
        assert_eq!(
            vm.console_log,
            Some(PathBuf::from("/var/log/jitsu/rump.console"))
        );
        assert_eq!(vm.domain_type, Some(DomainType::XenPv));
        assert_eq!(vm.memory, Some(64));
        assert_eq!(
            vm.disks,
            vec![PathBuf::from("/d/a.img"), PathBuf::from("/d/b.img")]
        );
        assert_eq!(
            vm.uuid.as_deref(),
            Some("4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
        );
        assert_eq!(vm.cmdline.as_deref(), Some("console=hvc0"));
        assert_eq!(vm.handover, HandoverKind::Xenstore);
        assert_eq!(vm.wait_for_key.as_deref(), Some("data/ready"));
        assert!(vm.command.is_none());
    }

    #[test]
    fn bad_specs_name_the_key_the_value_and_why() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "name=www,dns=www.example.org,ip=10.0.0.300,command=x",
                "ip = \"10.0.0.300\"",
                "not an IPv4 address",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1/33,command=x",
                "ip = \"10.0.0.1/33\"",
                "prefix length",
            ),
            (
                "name=www,dns=www.example.org,ip=127.0.0.1,command=x",
                "ip = \"127.0.0.1\"",
                "cannot be a guest",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,ip6=fd00::zz,command=x",
                "ip6 = \"fd00::zz\"",
                "not an IPv6",
            ),
            (
                "name=www,dns=www,ip=10.0.0.1,command=x",
                "dns = \"www\"",
                "two labels",
            ),
            (
                "name=www,dns=*.example.org,ip=10.0.0.1,command=x",
                "dns = \"*.example.org\"",
                "wildcards",
            ),
            (
                "name=www,dns=a b.org,ip=10.0.0.1,command=x",
                "dns = \"a b.org\"",
                "not a domain name",
            ),
            (
                "name=w/w,dns=www.example.org,ip=10.0.0.1,command=x",
                "name = \"w/w\"",
                "characters",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,mac=01:00:5e:00:00:01,command=x",
                "mac = \"01:00:5e:00:00:01\"",
                "unicast",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,mac=zz,command=x",
                "mac = \"zz\"",
                "invalid MAC",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,response_delay=-1,command=x",
                "response_delay = \"-1\"",
                "zero or more",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,response_delay=soon,command=x",
                "response_delay = \"soon\"",
                "number of seconds",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,wait_for_key=data/ready,command=x",
                "wait_for_key = \"data/ready\"",
                "absolute path",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,wait_for_key=/a b,command=x",
                "wait_for_key = \"/a b\"",
                "Xenstore path",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,wait_for=key,command=x",
                "wait_for = \"key\"",
                "announce",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,wait_for_timeout=0,command=x",
                "wait_for_timeout = \"0\"",
                "more than zero",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,boot_timeout=0,command=x",
                "boot_timeout = \"0\"",
                "more than zero",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,use_synjitsu=maybe,command=x",
                "use_synjitsu = \"maybe\"",
                "true or false",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,stop_mode=pause,command=x",
                "stop_mode = \"pause\"",
                "destroy, suspend or shutdown",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,handover=xenstore,command=x",
                "handover = \"xenstore\"",
                "domain id",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,handover=pigeon,command=x",
                "handover = \"pigeon\"",
                "wire or xenstore",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,ifup=dhcp,command=x",
                "ifup = \"dhcp\"",
                "jitsu or guest",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,gateway=gw,command=x",
                "gateway = \"gw\"",
                "not an IP",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,nic=a-very-long-bridge-name,command=x",
                "nic = \"a-very-long-bridge-name\"",
                "interface name",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,command=",
                "command = \"\"",
                "empty",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,kernel=/k,command=x",
                "kernel = \"/k\"",
                "libvirt backend",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,colour=blue,command=x",
                "colour = \"blue\"",
                "unknown key",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,ip=10.0.0.2,command=x",
                "ip = \"10.0.0.2\"",
                "given twice",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,zone=example.net,command=x",
                "zone = \"example.net\"",
                "not inside",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,oops,command=x",
                "oops = \"\"",
                "key=value",
            ),
            (
                "name=www,dns=www.example.org,ip=10.0.0.1,command='x",
                "spec = ",
                "unterminated quote",
            ),
        ];
        for (spec, what, why) in cases {
            let e = err(&flags(&[spec]));
            assert!(e.starts_with("VM spec 1"), "{spec}: {e}");
            assert!(e.contains(what), "{spec}: {e} lacks {what}");
            assert!(e.contains(why), "{spec}: {e} lacks {why}");
        }
        let e = err(&flags(&["dns=www.example.org,ip=10.0.0.1,command=x"]));
        assert!(e.contains("name is missing"), "{e}");
        let e = err(&flags(&["name=www,ip=10.0.0.1,command=x"]));
        assert!(e.contains("VM spec 1 (www): dns is missing"), "{e}");
        let e = err(&flags(&["name=www,dns=www.example.org,command=x"]));
        assert!(e.contains("ip is missing"), "{e}");
        let e = err(&flags(&["name=www,dns=www.example.org,ip=10.0.0.1"]));
        assert!(e.contains("command is missing"), "{e}");
        let mut lv = flags(&["name=www,dns=www.example.org,ip=10.0.0.1,command=x"]);
        lv.backend = Some("libvirt".into());
        assert!(err(&lv).contains("process backend"));
        for (spec, what) in [
            (
                "kernel=vmlinux",
                "kernel = \"vmlinux\": must be an absolute path",
            ),
            (
                "initrd=./i.gz",
                "initrd = \"./i.gz\": must be an absolute path",
            ),
            (
                "disk=/ok.img,disk=d.img",
                "disk = \"d.img\": must be an absolute path",
            ),
            (
                "console_log=c.log",
                "console_log = \"c.log\": must be an absolute path",
            ),
            ("domain_type=hvm", "expected qemu, kvm, xenpvh or xenpv"),
        ] {
            let mut lv = flags(&[&format!("name=www,dns=www.example.org,ip=10.0.0.1,{spec}")]);
            lv.backend = Some("libvirt".into());
            let e = err(&lv);
            assert!(e.starts_with("VM spec 1 (www): "), "{e}");
            assert!(e.contains(what), "{spec}: {e}");
        }
    }

    #[test]
    fn vms_may_not_share_names_addresses_or_macs() {
        let e = err(&flags(&[
            www(),
            "name=www,dns=b.example.org,ip=10.0.0.2,command=x",
        ]));
        assert!(
            e.contains("VM spec 2 (www): name = \"www\": another VM"),
            "{e}"
        );
        let e = err(&flags(&[
            www(),
            "name=b,dns=WWW.example.org,ip=10.0.0.2,command=x",
        ]));
        assert!(e.contains("already answers"), "{e}");
        let e = err(&flags(&[
            www(),
            "name=b,dns=b.example.org,ip=10.0.0.1,command=x",
        ]));
        assert!(
            e.contains("ip = \"10.0.0.1\": VM www has this address"),
            "{e}"
        );
        let e = err(&flags(&[
            "name=a,dns=a.example.org,ip=10.0.0.1,mac=02:00:00:00:00:01,command=x",
            "name=b,dns=b.example.org,ip=10.0.0.2,mac=02:00:00:00:00:01,command=x",
        ]));
        assert!(e.contains("has this MAC"), "{e}");
    }

    #[test]
    fn bad_flags_name_the_flag() {
        for (f, want) in [
            (
                Flags {
                    ttl: Some("0".into()),
                    ..flags(&[www()])
                },
                "flag --ttl: ttl = \"0\": must be between 1",
            ),
            (
                Flags {
                    listen: Some("70000".into()),
                    ..flags(&[www()])
                },
                "flag --listen",
            ),
            (
                Flags {
                    bind: Some("localhost".into()),
                    ..flags(&[www()])
                },
                "flag --bind: bind = \"localhost\": not an IP",
            ),
            (
                Flags {
                    forwarder: Some("dns.google".into()),
                    ..flags(&[www()])
                },
                "flag --forwarder",
            ),
            (
                Flags {
                    forwarder: Some("0.0.0.0,1.1.1.1".into()),
                    ..flags(&[www()])
                },
                "cannot be mixed",
            ),
            (
                Flags {
                    delay: Some("x".into()),
                    ..flags(&[www()])
                },
                "flag --delay",
            ),
            (
                Flags {
                    mode: Some("pause".into()),
                    ..flags(&[www()])
                },
                "flag --mode",
            ),
            (
                Flags {
                    backend: Some("xen".into()),
                    ..flags(&[www()])
                },
                "libvirt or process",
            ),
            (
                Flags {
                    metrics: Some("9153".into()),
                    ..flags(&[www()])
                },
                "address:port",
            ),
            (
                Flags {
                    max_running: Some("0".into()),
                    ..flags(&[www()])
                },
                "flag --max-running",
            ),
            (
                Flags {
                    max_boots_per_second: Some("-1".into()),
                    ..flags(&[www()])
                },
                "whole number",
            ),
        ] {
            let e = err(&f);
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }

    const FILE: &str = r#"# a dom0
bind = "10.0.0.254"
listen = 5353
forwarder = ["192.0.2.53", "192.0.2.54"]
delay = 0.2
ttl = 30
mode = "suspend"
max_running = 8

[[zone]]
name = "example.org"
ns = "ns1.example.org"
ns_address = "10.0.0.254"

[[vm]]
name = "mirage"
dns = ["mirage.example.org", "www.example.org"]
ip = "10.0.0.1"
use_synjitsu = true
response_delay = 0
command = "sleep infinity"

[[vm]]
name = "rump"
dns = "nginx.example.org"
ip = "10.0.0.2"
stop_mode = "destroy"
command = "sleep infinity"
"#;

    #[test]
    fn the_file_has_the_same_settings_and_flags_win() {
        let path = Path::new("dom0.toml");
        let f = Flags {
            ttl: Some("10".into()),
            specs: vec!["name=extra,dns=extra.example.org,ip=10.0.0.3,command=x".into()],
            ..Flags::default()
        };
        let c = merge(&f, Some(&from_toml(FILE, path).unwrap())).unwrap();
        assert_eq!(c.bind, "10.0.0.254".parse::<IpAddr>().unwrap());
        assert_eq!(c.listen, 5353);
        assert_eq!(
            c.forwarders,
            Forwarders::List(vec![
                "192.0.2.53".parse().unwrap(),
                "192.0.2.54".parse().unwrap()
            ])
        );
        assert_eq!(c.delay, Duration::from_millis(200));
        assert_eq!(c.ttl, 10, "the flag wins");
        assert_eq!(c.mode, StopMode::Suspend);
        assert_eq!(c.max_running, Some(8));
        assert_eq!(c.vms.len(), 3);
        let names: Vec<&str> = c.vms.iter().map(|v| &*v.name).collect();
        assert_eq!(names, ["extra", "mirage", "rump"]);
        let mirage = &c.vms[1];
        assert!(mirage.use_synjitsu);
        assert_eq!(mirage.response_delay, Duration::ZERO);
        assert_eq!(mirage.stop_mode, StopMode::Suspend);
        assert_eq!(mirage.dns.len(), 2);
        assert_eq!(c.vms[2].stop_mode, StopMode::Destroy);
        assert_eq!(c.zones.len(), 1);
        assert_eq!(c.zones[0].ns.to_string(), "ns1.example.org.");
        assert_eq!(
            c.zones[0].ns_addresses,
            vec!["10.0.0.254".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn bad_files_name_the_file_line_key_and_why() {
        let path = Path::new("dom0.toml");
        let cases: &[(&str, &str)] = &[
            (
                "ttl = 30\nfrobnicate = 1\n",
                "dom0.toml line 2: unknown field `frobnicate`",
            ),
            ("ttl = \n", "dom0.toml line 1"),
            (
                "ttl = 0\n",
                "dom0.toml line 1: ttl = \"0\": must be between 1",
            ),
            (
                "\n\nbind = \"nowhere\"\n",
                "dom0.toml line 3: bind = \"nowhere\": not an IP",
            ),
            (
                "[[vm]]\nname = \"www\"\ndns = \"www.example.org\"\nip = \"10.0.0.999\"\ncommand = \"x\"\n",
                "dom0.toml line 4 (vm www): ip = \"10.0.0.999\": not an IPv4 address",
            ),
            (
                "[[vm]]\nname = \"www\"\ndns = \"www.example.org\"\nip = \"10.0.0.1\"\ncommand = \"x\"\nspeed = 3\n",
                "dom0.toml line 6 (vm www): speed = \"3\": unknown key",
            ),
            (
                "\n[[vm]]\nname = \"www\"\ndns = \"www.example.org\"\ncommand = \"x\"\n",
                "dom0.toml line 2 (vm www): ip is missing",
            ),
            (
                "[[vm]]\nname = \"www\"\ndns = [[1]]\n",
                "dom0.toml line 3 (vm www): dns = \"\": nested",
            ),
            (
                "[[zone]]\nname = \"example.org\"\nttl = 3\n",
                "dom0.toml line 3: unknown field `ttl`",
            ),
            (
                "[[zone]]\nname = \"example.org\"\nns_address = \"x\"\n",
                "dom0.toml line 3: ns_address = \"x\"",
            ),
        ];
        for (text, want) in cases {
            let e = from_toml(text, path)
                .and_then(|f| merge(&Flags::default(), Some(&f)))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{text:?}: got {e}, want {want}");
        }
    }

    #[test]
    fn a_root_zone_is_refused_at_its_name() {
        let path = Path::new("dom0.toml");
        let cases: &[(&str, usize)] = &[
            ("[[zone]]\nname = \".\"\n", 2),
            ("[[zone]]\nname = \".\"\nns = \"ns1.example.org\"\n", 2),
            ("[[zone]]\nns = \"ns1.example.org\"\nname = \".\"\n", 3),
        ];
        for (text, line) in cases {
            let e = from_toml(text, path)
                .and_then(|f| merge(&Flags::default(), Some(&f)))
                .unwrap_err();
            match &e {
                ConfigError::Invalid { key, value, .. } => {
                    assert_eq!(key, "name", "{text:?}");
                    assert_eq!(value, ".", "{text:?}");
                }
                other => panic!("{text:?}: got {other}, want an invalid name"),
            }
            assert_eq!(
                e.to_string(),
                format!(
                    "dom0.toml line {line}: name = \".\": jitsu-dns does not serve the root zone"
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn zones_default_to_the_parent_and_nest_into_the_outer_one() {
        let c = ok(&flags(&[
            "name=a,dns=www.example.org,ip=10.0.0.1,command=x",
            "name=b,dns=a.www.example.org,ip=10.0.0.2,command=x",
            "name=c,dns=c.example.net,ip=10.0.0.3,command=x",
            "name=d,dns=d.sub.example.com,ip=10.0.0.4,zone=example.com,command=x",
        ]));
        let zones: BTreeSet<String> = c.zones.iter().map(|z| z.name.to_string()).collect();
        assert_eq!(
            zones,
            ["example.com.", "example.net.", "example.org."]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
        let n = Name::from_ascii("a.www.example.org.").unwrap();
        assert_eq!(c.zone_of(&n).unwrap().name.to_string(), "example.org.");
        assert!(
            c.zone_of(&Name::from_ascii("example.com.").unwrap())
                .is_some()
        );
        assert!(
            c.zone_of(&Name::from_ascii("example.info.").unwrap())
                .is_none()
        );
    }

    #[test]
    fn spec_quoting() {
        let e = parse_spec("name=a,command=\"sleep 1, 2\",x=' y '", 3).unwrap();
        assert_eq!(e[1].value, "sleep 1, 2");
        assert_eq!(e[2].value, " y ");
        assert_eq!(
            e[0].origin,
            Origin::Spec {
                index: 3,
                vm: Some("a".into())
            }
        );
    }
}
