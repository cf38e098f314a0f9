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
//! It decides no answer: the handler does. hickory-server's own `Server` bounds none of the
//! above, answers FORMERR without the handler seeing it, and takes its sockets whole, so it
//! cannot be wrapped; this replaces it, with hickory's parsing and encoding.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Header, MessageType, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::dns::Handler;
use crate::metrics::{Dropped, Metrics, Outcome, TcpLimit};

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
    out: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Reply {
    fn new(protocol: Protocol) -> Reply {
        Reply {
            protocol,
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

/// FORMERR for a message whose header is `header` and whose rest does not parse.
async fn formerr(header: &Header, protocol: Protocol) -> Option<Vec<u8>> {
    let queries = Queries::read(&mut BinDecoder::new(&[]), 0).ok()?;
    let response = MessageResponseBuilder::new(&queries, None)
        .error_msg(&header.metadata, ResponseCode::FormErr);
    let mut reply = Reply::new(protocol);
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
    let reply = Reply::new(protocol);
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

async fn serve_udp(
    socket: UdpSocket,
    handler: Arc<Handler>,
    metrics: Arc<Metrics>,
    in_flight: usize,
    stop: CancellationToken,
) {
    let socket = Arc::new(socket);
    let places = Arc::new(Semaphore::new(in_flight));
    // One buffer for every datagram; each query takes a copy of its own bytes only.
    let mut buf = vec![0u8; 65535];
    loop {
        let received = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            _ = stop.cancelled() => return,
        };
        let (n, src) = match received {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors of earlier answers surface here; the socket still works.
                tracing::debug!(error = %e, "receiving over UDP");
                continue;
            }
        };
        if !reachable(src) {
            metrics.add_dropped(Dropped::BadSource);
            continue;
        }
        let Ok(place) = places.clone().try_acquire_owned() else {
            metrics.add_dropped(Dropped::Busy);
            tracing::trace!(%src, "dropped: too many UDP queries in flight");
            continue;
        };
        let msg = buf[..n].to_vec();
        let (socket, handler, metrics) = (socket.clone(), handler.clone(), metrics.clone());
        tokio::spawn(async move {
            let _place = place;
            if let Some(reply) = answer(&handler, &metrics, msg, src, Protocol::Udp).await
                && let Err(e) = socket.send_to(&reply, src).await
            {
                tracing::debug!(%src, error = %e, "sending over UDP");
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
