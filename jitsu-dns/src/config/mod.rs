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
use std::os::unix::fs::FileTypeExt as _;
use std::path::PathBuf;

use error::invalid;
use flags::Given;
use ipnet::IpNet;
use values::{parse_enum, parse_ip, parse_seconds, parse_u64, parse_uuid};
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
    let named = setting!(s, backend, parse_backend)?;
    let connect = setting!(s, connect, |o, _, v| Ok((o.clone(), v.to_string())))?;
    let (backend, connect, backend_why) = choose_backend(named, connect)?;
    let synjitsu = setting!(s, synjitsu, parse_synjitsu_socket)?;
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
    let max_removed_share =
        setting!(s, max_removed_share, parse_share)?.unwrap_or(DEFAULT_MAX_REMOVED_SHARE);
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
        // Jitsu's libxl backend built PV domains (its unikernels, MirageOS 2 and Rumprun, are
        // PV guests); libvirt's Xen default here is PVH.
        domain_type: (named == Some(BackendName::Libxl)).then_some(DomainType::XenPv),
    };
    // Relative paths of a spec are read from the working directory, as Jitsu read them; those
    // of the file from the file's directory, so that it means the same from anywhere.
    let cwd = std::env::current_dir().ok();
    let file_dir = file
        .and_then(|f| std::path::absolute(&f.path).ok())
        .and_then(|p| p.parent().map(PathBuf::from));
    let mut vms = Vec::new();
    for (i, spec) in flags.specs.iter().enumerate() {
        let entries = parse_spec(spec, i + 1)?;
        vms.push((build_vm(&entries, None, cwd.as_deref(), defaults)?, entries));
    }
    let (vm_tables, zone_tables) = match file {
        Some(f) => (&f.vms[..], &f.zones[..]),
        None => (&[][..], &[][..]),
    };
    for t in vm_tables {
        vms.push((
            build_vm(&t.entries, Some(&t.at), file_dir.as_deref(), defaults)?,
            t.entries.clone(),
        ));
    }
    check_distinct(&vms)?;
    let zones = zones_for(explicit_zones(zone_tables, bind)?, &vms, bind)?;

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
        backend_why,
        synjitsu,
        persistdb,
        metrics,
        log_level,
        max_running,
        max_boots_per_second,
        max_removed_share,
        zones,
        vms: vms.into_iter().map(|(v, _)| v).collect(),
        file: file.map(|f| f.path.clone()),
        forward_clients,
        forward_max,
        tcp_max_clients,
        tcp_max_per_client,
    })
}

/// What `-x` names: one of the backends, or Jitsu's `libxl`, which is libvirt's libxl driver.
/// `qemu` is the direct QEMU backend, not libvirt's QEMU driver (`-x libvirt -c qemu:///system`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendName {
    Kind(BackendKind),
    Libxl,
}

/// The URI libvirt's libxl driver answers at, for `-x libxl`.
pub const LIBXL_URI: &str = "xen:///system";

fn parse_backend(origin: &Origin, key: &str, v: &str) -> Result<BackendName, ConfigError> {
    match v {
        "libxl" => Ok(BackendName::Libxl),
        "xapi" => Err(invalid(
            origin,
            key,
            v,
            "XAPI (XenServer, XCP-ng) is not supported: on a Xen host, run libvirt and use \
             -x libxl (or -c xen:///system); XenServer and XCP-ng have no libvirt driver",
        )),
        _ => parse_enum::<BackendKind>(origin, key, v)
            .map(BackendName::Kind)
            .map_err(|_| invalid(origin, key, v, "expected process, libvirt, qemu or libxl")),
    }
}

/// The scheme of a URI (`xen` of `xen:///system`, `qemu+ssh` of `qemu+ssh://h/system`).
fn scheme(uri: &str) -> Option<&str> {
    uri.split_once(':').map(|(s, _)| s).filter(|s| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    })
}

/// The backend, its URI, and how it was chosen, from `-x` and `-c` (each with where it was
/// given): `-x` wins; without it the scheme of `-c` says (`process:` is the process backend,
/// any other scheme libvirt, as Jitsu's `-c xen:///` meant); without either, the process
/// backend, which works on any host. `-x libxl` is libvirt at `xen:///system`.
///
/// `qemu:` is both libvirt's QEMU driver (`qemu:///system`, `qemu:///session`) and the direct
/// QEMU backend's run directory (`-x qemu -c qemu:///run/jitsu/qemu`): without `-x`, a
/// `qemu:` URI stays libvirt's, as in Jitsu, and one naming a directory libvirt does not know
/// is refused, saying to add `-x qemu`.
#[allow(clippy::type_complexity)]
fn choose_backend(
    named: Option<BackendName>,
    connect: Option<(Origin, String)>,
) -> Result<(BackendKind, Option<String>, Option<String>), ConfigError> {
    let given = connect.as_ref().filter(|(_, u)| !u.is_empty());
    let libvirt = |u: &str, why: String| Ok((BackendKind::Libvirt, Some(u.to_string()), Some(why)));
    match (named, given) {
        (Some(BackendName::Kind(kind)), _) => Ok((kind, connect.map(|(_, u)| u), None)),
        (Some(BackendName::Libxl), None) => libvirt(
            LIBXL_URI,
            format!("-x libxl: libvirt's libxl driver at {LIBXL_URI}"),
        ),
        (Some(BackendName::Libxl), Some((origin, u))) => {
            if !scheme(u).is_some_and(|s| s == "xen" || s.starts_with("xen+")) {
                return Err(invalid(
                    origin,
                    "connect",
                    u,
                    "-x libxl is libvirt's libxl driver: give a xen URI (xen:///system, \
                     xen+ssh://host/system) or no -c",
                ));
            }
            libvirt(u, format!("-x libxl: libvirt's libxl driver at {u}"))
        }
        (None, None) => Ok((BackendKind::Process, connect.map(|(_, u)| u), None)),
        (None, Some((origin, u))) => match scheme(u) {
            Some("process") => Ok((BackendKind::Process, Some(u.to_string()), None)),
            Some("qemu") if !is_libvirt_qemu_uri(u) => Err(invalid(
                origin,
                "connect",
                u,
                "libvirt's QEMU driver takes qemu:///system or qemu:///session; a qemu:/// URI \
                 naming a run directory is the direct QEMU backend's: add -x qemu",
            )),
            Some(s) => libvirt(u, format!("libvirt, from the scheme {s}: of --connect")),
            None => Err(invalid(
                origin,
                "connect",
                u,
                "not a URI: expected process:///run/jitsu/process or a libvirt URI such as \
                 xen:///system or qemu:///system",
            )),
        },
    }
}

/// True for the URIs of libvirt's QEMU driver: a host (`qemu://host/system`), or the path
/// `/system`, `/session` or `/embed` (any query).
fn is_libvirt_qemu_uri(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("qemu://") else {
        return false;
    };
    let (host_path, _query) = rest.split_once('?').unwrap_or((rest, ""));
    let (host, path) = host_path.split_once('/').unwrap_or((host_path, ""));
    !host.is_empty() || matches!(path, "system" | "session" | "embed")
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

/// A share, from 0 to 1 (`max_removed_share`).
fn parse_share(origin: &Origin, key: &str, v: &str) -> Result<f64, ConfigError> {
    v.parse::<f64>()
        .ok()
        .filter(|x| (0.0..=1.0).contains(x))
        .ok_or_else(|| {
            invalid(
                origin,
                key,
                v,
                "expected a share from 0 to 1, like 0.5 (1.0: any)",
            )
        })
}

/// `--synjitsu`: the path of synjitsu's control socket. A UUID (what Jitsu 0.2 took, naming
/// its synjitsu unikernel) or a path that exists and is no socket is refused at start rather
/// than becoming a client that never connects; a path that does not exist yet is fine
/// (synjitsu may start later: the client keeps trying).
fn parse_synjitsu_socket(origin: &Origin, key: &str, v: &str) -> Result<PathBuf, ConfigError> {
    const WHAT: &str = "expected the path of synjitsu's control socket (synjitsu --control), \
                        like /run/jitsu/synjitsu.sock";
    let path = parse_path(origin, key, v, WHAT)?;
    if parse_uuid(origin, key, v).is_ok() {
        return Err(invalid(
            origin,
            key,
            v,
            format!(
                "a UUID is how Jitsu 0.2 named its synjitsu unikernel; this synjitsu is a \
                 daemon on the host: {WHAT}"
            ),
        ));
    }
    match std::fs::metadata(&path) {
        Ok(m) if !m.file_type().is_socket() => Err(invalid(
            origin,
            key,
            v,
            format!("this file exists and is not a socket: {WHAT}"),
        )),
        _ => Ok(path),
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
