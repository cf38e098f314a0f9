//! The whole chain on real QEMU guests (TCG) under a real libvirtd: jitsu-dns with
//! `-x libvirt -c qemu:///system` and synjitsu on the same `br0` in a host namespace (as on a
//! dom0), a client in its own namespace with real dig and curl, the project's guest image
//! defined from the VMs' keys.
//!
//! - A cold start with synjitsu: dig boots the guest, synjitsu holds the client's SYNs while
//!   it boots and hands them over once the guest answers its probe; on the wire the client's
//!   SYN-ACK follows the guest's first one by a few ms. The same cold start without synjitsu:
//!   the client connects only when its next SYN retransmission reaches the guest. And without
//!   synjitsu or a cached MAC, nobody answers ARP while the guest boots: the client's connect
//!   fails once ARP gives up (3 s), unless the guest's own gratuitous ARP comes first and
//!   releases the SYN its kernel queued. All three are printed with their margins to the
//!   guest's `listening` console line (the client's SYN timers are the classic 1 s, 3 s, 7 s:
//!   `tcp_syn_linear_timeouts=0`).
//! - Idle VMs (TTL 5 s: the idle clock starts when libvirt's start returns, and this guest
//!   sends its first packet 3 to 7 s later on a loaded machine) are destroyed; with `stop_mode=suspend` saved, and the
//!   next query resumes them (time to resume printed next to time to boot).
//! - A domain paused by someone is `paused`; a query unpauses it. A restarted jitsu-dns
//!   adopts the running domain.
//! - A guest that powers itself off is `off` through libvirt's lifecycle event: jitsu-dns
//!   polls no states with this backend (its metrics say so).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jitsu_tests::curl::{Curl, metric};
use jitsu_tests::jitsu_dns::{DnsHarness, store_log};
use jitsu_tests::libvirt::{ConsoleWatch, GuestImage, GuestVm, Libvirtd, URI, qemu_pid};
use jitsu_tests::synjitsu::Capture;
use jitsu_tests::topo::Member;
use jitsu_tests::{Netns, require_root, require_tool, unique, wait_until};

const LONG: Duration = Duration::from_secs(120);
const DNS: &str = "10.77.0.254";
const CLIENT_IP: &str = "10.77.0.2";
const JITSU_METRICS: &str = "127.0.0.1:9155";
const SYNJITSU_METRICS: &str = "127.0.0.1:9479";

fn tools() {
    require_root();
    for (t, p) in [
        ("dig", "dnsutils"),
        ("curl", "curl"),
        ("tcpdump", "tcpdump"),
        ("git", "git"),
    ] {
        require_tool(t, p);
    }
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The client namespace's count of retransmitted SYNs (`TcpExt: TCPSynRetrans`).
fn syn_retransmits(ns: &Netns) -> u64 {
    let text = ns.sh("cat /proc/net/netstat").unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (names, values) = (lines[0], lines[1]);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPSynRetrans")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// What one cold start measured, in seconds from the dig.
#[derive(Debug)]
///
/// Wire times come from the client's capture (tcpdump's timestamps), the guest's listening
/// from its console line (which follows its real listen by ~10 ms under TCG), both on the
/// wall clock from the dig's start.
struct Cold {
    dns: f64,
    listening: f64,
    /// The page, or how curl failed and when.
    page: Result<(), (String, f64)>,
    /// The client's SYNs on its wire (original and retransmissions).
    syns: Vec<f64>,
    retransmits: u64,
    /// The SYN-ACK reaching the client.
    synack: Option<f64>,
    /// The guest's first data segment reaching the client (the page's first byte).
    first_byte: Option<f64>,
    /// The dig's moment on the wall clock (capture timestamps are wall-clock).
    wall0: f64,
}

impl Cold {
    fn row(&self, mode: &str) -> String {
        let syns: Vec<String> = self.syns.iter().map(|s| format!("{s:.3}")).collect();
        let ms = |t: Option<f64>| t.map_or(f64::NAN, |t| (t - self.listening) * 1e3);
        let result = match &self.page {
            Ok(()) => format!(
                "{:>9.3} {:>+8.1} {:>10.3} {:>+8.1}",
                self.synack.unwrap_or(f64::NAN),
                ms(self.synack),
                self.first_byte.unwrap_or(f64::NAN),
                ms(self.first_byte)
            ),
            Err((why, at)) => format!("{:>39}", format!("{why} at {at:.3}")),
        };
        format!(
            "{mode:<22} {:>6.3} {:>9.3} {result}  {:>2} [{}]",
            self.dns,
            self.listening,
            self.retransmits,
            syns.join(", ")
        )
    }
}

/// dig, then curl, from the client; the guest's `listening` is watched on its console.
fn cold_start(client: &Member, dir: &Path, vm: &GuestVm, console: &Path) -> (Cold, String) {
    // QEMU truncates the console file when it starts; an earlier boot's must not count.
    let _ = std::fs::remove_file(console);
    let watch = ConsoleWatch::start(console, "jitsu-guest: listening");
    let capture = Capture::start(&client.ns, "eth0", dir, "cli").unwrap();
    let retrans_before = syn_retransmits(&client.ns);
    let t0 = Instant::now();
    let w0 = epoch(SystemTime::now());
    let dig = client
        .ns
        .command("dig")
        .args(["+time=30", "+tries=1", &format!("@{DNS}"), &vm.dns, "A"])
        .output()
        .unwrap();
    let dns = t0.elapsed().as_secs_f64();
    let dig_text = String::from_utf8_lossy(&dig.stdout).into_owned();
    assert!(
        dig_text.contains(&format!("\t{}\n", vm.ip)),
        "no address: {dig_text}"
    );
    let got = Curl::get(format!("http://{}/", vm.ip))
        .connect_timeout(Duration::from_secs(60))
        .run(&client.ns)
        .unwrap();
    let failed_at = t0.elapsed().as_secs_f64();
    let page = match got.exit {
        _ if got.ok() => Ok(()),
        // curl's exit 7: the connection failed (refused, or no route: nobody answered ARP).
        7 => {
            let why = got.error.rsplit(": ").next().unwrap_or("connect failed");
            Err((why.to_string(), failed_at))
        }
        other => Err((format!("curl exit {other}"), failed_at)),
    };
    let listening = watch.wait(LONG).unwrap();
    let frames = capture.finish().unwrap();
    // The client's own SYNs: synjitsu's probes and replays may pass the client's port too
    // while the bridge has not learnt the guest's MAC yet.
    let (from, to) = (
        format!(" IP {CLIENT_IP}."),
        format!(" > {}.80: Flags [S],", vm.ip),
    );
    let syns = frames
        .iter()
        .filter(|l| l.contains(&from) && l.contains(&to))
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map(|t| t - w0)
        .collect();
    let from_guest = format!(" IP {}.80 > {CLIENT_IP}.", vm.ip);
    let time = |l: &String| Some(l.split_whitespace().next()?.parse::<f64>().ok()? - w0);
    let synack = frames
        .iter()
        .find(|l| l.contains(&from_guest) && l.contains("Flags [S.]"))
        .and_then(time);
    let first_byte = frames
        .iter()
        .find(|l| {
            l.contains(&from_guest)
                && l.contains("Flags [P.]")
                && !l.trim_end().ends_with("length 0")
        })
        .and_then(time);
    let cold = Cold {
        dns,
        listening: epoch(listening.wall) - w0,
        page,
        syns,
        retransmits: syn_retransmits(&client.ns) - retrans_before,
        synack,
        first_byte,
        wall0: w0,
    };
    (cold, got.body)
}

/// Seconds from a dig to the first byte of the page (guest off, suspended or paused).
fn dig_to_page(client: &Member, vm: &GuestVm) -> f64 {
    let t0 = Instant::now();
    let d = client
        .ns
        .sh(&format!("dig +time=30 +tries=1 +short @{DNS} {} A", vm.dns))
        .unwrap();
    assert_eq!(d.trim(), vm.ip.to_string());
    let page = Curl::get(format!("http://{}/", vm.ip))
        .connect_timeout(Duration::from_secs(60))
        .body(&client.ns)
        .unwrap();
    assert_eq!(page, format!("hello from {}\n", vm.name));
    t0.elapsed().as_secs_f64()
}

#[test]
fn libvirt_guests_boot_on_dig_masked_by_synjitsu_and_stop_when_idle() {
    tools();
    let image = GuestImage::build().unwrap();
    let mut h = DnsHarness::new("lvd").unwrap();
    let dir: PathBuf = h.host.dir().to_path_buf();
    let lv = Libvirtd::start(&h.host).unwrap();
    let sock = dir.join("synjitsu.sock");
    let mut synjitsu = jitsu_tests::synjitsu::start(
        &h.host,
        &sock,
        &[
            "--probe-ip",
            "10.77.0.250",
            "--metrics",
            SYNJITSU_METRICS,
            "--xenstore",
            "off",
            "--hold-timeout",
            "60s",
            "--log-level",
            "debug",
        ],
        LONG,
    )
    .unwrap();
    let client = h
        .host
        .join(
            "cli",
            Some("02:77:00:00:00:02"),
            &[&format!("{CLIENT_IP}/24")],
            true,
        )
        .unwrap();
    // The classic SYN timers (1 s, 3 s, 7 s) the masking is about, not this kernel's linear
    // ones (a retransmission every second for the first four).
    client
        .ns
        .sh("f=/proc/sys/net/ipv4/tcp_syn_linear_timeouts; [ ! -e $f ] || echo 0 > $f")
        .unwrap();
    // The client knows the guests' MACs, as a router in front of the bridge that talked to
    // them before does: what is measured is TCP's retransmissions, not ARP giving up (that
    // case is the last cold start).
    let neigh = |ip: &str, mac: &str| {
        client
            .ns
            .sh(&format!(
                "ip neigh replace {ip} lladdr {mac} dev eth0 nud permanent"
            ))
            .unwrap();
    };

    let vm = |tag: &str, last: u8, keys: &str| {
        let console = dir.join(format!("{tag}.console"));
        let g = GuestVm::new(
            &unique(&format!("jt-{tag}")),
            &format!("{tag}.example.org"),
            format!("10.77.0.{last}").parse().unwrap(),
            24,
            &format!("02:77:00:00:00:{last}"),
        )
        .console_log(&console)
        .keys(keys);
        (g, console)
    };
    let (masked, masked_console) = vm("masked", 10, "use_synjitsu=true");
    let (plain, plain_console) = vm("plain", 11, "response_delay=0");
    let (saver, saver_console) = vm("saver", 12, "use_synjitsu=true,stop_mode=suspend");
    let db = h.db();
    let specs: Vec<String> = [&masked, &plain, &saver]
        .iter()
        .map(|g| g.spec(&image))
        .collect();
    let mut flags = vec![
        // Reached from the client at br0's address.
        "-b",
        "0.0.0.0",
        "-x",
        "libvirt",
        "--synjitsu",
        sock.to_str().unwrap(),
        "--metrics",
        JITSU_METRICS,
        "-t",
        "5",
    ];
    flags.extend(specs.iter().map(String::as_str));
    let args = h.backend_args(&format!("{URI}?shutdown_grace=30"), &flags);
    h.start(&args, &[]).unwrap();
    wait_until("synjitsu's control client", LONG, || {
        (metric(
            h.host.ns(),
            SYNJITSU_METRICS,
            "synjitsu_control_client_attached",
        ) == 1.0)
            .then_some(())
    })
    .unwrap();

    // Cold starts, masked by synjitsu and not.
    neigh(&masked.ip.to_string(), &masked.mac);
    neigh(&plain.ip.to_string(), &plain.mac);
    let held_before = metric(h.host.ns(), SYNJITSU_METRICS, "synjitsu_syns_held_total");
    // synjitsu's port shows its probe, the guest's first SYN-ACK (the moment it listens, on
    // the wire) and the held SYN re-sent.
    let syj = Capture::start(h.host.ns(), "syj-br0-p", &dir, "syj").unwrap();
    let (with, page) = cold_start(&client, &dir, &masked, &masked_console);
    assert_eq!(page, format!("hello from {}\n", masked.name), "{with:?}");
    let syj = syj.finish().unwrap();
    let at = |l: &String| {
        l.split_whitespace()
            .next()
            .and_then(|t| t.parse::<f64>().ok())
            .map(|t| t - with.wall0)
    };
    let announced = syj
        .iter()
        .find(|l| {
            l.contains(&format!(
                "Request who-has {ip} (ff:ff:ff:ff:ff:ff) tell {ip},",
                ip = masked.ip
            ))
        })
        .and_then(at);
    let probe_answered = syj
        .iter()
        .find(|l| {
            l.contains(&format!(" IP {}.80 > 10.77.0.250.", masked.ip)) && l.contains("Flags [S.]")
        })
        .and_then(at);
    let replayed = syj
        .iter()
        .filter(|l| {
            l.contains(&format!(" IP {CLIENT_IP}."))
                && l.contains(&format!(" > {}.80: Flags [S],", masked.ip))
        })
        .filter_map(at)
        .find(|t| probe_answered.is_some_and(|p| *t >= p));
    let held = metric(h.host.ns(), SYNJITSU_METRICS, "synjitsu_syns_held_total") - held_before;
    let handed = metric(
        h.host.ns(),
        SYNJITSU_METRICS,
        "synjitsu_syns_handed_over_total{via=\"wire\"}",
    );
    let (without, page) = cold_start(&client, &dir, &plain, &plain_console);
    assert_eq!(page, format!("hello from {}\n", plain.name), "{without:?}");
    // The same without synjitsu and without the cached MAC: nobody answers ARP while the
    // guest boots.
    h.wait_state(&plain.name, "off", LONG);
    client
        .ns
        .sh(&format!("ip neigh del {} dev eth0", plain.ip))
        .unwrap();
    let (uncached, _) = cold_start(&client, &dir, &plain, &plain_console);
    eprintln!(
        "\nlibvirt cold starts (QEMU/TCG), seconds from the dig (wire times from the client's \
         capture); ms = after the guest's listening console line\n{:<22} {:>6} {:>9} {:>9} {:>8} \
         {:>10} {:>8}  SYN retransmits [client SYNs]\n{}\n{}\n{}\nsynjitsu held {held} SYN(s) and \
         handed over {handed}\n",
        "mode",
        "dns",
        "listening",
        "SYN-ACK",
        "ms",
        "first byte",
        "ms",
        with.row("with synjitsu"),
        without.row("without synjitsu"),
        uncached.row("without, no ARP entry"),
    );
    let (Some(probe), Some(replay), Some(synack)) = (probe_answered, replayed, with.synack) else {
        panic!(
            "no hand-over on the wire: probe answered {probe_answered:?}, SYN re-sent \
             {replayed:?}, client SYN-ACK {:?}\n{}",
            with.synack,
            syj.join("\n")
        );
    };
    eprintln!(
        "on the wire, with synjitsu: the guest announced itself {:.1} ms after its listening \
         line (the guest sends its gratuitous ARP once it listens), answered synjitsu's probe \
         {:.1} ms after that, synjitsu re-sent the held SYN {:.1} ms later, the client had its \
         SYN-ACK {:.1} ms after the probe's; the page took {:.1} ms more (busybox httpd under \
         TCG)\n",
        (announced.unwrap_or(f64::NAN) - with.listening) * 1e3,
        (probe - announced.unwrap_or(f64::NAN)) * 1e3,
        (replay - probe) * 1e3,
        (synack - probe) * 1e3,
        (with.first_byte.unwrap_or(f64::NAN) - synack) * 1e3
    );
    if let Err((why, at)) = &uncached.page {
        eprintln!(
            "without synjitsu and without a cached MAC, the client's connect failed at {at:.3} \
             s ({why}), {:.0} ms from the guest's listening line: ARP gave up (3 s) before the \
             guest announced itself\n",
            (at - uncached.listening) * 1e3
        );
    }
    // With synjitsu the SYN the guest answered is the one synjitsu held and re-sent once the
    // guest answered its probe: the client waited for no timer of its own.
    assert!(
        held >= 1.0 && handed >= 1.0,
        "held {held}, handed over {handed}"
    );
    assert!(
        probe <= replay && replay <= synack,
        "{probe} {replay} {synack}"
    );
    // Without it no SYN was held: the first one went to a guest that was not there, and the
    // client's retransmission timer decided when it connected.
    assert!(
        without.syns.len() >= 2 && without.retransmits >= 1 && without.page.is_ok(),
        "{without:?}"
    );

    // Idle: destroyed.
    h.wait_state(&masked.name, "off", LONG);
    h.wait_state(&plain.name, "off", LONG);
    let log = store_log(&db);
    for g in [&masked, &plain] {
        assert!(
            log.iter()
                .any(|m| m.starts_with(&format!("{}: running -> stopping (idle for 10 s", g.name))),
            "{log:?}"
        );
        assert_eq!(lv.domstate(&g.name).unwrap(), "shut off (destroyed)");
    }

    // Suspend mode: saved when idle (QEMU gone), resumed by the next query.
    let boot = dig_to_page(&client, &saver);
    let qemu = qemu_pid(&saver.name).expect("QEMU's pid while the guest runs");
    h.wait_state(&saver.name, "suspended", LONG);
    assert_eq!(lv.domstate(&saver.name).unwrap(), "shut off (saved)");
    assert!(
        !Path::new(&format!("/proc/{qemu}")).exists() && qemu_pid(&saver.name).is_none(),
        "QEMU {qemu} still runs for the saved guest"
    );
    let resume = dig_to_page(&client, &saver);
    h.wait_state(&saver.name, "running", LONG);
    assert_eq!(lv.domstate(&saver.name).unwrap(), "running (restored)");
    eprintln!(
        "suspend mode: dig to page {boot:.3} s for the boot, {resume:.3} s for the resume from \
         the managed save\n"
    );
    let _ = &saver_console;

    // Paused by someone: seen through the event; a query unpauses it.
    lv.virsh(&["suspend", &saver.name]).unwrap();
    h.wait_state(&saver.name, "paused", LONG);
    let unpause = dig_to_page(&client, &saver);
    h.wait_state(&saver.name, "running", LONG);
    assert_eq!(lv.domstate(&saver.name).unwrap(), "running (unpaused)");
    eprintln!("paused: dig to page {unpause:.3} s\n");

    // jitsu-dns restarts: the running VM is adopted, not booted again, and its events still
    // reach the new jitsu-dns.
    let starts = h.stored(&saver.name, "starts");
    assert_eq!(h.stop().unwrap(), Some(0));
    h.start(&args, &[]).unwrap();
    wait_until("the running VM adopted", LONG, || {
        store_log(&db)
            .iter()
            .any(|m| {
                m.starts_with(&format!("{}: ", saver.name))
                    && m.ends_with("running (adopted: already running)")
            })
            .then_some(())
    })
    .unwrap();
    assert_eq!(h.stored(&saver.name, "starts"), starts, "booted again");

    // The guest powers itself off: jitsu-dns hears it from libvirt, without polling.
    let asked = Instant::now();
    let said = Curl::get(format!("http://{}/cgi-bin/poweroff", saver.ip))
        .max_time(Duration::from_secs(5))
        .body(&client.ns)
        .unwrap();
    assert!(said.contains("powering off"), "{said}");
    h.wait_state(&saver.name, "off", LONG);
    eprintln!(
        "the guest powered itself off: off in the store {:.3} s after its request\n",
        asked.elapsed().as_secs_f64()
    );
    assert!(
        store_log(&db)
            .iter()
            .any(|m| m == &format!("{}: running -> off (exited by itself)", saver.name)),
        "{:?}",
        store_log(&db)
    );
    assert_eq!(lv.domstate(&saver.name).unwrap(), "shut off (shutdown)");
    let events = metric(h.host.ns(), JITSU_METRICS, "jitsu_dns_backend_events_total");
    let polls = metric(
        h.host.ns(),
        JITSU_METRICS,
        "jitsu_dns_backend_state_polls_total",
    );
    eprintln!("jitsu-dns: {events} lifecycle events pushed, {polls} states polled");
    // Counted since jitsu-dns restarted: at least the guest's power-off.
    assert!(events >= 1.0, "{events}");
    assert_eq!(polls, 0.0);

    synjitsu.check_running().unwrap();
    assert_eq!(h.stop().unwrap(), Some(0));
    drop(synjitsu);
    drop(lv);
}
