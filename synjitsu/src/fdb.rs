//! The bridge's forwarding table, changed over netlink: steer a MAC to synjitsu's port with a
//! static, sticky entry (`bridge fdb replace MAC dev PORT master static sticky`), remove it,
//! and dump the table to see where every entry points.
//!
//! Owns the requests, reading dumped entries, and the blocking `NETLINK_ROUTE` socket they go
//! over. Messages are `netlink-packet-route`'s (`NeighbourMessage`: any state and flags an
//! entry may need, and the table's dump), the socket `netlink-sys`'s; both are safe Rust, so
//! nothing here is in [`crate::sys`]. It does not decide which MAC to steer ([`crate::hold`])
//! or keep the table as synjitsu wants it ([`crate::steering`]), nor create the port
//! ([`crate::port`]).
//!
//! Why sticky: on Linux a static entry that is not sticky moves to the port its MAC sends
//! from, and a booting guest's kernel sends (a router solicitation, an MLD report) as soon as
//! its link is up, well before it can answer a SYN. `NTF_STICKY` (Linux 4.20) keeps the entry
//! where synjitsu put it; where the kernel refuses it, entries are added without it (and
//! [`Fdb::sticky`] says so).
//!
//! Spawning iproute2's `bridge` for each change took about a millisecond, all of it on the path
//! from a guest's announcement to its first held SYN; a request here takes a few microseconds
//! (`bench/fdb-latency`).

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::neighbour::{
    NeighbourAttribute, NeighbourFlags, NeighbourHeader, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use shared_proto::Mac;

/// `NUD_REACHABLE`: with `NUD_NOARP`, what `bridge fdb ... static` asks for.
const NUD_REACHABLE: u16 = 0x02;
/// `NUD_NOARP`: an entry added by hand, not learnt.
const NUD_NOARP: u16 = 0x40;
/// `NUD_PERMANENT`: the bridge's own addresses (`bridge fdb ... permanent`).
const NUD_PERMANENT: u16 = 0x80;
/// `RTM_NEWNEIGH`: an entry, added or dumped.
const RTM_NEWNEIGH: u16 = 28;
/// The receive buffer: any datagram the kernel sends on this socket.
const RECV_BUF: usize = 64 * 1024;

/// A forwarding-table request that failed.
#[derive(Debug, thiserror::Error)]
#[error("forwarding table ({what}): {source}")]
pub struct FdbError {
    /// The request (`open`, `steer`, `dump`, `delete`).
    pub what: &'static str,
    /// Why: the kernel's errno, or a malformed answer.
    #[source]
    pub source: io::Error,
}

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
    /// Stays on its port whatever port its MAC sends from (`NTF_STICKY`).
    pub sticky: bool,
}

/// A bridge-family neighbour message for port `ifindex`.
fn neighbour(ifindex: u32, state: u16, flags: NeighbourFlags) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::from(state);
    m.header.flags = flags;
    m
}

/// `msg` as one netlink request with sequence number `seq`, ready to send.
fn request(msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

/// `RTM_NEWNEIGH`: a static entry for `mac` on port `ifindex`, sticky if asked, replacing any
/// (wherever it points).
pub fn steer_request(seq: u32, ifindex: u32, mac: Mac, sticky: bool) -> Vec<u8> {
    let mut flags = NeighbourFlags::Controller;
    if sticky {
        flags |= NeighbourFlags::Sticky;
    }
    let mut m = neighbour(ifindex, NUD_NOARP | NUD_REACHABLE, flags);
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
    request(
        RouteNetlinkMessage::NewNeighbour(m),
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        seq,
    )
}

/// `RTM_DELNEIGH`: removes `entry` from its port.
pub fn delete_request(seq: u32, entry: &FdbEntry) -> Vec<u8> {
    let mut m = neighbour(entry.ifindex, NUD_NOARP, NeighbourFlags::Controller);
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(
        entry.mac.octets().to_vec(),
    ));
    m.attributes
        .extend(entry.vlan.map(NeighbourAttribute::Vlan));
    request(
        RouteNetlinkMessage::DelNeighbour(m),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
    )
}

/// `RTM_GETNEIGH` dump of every bridge forwarding entry, or only those of bridge `master`'s
/// port `port` (a socket with strict checking: the kernel then formats no other entry).
pub fn dump_request(seq: u32, only: Option<(u32, u32)>) -> Vec<u8> {
    let mut m = neighbour(0, 0, NeighbourFlags::empty());
    if let Some((master, port)) = only {
        m.header.ifindex = port;
        m.attributes.push(NeighbourAttribute::Controller(master));
    }
    request(
        RouteNetlinkMessage::GetNeighbour(m),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
    )
}

/// Whether an entry in `state` was added by hand and not learnt (`static`: NOARP without
/// PERMANENT).
fn is_static(state: u16) -> bool {
    state & NUD_NOARP != 0 && state & NUD_PERMANENT == 0
}

/// Reads one dumped bridge entry; `None` for anything else (another family, no MAC).
fn entry_of(m: &NeighbourMessage) -> Option<FdbEntry> {
    if m.header.family != AddressFamily::Bridge {
        return None;
    }
    let (mut mac, mut vlan, mut master) = (None, None, None);
    for a in &m.attributes {
        match a {
            NeighbourAttribute::LinkLayerAddress(b) => {
                mac = <[u8; 6]>::try_from(b.as_slice()).ok().map(Mac);
            }
            NeighbourAttribute::Vlan(v) => vlan = Some(*v),
            NeighbourAttribute::Controller(i) => master = Some(*i),
            _ => {}
        }
    }
    Some(FdbEntry {
        ifindex: m.header.ifindex,
        mac: mac?,
        vlan,
        master,
        is_static: is_static(u16::from(m.header.state)),
        sticky: m.header.flags.contains(NeighbourFlags::Sticky),
    })
}

/// Reads one dumped `RTM_NEWNEIGH` message (header included); `None` for anything else or
/// anything malformed.
pub fn parse_entry(msg: &[u8]) -> Option<FdbEntry> {
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(msg)
        .ok()?
        .payload
    {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => entry_of(&m),
        _ => None,
    }
}

/// What a request's answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// An acknowledgement (the request asked for `NLM_F_ACK`).
    Ack,
    /// Dumped entries up to `NLMSG_DONE`: all of them, or only `mac`'s.
    Dump(Option<Mac>),
}

/// The bridge's forwarding table, seen from synjitsu's port. Every call blocks for one
/// netlink round trip (or a dump); [`crate::steering`] makes them from its own thread, one at
/// a time.
#[derive(Debug)]
pub struct Fdb {
    sock: Socket,
    seq: u32,
    bridge_ifindex: u32,
    port_ifindex: u32,
    /// Whether steering entries are added sticky: until the kernel refuses it.
    sticky: bool,
    /// The kernel checks dump requests strictly, so a dump can ask for one port's entries.
    strict: bool,
    /// Where answers are received, reused by every request.
    rx: Vec<u8>,
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink {what}"),
    )
}

impl Fdb {
    /// Opens a netlink socket for the bridge `bridge_ifindex`, whose port `port_ifindex` is
    /// synjitsu's.
    pub fn open(bridge_ifindex: u32, port_ifindex: u32) -> Result<Fdb, FdbError> {
        let open = |source| FdbError {
            what: "open",
            source,
        };
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(open)?;
        // Port id 0: the kernel assigns one.
        sock.bind(&SocketAddr::new(0, 0)).map_err(open)?;
        // Linux 4.20 on; before, every dump is of the whole table.
        let strict = sock.set_netlink_get_strict_chk(true).is_ok();
        Ok(Fdb {
            sock,
            seq: 0,
            bridge_ifindex,
            port_ifindex,
            sticky: true,
            strict,
            rx: Vec::with_capacity(RECV_BUF),
        })
    }

    /// synjitsu's port.
    pub fn port_ifindex(&self) -> u32 {
        self.port_ifindex
    }

    /// Whether steering entries are added sticky (false once the kernel refused it, or after
    /// [`Fdb::set_sticky`]`(false)`).
    pub fn sticky(&self) -> bool {
        self.sticky
    }

    /// Stops (or resumes) adding steering entries sticky: for a kernel that takes the flag
    /// but does not keep it (before 4.20, unknown flags are ignored).
    pub fn set_sticky(&mut self, sticky: bool) {
        self.sticky = sticky;
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request (sequence number `seq`) and returns the entries that answer it: for
    /// a dump, every static one up to `NLMSG_DONE` (a message that does not parse is skipped,
    /// not trusted); for a change, none once acknowledged. A negative error in the answer becomes
    /// the `io::Error` of that errno.
    fn transact(&mut self, msg: &[u8], seq: u32, answer: Answer) -> io::Result<Vec<FdbEntry>> {
        let sent = self.sock.send(msg, 0)?;
        if sent != msg.len() {
            return Err(io::Error::other("short netlink send"));
        }
        let dump = answer != Answer::Ack;
        let mut out = Vec::new();
        loop {
            shared_io::netlink::recv(&self.sock, &mut self.rx)?;
            for m in shared_io::netlink::answers(&self.rx, seq) {
                let m = m.map_err(|_| malformed("answer"))?;
                let buf = NetlinkBuffer::new(m);
                // Only static entries matter, and the bridge may have learnt hundreds of
                // thousands (a flood from random source MACs): those are skipped on their
                // header alone, not parsed.
                if dump
                    && buf.message_type() == RTM_NEWNEIGH
                    && NeighbourHeader::parse(buf.payload())
                        .is_ok_and(|h| !is_static(u16::from(h.state)))
                {
                    continue;
                }
                // Parsing every entry of a large table to find one MAC's would double the
                // time: an entry that does not even contain the MAC's bytes is not one of its.
                if let Answer::Dump(Some(mac)) = answer
                    && buf.message_type() == RTM_NEWNEIGH
                    && !m.windows(6).any(|w| w == mac.octets())
                {
                    continue;
                }
                let Ok(parsed) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(m) else {
                    if dump {
                        continue;
                    }
                    return Err(malformed("acknowledgement"));
                };
                match parsed.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        Some(code) => return Err(io::Error::from_raw_os_error(-code.get())),
                        None if !dump => return Ok(out),
                        None => {}
                    },
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => {
                        out.extend(entry_of(&n));
                    }
                    _ => {}
                }
            }
        }
    }

    /// Points `mac` at synjitsu's port with a static entry, sticky unless the kernel refused
    /// that before: a kernel that refuses it now (`EINVAL`, `EOPNOTSUPP`) gets the entry
    /// without it, once and for all, with a warning.
    pub fn steer(&mut self, mac: Mac) -> Result<(), FdbError> {
        let seq = self.next_seq();
        let msg = steer_request(seq, self.port_ifindex, mac, self.sticky);
        match self.transact(&msg, seq, Answer::Ack) {
            Err(e)
                if self.sticky
                    && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) =>
            {
                tracing::warn!(error = %e, "the kernel refuses sticky forwarding entries (Linux 4.20 has them): a booting guest's first frame will move its entry to the guest's port");
                self.sticky = false;
                self.steer(mac)
            }
            r => r.map(|_| ()).map_err(|source| FdbError {
                what: "steer",
                source,
            }),
        }
    }

    /// Removes `entry`; true if it was there (false: gone already, which is what was wanted).
    pub fn delete(&mut self, entry: &FdbEntry) -> Result<bool, FdbError> {
        let seq = self.next_seq();
        match self.transact(&delete_request(seq, entry), seq, Answer::Ack) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(FdbError {
                what: "delete",
                source,
            }),
        }
    }

    /// Removes `mac`'s entry from synjitsu's port; false if there was none there (it never
    /// was, or it moved: [`Fdb::release`] looks for it elsewhere).
    pub fn unsteer(&mut self, mac: Mac) -> Result<bool, FdbError> {
        self.delete(&FdbEntry {
            ifindex: self.port_ifindex,
            mac,
            vlan: None,
            master: Some(self.bridge_ifindex),
            is_static: true,
            sticky: self.sticky,
        })
    }

    /// Every static entry of this bridge's ports (not the bridge device's own), from one dump.
    pub fn dump(&mut self) -> Result<Vec<FdbEntry>, FdbError> {
        self.dump_of(None, false)
    }

    /// The static entries on synjitsu's port, from a dump the kernel limits to it where it
    /// can: the cost of the bridge's whole table, learnt entries included (a flood from
    /// random source MACs makes hundreds of thousands), is then the kernel's walk alone.
    pub fn dump_port(&mut self) -> Result<Vec<FdbEntry>, FdbError> {
        let port = self.port_ifindex;
        let mut t = self.dump_of(None, self.strict)?;
        t.retain(|e| e.ifindex == port);
        Ok(t)
    }

    fn dump_of(&mut self, mac: Option<Mac>, port_only: bool) -> Result<Vec<FdbEntry>, FdbError> {
        let seq = self.next_seq();
        let bridge = self.bridge_ifindex;
        let only = port_only.then_some((bridge, self.port_ifindex));
        let mut all = self
            .transact(&dump_request(seq, only), seq, Answer::Dump(mac))
            .map_err(|source| FdbError {
                what: "dump",
                source,
            })?;
        all.retain(|e| {
            e.ifindex != bridge && e.master == Some(bridge) && mac.is_none_or(|m| m == e.mac)
        });
        Ok(all)
    }

    /// Removes the static entries for `mac` on the bridge, wherever they point now: the one on
    /// synjitsu's port in one request; only if there is none there, the others from a dump.
    pub fn release(&mut self, mac: Mac) -> Result<(), FdbError> {
        if self.unsteer(mac)? {
            return Ok(());
        }
        for e in &self.dump_of(Some(mac), false)? {
            self.delete(e)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = Mac([0x02, 0x77, 0, 0, 1, 0x10]);
    const RTM_DELNEIGH: u16 = 29;
    const RTM_GETNEIGH: u16 = 30;
    const AF_BRIDGE: u8 = 7;
    const NDA_LLADDR: u16 = 2;
    const NDA_VLAN: u16 = 5;
    const NTF_MASTER: u8 = 0x04;
    const NTF_STICKY: u8 = 0x40;

    /// A static entry for [`MAC`] on port 42 of bridge 3, VLAN 1, as the kernel dumps it:
    /// `struct nlmsghdr`, `struct ndmsg`, then attributes, in host order (little-endian).
    #[rustfmt::skip]
    const DUMPED: [u8; 64] = [
        64, 0, 0, 0,  28, 0,  2, 0,  9, 0, 0, 0,  0, 0, 0, 0, // len, RTM_NEWNEIGH, MULTI, seq 9
        7, 0, 0, 0,  42, 0, 0, 0,  0x42, 0,  0x04,  0,       // AF_BRIDGE, port 42, NOARP|REACHABLE, NTF_MASTER
        10, 0, 2, 0,  0x02, 0x77, 0, 0, 1, 0x10,  0, 0,      // NDA_LLADDR
        8, 0, 9, 0,  3, 0, 0, 0,                             // NDA_MASTER 3
        6, 0, 5, 0,  1, 0,  0, 0,                            // NDA_VLAN 1
        7, 0, 99, 0,  1, 2, 3,  0,                           // an attribute nobody knows
    ];

    #[test]
    fn steer_is_a_static_master_entry() {
        let m = steer_request(7, 42, MAC, false);
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
        // Sticky: the same request with the flag, so the entry stays on synjitsu's port.
        let sticky = steer_request(7, 42, MAC, true);
        assert_eq!(sticky[26], NTF_MASTER | NTF_STICKY);
        assert_eq!(sticky[..26], m[..26]);
        assert_eq!(sticky[27..], m[27..]);
    }

    #[test]
    fn a_dumped_entry_reads_back_and_deletes_with_its_vlan() {
        let e = parse_entry(&DUMPED).unwrap();
        assert_eq!(
            e,
            FdbEntry {
                ifindex: 42,
                mac: MAC,
                vlan: Some(1),
                master: Some(3),
                is_static: true,
                sticky: false,
            }
        );
        let d = delete_request(10, &e);
        assert_eq!(u16::from_ne_bytes([d[4], d[5]]), RTM_DELNEIGH);
        assert_eq!(u32::from_ne_bytes(d[20..24].try_into().unwrap()), 42);
        assert_eq!(u16::from_ne_bytes([d[24], d[25]]), 0x40, "NOARP");
        assert_eq!(&d[32..38], &MAC.octets());
        assert_eq!(u16::from_ne_bytes([d[42], d[43]]), NDA_VLAN);
        assert_eq!(u16::from_ne_bytes([d[44], d[45]]), 1);
        let mut sticky = DUMPED;
        sticky[26] |= NTF_STICKY;
        assert!(parse_entry(&sticky).unwrap().sticky);
        // Learnt and permanent entries are not static.
        let mut learnt = DUMPED;
        learnt[24..26].copy_from_slice(&NUD_REACHABLE.to_ne_bytes());
        assert!(!parse_entry(&learnt).unwrap().is_static);
        let mut local = DUMPED;
        local[24..26].copy_from_slice(&(NUD_NOARP | NUD_PERMANENT).to_ne_bytes());
        assert!(!parse_entry(&local).unwrap().is_static);
    }

    #[test]
    fn malformed_dumps_are_skipped_not_trusted() {
        for cut in 0..DUMPED.len() {
            let mut m = DUMPED[..cut].to_vec();
            // A cut message that says its own (shorter) length is still cut attributes.
            if m.len() >= 4 {
                m[0..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            }
            let _ = parse_entry(&m);
            let _ = parse_entry(&DUMPED[..cut]);
        }
        let mut bad_len = DUMPED;
        bad_len[28..30].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(parse_entry(&bad_len), None);
        let mut not_bridge = DUMPED;
        not_bridge[16] = 2;
        assert_eq!(parse_entry(&not_bridge), None);
        let mut no_mac = DUMPED[..28].to_vec();
        no_mac[0..4].copy_from_slice(&28u32.to_ne_bytes());
        assert_eq!(parse_entry(&no_mac), None);
        let d = dump_request(1, None);
        assert_eq!(d.len(), 28);
        assert_eq!(u16::from_ne_bytes([d[4], d[5]]), RTM_GETNEIGH);
        assert_eq!(u16::from_ne_bytes([d[6], d[7]]), 0x301, "REQUEST|DUMP");
        assert_eq!(d[16], AF_BRIDGE);
    }
}
