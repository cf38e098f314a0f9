//! The Ethernet MAC address type both daemons use.
//!
//! Owns parsing (`aa:bb:cc:dd:ee:ff`, also with `-`), display (lower-case, `:`-separated),
//! and serde as that string form. It does not know about interfaces or vendors.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: Mac = Mac([0xff; 6]);
    /// `00:00:00:00:00:00`, the "unknown" target of an ARP request.
    pub const ZERO: Mac = Mac([0; 6]);

    /// The six bytes, in wire order.
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// True for group addresses (broadcast and multicast): never a VM's own address.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// True for addresses with the locally administered bit, as generated ones should be.
    pub const fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// A locally administered unicast address derived from `seed` (for VMs given none):
    /// the Xen OUI is not used because it is not ours to hand out.
    pub fn derived_from(seed: &[u8]) -> Mac {
        // FNV-1a: stable across runs and versions, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        Mac([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

impl From<[u8; 6]> for Mac {
    fn from(b: [u8; 6]) -> Self {
        Mac(b)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {input:?}: expected six hex octets like 00:16:3e:01:02:03")]
pub struct MacParseError {
    /// The text that was refused.
    pub input: String,
}

impl FromStr for Mac {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError {
            input: s.to_string(),
        };
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for slot in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.is_empty() || part.len() > 2 {
                return Err(err());
            }
            *slot = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let m: Mac = "00:16:3E:0a:0B:ff".parse().unwrap();
        assert_eq!(m.0, [0x00, 0x16, 0x3e, 0x0a, 0x0b, 0xff]);
        assert_eq!(m.to_string(), "00:16:3e:0a:0b:ff");
        assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        assert_eq!("00-16-3e-0a-0b-ff".parse::<Mac>().unwrap(), m);
    }

    #[test]
    fn malformed_macs_are_refused() {
        for bad in [
            "",
            "00:16:3e:0a:0b",
            "00:16:3e:0a:0b:ff:01",
            "00:16:3e:0a:0b:fg",
            "000:16:3e:0a:0b:ff",
            "00::3e:0a:0b:ff",
            "00:16:3e:0a:0b:ff:",
        ] {
            let err = bad.parse::<Mac>().unwrap_err();
            assert_eq!(err.input, bad);
        }
    }

    #[test]
    fn derived_macs_are_local_unicast_and_stable() {
        let a = Mac::derived_from(b"www");
        assert!(a.is_local() && !a.is_multicast());
        assert_eq!(a, Mac::derived_from(b"www"));
        assert_ne!(a, Mac::derived_from(b"www2"));
    }

    #[test]
    fn serde_uses_the_string_form() {
        let m: Mac = "02:00:00:00:00:01".parse().unwrap();
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"02:00:00:00:00:01\"");
        assert_eq!(serde_json::from_str::<Mac>(&j).unwrap(), m);
        assert!(serde_json::from_str::<Mac>("\"nonsense\"").is_err());
    }
}
