//! Test topologies: a host namespace with a bridge and a scratch directory (as dom0 with
//! `br0`, [`Host`]), other namespaces joined to it by veth pairs, and daemons run inside
//! them ([`Daemon`]). Every harness (synjitsu's, jitsu-dns's, the whole chain, libvirtd)
//! builds on [`Host`]; what runs where, and with which flags, is theirs. Everything is
//! removed on drop.
//!
//! A typical test:
//! ```no_run
//! # use jitsu_tests::topo::*;
//! let host = Host::new("syn").unwrap();                 // namespace + br0 + directory
//! let client = host.join("cli", Some("02:00:00:00:00:0c"), &["10.77.0.2/24"], true).unwrap();
//! let guest = host.join("gst", Some("02:00:00:00:00:01"), &[], false).unwrap();
//! let fdb = host.fdb().unwrap();
//! ```

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{Netns, Scratch, unique};

/// The bridge's name in every host namespace.
pub const BRIDGE: &str = "br0";

/// A host namespace holding bridge `br0`, with STP off and multicast snooping off so that
/// neighbour discovery reaches every port at once, and a scratch directory for the files of
/// what runs there (logs, sockets, stores, captures). Dropped in order: the namespace (and
/// whatever still runs in it), then the directory.
#[derive(Debug)]
pub struct Host {
    ns: Netns,
    dir: Scratch,
}

/// A namespace joined to the bridge by a veth pair; its interface inside is `eth0`.
#[derive(Debug)]
pub struct Member {
    /// The member's own namespace.
    pub ns: Netns,
    /// The host-side port name, enslaved to the bridge.
    pub port: String,
    /// The interface inside the member's namespace (`eth0`).
    pub ifname: String,
}

/// One row of the bridge's forwarding table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    /// The MAC, lower-case.
    pub mac: String,
    /// The port it is on.
    pub port: String,
    /// True for entries added by hand (`static`), false for learnt ones.
    pub is_static: bool,
}

impl Host {
    /// Creates the host namespace and its `br0`, up, and the directory `<tag><unique>`.
    pub fn new(tag: &str) -> Result<Host> {
        let dir = Scratch::new(tag)?;
        let ns = Netns::new(tag)?;
        ns.sh(&format!(
            "ip link add {BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0 \
             && ip link set {BRIDGE} up"
        ))?;
        Ok(Host { ns, dir })
    }

    /// The host namespace (where daemons that sit on the bridge run).
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path in the scratch directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Gives the bridge itself an address (as dom0 has one on `br0`).
    pub fn address(&self, cidr: &str) -> Result<()> {
        self.ns
            .sh(&format!("ip addr add {cidr} dev {BRIDGE} nodad"))?;
        Ok(())
    }

    /// The bridge's own MAC.
    pub fn bridge_mac(&self) -> Result<String> {
        let mac = self
            .ns
            .sh(&format!("cat /sys/class/net/{BRIDGE}/address"))?;
        Ok(mac.trim().to_string())
    }

    /// Creates a namespace and joins it to the bridge: `eth0` inside, with `mac` if given,
    /// `addrs` (CIDR, IPv6 ones without duplicate address detection) and, if `up`, brought up.
    pub fn join(&self, tag: &str, mac: Option<&str>, addrs: &[&str], up: bool) -> Result<Member> {
        let ns = Netns::new(tag)?;
        let port = unique("p");
        let h = self.ns.name();
        crate::sh(&format!(
            "ip -n {h} link add {port} type veth peer name eth0 netns {} \
             && ip -n {h} link set {port} master {BRIDGE} && ip -n {h} link set {port} up",
            ns.name(),
        ))?;
        if let Some(mac) = mac {
            ns.sh(&format!("ip link set eth0 address {mac}"))?;
        }
        for a in addrs {
            let nodad = if a.contains(':') { " nodad" } else { "" };
            ns.sh(&format!("ip addr add {a} dev eth0{nodad}"))?;
        }
        if up {
            ns.sh("ip link set eth0 up")?;
        }
        Ok(Member {
            ns,
            port,
            ifname: "eth0".into(),
        })
    }

    /// The forwarding table, without the bridge's own and the ports' own addresses.
    pub fn fdb(&self) -> Result<Vec<FdbEntry>> {
        let out = self.ns.sh(&format!("bridge fdb show br {BRIDGE}"))?;
        Ok(parse_fdb(&out))
    }

    /// Starts `program args...` in the host namespace, its log in the scratch directory.
    pub fn spawn(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Result<Daemon> {
        let program = program.as_ref();
        let mut cmd = self.ns.command(program);
        cmd.args(args);
        let name = Path::new(program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "daemon".into());
        Daemon::start(cmd, &name, self.dir())
    }
}

/// Parses `bridge fdb show` text: `<mac> dev <port> [vlan N] [master br0] [static|permanent]`.
pub fn parse_fdb(text: &str) -> Vec<FdbEntry> {
    text.lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let mac = words.first()?;
            let dev = words.iter().position(|w| *w == "dev")?;
            let port = words.get(dev + 1)?;
            if words.contains(&"permanent") || words.contains(&"self") {
                return None;
            }
            Some(FdbEntry {
                mac: mac.to_lowercase(),
                port: port.to_string(),
                is_static: words.contains(&"static"),
            })
        })
        .collect()
}

/// A daemon running in a namespace: its stderr and stdout go to a log file, and it is killed
/// when dropped (its log is printed then, so a failing test shows what the daemon said).
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    name: String,
}

impl Daemon {
    /// Starts `cmd` (no stdin) as `name`, its stdout and stderr going to a log file in
    /// `log_dir`.
    pub fn start(mut cmd: Command, name: &str, log_dir: &Path) -> Result<Daemon> {
        let log = log_dir.join(format!("{}.log", unique(name)));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            // The log is a file: plain text that tests can search (tracing colours otherwise).
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Daemon {
            child: Some(child),
            log,
            name: name.to_string(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Its log file (for a thread that reads it while the daemon runs).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What the daemon has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the daemon has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("{} exited ({status}); its log:\n{}", self.name, self.log());
        }
        Ok(())
    }

    /// Sends `signal` (e.g. "TERM", "HUP") to the daemon.
    pub fn signal(&self, signal: &str) -> Result<()> {
        crate::run(Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()]))?;
        Ok(())
    }

    /// Stops the daemon with SIGTERM and waits up to `timeout` for it to exit; returns its
    /// exit code.
    pub fn stop(&mut self, timeout: Duration) -> Result<Option<i32>> {
        self.signal("TERM")?;
        self.wait_exit(timeout)
    }

    /// Waits for the daemon to exit, up to `timeout`; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let child = self.child.as_mut().context("already reaped")?;
        let status = crate::wait_until(&format!("{} to exit", self.name), timeout, || {
            child.try_wait().transpose()
        })??;
        self.child = None;
        Ok(status.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- {} log ({}) ---\n{}",
                    self.name,
                    self.log.display(),
                    self.log()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdb_text_is_parsed() {
        let text = "33:33:00:00:00:01 dev br0 self permanent\n\
                    02:00:00:00:00:0c dev p1a master br0 \n\
                    02:00:00:00:00:01 dev p2b master br0 static\n\
                    aa:bb:cc:dd:ee:ff dev p1a vlan 1 master br0 permanent\n";
        assert_eq!(
            parse_fdb(text),
            vec![
                FdbEntry {
                    mac: "02:00:00:00:00:0c".into(),
                    port: "p1a".into(),
                    is_static: false
                },
                FdbEntry {
                    mac: "02:00:00:00:00:01".into(),
                    port: "p2b".into(),
                    is_static: true
                },
            ]
        );
    }
}
