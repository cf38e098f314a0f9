//! The process backend: each VM is its `command`, run in a network namespace of its own,
//! joined to a bridge by a veth pair with the VM's MAC and addresses, inside a cgroup of its
//! own so that it can be frozen and killed as a whole.
//!
//! URI: `process:///run/jitsu/process?netns_prefix=jitsu-&cgroup=auto&shutdown_grace=10`.
//! The path is the runtime directory (a `<vm>.state` record and a `<vm>.log` per VM);
//! `netns_prefix` names the namespaces (`<prefix><vm>`); `cgroup` picks the freezer
//! (`v2`: `cgroup.freeze` of a cgroup2 hierarchy, `v1`: the v1 freezer, `auto`: v2 if
//! mounted, else v1); `shutdown_grace` is how long `shutdown` waits after SIGTERM.
//!
//! Per VM, `start` creates:
//! - the namespace `<prefix><vm>` with `lo` up and `eth0` (MAC from the VM's `mac`), whose
//!   host side (a name derived from the VM's, at most 15 characters) is enslaved to the VM's
//!   `nic` bridge; `eth0` comes up with no address and IPv6 off, and once the bridge port
//!   forwards, `ifup=jitsu` adds the addresses (IPv6 without DAD probes) and the gateway and
//!   announces them (gratuitous ARP, unsolicited NA) unless synjitsu tracks the VM (its
//!   masking waits for the guest's own announcement), while with `ifup=guest` the command
//!   configures and announces them itself when it is ready;
//! - the cgroup `<mount>/jitsu/<prefix><vm>`;
//! - the command, `sh -c <command>`, spawned straight into its cgroup, a session of its own
//!   (jitsu-dns can exit and leave it running) and the namespace (`crate::sys::netns`), with `JITSU_NAME, JITSU_IP, JITSU_IP_PREFIX, JITSU_IP6, JITSU_IP6_PREFIX,
//!   JITSU_MAC, JITSU_IFACE=eth0, JITSU_GATEWAY` in its environment.
//!
//! The record holds the pid and its start time from `/proc/<pid>/stat`, so a reused pid is
//! never mistaken for the VM, and a zombie counts as dead. It is written before anything of
//! the VM's is made (with pid 0: nothing launched yet), naming the namespace, port and
//! cgroup it will have, and rewritten with the pid once the command runs: so a start cut
//! short (jitsu-dns killed with -9) leaves a record of what to remove, and [`open`] removes
//! the leftovers of every VM whose record names no live process (a start cut short, a VM
//! that died while jitsu-dns was down). VMs that run, or are frozen, are left to be adopted.
//!
//! [`open`]: ProcessBackend::open Counters come from the host side
//! of the veth in `/proc/net/dev`, which is right in whatever namespace jitsu-dns runs.
//!
//! Links, addresses and routes are made over rtnetlink ([`super::process_net`]), namespaces
//! as iproute2 makes them, so `ip netns` lists and enters them ([`crate::sys::netns`]): a
//! boot spawns nothing but the command (`sh`).

use std::ffi::CStr;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::mount::MountFlags;
use rustix::process::{Pid, Signal, kill_process};

use shared_proto::Mac;

use super::process_net::{Rtnl, gratuitous_arp, in_netns, sysctl};
use super::{
    Backend, BackendError, Domain, Listed, Started, create_runtime_dir, parse_shutdown_grace,
    record_value, uri_err,
};
use crate::config::{Ifup, StopMode, VmConfig};
use crate::fleet::{IfCounters, Observed};
use crate::sys::netns::{Cgroup, Spawn, create_netns, remove_netns, spawn_in_netns};

/// The runtime directory when the URI names none.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/jitsu/process";
/// The namespace prefix when the URI names none.
pub const DEFAULT_NETNS_PREFIX: &str = "jitsu-";
/// How long `shutdown` waits after SIGTERM before killing.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long freezing, thawing or emptying a cgroup may take.
const CGROUP_WAIT: Duration = Duration::from_secs(5);
/// The interface inside the VM's namespace.
pub const GUEST_IFACE: &str = "eth0";

/// Which cgroup freezer is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// The v1 freezer controller (`freezer.state`).
    V1,
    /// cgroup2's `cgroup.freeze`.
    V2,
}

/// The parsed `-c` URI.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessUri {
    /// Runtime directory.
    pub dir: PathBuf,
    /// Namespace prefix.
    pub netns_prefix: String,
    /// Forced freezer, or `None` for auto.
    pub cgroup: Option<CgroupVersion>,
    /// Grace period of `shutdown`.
    pub shutdown_grace: Duration,
}

/// Parses `process://<absolute dir>?netns_prefix=..&cgroup=..&shutdown_grace=..`.
pub fn parse_uri(uri: &str) -> Result<ProcessUri, BackendError> {
    let rest = uri.strip_prefix("process://").ok_or_else(|| {
        uri_err(
            uri,
            "the process backend takes process://<runtime dir>, e.g. process:///run/jitsu/process",
        )
    })?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let dir = if path.is_empty() {
        PathBuf::from(DEFAULT_RUNTIME_DIR)
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        return Err(uri_err(
            uri,
            "the runtime directory must be absolute (process:///dir: three slashes)",
        ));
    };
    let mut out = ProcessUri {
        dir,
        netns_prefix: DEFAULT_NETNS_PREFIX.to_string(),
        cgroup: None,
        shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| uri_err(uri, format!("query parameter {pair:?} is not key=value")))?;
        match k {
            "netns_prefix" => {
                let ok = v.len() <= 32
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                if !ok {
                    return Err(uri_err(
                        uri,
                        "netns_prefix: at most 32 characters from A-Z a-z 0-9 - _ .",
                    ));
                }
                out.netns_prefix = v.to_string();
            }
            "cgroup" => {
                out.cgroup = match v {
                    "v1" => Some(CgroupVersion::V1),
                    "v2" => Some(CgroupVersion::V2),
                    "auto" => None,
                    _ => return Err(uri_err(uri, "cgroup: expected v1, v2 or auto")),
                }
            }
            "shutdown_grace" => out.shutdown_grace = parse_shutdown_grace(uri, v)?,
            other => {
                return Err(uri_err(
                    uri,
                    format!(
                        "unknown parameter {other:?}; known: netns_prefix, cgroup, shutdown_grace"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// The per-VM names: namespace, host-side port, cgroup, files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Names {
    netns: String,
    port: String,
    cgroup: PathBuf,
    record: PathBuf,
    /// The launcher's pid file of versions that started the command through `setsid -f`:
    /// still removed and swept, as a start of theirs cut short may have left one.
    pidfile: PathBuf,
    log: PathBuf,
}

/// A running VM as recorded at its start.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    pid: u32,
    start: u64,
    netns: String,
    port: String,
    cgroup: PathBuf,
}

impl Record {
    fn to_text(&self) -> String {
        format!(
            "pid={}\nstart={}\nnetns={}\nport={}\ncgroup={}\n",
            self.pid,
            self.start,
            self.netns,
            self.port,
            self.cgroup.display()
        )
    }

    /// The record in the file `path`, if there is one and it parses.
    fn read(path: &Path) -> Option<Record> {
        fs::read_to_string(path)
            .ok()
            .and_then(|t| Record::parse(&t))
    }

    fn parse(text: &str) -> Option<Record> {
        let get = |k: &str| record_value(text, k);
        Some(Record {
            pid: get("pid")?.parse().ok()?,
            start: get("start")?.parse().ok()?,
            netns: get("netns")?.to_string(),
            port: get("port")?.to_string(),
            cgroup: PathBuf::from(get("cgroup")?),
        })
    }
}

/// 32-bit FNV-1a: stable across versions, unlike std's hasher.
fn fnv32(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The host-side interface name: `j`, up to 7 characters of the VM's name, 7 hex digits of a
/// hash of prefix and name; at most 15 characters (IFNAMSIZ - 1), unique per prefix and name.
fn port_name(prefix: &str, name: &str) -> String {
    let stem: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(7)
        .collect();
    let h = fnv32(format!("{prefix}{name}").as_bytes()) & 0x0fff_ffff;
    format!("j{stem}{h:07x}")
}

/// Reads `/proc/<pid>/stat`: the state letter and the start time (clock ticks after boot).
pub(super) fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<(char, u64)> {
    // The command name is in parentheses and may hold anything, ')' included: split at the
    // last one.
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state); start time is field 22.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Sends `sig` to process `pid`. A process that is already gone is not an error.
pub(super) fn kill(pid: u32, sig: Signal) -> std::io::Result<()> {
    // Positive only: 0 and negative pids name process groups, -1 every process.
    let pid = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a process id"))?;
    match kill_process(pid, sig) {
        Ok(()) | Err(Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn alive(rec: &Record) -> bool {
    matches!(proc_stat(rec.pid), Some((state, start)) if start == rec.start && !matches!(state, 'Z' | 'X' | 'x'))
}

/// Packet counters of `iface` from `/proc/net/dev` text.
pub(super) fn parse_net_dev(text: &str, iface: &str) -> Option<IfCounters> {
    text.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != iface {
            return None;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        Some(IfCounters {
            rx_packets: *f.get(1)?,
            tx_packets: *f.get(9)?,
        })
    })
}

/// Mount points of a cgroup2 hierarchy and of the v1 freezer, from mountinfo text.
fn parse_mountinfo(text: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let mut v2 = None;
    let mut v1 = None;
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let _source = r.next();
        let opts = r.next().unwrap_or("");
        let mp = PathBuf::from(mount_point.replace("\\040", " "));
        if fstype == "cgroup2" && v2.is_none() {
            v2 = Some(mp);
        } else if fstype == "cgroup" && opts.split(',').any(|o| o == "freezer") && v1.is_none() {
            v1 = Some(mp);
        }
    }
    (v2, v1)
}

/// The cgroup hierarchy VMs live in.
#[derive(Debug, Clone)]
struct Cgroups {
    version: CgroupVersion,
    /// `<mount>/jitsu`.
    root: PathBuf,
}

impl Cgroups {
    fn detect(force: Option<CgroupVersion>, runtime_dir: &Path) -> Result<Cgroups, BackendError> {
        let info = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| BackendError::Host(format!("cannot read /proc/self/mountinfo: {e}")))?;
        let (v2, v1) = parse_mountinfo(&info);
        let version = force.unwrap_or(if v2.is_some() || v1.is_none() {
            CgroupVersion::V2
        } else {
            CgroupVersion::V1
        });
        let mount = match (version, v2, v1) {
            (CgroupVersion::V2, Some(m), _) | (CgroupVersion::V1, _, Some(m)) => m,
            // `ip netns exec` remounts /sys, hiding /sys/fs/cgroup: mount the same hierarchy
            // again, privately, under our runtime directory.
            (version, _, _) => Self::mount_privately(version, runtime_dir)?,
        };
        let root = mount.join("jitsu");
        fs::create_dir_all(&root).map_err(|e| {
            BackendError::Host(format!("cannot create cgroup {}: {e}", root.display()))
        })?;
        let control = match version {
            CgroupVersion::V2 => "cgroup.freeze",
            CgroupVersion::V1 => "freezer.state",
        };
        if !root.join(control).exists() {
            return Err(BackendError::Host(format!(
                "cgroup {} has no {control}: this kernel cannot freeze VMs there",
                root.display()
            )));
        }
        Ok(Cgroups { version, root })
    }

    fn mount_privately(
        version: CgroupVersion,
        runtime_dir: &Path,
    ) -> Result<PathBuf, BackendError> {
        // (directory, (file system type and source, options)), as `mount -t cgroup2 cgroup2
        // <dir>` and `mount -t cgroup -o freezer cgroup <dir>`.
        let (dir, args): (PathBuf, (&CStr, Option<&CStr>)) = match version {
            CgroupVersion::V2 => (runtime_dir.join("cgroup2"), (c"cgroup2", None)),
            CgroupVersion::V1 => (runtime_dir.join("freezer"), (c"cgroup", Some(c"freezer"))),
        };
        fs::create_dir_all(&dir)
            .map_err(|e| BackendError::Host(format!("cannot create {}: {e}", dir.display())))?;
        let (fs_type, options) = args;
        match rustix::mount::mount(fs_type, &dir, fs_type, MountFlags::empty(), options) {
            Ok(()) => {
                tracing::info!(mount = %dir.display(), ?version, "no cgroup hierarchy visible: mounted one privately");
                Ok(dir)
            }
            Err(e) => Err(BackendError::Host(format!(
                "no {version:?} cgroup hierarchy is mounted and mounting one at {} failed: {e}",
                dir.display(),
            ))),
        }
    }

    fn procs(dir: &Path) -> Vec<u32> {
        fs::read_to_string(dir.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    fn is_frozen(&self, dir: &Path) -> bool {
        match self.version {
            CgroupVersion::V2 => fs::read_to_string(dir.join("cgroup.events"))
                .map(|t| t.lines().any(|l| l.trim() == "frozen 1"))
                .unwrap_or(false),
            CgroupVersion::V1 => fs::read_to_string(dir.join("freezer.state"))
                .map(|t| t.trim() == "FROZEN")
                .unwrap_or(false),
        }
    }

    fn is_thawed(&self, dir: &Path) -> bool {
        match self.version {
            CgroupVersion::V2 => fs::read_to_string(dir.join("cgroup.events"))
                .map(|t| t.lines().any(|l| l.trim() == "frozen 0"))
                .unwrap_or(true),
            CgroupVersion::V1 => fs::read_to_string(dir.join("freezer.state"))
                .map(|t| t.trim() == "THAWED")
                .unwrap_or(true),
        }
    }

    /// Freezes or thaws, and waits until the kernel says it is done.
    fn set_frozen(&self, dir: &Path, frozen: bool) -> Result<(), String> {
        let (file, value) = match (self.version, frozen) {
            (CgroupVersion::V2, true) => ("cgroup.freeze", "1"),
            (CgroupVersion::V2, false) => ("cgroup.freeze", "0"),
            (CgroupVersion::V1, true) => ("freezer.state", "FROZEN"),
            (CgroupVersion::V1, false) => ("freezer.state", "THAWED"),
        };
        fs::write(dir.join(file), value)
            .map_err(|e| format!("writing {value} to {}: {e}", dir.join(file).display()))?;
        let done = || {
            if frozen {
                self.is_frozen(dir)
            } else {
                self.is_thawed(dir)
            }
        };
        if wait_until(CGROUP_WAIT, done) {
            Ok(())
        } else {
            Err(format!(
                "{} did not reach {value} within {CGROUP_WAIT:?}",
                dir.display()
            ))
        }
    }

    /// Kills everything in the cgroup and removes it.
    fn destroy(&self, dir: &Path) -> Result<(), String> {
        if !dir.exists() {
            return Ok(());
        }
        let kill_file = dir.join("cgroup.kill");
        if self.version == CgroupVersion::V2 && kill_file.exists() {
            fs::write(&kill_file, "1")
                .map_err(|e| format!("writing {}: {e}", kill_file.display()))?;
        } else {
            for pid in Self::procs(dir) {
                kill(pid, Signal::KILL).map_err(|e| format!("killing {pid}: {e}"))?;
            }
        }
        // Frozen tasks die only once thawed.
        if self.is_frozen(dir) || !self.is_thawed(dir) {
            self.set_frozen(dir, false)?;
        }
        if !wait_until(CGROUP_WAIT, || {
            let left = Self::procs(dir);
            for pid in &left {
                let _ = kill(*pid, Signal::KILL);
            }
            left.is_empty()
        }) {
            return Err(format!(
                "{} still has processes after SIGKILL",
                dir.display()
            ));
        }
        // The last task may still be leaving: rmdir says EBUSY until it has.
        let mut last = None;
        if wait_until(CGROUP_WAIT, || match fs::remove_dir(dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                last = Some(e);
                false
            }
        }) {
            Ok(())
        } else {
            Err(format!(
                "removing {}: {}",
                dir.display(),
                last.map(|e| e.to_string()).unwrap_or_default()
            ))
        }
    }
}

/// Polls `cond` until it holds or `limit` passed: first after 100 us, then twice as long each
/// time up to every 5 ms, so that what is done at once (a pid file, a port forwarding) is
/// seen at once and what takes seconds costs few polls.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(100);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Starts in flight at once, per CPU. A start is CPU work in the kernel (namespaces, links,
/// a fork), and 200 queried at once all in flight thrash: each took 1.4-1.7 s instead of
/// 20-35 ms, 70-95 boots/s in all where 2 per CPU made 100 (`bench/boots`, 2 CPUs, loaded),
/// and the state store's writer got too little of the CPU to keep up (issue 12).
const STARTS_PER_CPU: usize = 2;

/// At most `limit` holders at once; the others wait their turn, in no promised order (a
/// counting semaphore for blocking threads).
#[derive(Debug)]
struct Gate {
    limit: usize,
    held: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

/// A place through a [`Gate`], given back when dropped.
struct Pass<'a>(&'a Gate);

impl Gate {
    fn new(limit: usize) -> Gate {
        Gate {
            limit: limit.max(1),
            held: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Waits for a place.
    fn enter(&self) -> Pass<'_> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while *held >= self.limit {
            held = self.freed.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        *held += 1;
        Pass(self)
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut held = self.0.held.lock().unwrap_or_else(|p| p.into_inner());
        *held -= 1;
        self.0.freed.notify_one();
    }
}

/// The process backend.
#[derive(Debug)]
pub struct ProcessBackend {
    uri: ProcessUri,
    cgroups: Cgroups,
    starts: Gate,
}

/// The MAC of every VM's bridge port (never the lowest on a bridge; it sends nothing).
pub(super) const PORT_MAC: &str = "fe:ff:ff:ff:ff:ff";
/// [`PORT_MAC`] as bytes, for netlink.
const PORT_MAC_OCTETS: Mac = Mac([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]);

/// Inside the VM's namespace first: `lo` and `eth0` up, `eth0` with no address and IPv6 off,
/// so the guest's MAC stays silent while the bridge port behind it starts forwarding. (A
/// frame sent the instant a veth comes up, such as `arp_notify`'s gratuitous ARP, reaches a
/// bridge port that is still disabled and is lost.)
fn guest_link_up() -> Result<(), String> {
    if Path::new("/proc/sys/net/ipv6/conf")
        .join(GUEST_IFACE)
        .exists()
    {
        sysctl(&format!("ipv6/conf/{GUEST_IFACE}/disable_ipv6"), "1")?;
    }
    let mut r = Rtnl::open().map_err(|e| format!("netlink socket: {e}"))?;
    for link in ["lo", GUEST_IFACE] {
        r.index(link)
            .and_then(|i| r.set_up(i))
            .map_err(|e| format!("bringing {link} up: {e}"))?;
    }
    Ok(())
}

/// Inside the VM's namespace once the bridge forwards, for `ifup=jitsu`: the addresses and the
/// gateway. Each address is announced as a guest's own stack would (a gratuitous ARP, sent
/// here, and an unsolicited NA, which Linux sends for a new address that went through DAD,
/// here with no probes) unless synjitsu tracks the VM: then its masking waits for the
/// guest's own announcement, which says it listens, and one sent now, before the command
/// even runs, would end synjitsu's stand-in and answer `wait_for=announce` early (issue 12).
/// With `ifup=guest` the command does all of this itself when it is ready.
fn guest_addresses(vm: &VmConfig) -> Result<(), String> {
    let announce = !vm.synjitsu_tracked();
    let mut r = Rtnl::open().map_err(|e| format!("netlink socket: {e}"))?;
    let eth0 = r
        .index(GUEST_IFACE)
        .map_err(|e| format!("{GUEST_IFACE}: {e}"))?;
    r.add_address(eth0, IpAddr::V4(vm.ip), vm.ip_prefix, false)
        .map_err(|e| format!("adding {}/{}: {e}", vm.ip, vm.ip_prefix))?;
    if let Some(ip6) = vm.ip6 {
        let conf = format!("ipv6/conf/{GUEST_IFACE}");
        sysctl(&format!("{conf}/accept_ra"), "0")?;
        sysctl(&format!("{conf}/dad_transmits"), "0")?;
        sysctl(
            &format!("{conf}/ndisc_notify"),
            if announce { "1" } else { "0" },
        )?;
        sysctl(&format!("{conf}/disable_ipv6"), "0")?;
        r.add_address(eth0, IpAddr::V6(ip6), vm.ip6_prefix, false)
            .map_err(|e| format!("adding {ip6}/{}: {e}", vm.ip6_prefix))?;
    }
    if let Some(gw) = vm.gateway {
        r.add_default_route(gw)
            .map_err(|e| format!("default route via {gw}: {e}"))?;
    }
    if announce {
        // Sent once, and not waited on: nothing answers a gratuitous ARP (iputils' `arping
        // -U -c 1` waited a second for replies, on every boot).
        crate::sys::packet::broadcast_arp(eth0, &gratuitous_arp(vm.mac(), vm.ip))
            .map_err(|e| format!("gratuitous ARP: {e}"))?;
    }
    Ok(())
}

/// How long a new bridge port may take to forward before the VM starts anyway.
const PORT_FORWARDING_TIMEOUT: Duration = Duration::from_secs(3);

/// Waits until the bridge port `port` forwards (`brport/state` 3), up to
/// [`PORT_FORWARDING_TIMEOUT`]; returns whether it does.
fn wait_port_forwarding(port: &str) -> bool {
    let state = format!("/sys/class/net/{port}/brport/state");
    wait_until(PORT_FORWARDING_TIMEOUT, || {
        fs::read_to_string(&state).is_ok_and(|s| s.trim() == "3")
    })
}

impl ProcessBackend {
    /// Opens the backend: parses the URI, creates the runtime directory, finds the freezer,
    /// and removes the leftovers of VMs that do not run (see the module's documentation).
    pub fn open(uri: Option<&str>) -> Result<ProcessBackend, BackendError> {
        let default = format!("process://{DEFAULT_RUNTIME_DIR}");
        let uri = parse_uri(uri.unwrap_or(&default))?;
        create_runtime_dir(&uri.dir)?;
        let cgroups = Cgroups::detect(uri.cgroup, &uri.dir)?;
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let backend = ProcessBackend {
            uri,
            cgroups,
            starts: Gate::new(STARTS_PER_CPU * cpus),
        };
        let swept = backend.sweep();
        if !swept.is_empty() {
            tracing::info!(
                vms = swept.len(),
                "swept the leftovers of VMs that do not run"
            );
        }
        Ok(backend)
    }

    fn names(&self, vm: &str) -> Names {
        let netns = format!("{}{vm}", self.uri.netns_prefix);
        Names {
            port: port_name(&self.uri.netns_prefix, vm),
            cgroup: self.cgroups.root.join(&netns),
            netns,
            record: self.uri.dir.join(format!("{vm}.state")),
            pidfile: self.uri.dir.join(format!("{vm}.pid")),
            log: self.uri.dir.join(format!("{vm}.log")),
        }
    }

    fn record(&self, vm: &str) -> Option<Record> {
        Record::read(&self.names(vm).record)
    }

    /// The state of the VM `rec` records: off unless its process is alive, suspended while
    /// its cgroup is frozen.
    fn observe(&self, rec: Option<Record>) -> Observed {
        match rec {
            Some(r) if alive(&r) => {
                if self.cgroups.is_frozen(&r.cgroup) {
                    Observed::Suspended
                } else {
                    Observed::Running { domid: None }
                }
            }
            _ => Observed::Off,
        }
    }

    /// Removes everything of the VM's: processes, cgroup, interfaces, namespace, record.
    fn teardown(&self, vm: &VmConfig) -> Result<(), BackendError> {
        self.teardown_named(&vm.name)
    }

    /// [`Self::teardown`] of the VM named `vm`, configured or not.
    fn teardown_named(&self, vm: &str) -> Result<(), BackendError> {
        let n = self.names(vm);
        let err = |what, detail| BackendError::Vm {
            vm: vm.to_string(),
            what,
            detail,
        };
        let rec = self.record(vm);
        let mut cgroups = vec![n.cgroup.clone()];
        let mut ports = vec![n.port.clone()];
        let mut namespaces = vec![n.netns.clone()];
        if let Some(r) = &rec {
            cgroups.push(r.cgroup.clone());
            ports.push(r.port.clone());
            namespaces.push(r.netns.clone());
            if alive(r) {
                // Outside its cgroup (moved by someone?): it still goes.
                kill(r.pid, Signal::KILL).map_err(|e| err("kill", e.to_string()))?;
            }
        }
        cgroups.dedup();
        ports.dedup();
        namespaces.dedup();
        for dir in &cgroups {
            self.cgroups
                .destroy(dir)
                .map_err(|d| err("destroy cgroup", d))?;
        }
        // Deleting the host side destroys the pair at once; the namespace may linger while
        // the kernel cleans it up.
        let net_dev = fs::read_to_string("/proc/net/dev").unwrap_or_default();
        if ports.iter().any(|p| parse_net_dev(&net_dev, p).is_some()) {
            let mut rtnl =
                Rtnl::open().map_err(|e| err("delete port", format!("netlink socket: {e}")))?;
            for port in &ports {
                if let Err(e) = rtnl.del_link(port) {
                    tracing::warn!(vm = %vm, port = %port, error = %e, "cannot delete the port");
                }
            }
        }
        for ns in &namespaces {
            remove_netns(ns).map_err(|e| err("delete namespace", e.to_string()))?;
        }
        for f in [&n.record, &n.pidfile, &n.record.with_extension("state.tmp")] {
            match fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err("remove record", format!("{}: {e}", f.display()))),
            }
        }
        Ok(())
    }

    /// Removes what earlier runs left of VMs that do not run: every VM with a record, a pid
    /// file or a half-written record in the runtime directory whose recorded process is not
    /// alive. Returns the VMs swept.
    fn sweep(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.uri.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().into_string().ok()?;
                [".state", ".pid", ".state.tmp"]
                    .iter()
                    .find_map(|ext| file.strip_suffix(ext))
                    .filter(|vm| is_vm_name(vm))
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        names.dedup();
        names.retain(|vm| !self.record(vm).is_some_and(|r| alive(&r)));
        for vm in &names {
            match self.teardown_named(vm) {
                Ok(()) => {
                    tracing::info!(vm = %vm, "removed what an earlier run left of a VM that does not run (namespace, port, cgroup, record)")
                }
                Err(e) => {
                    tracing::warn!(vm = %vm, error = %e, "cannot remove what an earlier run left of a VM")
                }
            }
        }
        names
    }

    fn launch(&self, vm: &VmConfig, n: &Names) -> Result<Record, String> {
        let command = vm
            .command
            .as_deref()
            .ok_or("no command (the configuration requires one for the process backend)")?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .map_err(|e| format!("opening {}: {e}", n.log.display()))?;
        let env = guest_env(vm);
        let spawn = Spawn {
            command,
            env: &env,
            log: &log,
            netns: &n.netns,
            cgroup: match self.cgroups.version {
                CgroupVersion::V2 => Cgroup::Born(&n.cgroup),
                CgroupVersion::V1 => Cgroup::Joined(&n.cgroup),
            },
        };
        let pid = spawn_in_netns(&spawn)
            .map_err(|e| format!("spawning sh -c {command:?} in {}: {e}", n.netns))?;
        // Read before anything reaps it: a command that already exited is a zombie, dead.
        let stat = proc_stat(pid);
        // jitsu-dns's child until it exits: reaped by a thread of its own so that no zombie
        // stays (a VM adopted after a restart is init's to reap).
        let reaper = std::thread::Builder::new()
            .name(format!("reap {}", vm.name))
            .stack_size(REAPER_STACK)
            .spawn(move || {
                let pid = i32::try_from(pid).ok().and_then(Pid::from_raw);
                rustix::process::waitpid(pid, rustix::process::WaitOptions::empty())
            });
        if let Err(e) = reaper {
            tracing::warn!(vm = %vm.name, pid, error = %e, "no thread to reap the command: it stays a zombie once it exits");
        }
        let (_, start) = stat.filter(|(state, _)| *state != 'Z').ok_or_else(|| {
            format!(
                "the command exited at once; its log {} says: {}",
                n.log.display(),
                tail(&n.log)
            )
        })?;
        Ok(Record {
            pid,
            start,
            netns: n.netns.clone(),
            port: n.port.clone(),
            cgroup: n.cgroup.clone(),
        })
    }
}

/// The stack of a thread that only waits for a child.
const REAPER_STACK: usize = 64 * 1024;

/// True for a name a VM can have (1 to 64 of `A-Za-z0-9._-`, not `.` or `..`): only those
/// are swept, so nothing else in the runtime directory names a namespace to delete.
fn is_vm_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name != "."
        && name != ".."
}

/// Writes `rec` as the record at `path`, whole or not at all.
fn write_record(path: &Path, rec: &Record) -> std::io::Result<()> {
    let tmp = path.with_extension("state.tmp");
    fs::write(&tmp, rec.to_text()).and_then(|()| fs::rename(&tmp, path))
}

/// The last line or so of a log, for error messages.
pub(super) fn tail(path: &Path) -> String {
    let t = fs::read_to_string(path).unwrap_or_default();
    let t = t.trim_end();
    let start = t.len().saturating_sub(300);
    let start = (start..t.len())
        .find(|i| t.is_char_boundary(*i))
        .unwrap_or(t.len());
    t[start..].to_string()
}

/// The VM's environment: what its command needs to configure itself.
fn guest_env(vm: &VmConfig) -> Vec<(&'static str, String)> {
    vec![
        ("JITSU_NAME", vm.name.to_string()),
        ("JITSU_IP", vm.ip.to_string()),
        ("JITSU_IP_PREFIX", vm.ip_prefix.to_string()),
        (
            "JITSU_IP6",
            vm.ip6.map(|a| a.to_string()).unwrap_or_default(),
        ),
        (
            "JITSU_IP6_PREFIX",
            vm.ip6
                .map(|_| vm.ip6_prefix.to_string())
                .unwrap_or_default(),
        ),
        ("JITSU_MAC", vm.mac().to_string()),
        ("JITSU_IFACE", GUEST_IFACE.to_string()),
        (
            "JITSU_GATEWAY",
            vm.gateway.map(|g| g.to_string()).unwrap_or_default(),
        ),
    ]
}

impl Backend for ProcessBackend {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn lookup(&self, vm: &VmConfig) -> Result<Domain, BackendError> {
        Ok(Domain {
            state: self.observe(self.record(&vm.name)),
            domid: None,
            macs: vec![vm.mac()],
            fixed_port: Some(self.names(&vm.name).port),
        })
    }

    fn start(&self, vm: &VmConfig) -> Result<Started, BackendError> {
        let n = self.names(&vm.name);
        let err = |what, detail| BackendError::vm(vm, what, detail);
        let _pass = self.starts.enter();
        self.teardown(vm)?;
        let mut rtnl = Rtnl::open().map_err(|e| err("start", format!("netlink socket: {e}")))?;
        let bridge = rtnl.index(vm.nic()).map_err(|_| {
            err(
                "start",
                format!(
                    "there is no bridge {} in jitsu-dns's network namespace (the VM's nic)",
                    vm.nic()
                ),
            )
        })?;
        // Where a boot's time goes, for the debug log: (phase, when it ended).
        let t0 = Instant::now();
        let mut phases: Vec<(&str, Duration)> = Vec::with_capacity(5);
        let result = (|| -> Result<Record, BackendError> {
            // Written first, so that a start cut short leaves a record of what it made.
            let provisional = Record {
                pid: 0,
                start: 0,
                netns: n.netns.clone(),
                port: n.port.clone(),
                cgroup: n.cgroup.clone(),
            };
            write_record(&n.record, &provisional)
                .map_err(|e| err("write record", format!("{}: {e}", n.record.display())))?;
            fs::create_dir_all(&n.cgroup)
                .map_err(|e| err("create cgroup", format!("{}: {e}", n.cgroup.display())))?;
            let netns =
                create_netns(&n.netns).map_err(|e| err("create namespace", e.to_string()))?;
            phases.push(("netns", t0.elapsed()));
            // The host side takes the highest unicast MAC, as Xen gives every vif backend: a
            // bridge whose address was never set takes the lowest MAC of its ports, and a
            // random one here would move the host's own MAC on the bridge each time a VM
            // boots or stops, leaving its clients' ARP caches wrong.
            rtnl.add_veth(
                &n.port,
                PORT_MAC_OCTETS,
                bridge,
                GUEST_IFACE,
                vm.mac(),
                &netns,
            )
            .map_err(|e| err("create veth pair", e.to_string()))?;
            // A bridge port needs no address; without IPv6 on it, it sends nothing of its
            // own to the guest (which would look like traffic to idle detection).
            let _ = fs::write(
                format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", n.port),
                "1",
            );
            rtnl.index(&n.port)
                .and_then(|i| rtnl.set_up(i))
                .map_err(|e| err("bring port up", e.to_string()))?;
            in_netns(&netns, guest_link_up).map_err(|d| err("bring eth0 up", d))?;
            phases.push(("links", t0.elapsed()));
            if !wait_port_forwarding(&n.port) {
                tracing::warn!(vm = %vm.name, port = %n.port, "bridge port not forwarding yet; starting anyway");
            }
            phases.push(("forwarding", t0.elapsed()));
            if vm.ifup == Ifup::Jitsu {
                in_netns(&netns, || guest_addresses(vm)).map_err(|d| err("configure eth0", d))?;
            }
            phases.push(("addresses", t0.elapsed()));
            let rec = self.launch(vm, &n).map_err(|d| err("start command", d))?;
            phases.push(("command", t0.elapsed()));
            write_record(&n.record, &rec)
                .map_err(|e| err("write record", format!("{}: {e}", n.record.display())))?;
            Ok(rec)
        })();
        match result {
            Ok(rec) => {
                tracing::debug!(vm = %vm.name, pid = rec.pid, netns = %rec.netns, port = %rec.port, ?phases, "process started");
                Ok(Started {
                    domid: None,
                    port: Some(rec.port),
                })
            }
            Err(e) => {
                // Leave nothing half-made behind.
                if let Err(t) = self.teardown(vm) {
                    tracing::warn!(vm = %vm.name, error = %t, "cleaning up after a failed start");
                }
                Err(e)
            }
        }
    }

    fn stop(&self, vm: &VmConfig, mode: StopMode) -> Result<(), BackendError> {
        let err = |what, detail| BackendError::vm(vm, what, detail);
        let rec = self.record(&vm.name);
        match mode {
            StopMode::Destroy => self.teardown(vm),
            StopMode::Suspend => {
                let r = rec
                    .filter(alive)
                    .ok_or_else(|| err("suspend", "not running".into()))?;
                self.cgroups
                    .set_frozen(&r.cgroup, true)
                    .map_err(|d| err("suspend", d))
            }
            StopMode::Shutdown => {
                if let Some(r) = rec.filter(alive) {
                    if !self.cgroups.is_thawed(&r.cgroup) {
                        self.cgroups
                            .set_frozen(&r.cgroup, false)
                            .map_err(|d| err("thaw", d))?;
                    }
                    for pid in Cgroups::procs(&r.cgroup) {
                        kill(pid, Signal::TERM).map_err(|e| err("shutdown", e.to_string()))?;
                    }
                    if !wait_until(self.uri.shutdown_grace, || !alive(&r)) {
                        tracing::info!(vm = %vm.name, grace = ?self.uri.shutdown_grace, "still running after SIGTERM: destroying");
                    }
                }
                self.teardown(vm)
            }
        }
    }

    fn resume(&self, vm: &VmConfig) -> Result<Started, BackendError> {
        let err = |detail| BackendError::vm(vm, "resume", detail);
        let r = self
            .record(&vm.name)
            .filter(alive)
            .ok_or_else(|| err("not running (nothing to resume)".into()))?;
        self.cgroups.set_frozen(&r.cgroup, false).map_err(err)?;
        Ok(Started {
            domid: None,
            port: Some(r.port),
        })
    }

    fn unpause(&self, vm: &VmConfig) -> Result<Started, BackendError> {
        // Processes have one way of pausing: the freezer.
        self.resume(vm)
    }

    fn counters(&self, vm: &VmConfig) -> Result<Option<IfCounters>, BackendError> {
        let port = self
            .record(&vm.name)
            .map(|r| r.port)
            .unwrap_or_else(|| self.names(&vm.name).port);
        let text = fs::read_to_string("/proc/net/dev")
            .map_err(|e| BackendError::vm(vm, "counters", format!("/proc/net/dev: {e}")))?;
        Ok(parse_net_dev(&text, &port))
    }

    fn list(&self) -> Result<Vec<Listed>, BackendError> {
        let entries = fs::read_dir(&self.uri.dir).map_err(|e| {
            BackendError::Host(format!("cannot list {}: {e}", self.uri.dir.display()))
        })?;
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("state") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            out.push(Listed {
                name: name.to_string(),
                state: self.observe(Record::read(&path)),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_mac_is_one_address_as_text_and_as_bytes() {
        assert_eq!(PORT_MAC.parse::<Mac>().unwrap(), PORT_MAC_OCTETS);
    }

    #[test]
    fn kill_refuses_pids_that_would_signal_groups() {
        assert!(kill(0, Signal::TERM).is_err());
        assert!(kill(u32::MAX, Signal::TERM).is_err());
    }

    #[test]
    fn kill_signals_a_child_and_a_gone_process_is_no_error() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        kill(child.id(), Signal::KILL).unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success());
        // Above any pid_max (at most 2^22): no such process, which is no error.
        kill(i32::MAX as u32, Signal::KILL).unwrap();
    }

    #[test]
    fn uris_are_parsed_and_checked() {
        let u = parse_uri("process:///run/jitsu/process").unwrap();
        assert_eq!(u.dir, PathBuf::from("/run/jitsu/process"));
        assert_eq!(u.netns_prefix, "jitsu-");
        assert_eq!(u.cgroup, None);
        assert_eq!(u.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        let u =
            parse_uri("process:///tmp/x?netns_prefix=t1-&cgroup=v1&shutdown_grace=0.5").unwrap();
        assert_eq!(u.dir, PathBuf::from("/tmp/x"));
        assert_eq!(u.netns_prefix, "t1-");
        assert_eq!(u.cgroup, Some(CgroupVersion::V1));
        assert_eq!(u.shutdown_grace, Duration::from_millis(500));
        assert_eq!(
            parse_uri("process://").unwrap().dir,
            PathBuf::from(DEFAULT_RUNTIME_DIR)
        );
        for bad in [
            "qemu:///system",
            "process://relative/dir",
            "process:///x?cgroup=v3",
            "process:///x?netns_prefix=a/b",
            "process:///x?shutdown_grace=-1",
            "process:///x?colour=blue",
            "process:///x?flag",
        ] {
            let e = parse_uri(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn port_names_fit_ifnamsiz_and_differ_per_prefix_and_name() {
        let a = port_name("jitsu-", "www");
        assert!(a.starts_with("jwww") && a.len() <= 15, "{a}");
        let long = port_name("jitsu-", &"x".repeat(64));
        assert_eq!(long.len(), 15);
        assert_ne!(port_name("jitsu-", "www"), port_name("t1-", "www"));
        assert_ne!(port_name("jitsu-", "www"), port_name("jitsu-", "www2"));
        assert_eq!(port_name("jitsu-", "a.b_c"), port_name("jitsu-", "a.b_c"));
        assert!(
            port_name("p", "a.b")
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        );
    }

    #[test]
    fn proc_stat_survives_odd_command_names() {
        let line = "4242 (we) ird (name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        let zombie = "7 (sh) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0";
        assert_eq!(parse_stat(zombie), Some(('Z', 55)));
        assert_eq!(parse_stat("garbage"), None);
        // Our own process is alive by this measure, with its real start time.
        let me = std::process::id();
        let (state, start) = proc_stat(me).unwrap();
        assert!(state != 'Z');
        let rec = Record {
            pid: me,
            start,
            netns: String::new(),
            port: String::new(),
            cgroup: PathBuf::new(),
        };
        assert!(alive(&rec));
        assert!(
            !alive(&Record {
                start: start + 1,
                ..rec
            }),
            "a reused pid is not the VM"
        );
    }

    #[test]
    fn net_dev_counters() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:    3193      29    0    0    0     0          0         0     3193      29    0    0    0     0       0          0\n\
             jwww1234567: 900 7 0 0 0 0 0 1 1200 11 0 0 0 0 0 0\n";
        assert_eq!(
            parse_net_dev(text, "jwww1234567"),
            Some(IfCounters {
                rx_packets: 7,
                tx_packets: 11
            })
        );
        assert_eq!(
            parse_net_dev(text, "lo"),
            Some(IfCounters {
                rx_packets: 29,
                tx_packets: 29
            })
        );
        assert_eq!(parse_net_dev(text, "jwww"), None);
    }

    #[test]
    fn cgroup_mounts_are_found() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
            36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices\n\
            37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(text),
            (
                Some(PathBuf::from("/sys/fs/cgroup/unified")),
                Some(PathBuf::from("/sys/fs/cgroup/freezer"))
            )
        );
        let v2_only = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_mountinfo(v2_only),
            (Some(PathBuf::from("/sys/fs/cgroup")), None)
        );
        assert_eq!(parse_mountinfo(""), (None, None));
    }

    #[test]
    fn only_vm_names_are_swept() {
        assert!(is_vm_name("www") && is_vm_name("a.b_c-9") && is_vm_name(&"x".repeat(64)));
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(!is_vm_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_gate_lets_no_more_than_its_limit_through_at_once_and_frees_places_when_passes_drop() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let gate = Gate::new(3);
        let (inside, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..12 {
                s.spawn(|| {
                    let _pass = gate.enter();
                    let now = inside.fetch_add(1, SeqCst) + 1;
                    most.fetch_max(now, SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    inside.fetch_sub(1, SeqCst);
                });
            }
        });
        assert!(most.load(SeqCst) <= 3, "never more than three at once");
        assert_eq!(*gate.held.lock().unwrap(), 0, "every place given back");
        assert_eq!(Gate::new(0).limit, 1, "a gate always lets one through");
        // With every place taken, a fourth waits until one is given back.
        let passes: Vec<Pass<'_>> = (0..3).map(|_| gate.enter()).collect();
        let entered = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let _pass = gate.enter();
                entered.store(true, SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!entered.load(SeqCst), "a fourth got in while three held");
            drop(passes);
            waiter.join().unwrap();
        });
        assert!(entered.load(SeqCst));
    }

    #[test]
    fn records_round_trip() {
        let r = Record {
            pid: 12,
            start: 345,
            netns: "jitsu-www".into(),
            port: "jwww1234567".into(),
            cgroup: PathBuf::from("/sys/fs/cgroup/unified/jitsu/jitsu-www"),
        };
        assert_eq!(Record::parse(&r.to_text()), Some(r));
        assert_eq!(Record::parse("pid=1\n"), None);
    }
}
