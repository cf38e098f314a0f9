//! The process backend's network plumbing, over rtnetlink in the calling thread's network
//! namespace: the VM's veth pair (created with its guest end already in the VM's namespace
//! and its host end on the bridge), links brought up and deleted, addresses and the default
//! route; and
//! [`in_netns`], which runs work on a thread of its own inside a VM's namespace.
//!
//! Owns the requests and the blocking `NETLINK_ROUTE` socket. It does not decide what a VM
//! gets ([`super::process`] does), nor create or delete namespaces (`crate::sys::netns`). Messages are
//! `netlink-packet-route`'s, the socket `netlink-sys`'s: safe Rust, nothing in `sys`.
//!
//! Each boot used to spawn about twenty processes (`ip` six times, two shells, and `ip netns
//! exec` twice, each remounting `/sys`); a request here takes microseconds (issue 12).

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use shared_proto::Mac;

/// The errno of a request for a link that does not exist.
const ENODEV: i32 = 19;
/// The receive buffer: any answer the kernel sends on this socket.
const RECV_BUF: usize = 32 * 1024;

/// A blocking rtnetlink socket in the network namespace of the thread that opened it.
#[derive(Debug)]
pub(super) struct Rtnl {
    sock: Socket,
    seq: u32,
    rx: Vec<u8>,
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer")
}

impl Rtnl {
    /// Opens a socket in the calling thread's network namespace.
    pub(super) fn open() -> io::Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        // Port id 0: the kernel assigns one.
        sock.bind(&SocketAddr::new(0, 0))?;
        Ok(Rtnl {
            sock,
            seq: 0,
            rx: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Sends `msg` with `flags` (and `NLM_F_REQUEST | NLM_F_ACK`) and waits for its answer:
    /// the links it returned (for a `GetLink`), or an error carrying the kernel's errno.
    fn transact(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<LinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        if self.sock.send(&buf, 0)? != buf.len() {
            return Err(io::Error::other("short netlink send"));
        }
        let mut links = Vec::new();
        loop {
            shared_io::netlink::recv(&self.sock, &mut self.rx)?;
            for m in shared_io::netlink::answers(&self.rx, seq) {
                let m = m?;
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(m)
                    .map_err(|_| malformed())?;
                match parsed.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                            None => Ok(links),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(links),
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => links.push(l),
                    _ => {}
                }
            }
        }
    }

    /// The index of the link `name`, or `NotFound`.
    pub(super) fn index(&mut self, name: &str) -> io::Result<u32> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        let links = self
            .transact(RouteNetlinkMessage::GetLink(m), 0)
            .map_err(|e| {
                if e.raw_os_error() == Some(ENODEV) {
                    io::Error::new(io::ErrorKind::NotFound, format!("no link {name}"))
                } else {
                    e
                }
            })?;
        links
            .first()
            .map(|l| l.header.index)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link {name}")))
    }

    /// Creates the veth pair `host` (MAC `host_mac`, a port of bridge `master`, down) and
    /// `guest` (MAC `guest_mac`) in the namespace `guest_netns` (its `/run/netns` file).
    pub(super) fn add_veth(
        &mut self,
        host: &str,
        host_mac: Mac,
        master: u32,
        guest: &str,
        guest_mac: Mac,
        guest_netns: &Path,
    ) -> io::Result<()> {
        let ns = File::open(guest_netns)?;
        let mut peer = LinkMessage::default();
        peer.attributes = vec![
            LinkAttribute::IfName(guest.to_string()),
            LinkAttribute::Address(guest_mac.octets().to_vec()),
            LinkAttribute::NetNsFd(ns.as_raw_fd()),
        ];
        let mut m = LinkMessage::default();
        m.attributes = vec![
            LinkAttribute::IfName(host.to_string()),
            LinkAttribute::Address(host_mac.octets().to_vec()),
            LinkAttribute::Controller(master),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
            ]),
        ];
        // `ns` stays open until the kernel has answered.
        let done = self.transact(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL);
        drop(ns);
        done.map(|_| ())
    }

    /// Deletes the link `name` (both ends, for a veth); one that does not exist is no error.
    pub(super) fn del_link(&mut self, name: &str) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.transact(RouteNetlinkMessage::DelLink(m), 0) {
            Err(e) if e.raw_os_error() == Some(ENODEV) => Ok(()),
            done => done.map(|_| ()),
        }
    }

    /// Brings the link `index` up.
    pub(super) fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.transact(RouteNetlinkMessage::SetLink(m), 0)
            .map(|_| ())
    }

    /// Adds `addr/prefix` to the link `index` (IPv6 with `nodad` if `nodad`).
    pub(super) fn add_address(
        &mut self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
        nodad: bool,
    ) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.prefix_len = prefix;
        m.header.index = index;
        if nodad {
            m.header.flags = AddressHeaderFlags::Nodad;
        }
        m.attributes.push(AddressAttribute::Local(addr));
        m.attributes.push(AddressAttribute::Address(addr));
        self.transact(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(|_| ())
    }

    /// Adds the default route via `gateway` to the main table.
    pub(super) fn add_default_route(&mut self, gateway: IpAddr) -> io::Result<()> {
        let mut m = RouteMessage::default();
        let (family, gw) = match gateway {
            IpAddr::V4(a) => (AddressFamily::Inet, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, RouteAddress::Inet6(a)),
        };
        m.header.address_family = family;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Universe;
        m.header.kind = RouteType::Unicast;
        m.attributes.push(RouteAttribute::Gateway(gw));
        self.transact(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)
            .map(|_| ())
    }
}

/// Runs `work` on a thread of its own inside the network namespace `netns` (its
/// `/run/netns` file): sockets it opens and `/proc/sys/net` files it writes are the
/// namespace's. A thread of its own, because a pool thread moved into a VM's namespace would
/// stay there for whatever it runs next.
pub(super) fn in_netns<T: Send>(
    netns: &Path,
    work: impl FnOnce() -> Result<T, String> + Send,
) -> Result<T, String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| format!("entering {}: {e}", netns.display()))?;
            work()
        })
        .join()
        .unwrap_or_else(|_| Err("the namespace's thread panicked".into()))
    })
}

/// Writes `value` to `/proc/sys/net/<key>` of the calling thread's namespace.
pub(super) fn sysctl(key: &str, value: &str) -> Result<(), String> {
    // `/proc/sys/net` shows the namespace of the task that opens it: this thread's.
    let path = format!("/proc/sys/net/{key}");
    std::fs::write(&path, value).map_err(|e| format!("writing {value} to {path}: {e}"))
}

/// A gratuitous ARP for `ip` at `mac` as an announcement (RFC 5227): a request whose sender
/// and target address are both `ip`, the target MAC unknown. 28 bytes, no Ethernet header.
pub(super) fn gratuitous_arp(mac: Mac, ip: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    // Ethernet, IPv4, 6-byte MACs, 4-byte addresses, request.
    p[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p[8..14].copy_from_slice(&mac.octets());
    p[14..18].copy_from_slice(&ip.octets());
    p[24..28].copy_from_slice(&ip.octets());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gratuitous_arp_names_the_address_as_sender_and_target() {
        let mac: Mac = "02:00:00:00:00:07".parse().unwrap();
        let p = gratuitous_arp(mac, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(
            p,
            [
                0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 7, 10, 0, 0, 7, 0, 0, 0, 0, 0, 0, 10, 0, 0,
                7
            ]
        );
    }
}
