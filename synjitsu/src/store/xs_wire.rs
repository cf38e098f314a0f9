//! The Xenstore wire protocol (`xs_wire.h`): a 16-byte header and a payload of NUL-separated
//! strings, over xenstored's Unix socket or the xenbus device.
//!
//! Owns framing, message types, error names and permission strings, both ways, so a client
//! (synjitsu's hand-over, [`super::xenstore`], which needs transactions and permissions) and a
//! server (the test support's small xenstored, `jitsu_tests::xenstored`) share one codec.
//! Sockets are the callers'. jitsu-dns does not use it: it only watches keys, through
//! `xenstore-rs`.
//!
//! `xenstore-rs` 0.8 speaks the same protocol but does not expose transactions (it always
//! sends transaction id 0) or `SET_PERMS`, both of which the hand-over needs.

use std::fmt;
use std::str::FromStr;

/// Header length: type, request id, transaction id, payload length, each a host-order u32.
pub const HEADER_LEN: usize = 16;
/// The largest payload xenstored accepts (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;

/// A message type (`enum xsd_sockmsg_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XsType {
    /// 0.
    Control,
    /// 1: list children.
    Directory,
    /// 2.
    Read,
    /// 3.
    GetPerms,
    /// 4.
    Watch,
    /// 5.
    Unwatch,
    /// 6: answer carries the new transaction id as a string.
    TransactionStart,
    /// 7: payload "T" commits, "F" aborts.
    TransactionEnd,
    /// 8.
    Introduce,
    /// 9.
    Release,
    /// 10.
    GetDomainPath,
    /// 11: path NUL value (value not NUL-terminated).
    Write,
    /// 12.
    Mkdir,
    /// 13.
    Rm,
    /// 14: path NUL perm NUL perm NUL ...
    SetPerms,
    /// 15: unsolicited, path NUL token NUL.
    WatchEvent,
    /// 16: payload is an errno name such as "ENOENT".
    Error,
    /// 17.
    IsDomainIntroduced,
    /// 18.
    Resume,
    /// 19.
    SetTarget,
    /// 21.
    ResetWatches,
    /// 22.
    DirectoryPart,
    /// Anything else: a server answers it with `ENOSYS`.
    Other(u32),
}

impl XsType {
    /// The numeric value on the wire.
    pub fn to_u32(self) -> u32 {
        match self {
            XsType::Control => 0,
            XsType::Directory => 1,
            XsType::Read => 2,
            XsType::GetPerms => 3,
            XsType::Watch => 4,
            XsType::Unwatch => 5,
            XsType::TransactionStart => 6,
            XsType::TransactionEnd => 7,
            XsType::Introduce => 8,
            XsType::Release => 9,
            XsType::GetDomainPath => 10,
            XsType::Write => 11,
            XsType::Mkdir => 12,
            XsType::Rm => 13,
            XsType::SetPerms => 14,
            XsType::WatchEvent => 15,
            XsType::Error => 16,
            XsType::IsDomainIntroduced => 17,
            XsType::Resume => 18,
            XsType::SetTarget => 19,
            XsType::ResetWatches => 21,
            XsType::DirectoryPart => 22,
            XsType::Other(v) => v,
        }
    }

    /// The type for a numeric value.
    pub fn from_u32(v: u32) -> XsType {
        match v {
            0 => XsType::Control,
            1 => XsType::Directory,
            2 => XsType::Read,
            3 => XsType::GetPerms,
            4 => XsType::Watch,
            5 => XsType::Unwatch,
            6 => XsType::TransactionStart,
            7 => XsType::TransactionEnd,
            8 => XsType::Introduce,
            9 => XsType::Release,
            10 => XsType::GetDomainPath,
            11 => XsType::Write,
            12 => XsType::Mkdir,
            13 => XsType::Rm,
            14 => XsType::SetPerms,
            15 => XsType::WatchEvent,
            16 => XsType::Error,
            17 => XsType::IsDomainIntroduced,
            18 => XsType::Resume,
            19 => XsType::SetTarget,
            21 => XsType::ResetWatches,
            22 => XsType::DirectoryPart,
            other => XsType::Other(other),
        }
    }
}

/// Why bytes are not a Xenstore message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XsWireError {
    /// The header announces a payload above [`PAYLOAD_MAX`].
    #[error("xenstore payload of {len} bytes exceeds {PAYLOAD_MAX}")]
    Oversized {
        /// The announced length.
        len: usize,
    },
}

/// One message, either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XsMsg {
    /// What it is.
    pub ty: XsType,
    /// Echoed by the server.
    pub req_id: u32,
    /// 0 outside a transaction.
    pub tx_id: u32,
    /// NUL-separated strings.
    pub payload: Vec<u8>,
}

impl XsMsg {
    /// A message whose payload is `parts`, each followed by a NUL.
    pub fn new(ty: XsType, req_id: u32, tx_id: u32, parts: &[&[u8]]) -> XsMsg {
        let mut payload = Vec::new();
        for p in parts {
            payload.extend_from_slice(p);
            payload.push(0);
        }
        XsMsg {
            ty,
            req_id,
            tx_id,
            payload,
        }
    }

    /// `WRITE path value`: the value is not NUL-terminated.
    pub fn write(req_id: u32, tx_id: u32, path: &str, value: &[u8]) -> XsMsg {
        let mut payload = Vec::with_capacity(path.len() + 1 + value.len());
        payload.extend_from_slice(path.as_bytes());
        payload.push(0);
        payload.extend_from_slice(value);
        XsMsg {
            ty: XsType::Write,
            req_id,
            tx_id,
            payload,
        }
    }

    /// `SET_PERMS path perm...`.
    pub fn set_perms(req_id: u32, tx_id: u32, path: &str, perms: &[Perm]) -> XsMsg {
        let texts: Vec<String> = perms.iter().map(Perm::to_string).collect();
        let mut parts: Vec<&[u8]> = vec![path.as_bytes()];
        parts.extend(texts.iter().map(|t| t.as_bytes()));
        XsMsg::new(XsType::SetPerms, req_id, tx_id, &parts)
    }

    /// An `ERROR` answer naming an errno (`"ENOENT"`).
    pub fn error(req_id: u32, tx_id: u32, errno: &str) -> XsMsg {
        XsMsg::new(XsType::Error, req_id, tx_id, &[errno.as_bytes()])
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), XsWireError> {
        if self.payload.len() > PAYLOAD_MAX {
            return Err(XsWireError::Oversized {
                len: self.payload.len(),
            });
        }
        out.extend_from_slice(&self.ty.to_u32().to_ne_bytes());
        out.extend_from_slice(&self.req_id.to_ne_bytes());
        out.extend_from_slice(&self.tx_id.to_ne_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_ne_bytes());
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    /// Reads one message off the front of `buf`: `Ok(None)` until it is all there; on success,
    /// also how many bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(XsMsg, usize)>, XsWireError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let word = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let len = word(12) as usize;
        if len > PAYLOAD_MAX {
            return Err(XsWireError::Oversized { len });
        }
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let msg = XsMsg {
            ty: XsType::from_u32(word(0)),
            req_id: word(4),
            tx_id: word(8),
            payload: buf[HEADER_LEN..HEADER_LEN + len].to_vec(),
        };
        Ok(Some((msg, HEADER_LEN + len)))
    }

    /// The payload split at NULs; a final NUL does not make an empty last string.
    pub fn parts(&self) -> Vec<&[u8]> {
        let p = self.payload.strip_suffix(&[0]).unwrap_or(&self.payload);
        if self.payload.is_empty() {
            return Vec::new();
        }
        p.split(|b| *b == 0).collect()
    }

    /// The payload as one string without its trailing NUL (answers to READ, errors, ids).
    pub fn text(&self) -> String {
        let p = self.payload.strip_suffix(&[0]).unwrap_or(&self.payload);
        String::from_utf8_lossy(p).into_owned()
    }
}

/// Who may do what to a node: the first entry of a node's list names its owner and what
/// everyone not listed may do; later entries grant a domain more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perm {
    /// What is granted.
    pub access: Access,
    /// To which domain.
    pub domid: u32,
}

/// The letter of a permission string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// `n`.
    None,
    /// `r`.
    Read,
    /// `w`.
    Write,
    /// `b`.
    Both,
}

impl Perm {
    /// A permission entry.
    pub const fn new(access: Access, domid: u32) -> Perm {
        Perm { access, domid }
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = match self.access {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        };
        write!(f, "{c}{}", self.domid)
    }
}

/// A permission string that is not `[nrwb]<domid>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid xenstore permission {0:?}")]
pub struct PermParseError(pub String);

impl FromStr for Perm {
    type Err = PermParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PermParseError(s.to_string());
        let mut chars = s.chars();
        let access = match chars.next() {
            Some('n') => Access::None,
            Some('r') => Access::Read,
            Some('w') => Access::Write,
            Some('b') => Access::Both,
            _ => return Err(err()),
        };
        let rest = chars.as_str();
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        Ok(Perm {
            access,
            domid: rest.parse().map_err(|_| err())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let msgs = [
            XsMsg::new(XsType::Read, 7, 0, &[b"/ip/10-0-0-1"]),
            XsMsg::write(8, 3, "/ip/10-0-0-1/80/10-0-0-2/9/syn/tx_wnd", b"64240"),
            XsMsg::set_perms(
                9,
                3,
                "/ip/10-0-0-1",
                &[Perm::new(Access::None, 0), Perm::new(Access::Both, 5)],
            ),
            XsMsg::new(XsType::TransactionEnd, 10, 3, &[b"T"]),
            XsMsg::error(11, 0, "ENOENT"),
            XsMsg::new(XsType::Other(99), 12, 0, &[]),
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            m.encode(&mut buf).unwrap();
        }
        let mut at = 0;
        for m in &msgs {
            let (back, used) = XsMsg::decode(&buf[at..]).unwrap().unwrap();
            assert_eq!(&back, m);
            at += used;
        }
        assert_eq!(at, buf.len());
        assert_eq!(
            XsMsg::decode(&buf[..buf.len() - 1]).unwrap().map(|m| m.1),
            {
                // Everything but the last message decodes; the cut one waits for more.
                let (_, u) = XsMsg::decode(&buf).unwrap().unwrap();
                Some(u)
            }
        );
    }

    #[test]
    fn the_header_is_host_order_and_write_has_no_final_nul() {
        let mut buf = Vec::new();
        XsMsg::write(1, 2, "/a", b"v").encode(&mut buf).unwrap();
        assert_eq!(&buf[..4], &11u32.to_ne_bytes());
        assert_eq!(&buf[4..8], &1u32.to_ne_bytes());
        assert_eq!(&buf[8..12], &2u32.to_ne_bytes());
        assert_eq!(&buf[12..16], &4u32.to_ne_bytes());
        assert_eq!(&buf[16..], b"/a\0v");
    }

    #[test]
    fn parts_and_text() {
        let m = XsMsg::set_perms(1, 0, "/p", &[Perm::new(Access::None, 0)]);
        assert_eq!(m.parts(), vec![&b"/p"[..], b"n0"]);
        assert_eq!(XsMsg::new(XsType::Directory, 1, 0, &[]).parts().len(), 0);
        assert_eq!(XsMsg::error(1, 0, "EACCES").text(), "EACCES");
        let dir = XsMsg::new(XsType::Directory, 1, 0, &[b"a", b"b"]);
        assert_eq!(dir.parts(), vec![&b"a"[..], b"b"]);
    }

    #[test]
    fn oversized_payloads_are_refused_both_ways() {
        let big = XsMsg::write(1, 0, "/a", &vec![b'x'; PAYLOAD_MAX]);
        assert!(matches!(
            big.encode(&mut Vec::new()),
            Err(XsWireError::Oversized { .. })
        ));
        let mut hdr = vec![0u8; HEADER_LEN];
        hdr[12..16].copy_from_slice(&(PAYLOAD_MAX as u32 + 1).to_ne_bytes());
        assert!(matches!(
            XsMsg::decode(&hdr),
            Err(XsWireError::Oversized { .. })
        ));
        assert_eq!(XsMsg::decode(&hdr[..15]), Ok(None));
    }

    #[test]
    fn perms_parse_and_print() {
        for s in ["n0", "r5", "w12", "b4294967295"] {
            assert_eq!(s.parse::<Perm>().unwrap().to_string(), s);
        }
        for bad in ["", "x0", "n", "r-1", "b 1", "r4294967296"] {
            assert!(bad.parse::<Perm>().is_err(), "{bad}");
        }
    }

    #[test]
    fn every_type_number_maps_back() {
        for v in 0..32 {
            assert_eq!(XsType::from_u32(v).to_u32(), v);
        }
    }
}
