//! What several fuzz targets share: reading an input front to back, generating DNS names near
//! the protocol's limits, and doing with a configuration what the daemon does after loading
//! it.

use std::collections::HashMap;

use jitsu_dns::backend::libvirt::{Hypervisor, domain_xml};
use jitsu_dns::config::Config;
use jitsu_dns::dns::{Table, slots_for};

/// The input, read front to back; reads past its end give nothing.
#[derive(Debug)]
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    /// The next byte.
    pub fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(b)
    }

    /// The next two bytes, big-endian.
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// The next four bytes, big-endian.
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// A DNS name in presentation form whose length the input sets between 240 and 263
/// characters (253 is the longest a name can be: 255 octets on the wire), in labels of 1 to
/// 63 characters (sometimes 64, one too many), ending in `suffix`. Each label is drawn from
/// letters, digits and `-`, with the odd upper-case letter and, rarely, a character a name
/// may not hold. Falls back to `suffix` alone when the input runs out.
pub fn long_name(input: &mut Input<'_>, suffix: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-ABCXYZ_.*";
    let Some(b) = input.byte() else {
        return suffix.to_string();
    };
    let target = 240 + usize::from(b % 24);
    let mut labels: Vec<String> = Vec::new();
    let mut len = suffix.len();
    while len < target {
        let Some(l) = input.byte() else { break };
        let room = target - len - 1;
        let want = if l & 0x80 != 0 {
            63 + usize::from(l & 1)
        } else {
            1 + usize::from(l % 63)
        };
        let n = want.min(room).max(1);
        let fill = input.byte().unwrap_or(0);
        let label: String = (0..n)
            .map(|i| {
                let k = usize::from(fill).wrapping_mul(31).wrapping_add(i * 7);
                // Mostly lower-case letters; the other characters where the input says so.
                let pick = if fill & 0x40 != 0 {
                    k % ALPHABET.len()
                } else {
                    k % 26
                };
                char::from(ALPHABET[pick])
            })
            .collect();
        len += n + 1;
        labels.push(label);
    }
    labels.push(suffix.to_string());
    labels.join(".")
}

/// What the daemon does with a configuration it loaded: the DNS table, and the domain XML of
/// each VM for the hypervisors jitsu-dns defines domains on. A value of the file or a spec
/// must not add markup to the XML.
pub fn use_config(cfg: &Config) {
    let slots = slots_for(&cfg.vms, &HashMap::new());
    let _table = Table::build(cfg, &slots, None, 1);
    let _ = cfg.dns_addr();
    for vm in &cfg.vms {
        for hv in [Hypervisor::Qemu, Hypervisor::Xen, Hypervisor::Test] {
            if let Ok(xml) = domain_xml(vm, &hv) {
                assert_eq!(
                    xml.matches('<').count(),
                    xml.matches('>').count(),
                    "a value added markup to the domain XML:\n{xml}"
                );
            }
        }
    }
}
