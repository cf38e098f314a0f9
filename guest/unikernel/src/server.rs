// SPDX-License-Identifier: GPL-3.0-only
//! The HTTP service on smoltcp: a pool of TCP sockets on one port, each serving one
//! connection at a time through an [`HttpConn`], and the poll that moves frames between the
//! device, the interface and the sockets.
//!
//! smoltcp's TCP socket takes one connection: to accept many at once, the server keeps
//! [`SPARE_LISTENERS`] sockets listening before every received frame, adding sockets as
//! connections take them, up to [`MAX_SOCKETS`] (a SYN beyond that is refused with a reset).
//! A socket whose connection ended listens again. Sockets are created lazily so that boot
//! allocates (and zeroes) only a few buffers.
//!
//! smoltcp offers a segment to the sockets in their order and the first that accepts it takes
//! it, and a listening socket accepts any SYN. A client's retransmitted SYN (its SYN-ACK was
//! slow) or one synjitsu re-sends must reach the connection it belongs to, not a listener
//! ahead of it, which would open a second connection on the same addresses and reset the
//! client when its ACK reaches that one. So the server looks at each frame before smoltcp
//! does, and for the SYN of a connection it has, closes its listeners for that frame.
//!
//! smoltcp learns neighbours from ARP only, so its SYN-ACK to a client it has not heard an
//! ARP from waits for an ARP round trip: on a cold start, one for synjitsu's probe and one
//! for the client whose SYN synjitsu re-sends. The server hands smoltcp an ARP reply made from
//! each SYN's Ethernet and IP source first (lwIP's `ETHARP_TRUST_IP_MAC`); smoltcp ignores it
//! for a source off its network.
//!
//! Under TCG, code runs slowly the first time (QEMU translates it), and a cold start's first
//! connection is the first time the TCP and HTTP paths run: 2-2.5 ms from its SYN to the
//! SYN-ACK and as long again from its request to the page, against 0.2 ms for the SYN of a
//! second connection. So before it listens the kernel rehearses ([`Server::rehearse`]): one
//! connection from its own address to its own port, over the device in loopback, through
//! the same code (the same `poll` on the same device type); then the server is as new.
//!
//! It owns the sockets and the request count; it does not read the clock (`now` comes in)
//! or know the hardware.

use alloc::vec::Vec;
use core::fmt::Write;
use core::net::Ipv4Addr;

use smoltcp::iface::{Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, HardwareAddress, IpEndpoint, IpProtocol, Ipv4Packet, TcpPacket,
};

use crate::arp::{ARP_REPLY_LEN, arp_reply};
use crate::http::HttpConn;

/// A device that shows the next received frame before smoltcp takes it, and takes a frame
/// to hand smoltcp before that one.
pub trait PeekDevice: Device {
    /// The frame the next `receive` returns, if one waits.
    fn peek(&mut self) -> Option<&[u8]>;
    /// Makes `frame` the next one `receive` returns.
    fn inject(&mut self, frame: Vec<u8>);
}

/// A device that can send to itself: what the rehearsal runs on.
pub trait LoopbackDevice: PeekDevice {
    /// Makes the oldest frame sent and not yet looped back the last one to receive; false if
    /// there is none.
    fn loop_back_one(&mut self) -> bool;
}

/// Why a rehearsal did not complete (the server listens all the same, cold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RehearsalError {
    /// The interface has no Ethernet or IPv4 address to talk to itself on.
    #[error("the interface has no MAC or IPv4 address")]
    NoAddress,
    /// The client socket refused to connect.
    #[error("the rehearsal's client could not connect")]
    Connect,
    /// The exchange stopped moving, or took more than [`REHEARSAL_STEPS`] frames.
    #[error("the rehearsal's connection stopped after {0} frames")]
    Stalled(usize),
}

/// The request the rehearsal sends (what curl sends).
const REHEARSAL_REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: rehearsal\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";
/// The rehearsal client's port.
const REHEARSAL_PORT: u16 = 49152;
/// The most frames a rehearsal moves (it takes about 10).
pub const REHEARSAL_STEPS: usize = 64;

/// The most TCP sockets (connections plus listeners).
pub const MAX_SOCKETS: usize = 256;
/// Sockets kept listening, so that a burst of SYNs within one poll finds a listener each.
pub const SPARE_LISTENERS: usize = 4;
/// Receive buffer per socket (the advertised window).
pub const RX_BUFFER: usize = 2048;
/// Send buffer per socket (a page fits many times).
pub const TX_BUFFER: usize = 4096;
/// Frames taken from the device per poll before sending what is due.
const INGRESS_BATCH: usize = 64;

/// The HTTP service.
#[derive(Debug)]
pub struct Server {
    sockets: SocketSet<'static>,
    conns: Vec<(SocketHandle, HttpConn)>,
    port: u16,
    requests: u64,
    listening_micros: u64,
    first_request: Option<Instant>,
}

impl Server {
    /// A server for `port` with no sockets yet ([`Server::listen`] makes the first ones).
    pub fn new(port: u16) -> Server {
        Server {
            sockets: SocketSet::new(Vec::new()),
            conns: Vec::new(),
            port,
            requests: 0,
            listening_micros: 0,
            first_request: None,
        }
    }

    /// Keeps [`SPARE_LISTENERS`] sockets listening (within [`MAX_SOCKETS`]).
    pub fn listen(&mut self) {
        let mut listening = self
            .conns
            .iter()
            .filter(|(h, _)| self.sockets.get::<tcp::Socket>(*h).is_listening())
            .count();
        while listening < SPARE_LISTENERS && self.conns.len() < MAX_SOCKETS {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(alloc::vec![0; RX_BUFFER]),
                tcp::SocketBuffer::new(alloc::vec![0; TX_BUFFER]),
            );
            if socket.listen(self.port).is_err() {
                // Only port 0 is refused, and the port is the caller's constant.
                return;
            }
            self.conns.push((self.sockets.add(socket), HttpConn::new()));
            listening += 1;
        }
    }

    /// Records when the server started listening, for the page.
    pub fn set_listening_micros(&mut self, micros: u64) {
        self.listening_micros = micros;
    }

    /// Requests answered with the page so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// When the first request was answered.
    pub fn first_request(&self) -> Option<Instant> {
        self.first_request
    }

    /// Sockets in use for connections (not listening, not closed).
    pub fn connections(&self) -> usize {
        self.conns
            .iter()
            .filter(|(h, _)| self.sockets.get::<tcp::Socket>(*h).is_active())
            .count()
    }

    /// The sockets, for the interface's `poll_delay`.
    pub fn sockets(&self) -> &SocketSet<'static> {
        &self.sockets
    }

    /// True if a socket has (or is opening) a connection from `remote` to `port`.
    fn has_connection(&self, remote: IpEndpoint, port: u16) -> bool {
        self.conns.iter().any(|(h, _)| {
            let s = self.sockets.get::<tcp::Socket>(*h);
            s.remote_endpoint() == Some(remote) && s.local_endpoint().map(|l| l.port) == Some(port)
        })
    }

    /// Closes every listening socket (`relisten` opens them again).
    fn close_listeners(&mut self) {
        for (h, _) in &self.conns {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if s.is_listening() {
                s.close();
            }
        }
    }

    /// Makes every closed socket listen again, with a fresh HTTP state.
    fn relisten(&mut self) {
        for (h, conn) in &mut self.conns {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if s.state() == tcp::State::Closed {
                *conn = HttpConn::new();
                // Cannot fail: the port is not 0 and the socket is closed.
                let _ = s.listen(self.port);
            }
        }
    }

    /// Receives what the device has, answers requests, and sends what is due. Returns true
    /// if anything moved, so the caller polls again before it sleeps.
    pub fn poll<D: PeekDevice + ?Sized>(
        &mut self,
        now: Instant,
        iface: &mut Interface,
        device: &mut D,
    ) -> bool {
        self.poll_seeing(now, iface, device, &mut |_| {})
    }

    /// [`Server::poll`], showing `seen` each frame received before smoltcp takes it.
    pub fn poll_seeing<D: PeekDevice + ?Sized>(
        &mut self,
        now: Instant,
        iface: &mut Interface,
        device: &mut D,
        seen: &mut dyn FnMut(&[u8]),
    ) -> bool {
        let mut progress = false;
        for _ in 0..INGRESS_BATCH {
            // A listener for every SYN this frame might be, unless it is the SYN of a
            // connection the server has.
            self.listen();
            let syn = device.peek().and_then(|frame| {
                seen(frame);
                Syn::parse(frame)
            });
            if let Some(syn) = &syn
                && let (HardwareAddress::Ethernet(mac), Some(ip)) =
                    (iface.hardware_addr(), iface.ipv4_addr())
            {
                let mut hint = alloc::vec![0; ARP_REPLY_LEN];
                arp_reply(&mut hint, (syn.mac, syn.ip), (mac.0, ip));
                device.inject(hint);
                let _ = iface.poll_ingress_single(now, device, &mut self.sockets);
            }
            let repeated_syn = syn.is_some_and(|syn| self.has_connection(syn.remote(), syn.port));
            if repeated_syn {
                self.close_listeners();
            }
            let result = iface.poll_ingress_single(now, device, &mut self.sockets);
            if repeated_syn {
                self.relisten();
            }
            match result {
                PollIngressSingleResult::None => break,
                _ => progress = true,
            }
        }
        progress |= self.serve(now);
        while iface.poll_egress(now, device, &mut self.sockets) == PollResult::SocketStateChanged {
            progress = true;
        }
        progress
    }

    /// Runs one connection through the server, from the interface's own address to itself
    /// over `device` in loopback (frames it sends come back one at a time through
    /// [`LoopbackDevice::loop_back_one`], and no other), so that the code a client's
    /// connection runs has run once; then forgets it: no request counted, every socket
    /// listening, nothing of it left to send. Call it before the server is announced.
    ///
    /// The interface learns its own address's MAC first (an ARP reply from itself, as a
    /// SYN's hint would give): the client's SYN would otherwise ask for it by ARP, and
    /// smoltcp stays silent towards any unknown neighbour for a second after asking.
    pub fn rehearse<D: LoopbackDevice + ?Sized>(
        &mut self,
        now: Instant,
        iface: &mut Interface,
        device: &mut D,
    ) -> Result<(), RehearsalError> {
        let (HardwareAddress::Ethernet(mac), Some(ip)) = (iface.hardware_addr(), iface.ipv4_addr())
        else {
            return Err(RehearsalError::NoAddress);
        };
        self.listen();
        let mut hint = alloc::vec![0; ARP_REPLY_LEN];
        arp_reply(&mut hint, (mac.0, ip), (mac.0, ip));
        device.inject(hint);
        let _ = iface.poll_ingress_single(now, device, &mut self.sockets);

        let mut client_sockets = SocketSet::new(Vec::with_capacity(1));
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(alloc::vec![0; RX_BUFFER]),
            tcp::SocketBuffer::new(alloc::vec![0; RX_BUFFER]),
        );
        // `now` stands still: an ACK smoltcp delays would never leave.
        socket.set_ack_delay(None);
        // A client's SYN carries the timestamp option (Linux's does): the server parses it.
        socket.set_tsval_generator(Some(|| 1));
        socket
            .connect(iface.context(), (ip, self.port), REHEARSAL_PORT)
            .map_err(|_| RehearsalError::Connect)?;
        let client = client_sockets.add(socket);
        let want = page(self.listening_micros, self.requests + 1);
        let (mut asked, mut received) = (false, Vec::new());
        let result = (|| {
            for step in 0..REHEARSAL_STEPS {
                let socket = client_sockets.get_mut::<tcp::Socket>(client);
                if !asked && socket.can_send() {
                    asked = socket.send_slice(REHEARSAL_REQUEST).is_ok();
                }
                while socket.can_recv() {
                    let _ = socket.recv(|d| {
                        received.extend_from_slice(d);
                        (d.len(), ())
                    });
                }
                if received.ends_with(&want) && socket.may_send() {
                    socket.close();
                }
                let client_done =
                    matches!(socket.state(), tcp::State::TimeWait | tcp::State::Closed);
                let _ = iface.poll_egress(now, device, &mut client_sockets);
                self.poll(now, iface, device);
                // What the kernel asks before it sleeps, with the sockets in each state a
                // connection takes them through.
                let _ = iface.poll_delay(now, &self.sockets);
                if !device.loop_back_one() {
                    return if client_done && received.ends_with(&want) && self.connections() == 0 {
                        Ok(())
                    } else {
                        Err(RehearsalError::Stalled(step))
                    };
                }
                match device.peek().and_then(tcp_ports) {
                    Some((_, dst)) if dst == REHEARSAL_PORT => {
                        let _ = iface.poll_ingress_single(now, device, &mut client_sockets);
                    }
                    _ => {
                        self.poll(now, iface, device);
                    }
                }
            }
            Err(RehearsalError::Stalled(REHEARSAL_STEPS))
        })();
        // Whatever happened, the server starts afresh; a reset an abort sends goes to the
        // loopback too (the caller drops what it did not take back).
        for (h, conn) in &mut self.conns {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if !s.is_listening() {
                s.abort();
            }
            *conn = HttpConn::new();
        }
        let _ = iface.poll_egress(now, device, &mut self.sockets);
        self.relisten();
        self.requests = 0;
        self.first_request = None;
        result
    }

    /// Moves bytes between the sockets and their HTTP connections; closes what is done and
    /// makes closed sockets listen again.
    fn serve(&mut self, now: Instant) -> bool {
        let mut progress = false;
        let listening_micros = self.listening_micros;
        for (handle, conn) in &mut self.conns {
            let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
            if socket.can_recv() {
                let requests = &mut self.requests;
                let first_request = &mut self.first_request;
                let _ = socket.recv(|data| {
                    conn.on_bytes(data, || {
                        *requests += 1;
                        first_request.get_or_insert(now);
                        page(listening_micros, *requests)
                    });
                    (data.len(), ())
                });
                progress = true;
            }
            if !conn.output().is_empty()
                && socket.can_send()
                && let Ok(n) = socket.send_slice(conn.output())
                && n > 0
            {
                conn.sent(n);
                progress = true;
            }
            let peer_done = !socket.may_recv() && conn.output().is_empty();
            if socket.may_send() && (conn.should_close() || peer_done) {
                socket.close();
                progress = true;
            }
        }
        self.relisten();
        progress
    }
}

/// Where a TCP SYN (without ACK) in an Ethernet frame carrying IPv4 comes from and goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Syn {
    /// The Ethernet source.
    mac: [u8; 6],
    /// The IP source.
    ip: Ipv4Addr,
    /// The TCP source port.
    src_port: u16,
    /// The TCP destination port.
    port: u16,
}

impl Syn {
    /// `None` for any other frame, malformed ones included.
    fn parse(frame: &[u8]) -> Option<Syn> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            return None;
        }
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        if ip.next_header() != IpProtocol::Tcp {
            return None;
        }
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        (tcp.syn() && !tcp.ack()).then(|| Syn {
            mac: eth.src_addr().0,
            ip: ip.src_addr(),
            src_port: tcp.src_port(),
            port: tcp.dst_port(),
        })
    }

    /// The client's endpoint.
    fn remote(&self) -> IpEndpoint {
        IpEndpoint::new(self.ip.into(), self.src_port)
    }
}

/// Source and destination ports of a TCP segment in an Ethernet frame.
fn tcp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some((tcp.src_port(), tcp.dst_port()))
}

/// The page: when the kernel listened, and which request this is.
fn page(listening_micros: u64, request: u64) -> Vec<u8> {
    let mut s = alloc::string::String::with_capacity(96);
    let _ = write!(
        s,
        "jitsu-unikernel\nlistening {}.{:03} ms after entry\nrequest {request}\n",
        listening_micros / 1000,
        listening_micros % 1000
    );
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::VecDeque;
    use alloc::string::String;
    use smoltcp::iface::Config;
    use smoltcp::phy::{self, DeviceCapabilities, Medium};
    use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};

    /// A device for tests: frames it sends wait in `outbox` until the test delivers them,
    /// to another interface's `inbox` or (`loop_back`) to its own.
    #[derive(Default)]
    struct End {
        inbox: VecDeque<Vec<u8>>,
        outbox: Vec<Vec<u8>>,
        /// What `loop_back` delivered.
        sent: Vec<Vec<u8>>,
    }

    impl End {
        /// Delivers what it sent to itself: one interface, one address, clients and server
        /// in two socket sets.
        fn loop_back(&mut self) {
            for frame in self.outbox.drain(..) {
                self.sent.push(frame.clone());
                self.inbox.push_back(frame);
            }
        }
    }

    struct EndRx(Vec<u8>);
    struct EndTx<'a>(&'a mut Vec<Vec<u8>>);

    impl phy::RxToken for EndRx {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0)
        }
    }

    impl phy::TxToken for EndTx<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let mut frame = alloc::vec![0; len];
            let r = f(&mut frame);
            self.0.push(frame);
            r
        }
    }

    impl Device for End {
        type RxToken<'a> = EndRx;
        type TxToken<'a> = EndTx<'a>;

        fn receive(&mut self, _: Instant) -> Option<(EndRx, EndTx<'_>)> {
            let frame = self.inbox.pop_front()?;
            Some((EndRx(frame), EndTx(&mut self.outbox)))
        }

        fn transmit(&mut self, _: Instant) -> Option<EndTx<'_>> {
            Some(EndTx(&mut self.outbox))
        }

        fn capabilities(&self) -> DeviceCapabilities {
            let mut caps = DeviceCapabilities::default();
            caps.medium = Medium::Ethernet;
            caps.max_transmission_unit = 1514;
            caps
        }
    }

    impl LoopbackDevice for End {
        fn loop_back_one(&mut self) -> bool {
            if self.outbox.is_empty() {
                return false;
            }
            let frame = self.outbox.remove(0);
            self.sent.push(frame.clone());
            self.inbox.push_back(frame);
            true
        }
    }

    impl PeekDevice for End {
        fn peek(&mut self) -> Option<&[u8]> {
            self.inbox.front().map(Vec::as_slice)
        }

        fn inject(&mut self, frame: Vec<u8>) {
            self.inbox.push_front(frame);
        }
    }

    fn iface(dev: &mut End) -> Interface {
        let mut iface = Interface::new(
            Config::new(EthernetAddress([2, 0, 0, 0, 0, 1]).into()),
            dev,
            Instant::ZERO,
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(127, 0, 0, 1), 8)).unwrap();
        });
        iface
    }

    /// Clients on the same interface, with their own socket set.
    struct Clients {
        sockets: SocketSet<'static>,
        handles: Vec<SocketHandle>,
    }

    impl Clients {
        fn connect(iface: &mut Interface, n: usize, first_port: u16) -> Clients {
            let mut sockets = SocketSet::new(Vec::new());
            let handles = (0..n)
                .map(|i| {
                    let mut s = tcp::Socket::new(
                        tcp::SocketBuffer::new(alloc::vec![0; 4096]),
                        tcp::SocketBuffer::new(alloc::vec![0; 4096]),
                    );
                    s.connect(
                        iface.context(),
                        (IpAddress::v4(127, 0, 0, 1), 80),
                        first_port + i as u16,
                    )
                    .unwrap();
                    sockets.add(s)
                })
                .collect();
            Clients { sockets, handles }
        }

        fn socket(&mut self, i: usize) -> &mut tcp::Socket<'static> {
            self.sockets.get_mut::<tcp::Socket>(self.handles[i])
        }
    }

    /// A server on one interface, listening, and `n` clients connected to it.
    fn connected(n: usize) -> (End, Interface, Server, Clients) {
        let mut dev = End::default();
        let mut iface = iface(&mut dev);
        let mut server = Server::new(80);
        server.listen();
        let mut clients = Clients::connect(&mut iface, n, 40000);
        settle(&mut server, &mut clients, &mut iface, &mut dev);
        (dev, iface, server, clients)
    }

    /// Runs server and clients until neither moves. Each frame goes to the side it is for:
    /// a segment for the other side's socket set would be answered with a reset.
    fn settle(server: &mut Server, clients: &mut Clients, iface: &mut Interface, dev: &mut End) {
        let now = Instant::from_millis(1);
        for _ in 0..10_000 {
            dev.loop_back();
            match dev.peek().map(tcp_ports) {
                None => {
                    // Nothing queued: let both sides send what they have.
                    let c = iface.poll_egress(now, dev, &mut clients.sockets);
                    let s = server.poll(now, iface, dev);
                    if c == PollResult::None && !s && dev.outbox.is_empty() {
                        return;
                    }
                }
                Some(Some((_, dst))) if dst != 80 => {
                    iface.poll_ingress_single(now, dev, &mut clients.sockets);
                }
                // To port 80, or not TCP (the interface answers it whichever set is passed).
                Some(_) => {
                    server.poll(now, iface, dev);
                }
            }
        }
        panic!("never settled");
    }

    fn read_all(s: &mut tcp::Socket<'_>) -> String {
        let mut out = Vec::new();
        while s.can_recv() {
            s.recv(|d| {
                out.extend_from_slice(d);
                (d.len(), ())
            })
            .unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    fn resets(dev: &End) -> usize {
        dev.sent
            .iter()
            .filter(|f| {
                EthernetFrame::new_checked(f.as_slice())
                    .ok()
                    .and_then(|e| {
                        Ipv4Packet::new_checked(e.payload())
                            .ok()
                            .map(|ip| ip.payload().to_vec())
                    })
                    .and_then(|p| TcpPacket::new_checked(p).ok().map(|t| t.rst()))
                    .unwrap_or(false)
            })
            .count()
    }

    fn listening(server: &Server) -> usize {
        server
            .conns
            .iter()
            .filter(|(h, _)| server.sockets.get::<tcp::Socket>(*h).is_listening())
            .count()
    }

    #[test]
    fn many_clients_at_once_each_get_the_page_and_requests_are_counted() {
        let n = 50;
        let (mut dev, mut iface, mut server, mut clients) = connected(n);
        server.set_listening_micros(12_345);
        for i in 0..n {
            assert_eq!(
                clients.socket(i).state(),
                tcp::State::Established,
                "client {i}"
            );
            clients
                .socket(i)
                .send_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
        }
        settle(&mut server, &mut clients, &mut iface, &mut dev);
        let mut seen = Vec::new();
        for i in 0..n {
            let page = read_all(clients.socket(i));
            assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
            assert!(page.contains("listening 12.345 ms after entry\n"), "{page}");
            let no: u64 = page
                .rsplit("request ")
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            seen.push(no);
        }
        seen.sort();
        assert_eq!(seen, (1..=n as u64).collect::<Vec<_>>());
        assert_eq!(server.requests(), n as u64);
        assert_eq!(server.connections(), n);
        assert_eq!(resets(&dev), 0);
    }

    #[test]
    fn a_kept_alive_connection_serves_several_requests_then_its_socket_listens_again() {
        let (mut dev, mut iface, mut server, mut clients) = connected(1);
        for want in 1..=3 {
            clients
                .socket(0)
                .send_slice(b"GET / HTTP/1.1\r\n\r\n")
                .unwrap();
            settle(&mut server, &mut clients, &mut iface, &mut dev);
            let page = read_all(clients.socket(0));
            assert!(
                page.ends_with(&alloc::format!("request {want}\n")),
                "{page}"
            );
        }
        clients.socket(0).close();
        settle(&mut server, &mut clients, &mut iface, &mut dev);
        assert_eq!(server.connections(), 0);
        assert_eq!(
            listening(&server),
            server.conns.len(),
            "every socket listens again"
        );
    }

    #[test]
    fn a_repeated_syn_reaches_its_connection_not_a_listener_ahead_of_it() {
        // Two connections; the first goes, so that its socket listens again ahead of the
        // second's.
        let (mut dev, mut iface, mut server, mut clients) = connected(2);
        clients.socket(0).close();
        settle(&mut server, &mut clients, &mut iface, &mut dev);
        assert_eq!(server.connections(), 1);
        let second = IpEndpoint::new(IpAddress::v4(127, 0, 0, 1), 40001);
        let syn = dev
            .sent
            .iter()
            .find(|f| Syn::parse(f).is_some_and(|s| s.remote() == second && s.port == 80))
            .expect("the second client sent a SYN")
            .clone();
        // Its SYN again, as a retransmission or synjitsu would send it.
        dev.inbox.push_back(syn);
        settle(&mut server, &mut clients, &mut iface, &mut dev);
        assert_eq!(
            server.connections(),
            1,
            "no second connection from the same port"
        );
        assert!(listening(&server) >= SPARE_LISTENERS);
        clients
            .socket(1)
            .send_slice(b"GET / HTTP/1.1\r\n\r\n")
            .unwrap();
        settle(&mut server, &mut clients, &mut iface, &mut dev);
        assert!(read_all(clients.socket(1)).starts_with("HTTP/1.1 200 OK"));
        assert_eq!(resets(&dev), 0);
    }

    #[test]
    fn only_a_tcp_syn_without_ack_names_its_client() {
        let (dev, _iface, _server, _clients) = connected(1);
        let syns: Vec<_> = dev.sent.iter().filter_map(|f| Syn::parse(f)).collect();
        assert_eq!(
            syns,
            [Syn {
                mac: [2, 0, 0, 0, 0, 1],
                ip: Ipv4Addr::new(127, 0, 0, 1),
                src_port: 40000,
                port: 80
            }],
            "the SYN, not the SYN-ACK or the ACK"
        );
        assert_eq!(Syn::parse(&[0; 10]), None);
        assert_eq!(Syn::parse(&dev.sent[0][..30]), None, "a cut frame");
    }

    const CLIENT: ([u8; 6], Ipv4Addr) = ([2, 0, 0, 0, 0, 2], Ipv4Addr::new(10, 0, 0, 2));
    const SERVER: ([u8; 6], Ipv4Addr) = ([2, 0, 0, 0, 0, 10], Ipv4Addr::new(10, 0, 0, 10));

    fn iface_at(dev: &mut End, (mac, ip): ([u8; 6], Ipv4Addr)) -> Interface {
        let mut iface =
            Interface::new(Config::new(EthernetAddress(mac).into()), dev, Instant::ZERO);
        iface.update_ip_addrs(|a| a.push(IpCidr::new(ip.into(), 24)).unwrap());
        iface
    }

    fn is_arp_request_from(frame: &[u8], mac: [u8; 6]) -> bool {
        EthernetFrame::new_checked(frame).is_ok_and(|e| {
            e.src_addr().0 == mac
                && e.ethertype() == EthernetProtocol::Arp
                && smoltcp::wire::ArpPacket::new_checked(e.payload())
                    .is_ok_and(|a| a.operation() == smoltcp::wire::ArpOperation::Request)
        })
    }

    /// A client on another interface (`CLIENT`) that knows the server's MAC already
    /// (synjitsu answered its ARP while the server booted), so that the server has heard
    /// nothing from it before its SYN, connects and asks for the page: its socket's state,
    /// what it received, and the frames the server sent.
    fn fetch_from_another_host(
        server: &mut Server,
        s_iface: &mut Interface,
        s_dev: &mut End,
    ) -> (tcp::State, String, Vec<Vec<u8>>) {
        let mut c_dev = End::default();
        let mut c_iface = iface_at(&mut c_dev, CLIENT);
        let mut hello = alloc::vec![0; ARP_REPLY_LEN];
        arp_reply(&mut hello, SERVER, CLIENT);
        c_dev.inbox.push_back(hello);
        let mut c_sockets = SocketSet::new(Vec::new());
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(alloc::vec![0; 1024]),
            tcp::SocketBuffer::new(alloc::vec![0; 1024]),
        );
        socket
            .connect(c_iface.context(), (IpAddress::from(SERVER.1), 80), 40000)
            .unwrap();
        let handle = c_sockets.add(socket);
        let now = Instant::from_millis(1);
        let mut sent = Vec::new();
        let (mut page, mut asked) = (String::new(), false);
        for _ in 0..20 {
            c_iface.poll(now, &mut c_dev, &mut c_sockets);
            let socket = c_sockets.get_mut::<tcp::Socket>(handle);
            if socket.state() == tcp::State::Established && !asked {
                socket.send_slice(b"GET / HTTP/1.1\r\n\r\n").unwrap();
                asked = true;
            }
            page.push_str(&read_all(socket));
            server.poll(now, s_iface, s_dev);
            let c_out: Vec<_> = c_dev.outbox.drain(..).collect();
            let s_out: Vec<_> = s_dev.outbox.drain(..).collect();
            sent.extend(s_out.iter().cloned());
            s_dev.inbox.extend(c_out);
            c_dev.inbox.extend(s_out);
        }
        (c_sockets.get::<tcp::Socket>(handle).state(), page, sent)
    }

    #[test]
    fn a_client_known_only_from_its_syn_gets_the_syn_ack_without_an_arp_round_trip() {
        let mut s_dev = End::default();
        let mut s_iface = iface_at(&mut s_dev, SERVER);
        let mut server = Server::new(80);
        server.listen();
        let (state, page, sent) = fetch_from_another_host(&mut server, &mut s_iface, &mut s_dev);
        assert_eq!(state, tcp::State::Established);
        assert!(page.ends_with("request 1\n"), "{page}");
        assert!(
            !sent.iter().any(|f| is_arp_request_from(f, SERVER.0)),
            "the server asked for the client's MAC"
        );
    }

    #[test]
    fn a_rehearsal_serves_one_request_to_itself_and_leaves_the_server_as_new() {
        let mut dev = End::default();
        let mut iface = iface_at(&mut dev, SERVER);
        let mut server = Server::new(80);
        server.set_listening_micros(3_000);
        server
            .rehearse(Instant::from_millis(1), &mut iface, &mut dev)
            .unwrap();
        let rehearsed = server.conns.len();
        // It did run the page's code: the server answered a GET to its own address.
        let pages: Vec<_> = dev
            .sent
            .iter()
            .filter(|f| {
                tcp_ports(f) == Some((80, REHEARSAL_PORT))
                    && f.windows(15).any(|w| w == b"HTTP/1.1 200 OK")
            })
            .collect();
        assert_eq!(pages.len(), 1, "one page, to the rehearsal's client");
        // Its SYN carried the timestamp option, as Linux clients' do: the server's parsing of
        // it ran too.
        let syns: Vec<bool> = dev
            .sent
            .iter()
            .filter_map(|f| {
                let eth = EthernetFrame::new_checked(f.as_slice()).ok()?;
                let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
                let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
                let mut opts = tcp.options();
                let mut timestamp = false;
                while let Ok((rest, opt)) = smoltcp::wire::TcpOption::parse(opts) {
                    timestamp |= matches!(opt, smoltcp::wire::TcpOption::TimeStamp { .. });
                    if rest.is_empty() || opt == smoltcp::wire::TcpOption::EndOfList {
                        break;
                    }
                    opts = rest;
                }
                (tcp.syn() && !tcp.ack()).then_some(timestamp)
            })
            .collect();
        assert_eq!(syns, [true], "one SYN, with the timestamp option");
        // Nothing left the host, and nothing asked by ARP: smoltcp would then stay silent
        // towards any unknown neighbour (a real client's gateway) for a second.
        for f in &dev.sent {
            let eth = EthernetFrame::new_checked(f.as_slice()).unwrap();
            assert_eq!(eth.dst_addr().0, SERVER.0, "a frame to another host");
            assert_ne!(eth.ethertype(), EthernetProtocol::Arp);
        }
        assert_eq!(resets(&dev), 0, "the connection closed cleanly");
        assert_eq!(server.requests(), 0);
        assert_eq!(server.first_request(), None);
        assert_eq!(server.connections(), 0);
        assert_eq!(listening(&server), rehearsed, "every socket listens");
        // The first real client is request 1, without an ARP round trip.
        dev.outbox.clear();
        let (state, page, sent) = fetch_from_another_host(&mut server, &mut iface, &mut dev);
        assert_eq!(state, tcp::State::Established);
        assert!(page.contains("listening 3.000 ms after entry\n"), "{page}");
        assert!(page.ends_with("request 1\n"), "{page}");
        assert!(!sent.iter().any(|f| is_arp_request_from(f, SERVER.0)));
        assert_eq!(server.first_request(), Some(Instant::from_millis(1)));
    }

    #[test]
    fn polling_shows_every_received_frame_before_smoltcp_takes_it() {
        let mut dev = End::default();
        let mut iface = iface_at(&mut dev, SERVER);
        let mut server = Server::new(80);
        let mut reply = alloc::vec![0; ARP_REPLY_LEN];
        arp_reply(&mut reply, CLIENT, SERVER);
        dev.inbox.push_back(alloc::vec![0xff; 20]);
        dev.inbox.push_back(reply.clone());
        let mut seen = Vec::new();
        server.poll_seeing(Instant::ZERO, &mut iface, &mut dev, &mut |f| {
            seen.push(f.to_vec())
        });
        assert_eq!(
            seen,
            [alloc::vec![0xff; 20], reply],
            "in order, malformed ones too"
        );
        assert!(dev.inbox.is_empty(), "smoltcp took them");
    }

    #[test]
    fn a_rehearsal_without_an_address_says_so_and_sends_nothing() {
        let mut dev = End::default();
        let mut iface = Interface::new(
            Config::new(EthernetAddress(SERVER.0).into()),
            &mut dev,
            Instant::ZERO,
        );
        let mut server = Server::new(80);
        assert_eq!(
            server.rehearse(Instant::ZERO, &mut iface, &mut dev),
            Err(RehearsalError::NoAddress)
        );
        assert!(dev.outbox.is_empty());
    }
}
