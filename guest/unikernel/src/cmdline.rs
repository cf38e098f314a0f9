// SPDX-License-Identifier: GPL-3.0-only
//! The kernel command line: the guest's network settings and the virtio-mmio devices QEMU
//! describes. Whitespace-separated `key=value` words; keys it does not know are ignored (QEMU
//! and people add their own).
//!
//! | key | value | |
//! |---|---|---|
//! | `ip` | `A.B.C.D/len` | the address and prefix (required) |
//! | `gw` | `A.B.C.D` | the default gateway (optional) |
//! | `mac` | `xx:xx:xx:xx:xx:xx` | the MAC to use (default: the device's own) |
//! | `virtio_mmio.device` | `<size>@<base>:<irq>` | a virtio-mmio device, as Linux reads it; microvm appends one per device |

use alloc::string::String;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use core::str::FromStr;

use thiserror::Error;

/// One virtio-mmio transport: its register window and interrupt line (GSI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Physical base of the registers.
    pub base: u64,
    /// Bytes of the window (header and configuration space).
    pub size: u64,
    /// The GSI its interrupt is wired to.
    pub irq: u32,
}

/// The settings the command line gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The guest's address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// A MAC to use instead of the device's.
    pub mac: Option<[u8; 6]>,
    /// The virtio-mmio devices, in command-line order.
    pub devices: Vec<MmioDevice>,
}

/// A command line the guest cannot run with.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// No `ip=`: the guest would have no address.
    #[error("no ip=A.B.C.D/len on the command line")]
    MissingIp,
    /// A known key with a value that does not parse.
    #[error("bad {key}={value}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
    },
}

fn bad(key: &'static str, value: &str) -> CmdlineError {
    CmdlineError::BadValue {
        key,
        value: value.into(),
    }
}

/// Parses `ip=A.B.C.D/len`.
fn parse_cidr(v: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = v.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some(())?;
    Some((Ipv4Addr::from_str(ip).ok()?, len))
}

/// Parses `xx:xx:xx:xx:xx:xx`.
fn parse_mac(v: &str) -> Option<[u8; 6]> {
    let mut mac = [0; 6];
    let mut parts = v.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        (p.len() == 2).then_some(())?;
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Parses a number as Linux's `memparse` does: decimal, or hex after `0x`, with an optional
/// K, M or G suffix.
fn parse_size(v: &str) -> Option<u64> {
    let (digits, shift) = match v.as_bytes().last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 10),
        b'm' | b'M' => (&v[..v.len() - 1], 20),
        b'g' | b'G' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    n.checked_mul(1 << shift)
}

/// Parses `<size>@<base>:<irq>[:<id>]`.
fn parse_mmio(v: &str) -> Option<MmioDevice> {
    let (size, rest) = v.split_once('@')?;
    let (base, rest) = rest.split_once(':')?;
    let irq = rest.split(':').next()?;
    Some(MmioDevice {
        base: parse_size(base)?,
        size: parse_size(size)?,
        irq: irq.parse().ok()?,
    })
}

/// Where microvm puts its virtio-mmio transports: 512-byte windows from here up.
pub const MICROVM_MMIO_BASE: u64 = 0xfeb0_0000;
/// Bytes of each microvm transport window.
pub const MICROVM_MMIO_SIZE: u64 = 512;

/// The GSI microvm wires transport `slot` to, given how many transports it made: 24 with its
/// second IOAPIC (GSIs 24..48, the default with ACPI), else 8 (GSIs 5..13). For a command
/// line without `virtio_mmio.device` (microvm writes them only with `acpi=off`), where the
/// kernel finds the devices by probing the window instead of reading ACPI.
pub fn microvm_gsi(slot: u32, transports: u32) -> u32 {
    if transports > 8 { 24 + slot } else { 5 + slot }
}

impl Config {
    /// Parses the command line. The last of a repeated key wins, but devices add up.
    pub fn parse(cmdline: &str) -> Result<Config, CmdlineError> {
        let mut ip = None;
        let mut gateway = None;
        let mut mac = None;
        let mut devices = Vec::new();
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "ip" => ip = Some(parse_cidr(value).ok_or_else(|| bad("ip", value))?),
                "gw" => {
                    gateway = Some(Ipv4Addr::from_str(value).map_err(|_| bad("gw", value))?);
                }
                "mac" => mac = Some(parse_mac(value).ok_or_else(|| bad("mac", value))?),
                "virtio_mmio.device" => {
                    devices
                        .push(parse_mmio(value).ok_or_else(|| bad("virtio_mmio.device", value))?);
                }
                _ => {}
            }
        }
        let (ip, prefix) = ip.ok_or(CmdlineError::MissingIp)?;
        Ok(Config {
            ip,
            prefix,
            gateway,
            mac,
            devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn microvm_s_command_line_gives_address_gateway_and_devices() {
        let c = Config::parse(
            "ip=10.77.9.10/24 gw=10.77.9.1 console=ttyS0 \
             virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=4K@0xfeb00c00:11:3",
        )
        .unwrap();
        assert_eq!(c.ip, Ipv4Addr::new(10, 77, 9, 10));
        assert_eq!(c.prefix, 24);
        assert_eq!(c.gateway, Some(Ipv4Addr::new(10, 77, 9, 1)));
        assert_eq!(c.mac, None);
        assert_eq!(
            c.devices,
            [
                MmioDevice {
                    base: 0xfeb0_0e00,
                    size: 512,
                    irq: 12
                },
                MmioDevice {
                    base: 0xfeb0_0c00,
                    size: 4096,
                    irq: 11
                }
            ]
        );
    }

    #[test]
    fn probed_microvm_transports_get_the_gsi_microvm_wires() {
        // acpi=off microvm, whose command line says the same:
        // virtio_mmio.device=512@0xfeb00e00:12 for slot 7 of 8.
        assert_eq!(microvm_gsi(7, 8), 12);
        // With ACPI and the second IOAPIC: 24 transports, from GSI 24.
        assert_eq!(microvm_gsi(23, 24), 47);
    }

    #[test]
    fn a_mac_on_the_command_line_is_used() {
        let c = Config::parse("mac=02:77:00:00:00:1a ip=10.0.0.5/8").unwrap();
        assert_eq!(c.mac, Some([2, 0x77, 0, 0, 0, 0x1a]));
        assert_eq!(c.gateway, None);
    }

    #[test]
    fn without_an_address_the_guest_does_not_start() {
        assert_eq!(
            Config::parse("gw=10.0.0.1 quiet"),
            Err(CmdlineError::MissingIp)
        );
    }

    #[test]
    fn bad_values_are_named_in_the_error() {
        for (line, msg) in [
            ("ip=10.0.0.5", "bad ip=10.0.0.5"),
            ("ip=10.0.0.5/33", "bad ip=10.0.0.5/33"),
            ("ip=10.0.0.500/24", "bad ip=10.0.0.500/24"),
            ("ip=10.0.0.5/24 gw=x", "bad gw=x"),
            (
                "ip=10.0.0.5/24 mac=02:00:00:00:00",
                "bad mac=02:00:00:00:00",
            ),
            (
                "ip=10.0.0.5/24 mac=02:00:00:00:00:0g",
                "bad mac=02:00:00:00:00:0g",
            ),
            (
                "ip=10.0.0.5/24 virtio_mmio.device=512@0xfeb00e00",
                "bad virtio_mmio.device=512@0xfeb00e00",
            ),
        ] {
            assert_eq!(Config::parse(line).unwrap_err().to_string(), msg, "{line}");
        }
    }
}
