//! The identity of a VM as jitsu-dns tells it to synjitsu.
//!
//! Owns what synjitsu needs to stand in for a guest on the bridge (name, MAC, addresses) and
//! how the held SYNs are to be handed over. It does not hold lifecycle state: that is
//! [`crate::control::Phase`] on the wire and the fleet inside jitsu-dns.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::Mac;

/// The longest VM name accepted; names become Xenstore, file and interface-name components.
pub const MAX_NAME_LEN: usize = 64;
/// The longest interface name Linux takes (`IFNAMSIZ` - 1).
pub const MAX_PORT_LEN: usize = 15;

/// A VM as synjitsu knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmIdentity {
    /// The VM's name in jitsu-dns's configuration; the key of every other message.
    pub name: String,
    /// The guest's own MAC: synjitsu answers ARP with it and steers it to its own port.
    pub mac: Mac,
    /// The guest's IPv4 address.
    pub ipv4: Ipv4Addr,
    /// The guest's IPv6 address, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    /// Where the held SYNs go once the guest can take them.
    pub handover: Handover,
    /// The host-side bridge port of the guest's interface, if the backend knows it:
    /// libvirt's `<target dev='vnet3'/>` in the live domain XML (`vif<domid>.<n>` under
    /// Xen), the process backend's veth. synjitsu then takes the guest's announcement only
    /// from that port, and passes frames addressed to the guest through it while it stands
    /// in; without it, an announcement from any port is taken. Absent from the JSON when
    /// unknown, so a client that never knows it speaks exactly as before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// The guest's promise that it announces itself (its gratuitous ARP or unsolicited
    /// neighbour advertisement) only once every port it serves listens, as the project's Rust
    /// unikernel and MirageOS guests do. synjitsu then re-sends the held SYNs on the wire at
    /// the announcement, without first probing the ports from its own address (a round trip
    /// of the guest saved). False: the announcement only says the guest is up, and each held
    /// port is probed before its SYNs go. Absent from the JSON when false, so a client that
    /// never promises it speaks exactly as before this field.
    #[serde(default, skip_serializing_if = "is_false")]
    pub announces_listening: bool,
}

/// For serde: a false flag is left out of the JSON.
fn is_false(b: &bool) -> bool {
    !*b
}

/// How held SYNs reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "snake_case", deny_unknown_fields)]
pub enum Handover {
    /// Written under `/ip/...` in Xenstore for a guest that replays them itself (the patched
    /// MirageOS stack); readable only by this domain and dom0.
    Xenstore {
        /// The guest's Xen domain id.
        domid: u32,
    },
    /// Re-sent on the bridge once the guest listens, for unmodified guests.
    Wire,
}

/// Why a [`VmIdentity`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmError {
    /// Names are used in paths and interface names.
    #[error("invalid VM name {name:?}: use 1 to {MAX_NAME_LEN} characters from [A-Za-z0-9._-]")]
    BadName {
        /// The refused name.
        name: String,
    },
    /// A group address can never be a guest's own.
    #[error("VM {name}: MAC {mac} is a multicast address")]
    MulticastMac {
        /// The VM.
        name: String,
        /// The refused MAC.
        mac: Mac,
    },
    /// Unspecified, broadcast, multicast or loopback addresses cannot be a guest's.
    #[error("VM {name}: address {addr} cannot belong to a guest")]
    BadAddress {
        /// The VM.
        name: String,
        /// The refused address, as text.
        addr: String,
    },
    /// Not a name Linux gives an interface.
    #[error(
        "VM {name}: port {port:?} is not an interface name (1 to {MAX_PORT_LEN} bytes, no '/', ':' or whitespace)"
    )]
    BadPort {
        /// The VM.
        name: String,
        /// The refused port name.
        port: String,
    },
    /// Domain 0 is the host itself.
    #[error("VM {name}: xenstore handover to domain 0 (the host) makes no sense")]
    Dom0 {
        /// The VM.
        name: String,
    },
}

/// True if `name` is acceptable as a VM name.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// True if `port` is a name Linux accepts for an interface (`dev_valid_name`).
pub fn is_valid_port(port: &str) -> bool {
    !port.is_empty()
        && port.len() <= MAX_PORT_LEN
        && port != "."
        && port != ".."
        && port
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// [`is_valid_port`] for VM `name`'s port, refusing with [`VmError::BadPort`].
pub(crate) fn check_port(name: &str, port: &str) -> Result<(), VmError> {
    if is_valid_port(port) {
        Ok(())
    } else {
        Err(VmError::BadPort {
            name: name.to_string(),
            port: port.to_string(),
        })
    }
}

/// [`is_valid_name`], refusing with [`VmError::BadName`].
pub(crate) fn check_name(name: &str) -> Result<(), VmError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(VmError::BadName {
            name: name.to_string(),
        })
    }
}

impl VmIdentity {
    /// Checks what the type cannot: name charset, unicast MAC, usable addresses.
    pub fn validate(&self) -> Result<(), VmError> {
        check_name(&self.name)?;
        let name = || self.name.clone();
        if self.mac.is_multicast() {
            return Err(VmError::MulticastMac {
                name: name(),
                mac: self.mac,
            });
        }
        let v4 = self.ipv4;
        if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || v4.is_loopback() {
            return Err(VmError::BadAddress {
                name: name(),
                addr: v4.to_string(),
            });
        }
        if let Some(v6) = self.ipv6
            && (v6.is_unspecified() || v6.is_multicast() || v6.is_loopback())
        {
            return Err(VmError::BadAddress {
                name: name(),
                addr: v6.to_string(),
            });
        }
        if let Some(port) = &self.port {
            check_port(&self.name, port)?;
        }
        if self.handover == (Handover::Xenstore { domid: 0 }) {
            return Err(VmError::Dom0 { name: name() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn www() -> VmIdentity {
        VmIdentity {
            name: "www".into(),
            mac: "00:16:3e:00:00:01".parse().unwrap(),
            ipv4: "10.0.0.1".parse().unwrap(),
            ipv6: None,
            handover: Handover::Xenstore { domid: 7 },
            port: None,
            announces_listening: false,
        }
    }

    #[test]
    fn json_form_is_stable() {
        let j = serde_json::to_string(&www()).unwrap();
        assert_eq!(
            j,
            r#"{"name":"www","mac":"00:16:3e:00:00:01","ipv4":"10.0.0.1","handover":{"via":"xenstore","domid":7}}"#
        );
        let mut v6 = www();
        v6.ipv6 = Some("fd00::1".parse().unwrap());
        v6.handover = Handover::Wire;
        let j = serde_json::to_string(&v6).unwrap();
        assert!(j.contains(r#""ipv6":"fd00::1""#) && j.contains(r#"{"via":"wire"}"#));
        assert_eq!(serde_json::from_str::<VmIdentity>(&j).unwrap(), v6);
        // The port is optional both ways: absent, the JSON is what it was before the field.
        assert!(!j.contains("port"));
        v6.port = Some("vnet3".into());
        let j = serde_json::to_string(&v6).unwrap();
        assert!(j.ends_with(r#","port":"vnet3"}"#), "{j}");
        assert_eq!(serde_json::from_str::<VmIdentity>(&j).unwrap(), v6);
        // The promise to announce only once listening: absent when false (above), present
        // when true, and read back both ways.
        assert!(!j.contains("announces_listening"));
        v6.announces_listening = true;
        let j = serde_json::to_string(&v6).unwrap();
        assert!(j.ends_with(r#","announces_listening":true}"#), "{j}");
        assert_eq!(serde_json::from_str::<VmIdentity>(&j).unwrap(), v6);
        let explicit_false = j.replace(
            r#""announces_listening":true"#,
            r#""announces_listening":false"#,
        );
        assert!(
            !serde_json::from_str::<VmIdentity>(&explicit_false)
                .unwrap()
                .announces_listening
        );
    }

    #[test]
    fn validation_refuses_what_cannot_be_a_guest() {
        assert_eq!(www().validate(), Ok(()));
        let mut v = www();
        v.name = "a/b".into();
        assert!(matches!(v.validate(), Err(VmError::BadName { .. })));
        v.name = "x".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(v.validate(), Err(VmError::BadName { .. })));
        let mut v = www();
        v.mac = Mac::BROADCAST;
        assert!(matches!(v.validate(), Err(VmError::MulticastMac { .. })));
        let mut v = www();
        v.ipv4 = Ipv4Addr::UNSPECIFIED;
        assert!(matches!(v.validate(), Err(VmError::BadAddress { .. })));
        let mut v = www();
        v.ipv6 = Some("ff02::1".parse().unwrap());
        assert!(matches!(v.validate(), Err(VmError::BadAddress { .. })));
        for bad in ["", "a/b", "vif1:0", "two words", ".", "sixteen-bytes-xx"] {
            let mut v = www();
            v.port = Some(bad.into());
            assert!(
                matches!(v.validate(), Err(VmError::BadPort { .. })),
                "{bad:?}"
            );
        }
        for good in ["vnet0", "vif12.0", "jwww0a1b2c3", "syj-br0-p"] {
            let mut v = www();
            v.port = Some(good.into());
            assert_eq!(v.validate(), Ok(()), "{good:?}");
        }
        let mut v = www();
        v.handover = Handover::Xenstore { domid: 0 };
        assert!(matches!(v.validate(), Err(VmError::Dom0 { .. })));
    }
}
