//! The bridge forwarding-table requests synjitsu makes, as netlink messages: steer a MAC to a
//! port with a static entry (`bridge fdb replace MAC dev PORT master static`), and find and
//! remove static entries for a MAC wherever they now are (on Linux a static entry moves to
//! the port its MAC sends from).
//!
//! Owns encoding the requests and decoding dumped entries, on plain bytes; the socket is
//! [`crate::sys::netlink`]'s. Spawning iproute2's `bridge` for each change took about 2 ms,
//! all of it on the path from a guest's announcement to its first held SYN; a netlink
//! request takes tens of microseconds.

use shared_proto::Mac;

use crate::sys::netlink::NLMSG_HDRLEN;

const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const AF_BRIDGE: u8 = 7;
const NDA_LLADDR: u16 = 2;
const NDA_VLAN: u16 = 5;
const NDA_MASTER: u16 = 9;
const NUD_REACHABLE: u16 = 0x02;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;
const NTF_MASTER: u8 = 0x04;
const NDMSG_LEN: usize = 12;

/// One entry of the bridge's forwarding table, as dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    /// The port (or the bridge itself) it points at.
    pub ifindex: u32,
    /// The MAC.
    pub mac: Mac,
    /// The VLAN, if the entry has one.
    pub vlan: Option<u16>,
    /// The bridge it belongs to (`NDA_MASTER`), if given.
    pub master: Option<u32>,
    /// Added by hand and not learnt (`static`: NOARP without PERMANENT).
    pub is_static: bool,
}

fn header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in `finish`
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
}

fn ndmsg(buf: &mut Vec<u8>, ifindex: u32, state: u16, flags: u8) {
    buf.push(AF_BRIDGE);
    buf.extend_from_slice(&[0, 0, 0]);
    buf.extend_from_slice(&ifindex.to_ne_bytes());
    buf.extend_from_slice(&state.to_ne_bytes());
    buf.push(flags);
    buf.push(0); // ndm_type
}

fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn finish(mut buf: Vec<u8>) -> Vec<u8> {
    let len = (buf.len() as u32).to_ne_bytes();
    buf[..4].copy_from_slice(&len);
    buf
}

/// `RTM_NEWNEIGH`: a static entry for `mac` on port `ifindex`, replacing any.
pub fn steer_request(seq: u32, ifindex: u32, mac: Mac) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    header(
        &mut b,
        RTM_NEWNEIGH,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        seq,
    );
    ndmsg(&mut b, ifindex, NUD_NOARP | NUD_REACHABLE, NTF_MASTER);
    attr(&mut b, NDA_LLADDR, &mac.octets());
    finish(b)
}

/// `RTM_DELNEIGH`: removes `entry` from its port.
pub fn delete_request(seq: u32, entry: &FdbEntry) -> Vec<u8> {
    let mut b = Vec::with_capacity(48);
    header(&mut b, RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, seq);
    ndmsg(&mut b, entry.ifindex, NUD_NOARP, NTF_MASTER);
    attr(&mut b, NDA_LLADDR, &entry.mac.octets());
    if let Some(v) = entry.vlan {
        attr(&mut b, NDA_VLAN, &v.to_ne_bytes());
    }
    finish(b)
}

/// `RTM_GETNEIGH` dump of every bridge forwarding entry.
pub fn dump_request(seq: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    header(&mut b, RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq);
    ndmsg(&mut b, 0, 0, 0);
    finish(b)
}

/// Reads one dumped `RTM_NEWNEIGH` message (header included); `None` for anything else or
/// anything malformed.
pub fn parse_entry(msg: &[u8]) -> Option<FdbEntry> {
    let ty = u16::from_ne_bytes([*msg.get(4)?, *msg.get(5)?]);
    let nd = msg.get(NLMSG_HDRLEN..NLMSG_HDRLEN + NDMSG_LEN)?;
    if ty != RTM_NEWNEIGH || nd[0] != AF_BRIDGE {
        return None;
    }
    let ifindex = u32::from_ne_bytes([nd[4], nd[5], nd[6], nd[7]]);
    let state = u16::from_ne_bytes([nd[8], nd[9]]);
    let (mut mac, mut vlan, mut master) = (None, None, None);
    let mut rest = msg.get(NLMSG_HDRLEN + NDMSG_LEN..)?;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        let data = &rest[4..len];
        match (ty, data.len()) {
            (NDA_LLADDR, 6) => {
                mac = Some(Mac([data[0], data[1], data[2], data[3], data[4], data[5]]))
            }
            (NDA_VLAN, 2) => vlan = Some(u16::from_ne_bytes([data[0], data[1]])),
            (NDA_MASTER, 4) => {
                master = Some(u32::from_ne_bytes([data[0], data[1], data[2], data[3]]));
            }
            _ => {}
        }
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    Some(FdbEntry {
        ifindex,
        mac: mac?,
        vlan,
        master,
        is_static: state & NUD_NOARP != 0 && state & NUD_PERMANENT == 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = Mac([0x02, 0x77, 0, 0, 1, 0x10]);

    #[test]
    fn steer_is_a_static_master_entry() {
        let m = steer_request(7, 42, MAC);
        assert_eq!(m.len(), 16 + 12 + 12);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWNEIGH);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 0x505);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(m[16], AF_BRIDGE);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 42);
        assert_eq!(u16::from_ne_bytes([m[24], m[25]]), 0x42);
        assert_eq!(m[26], NTF_MASTER);
        assert_eq!(u16::from_ne_bytes([m[28], m[29]]), 10, "attribute length");
        assert_eq!(u16::from_ne_bytes([m[30], m[31]]), NDA_LLADDR);
        assert_eq!(&m[32..38], &MAC.octets());
        assert_eq!(&m[38..40], &[0, 0]);
    }

    #[test]
    fn a_dumped_entry_reads_back_and_deletes_with_its_vlan() {
        // A static entry on port 42 of bridge 3, VLAN 1, as the kernel dumps it (built with
        // the same layout the kernel uses: ndmsg, then attributes).
        let mut m = Vec::new();
        header(&mut m, RTM_NEWNEIGH, 0x2, 9);
        ndmsg(&mut m, 42, NUD_NOARP | NUD_REACHABLE, NTF_MASTER);
        attr(&mut m, NDA_LLADDR, &MAC.octets());
        attr(&mut m, NDA_MASTER, &3u32.to_ne_bytes());
        attr(&mut m, NDA_VLAN, &1u16.to_ne_bytes());
        attr(&mut m, 99, &[1, 2, 3]);
        let m = finish(m);
        let e = parse_entry(&m).unwrap();
        assert_eq!(
            e,
            FdbEntry {
                ifindex: 42,
                mac: MAC,
                vlan: Some(1),
                master: Some(3),
                is_static: true
            }
        );
        let d = delete_request(10, &e);
        assert_eq!(u16::from_ne_bytes([d[4], d[5]]), RTM_DELNEIGH);
        assert_eq!(u32::from_ne_bytes(d[20..24].try_into().unwrap()), 42);
        assert_eq!(u16::from_ne_bytes([d[42], d[43]]), NDA_VLAN);
        // Learnt and permanent entries are not static.
        let mut learnt = m.clone();
        learnt[24..26].copy_from_slice(&NUD_REACHABLE.to_ne_bytes());
        assert!(!parse_entry(&learnt).unwrap().is_static);
        let mut local = m.clone();
        local[24..26].copy_from_slice(&(NUD_NOARP | NUD_PERMANENT).to_ne_bytes());
        assert!(!parse_entry(&local).unwrap().is_static);
    }

    #[test]
    fn malformed_dumps_are_skipped_not_trusted() {
        let mut m = Vec::new();
        header(&mut m, RTM_NEWNEIGH, 0x2, 9);
        ndmsg(&mut m, 42, NUD_NOARP, NTF_MASTER);
        attr(&mut m, NDA_LLADDR, &MAC.octets());
        let m = finish(m);
        for cut in 0..m.len() {
            let _ = parse_entry(&m[..cut]);
        }
        let mut bad_len = m.clone();
        bad_len[28..30].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(parse_entry(&bad_len), None);
        let mut not_bridge = m.clone();
        not_bridge[16] = 2;
        assert_eq!(parse_entry(&not_bridge), None);
        let no_mac = finish({
            let mut b = Vec::new();
            header(&mut b, RTM_NEWNEIGH, 0x2, 9);
            ndmsg(&mut b, 42, NUD_NOARP, NTF_MASTER);
            b
        });
        assert_eq!(parse_entry(&no_mac), None);
        assert!(dump_request(1).len() == 28);
    }
}
