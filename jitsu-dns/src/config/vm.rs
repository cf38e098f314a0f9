//! One VM from its entries (a spec's or a `[[vm]]` table's): which keys it may have for its
//! backend, each key's value, the defaults it takes from the global settings, and that no two
//! VMs share a name, a DNS name, an address or a MAC.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::Name;
use shared_proto::Mac;

use super::error::{ConfigError, Origin, invalid};
use super::spec::Entry;
use super::types::{
    Announce, BackendKind, DEFAULT_BOOT_BACKOFF, DEFAULT_BOOT_TIMEOUT, DEFAULT_KEY_TIMEOUT,
    DEFAULT_MAX_BOOT_ATTEMPTS, DEFAULT_NIC, DEFAULT_WAIT_FOR_TIMEOUT, Disk, DiskKind, DomainType,
    HandoverKind, Ifup, Nic, StopMode, VmConfig, WaitFor,
};
use super::values::{
    is_xenstore_path, parse_bool, parse_dns_name, parse_enum, parse_ifname, parse_ip, parse_ipv4,
    parse_ipv6, parse_memory, parse_positive_seconds, parse_seconds, parse_u64, parse_uuid,
    parse_vm_dns_name,
};

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
    "announce",
    "nic",
    "idle_timeout",
    "pin",
    "drained",
    "max_boot_attempts",
    "boot_backoff",
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
    "script",
    "rumprun_config",
];
/// Keys the QEMU backend uses: those of libvirt's that its QEMU command line has.
const QEMU_KEYS: &[&str] = &[
    "kernel",
    "initrd",
    "memory",
    "cmdline",
    "console_log",
    "domain_type",
];
/// Keys that may be given more than once.
const REPEATABLE: &[&str] = &["dns", "disk", "nic", "script"];

/// Defaults a VM inherits from the global settings.
#[derive(Debug, Clone, Copy)]
pub(super) struct VmDefaults {
    /// `-d`: the response delay.
    pub(super) delay: Duration,
    /// `-m`: the stop mode.
    pub(super) mode: StopMode,
    /// `-x`: which keys apply.
    pub(super) backend: BackendKind,
    /// `domain_type` when a VM has none (`-x libxl`: PV, as Jitsu's libxl built them).
    pub(super) domain_type: Option<DomainType>,
}

/// A VM's entries, by key.
struct Keys<'a> {
    entries: &'a [Entry],
    /// Where the VM as a whole was given, for keys that are missing.
    whole: Origin,
}

impl<'a> Keys<'a> {
    fn get(&self, key: &str) -> Option<&'a Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// Every value of a repeatable key, parsed.
    fn all<T>(
        &self,
        key: &str,
        parse: impl Fn(&Origin, &str, &str) -> Result<T, ConfigError>,
    ) -> Result<Vec<T>, ConfigError> {
        self.entries
            .iter()
            .filter(|e| e.key == key)
            .map(|e| parse(&e.origin, key, &e.value))
            .collect()
    }

    /// `key`'s value parsed, if it is given.
    fn parse<T>(
        &self,
        key: &str,
        parse: impl FnOnce(&Origin, &str, &str) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        self.get(key)
            .map(|e| parse(&e.origin, key, &e.value))
            .transpose()
    }

    /// `key`'s value parsed; its absence is refused, saying `why` it is needed.
    fn require<T>(
        &self,
        key: &'static str,
        why: &'static str,
        parse: impl FnOnce(&Origin, &str, &str) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        self.parse(key, parse)?
            .ok_or_else(|| self.missing(key, why))
    }

    fn missing(&self, key: &'static str, why: &'static str) -> ConfigError {
        ConfigError::Missing {
            origin: Box::new(self.whole.clone()),
            key,
            why,
        }
    }
}

/// Builds one VM from its entries; `table` is where a `[[vm]]` table starts (a spec is
/// placed by its entries); `base` is the directory relative paths are read from (the
/// working directory for a spec, the file's directory for a `[[vm]]` table; `None` if it
/// cannot be known).
pub(super) fn build_vm(
    entries: &[Entry],
    table: Option<&Origin>,
    base: Option<&Path>,
    d: VmDefaults,
) -> Result<VmConfig, ConfigError> {
    check_keys(entries, d.backend)?;
    let keys = Keys {
        entries,
        whole: table
            .or(entries.first().map(|e| &e.origin))
            .cloned()
            .unwrap_or(Origin::Spec { index: 0, vm: None }),
    };
    // In this order, so that of several mistakes the same one is reported first.
    let name = keys.require("name", "every VM needs a name", parse_vm_name)?;
    let dns = keys.all("dns", parse_vm_dns_name)?;
    if dns.is_empty() {
        return Err(keys.missing("dns", "every VM needs at least one name to answer to"));
    }
    // A libvirt VM may be reached through the host's loopback (Jitsu's VirtualBox example,
    // `ip=127.0.0.1`, port-forwarded); a process or QEMU VM's own interface may not have it.
    let loopback = d.backend == BackendKind::Libvirt;
    let (ip, ip_prefix) = keys.require("ip", "every VM needs an IPv4 address", |o, k, v| {
        parse_ipv4(o, k, v, loopback)
    })?;
    let (ip6, ip6_prefix) = match keys.parse("ip6", parse_ipv6)? {
        Some((a, p)) => (Some(a), p),
        None => (None, 64),
    };
    let mac = keys
        .parse("mac", parse_mac)?
        .unwrap_or_else(|| Mac::derived_from(name.as_bytes()));
    let response_delay = keys.parse("response_delay", parse_seconds)?;
    let wait_for_key = keys.parse("wait_for_key", |o, k, v| parse_wait_for_key(o, k, v, d))?;
    let wait_for = keys.parse("wait_for", parse_wait_for)?;
    // Jitsu waited 2 s for a key; the other conditions are ours.
    let wait_for_timeout = keys
        .parse("wait_for_timeout", parse_positive_seconds)?
        .unwrap_or(if wait_for_key.is_some() && wait_for.is_none() {
            DEFAULT_KEY_TIMEOUT
        } else {
            DEFAULT_WAIT_FOR_TIMEOUT
        });
    let boot_timeout = keys.parse("boot_timeout", parse_positive_seconds)?;
    let use_synjitsu = keys.parse("use_synjitsu", parse_bool)?;
    let stop_mode = keys.parse("stop_mode", parse_enum)?;
    let idle_timeout = keys.parse("idle_timeout", parse_positive_seconds)?;
    let pin = keys.parse("pin", parse_bool)?;
    let drained = keys.parse("drained", parse_enum)?;
    // 0 turns the back-off off: every query retries, as before.
    let max_boot_attempts =
        keys.parse("max_boot_attempts", |o, k, v| parse_u64(o, k, v, 0, 1000))?;
    let boot_backoff = keys.parse("boot_backoff", parse_positive_seconds)?;
    let handover = keys.parse("handover", |o, k, v| parse_handover(o, k, v, d))?;
    let announce: Option<Announce> = keys.parse("announce", parse_enum)?;
    let ifup = keys.parse("ifup", parse_ifup)?;
    let gateway = keys.parse("gateway", parse_ip)?;
    let nics = build_nics(&keys, &name, mac, d)?;
    let command = match keys.parse("command", parse_command)? {
        None if d.backend == BackendKind::Process => {
            return Err(keys.missing("command", "the process backend runs each VM as its command"));
        }
        command => command,
    };
    if d.backend == BackendKind::Qemu && keys.get("kernel").is_none() {
        return Err(keys.missing("kernel", "the qemu backend boots each VM's kernel directly"));
    }
    let zone = keys.parse("zone", |o, k, v| parse_zone(o, k, v, &dns))?;
    let kernel = keys.parse("kernel", |o, k, v| parse_input_path(o, k, v, base))?;
    let initrd = keys.parse("initrd", |o, k, v| parse_input_path(o, k, v, base))?;
    let console_log = keys.parse("console_log", parse_absolute)?;
    let memory_kib = keys.parse("memory", parse_memory)?;
    let disks = keys.all("disk", |o, k, v| parse_disk(o, k, v, base))?;
    check_vdevs(&keys, &disks)?;
    let domain_type = keys
        .parse("domain_type", |o, k, v| parse_domain_type(o, k, v, d))?
        .or(d.domain_type);
    let rumprun_config = keys.parse("rumprun_config", |o, k, v| {
        parse_rumprun_config(o, k, v, base)
    })?;
    let uuid = keys.parse("uuid", parse_uuid)?;
    let cmdline = keys.get("cmdline").map(|e| e.value.clone());
    Ok(VmConfig {
        name,
        dns,
        zone,
        ip,
        ip_prefix,
        ip6,
        ip6_prefix,
        response_delay: response_delay.unwrap_or(d.delay),
        wait_for_key,
        wait_for,
        wait_for_timeout,
        boot_timeout: boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT),
        use_synjitsu: use_synjitsu.unwrap_or(false),
        stop_mode: stop_mode.unwrap_or(d.mode),
        idle_timeout,
        pin: pin.unwrap_or(false),
        drained: drained.unwrap_or_default(),
        max_boot_attempts: match max_boot_attempts {
            Some(0) => None,
            Some(n) => Some(n as u32),
            None => Some(DEFAULT_MAX_BOOT_ATTEMPTS),
        },
        boot_backoff: boot_backoff.unwrap_or(DEFAULT_BOOT_BACKOFF),
        handover: handover.unwrap_or(HandoverKind::Wire),
        announce: announce.unwrap_or_default(),
        ifup: ifup.unwrap_or(Ifup::Jitsu),
        gateway,
        nics,
        command,
        kernel,
        initrd,
        memory_kib,
        disks,
        uuid,
        cmdline,
        console_log,
        domain_type,
        rumprun_config,
        raw: entries
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect(),
    })
}

/// The keys `backend` takes besides the common ones.
fn backend_keys(backend: BackendKind) -> &'static [&'static str] {
    match backend {
        BackendKind::Process => PROCESS_KEYS,
        BackendKind::Libvirt => LIBVIRT_KEYS,
        BackendKind::Qemu => QEMU_KEYS,
    }
}

/// Refuses unknown keys, keys of another backend, and keys given twice that take one value.
fn check_keys(entries: &[Entry], backend: BackendKind) -> Result<(), ConfigError> {
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for e in entries {
        let key = e.key.as_str();
        let known = [COMMON_KEYS, PROCESS_KEYS, LIBVIRT_KEYS]
            .iter()
            .any(|keys| keys.contains(&key));
        if !known {
            return Err(invalid(
                &e.origin,
                &e.key,
                &e.value,
                "unknown key; VMs take name, dns, ip, ip6, mac, response_delay, wait_for_key, \
                 wait_for, wait_for_timeout, boot_timeout, use_synjitsu, stop_mode, handover, \
                 announce, zone, nic, idle_timeout, pin, drained, max_boot_attempts, boot_backoff, and for the process backend command, ifup, gateway, for libvirt \
                 kernel, initrd, memory, disk, script, uuid, cmdline, console_log, domain_type, \
                 rumprun_config, for qemu kernel, initrd, memory, cmdline, console_log, \
                 domain_type",
            ));
        }
        if !COMMON_KEYS.contains(&key) && !backend_keys(backend).contains(&key) {
            let owners: Vec<&str> = [
                BackendKind::Process,
                BackendKind::Libvirt,
                BackendKind::Qemu,
            ]
            .into_iter()
            .filter(|b| backend_keys(*b).contains(&key))
            .map(BackendKind::as_str)
            .collect();
            let (owners, s) = match owners.split_last() {
                Some((last, [])) => (last.to_string(), ""),
                Some((last, rest)) => (format!("{} and {last}", rest.join(", ")), "s"),
                None => (String::new(), ""),
            };
            return Err(invalid(
                &e.origin,
                &e.key,
                &e.value,
                format!(
                    "this key is for the {owners} backend{s}; the {} backend does not use it",
                    backend.as_str()
                ),
            ));
        }
        if !seen.insert(key) && !REPEATABLE.contains(&key) {
            return Err(invalid(&e.origin, &e.key, &e.value, "given twice"));
        }
    }
    Ok(())
}

fn parse_vm_name(origin: &Origin, key: &str, v: &str) -> Result<Arc<str>, ConfigError> {
    if !shared_proto::vm::is_valid_name(v) {
        return Err(invalid(
            origin,
            key,
            v,
            format!(
                "use 1 to {} characters from A-Z a-z 0-9 . _ -",
                shared_proto::vm::MAX_NAME_LEN
            ),
        ));
    }
    Ok(Arc::from(v))
}

/// The NICs: one per `nic` (a bridge; `br0` if none is given), each with its `script` (NIC
/// *i* takes the (*i* mod n)th, as Jitsu gave them) and its MAC: `mac` (or the name's) for
/// the first, one derived from the name and the NIC's place for the others. The process
/// backend gives a VM one interface.
fn build_nics(
    keys: &Keys<'_>,
    name: &str,
    mac: Mac,
    d: VmDefaults,
) -> Result<Vec<Nic>, ConfigError> {
    let mut bridges = keys.all("nic", parse_ifname)?;
    if bridges.is_empty() {
        bridges.push(DEFAULT_NIC.to_string());
    }
    if let Some(second) = keys.entries.iter().filter(|e| e.key == "nic").nth(1) {
        let one = match d.backend {
            BackendKind::Process => Some("the process backend gives a VM one interface (eth0)"),
            BackendKind::Qemu => Some("the qemu backend gives a VM one interface (one tap)"),
            BackendKind::Libvirt => None,
        };
        if let Some(one) = one {
            return Err(invalid(
                &second.origin,
                "nic",
                &second.value,
                format!("{one}: several NICs are for the libvirt backend"),
            ));
        }
    }
    let scripts = keys.all("script", parse_script)?;
    Ok(bridges
        .into_iter()
        .enumerate()
        .map(|(i, bridge)| Nic {
            bridge,
            script: (!scripts.is_empty()).then(|| scripts[i % scripts.len()].clone()),
            mac: if i == 0 {
                mac
            } else {
                Mac::derived_from(format!("{name}/nic{i}").as_bytes())
            },
        })
        .collect())
}

/// A vif script: a name in Xen's script directory (`vif-bridge`) or a path.
fn parse_script(origin: &Origin, key: &str, v: &str) -> Result<String, ConfigError> {
    if v.is_empty() || v.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(
            origin,
            key,
            v,
            "expected a vif script: a name like vif-bridge or a path",
        ));
    }
    Ok(v.to_string())
}

fn parse_mac(origin: &Origin, key: &str, v: &str) -> Result<Mac, ConfigError> {
    let m: Mac = v
        .parse()
        .map_err(|err: shared_proto::MacParseError| invalid(origin, key, v, err.to_string()))?;
    if m.is_multicast() || m == Mac::ZERO {
        return Err(invalid(
            origin,
            key,
            v,
            "a guest's MAC must be unicast and not all zeros",
        ));
    }
    Ok(m)
}

fn parse_wait_for_key(
    origin: &Origin,
    key: &str,
    v: &str,
    d: VmDefaults,
) -> Result<String, ConfigError> {
    if !is_xenstore_path(v) {
        return Err(invalid(
            origin,
            key,
            v,
            "not a Xenstore path: use A-Z a-z 0-9 / _ @ -",
        ));
    }
    if d.backend != BackendKind::Libvirt && !v.starts_with('/') {
        return Err(invalid(
            origin,
            key,
            v,
            format!(
                "a relative key lives under /local/domain/<domid>/, and the {} backend \
                 has no Xen domain ids: give an absolute path",
                d.backend.as_str()
            ),
        ));
    }
    Ok(v.to_string())
}

fn parse_wait_for(origin: &Origin, key: &str, v: &str) -> Result<WaitFor, ConfigError> {
    if v == "announce" {
        return Ok(WaitFor::Announce);
    }
    let port = v.strip_prefix("tcp:").and_then(|p| p.parse::<u16>().ok());
    match port {
        Some(p) if p > 0 => Ok(WaitFor::Tcp(p)),
        _ => Err(invalid(
            origin,
            key,
            v,
            "expected announce (answer when synjitsu sees the guest's own gratuitous ARP) \
             or tcp:PORT (answer when the guest accepts a TCP connection on PORT, 1-65535)",
        )),
    }
}

fn parse_handover(
    origin: &Origin,
    key: &str,
    v: &str,
    d: VmDefaults,
) -> Result<HandoverKind, ConfigError> {
    match v {
        "wire" => Ok(HandoverKind::Wire),
        "xenstore" if d.backend != BackendKind::Libvirt => Err(invalid(
            origin,
            key,
            v,
            format!(
                "xenstore hand-over needs a Xen domain id, and the {} backend has none",
                d.backend.as_str()
            ),
        )),
        "xenstore" => Ok(HandoverKind::Xenstore),
        _ => Err(invalid(origin, key, v, "expected wire or xenstore")),
    }
}

/// `domain_type`: any for libvirt; TCG (`qemu`, `tcg`) or `kvm` for the QEMU backend.
fn parse_domain_type(
    origin: &Origin,
    key: &str,
    v: &str,
    d: VmDefaults,
) -> Result<DomainType, ConfigError> {
    let t: DomainType = parse_enum(origin, key, v)?;
    if d.backend == BackendKind::Qemu && !matches!(t, DomainType::Qemu | DomainType::Kvm) {
        return Err(invalid(
            origin,
            key,
            v,
            "the qemu backend runs QEMU: tcg (or qemu) or kvm",
        ));
    }
    Ok(t)
}

fn parse_ifup(origin: &Origin, key: &str, v: &str) -> Result<Ifup, ConfigError> {
    match v {
        "jitsu" => Ok(Ifup::Jitsu),
        "guest" => Ok(Ifup::Guest),
        _ => Err(invalid(origin, key, v, "expected jitsu or guest")),
    }
}

fn parse_command(origin: &Origin, key: &str, v: &str) -> Result<String, ConfigError> {
    if v.trim().is_empty() {
        return Err(invalid(origin, key, v, "must not be empty"));
    }
    Ok(v.to_string())
}

/// The VM's `zone`, which must hold every one of its `dns` names.
fn parse_zone(origin: &Origin, key: &str, v: &str, dns: &[Name]) -> Result<Name, ConfigError> {
    let z = parse_dns_name(origin, key, v)?;
    if let Some(outside) = dns.iter().find(|n| !z.zone_of(n)) {
        return Err(invalid(
            origin,
            key,
            v,
            format!("the VM's name {outside} is not inside this zone"),
        ));
    }
    Ok(z)
}

/// A file the VM is built from (`kernel`, `initrd`, a disk). A relative path is resolved here,
/// against `base`, as Jitsu resolved it against its working directory: libvirtd (or QEMU, as
/// another user, in another directory) opens the file, and would find another one.
fn parse_input_path(
    origin: &Origin,
    key: &str,
    v: &str,
    base: Option<&Path>,
) -> Result<PathBuf, ConfigError> {
    let p = Path::new(v);
    if v.is_empty() {
        return Err(invalid(origin, key, v, "expected a path"));
    }
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let base = base.ok_or_else(|| {
        invalid(
            origin,
            key,
            v,
            "a relative path, and the directory it is relative to is unknown (the working \
             directory is gone?): give an absolute path",
        )
    })?;
    // Components drop the `.`s: `./k` is `<base>/k`.
    Ok(base.join(p).components().collect())
}

/// `disk`: Jitsu's `<dev-or-file>@<vdev>` (split at the first `@`; the `@<vdev>` may be left
/// out). A path under `/dev/` is a block device.
fn parse_disk(
    origin: &Origin,
    key: &str,
    v: &str,
    base: Option<&Path>,
) -> Result<Disk, ConfigError> {
    let (source, vdev) = match v.split_once('@') {
        Some((s, d)) => (s, Some(d).filter(|d| !d.is_empty())),
        None => (v, None),
    };
    if source.is_empty() {
        return Err(invalid(
            origin,
            key,
            v,
            "expected <image file or /dev/ device>[@<guest device>], like images/data.iso@xvdb \
             or /dev/loop5@xvda",
        ));
    }
    if let Some(d) = vdev
        && !is_vdev(d)
    {
        return Err(invalid(
            origin,
            key,
            v,
            format!(
                "{d} is not a guest disk device: use xvdX (Xen), vdX (virtio), sdX or hdX, \
                 like xvda"
            ),
        ));
    }
    let source = parse_input_path(origin, key, source, base)?;
    let kind = if source.starts_with("/dev/") {
        DiskKind::Block
    } else {
        DiskKind::File
    };
    Ok(Disk {
        source,
        vdev: vdev.map(str::to_string),
        kind,
    })
}

/// A guest disk device name: `xvd`, `vd`, `sd` or `hd`, one to three letters, and for a Xen
/// partition digits (`xvda1`).
fn is_vdev(d: &str) -> bool {
    let Some(rest) = ["xvd", "vd", "sd", "hd"]
        .iter()
        .find_map(|p| d.strip_prefix(p))
    else {
        return false;
    };
    let letters = rest.bytes().take_while(u8::is_ascii_lowercase).count();
    let digits = &rest[letters..];
    (1..=3).contains(&letters) && digits.len() <= 3 && digits.bytes().all(|b| b.is_ascii_digit())
}

/// No two disks of a VM may be the same guest device.
fn check_vdevs(keys: &Keys<'_>, disks: &[Disk]) -> Result<(), ConfigError> {
    let mut seen = BTreeSet::new();
    for (disk, e) in disks
        .iter()
        .zip(keys.entries.iter().filter(|e| e.key == "disk"))
    {
        if let Some(d) = &disk.vdev
            && !seen.insert(d.as_str())
        {
            return Err(invalid(
                &e.origin,
                "disk",
                &e.value,
                format!("another disk is {d}"),
            ));
        }
    }
    Ok(())
}

/// libvirtd (or QEMU, as another user, in another directory) writes this file: a relative
/// path would name another file there.
fn parse_absolute(origin: &Origin, key: &str, v: &str) -> Result<PathBuf, ConfigError> {
    if !v.starts_with('/') {
        return Err(invalid(
            origin,
            key,
            v,
            "must be an absolute path (libvirt opens it, not jitsu-dns)",
        ));
    }
    Ok(PathBuf::from(v))
}

/// rumprun's JSON configuration: jitsu-dns reads it itself, so a relative path is taken from
/// its working directory, as Jitsu took it. Checked now (Jitsu ignored a missing file), and
/// read again at each boot.
/// A path like `kernel`'s whose file must be there and fit one Xenstore value.
fn parse_rumprun_config(
    origin: &Origin,
    key: &str,
    v: &str,
    base: Option<&Path>,
) -> Result<PathBuf, ConfigError> {
    let path = parse_input_path(origin, key, v, base)?;
    crate::rumprun::read_cfg(&path).map_err(|e| invalid(origin, key, v, e.to_string()))?;
    Ok(path)
}

/// Names, addresses and MACs identify a VM on the bridge and in DNS: no two may share one.
/// Each VM comes with its entries, to say where the clash was given.
pub(super) fn check_distinct(vms: &[(VmConfig, Vec<Entry>)]) -> Result<(), ConfigError> {
    let mut names: HashSet<Arc<str>> = HashSet::new();
    let mut dns_owner: HashMap<Name, Arc<str>> = HashMap::new();
    let mut ip_owner: HashMap<IpAddr, Arc<str>> = HashMap::new();
    let mut mac_owner: HashMap<Mac, Arc<str>> = HashMap::new();
    for (vm, entries) in vms {
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
        for nic in &vm.nics {
            if let Some(other) = mac_owner.insert(nic.mac, vm.name.clone()) {
                return Err(invalid(
                    &at("mac"),
                    "mac",
                    &nic.mac.to_string(),
                    format!("VM {other} has this MAC"),
                ));
            }
        }
    }
    Ok(())
}
