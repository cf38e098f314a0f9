//! The zones served: the `[[zone]]` tables, and the implicit zone of each VM name (its
//! parent, folded into an enclosing zone), each with its NS name and addresses.

use std::collections::BTreeSet;
use std::net::IpAddr;

use hickory_proto::rr::Name;

use super::error::{ConfigError, invalid};
use super::spec::Entry;
use super::types::{VmConfig, ZoneConfig};
use super::values::{parse_dns_name, parse_ip};

/// The `[[zone]]` tables (each a list of entries starting with its `name`), validated; a
/// zone defined twice is refused at its second `name`.
pub(super) fn explicit_zones(
    tables: &[Vec<Entry>],
    bind: IpAddr,
) -> Result<Vec<ZoneConfig>, ConfigError> {
    let mut zones = Vec::new();
    let mut seen = BTreeSet::new();
    for t in tables {
        let z = build_zone(t, bind)?;
        if !seen.insert(z.name.clone()) {
            return Err(invalid(
                &t[0].origin,
                "name",
                &z.name.to_string(),
                "zone defined twice",
            ));
        }
        zones.push(z);
    }
    Ok(zones)
}

fn build_zone(entries: &[Entry], bind: IpAddr) -> Result<ZoneConfig, ConfigError> {
    let mut name = None;
    let mut ns = None;
    let mut ns_addresses = Vec::new();
    for e in entries {
        match e.key.as_str() {
            "name" => name = Some((parse_dns_name(&e.origin, "name", &e.value)?, e)),
            "ns" => ns = Some(parse_dns_name(&e.origin, "ns", &e.value)?),
            "ns_address" => ns_addresses.push(parse_ip(&e.origin, "ns_address", &e.value)?),
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

/// The zones served: the explicit ones, each VM's `zone=`, and for other names their parent
/// (`www.example.org` -> `example.org`). An implicit zone inside another zone is folded into
/// it, so `a.www.example.org` and `www.example.org` share `example.org`.
pub(super) fn zones_for<'a>(
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
