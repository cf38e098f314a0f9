//! The values keys and settings take, each parsed and checked in one place: seconds, whole
//! numbers, booleans, addresses with prefixes, domain names, Xenstore paths, interface names
//! and UUIDs. A bad value is refused with its origin and key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::rr::Name;

use super::error::{ConfigError, Origin, invalid};

/// Longest accepted duration value (one day): anything longer is a typo.
const MAX_SECONDS: f64 = 86_400.0;

pub(super) fn parse_seconds(origin: &Origin, key: &str, v: &str) -> Result<Duration, ConfigError> {
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

/// Smallest memory a VM may be given, in KiB (4 MiB): less is a typo.
pub(super) const MIN_MEMORY_KIB: u64 = 4 << 10;
/// Largest memory a VM may be given, in KiB (1 TiB): more is a typo.
pub(super) const MAX_MEMORY_KIB: u64 = 1 << 30;
/// Bare numbers below this (16 MiB as KiB) are refused as ambiguous: jitsu-dns took a bare
/// `memory` as MiB before it took Jitsu's KiB, and these are the values that were sizes in
/// MiB (up to 16 GiB) rather than plausible sizes in KiB.
pub(super) const MIN_BARE_MEMORY_KIB: u64 = 16 << 10;

/// `memory`, in KiB. A number with a unit (`65536K`, `64M`, `1G`; `KiB`, `MiB`, `GiB` too,
/// the letter in either case) anywhere; a bare number on the command line is KiB, as in Jitsu
/// (`memory=64000`), but only from 16384 up (below, it was a size in MiB here before, and is
/// refused saying how to write it now); the file takes units only (its `memory = 64` was MiB
/// before). 4 MiB to 1 TiB.
pub(super) fn parse_memory(origin: &Origin, key: &str, v: &str) -> Result<u64, ConfigError> {
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = v.split_at(digits);
    let n: u64 = number.parse().map_err(|_| {
        invalid(
            origin,
            key,
            v,
            "expected a size: 64M, 1G, 65536K (or, on the command line, a bare number of KiB, as in Jitsu)",
        )
    })?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "k" | "kib" => 0,
        "m" | "mib" => 10,
        "g" | "gib" => 20,
        "" => {
            if matches!(origin, Origin::File { .. }) {
                return Err(invalid(
                    origin,
                    key,
                    v,
                    format!(
                        "give a unit: memory = \"{v}M\" for {v} MiB, which is what a bare number \
                         meant in this file before (on the command line a bare number is KiB, as \
                         in Jitsu)"
                    ),
                ));
            }
            if n < MIN_BARE_MEMORY_KIB {
                return Err(invalid(
                    origin,
                    key,
                    v,
                    format!(
                        "a bare number is KiB, as in Jitsu, and {n} KiB is no size for a VM; \
                         jitsu-dns before took it as MiB: write {n}M for {n} MiB (or {n}K)"
                    ),
                ));
            }
            0
        }
        _ => {
            return Err(invalid(
                origin,
                key,
                v,
                "unknown unit: use K (KiB), M (MiB) or G (GiB)",
            ));
        }
    };
    let kib = n
        .checked_shl(shift)
        .filter(|k| k >> shift == n)
        .unwrap_or(u64::MAX);
    if !(MIN_MEMORY_KIB..=MAX_MEMORY_KIB).contains(&kib) {
        return Err(invalid(
            origin,
            key,
            v,
            "must be between 4 MiB (4M) and 1 TiB (1024G)",
        ));
    }
    Ok(kib)
}

pub(super) fn parse_positive_seconds(
    origin: &Origin,
    key: &str,
    v: &str,
) -> Result<Duration, ConfigError> {
    let t = parse_seconds(origin, key, v)?;
    if t.is_zero() {
        return Err(invalid(origin, key, v, "must be more than zero"));
    }
    Ok(t)
}

pub(super) fn parse_bool(origin: &Origin, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(invalid(origin, key, v, "expected true or false")),
    }
}

pub(super) fn parse_u64(
    origin: &Origin,
    key: &str,
    v: &str,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
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

pub(super) fn split_prefix<'a>(
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

/// A guest's IPv4 address with its prefix; a loopback address only if `loopback` allows it.
pub(super) fn parse_ipv4(
    origin: &Origin,
    key: &str,
    v: &str,
    loopback: bool,
) -> Result<(Ipv4Addr, u8), ConfigError> {
    let (addr, prefix) = split_prefix(origin, key, v, 32, 24)?;
    let ip: Ipv4Addr = addr.parse().map_err(|_| {
        invalid(
            origin,
            key,
            v,
            "not an IPv4 address (like 10.0.0.1 or 10.0.0.1/24)",
        )
    })?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(invalid(origin, key, v, "cannot be a guest's address"));
    }
    if ip.is_loopback() && !loopback {
        return Err(invalid(
            origin,
            key,
            v,
            "cannot be a guest's address (a libvirt VM may be reached through loopback)",
        ));
    }
    Ok((ip, prefix))
}

pub(super) fn parse_ipv6(
    origin: &Origin,
    key: &str,
    v: &str,
) -> Result<(Ipv6Addr, u8), ConfigError> {
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
pub(super) fn parse_dns_name(origin: &Origin, key: &str, v: &str) -> Result<Name, ConfigError> {
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

pub(super) fn parse_vm_dns_name(origin: &Origin, key: &str, v: &str) -> Result<Name, ConfigError> {
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

/// A value of one of the small enums (stop mode, backend, domain type), which say what they
/// take when refused.
pub(super) fn parse_enum<T: FromStr<Err = String>>(
    origin: &Origin,
    key: &str,
    v: &str,
) -> Result<T, ConfigError> {
    v.parse()
        .map_err(|why: String| invalid(origin, key, v, why))
}

pub(super) fn parse_ip(origin: &Origin, key: &str, v: &str) -> Result<IpAddr, ConfigError> {
    v.parse()
        .map_err(|_| invalid(origin, key, v, "not an IP address"))
}

pub(super) fn is_xenstore_path(p: &str) -> bool {
    !p.is_empty()
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_@-".contains(&b))
        && !p.contains("//")
        && !p.ends_with('/')
}

/// A network interface name (what the kernel takes: at most 15 bytes).
pub(super) fn parse_ifname(origin: &Origin, key: &str, v: &str) -> Result<String, ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 15
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(invalid(
            origin,
            key,
            v,
            "not an interface name (1 to 15 characters from A-Z a-z 0-9 - _ .)",
        ));
    }
    Ok(v.to_string())
}

/// A UUID, lower-cased.
pub(super) fn parse_uuid(origin: &Origin, key: &str, v: &str) -> Result<String, ConfigError> {
    let groups: Vec<&str> = v.split('-').collect();
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok {
        return Err(invalid(
            origin,
            key,
            v,
            "not a UUID (like 4dea22b3-1d52-d8f3-2516-782e98ab3fa0)",
        ));
    }
    Ok(v.to_ascii_lowercase())
}
