//! DNS over UDP and TCP in front of [`crate::dns::Handler`]: the sockets, and the bounds on
//! what clients can make jitsu-dns hold.
//!
//! Owns reading messages off the sockets and writing the answers back, the FORMERR for a
//! message that does not parse (counted as `queries_total{outcome="formerr"}` like every
//! other FORMERR), the messages given no answer at all (shorter than a header, responses,
//! from an address no answer can reach: counted in `dropped_total`), and the bounds:
//!
//! - UDP: at most [`Limits::udp_in_flight`] queries being answered at once (a query for a
//!   booting VM waits for its boot); past it a datagram is dropped and counted, as any
//!   overloaded server drops, and the client retries;
//! - TCP: at most [`Limits::tcp_max_clients`] connections, and [`Limits::tcp_max_per_client`]
//!   from one client (an IPv6 client is its /64, which one host usually has whole); a new
//!   connection past either is closed at once and counted. A connection is closed after
//!   [`TCP_IDLE_TIMEOUT`] without a query, and when one message takes longer than
//!   [`TCP_IO_TIMEOUT`] to arrive or to be sent (RFC 7766 section 6.2.3 asks for idle
//!   timeouts "on the order of seconds"; Knot closes idle connections after 10 s and gives a
//!   message 0.5 s). A connection's messages are answered one after the other, and nothing
//!   is allocated for a message before its bytes arrive, so a stalled connection costs a
//!   task and a socket, not a buffer.
//!
//! UDP is served from a thread of its own that blocks in `recvmmsg` ([`crate::udp_batch`]):
//! each datagram of a batch is first offered to the handler's fast path
//! ([`Handler::answer_fast`]), answered in the thread if it is a plain query for a running
//! VM's address, the batch's answers sent with one `sendmmsg`; any other is parsed by
//! hickory and answered by the handler in a task of its own on the runtime.
//! Encoding, names are compressed against the question as the client wrote it (hickory
//! 0.26's encoder records the question's bytes type and class included, so nothing ever
//! matched them), which is what makes the fast path's answers and these the same bytes.
//!
//! It decides no answer: the handler does. hickory-server's own `Server` bounds none of the
//! above, answers FORMERR without the handler seeing it, and takes its sockets whole, so it
//! cannot be wrapped; this replaces it, with hickory's parsing and encoding.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::ProtoError;
use hickory_proto::op::{Header, MessageType, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, SockaddrStorage, sendto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::dns::Handler;
use crate::fast::plain_name_len;
use crate::metrics::{Dropped, Metrics, Outcome, TcpLimit};
use crate::udp_batch::Batch;

/// A TCP connection with no query for this long is closed.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// One message over TCP must arrive, or be sent, within this, once its first byte came.
pub const TCP_IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The default bound on UDP queries being answered at once (as many as the daemon's
/// slow-path queue holds).
pub const UDP_IN_FLIGHT: usize = crate::dns::SLOW_QUEUE;
/// After an accept that failed (out of file descriptors, say), the listener waits this long
/// before the next, instead of spinning on the same error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The bounds of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// UDP queries being answered at once.
    pub udp_in_flight: usize,
    /// TCP connections at once.
    pub tcp_max_clients: usize,
    /// TCP connections at once from one client.
    pub tcp_max_per_client: usize,
}

/// Serves `udp` and `tcp` with `handler` until `stop` is cancelled.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    handler: Arc<Handler>,
    metrics: Arc<Metrics>,
    limits: Limits,
    stop: CancellationToken,
) {
    let udp = serve_udp(
        udp,
        handler.clone(),
        metrics.clone(),
        limits.udp_in_flight,
        stop.clone(),
    );
    let tcp = serve_tcp(tcp, handler, metrics, limits, stop);
    tokio::join!(udp, tcp);
}

/// Where the handler's one response goes: encoded here, written by the transport.
#[derive(Clone)]
struct Reply {
    protocol: Protocol,
    /// The question's name as the client wrote it, if it is one plain name: names in the
    /// response are compressed against it.
    question: Option<Arc<[u8]>>,
    out: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Reply {
    fn new(protocol: Protocol, question: Option<Arc<[u8]>>) -> Reply {
        Reply {
            protocol,
            question,
            out: Arc::new(Mutex::new(None)),
        }
    }

    fn take(&self) -> Option<Vec<u8>> {
        self.out
            .lock()
            .expect("reply lock is never poisoned: nothing panics holding it")
            .take()
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Reply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // Over UDP no larger than the client can take (its EDNS size, 512 without): records
        // that do not fit are left out and TC set, as hickory's own encoder does.
        let max = match self.protocol {
            Protocol::Udp => response.edns().map_or(512, |e| e.max_payload().max(512)),
            _ => u16::MAX,
        };
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max);
        if let Some(name) = &self.question {
            point_at_question(&mut encoder, name)
                .map_err(|e| NetError::from(format!("encoding a response: {e}")))?;
        }
        let info = response
            .destructive_emit(&mut encoder)
            .map_err(|e| NetError::from(format!("encoding a response: {e}")))?;
        let mut out = self
            .out
            .lock()
            .expect("reply lock is never poisoned: nothing panics holding it");
        // The handler answers once; a second answer would replace the first unseen.
        debug_assert!(out.is_none(), "a second response to one request");
        *out = Some(bytes);
        Ok(info)
    }
}

/// Lets `encoder`, before anything is written, compress names against the question's name
/// `name` (a plain name: labels up to the root), which the response carries at offset 12
/// exactly as the client wrote it (hickory-server writes the query's own bytes back).
/// hickory's encoder keeps the bytes of each name written, to compare later names with; for
/// the question it keeps its name, type and class as one, which no name equals. So the name
/// is written where the question goes and each of its suffixes noted as a name would be,
/// then the offset is put back to 0: the response overwrites those bytes with the same
/// ones, and a later name equal to a suffix, byte for byte, becomes a pointer to it.
fn point_at_question(encoder: &mut BinEncoder<'_>, name: &[u8]) -> Result<(), ProtoError> {
    encoder.emit_vec(&[0; 12])?;
    encoder.emit_vec(name)?;
    // Suffixes end before the root label, as hickory's own `Name::emit` notes them.
    let end = 12 + name.len() - 1;
    let mut at = 12;
    while at < end {
        encoder.store_label_pointer(at, end);
        at += 1 + usize::from(name[at - 12]);
    }
    encoder.set_offset(0);
    Ok(())
}

/// The question's name as the client wrote it, for [`point_at_question`]: when `request`
/// has one question, whose name is plain labels (no compression pointer).
fn question_name(request: &Request) -> Option<Arc<[u8]>> {
    if request.queries.len() != 1 {
        return None;
    }
    let bytes = request.queries.as_bytes();
    let len = plain_name_len(bytes)?;
    (len + 4 == bytes.len()).then(|| bytes[..len].into())
}

/// FORMERR for a message whose header is `header` and whose rest does not parse.
async fn formerr(header: &Header, protocol: Protocol) -> Option<Vec<u8>> {
    let queries = Queries::read(&mut BinDecoder::new(&[]), 0).ok()?;
    let response = MessageResponseBuilder::new(&queries, None)
        .error_msg(&header.metadata, ResponseCode::FormErr);
    let mut reply = Reply::new(protocol, None);
    reply.send_response(response).await.ok()?;
    reply.take()
}

/// The answer to the message `msg` from `src`, or `None` when none is sent: what the sockets
/// do with every message, bytes in and bytes out (public for the fuzz target of `fuzz/`).
pub async fn answer(
    handler: &Handler,
    metrics: &Metrics,
    msg: Vec<u8>,
    src: SocketAddr,
    protocol: Protocol,
) -> Option<Vec<u8>> {
    let Ok(header) = Header::read(&mut BinDecoder::new(&msg)) else {
        metrics.add_dropped(Dropped::Short);
        tracing::trace!(%src, len = msg.len(), "dropped: shorter than a DNS header");
        return None;
    };
    if header.metadata.message_type == MessageType::Response {
        metrics.add_dropped(Dropped::Response);
        tracing::trace!(%src, "dropped: a response");
        return None;
    }
    let request = match Request::from_bytes(msg, src, protocol) {
        Ok(r) => r,
        Err(e) => {
            metrics.add_query(Outcome::FormErr);
            tracing::debug!(%src, error = %e, "malformed query: FORMERR");
            return formerr(&header, protocol).await;
        }
    };
    let reply = Reply::new(protocol, question_name(&request));
    handler
        .handle_request::<_, TokioTime>(&request, reply.clone())
        .await;
    reply.take()
}

/// True if an answer can go to `src` (not port 0, not an unspecified or broadcast address).
fn reachable(src: SocketAddr) -> bool {
    src.port() != 0
        && !src.ip().is_unspecified()
        && !matches!(src.ip(), IpAddr::V4(a) if a.is_broadcast())
}

/// How often the UDP thread, waiting for a datagram, looks whether it is asked to stop: the
/// only wake-up of an idle server, 10 a second.
const UDP_STOP_POLL: Duration = Duration::from_millis(100);

/// Serves `socket` from a thread of its own until `stop` is cancelled (or this future is
/// dropped): the thread blocks in `recvmmsg`, answers the fast queries of each batch and
/// sends their answers with one `sendmmsg` ([`udp_batch`]), and hands every other query to
/// the runtime this is called from. No task wake-up, no readiness poll and no allocation
/// per fast query: at high rates a query costs the two system calls' shares, as Knot's.
async fn serve_udp(
    socket: UdpSocket,
    handler: Arc<Handler>,
    metrics: Arc<Metrics>,
    in_flight: usize,
    stop: CancellationToken,
) {
    let socket = match blocking(socket) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "UDP not served: setting up the socket");
            return;
        }
    };
    let udp = UdpServer {
        socket,
        handler,
        metrics,
        places: Arc::new(Semaphore::new(in_flight)),
        runtime: tokio::runtime::Handle::current(),
    };
    let halt = stop.child_token();
    let _halt_when_dropped = halt.clone().drop_guard();
    let (ended, thread_ended) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("jitsu-dns-udp".into())
        .spawn(move || {
            // Dropped when the thread ends, however it ends: what the future waits on.
            let _ended = ended;
            udp.run(&halt);
        });
    match spawned {
        // Err only once the thread ended (its sender dropped).
        Ok(_) => thread_ended.await.unwrap_or(()),
        Err(e) => tracing::error!(error = %e, "UDP not served: starting its thread"),
    }
}

/// `socket` as a blocking socket that waits [`UDP_STOP_POLL`] at most for a datagram.
fn blocking(socket: UdpSocket) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket.into_std()?;
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(UDP_STOP_POLL))?;
    Ok(socket)
}

/// What the UDP thread serves with (see [`serve_udp`]).
struct UdpServer {
    /// Blocking, with [`UDP_STOP_POLL`] as its receive timeout.
    socket: Arc<std::net::UdpSocket>,
    handler: Arc<Handler>,
    metrics: Arc<Metrics>,
    /// The bound on slow-path queries being answered.
    places: Arc<Semaphore>,
    /// Where the slow path's tasks run.
    runtime: tokio::runtime::Handle,
}

impl UdpServer {
    /// The UDP thread's loop, until `halt` is cancelled.
    fn run(&self, halt: &CancellationToken) {
        let mut batch = Batch::new();
        while !halt.is_cancelled() {
            let received = match batch.recv(&self.socket) {
                Ok(n) => n,
                // The receive timeout: time to look at `halt` again.
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                // ICMP errors of earlier answers surface here; the socket still works.
                Err(e) => {
                    tracing::debug!(error = %e, "receiving over UDP");
                    continue;
                }
            };
            for i in 0..received {
                let (msg, src, out) = batch.datagram(i);
                let Some(src) = src.filter(|s| reachable(*s)) else {
                    self.metrics.add_dropped(Dropped::BadSource);
                    continue;
                };
                // Answered here: no task, no copy, nothing parsed but the header and question.
                if self.handler.answer_fast(msg, out) {
                    batch.hold(src);
                } else {
                    self.slow(msg, src);
                }
            }
            let held = batch.held();
            for _ in batch.send(&self.socket)..held {
                self.metrics.add_dropped(Dropped::Unsent);
            }
        }
    }

    /// Answers `msg` from `src` through hickory in a task of its own on the runtime, if a
    /// place is free. The answer is sent without waiting (the UDP thread is the one that
    /// blocks on the socket): if the socket's send buffer is full it is dropped and counted,
    /// as the kernel would drop it.
    fn slow(&self, msg: &[u8], src: SocketAddr) {
        let Ok(place) = self.places.clone().try_acquire_owned() else {
            self.metrics.add_dropped(Dropped::Busy);
            tracing::trace!(%src, "dropped: too many UDP queries in flight");
            return;
        };
        let msg = msg.to_vec();
        let socket = self.socket.clone();
        let (handler, metrics) = (self.handler.clone(), self.metrics.clone());
        self.runtime.spawn(async move {
            let _place = place;
            if let Some(reply) = answer(&handler, &metrics, msg, src, Protocol::Udp).await {
                let to = SockaddrStorage::from(src);
                let flags = MsgFlags::MSG_DONTWAIT;
                if let Err(e) = sendto(socket.as_raw_fd(), &reply, &to, flags) {
                    metrics.add_dropped(Dropped::Unsent);
                    tracing::debug!(%src, error = %e, "sending over UDP");
                }
            }
        });
    }
}

/// Open TCP connections per client, each under [`ClientCounts::max`].
#[derive(Debug)]
struct ClientCounts {
    max: usize,
    open: HashMap<IpAddr, usize>,
}

/// The key a client is counted under: its address, or for IPv6 its /64 (an IPv4 client
/// over an IPv6 socket is its IPv4 address).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(a) => {
            let s = a.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl ClientCounts {
    fn new(max: usize) -> ClientCounts {
        ClientCounts {
            max,
            open: HashMap::new(),
        }
    }

    /// Counts one more connection of `client`, unless it has `max` open.
    fn try_open(&mut self, client: IpAddr) -> bool {
        let n = self.open.entry(client_key(client)).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    /// One connection of `client` closed.
    fn close(&mut self, client: IpAddr) {
        let key = client_key(client);
        if let Some(n) = self.open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&key);
            }
        }
    }
}

/// One open connection as counted: released when dropped, however the connection ends.
struct Counted {
    client: IpAddr,
    counts: Arc<Mutex<ClientCounts>>,
    metrics: Arc<Metrics>,
    _place: OwnedSemaphorePermit,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.counts
            .lock()
            .expect("client counts lock is never poisoned: nothing panics holding it")
            .close(self.client);
        self.metrics.add_tcp_connections(-1);
    }
}

async fn serve_tcp(
    listener: TcpListener,
    handler: Arc<Handler>,
    metrics: Arc<Metrics>,
    limits: Limits,
    stop: CancellationToken,
) {
    let places = Arc::new(Semaphore::new(limits.tcp_max_clients));
    let counts = Arc::new(Mutex::new(ClientCounts::new(limits.tcp_max_per_client)));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        let (stream, src) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a DNS-over-TCP connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Closed at once, not left in the backlog: the client learns now and tries elsewhere.
        let Ok(place) = places.clone().try_acquire_owned() else {
            metrics.add_tcp_refused(TcpLimit::Total);
            tracing::debug!(%src, "TCP connection closed: tcp_max_clients reached");
            continue;
        };
        let opened = counts
            .lock()
            .expect("client counts lock is never poisoned: nothing panics holding it")
            .try_open(src.ip());
        if !opened {
            metrics.add_tcp_refused(TcpLimit::PerClient);
            tracing::debug!(%src, "TCP connection closed: tcp_max_per_client reached");
            continue;
        }
        metrics.add_tcp_connections(1);
        let counted = Counted {
            client: src.ip(),
            counts: counts.clone(),
            metrics: metrics.clone(),
            _place: place,
        };
        let (handler, metrics, stop) = (handler.clone(), metrics.clone(), stop.clone());
        tokio::spawn(async move {
            let _counted = counted;
            connection(stream, src, &handler, &metrics, &stop).await;
        });
    }
}

/// Answers the queries of one TCP connection, one after the other, until the client closes
/// it, a timeout passes, or jitsu-dns stops.
async fn connection(
    mut stream: TcpStream,
    src: SocketAddr,
    handler: &Handler,
    metrics: &Metrics,
    stop: &CancellationToken,
) {
    loop {
        let len = tokio::select! {
            r = timeout(TCP_IDLE_TIMEOUT, stream.read_u16()) => match r {
                Ok(Ok(len)) => len,
                Ok(Err(_)) => return,
                Err(_) => {
                    tracing::debug!(%src, "TCP connection idle: closed");
                    return;
                }
            },
            _ = stop.cancelled() => return,
        };
        // Grows as bytes arrive: a client that announces 64 KiB and stalls gets no buffer.
        let mut msg = Vec::new();
        let read = timeout(
            TCP_IO_TIMEOUT,
            (&mut stream).take(u64::from(len)).read_to_end(&mut msg),
        )
        .await;
        if !matches!(read, Ok(Ok(n)) if n == usize::from(len)) {
            tracing::debug!(%src, "TCP message incomplete within the I/O timeout: closed");
            return;
        }
        let Some(reply) = answer(handler, metrics, msg, src, Protocol::Tcp).await else {
            continue;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            continue;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&reply_len.to_be_bytes());
        out.extend_from_slice(&reply);
        if !matches!(
            timeout(TCP_IO_TIMEOUT, stream.write_all(&out)).await,
            Ok(Ok(()))
        ) {
            tracing::debug!(%src, "TCP answer not taken within the I/O timeout: closed");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_has_at_most_max_connections_and_gets_them_back_on_close() {
        let mut c = ClientCounts::new(2);
        assert!(c.try_open(ip("192.0.2.1")));
        assert!(c.try_open(ip("192.0.2.1")));
        assert!(!c.try_open(ip("192.0.2.1")), "a third from the same client");
        assert!(c.try_open(ip("192.0.2.2")), "another client has its own");
        c.close(ip("192.0.2.1"));
        assert!(c.try_open(ip("192.0.2.1")), "a place came free");
        c.close(ip("192.0.2.1"));
        c.close(ip("192.0.2.1"));
        c.close(ip("192.0.2.2"));
        assert!(
            c.open.is_empty(),
            "nothing kept for clients gone: {:?}",
            c.open
        );
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64_and_a_mapped_ipv4_client_its_address() {
        let mut c = ClientCounts::new(1);
        assert!(c.try_open(ip("2001:db8:1:2::1")));
        assert!(
            !c.try_open(ip("2001:db8:1:2:ffff::9")),
            "the same /64 is the same client"
        );
        assert!(c.try_open(ip("2001:db8:1:3::1")));
        assert!(c.try_open(ip("::ffff:192.0.2.1")));
        assert!(!c.try_open(ip("192.0.2.1")), "the same IPv4 client");
    }

    #[test]
    fn answers_cannot_go_to_port_0_or_broadcast() {
        assert!(reachable("192.0.2.1:5353".parse().unwrap()));
        assert!(!reachable("192.0.2.1:0".parse().unwrap()));
        assert!(!reachable("255.255.255.255:53".parse().unwrap()));
        assert!(!reachable("0.0.0.0:53".parse().unwrap()));
        assert!(!reachable("[::]:53".parse().unwrap()));
    }

    /// xorshift64*: the same cases on every run, many of them.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<T: Copy>(&mut self, from: &[T]) -> T {
            from[self.below(from.len())]
        }
    }

    const NAMES: [&str; 7] = [
        "www.example.org.",
        "a.b.example.org.",
        "off.example.org.",
        "example.org.",
        "ns.example.org.",
        "nope.example.org.",
        "example.com.",
    ];
    const TYPES: [u16; 8] = [1, 28, 15, 16, 6, 2, 255, 65];
    const OPTIONS: [&[u8]; 7] = [
        &[],
        &[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8],
        &[0, 12, 0, 3, 0, 0, 0],
        &[0xfd, 0xe9, 0, 1, 7],
        &[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 12, 0, 0],
        &[0, 3, 0, 0],
        &[0, 8, 0, 7, 0, 1, 24, 0, 192, 0, 2],
    ];

    /// What a query was made of.
    struct Made {
        name: &'static str,
        qtype: u16,
        class: u16,
        option: usize,
        version: u8,
        msg: Vec<u8>,
    }

    /// A random query: one of [`NAMES`] in random case, one of [`TYPES`] (half the time
    /// www or a.b, A or AAAA), class IN (or CH), random header bits, and half the time EDNS
    /// with a random payload size, DO bit and options (version 1 now and then).
    fn random_query(rng: &mut Rng) -> Made {
        // Half the time a name and type the fast path may answer.
        let (name, qtype) = if rng.below(2) == 0 {
            (rng.pick(&NAMES[..2]), rng.pick(&TYPES[..2]))
        } else {
            (rng.pick(&NAMES), rng.pick(&TYPES))
        };
        let class: u16 = if rng.below(10) == 0 { 3 } else { 1 };
        let id = rng.next() as u16;
        // Any bits but QR and the opcode: RD, AA, TC; Z, AD, CD, an RCODE.
        let flags = [(rng.next() as u8) & 0x07, rng.next() as u8];
        let mut msg = id.to_be_bytes().to_vec();
        msg.extend_from_slice(&flags);
        msg.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.trim_end_matches('.').split('.') {
            msg.push(label.len() as u8);
            msg.extend(label.bytes().map(|b| {
                if rng.below(2) == 0 {
                    b.to_ascii_uppercase()
                } else {
                    b
                }
            }));
        }
        msg.push(0);
        msg.extend_from_slice(&qtype.to_be_bytes());
        msg.extend_from_slice(&class.to_be_bytes());
        let (mut option, mut version) = (0, 0);
        if rng.below(2) == 0 {
            msg[11] = 1;
            option = rng.below(OPTIONS.len());
            version = if rng.below(10) == 0 { 1 } else { 0 };
            let payload = rng.pick(&[0u16, 100, 512, 1232, 4096, 65535]);
            let opts = OPTIONS[option];
            msg.extend_from_slice(&[0, 0, 41]);
            msg.extend_from_slice(&payload.to_be_bytes());
            msg.extend_from_slice(&[0, version, rng.pick(&[0, 0x80]), 0]);
            msg.extend_from_slice(&(opts.len() as u16).to_be_bytes());
            msg.extend_from_slice(opts);
        }
        Made {
            name,
            qtype,
            class,
            option,
            version,
            msg,
        }
    }

    const SPECS: [&str; 3] = [
        "name=www,dns=www.example.org,ip=10.0.0.1,ip6=fd00::1,command=x",
        "name=deep,dns=a.b.example.org,ip=10.0.0.2,command=x",
        "name=off,dns=off.example.org,ip=10.0.0.3,command=x",
    ];

    fn config(specs: &[&str]) -> crate::config::Config {
        use crate::config::{Flags, merge};
        let flags = Flags {
            specs: specs.iter().map(|s| s.to_string()).collect(),
            bind: Some("10.0.0.254".into()),
            ..Flags::default()
        };
        merge(&flags, None).unwrap()
    }

    type Slots = std::collections::HashMap<crate::fleet::VmName, Arc<crate::dns::VmSlot>>;

    /// A handler for [`SPECS`]: www (A and AAAA) and a.b (A only), running, and off, not
    /// running; a query that would wait for the fleet gets SERVFAIL at once (nobody takes
    /// it). With its tables and slots, to change them.
    fn handler_with() -> (Handler, Arc<Metrics>, Arc<crate::dns::Tables>, Slots) {
        use crate::dns::{Clock, Table, Tables, slots_for};

        let cfg = config(&SPECS);
        let slots = slots_for(&cfg.vms, &Slots::new());
        for (name, slot) in &slots {
            slot.direct.store(
                name.to_string() != "off",
                std::sync::atomic::Ordering::Release,
            );
        }
        let tables = Tables::new(Table::build(&cfg, &slots, None, 7));
        let (slow, _) = tokio::sync::mpsc::channel(1);
        let metrics = Arc::new(Metrics::new());
        (
            Handler::new(tables.clone(), slow, metrics.clone(), Clock::new()),
            metrics,
            tables,
            slots,
        )
    }

    fn handler() -> (Handler, Arc<Metrics>) {
        let (h, m, _, _) = handler_with();
        (h, m)
    }

    const CLIENT: &str = "192.0.2.9:5353";

    /// The slow path's answer to `msg` over UDP.
    async fn slow(h: &Handler, m: &Metrics, msg: &[u8]) -> Option<Vec<u8>> {
        answer(h, m, msg.to_vec(), CLIENT.parse().unwrap(), Protocol::Udp).await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_fast_path_answers_running_vms_addresses_with_the_slow_paths_bytes() {
        let (h, m) = handler();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut out = Vec::new();
        let mut answered = 0;
        for _ in 0..4000 {
            let q = random_query(&mut rng);
            let fast = h.answer_fast(&q.msg, &mut out);
            let expected = q.class == 1
                && q.version == 0
                && q.option < 5 // the last two are NSID and client subnet
                && ((q.name == NAMES[0] && (q.qtype == 1 || q.qtype == 28))
                    || (q.name == NAMES[1] && q.qtype == 1));
            assert_eq!(fast, expected, "fast path for {:02x?}", q.msg);
            let slow = slow(&h, &m, &q.msg).await.expect("every query is answered");
            if fast {
                answered += 1;
                assert_eq!(out, slow, "the same bytes for {:02x?}", q.msg);
            }
        }
        assert!(answered > 1000, "only {answered} answered by the fast path");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn mutated_queries_the_fast_path_answers_get_the_slow_paths_bytes() {
        let (h, m) = handler();
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let mut out = Vec::new();
        let (mut answered, mut tried) = (0, 0);
        while tried < 50_000 {
            let mut msg = random_query(&mut rng).msg;
            // One to three changes: a byte anywhere set to a random or a telling value, the
            // end cut or extended.
            for _ in 0..1 + rng.below(3) {
                match rng.below(4) {
                    0 | 1 if !msg.is_empty() => {
                        let at = rng.below(msg.len());
                        let any = rng.next() as u8;
                        msg[at] = rng.pick(&[any, 0, 1, 0x29, 0x3f, 0x40, 0xc0, 0xff]);
                    }
                    2 => msg.truncate(rng.below(msg.len() + 1)),
                    _ => msg.extend((0..1 + rng.below(12)).map(|_| rng.next() as u8)),
                }
            }
            tried += 1;
            if h.answer_fast(&msg, &mut out) {
                answered += 1;
                let slow = slow(&h, &m, &msg).await;
                assert_eq!(Some(&out), slow.as_ref(), "the same bytes for {msg:02x?}");
            }
        }
        // Those the fast path still answers changed the ID, a flag, the case, the payload
        // size or an option's bytes: that is where a difference would hide.
        assert!(
            answered > 500,
            "only {answered} of {tried} answered by the fast path"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_points_its_owner_at_the_question_as_written_knots_60_bytes() {
        let (h, m) = handler();
        // wWw.ExAmple.org A, EDNS payload 1232 with no options: what Knot answers in 60 bytes.
        let mut q = vec![0x12, 0x34, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 1, 3];
        q.extend_from_slice(b"wWw\x07ExAmple\x03org\x00\x00\x01\x00\x01");
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        let a = slow(&h, &m, &q).await.unwrap();
        assert_eq!(a.len(), 60, "{a:02x?}");
        assert_eq!(&a[12..33], &q[12..33], "the question as written");
        assert_eq!(&a[33..35], &[0xc0, 0x0c], "the owner: a pointer to it");
        let decoded = hickory_proto::op::Message::from_vec(&a).unwrap();
        assert_eq!(decoded.answers[0].name.to_string(), "wWw.ExAmple.org.");
        assert_eq!(decoded.answers[0].data.to_string(), "10.0.0.1");
        // Without EDNS, 49 bytes; the same over TCP (no fast path there).
        let plain = [&q[..11], &[0], &q[12..33]].concat();
        assert_eq!(slow(&h, &m, &plain).await.unwrap().len(), 49);
        let tcp = answer(&h, &m, q.clone(), CLIENT.parse().unwrap(), Protocol::Tcp).await;
        assert_eq!(tcp, Some(a));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_fast_path_counts_as_a_direct_answer_and_leaves_other_vms_to_the_slow_path() {
        let (h, m) = handler();
        let mut rng = Rng(7);
        let mut out = Vec::new();
        let www_a = loop {
            let q = random_query(&mut rng);
            if q.name == NAMES[0] && q.qtype == 1 && q.class == 1 && q.msg[11] == 0 {
                break q.msg;
            }
        };
        assert!(h.answer_fast(&www_a, &mut out));
        assert_eq!(m.queries(Outcome::Answer), 1);
        let off_a = [&www_a[..13], b"off", &www_a[16..]].concat();
        assert!(!h.answer_fast(&off_a, &mut out), "off does not run");
        assert_eq!(m.queries(Outcome::Answer), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_vm_that_stops_or_moves_is_never_answered_from_its_old_bytes() {
        use std::sync::atomic::Ordering::Release;

        let (h, m, tables, slots) = handler_with();
        let www = slots
            .iter()
            .find_map(|(n, s)| (n.to_string() == "www").then_some(s))
            .unwrap();
        // www.example.org A, ID 0x0102, no EDNS: the address is the last four bytes.
        let mut q = vec![1, 2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3];
        q.extend_from_slice(b"www\x07example\x03org\x00\x00\x01\x00\x01");
        let mut out = Vec::new();
        assert!(h.answer_fast(&q, &mut out));
        assert_eq!(out[out.len() - 4..], [10, 0, 0, 1]);
        assert_eq!(m.fast_answers(), 1);

        // Stopped (the daemon clears the flag the handler reads): the fleet is asked, and
        // here nobody answers it, so SERVFAIL, not the old address.
        www.direct.store(false, Release);
        assert!(
            !h.answer_fast(&q, &mut out),
            "a stopped VM takes the slow path"
        );
        let s = slow(&h, &m, &q).await.unwrap();
        assert_eq!(s[3] & 0x0f, 2, "SERVFAIL: {s:02x?}");
        www.direct.store(true, Release);

        // A reload that moves www: the new table's bytes, the same as the slow path's.
        let moved = [
            &SPECS[0].replace("10.0.0.1", "10.0.0.9")[..],
            SPECS[1],
            SPECS[2],
        ];
        tables.replace(crate::dns::Table::build(&config(&moved), &slots, None, 7));
        assert!(h.answer_fast(&q, &mut out));
        assert_eq!(out[out.len() - 4..], [10, 0, 0, 9]);
        assert_eq!(Some(out), slow(&h, &m, &q).await);
        assert_eq!(m.fast_answers(), 2);
    }

    /// [`serve_udp`] serving `h` on a loopback socket (64 queries in flight at most), and a
    /// client socket: the client, the server's address, what stops it and its task.
    async fn serving_udp(
        h: Handler,
        m: &Arc<Metrics>,
    ) -> (
        UdpSocket,
        SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = server.local_addr().unwrap();
        let stop = CancellationToken::new();
        let serving = tokio::spawn(serve_udp(server, Arc::new(h), m.clone(), 64, stop.clone()));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (client, at, stop, serving)
    }

    /// A plain query, RD set: `id`, the name's wire bytes, the type, class IN.
    fn plain_query(id: u16, name: &[u8], qtype: u8) -> Vec<u8> {
        [
            &id.to_be_bytes()[..],
            &[1, 0, 0, 1, 0, 0, 0, 0, 0, 0],
            name,
            &[0, qtype, 0, 1],
        ]
        .concat()
    }

    /// Marks the answer to `id` seen, failing if it was seen before.
    fn seen_once(seen: &mut [bool], id: u16) {
        assert!(
            !std::mem::replace(&mut seen[usize::from(id)], true),
            "{id} twice"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_queued_on_the_socket_is_answered_whole_fast_and_slow_alike() {
        let (h, m) = handler();
        let (client, at, stop, serving) = serving_udp(h, &m).await;
        // 3 x BATCH queries sent before the server runs again, so they queue: www A
        // (fast) and, every third, example.org SOA (hickory's path); ID = the query's number.
        let total = 3 * crate::udp_batch::BATCH as u16;
        for id in 0..total {
            let (name, qtype): (&[u8], u8) = if id % 3 == 2 {
                (b"\x07example\x03org\x00", 6)
            } else {
                (b"\x03www\x07example\x03org\x00", 1)
            };
            client
                .send_to(&plain_query(id, name, qtype), at)
                .await
                .unwrap();
        }
        let mut seen = vec![false; usize::from(total)];
        let mut buf = [0u8; 512];
        for _ in 0..total {
            let n = timeout(Duration::from_secs(5), client.recv(&mut buf))
                .await
                .expect("every query is answered")
                .unwrap();
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            assert_eq!(buf[3] & 0x0f, 0, "NOERROR for {id}: {:02x?}", &buf[..n]);
            seen_once(&mut seen, id);
        }
        assert_eq!(m.fast_answers(), u64::from(total - total / 3));
        stop.cancel();
        serving.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sixty_four_queued_at_once_are_answered_and_the_bad_ones_among_them_counted() {
        let (h, m) = handler();
        let (client, at, stop, serving) = serving_udp(h, &m).await;
        // 64 queries for www A (fast), ID = their number, and among them, in the same
        // batches: one shorter than a header, one response, one whose question is cut.
        let www = |id: u16| plain_query(id, b"\x03www\x07example\x03org\x00", 1);
        let cut = [&[0xbe, 0xef][..], &www(0)[2..20]].concat();
        let response = [&[0xde, 0xad, 0x81][..], &www(0)[3..]].concat();
        for id in 0..64u16 {
            client.send_to(&www(id), at).await.unwrap();
            match id {
                10 => client.send_to(&[1, 2, 3], at).await.unwrap(),
                20 => client.send_to(&response, at).await.unwrap(),
                40 => client.send_to(&cut, at).await.unwrap(),
                _ => 0,
            };
        }
        let mut seen = [false; 64];
        let mut formerr = false;
        let mut buf = [0u8; 512];
        for _ in 0..65 {
            let n = timeout(Duration::from_secs(5), client.recv(&mut buf))
                .await
                .expect("every query but the short one and the response is answered")
                .unwrap();
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            if id == 0xbeef {
                assert_eq!(
                    buf[3] & 0x0f,
                    1,
                    "FORMERR for the cut one: {:02x?}",
                    &buf[..n]
                );
                formerr = true;
                continue;
            }
            assert_eq!(&buf[n - 4..n], &[10, 0, 0, 1], "www's address for {id}");
            seen_once(&mut seen, id);
        }
        assert!(formerr && seen.iter().all(|s| *s));
        assert_eq!(m.fast_answers(), 64);
        assert_eq!(m.queries(Outcome::FormErr), 1);
        assert_eq!(m.dropped(Dropped::Short), 1);
        assert_eq!(m.dropped(Dropped::Response), 1);
        // Nothing more comes: the short one and the response got no answer.
        let more = timeout(Duration::from_millis(200), client.recv(&mut buf)).await;
        assert!(
            more.is_err(),
            "an answer to a dropped message: {:02x?}",
            &buf[..8]
        );
        stop.cancel();
        serving.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn formerr_echoes_the_id_with_no_question() {
        let mut msg = vec![0x4a, 0x17, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(&[63, b'w']);
        let header = Header::read(&mut BinDecoder::new(&msg)).unwrap();
        let out = formerr(&header, Protocol::Udp).await.unwrap();
        assert_eq!(&out[..2], &[0x4a, 0x17]);
        assert_eq!(out[2] & 0x80, 0x80, "a response");
        assert_eq!(out[3] & 0x0f, 1, "FORMERR");
        assert_eq!(&out[4..12], &[0; 8], "no sections");
        assert_eq!(out.len(), 12);
    }
}
