//! synjitsu's own port on the bridge, as the original Synjitsu VM had its own vif: a veth
//! pair whose outer end is enslaved to the bridge and whose inner end synjitsu's packet
//! socket is bound to; and the bridge's forwarding entries that steer booting guests' MACs
//! to it.
//!
//! Owns set-up and removal of the pair (with iproute2's `ip` and `bridge`, at start and exit).
//! The forwarding-table changes for booting guests are [`crate::fdb`]'s (over netlink: they
//! are on the hand-over path). Why learning is off on the port:
//! synjitsu re-sends client SYNs with the client's MAC as source and answers with the guest's
//! MAC; with learning on, the bridge would move those MACs to synjitsu's port and the guest's
//! SYN-ACK would come back here instead of reaching the client. Instead each booting guest's
//! MAC gets a static entry pointing here, removed once the guest announces itself (on Linux
//! the static entry moves to the guest's port when the guest sends, and stays static there
//! unless removed: so it is removed wherever it is).
//!
//! It does not open the packet socket ([`crate::sys::packet`]) or decide which MACs to steer
//! ([`crate::hold`]).

use std::path::Path;
use std::process::Command;

use shared_proto::Mac;

/// The MAC of the bridge-side end of synjitsu's pair: never the lowest on a bridge.
pub const OUTER_MAC: &str = "fe:ff:ff:ff:ff:ff";

/// The longest interface name Linux accepts.
const IFNAMSIZ_MAX: usize = 15;

/// Why the port could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The bridge does not exist.
    #[error("bridge {0} does not exist (create it first, e.g. `ip link add {0} type bridge`)")]
    NoBridge(String),
    /// The interface exists but is not a bridge.
    #[error("{0} is not a bridge")]
    NotABridge(String),
    /// A command could not be started.
    #[error("could not run {cmd}: {source} (is iproute2 installed?)")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{cmd} failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it said.
        stderr: String,
    },
    /// A sysfs or procfs file could not be read or written.
    #[error("{path}: {source}")]
    Sys {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The two ends of synjitsu's veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortNames {
    /// The end synjitsu's socket is bound to.
    pub inner: String,
    /// The end enslaved to the bridge.
    pub outer: String,
}

/// `syj-<bridge>` and `syj-<bridge>-p`, or with an 8-hex-digit hash of the bridge name when
/// that would not fit in an interface name.
pub fn names(bridge: &str) -> PortNames {
    let base = if 4 + bridge.len() + 2 <= IFNAMSIZ_MAX {
        format!("syj-{bridge}")
    } else {
        let mut h: u32 = 0x811c_9dc5;
        for b in bridge.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        format!("syj-{h:08x}")
    };
    PortNames {
        outer: format!("{base}-p"),
        inner: base,
    }
}

fn run(args: &[&str]) -> Result<String, PortError> {
    let cmd = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|source| PortError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(PortError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True if the network interface `dev` exists.
pub fn exists(dev: &str) -> bool {
    Path::new(&format!("/sys/class/net/{dev}")).exists()
}

fn read_sys(path: &str) -> Result<String, PortError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| PortError::Sys {
            path: path.to_string(),
            source,
        })
}

fn write_sys(path: &str, value: &str) -> Result<(), PortError> {
    std::fs::write(path, value).map_err(|source| PortError::Sys {
        path: path.to_string(),
        source,
    })
}

/// synjitsu's port: the veth pair exists while this lives; dropping it removes the pair
/// (and with it every forwarding entry that points at it).
#[derive(Debug)]
pub struct Port {
    /// The pair's names.
    pub names: PortNames,
    /// The inner end's interface index, for the packet socket.
    pub ifindex: i32,
    /// The inner end's MAC: synjitsu's own address on the bridge.
    pub mac: Mac,
    removed: bool,
}

impl Port {
    /// Creates the pair on `bridge` (replacing a stale one left by a crash), turns learning
    /// off on the bridge port, and brings both ends up.
    pub fn create(bridge: &str) -> Result<Port, PortError> {
        if !exists(bridge) {
            return Err(PortError::NoBridge(bridge.to_string()));
        }
        let sys = format!("/sys/class/net/{bridge}");
        if !Path::new(&format!("{sys}/bridge")).exists() {
            return Err(PortError::NotABridge(bridge.to_string()));
        }
        let names = names(bridge);
        if exists(&names.inner) {
            tracing::warn!(port = %names.inner, "removing a stale port left by an earlier run");
            run(&["ip", "link", "del", &names.inner])?;
        }
        let mtu = read_sys(&format!("{sys}/mtu"))?;
        // A bridge whose address was never set takes the lowest MAC of its ports, and changes
        // it when ports come and go: a random MAC on synjitsu's port could become the host's
        // own address on the bridge, and its clients' ARP caches would be wrong whenever
        // synjitsu starts or stops. The outer end never sends from its own MAC, so it gets
        // the highest unicast one, as Xen gives every vif backend.
        run(&[
            "ip",
            "link",
            "add",
            &names.inner,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &names.outer,
            "mtu",
            &mtu,
            "address",
            OUTER_MAC,
        ])?;
        let mut port = Port {
            names: names.clone(),
            ifindex: 0,
            mac: Mac::ZERO,
            removed: false,
        };
        // From here on, a failure removes the pair again (Drop).
        for dev in [&names.inner, &names.outer] {
            // The host's IP stack has nothing to do on synjitsu's port: no IPv6 addresses,
            // router solicitations or DAD from it, no ARP, no forwarding of what arrives.
            write_sys(&format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1")?;
        }
        // Nor for IPv4, which cannot be disabled per interface: no forwarding of what
        // arrives, and strict reverse-path filtering, so that a flooded broadcast (whose
        // source is routed via the bridge, not this port) is not delivered a second time.
        for (knob, value) in [("forwarding", "0"), ("rp_filter", "1")] {
            write_sys(
                &format!("/proc/sys/net/ipv4/conf/{}/{knob}", names.inner),
                value,
            )?;
        }
        run(&["ip", "link", "set", &names.inner, "arp", "off"])?;
        run(&["ip", "link", "set", &names.outer, "master", bridge])?;
        run(&[
            "bridge",
            "link",
            "set",
            "dev",
            &names.outer,
            "learning",
            "off",
            "flood",
            "on",
            "mcast_flood",
            "on",
        ])?;
        run(&["ip", "link", "set", &names.inner, "up"])?;
        run(&["ip", "link", "set", &names.outer, "up"])?;
        port.ifindex = ifindex_of(&names.inner)?;
        let inner_sys = format!("/sys/class/net/{}", names.inner);
        port.mac = read_sys(&format!("{inner_sys}/address"))?
            .parse()
            .map_err(|e| PortError::Sys {
                path: format!("{inner_sys}/address"),
                source: std::io::Error::other(e),
            })?;
        // Learning is off: the bridge must be told where synjitsu's own MAC is.
        run(&[
            "bridge",
            "fdb",
            "replace",
            &port.mac.to_string(),
            "dev",
            &names.outer,
            "master",
            "static",
        ])?;
        tracing::info!(bridge, port = %names.outer, mac = %port.mac, "port on the bridge ready");
        Ok(port)
    }

    /// Removes the pair now.
    pub fn remove(&mut self) -> Result<(), PortError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        // Removed by someone else already: nothing left to do.
        if !exists(&self.names.inner) {
            return Ok(());
        }
        run(&["ip", "link", "del", &self.names.inner]).map(|_| ())
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "could not remove synjitsu's port");
        }
    }
}

/// The interface index of `dev`, as the caller types it (the packet socket's is signed).
pub fn ifindex_of<T: std::str::FromStr>(dev: &str) -> Result<T, PortError> {
    let path = format!("/sys/class/net/{dev}/ifindex");
    read_sys(&path)?.parse().map_err(|_| PortError::Sys {
        path,
        source: std::io::Error::other("not a number"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_an_interface_name() {
        assert_eq!(
            names("br0"),
            PortNames {
                inner: "syj-br0".into(),
                outer: "syj-br0-p".into()
            }
        );
        assert_eq!(names("xenbr12").outer, "syj-xenbr12-p");
        let long = names("a-very-long-bridge");
        assert!(long.inner.len() <= 15 && long.outer.len() <= 15, "{long:?}");
        assert_ne!(long, names("a-very-long-bridgf"));
        assert_eq!(long, names("a-very-long-bridge"));
    }
}
