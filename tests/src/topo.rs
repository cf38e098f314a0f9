//! Test topologies: a host namespace with a bridge (as dom0 with `br0`), and other namespaces
//! joined to it by veth pairs, plus daemons run inside them. Everything is removed on drop.
//!
//! A typical test:
//! ```no_run
//! # use jitsu_tests::topo::*;
//! let br = Bridge::new("syn").unwrap();                 // namespace + br0
//! let client = br.join("cli", Some("02:00:00:00:00:0c"), &["10.77.0.2/24"], true).unwrap();
//! let guest = br.join("gst", Some("02:00:00:00:00:01"), &[], false).unwrap();
//! let fdb = br.fdb().unwrap();
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{Netns, unique};

/// A host namespace holding bridge `br0`, with STP off and multicast snooping off so that
/// neighbour discovery reaches every port at once.
#[derive(Debug)]
pub struct Bridge {
    host: Netns,
    name: String,
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

impl Bridge {
    /// Creates the host namespace and its `br0`, up.
    pub fn new(tag: &str) -> Result<Bridge> {
        let host = Netns::new(tag)?;
        host.sh(
            "ip link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0 \
             && ip link set br0 up",
        )?;
        Ok(Bridge {
            host,
            name: "br0".into(),
        })
    }

    /// The host namespace (where daemons that sit on the bridge run).
    pub fn host(&self) -> &Netns {
        &self.host
    }

    /// The bridge's name inside the host namespace.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gives the bridge itself an address (as dom0 has one on `br0`).
    pub fn address(&self, cidr: &str) -> Result<()> {
        self.host
            .sh(&format!("ip addr add {cidr} dev {} nodad", self.name))?;
        Ok(())
    }

    /// Creates a namespace and joins it to the bridge: `eth0` inside, with `mac` if given,
    /// `addrs` (CIDR, IPv6 ones without duplicate address detection) and, if `up`, brought up.
    pub fn join(&self, tag: &str, mac: Option<&str>, addrs: &[&str], up: bool) -> Result<Member> {
        let ns = Netns::new(tag)?;
        let port = unique("p");
        let h = self.host.name();
        crate::sh(&format!(
            "ip -n {h} link add {port} type veth peer name eth0 netns {} \
             && ip -n {h} link set {port} master {} && ip -n {h} link set {port} up",
            ns.name(),
            self.name
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
        let out = self.host.sh(&format!("bridge fdb show br {}", self.name))?;
        Ok(parse_fdb(&out))
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
    /// Starts `program args...` inside `ns` (or in the current namespace if `None`).
    pub fn spawn(
        ns: Option<&Netns>,
        program: &Path,
        args: &[&str],
        log_dir: &Path,
    ) -> Result<Daemon> {
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "daemon".into());
        let log = log_dir.join(format!("{}.log", unique(&name)));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.name()]).arg(program);
                c
            }
            None => Command::new(program),
        };
        let child = cmd
            .args(args)
            // The log is a file: plain text that tests can search (tracing colours otherwise).
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Daemon {
            child: Some(child),
            log,
            name,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
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
