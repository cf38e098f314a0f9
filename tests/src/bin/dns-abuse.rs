//! `dns-abuse`: what a hostile client does to a DNS server's network paths, and a watch on
//! what it costs the server (bench/dns-abuse, tests/tests/dns_limits.rs).
//!
//! - `tcp <addr:port> <count> [--sources N] [--from IP] [--stall idle|partial|query]
//!   [--name NAME] [--hold SECONDS]`: opens `count` TCP connections, spread over `N` source
//!   addresses counting up from `--from` (loopback by default: every 127/8 address is local),
//!   and holds them for `--hold` seconds (default 10). `idle` sends nothing; `partial` sends a
//!   length prefix of 65535 and one byte, then nothing (a stalled message); `query` sends a
//!   query for `--name` and reads its answer, once right away and again every second, so the
//!   connection is never idle. Prints `tcp connected=.. failed=.. open=.. closed=..` once
//!   (after the first query of each for `query`, at the end of the hold otherwise): `closed`
//!   counts connections the server closed or reset.
//! - `udp <addr:port> <count> [--rate PER_SECOND] [--also NAME] [--wait SECONDS]`: sends
//!   `count` queries for distinct names under `abuse.invalid.` from one socket, at `--rate`
//!   (default 20000/s), then `--also`'s query; waits `--wait` seconds (default 3) for late
//!   answers; prints `udp sent=.. answered=.. noerror=.. servfail=.. refused=.. other=..
//!   also=RCODE|none`.
//! - `sink <addr:port>`: a UDP socket that reads every datagram and answers none (a
//!   forwarder that never answers); prints `sink ready` once bound.
//! - `watch <pid> <seconds> [--until PATH]`: samples the process's resident memory and open
//!   file descriptors every 50 ms, for `seconds` or until `PATH` exists; prints
//!   `peak_rss_kib=.. peak_fds=.. rss_kib=.. fds=..` (the peaks over the window, then the
//!   last sample).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args.split_first().context(USAGE)?;
    let opts = Opts::parse(rest)?;
    match cmd.as_str() {
        "tcp" => tcp(&opts),
        "udp" => udp(&opts),
        "sink" => sink(&opts),
        "watch" => watch(&opts),
        _ => bail!("{USAGE}"),
    }
}

const USAGE: &str = "usage: dns-abuse tcp|udp|sink|watch ... (see the source's documentation)";

/// Positional arguments and `--key value` options.
#[derive(Debug)]
struct Opts {
    pos: Vec<String>,
    named: Vec<(String, String)>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut o = Opts {
            pos: Vec::new(),
            named: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.strip_prefix("--") {
                Some(k) => {
                    let v = it.next().with_context(|| format!("--{k} needs a value"))?;
                    o.named.push((k.to_string(), v.clone()));
                }
                None => o.pos.push(a.clone()),
            }
        }
        Ok(o)
    }

    fn pos(&self, i: usize, what: &str) -> Result<&str> {
        self.pos
            .get(i)
            .map(String::as_str)
            .with_context(|| format!("missing {what}; {USAGE}"))
    }

    fn get<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.named.iter().find(|(k, _)| k == key) {
            Some((_, v)) => v.parse().map_err(|e| anyhow::anyhow!("--{key} {v}: {e}")),
            None => Ok(default),
        }
    }
}

/// A DNS query for `name`, type A, class IN, with `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// The source address number `i` counting up from `from`.
fn source(from: IpAddr, i: u32) -> IpAddr {
    match from {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a).wrapping_add(i)).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a).wrapping_add(u128::from(i))).into()),
    }
}

fn connect_from(src: IpAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(
        Domain::for_address(server),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&server.into(), Duration::from_secs(3))?;
    Ok(s.into())
}

/// Sends `name`'s query over `c` and reads one answer; false if the server closed or reset
/// the connection, or did not answer within 3 s.
fn round_trip(c: &mut TcpStream, id: u16, name: &str) -> bool {
    let q = query(id, name);
    let mut out = (q.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&q);
    if c.set_read_timeout(Some(Duration::from_secs(3))).is_err() || c.write_all(&out).is_err() {
        return false;
    }
    let mut len = [0u8; 2];
    if c.read_exact(&mut len).is_err() {
        return false;
    }
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    c.read_exact(&mut body).is_ok()
}

/// True if the server has closed or reset `c` (checked without waiting).
fn closed_by_server(c: &mut TcpStream) -> bool {
    if c.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 512];
    let closed = match c.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    let _ = c.set_nonblocking(false);
    closed
}

fn tcp(o: &Opts) -> Result<()> {
    let server: SocketAddr = o.pos(0, "the server's address")?.parse()?;
    let count: u32 = o.pos(1, "the connection count")?.parse()?;
    let sources: u32 = o.get("sources", 1)?;
    let from: IpAddr = o.get("from", "127.0.1.1".parse()?)?;
    let stall: String = o.get("stall", "idle".to_string())?;
    let name: String = o.get("name", "www.example.org".to_string())?;
    let hold = Duration::from_secs_f64(o.get("hold", 10.0)?);
    let started = Instant::now();
    let mut conns = Vec::new();
    let mut failed = 0;
    for i in 0..count {
        match connect_from(source(from, i % sources.max(1)), server) {
            Ok(mut c) => {
                if stall == "partial" {
                    let _ = c.write_all(&[0xff, 0xff, 0x00]);
                }
                conns.push(c);
            }
            Err(_) => failed += 1,
        }
    }
    let connected = conns.len();
    let report = |closed: usize| {
        println!(
            "tcp connected={connected} failed={failed} open={} closed={closed}",
            connected - closed,
        );
        let _ = std::io::stdout().flush();
    };
    if stall == "query" {
        let mut open: Vec<TcpStream> = Vec::new();
        for (i, mut c) in conns.into_iter().enumerate() {
            if round_trip(&mut c, i as u16, &name) {
                open.push(c);
            }
        }
        report(connected - open.len());
        // Busy connections, never idle, until the hold is over.
        while started.elapsed() < hold {
            thread::sleep(Duration::from_secs(1));
            for (i, c) in open.iter_mut().enumerate() {
                let _ = round_trip(c, i as u16, &name);
            }
        }
        return Ok(());
    }
    if let Some(left) = hold.checked_sub(started.elapsed()) {
        thread::sleep(left);
    }
    let closed = conns
        .iter_mut()
        .map(closed_by_server)
        .filter(|c| *c)
        .count();
    report(closed);
    Ok(())
}

fn udp(o: &Opts) -> Result<()> {
    let server: SocketAddr = o.pos(0, "the server's address")?.parse()?;
    let count: u64 = o.pos(1, "the query count")?.parse()?;
    let rate: u64 = o.get("rate", 20_000)?;
    let also: String = o.get("also", String::new())?;
    let wait = Duration::from_secs_f64(o.get("wait", 3.0)?);
    let s = Socket::new(
        Domain::for_address(server),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Room for a burst of answers while the sender is busy.
    let _ = s.set_recv_buffer_size(8 << 20);
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    s.bind(&any.into())?;
    let sock: UdpSocket = s.into();
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    // Index by rcode (0..16), 16: the --also query's rcode + 1 (0: none yet).
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..17).map(|_| AtomicU64::new(0)).collect());
    const ALSO_ID: u16 = 0xffff;
    let receiver = {
        let sock = sock.try_clone()?;
        let counts = counts.clone();
        let deadline = Arc::new(AtomicU64::new(0));
        let d2 = deadline.clone();
        let h = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let start = Instant::now();
            loop {
                let end = d2.load(Ordering::Relaxed);
                if end != 0 && start.elapsed().as_millis() as u64 > end {
                    return;
                }
                let Ok(n) = sock.recv(&mut buf) else { continue };
                if n < 4 {
                    continue;
                }
                let rcode = usize::from(buf[3] & 0x0f);
                // The flood's ids stop below ALSO_ID.
                if u16::from_be_bytes([buf[0], buf[1]]) == ALSO_ID {
                    counts[16].store(rcode as u64 + 1, Ordering::Relaxed);
                } else {
                    counts[rcode].fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        (h, deadline, Instant::now())
    };
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < count {
        // Paced in 1 ms steps.
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(count);
        while sent < due {
            let id = (sent % 0xfffe) as u16;
            if sock
                .send(&query(id, &format!("q{sent}.abuse.invalid")))
                .is_ok()
            {
                sent += 1;
            } else {
                thread::sleep(Duration::from_micros(200));
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    if !also.is_empty() {
        sock.send(&query(ALSO_ID, &also))?;
    }
    let (h, deadline, t0) = receiver;
    deadline.store((t0.elapsed() + wait).as_millis() as u64, Ordering::Relaxed);
    let _ = h.join();
    let c = |i: usize| counts[i].load(Ordering::Relaxed);
    let answered: u64 = (0..16).map(c).sum();
    let also_rcode = match c(16) {
        0 => "none".to_string(),
        r => match r - 1 {
            0 => "NOERROR".into(),
            2 => "SERVFAIL".into(),
            3 => "NXDOMAIN".into(),
            5 => "REFUSED".into(),
            x => format!("RCODE{x}"),
        },
    };
    println!(
        "udp sent={sent} answered={answered} noerror={} servfail={} refused={} other={} also={also_rcode}",
        c(0),
        c(2),
        c(5),
        answered - c(0) - c(2) - c(5),
    );
    Ok(())
}

fn sink(o: &Opts) -> Result<()> {
    let addr: SocketAddr = o.pos(0, "the address to listen on")?.parse()?;
    let sock = UdpSocket::bind(addr)?;
    println!("sink ready");
    std::io::stdout().flush()?;
    let mut buf = [0u8; 65535];
    loop {
        let _ = sock.recv(&mut buf);
    }
}

/// Resident memory (KiB) and open file descriptors of `pid`.
fn sample(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

fn watch(o: &Opts) -> Result<()> {
    let pid: u32 = o.pos(0, "the pid")?.parse()?;
    let secs: f64 = o.pos(1, "the seconds")?.parse()?;
    let until: String = o.get("until", String::new())?;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (mut peak_rss, mut peak_fds, mut last) = (0, 0, (0, 0));
    while Instant::now() < end && (until.is_empty() || !std::path::Path::new(&until).exists()) {
        let Some((rss, fds)) = sample(pid) else {
            bail!("process {pid} is gone");
        };
        peak_rss = peak_rss.max(rss);
        peak_fds = peak_fds.max(fds);
        last = (rss, fds);
        thread::sleep(Duration::from_millis(50));
    }
    println!(
        "peak_rss_kib={peak_rss} peak_fds={peak_fds} rss_kib={} fds={}",
        last.0, last.1
    );
    Ok(())
}
