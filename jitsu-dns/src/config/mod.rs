//! Configuration: Jitsu's flags, its `name=www,dns=www.example.org,ip=10.0.0.1,...` VM specs
//! and a TOML file with the same settings, turned into typed values at start-up.
//!
//! This module owns parsing and validation only: every value is checked here, once, and a bad
//! one is refused naming where it came from (flag, spec, or file and line), the key, the value
//! and why. It does not open sockets, read `/etc/resolv.conf` or ask the backend anything.
//!
//! Precedence: a flag beats the file, the file beats the default. VMs come from both the
//! positional specs and the file's `[[vm]]` tables; a name defined twice is refused.
//!
//! Layout: `types` (the validated configuration), `error` (refusals and origins), `flags`,
//! `spec` (the command line's VM specs), `file` (the TOML reader), `values` (each kind of
//! value), `vm` (building a VM from its keys), `zone` (the zones served); the global
//! settings are merged and checked here.

mod error;
mod file;
mod flags;
mod spec;
mod types;
mod values;
mod vm;
mod zone;

pub use error::{ConfigError, Origin};
pub use file::{FileSettings, from_toml, read};
pub use flags::Flags;
pub use spec::{Entry, parse_spec};
pub use types::*;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use error::invalid;
use flags::Given;
use ipnet::IpNet;
use values::{parse_enum, parse_ip, parse_seconds, parse_u64};
use vm::{VmDefaults, build_vm, check_distinct};
use zone::{explicit_zones, zones_for};

/// Reads the file named by `flags.config` (if any), merges it under the flags, and validates
/// everything.
pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
    let file = match &flags.config {
        Some(path) => Some(read(path)?),
        None => None,
    };
    merge(flags, file.as_ref())
}

/// Where the settings come from: the flags, then the file.
#[derive(Clone, Copy)]
struct Sources<'a> {
    flags: &'a Flags,
    file: Option<&'a FileSettings>,
}

impl Sources<'_> {
    /// Setting `key` (the field `field` of the flags and of the file) parsed by `parse`: the
    /// flag's value if given, else the file's, else `None`. The file's is read even when a
    /// flag overrides it, so a malformed file is refused all the same.
    fn get<T>(
        &self,
        key: &'static str,
        field: impl Fn(&Flags) -> &Option<Given>,
        parse: impl FnOnce(&Origin, &str, &str) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        let from_file = match self.file {
            Some(f) => field(&f.flags)
                .as_ref()
                .map(|g| g.text(key, Some(f)))
                .transpose()?,
            None => None,
        };
        let given = match field(self.flags) {
            Some(g) => Some(g.text(key, self.file)?),
            None => from_file,
        };
        given.map(|(v, o)| parse(&o, key, &v)).transpose()
    }
}

/// Setting `$key` of `$sources`, parsed by `$parse`: the field names the setting.
macro_rules! setting {
    ($sources:expr, $key:ident, $parse:expr) => {
        $sources.get(stringify!($key), |f| &f.$key, $parse)
    };
}

/// Merges a parsed file (if any) under `flags` and validates everything.
pub fn merge(flags: &Flags, file: Option<&FileSettings>) -> Result<Config, ConfigError> {
    let s = Sources { flags, file };
    let port = |o: &Origin, k: &str, v: &str| parse_u64(o, k, v, 1, 65535).map(|p| p as u16);
    let bind = setting!(s, bind, parse_ip)?.unwrap_or(DEFAULT_BIND);
    let listen = setting!(s, listen, port)?.unwrap_or(DEFAULT_LISTEN);
    let forwarders = setting!(s, forwarder, parse_forwarders)?.unwrap_or(Forwarders::System);
    let forwarder_port = setting!(s, forwarder_port, port)?.unwrap_or(DEFAULT_FORWARDER_PORT);
    let delay = setting!(s, delay, parse_seconds)?.unwrap_or(DEFAULT_DELAY);
    // RFC 2181: TTLs are at most 2^31 - 1.
    let ttl = setting!(s, ttl, |o, k, v| parse_u64(o, k, v, 1, (1 << 31) - 1))?
        .map_or(DEFAULT_TTL, |t| t as u32);
    let mode = setting!(s, mode, parse_enum)?.unwrap_or(StopMode::Destroy);
    // The process backend is the one that works everywhere; libvirt is chosen explicitly.
    let backend = setting!(s, backend, parse_enum)?.unwrap_or(BackendKind::Process);
    let connect = setting!(s, connect, as_text)?;
    let synjitsu = setting!(s, synjitsu, |o, k, v| {
        parse_path(o, k, v, "expected the path of synjitsu's control socket")
    })?;
    let persistdb = setting!(s, persistdb, |o, k, v| {
        parse_path(o, k, v, "expected a directory")
    })?;
    let metrics = setting!(s, metrics, parse_socket_addr)?;
    let log_level =
        setting!(s, log_level, as_text)?.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
    let max_running =
        setting!(s, max_running, |o, k, v| parse_u64(o, k, v, 1, 1 << 20))?.map(|n| n as usize);
    let max_boots_per_second = setting!(s, max_boots_per_second, |o, k, v| parse_u64(
        o,
        k,
        v,
        1,
        1 << 20
    ))?
    .map(|n| n as u32);
    let count = |o: &Origin, k: &str, v: &str| parse_u64(o, k, v, 1, 1 << 20).map(|n| n as usize);
    let forward_clients = setting!(s, forward_clients, parse_networks)?;
    let forward_max = setting!(s, forward_max, count)?.unwrap_or(DEFAULT_FORWARD_MAX);
    let tcp_max_clients = setting!(s, tcp_max_clients, count)?.unwrap_or(DEFAULT_TCP_MAX_CLIENTS);
    let tcp_max_per_client =
        setting!(s, tcp_max_per_client, count)?.unwrap_or(DEFAULT_TCP_MAX_PER_CLIENT);

    let defaults = VmDefaults {
        delay,
        mode,
        backend,
    };
    let mut vms = Vec::new();
    for (i, spec) in flags.specs.iter().enumerate() {
        let entries = parse_spec(spec, i + 1)?;
        vms.push((build_vm(&entries, None, defaults)?, entries));
    }
    let (vm_tables, zone_tables) = match file {
        Some(f) => (&f.vms[..], &f.zones[..]),
        None => (&[][..], &[][..]),
    };
    for t in vm_tables {
        vms.push((
            build_vm(&t.entries, Some(&t.at), defaults)?,
            t.entries.clone(),
        ));
    }
    check_distinct(&vms)?;
    let zones = zones_for(
        explicit_zones(zone_tables, bind)?,
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
        file: file.map(|f| f.path.clone()),
        forward_clients,
        forward_max,
        tcp_max_clients,
        tcp_max_per_client,
    })
}

/// `--forward-clients`: networks (`10.0.0.0/24`; an address alone is its own network),
/// comma-separated.
fn parse_networks(origin: &Origin, key: &str, v: &str) -> Result<Vec<IpNet>, ConfigError> {
    v.split(',')
        .map(|s| {
            let s = s.trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    invalid(
                        origin,
                        key,
                        v,
                        "expected networks like 10.0.0.0/24 or fd00::/64, comma-separated \
                         (0.0.0.0/0,::/0: every client)",
                    )
                })
        })
        .collect()
}

/// `-f`: a comma-separated list of servers; empty: the system's; `0.0.0.0`: none.
fn parse_forwarders(origin: &Origin, key: &str, v: &str) -> Result<Forwarders, ConfigError> {
    if v.trim().is_empty() {
        return Ok(Forwarders::System);
    }
    let list = v
        .split(',')
        .map(|s| {
            s.trim().parse::<IpAddr>().map_err(|_| {
                invalid(
                    origin,
                    key,
                    v,
                    "not an IP address (or a comma-separated list of them; 0.0.0.0 turns \
                     forwarding off, empty uses /etc/resolv.conf)",
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if list.iter().all(IpAddr::is_unspecified) {
        Ok(Forwarders::Off)
    } else if list.iter().any(IpAddr::is_unspecified) {
        Err(invalid(
            origin,
            key,
            v,
            "0.0.0.0 (no forwarding) cannot be mixed with servers",
        ))
    } else {
        Ok(Forwarders::List(list))
    }
}

/// A path that must not be empty (`why` says what it should name).
fn parse_path(origin: &Origin, key: &str, v: &str, why: &str) -> Result<PathBuf, ConfigError> {
    if v.is_empty() {
        return Err(invalid(origin, key, v, why));
    }
    Ok(PathBuf::from(v))
}

fn parse_socket_addr(origin: &Origin, key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse()
        .map_err(|_| invalid(origin, key, v, "expected address:port, like 127.0.0.1:9153"))
}

fn as_text(_: &Origin, _: &str, v: &str) -> Result<String, ConfigError> {
    Ok(v.to_string())
}

#[cfg(test)]
mod tests;
