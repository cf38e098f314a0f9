//! The Xenstore layout of a held SYN, exactly as the original Synjitsu wrote it and the patched
//! MirageOS TCP stack (samoht/mirage-tcpip, branch `synjistu`) reads it, so such guests work
//! unchanged.
//!
//! ```text
//! /ip/<vm-ip>                                              = "managed" once the guest took over
//! /ip/<vm-ip>/<vm-port>/<client-ip>/<client-port>/syn/tx_wnd            client window, decimal
//!                                                    /sequence          client ISN, signed 32-bit
//!                                                    /options           TCP options, S-expression
//!                                                    /tx_isn            guest's ISN, unsigned
//!                                                    /rx_wnd            guest's window (65535)
//!                                                    /rx_wnd_scaleoffer guest's scale (2)
//! ```
//! Every `.` in an address becomes `-` in its path component (`10.0.0.1` -> `10-0-0-1`).
//! The original knew only IPv4; for IPv6, which Xenstore's path alphabet cannot spell with
//! `:`, this crate writes `:` as `_` (`fd00::1` -> `fd00__1`), and the last 32 bits of an
//! IPv4-mapped address in hex rather than dotted (`::ffff:10.0.0.1` -> `__ffff_a00_1`), an
//! extension no original guest will ever meet.
//!
//! This module owns paths, leaf values and the TCP options a SYN carries ([`TcpOption`], read
//! from and written to a TCP header), both ways. The `options` leaf's S-expression text is
//! [`super::sexp`]'s; talking to a Xenstore daemon is [`super::xs_wire`]'s (framing) and
//! [`super::xenstore`]'s (the socket). Which SYN is written, and when, is the core's
//! ([`crate::hold`]).
//!
//! It lives in synjitsu, not in `shared-proto`: jitsu-dns never reads or writes a held SYN
//! (it watches its guests' readiness keys through `xenstore-rs`); the only readers are the
//! guests and the tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::sexp::{SexpError, options_from_sexp, options_to_sexp};

/// The root of every held SYN.
pub const ROOT: &str = "/ip";
/// The value a guest writes at `/ip/<its-ip>` when it has taken over.
pub const MANAGED: &str = "managed";
/// The receive window the original wrote for the guest.
pub const DEFAULT_RX_WND: u32 = 65535;
/// The window scale the original offered for the guest.
pub const DEFAULT_RX_WND_SCALEOFFER: u8 = 2;
/// The original's ISN base: it added a random number below 65535.
pub const TX_ISN_BASE: u32 = 0x1AFE_0000;
/// The leaves of `syn/`, in the order the original wrote them.
pub const LEAVES: [&str; 6] = [
    "tx_wnd",
    "sequence",
    "options",
    "tx_isn",
    "rx_wnd",
    "rx_wnd_scaleoffer",
];

/// What is wrong with a path or a leaf read back from Xenstore.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A path component is not an encoded address.
    #[error("path component {component:?} is not an encoded IP address")]
    BadAddress {
        /// The component.
        component: String,
    },
    /// A path component is not a decimal port.
    #[error("path component {component:?} is not a port number")]
    BadPort {
        /// The component.
        component: String,
    },
    /// The path does not have the shape `/ip/a/p/b/q[/syn[/leaf]]`.
    #[error("path {path:?} is not a held-SYN path")]
    BadPath {
        /// The path.
        path: String,
    },
    /// A leaf is absent.
    #[error("leaf {leaf} is missing")]
    MissingLeaf {
        /// The leaf's name.
        leaf: &'static str,
    },
    /// A leaf's text is not what its type needs.
    #[error("leaf {leaf} has invalid value {value:?}")]
    BadLeaf {
        /// The leaf's name.
        leaf: &'static str,
        /// The text found.
        value: String,
    },
    /// The `options` leaf is not a valid S-expression of options.
    #[error("leaf options: {0}")]
    Options(#[from] SexpError),
}

/// Encodes an address as one path component.
pub fn encode_addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => {
            let mut text = v6.to_string();
            // Display writes an IPv4-mapped address's last 32 bits dotted (`::ffff:10.0.0.1`):
            // they become the same two segments in hex (`::ffff:a00:1`).
            if text.contains('.')
                && let Some((head, _)) = text.rsplit_once(':')
            {
                let [.., hi, lo] = v6.segments();
                text = format!("{head}:{hi:x}:{lo:x}");
            }
            text.replace(':', "_")
        }
    }
}

/// Decodes one path component back into an address (a reader maps `-` back to `.`).
pub fn decode_addr(component: &str) -> Result<IpAddr, LayoutError> {
    let err = || LayoutError::BadAddress {
        component: component.to_string(),
    };
    // Only the encoded alphabets: a literal `.` or `:` is not valid in a Xenstore path.
    if component.contains('_') {
        if !component
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'_')
        {
            return Err(err());
        }
        component
            .replace('_', ":")
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| err())
    } else {
        if !component.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
            return Err(err());
        }
        component
            .replace('-', ".")
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| err())
    }
}

fn decode_port(component: &str) -> Result<u16, LayoutError> {
    let ok = !component.is_empty() && component.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| component.parse().ok())
        .flatten()
        .ok_or_else(|| LayoutError::BadPort {
            component: component.to_string(),
        })
}

/// `/ip/<ip>`: the guest's subtree, and where it writes [`MANAGED`].
pub fn ip_path(ip: IpAddr) -> String {
    format!("{ROOT}/{}", encode_addr(ip))
}

/// One held connection: the guest's end (`local`) and the client's (`dest`), as the guest's
/// TCP stack names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SynKey {
    /// The guest's address (the SYN's destination).
    pub local_ip: IpAddr,
    /// The guest's port.
    pub local_port: u16,
    /// The client's address (the SYN's source).
    pub dest_ip: IpAddr,
    /// The client's port.
    pub dest_port: u16,
}

impl SynKey {
    /// `/ip/<local_ip>/<local_port>/<dest_ip>/<dest_port>`: the subtree the guest removes.
    pub fn conn_path(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            ip_path(self.local_ip),
            self.local_port,
            encode_addr(self.dest_ip),
            self.dest_port
        )
    }

    /// `<conn_path>/syn`.
    pub fn syn_path(&self) -> String {
        format!("{}/syn", self.conn_path())
    }

    /// `<conn_path>/syn/<leaf>`.
    pub fn leaf_path(&self, leaf: &str) -> String {
        format!("{}/syn/{leaf}", self.conn_path())
    }

    /// Reads a key back from a connection path, optionally followed by `/syn` and a leaf.
    pub fn from_path(path: &str) -> Result<SynKey, LayoutError> {
        let bad = || LayoutError::BadPath {
            path: path.to_string(),
        };
        let rest = path
            .strip_prefix(ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let tail_ok = match parts.len() {
            4 => true,
            5 => parts[4] == "syn",
            6 => parts[4] == "syn" && LEAVES.contains(&parts[5]),
            _ => false,
        };
        if !tail_ok {
            return Err(bad());
        }
        Ok(SynKey {
            local_ip: decode_addr(parts[0])?,
            local_port: decode_port(parts[1])?,
            dest_ip: decode_addr(parts[2])?,
            dest_port: decode_port(parts[3])?,
        })
    }
}

/// The six leaves of a held SYN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSyn {
    /// The client's advertised window, unscaled, from the SYN.
    pub tx_wnd: u16,
    /// The client's ISN.
    pub sequence: u32,
    /// The SYN's TCP options, as the guest's stack lists them ([`options_from_wire`]).
    pub options: Vec<TcpOption>,
    /// The ISN the guest must use in its SYN-ACK.
    pub tx_isn: u32,
    /// The guest's receive window.
    pub rx_wnd: u32,
    /// The window scale the guest offers.
    pub rx_wnd_scaleoffer: u8,
}

impl HeldSyn {
    /// A record with the original's guest-side defaults; `random` picks the ISN as the
    /// original did (below 65535, plus [`TX_ISN_BASE`]).
    pub fn new(tx_wnd: u16, sequence: u32, options: Vec<TcpOption>, random: u16) -> HeldSyn {
        HeldSyn {
            tx_wnd,
            sequence,
            options,
            tx_isn: TX_ISN_BASE + u32::from(random.min(65534)),
            rx_wnd: DEFAULT_RX_WND,
            rx_wnd_scaleoffer: DEFAULT_RX_WND_SCALEOFFER,
        }
    }

    /// Leaf name and text, in [`LEAVES`] order.
    pub fn to_leaves(&self) -> [(&'static str, String); 6] {
        [
            ("tx_wnd", self.tx_wnd.to_string()),
            // OCaml Int32.to_string: signed.
            ("sequence", (self.sequence as i32).to_string()),
            ("options", options_to_sexp(&self.options)),
            // OCaml Sequence.to_string: "%lu", unsigned.
            ("tx_isn", self.tx_isn.to_string()),
            ("rx_wnd", self.rx_wnd.to_string()),
            ("rx_wnd_scaleoffer", self.rx_wnd_scaleoffer.to_string()),
        ]
    }

    /// Reads a record back; `get(leaf)` returns the leaf's text or `None` if absent.
    pub fn from_leaves(
        mut get: impl FnMut(&str) -> Option<String>,
    ) -> Result<HeldSyn, LayoutError> {
        let mut leaf =
            |name: &'static str| get(name).ok_or(LayoutError::MissingLeaf { leaf: name });
        let bad = |leaf: &'static str, value: &str| LayoutError::BadLeaf {
            leaf,
            value: value.to_string(),
        };
        let tx_wnd = leaf("tx_wnd")?;
        let sequence = leaf("sequence")?;
        let options = leaf("options")?;
        let tx_isn = leaf("tx_isn")?;
        let rx_wnd = leaf("rx_wnd")?;
        let scale = leaf("rx_wnd_scaleoffer")?;
        Ok(HeldSyn {
            tx_wnd: tx_wnd.trim().parse().map_err(|_| bad("tx_wnd", &tx_wnd))?,
            sequence: parse_int32(&sequence).ok_or_else(|| bad("sequence", &sequence))?,
            options: options_from_sexp(&options)?,
            tx_isn: parse_int32(&tx_isn).ok_or_else(|| bad("tx_isn", &tx_isn))?,
            rx_wnd: rx_wnd.trim().parse().map_err(|_| bad("rx_wnd", &rx_wnd))?,
            rx_wnd_scaleoffer: scale
                .trim()
                .parse()
                .map_err(|_| bad("rx_wnd_scaleoffer", &scale))?,
        })
    }
}

/// A 32-bit value printed signed or unsigned: both forms read back to the same bits.
pub(super) fn parse_int32(s: &str) -> Option<u32> {
    let v: i64 = s.trim().parse().ok()?;
    (i64::from(i32::MIN)..=i64::from(u32::MAX))
        .contains(&v)
        .then_some(v as u32)
}

/// A TCP option, as the MirageOS stack's `Options.t`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpOption {
    /// Kind 1: one per NOP byte, as that stack keeps them.
    Noop,
    /// Kind 2.
    Mss(u16),
    /// Kind 3.
    WindowSizeShift(u8),
    /// Kind 4.
    SackOk,
    /// Kind 5: (left, right) edges, in reverse wire order as that stack reads them.
    Sack(Vec<(u32, u32)>),
    /// Kind 8: (tsval, tsecr).
    Timestamp(u32, u32),
    /// Any other kind, with its raw data.
    Unknown(u8, Vec<u8>),
}

/// Why TCP option bytes cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// An option's length byte is missing, below 2, or runs past the end.
    #[error("TCP option kind {kind} at offset {offset} has a bad length")]
    BadLength {
        /// The option's kind.
        kind: u8,
        /// Where it starts.
        offset: usize,
    },
}

/// Reads the options area of a TCP header into the list the original stack makes of it
/// (`Options.unmarshal`, `tcp/options.ml` of samoht/mirage-tcpip `synjistu`), which is what
/// the `options` leaf must hold: walked in wire order up to EOL, one [`TcpOption::Noop`] per
/// NOP byte, and each element put in front of those before it, so the list (and the blocks
/// of a SACK) come out in reverse wire order.
///
/// Where that parser gives up on the whole SYN (a known kind with a length not its own, an
/// MSS below 88), this one keeps the SYN, which a wire hand-over still delivers: such an
/// option becomes [`TcpOption::Unknown`] (the MSS is kept as it is). Only a length that
/// cannot be walked is an error.
pub fn options_from_wire(bytes: &[u8]) -> Result<Vec<TcpOption>, OptionsError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let kind = bytes[i];
        match kind {
            0 => break,
            1 => {
                out.push(TcpOption::Noop);
                i += 1;
                continue;
            }
            _ => {}
        }
        let len = *bytes
            .get(i + 1)
            .ok_or(OptionsError::BadLength { kind, offset: i })? as usize;
        if len < 2 || i + len > bytes.len() {
            return Err(OptionsError::BadLength { kind, offset: i });
        }
        let data = &bytes[i + 2..i + len];
        let be32 = |d: &[u8]| u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        out.push(match (kind, data.len()) {
            (2, 2) => TcpOption::Mss(u16::from_be_bytes([data[0], data[1]])),
            (3, 1) => TcpOption::WindowSizeShift(data[0]),
            (4, 0) => TcpOption::SackOk,
            // As many whole blocks as the length holds, as the original reads them.
            (5, _) => TcpOption::Sack(
                data.chunks_exact(8)
                    .rev()
                    .map(|c| (be32(&c[..4]), be32(&c[4..])))
                    .collect(),
            ),
            (8, 8) => TcpOption::Timestamp(be32(&data[..4]), be32(&data[4..])),
            _ => TcpOption::Unknown(kind, data.to_vec()),
        });
        i += len;
    }
    out.reverse();
    Ok(out)
}

/// Writes a list as [`options_from_wire`] reads it back as TCP header bytes (in wire order,
/// so reversed), padded with EOL to a multiple of 4.
pub fn options_to_wire(options: &[TcpOption]) -> Vec<u8> {
    let mut out = Vec::new();
    for opt in options.iter().rev() {
        match opt {
            TcpOption::Noop => out.push(1),
            TcpOption::Mss(m) => {
                out.extend([2, 4]);
                out.extend(m.to_be_bytes());
            }
            TcpOption::WindowSizeShift(s) => out.extend([3, 3, *s]),
            TcpOption::SackOk => out.extend([4, 2]),
            TcpOption::Sack(blocks) => {
                out.extend([5, (2 + 8 * blocks.len()) as u8]);
                for (l, r) in blocks.iter().rev() {
                    out.extend(l.to_be_bytes());
                    out.extend(r.to_be_bytes());
                }
            }
            TcpOption::Timestamp(a, b) => {
                out.extend([8, 10]);
                out.extend(a.to_be_bytes());
                out.extend(b.to_be_bytes());
            }
            TcpOption::Unknown(kind, data) => {
                out.extend([*kind, (2 + data.len()) as u8]);
                out.extend(data);
            }
        }
    }
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// [`LINUX_SYN_OPTIONS`] as the original stack lists them: reversed, with the NOP.
    fn linux_syn_options() -> Vec<TcpOption> {
        vec![
            TcpOption::WindowSizeShift(10),
            TcpOption::Noop,
            TcpOption::Timestamp(736_287_380, 0),
            TcpOption::SackOk,
            TcpOption::Mss(1460),
        ]
    }

    // The options area of a real Linux SYN: mss 1460, sackOK, TS val 736287380 ecr 0, nop,
    // wscale 10.
    pub(in crate::store) const LINUX_SYN_OPTIONS: [u8; 20] = [
        0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x2b, 0xe2, 0xda, 0x94, 0x00, 0x00, 0x00,
        0x00, 0x01, 0x03, 0x03, 0x0a,
    ];

    #[test]
    fn path_encoding_is_the_originals() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(encode_addr(ip), "10-0-0-1");
        assert_eq!(decode_addr("10-0-0-1").unwrap(), ip);
        assert_eq!(ip_path(ip), "/ip/10-0-0-1");
        let key = SynKey {
            local_ip: ip,
            local_port: 80,
            dest_ip: "10.0.0.254".parse().unwrap(),
            dest_port: 41234,
        };
        assert_eq!(key.conn_path(), "/ip/10-0-0-1/80/10-0-0-254/41234");
        assert_eq!(key.syn_path(), "/ip/10-0-0-1/80/10-0-0-254/41234/syn");
        assert_eq!(
            key.leaf_path("tx_isn"),
            "/ip/10-0-0-1/80/10-0-0-254/41234/syn/tx_isn"
        );
        for p in [key.conn_path(), key.syn_path(), key.leaf_path("options")] {
            assert_eq!(SynKey::from_path(&p).unwrap(), key);
        }
    }

    #[test]
    fn ipv6_uses_an_alphabet_xenstore_accepts() {
        let ip: IpAddr = "fd00::a:1".parse().unwrap();
        let c = encode_addr(ip);
        assert_eq!(c, "fd00__a_1");
        assert!(
            c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_@".contains(&b))
        );
        assert_eq!(decode_addr(&c).unwrap(), ip);
    }

    #[test]
    fn ipv4_mapped_ipv6_is_written_without_dots() {
        for text in [
            "::ffff:10.0.0.1",
            "::ffff:0.0.0.0",
            "::ffff:255.255.255.255",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let c = encode_addr(ip);
            assert!(
                c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_@".contains(&b)),
                "{text} -> {c}"
            );
            assert!(!c.contains('.'), "{text} -> {c}");
            assert_eq!(decode_addr(&c).unwrap(), ip, "{text} -> {c}");
            let key = SynKey {
                local_ip: ip,
                local_port: 80,
                dest_ip: ip,
                dest_port: 1,
            };
            assert_eq!(SynKey::from_path(&key.leaf_path("options")).unwrap(), key);
        }
        assert_eq!(
            encode_addr("::ffff:10.0.0.1".parse().unwrap()),
            "__ffff_a00_1"
        );
    }

    #[test]
    fn a_dotted_ipv6_component_is_refused() {
        for c in ["__ffff_10.0.0.1", "__10.0.0.1", "fd00__1.2.3.4"] {
            assert_eq!(
                decode_addr(c),
                Err(LayoutError::BadAddress {
                    component: c.to_string()
                }),
                "{c}"
            );
        }
        assert!(matches!(
            SynKey::from_path("/ip/__ffff_10.0.0.1/80/10-0-0-2/1"),
            Err(LayoutError::BadAddress { .. })
        ));
    }

    #[test]
    fn bad_paths_are_refused() {
        for p in [
            "/ip",
            "/ip/10-0-0-1",
            "/ip/10-0-0-1/80/10-0-0-2",
            "/ip/10-0-0-1/80/10-0-0-2/1/syn/nope",
            "/ip/10-0-0-1/80/10-0-0-2/1/ack",
            "/local/10-0-0-1/80/10-0-0-2/1",
        ] {
            assert!(
                matches!(SynKey::from_path(p), Err(LayoutError::BadPath { .. })),
                "{p}"
            );
        }
        assert!(matches!(
            SynKey::from_path("/ip/10-0-0/80/10-0-0-2/1"),
            Err(LayoutError::BadAddress { .. })
        ));
        assert!(matches!(
            SynKey::from_path("/ip/10.0.0.1/80/10-0-0-2/1"),
            Err(LayoutError::BadAddress { .. })
        ));
        for port in ["65536", "-1", "+80", "", "8o"] {
            let p = format!("/ip/10-0-0-1/{port}/10-0-0-2/1");
            assert!(
                matches!(SynKey::from_path(&p), Err(LayoutError::BadPort { .. })),
                "{p}"
            );
        }
    }

    #[test]
    fn wire_options_become_the_original_stacks_list_and_back() {
        assert_eq!(
            options_from_wire(&LINUX_SYN_OPTIONS).unwrap(),
            linux_syn_options()
        );
        assert_eq!(options_to_wire(&linux_syn_options()), LINUX_SYN_OPTIONS);
        // SACK blocks are consed too: the last block on the wire comes first.
        let sack = [5, 18, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4];
        assert_eq!(
            options_from_wire(&sack).unwrap(),
            vec![TcpOption::Sack(vec![(3, 4), (1, 2)])]
        );
        let opts = vec![
            TcpOption::Timestamp(5, 6),
            TcpOption::Sack(vec![(10, 20), (30, 40)]),
            TcpOption::Noop,
            TcpOption::SackOk,
            TcpOption::Noop,
            TcpOption::WindowSizeShift(7),
            TcpOption::Mss(536),
        ];
        let wire = options_to_wire(&opts);
        assert_eq!(wire.len() % 4, 0);
        assert_eq!(options_from_wire(&wire).unwrap(), opts);
    }

    #[test]
    fn odd_options_are_kept_where_the_original_would_drop_the_syn() {
        // MSS with a 3-byte length is not an MSS; it is kept, not guessed at.
        assert_eq!(
            options_from_wire(&[2, 3, 9, 0]).unwrap(),
            vec![TcpOption::Unknown(2, vec![9])]
        );
        // A SACK holds the whole blocks its length has room for, as the original reads it.
        assert_eq!(
            options_from_wire(&[5, 2, 0, 0]).unwrap(),
            vec![TcpOption::Sack(vec![])]
        );
        assert_eq!(
            options_from_wire(&[5, 11, 0, 0, 0, 1, 0, 0, 0, 2, 9]).unwrap(),
            vec![TcpOption::Sack(vec![(1, 2)])]
        );
        // Everything after EOL is padding.
        assert_eq!(
            options_from_wire(&[4, 2, 0, 2, 99]).unwrap(),
            vec![TcpOption::SackOk]
        );
    }

    #[test]
    fn malformed_wire_options_are_errors() {
        for bad in [
            &[2u8][..],
            &[2, 1, 0, 0],
            &[2, 0],
            &[2, 10, 1, 1],
            &[8, 10, 0, 0, 0],
        ] {
            assert!(
                matches!(options_from_wire(bad), Err(OptionsError::BadLength { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn leaves_are_written_as_the_original_did() {
        let syn = HeldSyn {
            tx_wnd: 64240,
            sequence: 0xF000_0001,
            options: linux_syn_options(),
            tx_isn: 0x1AFE_1234,
            rx_wnd: DEFAULT_RX_WND,
            rx_wnd_scaleoffer: DEFAULT_RX_WND_SCALEOFFER,
        };
        let leaves = syn.to_leaves();
        let names: Vec<_> = leaves.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, LEAVES);
        let get = |n: &str| leaves.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        assert_eq!(get("tx_wnd"), "64240");
        assert_eq!(get("sequence"), "-268435455");
        assert_eq!(get("tx_isn"), "452858420");
        assert_eq!(get("rx_wnd"), "65535");
        assert_eq!(get("rx_wnd_scaleoffer"), "2");
        let back = HeldSyn::from_leaves(|n| Some(get(n))).unwrap();
        assert_eq!(back, syn);
    }

    #[test]
    fn the_original_isn_choice_is_kept() {
        let s = HeldSyn::new(1, 2, vec![], 0);
        assert_eq!(s.tx_isn, TX_ISN_BASE);
        let s = HeldSyn::new(1, 2, vec![], u16::MAX);
        assert!(s.tx_isn < TX_ISN_BASE + 65535);
        assert_eq!((s.rx_wnd, s.rx_wnd_scaleoffer), (65535, 2));
    }

    #[test]
    fn the_isn_text_is_one_the_guests_signed_parser_takes() {
        // The guest reads `tx_isn` with OCaml's `Int32.of_string`, which refuses decimal text
        // above 2^31 - 1, though the original wrote it unsigned (`%lu`); `sequence` is
        // written signed.
        for random in 0..=u16::MAX {
            let leaves = HeldSyn::new(1, u32::MAX, vec![], random).to_leaves();
            let isn = &leaves[3];
            assert_eq!(isn.0, "tx_isn");
            assert!(isn.1.parse::<i32>().is_ok(), "tx_isn {}", isn.1);
        }
        let leaves = HeldSyn::new(1, u32::MAX, vec![], 0).to_leaves();
        assert_eq!(leaves[1], ("sequence", "-1".to_string()));
    }

    #[test]
    fn bad_leaves_are_named() {
        let good = HeldSyn::new(1, 2, vec![], 3).to_leaves();
        for (leaf, value) in [
            ("tx_wnd", "65536"),
            ("sequence", "4294967296"),
            ("sequence", "ten"),
            ("options", "(("),
            ("tx_isn", ""),
            ("rx_wnd", "-1"),
            ("rx_wnd_scaleoffer", "256"),
        ] {
            let r = HeldSyn::from_leaves(|n| {
                Some(if n == leaf {
                    value.to_string()
                } else {
                    good.iter().find(|(k, _)| *k == n).unwrap().1.clone()
                })
            });
            let err = r.unwrap_err();
            match err {
                LayoutError::BadLeaf { leaf: l, .. } => assert_eq!(l, leaf),
                LayoutError::Options(_) => assert_eq!(leaf, "options"),
                other => panic!("{leaf}={value}: {other:?}"),
            }
        }
        let missing = HeldSyn::from_leaves(|n| (n != "tx_isn").then(|| "1".to_string()));
        assert!(matches!(
            missing,
            Err(LayoutError::MissingLeaf { leaf: "tx_isn" })
        ));
    }
}
