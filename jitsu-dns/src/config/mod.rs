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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use error::invalid;
use values::{parse_seconds, parse_u64};
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

/// Merges a parsed file (if any) under `flags` and validates everything.
pub fn merge(flags: &Flags, file: Option<&FileSettings>) -> Result<Config, ConfigError> {
    let no_origins = HashMap::new();
    let no_flags = Flags::default();
    let (from_file, file_origins) = match file {
        Some(f) => (&f.flags, &f.origins),
        None => (&no_flags, &no_origins),
    };
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

    let bind = match pick(&flags.bind, &from_file.bind, "--bind", "bind") {
        Some((v, o)) => v
            .parse::<IpAddr>()
            .map_err(|_| invalid(&o, "bind", &v, "not an IP address"))?,
        None => DEFAULT_BIND,
    };
    let listen = match pick(&flags.listen, &from_file.listen, "--listen", "listen") {
        Some((v, o)) => parse_u64(&o, "listen", &v, 1, 65535)? as u16,
        None => DEFAULT_LISTEN,
    };
    let forwarders = match pick(
        &flags.forwarder,
        &from_file.forwarder,
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
        &from_file.forwarder_port,
        "--forwarder-port",
        "forwarder_port",
    ) {
        Some((v, o)) => parse_u64(&o, "forwarder_port", &v, 1, 65535)? as u16,
        None => DEFAULT_FORWARDER_PORT,
    };
    let delay = match pick(&flags.delay, &from_file.delay, "--delay", "delay") {
        Some((v, o)) => parse_seconds(&o, "delay", &v)?,
        None => DEFAULT_DELAY,
    };
    let ttl = match pick(&flags.ttl, &from_file.ttl, "--ttl", "ttl") {
        // RFC 2181: TTLs are at most 2^31 - 1.
        Some((v, o)) => parse_u64(&o, "ttl", &v, 1, (1 << 31) - 1)? as u32,
        None => DEFAULT_TTL,
    };
    let mode = match pick(&flags.mode, &from_file.mode, "--mode", "mode") {
        Some((v, o)) => v
            .parse()
            .map_err(|why: String| invalid(&o, "mode", &v, why))?,
        None => StopMode::Destroy,
    };
    let backend = match pick(&flags.backend, &from_file.backend, "--backend", "backend") {
        Some((v, o)) => v
            .parse()
            .map_err(|why: String| invalid(&o, "backend", &v, why))?,
        // The process backend is the one that works everywhere; libvirt is chosen explicitly.
        None => BackendKind::Process,
    };
    let connect = pick(&flags.connect, &from_file.connect, "--connect", "connect").map(|(v, _)| v);
    let synjitsu = match pick(
        &flags.synjitsu,
        &from_file.synjitsu,
        "--synjitsu",
        "synjitsu",
    ) {
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
        &from_file.persistdb,
        "--persistdb",
        "persistdb",
    ) {
        Some((v, o)) if v.is_empty() => {
            return Err(invalid(&o, "persistdb", &v, "expected a directory"));
        }
        Some((v, _)) => Some(PathBuf::from(v)),
        None => None,
    };
    let metrics = match pick(&flags.metrics, &from_file.metrics, "--metrics", "metrics") {
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
        &from_file.log_level,
        "--log-level",
        "log_level",
    )
    .map(|(v, _)| v)
    .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
    let max_running = match pick(
        &flags.max_running,
        &from_file.max_running,
        "--max-running",
        "max_running",
    ) {
        Some((v, o)) => Some(parse_u64(&o, "max_running", &v, 1, 1 << 20)? as usize),
        None => None,
    };
    let max_boots_per_second = match pick(
        &flags.max_boots_per_second,
        &from_file.max_boots_per_second,
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
    })
}

#[cfg(test)]
mod tests;
