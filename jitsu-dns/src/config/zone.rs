//! The zones served: the `[[zone]]` tables, and the implicit zone of each VM name (its
//! parent, folded into an enclosing zone), each with its NS name and addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use hickory_proto::rr::Name;

use super::error::{ConfigError, Origin, invalid};
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
    zone_with_defaults(name, ns, ns_addresses, bind).map_err(|why| {
        invalid(
            &e.origin,
            "name",
            &e.value,
            format!("{why}: give it an `ns` outside it, or use a shorter name"),
        )
    })
}

/// The zone `name` with its NS name (`ns.<zone>` unless given) and addresses; refused, saying
/// why, when `ns.<zone>` would be longer than a name may be (a valid name of 252 or 253
/// characters has a zone that long).
fn zone_with_defaults(
    name: Name,
    ns: Option<Name>,
    mut ns_addresses: Vec<IpAddr>,
    bind: IpAddr,
) -> Result<ZoneConfig, String> {
    let ns = match ns {
        Some(ns) => ns,
        None => name.prepend_label("ns").map_err(|_| {
            format!(
                "the zone {name} has no room for its NS name ns.{name} (a name has at most \
                 255 octets)"
            )
        })?,
    };
    if ns_addresses.is_empty() && !bind.is_unspecified() && name.zone_of(&ns) {
        // The server's own address is the best answer for its own name.
        ns_addresses.push(bind);
    }
    Ok(ZoneConfig {
        name,
        ns,
        ns_addresses,
    })
}

/// A zone `name` implied by a VM's key `key` (given at `origin` as `value`), with defaults.
fn implied_zone(
    name: Name,
    bind: IpAddr,
    (origin, key, value): (&Origin, &str, &str),
) -> Result<ZoneConfig, ConfigError> {
    zone_with_defaults(name, None, Vec::new(), bind).map_err(|why| {
        invalid(
            origin,
            key,
            value,
            format!("{why}: give the zone a [[zone]] table with an `ns` outside it, or use a shorter name"),
        )
    })
}

/// The zones served: the explicit ones, each VM's `zone=`, and for other names their parent
/// (`www.example.org` -> `example.org`). An implicit zone inside another zone is folded into
/// it, so `a.www.example.org` and `www.example.org` share `example.org`.
/// Each VM comes with its entries, to say which key implied a zone that cannot be served.
pub(super) fn zones_for(
    explicit: Vec<ZoneConfig>,
    vms: &[(VmConfig, Vec<Entry>)],
    bind: IpAddr,
) -> Result<Vec<ZoneConfig>, ConfigError> {
    let mut zones = explicit;
    // Each implicit zone with the first `dns` entry that implied it.
    let mut implicit: BTreeMap<Name, (&Origin, String)> = BTreeMap::new();
    for (vm, entries) in vms {
        let at = |key: &str| {
            entries
                .iter()
                .find(|e| e.key == key)
                .map(|e| &e.origin)
                .expect("a VM's zone and names come from its entries")
        };
        if let Some(z) = &vm.zone {
            if !zones.iter().any(|e| &e.name == z) {
                let value = z.to_string();
                let zone = implied_zone(
                    z.clone(),
                    bind,
                    (at("zone"), "zone", value.trim_end_matches('.')),
                )?;
                zones.push(zone);
            }
            continue;
        }
        for n in &vm.dns {
            if !zones.iter().any(|z| z.name.zone_of(n)) {
                let value = n.to_string().trim_end_matches('.').to_string();
                implicit.entry(n.base_name()).or_insert((at("dns"), value));
            }
        }
    }
    let all: BTreeSet<&Name> = implicit.keys().collect();
    for (z, (origin, value)) in &implicit {
        let inside_other =
            all.iter().any(|o| *o != z && o.zone_of(z)) || zones.iter().any(|e| e.name.zone_of(z));
        if !inside_other {
            zones.push(implied_zone(z.clone(), bind, (origin, "dns", value))?);
        }
    }
    Ok(zones)
}
