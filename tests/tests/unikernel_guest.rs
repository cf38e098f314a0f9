//! jitsu's unikernel (`guest/unikernel`), booted by QEMU microvm under TCG on a tap port of a
//! bridge in namespaces the test creates, checked with real tools: `arping` gets its MAC,
//! `ping` is answered, it asks for its gateway's MAC as it boots and learns it, its gratuitous
//! ARP is its next frame and comes after it listens,
//! `curl` gets its page over a kept-alive connection and from 50 clients at once, and it
//! prints when it listens.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use jitsu_tests::synjitsu::Capture;
use jitsu_tests::topo::{BRIDGE, Host, Member};
use jitsu_tests::unikernel::{QEMU, Unikernel, gateway_mac};
use jitsu_tests::{require_root, require_tool, wait_until};

const GUEST_IP: &str = "10.77.13.10";
const GUEST_MAC: &str = "02:77:00:0d:00:10";
const GATEWAY: &str = "10.77.13.1";
const CMDLINE: &str = "ip=10.77.13.10/24 gw=10.77.13.1";
/// Generous: the first boot of a test run may wait for a busy machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

fn tools() {
    require_root();
    for (t, p) in [
        (QEMU, "qemu-system-x86"),
        ("ip", "iproute2"),
        ("arping", "iputils-arping"),
        ("ping", "iputils-ping"),
        ("curl", "curl"),
        ("tcpdump", "tcpdump"),
    ] {
        require_tool(t, p);
    }
}

/// A bridge with the gateway's address, and a client on it.
fn topology(tag: &str) -> Result<(Host, Member)> {
    let host = Host::new(tag)?;
    host.address("10.77.13.1/24")?;
    let client = host.join("ukc", Some("02:77:00:0d:00:02"), &["10.77.13.2/24"], true)?;
    Ok((host, client))
}

/// True for a `tcpdump -nn -tt` line of a frame the guest sent.
fn from_guest(line: &str) -> bool {
    line.contains(&format!("tell {GUEST_IP},"))
        || line.contains(&format!("Reply {GUEST_IP} is-at"))
        || line.contains(&format!("IP {GUEST_IP} >"))
        || line.contains(&format!("IP {GUEST_IP}."))
}

/// The capture time (seconds since the epoch) at the start of a `tcpdump -tt` line.
fn capture_time(line: &str) -> f64 {
    line.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no capture time in {line:?}"))
}

#[test]
fn the_unikernel_answers_arp_and_ping_and_announces_itself_once_it_listens() -> Result<()> {
    tools();
    let (host, client) = topology("ukarp")?;
    let capture = Capture::start(host.ns(), BRIDGE, host.dir(), "br")?;
    let mut guest = Unikernel::boot(&host, GUEST_MAC, CMDLINE)?;
    let listening = guest.wait_listening(BOOT_TIMEOUT)?;
    let seen = SystemTime::now();
    ensure!(
        listening.endpoint == format!("{GUEST_IP}:80") && listening.mac == GUEST_MAC,
        "listening line names another address: {}",
        listening.line
    );
    ensure!(
        listening.after_ms > 0.0,
        "no time in the listening line: {}",
        listening.line
    );
    // It rehearsed its first connection before it listened (guest/unikernel/src/server.rs):
    // a failed rehearsal is a line of its own, and its first client would then run cold code.
    ensure!(
        listening.line.contains(", rehearsal ") && !guest.console().contains("rehearsal:"),
        "the unikernel did not rehearse its first connection:\n{}",
        guest.console()
    );
    // Its clock against the host's: the line cannot report more time than passed since QEMU
    // started (a TSC rate calibrated too low would).
    let since_start = seen.duration_since(guest.started)?;
    ensure!(
        since_start.as_secs_f64() * 1000.0 >= listening.after_ms,
        "the guest says it listened {} ms after entry, but QEMU started only {since_start:?} \
         before the line was seen",
        listening.after_ms
    );

    let arping = client
        .ns
        .sh(&format!("arping -c 1 -w 10 -I eth0 {GUEST_IP}"))?;
    ensure!(
        arping
            .to_lowercase()
            .contains(&format!("reply from {GUEST_IP} [{GUEST_MAC}]")),
        "arping got no reply with the guest's MAC:\n{arping}"
    );
    let ping = client
        .ns
        .sh(&format!("ping -c 3 -i 0.2 -w 30 {GUEST_IP}"))?;
    // With a deadline (-w) ping waits for late replies (a busy host can take a while) and
    // stops at the third; a late one may come with the next.
    let received: u32 = ping
        .split(", ")
        .find_map(|p| p.strip_suffix(" received")?.parse().ok())
        .unwrap_or(0);
    ensure!(received >= 3, "ping not answered:\n{ping}");

    let frames = capture.finish()?;
    let seen = frames.join("\n");
    let garps: Vec<&String> = frames
        .iter()
        .filter(|l| l.contains(&format!("Request who-has {GUEST_IP} tell {GUEST_IP},")))
        .collect();
    ensure!(
        garps.len() == 1,
        "want one gratuitous ARP from the guest, saw:\n{seen}"
    );
    // Before it: only its request for its gateway's MAC (not an announcement), which the
    // gateway (the bridge's address) answered before the guest listened.
    let mut sent = frames.iter().filter(|l| from_guest(l));
    ensure!(
        sent.next()
            .is_some_and(|l| l.contains(&format!("Request who-has {GATEWAY} tell {GUEST_IP},"))),
        "the guest's first frame is not its ARP request for its gateway:\n{seen}"
    );
    ensure!(
        sent.next() == Some(garps[0]),
        "the guest's second frame is not its gratuitous ARP:\n{seen}"
    );
    // On the listening line, or (the answer late, on a loaded host) on a line of its own.
    let bridge_mac = host
        .ns()
        .sh(&format!("cat /sys/class/net/{BRIDGE}/address"))?;
    let learnt = wait_until("the gateway's MAC on the console", BOOT_TIMEOUT, || {
        gateway_mac(&guest.console())
    })?;
    ensure!(
        learnt == bridge_mac.trim(),
        "the guest learnt {learnt} for its gateway, not the bridge's {}:\n{}",
        bridge_mac.trim(),
        guest.console()
    );
    // The guest listened `after_ms` after its entry point, which came after QEMU started:
    // an announcement sent before listening would be earlier than that.
    let started = guest.started.duration_since(UNIX_EPOCH)?.as_secs_f64();
    let listened_no_earlier = started + listening.after_ms / 1000.0;
    let garp_at = capture_time(garps[0]);
    ensure!(
        garp_at >= listened_no_earlier,
        "gratuitous ARP at {garp_at:.6}, before the guest can have listened \
         (QEMU started {started:.6}, listening {} ms after entry)",
        listening.after_ms
    );
    Ok(())
}

/// Answers the guest's ARP request for `10.77.13.99` (a gateway no host has) as `GW_MAC`, but
/// only once the guest has listened (its gratuitous ARP seen on the bridge): an answer that
/// comes late. Prints `answered` and exits.
const LATE_GATEWAY: &str = r#"
import socket, struct, sys
GW, GUEST, GW_MAC = "10.77.13.99", "10.77.13.10", bytes.fromhex("02770000d099")
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("br0", 0))
print("ready", flush=True)
asked = None
while True:
    f = s.recv(2048)
    op, sha, spa, tpa = struct.unpack("!6xH6s4s6x4s", f[14:42])
    spa, tpa = socket.inet_ntoa(spa), socket.inet_ntoa(tpa)
    if op == 1 and spa == GUEST and tpa == GW:
        asked = sha
    elif op == 1 and spa == GUEST and tpa == GUEST and asked:
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, GW_MAC, socket.inet_aton(GW),
                          asked, socket.inet_aton(GUEST))
        s.send(asked + GW_MAC + b"\x08\x06" + arp + b"\0" * 18)
        print("answered", flush=True)
        sys.exit(0)
"#;

#[test]
fn a_gateway_that_answers_only_after_the_guest_listens_is_said_on_a_line_of_its_own() -> Result<()>
{
    tools();
    let (host, _client) = topology("uklate")?;
    let mut gateway = host
        .ns()
        .command("/usr/bin/python3")
        .args(["-c", LATE_GATEWAY])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(gateway.stdout.take().context("stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    ensure!(
        line.trim() == "ready",
        "the late gateway did not start: {line:?}"
    );
    let mut guest = Unikernel::boot(&host, GUEST_MAC, "ip=10.77.13.10/24 gw=10.77.13.99")?;
    let listening = guest.wait_listening(BOOT_TIMEOUT)?;
    ensure!(
        listening
            .line
            .ends_with("; gateway 10.77.13.99 not heard from"),
        "the listening line should say the gateway had not answered: {}",
        listening.line
    );
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    ensure!(
        line.trim() == "answered",
        "the late gateway did not answer: {line:?}"
    );
    let learnt = wait_until(
        "the gateway's late answer on the console",
        BOOT_TIMEOUT,
        || {
            guest
            .console()
            .lines()
            .any(|l| l == "jitsu-unikernel: gateway 10.77.13.99 at 02:77:00:00:d0:99 (after listening)")
            .then(|| gateway_mac(&guest.console()))
            .flatten()
        },
    )?;
    ensure!(learnt == "02:77:00:00:d0:99", "{learnt}");
    let _ = gateway.wait();
    Ok(())
}

/// The request number on a page (`request N` in its last line).
fn request_number(page: &str) -> Option<u64> {
    page.lines().last()?.strip_prefix("request ")?.parse().ok()
}

#[test]
fn the_unikernel_serves_http_with_keep_alive_and_to_fifty_clients_at_once() -> Result<()> {
    tools();
    let (host, client) = topology("ukhttp")?;
    let mut guest = Unikernel::boot(&host, GUEST_MAC, CMDLINE)?;
    let listening = guest.wait_listening(BOOT_TIMEOUT)?;

    // Three requests on one connection: curl reuses it (one connect, then none).
    let out = client.ns.sh(&format!(
        "curl -sS -f -m 10 -w 'connects=%{{num_connects}}\\n' \
         http://{GUEST_IP}/ http://{GUEST_IP}/ http://{GUEST_IP}/"
    ))?;
    let numbers: Vec<u64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("request ")?.parse().ok())
        .collect();
    let connects: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("connects="))
        .collect();
    ensure!(
        numbers == [1, 2, 3] && connects == ["1", "0", "0"],
        "want requests 1, 2, 3 on one kept-alive connection, got:\n{out}"
    );
    let boot = format!("listening {:.3} ms after entry\n", listening.after_ms);
    ensure!(
        out.contains(&boot),
        "the page does not give the boot time ({boot:?}):\n{out}"
    );

    // Fifty clients at once, each on its own connection.
    let dir = host.file("pages");
    std::fs::create_dir_all(&dir)?;
    client.ns.sh(&format!(
        "for i in $(seq 50); do \
           curl -sS -f -m 30 -o {d}/$i http://{GUEST_IP}/ 2>{d}/$i.err & \
         done; wait",
        d = dir.display()
    ))?;
    let mut seen = Vec::new();
    for i in 1..=50 {
        let page = std::fs::read_to_string(dir.join(i.to_string())).unwrap_or_default();
        let err = std::fs::read_to_string(dir.join(format!("{i}.err"))).unwrap_or_default();
        let n = request_number(&page)
            .with_context(|| format!("client {i} got no page: {page:?} {err}"))?;
        seen.push(n);
    }
    seen.sort_unstable();
    ensure!(
        seen == (4..=53).collect::<Vec<u64>>(),
        "the fifty clients' request numbers are not 4..=53 each once: {seen:?}"
    );
    let last = client
        .ns
        .sh(&format!("curl -sS -f -m 10 http://{GUEST_IP}/"))?;
    ensure!(
        request_number(&last) == Some(54),
        "the request after them is not number 54:\n{last}"
    );
    Ok(())
}

#[test]
fn a_unikernel_without_an_address_says_why_and_stops() -> Result<()> {
    tools();
    let (host, _client) = topology("uknoip")?;
    let guest = Unikernel::boot(&host, GUEST_MAC, "gw=10.77.13.1")?;
    // The whole line: QEMU writes the console a character at a time.
    let console = wait_until("the unikernel's fatal error", BOOT_TIMEOUT, || {
        Some(guest.console())
            .filter(|c| c.lines().any(|l| l.contains("fatal")) && c.ends_with('\n'))
    })?;
    ensure!(
        console.contains("jitsu-unikernel: fatal: no ip=A.B.C.D/len on the command line"),
        "the console does not say what is missing:\n{console}"
    );
    ensure!(
        !console.contains("listening"),
        "it listened without an address:\n{console}"
    );
    Ok(())
}
