//! jitsu-dns's fleet and synjitsu's hold wired together in memory ([`wiring::Pipe`]): a query
//! through to a handed-over SYN, on a synthetic clock, with no socket and no sleep. Frames are
//! written and read with etherparse ([`frames`]), not with synjitsu's own code.
//!
//! Each test is one rule of the two daemons together: the cold start masked by synjitsu with
//! a wire hand-over and with a Xenstore one, the idle stop and the wake-up by a SYN, a
//! guest that never comes up, and a guest whose bridge port the backend names once it runs.

mod frames;
mod wiring;

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use jitsu_dns::config::StopMode;
use jitsu_dns::fleet::{Answer, Lifecycle};
use shared_proto::{ClientMessage, Event, Handover, HandoverVia, Mac, Phase, VmIdentity, VmStatus};
use synjitsu::hold::{Config, DropReason, StoreOp, Verdict, VmPhase};
use synjitsu::store::layout::TcpOption;

use frames::{Host, Sent, Tcp};
use wiring::{Call, Pipe};

const VM_MAC: Mac = Mac([0x02, 0x77, 0x00, 0x00, 0x01, 0x10]);
const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 10);
const CLIENT_MAC: Mac = Mac([0x02, 0x77, 0x00, 0x00, 0x01, 0x02]);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
const OWN_MAC: Mac = Mac([0x02, 0x53, 0x59, 0x4a, 0x00, 0x01]);
const PROBE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 250);
const PORT: u16 = 80;
const CLIENT_PORT: u16 = 40001;
/// Above 2^31: the Xenstore layout writes it signed, as OCaml's `Int32.to_string` does.
const ISN: u32 = 0xC0FF_EE01;
const HOLD_TIMEOUT: Duration = Duration::from_secs(10);
/// The configuration's `boot_timeout` and `ttl`.
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
const TTL: Duration = Duration::from_secs(60);

const VM: Host = Host {
    mac: VM_MAC,
    ip: VM_IP,
};
const CLIENT: Host = Host {
    mac: CLIENT_MAC,
    ip: CLIENT_IP,
};

/// jitsu-dns's configuration: one VM masked by synjitsu, `vm_keys` added to its table.
fn config(global: &str, vm_keys: &str) -> String {
    format!(
        r#"
ttl = 60
{global}

[[vm]]
name = "www"
dns = ["www.example.org"]
ip = "10.77.1.10"
mac = "02:77:00:00:01:10"
use_synjitsu = true
boot_timeout = 20
{vm_keys}
"#
    )
}

/// A VM run by the process backend, handed over on the wire.
fn wire_config(vm_keys: &str) -> String {
    config("", &format!("command = \"true\"\n{vm_keys}"))
}

/// synjitsu's core: a probe address, Xenstore available.
fn hold_config() -> Config {
    let mut cfg = Config::new(OWN_MAC);
    cfg.probe_v4 = Some(PROBE_IP);
    cfg.xenstore_off = None;
    cfg.hold_timeout = HOLD_TIMEOUT;
    cfg.seed = 7;
    cfg
}

fn identity(handover: Handover) -> VmIdentity {
    VmIdentity {
        name: "www".into(),
        mac: VM_MAC,
        ipv4: VM_IP,
        ipv6: None,
        handover,
        port: None,
        announces_listening: false,
    }
}

fn client_ip() -> IpAddr {
    IpAddr::V4(CLIENT_IP)
}

/// The client's SYN to the VM's web port, to the MAC it resolved.
fn client_syn(to_mac: Mac, src_port: u16, isn: u32) -> Vec<u8> {
    frames::client_syn(
        CLIENT,
        src_port,
        to_mac,
        SocketAddrV4::new(VM_IP, PORT),
        isn,
    )
}

fn phase(p: &Pipe) -> VmPhase {
    p.hold()
        .vms()
        .find(|(name, ..)| *name == "www")
        .map(|(_, phase, _)| phase)
        .expect("synjitsu knows www")
}

fn starts(p: &Pipe) -> usize {
    p.calls()
        .iter()
        .filter(|(_, c)| matches!(c, Call::Start(_)))
        .count()
}

fn stops(p: &Pipe) -> usize {
    p.calls()
        .iter()
        .filter(|(_, c)| matches!(c, Call::Stop(..)))
        .count()
}

/// The client resolves the VM's MAC: synjitsu answers for it while it stands in.
fn resolve_vm_mac(p: &mut Pipe) -> Mac {
    p.take_sent();
    assert_eq!(
        p.frame(&frames::arp_request(CLIENT, VM_IP)),
        Verdict::Answered
    );
    let sent: Vec<Sent> = p.take_sent().iter().map(|f| frames::read(f)).collect();
    let [Sent::Arp(reply)] = sent.as_slice() else {
        panic!("one ARP reply, not {sent:?}")
    };
    assert!(reply.reply, "{reply:?}");
    assert_eq!((reply.eth_src, reply.eth_dst), (VM_MAC, CLIENT_MAC));
    assert_eq!(reply.sender, VM, "synjitsu answers with the guest's MAC");
    assert_eq!(reply.target, CLIENT);
    reply.sender.mac
}

/// The fleet stops www at `at`, not a millisecond earlier, in `mode`; once the backend is
/// done, www is `to`, and synjitsu, told so, stands in for it again.
fn assert_stopped_at(p: &mut Pipe, at: Instant, mode: StopMode, to: Lifecycle) {
    p.advance_to(at - Duration::from_millis(1));
    assert_eq!(p.fleet().state("www"), Some(Lifecycle::Running));
    assert_eq!(stops(p), 0);
    p.advance_to(at);
    assert_eq!(p.fleet().state("www"), Some(Lifecycle::Stopping));
    assert_eq!(p.pending(), [Call::Stop("www".into(), mode)]);
    p.take_told();
    p.stopped("www");
    assert_eq!(p.fleet().state("www"), Some(to));
    assert_eq!(
        p.take_told(),
        [(
            ClientMessage::Stopped {
                vm: identity(Handover::Wire)
            },
            true
        )]
    );
    assert_eq!(phase(p), VmPhase::Stopped);
    assert!(p.steered(VM_MAC), "synjitsu stands in for it again");
}

/// The one probe synjitsu sent among `frames`.
fn one_probe(frames: &[Vec<u8>]) -> Tcp {
    let segments = frames::tcp_segments(frames);
    let [probe] = segments.as_slice() else {
        panic!("one probe, not {segments:?}")
    };
    assert_eq!((probe.eth_src, probe.eth_dst), (OWN_MAC, VM_MAC));
    assert_eq!(*probe.src.ip(), PROBE_IP, "from synjitsu's probe address");
    assert_eq!(
        probe.dst,
        SocketAddrV4::new(VM_IP, PORT),
        "to the held port"
    );
    assert!(probe.syn && !probe.has_ack && !probe.rst, "{probe:?}");
    probe.clone()
}

/// The guest, announced, answers synjitsu's probe from a listening port: synjitsu resets the
/// probe and re-sends what it held; returns the re-sent frames.
fn guest_listens(p: &mut Pipe, probe: &Tcp) -> Vec<Vec<u8>> {
    assert_eq!(
        p.frame(&frames::answer_to_probe(probe, true)),
        Verdict::ProbeAnswer
    );
    let sent = p.take_sent();
    let Sent::Tcp(reset) = frames::read(&sent[0]) else {
        panic!("the probe's reset first, not {:?}", frames::read(&sent[0]))
    };
    assert!(reset.rst && !reset.syn, "{reset:?}");
    assert_eq!((reset.src, reset.dst), (probe.src, probe.dst));
    assert_eq!(
        reset.seq,
        probe.seq.wrapping_add(1),
        "in the probe's window"
    );
    sent[1..].to_vec()
}

/// The held SYN as it reaches the guest: the client's own frame, byte for byte.
fn assert_is_the_clients_syn(resent: &[u8], syn: &[u8], src_port: u16, isn: u32) {
    let Sent::Tcp(t) = frames::read(resent) else {
        panic!("a TCP segment")
    };
    assert_eq!(
        (t.eth_src, t.eth_dst),
        (CLIENT_MAC, VM_MAC),
        "the client's MACs"
    );
    assert_eq!(t.src, SocketAddrV4::new(CLIENT_IP, src_port));
    assert_eq!(t.dst, SocketAddrV4::new(VM_IP, PORT));
    assert_eq!(t.seq, isn, "the client's ISN");
    assert!(t.syn && !t.has_ack && !t.rst, "{t:?}");
    assert_eq!(resent, syn, "the client's frame as it sent it");
}

#[test]
fn a_query_for_an_off_vm_is_answered_once_synjitsu_holds_it_and_the_held_syn_reaches_the_guest() {
    let mut p = Pipe::new(&wire_config(""), hold_config());
    let t0 = p.now();
    // At start-up synjitsu hears of the VM, off: it stands in for it, to be woken.
    assert_eq!(phase(&p), VmPhase::Stopped);
    assert!(p.steered(VM_MAC));
    assert_eq!(
        p.take_told(),
        [(
            ClientMessage::Sync {
                vms: vec![VmStatus {
                    vm: identity(Handover::Wire),
                    phase: Phase::Stopped,
                }],
            },
            true
        )]
    );

    let q = p.query("www", client_ip());
    assert_eq!(p.pending(), [Call::Start("www".into())], "one boot");
    assert_eq!(
        p.take_told(),
        [(
            ClientMessage::Booting {
                vm: identity(Handover::Wire)
            },
            true
        )]
    );
    // Answered as soon as synjitsu acknowledged, long before the guest is up.
    assert_eq!(p.answer(q), Some(Answer::Ready));
    assert_eq!(p.fleet().state("www"), Some(Lifecycle::Booting));
    assert_eq!(phase(&p), VmPhase::Booting);

    // synjitsu announces the VM's address with the VM's MAC: three times, 100 ms apart.
    let mut garps = Vec::new();
    for _ in 0..4 {
        for f in p.take_sent() {
            let Sent::Arp(a) = frames::read(&f) else {
                panic!("only ARP while booting")
            };
            garps.push((p.now() - t0, a));
        }
        p.advance(Duration::from_millis(100));
    }
    let times: Vec<Duration> = garps.iter().map(|(t, _)| *t).collect();
    assert_eq!(times, [0, 100, 200].map(Duration::from_millis), "{garps:?}");
    for (_, a) in &garps {
        assert_eq!((a.eth_src, a.eth_dst), (VM_MAC, Mac::BROADCAST));
        assert_eq!(a.sender, VM);
        assert_eq!(a.target.ip, VM_IP, "gratuitous: its own address");
    }

    // The client resolves the MAC and connects: its SYN is held, and jitsu-dns hears of it.
    let mac = resolve_vm_mac(&mut p);
    let syn = client_syn(mac, CLIENT_PORT, ISN);
    assert_eq!(p.frame(&syn), Verdict::Held);
    assert_eq!(
        p.take_heard(),
        [Event::SynHeld {
            name: "www".into(),
            held: 1
        }]
    );
    assert!(p.take_sent().is_empty(), "a held SYN goes nowhere yet");
    assert_eq!(p.hold().held_now(), 1);

    // The backend finishes the boot; the guest comes up and announces itself.
    p.advance(Duration::from_millis(200));
    let started_at = p.now();
    p.started("www", None);
    assert_eq!(p.fleet().state("www"), Some(Lifecycle::Running));
    assert_eq!(p.frame(&frames::gratuitous_arp(VM)), Verdict::Announced);
    assert_eq!(
        p.take_heard(),
        [Event::GuestAnnounced { name: "www".into() }]
    );
    assert!(!p.steered(VM_MAC), "its MAC is the bridge's to learn again");
    assert_eq!(phase(&p), VmPhase::Handover);

    // synjitsu probes the held port; the guest does not listen yet and refuses; 0.25 ms
    // later (the first gap of the back-off) the same probe again.
    let probe = one_probe(&p.take_sent());
    assert_eq!(
        p.frame(&frames::answer_to_probe(&probe, false)),
        Verdict::ProbeAnswer
    );
    assert!(p.take_sent().is_empty(), "a refused probe changes nothing");
    p.advance(Duration::from_micros(250));
    assert_eq!(one_probe(&p.take_sent()), probe);

    // It listens: the probe is reset and the client's SYN re-sent, as the client sent it.
    let resent = guest_listens(&mut p, &probe);
    let [resent] = resent.as_slice() else {
        panic!("one SYN re-sent, not {resent:?}")
    };
    assert_is_the_clients_syn(resent, &syn, CLIENT_PORT, ISN);
    assert_eq!(
        p.take_heard(),
        [Event::Handover {
            name: "www".into(),
            count: 1,
            via: HandoverVia::Wire
        }]
    );
    assert_eq!(p.hold().held_now(), 0);
    assert_eq!(phase(&p), VmPhase::Running);

    // The announcement reached the fleet: past its boot timeout the VM is not failed.
    p.advance_to(started_at + BOOT_TIMEOUT + Duration::from_secs(1));
    assert_eq!(p.fleet().state("www"), Some(Lifecycle::Running));
    assert_eq!((starts(&p), stops(&p)), (1, 0), "{:?}", p.calls());
}

#[test]
fn a_xenstore_guest_gets_the_held_syn_in_the_original_layout_and_nothing_on_the_wire() {
    let toml = config("backend = \"libvirt\"", "handover = \"xenstore\"");
    let mut p = Pipe::new(&toml, hold_config());
    p.take_told();
    assert_eq!(phase(&p), VmPhase::Stopped);

    let q = p.query("www", client_ip());
    assert_eq!(p.pending(), [Call::Start("www".into())]);
    // The Xenstore hand-over needs the domain id: synjitsu hears of the boot from the
    // backend's result, and the answer waits for that.
    assert!(p.take_told().is_empty());
    assert_eq!(p.answer(q), None);

    // Meanwhile synjitsu still stands in for the VM it knows is off: it answers ARP (a wake
    // request the fleet, already booting, takes as one) and holds the SYN.
    let mac = resolve_vm_mac(&mut p);
    let syn = client_syn(mac, CLIENT_PORT, ISN);
    assert_eq!(p.frame(&syn), Verdict::Held);
    assert_eq!(
        p.take_heard(),
        [
            Event::WakeRequest { name: "www".into() },
            Event::SynHeld {
                name: "www".into(),
                held: 1
            }
        ]
    );
    assert_eq!(starts(&p), 1, "the wake request is not a second boot");

    p.started("www", Some(7));
    assert_eq!(
        p.take_told(),
        [(
            ClientMessage::Booting {
                vm: identity(Handover::Xenstore { domid: 7 })
            },
            true
        )]
    );
    assert_eq!(p.answer(q), Some(Answer::Ready));

    // The held SYN is written for domain 7, with the client's window, ISN and options.
    let ops = p.take_store_ops();
    let [
        StoreOp::Open {
            domid: opened_for,
            ips,
            ..
        },
        StoreOp::Write {
            domid,
            key,
            syn: held,
            ..
        },
    ] = ops.as_slice()
    else {
        panic!("an open for the new boot, then one write: {ops:?}")
    };
    assert_eq!(ips, &[IpAddr::V4(VM_IP)]);
    assert_eq!(*opened_for, 7, "/ip/<ip> is opened for the booting domain");
    assert_eq!(*domid, 7);
    assert_eq!(
        (key.local_ip, key.local_port, key.dest_ip, key.dest_port),
        (IpAddr::V4(VM_IP), PORT, client_ip(), CLIENT_PORT)
    );
    assert_eq!(held.sequence, ISN);
    assert_eq!(held.tx_wnd, frames::CLIENT_WINDOW);
    assert_eq!(
        held.options,
        // The original stack's list: one Noop per NOP byte, in reverse wire order.
        [
            TcpOption::WindowSizeShift(7),
            TcpOption::Noop,
            TcpOption::Timestamp(frames::CLIENT_TSVAL, 0),
            TcpOption::SackOk,
            TcpOption::Mss(1460),
        ]
    );
    // As the original Synjitsu wrote it and the patched MirageOS stack reads it.
    let leaf = |name: &str| p.store_node(&format!("/ip/10-77-1-10/80/10-77-1-2/40001/syn/{name}"));
    assert_eq!(leaf("sequence").as_deref(), Some("-1056969215"));
    assert_eq!(leaf("tx_wnd").as_deref(), Some("64240"));
    assert_eq!(
        leaf("options").as_deref(),
        Some("((Window_size_shift 7)Noop(Timestamp 123456 0)SACK_ok(MSS 1460))")
    );
    assert_eq!(
        p.take_heard(),
        [Event::Handover {
            name: "www".into(),
            count: 1,
            via: HandoverVia::Xenstore
        }]
    );

    // The guest, up, reads it itself: its announcement ends the stand-in and nothing is
    // probed or re-sent.
    p.take_sent();
    assert_eq!(p.frame(&frames::gratuitous_arp(VM)), Verdict::Announced);
    p.advance(Duration::from_secs(1));
    assert_eq!(frames::tcp_segments(&p.take_sent()), []);
    assert_eq!(
        p.take_heard(),
        [Event::GuestAnnounced { name: "www".into() }]
    );
    assert_eq!(p.hold().held_now(), 0);
    assert_eq!(phase(&p), VmPhase::Running);
    assert_eq!(p.fleet().state("www"), Some(Lifecycle::Running));
}

#[test]
fn an_idle_vm_is_stopped_after_two_ttls_without_queries_and_a_syn_for_it_boots_it_again() {
    let mut p = Pipe::new(&wire_config("stop_mode = \"shutdown\""), hold_config());
    p.query("www", client_ip());
    p.started("www", None);
    assert_eq!(p.frame(&frames::gratuitous_arp(VM)), Verdict::Announced);
    let up = p.now();
    assert_eq!(p.fleet().state("www"), Some(Lifecycle::Running));

    // A query while it runs is answered at once, without the fleet, and counts as use.
    p.advance(Duration::from_secs(90));
    let q = p.query("www", client_ip());
    assert_eq!(p.answer(q), Some(Answer::Ready));
    let last_query = p.now();
    p.advance_to(up + 2 * TTL + Duration::from_secs(1));
    assert_eq!(p.fleet().state("www"), Some(Lifecycle::Running));

    // 2 x TTL after the last query it is stopped, in its stop mode.
    assert_stopped_at(
        &mut p,
        last_query + 2 * TTL,
        StopMode::Shutdown,
        Lifecycle::Off,
    );

    // A client that kept the address connects: its SYN is held and wakes the VM.
    p.take_sent();
    p.take_heard();
    let syn = client_syn(VM_MAC, CLIENT_PORT + 1, ISN + 1);
    assert_eq!(p.frame(&syn), Verdict::Held);
    assert_eq!(
        p.take_heard(),
        [
            Event::SynHeld {
                name: "www".into(),
                held: 1
            },
            Event::WakeRequest { name: "www".into() }
        ]
    );
    assert_eq!(p.pending(), [Call::Start("www".into())]);
    assert_eq!(starts(&p), 2);
    assert_eq!(p.fleet().state("www"), Some(Lifecycle::Booting));
    assert_eq!(phase(&p), VmPhase::Booting);

    // Once the guest is up, the SYN that woke it reaches it.
    p.started("www", None);
    assert_eq!(p.frame(&frames::gratuitous_arp(VM)), Verdict::Announced);
    let probe = one_probe(&p.take_sent());
    let resent = guest_listens(&mut p, &probe);
    let [resent] = resent.as_slice() else {
        panic!("one SYN re-sent, not {resent:?}")
    };
    assert_is_the_clients_syn(resent, &syn, CLIENT_PORT + 1, ISN + 1);
}

#[test]
fn a_held_syn_for_a_guest_that_never_announces_is_reset_and_the_vm_fails_at_its_boot_timeout() {
    let mut p = Pipe::new(&wire_config("stop_mode = \"suspend\""), hold_config());
    let q = p.query("www", client_ip());
    assert_eq!(p.answer(q), Some(Answer::Ready));
    p.advance(Duration::from_secs(1));
    let mac = resolve_vm_mac(&mut p);
    let syn = client_syn(mac, CLIENT_PORT, ISN);
    assert_eq!(p.frame(&syn), Verdict::Held);
    let held_at = p.now();
    p.advance(Duration::from_secs(1));
    p.started("www", None);
    let started_at = p.now();

    // The client's SYN waits the hold timeout, then gets a RST from the VM's address.
    p.advance_to(held_at + HOLD_TIMEOUT - Duration::from_millis(1));
    assert_eq!(frames::tcp_segments(&p.take_sent()), []);
    assert_eq!(p.hold().held_now(), 1);
    p.advance(Duration::from_millis(1));
    let segments = frames::tcp_segments(&p.take_sent());
    let [rst] = segments.as_slice() else {
        panic!("one RST, not {segments:?}")
    };
    assert_eq!((rst.eth_src, rst.eth_dst), (VM_MAC, CLIENT_MAC));
    assert_eq!(rst.src, SocketAddrV4::new(VM_IP, PORT));
    assert_eq!(rst.dst, SocketAddrV4::new(CLIENT_IP, CLIENT_PORT));
    assert!(rst.rst && rst.has_ack && !rst.syn, "{rst:?}");
    assert_eq!(
        rst.ack,
        ISN.wrapping_add(1),
        "acknowledges the client's SYN"
    );
    assert_eq!(p.hold().held_now(), 0);
    assert_eq!(p.hold().counters().rst_hold_timeout, 1);

    // The fleet gives the guest its boot timeout, counted from the backend's start, then
    // destroys it (whatever its stop mode: it never came up) and marks it failed.
    assert_stopped_at(
        &mut p,
        started_at + BOOT_TIMEOUT,
        StopMode::Destroy,
        Lifecycle::Failed,
    );

    // The next query boots it again.
    let again = p.query("www", client_ip());
    assert_eq!(p.pending(), [Call::Start("www".into())]);
    assert_eq!(p.answer(again), Some(Answer::Ready));
}

#[test]
fn a_guest_whose_port_is_named_after_its_start_ends_the_hold_only_from_that_port() {
    let mut p = Pipe::new(&wire_config(""), hold_config());
    p.query("www", client_ip());
    let syn = client_syn(resolve_vm_mac(&mut p), CLIENT_PORT, ISN);
    assert_eq!(p.frame(&syn), Verdict::Held);
    p.take_told();
    p.take_heard();
    // libvirt names the port once the domain runs: synjitsu hears it, nothing else changes.
    p.started_on("www", None, Some("vnet3"));
    assert_eq!(
        p.take_told(),
        [(
            ClientMessage::Port {
                name: "www".into(),
                port: "vnet3".into()
            },
            true
        )]
    );
    assert!(
        p.take_sent().is_empty(),
        "no new boot: no announcements again"
    );
    // Someone on another port announces the guest's address: refused.
    let garp = frames::gratuitous_arp(VM);
    assert_eq!(
        p.frame(&garp),
        Verdict::Pass,
        "synjitsu's port cannot tell where from"
    );
    assert_eq!(
        p.frame_on("vnet9", &garp),
        Verdict::Drop(DropReason::SpoofedAnnouncement)
    );
    assert!(p.take_heard().is_empty());
    assert_eq!(phase(&p), VmPhase::Booting);
    assert!(p.steered(VM_MAC));
    assert_eq!(p.hold().held_now(), 1);
    // The guest's own, from its port: the hold ends and the fleet hears of it.
    assert_eq!(p.frame(&garp), Verdict::Pass);
    assert_eq!(p.frame_on("vnet3", &garp), Verdict::Announced);
    assert_eq!(
        p.take_heard(),
        [Event::GuestAnnounced { name: "www".into() }]
    );
    assert!(!p.steered(VM_MAC));
    assert_eq!(phase(&p), VmPhase::Handover);
}
