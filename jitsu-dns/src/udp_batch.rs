//! Many UDP datagrams per system call: [`Batch`] receives the datagrams queued on a socket,
//! up to [`BATCH`], with one `recvmmsg` into buffers allocated once, and sends the answers
//! held for them with one `sendmmsg`, going on after a short send (as Knot does: on
//! loopback the kernel's send is most of a query's cost, and each call has its own).
//!
//! Owns the buffers and the two system calls (through `nix`), not what a datagram means:
//! the transport decides what to answer. The receive blocks for the first datagram only
//! (`MSG_WAITFORONE`), for as long as the socket's own receive timeout lets it.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};

/// Datagrams received, and answers sent, in one system call at most. Bounded in datagrams,
/// not answers, so that a stream of queries for the slow path cannot keep the loop from
/// sending the fast ones' answers.
pub(crate) const BATCH: usize = 32;
/// The largest UDP payload: no datagram is ever cut short.
const MAX_DATAGRAM: usize = 65535;

/// The buffers of one receive and of the answers to it, allocated once: [`BATCH`] datagram
/// buffers of 64 KiB (their pages mapped only as datagrams fill them) and as many answers.
pub(crate) struct Batch {
    /// The headers of a receive, and those of a send: apart, because a send leaves its
    /// addresses in the headers it used, where a receive on them would read no source.
    recv_headers: MultiHeaders<SockaddrStorage>,
    send_headers: MultiHeaders<SockaddrStorage>,
    /// The datagram buffers, one after the other.
    bufs: Vec<u8>,
    /// What the last receive got: each datagram's length and source.
    got: Vec<(usize, Option<SocketAddr>)>,
    /// The answers, the first `held` of them to be sent, each to the same place in `to`.
    answers: Vec<Vec<u8>>,
    to: Vec<Option<SockaddrStorage>>,
    held: usize,
}

impl Default for Batch {
    fn default() -> Batch {
        Batch::new()
    }
}

impl Batch {
    pub(crate) fn new() -> Batch {
        Batch {
            recv_headers: MultiHeaders::preallocate(BATCH, None),
            send_headers: MultiHeaders::preallocate(BATCH, None),
            bufs: vec![0; BATCH * MAX_DATAGRAM],
            got: Vec::with_capacity(BATCH),
            answers: (0..BATCH).map(|_| Vec::with_capacity(512)).collect(),
            to: vec![None; BATCH],
            held: 0,
        }
    }

    /// Receives the datagrams queued on `socket`, at most [`BATCH`], waiting for the first
    /// (within the socket's receive timeout: `EAGAIN` after it); forgets the answers held.
    /// Returns how many came.
    pub(crate) fn recv(&mut self, socket: &UdpSocket) -> Result<usize, Errno> {
        self.got.clear();
        self.held = 0;
        let mut chunks = self.bufs.chunks_mut(MAX_DATAGRAM);
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] = std::array::from_fn(|_| {
            [IoSliceMut::new(
                chunks.next().expect("the buffer is BATCH datagrams long"),
            )]
        });
        let received = recvmmsg(
            socket.as_raw_fd(),
            &mut self.recv_headers,
            iovs.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )?;
        self.got
            .extend(received.map(|m| (m.bytes, m.address.and_then(socket_addr))));
        Ok(self.got.len())
    }

    /// The `i`th datagram received, its source (none if it was not IPv4 or IPv6), and the
    /// buffer its answer is written to, to be sent if [`Batch::hold`] is called next.
    pub(crate) fn datagram(&mut self, i: usize) -> (&[u8], Option<SocketAddr>, &mut Vec<u8>) {
        let (len, src) = self.got[i];
        let msg = &self.bufs[i * MAX_DATAGRAM..][..len];
        (msg, src, &mut self.answers[self.held])
    }

    /// Keeps the answer just written by [`Batch::datagram`], to be sent to `dst`.
    /// How many answers are held for the next [`Batch::send`].
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    pub(crate) fn hold(&mut self, dst: SocketAddr) {
        self.to[self.held] = Some(SockaddrStorage::from(dst));
        self.held += 1;
    }

    /// Sends the answers held, as few `sendmmsg` calls as the kernel takes (see
    /// [`send_runs`]); returns how many were sent.
    pub(crate) fn send(&mut self, socket: &UdpSocket) -> usize {
        let held = self.held;
        self.held = 0;
        let (answers, to, headers) = (&self.answers, &self.to, &mut self.send_headers);
        send_runs(held, |at| {
            let iovs: [[IoSlice<'_>; 1]; BATCH] =
                std::array::from_fn(|i| [IoSlice::new(answers.get(at + i).map_or(&[], |a| a))]);
            let none: [ControlMessage<'_>; 0] = [];
            sendmmsg(
                socket.as_raw_fd(),
                headers,
                &iovs[..held - at],
                &to[at..held],
                none,
                MsgFlags::empty(),
            )
            .map(|sent| sent.count())
        })
    }
}

/// Sends `n` answers through `send`, which sends those from the index it is given on in
/// one call and says how many went: after a short count the rest go in the next call; an
/// answer the kernel refused (its error is the call's when it is the first) is skipped and
/// logged, as a failed `sendto` was; an interrupted call is made again. Returns how many
/// were sent.
fn send_runs(n: usize, mut send: impl FnMut(usize) -> Result<usize, Errno>) -> usize {
    let (mut at, mut sent) = (0, 0);
    while at < n {
        match send(at) {
            Err(Errno::EINTR) => {}
            Ok(k) if k > 0 => {
                at += k;
                sent += k;
            }
            // Zero sent with answers left cannot happen; skipping one keeps the loop finite.
            Ok(_) => at += 1,
            Err(e) => {
                tracing::debug!(error = %e, "sending over UDP");
                at += 1;
            }
        }
    }
    sent
}

/// `addr` as a standard address, if it is IPv4 or IPv6.
fn socket_addr(addr: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel that sends at most `per_call` messages a call and refuses the one at each
    /// index of `refused` (an error when it comes first, a short count before it).
    fn kernel(
        per_call: usize,
        refused: &'static [usize],
        n: usize,
    ) -> (usize, Vec<usize>, Vec<usize>) {
        let (mut calls, mut delivered) = (Vec::new(), Vec::new());
        let sent = send_runs(n, |at| {
            calls.push(at);
            if refused.contains(&at) {
                return Err(Errno::ENETUNREACH);
            }
            let end = (at + per_call)
                .min(n)
                .min(refused.iter().copied().find(|&r| r > at).unwrap_or(n));
            delivered.extend(at..end);
            Ok(end - at)
        });
        (sent, calls, delivered)
    }

    #[test]
    fn a_short_send_goes_on_with_the_rest() {
        let (sent, calls, delivered) = kernel(5, &[], 12);
        assert_eq!(sent, 12);
        assert_eq!(calls, [0, 5, 10]);
        assert_eq!(delivered, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn an_answer_the_kernel_refuses_is_skipped_and_the_rest_sent() {
        let (sent, calls, delivered) = kernel(BATCH, &[0, 4, 5, 11], 12);
        assert_eq!(sent, 8);
        assert_eq!(calls, [0, 1, 4, 5, 6, 11]);
        assert_eq!(delivered, [1, 2, 3, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn an_interrupted_send_is_made_again() {
        let mut interrupted = false;
        let mut calls = Vec::new();
        let sent = send_runs(3, |at| {
            calls.push(at);
            if !std::mem::replace(&mut interrupted, true) {
                return Err(Errno::EINTR);
            }
            Ok(3 - at)
        });
        assert_eq!((sent, calls), (3, vec![0, 0]));
    }

    #[test]
    fn nothing_held_sends_nothing() {
        assert_eq!(send_runs(0, |_| panic!("no call")), 0);
    }

    /// Clients bound to `clients` in turn, `BATCH + 3` of them, each send one datagram to a
    /// server bound to `server`, which receives them in batches and answers each (its first
    /// byte, then 0xaa); every client gets its own answer from the server's address.
    fn each_client_gets_its_answer(server: &str, clients: &[&str]) {
        let server = UdpSocket::bind(server).unwrap();
        let port = server.local_addr().unwrap().port();
        let clients: Vec<_> = (0..BATCH + 3)
            .map(|i| UdpSocket::bind(clients[i % clients.len()]).unwrap())
            .collect();
        // Each client sends to the server's port at its own address (loopback, either family).
        let to = |c: &UdpSocket| SocketAddr::new(c.local_addr().unwrap().ip(), port);
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&[i as u8; 3], to(c)).unwrap();
        }
        let mut batch = Batch::new();
        let mut answered = 0;
        while answered < clients.len() {
            let n = batch.recv(&server).unwrap();
            assert!(n <= BATCH);
            for i in 0..n {
                let (msg, src, out) = batch.datagram(i);
                let src = src.expect("an IP source");
                assert_eq!(msg.len(), 3);
                out.clear();
                out.extend_from_slice(&[msg[0], 0xaa]);
                batch.hold(src);
            }
            assert_eq!(batch.send(&server), n);
            answered += n;
        }
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0; 8];
            c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&[i as u8, 0xaa][..], to(c)));
        }
    }

    #[test]
    fn a_batch_receives_what_is_queued_and_sends_each_answer_to_its_source() {
        each_client_gets_its_answer("127.0.0.1:0", &["127.0.0.1:0"]);
    }

    #[test]
    fn an_ipv6_socket_answers_ipv6_and_ipv4_clients_in_one_batch() {
        each_client_gets_its_answer("[::]:0", &["[::1]:0", "127.0.0.1:0"]);
    }
}
