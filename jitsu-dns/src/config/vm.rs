//! One VM from its entries (a spec's or a `[[vm]]` table's): which keys it may have for its
//! backend, each key's value, the defaults it takes from the global settings, and that no two
//! VMs share a name, a DNS name, an address or a MAC.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::Name;
use shared_proto::Mac;

use super::error::{ConfigError, Origin, invalid};
use super::spec::Entry;
use super::types::{
    BackendKind, DEFAULT_BOOT_TIMEOUT, DEFAULT_NIC, DEFAULT_WAIT_FOR_TIMEOUT, HandoverKind, Ifup,
    StopMode, VmConfig, WaitFor,
};
use super::values::{
    is_xenstore_path, parse_bool, parse_dns_name, parse_enum, parse_ifname, parse_ip, parse_ipv4,
    parse_ipv6, parse_positive_seconds, parse_seconds, parse_u64, parse_uuid, parse_vm_dns_name,
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
    "rumprun_config",
];
/// Keys that may be given more than once.
const REPEATABLE: &[&str] = &["dns", "disk"];

/// Defaults a VM inherits from the global settings.
#[derive(Debug, Clone, Copy)]
pub(super) struct VmDefaults {
    /// `-d`: the response delay.
    pub(super) delay: Duration,
    /// `-m`: the stop mode.
    pub(super) mode: StopMode,
    /// `-x`: which keys apply.
    pub(super) backend: BackendKind,
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
/// placed by its entries).
pub(super) fn build_vm(
    entries: &[Entry],
    table: Option<&Origin>,
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
    let (ip, ip_prefix) = keys.require("ip", "every VM needs an IPv4 address", parse_ipv4)?;
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
    let wait_for_timeout = keys.parse("wait_for_timeout", parse_positive_seconds)?;
    let boot_timeout = keys.parse("boot_timeout", parse_positive_seconds)?;
    let use_synjitsu = keys.parse("use_synjitsu", parse_bool)?;
    let stop_mode = keys.parse("stop_mode", parse_enum)?;
    let handover = keys.parse("handover", |o, k, v| parse_handover(o, k, v, d))?;
    let ifup = keys.parse("ifup", parse_ifup)?;
    let gateway = keys.parse("gateway", parse_ip)?;
    let nic = keys.parse("nic", parse_ifname)?;
    let command = match keys.parse("command", parse_command)? {
        None if d.backend == BackendKind::Process => {
            return Err(keys.missing("command", "the process backend runs each VM as its command"));
        }
        command => command,
    };
    let zone = keys.parse("zone", |o, k, v| parse_zone(o, k, v, &dns))?;
    let kernel = keys.parse("kernel", parse_absolute)?;
    let initrd = keys.parse("initrd", parse_absolute)?;
    let console_log = keys.parse("console_log", parse_absolute)?;
    let memory = keys.parse("memory", |o, k, v| parse_u64(o, k, v, 1, 1 << 24))?;
    let disks = keys.all("disk", parse_absolute)?;
    let domain_type = keys.parse("domain_type", parse_enum)?;
    let uuid = keys.parse("uuid", parse_uuid)?;
    let cmdline = keys.get("cmdline").map(|e| e.value.clone());
    let rumprun_config = keys.parse("rumprun_config", parse_rumprun_config)?;
    Ok(VmConfig {
        name,
        dns,
        zone,
        ip,
        ip_prefix,
        ip6,
        ip6_prefix,
        mac,
        response_delay: response_delay.unwrap_or(d.delay),
        wait_for_key,
        wait_for,
        wait_for_timeout: wait_for_timeout.unwrap_or(DEFAULT_WAIT_FOR_TIMEOUT),
        boot_timeout: boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT),
        use_synjitsu: use_synjitsu.unwrap_or(false),
        stop_mode: stop_mode.unwrap_or(d.mode),
        handover: handover.unwrap_or(HandoverKind::Wire),
        ifup: ifup.unwrap_or(Ifup::Jitsu),
        gateway,
        nic: nic.unwrap_or_else(|| DEFAULT_NIC.to_string()),
        command,
        kernel,
        initrd,
        memory,
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

/// Refuses unknown keys, keys of the other backend, and keys given twice that take one value.
fn check_keys(entries: &[Entry], backend: BackendKind) -> Result<(), ConfigError> {
    let (wrong, right) = match backend {
        BackendKind::Process => (LIBVIRT_KEYS, "libvirt"),
        BackendKind::Libvirt => (PROCESS_KEYS, "process"),
    };
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
                 zone, nic, and for the process backend command, ifup, gateway, for libvirt \
                 kernel, initrd, memory, disk, uuid, cmdline, console_log, domain_type, \
                 rumprun_config",
            ));
        }
        if wrong.contains(&key) {
            return Err(invalid(
                &e.origin,
                &e.key,
                &e.value,
                format!(
                    "this key is for the {right} backend; the {} backend does not use it",
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
    if d.backend == BackendKind::Process && !v.starts_with('/') {
        return Err(invalid(
            origin,
            key,
            v,
            "a relative key lives under /local/domain/<domid>/, and the process backend \
             has no Xen domain ids: give an absolute path",
        ));
    }
    Ok(v.to_string())
}

fn parse_wait_for(origin: &Origin, key: &str, v: &str) -> Result<WaitFor, ConfigError> {
    match v {
        "announce" => Ok(WaitFor::Announce),
        _ => Err(invalid(
            origin,
            key,
            v,
            "the only value is announce (answer when synjitsu sees the guest's own \
             gratuitous ARP)",
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
        "xenstore" if d.backend == BackendKind::Process => Err(invalid(
            origin,
            key,
            v,
            "xenstore hand-over needs a Xen domain id, and the process backend has none",
        )),
        "xenstore" => Ok(HandoverKind::Xenstore),
        _ => Err(invalid(origin, key, v, "expected wire or xenstore")),
    }
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

/// libvirtd (or QEMU, as another user, in another directory) opens these files: a relative
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
fn parse_rumprun_config(origin: &Origin, key: &str, v: &str) -> Result<PathBuf, ConfigError> {
    let path = std::path::absolute(v).map_err(|e| invalid(origin, key, v, e.to_string()))?;
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
        if let Some(other) = mac_owner.insert(vm.mac, vm.name.clone()) {
            return Err(invalid(
                &at("mac"),
                "mac",
                &vm.mac.to_string(),
                format!("VM {other} has this MAC"),
            ));
        }
    }
    Ok(())
}
