//! jitsu's unikernel (`guest/unikernel`) under QEMU microvm with TCG, on a tap device joined
//! to a test bridge: building it (through `guest/unikernel/build`), booting it, and reading
//! the line it prints on its serial console when it listens.
//!
//! It owns the QEMU process and its tap; the bridge, the clients and the probes are the
//! test's (`topo`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};

use crate::topo::{BRIDGE, Daemon, Host};
use crate::{repo_root, unique, wait_until};

/// The QEMU binary (Debian package qemu-system-x86).
pub const QEMU: &str = "qemu-system-x86_64";
/// microvm without the legacy devices a unikernel does not use (each costs start-up time).
pub const MACHINE: &str = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off";
/// What the unikernel prints when it listens, before `on <ip>:80 ... after <ms> ms`.
pub const LISTENING: &str = "jitsu-unikernel: listening on ";

/// Builds the unikernel once per test process with `guest/unikernel/build` (idempotent:
/// scripts/test has usually built it already) and returns the ELF it printed. Fails saying
/// what the build said.
pub fn elf() -> Result<PathBuf> {
    static ELF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ELF.get_or_init(|| {
        let script = repo_root().join("guest/unikernel/build");
        let out = crate::run(&mut Command::new(&script))
            .map_err(|e| format!("building the unikernel ({}): {e:#}", script.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(text.lines().last().unwrap_or_default());
        if !path.is_file() {
            return Err(format!(
                "{} printed {text:?}, which is not the unikernel's ELF",
                script.display()
            ));
        }
        Ok(path)
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// QEMU's arguments: `elf` on microvm under TCG, its NIC on `tap` with `mac`, the kernel
/// command line `append`, the serial console into the file `serial`.
pub fn qemu_args(elf: &Path, tap: &str, mac: &str, append: &str, serial: &Path) -> Vec<String> {
    [
        "-M",
        MACHINE,
        "-accel",
        "tcg",
        "-m",
        "128M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        &format!("file:{}", serial.display()),
        "-kernel",
        &elf.display().to_string(),
        "-append",
        append,
        "-netdev",
        &format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
        "-device",
        &format!("virtio-net-device,netdev=net0,mac={mac}"),
    ]
    .map(str::to_string)
    .to_vec()
}

/// A libvirt domain of the unikernel on QEMU microvm: no PCI device at all (no memballoon,
/// no USB controller, the NIC on virtio-mmio), which libvirt 9 needs to start microvm; the
/// NIC on `br0` with `mac`, the console into the file `console`.
pub fn libvirt_domain_xml(
    name: &str,
    mac: &str,
    elf: &Path,
    cmdline: &str,
    console: &Path,
) -> String {
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>128</memory>\n  \
         <os><type arch='x86_64' machine='microvm'>hvm</type><kernel>{}</kernel>\
         <cmdline>{cmdline}</cmdline></os>\n  <devices>\n    \
         <interface type='bridge'><source bridge='br0'/><mac address='{mac}'/>\
         <model type='virtio'/><address type='virtio-mmio'/></interface>\n    \
         <serial type='file'><source path='{}'/></serial>\n    \
         <memballoon model='none'/>\n    <controller type='usb' model='none'/>\n  \
         </devices>\n</domain>\n",
        elf.display(),
        console.display()
    )
}

/// The tap devices in `ns` (`ip -o link show type tun`), by name.
pub fn taps(ns: &crate::Netns) -> Result<Vec<String>> {
    let out = ns.sh("ip -o link show type tun")?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?;
            Some(name.split('@').next().unwrap_or(name).to_string())
        })
        .collect())
}

/// The QEMU processes running in `ns`, by pid.
pub fn qemus(ns: &crate::Netns) -> Result<Vec<u32>> {
    let out = crate::run(Command::new("ip").args(["netns", "pids", ns.name()]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim_end() == "qemu-system-x86")
        })
        .collect())
}

/// The unikernel's listening line.
#[derive(Debug, Clone, PartialEq)]
pub struct Listening {
    /// The address it serves, `A.B.C.D:80`.
    pub endpoint: String,
    /// Its MAC, as it prints it.
    pub mac: String,
    /// Milliseconds from its entry point to listening, by its own clock.
    pub after_ms: f64,
    /// Milliseconds the firmware ran before the entry point (`firmware X ms before entry`):
    /// under TCG the TSC counts from when the virtual machine started running.
    pub firmware_ms: Option<f64>,
    /// Milliseconds of its entry-to-listening spent setting up virtio-net (`virtio X ms`).
    pub virtio_ms: Option<f64>,
    /// Its gateway's MAC, from the gateway's answer to the ARP request it sends as it boots
    /// (`gateway <ip> at <mac>`), if that came before it listened.
    pub gateway_mac: Option<String>,
    /// The whole line.
    pub line: String,
}

/// Parses `jitsu-unikernel: listening on <ip>:<port> mac <mac> after <ms> ms (...)` out of
/// the console text.
pub fn parse_listening(console: &str) -> Option<Listening> {
    let line = console.lines().find(|l| l.starts_with(LISTENING))?;
    let mut words = line[LISTENING.len()..].split_whitespace();
    let endpoint = words.next()?.to_string();
    (words.next()? == "mac").then_some(())?;
    let mac = words.next()?.to_string();
    (words.next()? == "after").then_some(())?;
    let after_ms = words.next()?.parse().ok()?;
    let ms_after = |label: &str| {
        line.split_once(label)
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
    };
    Some(Listening {
        endpoint,
        mac,
        after_ms,
        firmware_ms: ms_after("(firmware "),
        virtio_ms: ms_after(", virtio "),
        gateway_mac: gateway_mac(console),
        line: line.to_string(),
    })
}

/// The gateway's MAC the console names: on the listening line (`; gateway <ip> at <mac>`),
/// or, for an answer that came only after, on a line of its own
/// (`gateway <ip> at <mac> (after listening)`).
pub fn gateway_mac(console: &str) -> Option<String> {
    console.lines().find_map(|l| {
        let rest = l
            .split_once("; gateway ")
            .map(|(_, r)| r)
            .or_else(|| l.strip_prefix("jitsu-unikernel: gateway "))?;
        match rest.split_whitespace().collect::<Vec<_>>()[..] {
            [_, "at", mac, ..] => Some(mac.to_string()),
            _ => None,
        }
    })
}

/// A unikernel running under QEMU in the host's namespace, on its own tap port of `br0`.
/// QEMU is killed when this is dropped (its console is printed then if the test failed).
#[derive(Debug)]
pub struct Unikernel {
    qemu: Daemon,
    serial: PathBuf,
    /// The wall-clock time just before QEMU was started.
    pub started: SystemTime,
    /// The tap device's name (a port of the bridge).
    pub tap: String,
}

impl Unikernel {
    /// Creates a tap port on `host`'s bridge and boots the unikernel on it with `mac` and the
    /// kernel command line `append`; its console and QEMU's log go into the host's directory.
    pub fn boot(host: &Host, mac: &str, append: &str) -> Result<Unikernel> {
        let elf = elf()?;
        let tap = unique("tap");
        host.ns().sh(&format!(
            "ip tuntap add dev {tap} mode tap && ip link set {tap} master {BRIDGE} \
             && ip link set {tap} up"
        ))?;
        let serial = host.file(&format!("{tap}.console"));
        let args = qemu_args(&elf, &tap, mac, append, &serial);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = SystemTime::now();
        let qemu = host.spawn(QEMU, &args)?;
        Ok(Unikernel {
            qemu,
            serial,
            started,
            tap,
        })
    }

    /// What the unikernel has printed so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// The QEMU process's id.
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// Waits for the listening line; fails with the console and QEMU's log if it does not
    /// come within `timeout` or QEMU exits.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<Listening> {
        let result = wait_until("the unikernel's listening line", timeout, || {
            if self.qemu.check_running().is_err() {
                return Some(None);
            }
            parse_listening(&self.console()).map(Some)
        });
        match result {
            Ok(Some(l)) => Ok(l),
            Ok(None) => bail!("QEMU exited; its log:\n{}", self.qemu.log()),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "console:\n{}\nQEMU's log:\n{}",
                    self.console(),
                    self.qemu.log()
                )
            }),
        }
    }
}

impl Drop for Unikernel {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- unikernel console ({}) ---\n{}",
                self.serial.display(),
                self.console()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_address_mac_and_time() {
        let console = "jitsu-unikernel: GSI 12 is not on an IOAPIC: polling every 1ms\n\
             jitsu-unikernel: listening on 10.77.13.10:80 mac 02:77:00:0d:00:10 after 3.728 ms \
             (firmware 1.7 ms before entry; entry to main 0.161 ms, virtio 1.52 ms, smoltcp \
             0.02 ms; TSC 2995 MHz)\n";
        let l = parse_listening(console).unwrap();
        assert_eq!(l.endpoint, "10.77.13.10:80");
        assert_eq!(l.mac, "02:77:00:0d:00:10");
        assert_eq!(l.after_ms, 3.728);
        assert_eq!(l.firmware_ms, Some(1.7));
        assert_eq!(l.virtio_ms, Some(1.52));
        assert!(l.line.ends_with("TSC 2995 MHz)"));
        assert_eq!(l.gateway_mac, None, "no gateway on its command line");
        assert_eq!(parse_listening("jitsu-unikernel: fatal: no ip=\n"), None);
    }

    #[test]
    fn the_listening_line_names_the_gateway_s_mac_once_it_answered() {
        let line = "jitsu-unikernel: listening on 10.77.13.10:80 mac 02:77:00:0d:00:10 after 9.1 ms \
                    (firmware 1.4 ms before entry; TSC 2596 MHz)";
        let heard = parse_listening(&format!(
            "{line}; gateway 10.77.13.1 at 0e:5f:70:13:1f:ac\n"
        ));
        assert_eq!(
            heard.unwrap().gateway_mac.as_deref(),
            Some("0e:5f:70:13:1f:ac")
        );
        let silent = format!("{line}; gateway 10.77.13.1 not heard from\n");
        assert_eq!(parse_listening(&silent).unwrap().gateway_mac, None);
        let late = format!(
            "{silent}jitsu-unikernel: gateway 10.77.13.1 at 0e:5f:70:13:1f:ad (after listening)\n"
        );
        assert_eq!(
            parse_listening(&late).unwrap().gateway_mac.as_deref(),
            Some("0e:5f:70:13:1f:ad"),
            "an answer after listening, on its own line"
        );
    }

    #[test]
    fn qemu_boots_the_elf_on_microvm_with_tcg_and_the_tap() {
        let args = qemu_args(
            Path::new("/k.elf"),
            "tap0",
            "02:00:00:00:00:01",
            "ip=10.0.0.5/24",
            Path::new("/s"),
        );
        let line = args.join(" ");
        assert!(
            line.starts_with(&format!("-M {MACHINE} -accel tcg ")),
            "{line}"
        );
        assert!(
            line.contains("-kernel /k.elf -append ip=10.0.0.5/24 "),
            "{line}"
        );
        assert!(line.contains("-serial file:/s "), "{line}");
        assert!(line.ends_with(
            "-netdev tap,id=net0,ifname=tap0,script=no,downscript=no \
             -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01"
        ));
    }
}
