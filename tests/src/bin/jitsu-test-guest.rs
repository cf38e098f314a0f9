//! `jitsu-test-guest`: the project's stand-in for a unikernel, run by jitsu-dns's process
//! backend with `ifup=guest`.
//!
//! It waits its boot time, then does what a booting guest does on the bridge, in order:
//! configures its IPv4 address (silently), starts listening, appends one line to the report
//! file (`listening <name> <unix-time-ns>`, so benchmarks can subtract the boot time),
//! starts serving HTTP on port 80 and a plain TCP echo on port 7, configures its IPv6
//! address, and announces its addresses (gratuitous ARP, unsolicited NA, sent from its own
//! packet socket, kept open: closing a packet socket waits for the kernel, 8-30 ms).
//!
//! Settings come from the environment the process backend sets (`JITSU_NAME`, `JITSU_IFACE`,
//! `JITSU_IP`, `JITSU_IP_PREFIX`, `JITSU_IP6`, `JITSU_IP6_PREFIX`, `JITSU_GATEWAY`) and from
//! flags: `--boot-ms N` (default 0), `--report PATH` (default `$JITSU_GUEST_REPORT`, else none),
//! `--http-port P` (80), `--echo-port P` (7).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use shared_proto::Mac;
use synjitsu::garp;
use synjitsu::sys::packet::PacketSocket;
use synjitsu::wire::{self, ArpOp, ArpRepr};

struct Settings {
    name: String,
    iface: String,
    ip: Option<String>,
    ip_prefix: String,
    ip6: Option<String>,
    ip6_prefix: String,
    gateway: Option<String>,
    boot: Duration,
    report: Option<String>,
    http_port: u16,
    echo_port: u16,
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

fn settings() -> Result<Settings> {
    let mut s = Settings {
        name: env("JITSU_NAME").unwrap_or_else(|| "guest".into()),
        iface: env("JITSU_IFACE").unwrap_or_else(|| "eth0".into()),
        ip: env("JITSU_IP"),
        ip_prefix: env("JITSU_IP_PREFIX").unwrap_or_else(|| "24".into()),
        ip6: env("JITSU_IP6"),
        ip6_prefix: env("JITSU_IP6_PREFIX").unwrap_or_else(|| "64".into()),
        gateway: env("JITSU_GATEWAY"),
        boot: Duration::ZERO,
        report: env("JITSU_GUEST_REPORT"),
        http_port: 80,
        echo_port: 7,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--boot-ms" => s.boot = Duration::from_millis(value()?.parse().context("--boot-ms")?),
            "--report" => s.report = Some(value()?),
            "--http-port" => s.http_port = value()?.parse().context("--http-port")?,
            "--echo-port" => s.echo_port = value()?.parse().context("--echo-port")?,
            "--name" => s.name = value()?,
            "--iface" => s.iface = value()?,
            "--ip" => s.ip = Some(value()?),
            "--ip6" => s.ip6 = Some(value()?),
            "--help" | "-h" => {
                println!(
                    "usage: jitsu-test-guest [--boot-ms N] [--report PATH] [--http-port P] [--echo-port P] [--name N] [--iface I] [--ip A] [--ip6 A]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if s.ip.is_none() && s.ip6.is_none() {
        bail!("no address: set JITSU_IP/JITSU_IP6 (the process backend does) or pass --ip");
    }
    Ok(s)
}

fn sh(cmd: &str) -> Result<()> {
    let st = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .with_context(|| format!("running {cmd}"))?;
    if !st.success() {
        bail!("{cmd} failed ({st})");
    }
    Ok(())
}

fn bring_up(s: &Settings) -> Result<()> {
    let i = &s.iface;
    // The link should already be up (the process backend brings it up with IPv6 disabled and no
    // address, so nothing leaves this MAC during the boot and the bridge port is forwarding by
    // now). Run by hand, bring it up and wait for the carrier.
    sh(&format!(
        "ip link set lo up; ip link set {i} up; \
         n=0; while [ \"$(cat /sys/class/net/{i}/operstate)\" != up ] && [ $n -lt 300 ]; do \
         sleep 0.01; n=$((n+1)); done"
    ))?;
    // IPv4 silently: the guest announces itself once it listens (`announce`), as a
    // unikernel's stack that configures its NIC, opens its listeners, then says so. An
    // announcement before the listen would tell synjitsu (and `wait_for=announce`) that the
    // guest can take connections it would refuse. IPv6 comes after the listen
    // (`announce`): enabling it on the link sends router solicitations and MLD reports, so
    // that the guest's first frame would not be its announcement.
    if let Some(ip) = &s.ip {
        sh(&format!("ip addr replace {ip}/{} dev {i}", s.ip_prefix))?;
    }
    if let Some(gw) = &s.gateway {
        sh(&format!("ip route replace default via {gw}"))?;
    }
    Ok(())
}

/// Configures the IPv6 address (the kernel announces it: unsolicited NA), then announces
/// each address from the guest's own interface, in microseconds (no tool to spawn): a
/// gratuitous ARP, and an unsolicited neighbour advertisement to all nodes for an address the
/// guest found already configured (`ifup=jitsu`), which the kernel did not announce.
/// Returns the socket it sent them from: the caller keeps it open.
fn announce(s: &Settings) -> Result<PacketSocket> {
    let i = &s.iface;
    if let Some(ip6) = &s.ip6 {
        // Without DAD the address is valid at once, and announced.
        sh(&format!(
            "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.{i}.accept_dad=0 \
             net.ipv6.conf.{i}.ndisc_notify=1 net.ipv6.conf.{i}.disable_ipv6=0 \
             && ip addr replace {ip6}/{} dev {i}",
            s.ip6_prefix
        ))?;
    }
    let dir = format!("/sys/class/net/{}", s.iface);
    let read = |f: &str| {
        std::fs::read_to_string(format!("{dir}/{f}"))
            .with_context(|| format!("reading {dir}/{f}"))
            .map(|v| v.trim().to_string())
    };
    let ifindex: i32 = read("ifindex")?.parse().context("ifindex")?;
    let mac: Mac = read("address")?.parse().context("MAC")?;
    let sock = PacketSocket::open(ifindex, None, 4096).context("packet socket")?;
    let mut frame = [0u8; 128];
    if let Some(ip) = &s.ip {
        // The request form, as `arping -U` sends it.
        let ip = ip.parse().context("JITSU_IP")?;
        let arp = ArpRepr {
            op: ArpOp::Request,
            sender_mac: mac,
            sender_ip: ip,
            target_mac: Mac::BROADCAST,
            target_ip: ip,
        };
        wire::write_eth(&mut frame, Mac::BROADCAST, mac, wire::ETHERTYPE_ARP);
        wire::write_arp(&mut frame, &arp);
        let n = wire::pad(&mut frame, wire::ETH_HDR + wire::ARP_LEN);
        sock.send(&frame[..n])
            .context("sending the gratuitous ARP")?;
    }
    if let Some(ip6) = &s.ip6 {
        let to = garp::NaTo::AllNodes;
        let n =
            garp::neighbour_advertisement(&mut frame, mac, ip6.parse().context("JITSU_IP6")?, to);
        sock.send(&frame[..n])
            .context("sending the neighbour advertisement")?;
    }
    Ok(sock)
}

fn serve_http(listener: TcpListener, name: String) {
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = answer_http(stream, &name);
        });
    }
}

fn answer_http(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    // Read the request head; the body (if any) is ignored.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let body = format!("hello from {name}\n");
    // One write, one segment: written in pieces, Nagle holds the rest until the client ACKs.
    let page = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(page.as_bytes())
}

fn serve_echo(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut s = stream;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
}

fn listen(port: u16) -> Result<TcpListener> {
    // One dual-stack socket serves both families.
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    TcpListener::bind(addr).with_context(|| format!("listening on port {port}"))
}

fn main() -> Result<()> {
    let s = settings()?;
    std::thread::sleep(s.boot);
    bring_up(&s)?;
    let http = listen(s.http_port)?;
    let echo = listen(s.echo_port)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_nanos();
    let line = format!("listening {} {now}\n", s.name);
    print!("{line}");
    if let Some(path) = &s.report {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .with_context(|| format!("writing the report to {path}"))?;
    }
    // Accepting before announcing: a client let in by the announcement is answered at once,
    // not after the announcement's own system calls.
    let name = s.name.clone();
    std::thread::spawn(move || serve_echo(echo));
    let server = std::thread::spawn(move || serve_http(http, name));
    let _announced_from = announce(&s)?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the HTTP server thread panicked"))
}
