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
//! It owns the sockets and the request count; it does not read the clock (`now` comes in)
//! or know the hardware.

use alloc::vec::Vec;
use core::fmt::Write;

use smoltcp::iface::{Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;

use crate::http::HttpConn;

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

    /// Receives what the device has, answers requests, and sends what is due. Returns true
    /// if anything moved, so the caller polls again before it sleeps.
    pub fn poll<D: Device + ?Sized>(
        &mut self,
        now: Instant,
        iface: &mut Interface,
        device: &mut D,
    ) -> bool {
        let mut progress = false;
        for _ in 0..INGRESS_BATCH {
            // A listener for every SYN this frame might be.
            self.listen();
            match iface.poll_ingress_single(now, device, &mut self.sockets) {
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
            if socket.state() == tcp::State::Closed {
                *conn = HttpConn::new();
                // Cannot fail: the port is not 0 and the socket is closed.
                let _ = socket.listen(self.port);
            }
        }
        progress
    }
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
    use smoltcp::iface::Config;
    use smoltcp::phy::{Loopback, Medium};
    use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};

    fn iface(dev: &mut Loopback) -> Interface {
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

    /// Clients on the same interface (smoltcp's loopback), with their own socket set.
    struct Clients {
        sockets: SocketSet<'static>,
        handles: Vec<SocketHandle>,
    }

    impl Clients {
        fn connect(iface: &mut Interface, n: usize) -> Clients {
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
                        40000 + i as u16,
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

    /// Runs server and clients until neither moves, with time standing still.
    fn settle(
        server: &mut Server,
        clients: &mut Clients,
        iface: &mut Interface,
        dev: &mut Loopback,
    ) {
        let now = Instant::from_millis(1);
        for _ in 0..1000 {
            let c = iface.poll(now, dev, &mut clients.sockets) != PollResult::None;
            let s = server.poll(now, iface, dev);
            if !c && !s {
                return;
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

    use alloc::string::String;

    #[test]
    fn many_clients_at_once_each_get_the_page_and_requests_are_counted() {
        let mut dev = Loopback::new(Medium::Ethernet);
        let mut iface = iface(&mut dev);
        let mut server = Server::new(80);
        server.set_listening_micros(12_345);
        server.listen();
        let n = 50;
        let mut clients = Clients::connect(&mut iface, n);
        settle(&mut server, &mut clients, &mut iface, &mut dev);
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
    }

    #[test]
    fn a_kept_alive_connection_serves_several_requests_then_its_socket_listens_again() {
        let mut dev = Loopback::new(Medium::Ethernet);
        let mut iface = iface(&mut dev);
        let mut server = Server::new(80);
        server.listen();
        let mut clients = Clients::connect(&mut iface, 1);
        settle(&mut server, &mut clients, &mut iface, &mut dev);
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
        let listening = server
            .conns
            .iter()
            .filter(|(h, _)| server.sockets.get::<tcp::Socket>(*h).is_listening())
            .count();
        assert_eq!(listening, server.conns.len(), "every socket listens again");
    }
}
