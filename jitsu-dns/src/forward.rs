//! Relaying queries for names outside the owned zones to the forwarders.
//!
//! Owns the exchange with an upstream server: the client's query is sent as it came (with a
//! fresh random id, from a fresh socket with a random port), over UDP, or TCP if the client
//! used TCP or the UDP answer was truncated; the answer must carry our id and the client's
//! question. Servers are tried in order, each with its own timeout. Each forward is its own
//! task (hickory spawns one per UDP query), so a slow forwarder never delays other queries.
//! Which servers to forward to is decided here too: the `nameserver` lines of
//! `/etc/resolv.conf` for the default, and never jitsu-dns's own address (a loop). Reading
//! the file is the daemon's.
//!
//! Forwarding is bounded, since anyone who reaches the port could otherwise relay through
//! jitsu-dns (an open resolver is an amplifier and a cache-poisoning aid): only clients in
//! [`Forwarder::allows`]'s networks may use it (by default loopback and the networks of the
//! address jitsu-dns serves on, see [`default_clients`]), and at most `max` forwards are in
//! flight ([`Forwarder::try_begin`]): past that a query is answered SERVFAIL at once instead
//! of holding a socket and a task for the upstream's timeout. Each forward's receive buffer
//! is the size the client advertised (EDNS, 512 without), not 64 KiB.

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::Message;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Semaphore, SemaphorePermit};

/// How long one server may take over UDP.
pub const UDP_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long one server may take over TCP (connect included).
pub const TCP_TIMEOUT: Duration = Duration::from_secs(3);

/// Why no forwarder answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The query is too short to carry an id.
    #[error("query too short to forward")]
    Short,
    /// Every server failed; the last error.
    #[error("no forwarder answered: {0}")]
    NoAnswer(String),
}

/// A forwarder that would send queries back to jitsu-dns.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// A configured forwarder is jitsu-dns's own address.
    #[error("forwarder {0} is jitsu-dns's own address: queries would loop")]
    Loop(SocketAddr),
}

/// The servers to forward to, and the system nameservers left out because they are
/// jitsu-dns itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstreams {
    /// In order.
    pub servers: Vec<SocketAddr>,
    /// From `/etc/resolv.conf`, skipped: each is jitsu-dns's own address.
    pub skipped: Vec<SocketAddr>,
}

/// Where to forward: each of `ips` on `port`, except jitsu-dns's own address `own`. A
/// configured forwarder that is `own` is refused, since every query to it would come back;
/// a nameserver of `/etc/resolv.conf` (`from_system`) that is `own` is only skipped, as a
/// host running jitsu-dns as its resolver lists it there.
pub fn upstreams(
    ips: &[IpAddr],
    port: u16,
    own: SocketAddr,
    from_system: bool,
) -> Result<Upstreams, UpstreamError> {
    let mut up = Upstreams::default();
    for ip in ips {
        let server = SocketAddr::new(*ip, port);
        // A server on the wildcard address is reached on every local address, loopback too.
        let loops = server == own
            || (own.ip().is_unspecified() && ip.is_loopback() && server.port() == own.port());
        match (loops, from_system) {
            (false, _) => up.servers.push(server),
            (true, true) => up.skipped.push(server),
            (true, false) => return Err(UpstreamError::Loop(server)),
        }
    }
    Ok(up)
}

/// The forwarders, in order, who may use them, and the bound on forwards in flight.
#[derive(Debug)]
pub struct Forwarder {
    servers: Vec<SocketAddr>,
    clients: Vec<IpNet>,
    /// One permit per forward in flight: `max` in all.
    in_flight: Semaphore,
}

/// The clients allowed when none are configured: loopback, and the network of each local
/// address jitsu-dns serves on (`local`: every address of the host with its prefix length;
/// an unspecified `bind` serves on all of them, of its family).
pub fn default_clients(bind: IpAddr, local: &[(IpAddr, u8)]) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = vec![
        IpNet::new(Ipv4Addr::new(127, 0, 0, 0).into(), 8).expect("8 is an IPv4 prefix length"),
        IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    for (addr, prefix) in local {
        let served = *addr == bind || (bind.is_unspecified() && addr.is_ipv4() == bind.is_ipv4());
        if let (true, Ok(net)) = (served, IpNet::new(*addr, *prefix)) {
            let net = net.trunc();
            if !nets.iter().any(|n| n.contains(&net)) {
                nets.push(net);
            }
        }
    }
    nets
}

/// A random 16-bit id: SipHash keyed from the OS's randomness, over a counter.
fn random_id() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.finish() as u16
}

impl Forwarder {
    /// Forwards to `servers`, tried in order, for `clients`, at most `max` at a time.
    pub fn new(servers: Vec<SocketAddr>, clients: Vec<IpNet>, max: usize) -> Forwarder {
        Forwarder {
            servers,
            clients,
            in_flight: Semaphore::new(max),
        }
    }

    /// The servers, in order.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The networks whose clients may use the forwarders.
    pub fn clients(&self) -> &[IpNet] {
        &self.clients
    }

    /// True if `client` may have its queries forwarded.
    pub fn allows(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.clients.iter().any(|n| n.contains(&client))
    }

    /// A place for one forward, held until it is dropped; `None` when `max` are in flight.
    pub fn try_begin(&self) -> Option<SemaphorePermit<'_>> {
        self.in_flight.try_acquire().ok()
    }

    /// Sends `query` (a whole DNS message) upstream and returns the answer. `tcp`: the
    /// client came over TCP, so its answer may be large.
    pub async fn forward(&self, query: &[u8], tcp: bool) -> Result<Message, ForwardError> {
        if query.len() < 12 {
            return Err(ForwardError::Short);
        }
        let expected =
            Message::from_vec(query).map_err(|e| ForwardError::NoAnswer(e.to_string()))?;
        // RFC 6891: an answer over UDP is no larger than the client said it can take.
        let room = expected
            .edns
            .as_ref()
            .map_or(512, |e| usize::from(e.max_payload().max(512)));
        let mut q = query.to_vec();
        let mut last = String::from("no forwarders configured");
        for server in &self.servers {
            let id = random_id();
            q[..2].copy_from_slice(&id.to_be_bytes());
            let attempt = if tcp {
                tcp_exchange(*server, &q).await
            } else {
                match udp_exchange(*server, &q, id, room).await {
                    Ok(m) if m.metadata.truncation => tcp_exchange(*server, &q).await,
                    other => other,
                }
            };
            match attempt.and_then(|m| check(m, id, &expected)) {
                Ok(m) => return Ok(m),
                Err(e) => {
                    tracing::debug!(%server, error = %e, "forwarder failed");
                    last = format!("{server}: {e}");
                }
            }
        }
        Err(ForwardError::NoAnswer(last))
    }
}

fn check(m: Message, id: u16, expected: &Message) -> Result<Message, String> {
    if m.metadata.id != id {
        return Err("answer with another id".into());
    }
    if m.queries != expected.queries {
        return Err("answer to another question".into());
    }
    Ok(m)
}

async fn udp_exchange(
    server: SocketAddr,
    q: &[u8],
    id: u16,
    room: usize,
) -> Result<Message, String> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    sock.send(q).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; room];
    tokio::time::timeout(UDP_TIMEOUT, async {
        loop {
            let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
            // Anything else on this port is noise (or a spoofing attempt): keep waiting.
            if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                return Message::from_vec(&buf[..n]).map_err(|e| e.to_string());
            }
        }
    })
    .await
    .map_err(|_| format!("no UDP answer within {UDP_TIMEOUT:?}"))?
}

async fn tcp_exchange(server: SocketAddr, q: &[u8]) -> Result<Message, String> {
    tokio::time::timeout(TCP_TIMEOUT, async {
        let mut s = TcpStream::connect(server)
            .await
            .map_err(|e| e.to_string())?;
        let len = u16::try_from(q.len()).map_err(|_| "query too long for TCP".to_string())?;
        let mut out = Vec::with_capacity(q.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(q);
        s.write_all(&out).await.map_err(|e| e.to_string())?;
        let n = s.read_u16().await.map_err(|e| e.to_string())? as usize;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Message::from_vec(&buf).map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| format!("no TCP answer within {TCP_TIMEOUT:?}"))?
}

/// The `nameserver` lines of resolv.conf text (scoped IPv6 addresses are skipped).
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let l = l.split(['#', ';']).next()?.trim();
            let mut w = l.split_whitespace();
            (w.next()? == "nameserver").then(|| w.next()?.parse().ok())?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# generated\nsearch example.org\nnameserver 192.0.2.53\nnameserver fd00::53 # v6\n\
                    nameserver fe80::1%eth0\n;nameserver 10.0.0.1\noptions edns0\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "192.0.2.53".parse::<IpAddr>().unwrap(),
                "fd00::53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn forwarding_to_jitsu_dns_itself_is_refused_or_skipped() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let own = addr("10.0.0.254:53");
        let up = upstreams(&[ip("192.0.2.53"), ip("10.0.0.254")], 5300, own, false).unwrap();
        assert_eq!(
            up.servers,
            [addr("192.0.2.53:5300"), addr("10.0.0.254:5300")]
        );
        let e = upstreams(&[ip("192.0.2.53"), ip("10.0.0.254")], 53, own, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "forwarder 10.0.0.254:53 is jitsu-dns's own address: queries would loop"
        );
        let up = upstreams(&[ip("10.0.0.254"), ip("192.0.2.53")], 53, own, true).unwrap();
        assert_eq!(up.servers, [addr("192.0.2.53:53")]);
        assert_eq!(up.skipped, [addr("10.0.0.254:53")]);
        // Bound to every address, jitsu-dns is also every loopback address.
        let any = addr("0.0.0.0:53");
        assert!(upstreams(&[ip("127.0.0.53")], 53, any, false).is_err());
        assert!(upstreams(&[ip("127.0.0.53")], 5353, any, false).is_ok());
        let up = upstreams(&[ip("127.0.0.1")], 53, any, true).unwrap();
        assert!(up.servers.is_empty() && up.skipped.len() == 1);
    }

    #[test]
    fn by_default_loopback_and_the_served_networks_may_forward() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let local = [
            (ip("127.0.0.1"), 8),
            (ip("10.0.0.254"), 24),
            (ip("192.0.2.7"), 28),
            (ip("fd00::1"), 64),
        ];
        let loopback = [net("127.0.0.0/8"), net("::1/128")];
        assert_eq!(
            default_clients(ip("10.0.0.254"), &local),
            [&loopback[..], &[net("10.0.0.0/24")]].concat()
        );
        assert_eq!(default_clients(ip("127.0.0.1"), &local), loopback);
        assert_eq!(
            default_clients(ip("0.0.0.0"), &local),
            [&loopback[..], &[net("10.0.0.0/24"), net("192.0.2.0/28")]].concat(),
            "the wildcard serves every IPv4 network"
        );
        assert_eq!(
            default_clients(ip("::"), &local),
            [&loopback[..], &[net("fd00::/64")]].concat()
        );
        let f = Forwarder::new(vec![], default_clients(ip("10.0.0.254"), &local), 1);
        assert!(f.allows(ip("10.0.0.9")) && f.allows(ip("127.0.0.53")));
        assert!(
            f.allows(ip("::ffff:10.0.0.9")),
            "a v4-mapped client is its IPv4 address"
        );
        assert!(!f.allows(ip("10.0.1.9")) && !f.allows(ip("198.51.100.1")));
    }

    #[test]
    fn at_most_max_forwards_are_in_flight() {
        let f = Forwarder::new(vec![], vec![], 2);
        let a = f.try_begin().expect("first");
        let b = f.try_begin().expect("second");
        assert!(
            f.try_begin().is_none(),
            "a third waits for nothing: it is refused"
        );
        drop(a);
        let c = f.try_begin().expect("a place came free");
        drop((b, c));
    }

    #[test]
    fn ids_vary() {
        let ids: std::collections::BTreeSet<u16> = (0..64).map(|_| random_id()).collect();
        assert!(ids.len() > 50, "{ids:?}");
    }
}
