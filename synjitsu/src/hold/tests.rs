//! The core's rules, driven with synthetic `Instant`s and the static frames of
//! [`crate::wire::tests`]: no clock, no socket. Shared with other modules' tests (`core`,
//! `booting`, `drain_tx`).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use shared_proto::{
    ClientMessage, ErrorCode, Event, Handover, HandoverVia, Mac, Phase, VmIdentity, VmStatus,
};

use super::*;
use crate::wire::tests::{NS, SYN_V4, SYN_V4_PARTIAL, SYN_V6, WHO_HAS};
use crate::wire::{ArpOp, ArpRepr, NdpKind, TcpOut};
pub(crate) fn vm_mac() -> Mac {
    "02:77:00:00:01:10".parse().unwrap()
}

pub(crate) fn own_mac() -> Mac {
    "02:53:59:4a:00:01".parse().unwrap()
}

pub(crate) fn www(handover: Handover) -> VmIdentity {
    VmIdentity {
        name: "www".into(),
        mac: vm_mac(),
        ipv4: "10.77.1.10".parse().unwrap(),
        ipv6: Some("fd77:1::10".parse().unwrap()),
        handover,
        port: None,
        announces_listening: false,
    }
}

pub(crate) fn core() -> Hold {
    let mut cfg = Config::new(own_mac());
    cfg.probe_v4 = Some("10.77.1.250".parse().unwrap());
    cfg.probe_v6 = Some("fd77:1::fa".parse().unwrap());
    cfg.xenstore_off = None;
    Hold::new(cfg)
}

pub(crate) fn booting(h: &mut Hold, now: Instant, handover: Handover) {
    h.on_control(now, &ClientMessage::Booting { vm: www(handover) })
        .unwrap();
}

/// A second VM, `db` (10.77.1.11, MAC ..:11, no IPv6), declared booting.
pub(crate) fn booting_db(h: &mut Hold, now: Instant) {
    let mut db = www(Handover::Wire);
    db.name = "db".into();
    db.mac = "02:77:00:00:01:11".parse().unwrap();
    db.ipv4 = "10.77.1.11".parse().unwrap();
    db.ipv6 = None;
    h.on_control(now, &ClientMessage::Booting { vm: db })
        .unwrap();
}

fn stopped(h: &mut Hold, now: Instant) {
    h.on_control(
        now,
        &ClientMessage::Stopped {
            vm: www(Handover::Wire),
        },
    )
    .unwrap();
}

pub(crate) fn drain_tx(h: &mut Hold) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while h.poll_transmit(&mut buf) {
        out.push(std::mem::take(&mut buf));
    }
    out
}

pub(crate) fn drain_events(h: &mut Hold) -> Vec<Event> {
    std::iter::from_fn(|| h.poll_event()).collect()
}

pub(crate) fn fdb_ops(h: &mut Hold) -> Vec<FdbOp> {
    std::iter::from_fn(|| h.poll_fdb()).collect()
}

fn parsed(f: &[u8]) -> wire::Frame<'_> {
    wire::parse(f, false).unwrap()
}

/// [`SYN_V4`] with `edit` applied to its bytes, and both checksums fixed after it.
pub(crate) fn edited_syn_v4(edit: impl FnOnce(&mut [u8; 74])) -> [u8; 74] {
    let mut f = SYN_V4;
    edit(&mut f);
    f[24] = 0;
    f[25] = 0;
    let c = !wire::fold(wire::sum_words(&f[14..34], 0));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    assert!(wire::fix_tcp_checksum(&mut f));
    f
}

/// The guest's own gratuitous ARP (request form, as `arping -U` sends it).
pub(crate) fn guest_garp() -> Vec<u8> {
    let mut f = vec![0u8; 42];
    wire::write_eth(&mut f, Mac::BROADCAST, vm_mac(), wire::ETHERTYPE_ARP);
    wire::write_arp(
        &mut f,
        &ArpRepr {
            op: ArpOp::Request,
            sender_mac: vm_mac(),
            sender_ip: "10.77.1.10".parse().unwrap(),
            target_mac: Mac::BROADCAST,
            target_ip: "10.77.1.10".parse().unwrap(),
        },
    );
    f
}

/// The guest's answer to a probe: a SYN-ACK (or RST) from the guest's port to the probe's.
pub(crate) fn probe_answer(probe: &[u8], flags: u8) -> Vec<u8> {
    let Packet::Tcp(p) = parsed(probe).packet else {
        panic!("not a probe")
    };
    let mut out = vec![0u8; wire::TCP_OUT_MAX];
    let n = wire::write_tcp(
        &mut out,
        &TcpOut {
            eth_src: vm_mac(),
            eth_dst: own_mac(),
            src_ip: p.dst_ip,
            dst_ip: p.src_ip,
            src_port: p.dst_port,
            dst_port: p.src_port,
            seq: 77,
            ack: p.seq.wrapping_add(1),
            flags,
            window: 0,
            options: &[],
        },
    );
    out.truncate(n);
    out
}

#[test]
fn drop_reason_index_is_its_position_in_all() {
    for (i, r) in DropReason::all().enumerate() {
        assert_eq!(r.index(), i, "{}", r.as_str());
    }
}

#[test]
fn booting_sends_gratuitous_arp_and_na_three_times_over_200ms() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let ops = fdb_ops(&mut h);
    assert_eq!(ops.len(), 1);
    assert_eq!((ops[0].mac, ops[0].action), (vm_mac(), FdbAction::Steer));
    let mut sent = drain_tx(&mut h);
    let mut now = t0;
    while let Some(at) = h.poll_at() {
        assert!(at >= now);
        now = at;
        h.handle_timeout(now);
        sent.extend(drain_tx(&mut h));
    }
    assert!(now - t0 <= Duration::from_millis(200), "{:?}", now - t0);
    let garps: Vec<_> = sent.iter().filter(|f| f.len() == 60).collect();
    let nas: Vec<_> = sent.iter().filter(|f| f.len() == 86).collect();
    assert_eq!((garps.len(), nas.len()), (3, 3), "{sent:02x?}");
    for g in garps {
        let f = parsed(g);
        assert_eq!((f.eth.dst, f.eth.src), (Mac::BROADCAST, vm_mac()));
        let Packet::Arp(a) = f.packet else { panic!() };
        assert_eq!((a.op, a.sender_mac), (ArpOp::Reply, vm_mac()));
    }
    for n in nas {
        let Packet::Ndp(na) = parsed(n).packet else {
            panic!()
        };
        assert!(matches!(
            na.kind,
            NdpKind::Advertisement {
                override_: true,
                solicited: false,
                ..
            }
        ));
    }
    assert_eq!(h.counters().garp_sent, 3);
}

#[test]
fn arp_and_ns_for_the_vm_are_answered_with_its_mac() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    drain_tx(&mut h);
    assert_eq!(
        h.on_frame(t0, &WHO_HAS, FrameMeta::default()),
        Verdict::Answered
    );
    assert_eq!(h.on_frame(t0, &NS, FrameMeta::default()), Verdict::Answered);
    let sent = drain_tx(&mut h);
    assert_eq!(sent.len(), 2);
    let Packet::Arp(a) = parsed(&sent[0]).packet else {
        panic!()
    };
    assert_eq!((a.op, a.sender_mac), (ArpOp::Reply, vm_mac()));
    assert_eq!(a.target_ip, "10.77.1.2".parse::<Ipv4Addr>().unwrap());
    let f = parsed(&sent[1]);
    assert_eq!(f.eth.dst.to_string(), "02:77:00:00:01:02");
    let Packet::Ndp(na) = f.packet else { panic!() };
    assert_eq!(na.lladdr, Some(vm_mac()));
    assert!(matches!(
        na.kind,
        NdpKind::Advertisement {
            solicited: true,
            ..
        }
    ));
    // Unknown addresses, DAD and the guest's own questions are not answered.
    let mut dad = NS;
    dad[22..38].fill(0);
    assert_eq!(
        h.on_frame(
            t0,
            &dad,
            FrameMeta {
                checksum: Checksum::Valid
            }
        ),
        Verdict::Pass
    );
    let mut other = WHO_HAS;
    other[41] = 11;
    assert_eq!(h.on_frame(t0, &other, FrameMeta::default()), Verdict::Pass);
    assert!(drain_tx(&mut h).is_empty());
}

#[test]
fn the_probe_addresses_are_answered_with_synjitsus_own_mac() {
    let mut h = core();
    let t0 = Instant::now();
    let mut who = WHO_HAS;
    who[41] = 250;
    assert_eq!(
        h.on_frame(t0, &who, FrameMeta::default()),
        Verdict::Answered
    );
    let sent = drain_tx(&mut h);
    let Packet::Arp(a) = parsed(&sent[0]).packet else {
        panic!()
    };
    assert_eq!(a.sender_mac, own_mac());
}

#[test]
fn a_syn_is_held_once_and_its_retransmits_are_deduplicated() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    drain_events(&mut h);
    assert_eq!(h.on_frame(t0, &SYN_V4, FrameMeta::default()), Verdict::Held);
    for i in 1..4 {
        let t = t0 + Duration::from_secs(i);
        assert_eq!(
            h.on_frame(t, &SYN_V4, FrameMeta::default()),
            Verdict::Duplicate
        );
    }
    assert_eq!(h.held_now(), 1);
    assert_eq!(h.counters().retransmit_dedup, 3);
    assert_eq!(
        drain_events(&mut h),
        vec![Event::SynHeld {
            name: "www".into(),
            held: 1
        }]
    );
    // A new attempt on the same 4-tuple (another ISN) is another SYN.
    let mut again = SYN_V4;
    again[41] ^= 1;
    assert!(wire::fix_tcp_checksum(&mut again));
    assert_eq!(h.on_frame(t0, &again, FrameMeta::default()), Verdict::Held);
    assert_eq!(h.held_now(), 2);
}

#[test]
fn checksums_partial_are_completed_bad_are_dropped() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    // Unknown status: the partial checksum looks bad, and is.
    assert_eq!(
        h.on_frame(t0, &SYN_V4_PARTIAL, FrameMeta::default()),
        Verdict::Drop(DropReason::BadChecksum)
    );
    assert_eq!(h.counters().drops_for(DropReason::BadChecksum), 1);
    let partial = FrameMeta {
        checksum: Checksum::Partial,
    };
    assert_eq!(h.on_frame(t0, &SYN_V4_PARTIAL, partial), Verdict::Held);
    assert_eq!(h.counters().checksums_completed, 1);
    // Hand it over and look at what goes to the guest.
    h.on_control(t0, &ClientMessage::Ready { name: "www".into() })
        .unwrap();
    let op = fdb_ops(&mut h).pop().unwrap();
    assert_eq!(op.action, FdbAction::Release);
    drain_tx(&mut h);
    h.on_fdb_done(t0, op.id);
    let sent = drain_tx(&mut h);
    assert_eq!(sent.len(), 1);
    assert_eq!(&sent[0][50..52], &0x4c76u16.to_be_bytes());
    assert_eq!(&sent[0][..50], &SYN_V4_PARTIAL[..50]);
    assert_eq!(&sent[0][52..], &SYN_V4_PARTIAL[52..]);
}

#[test]
fn refusing_when_full_the_bounds_per_vm_and_in_total_are_enforced() {
    let mut cfg = Config::new(own_mac());
    cfg.when_full = WhenFull::Refuse;
    cfg.max_held_per_vm = Some(2);
    cfg.max_held = Some(3);
    let mut h = Hold::new(cfg);
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    booting_db(&mut h, t0);
    let syn = |port: u16, ip_last: u8, mac_last: u8| {
        edited_syn_v4(|f| {
            f[5] = mac_last;
            f[33] = ip_last;
            f[34..36].copy_from_slice(&port.to_be_bytes());
        })
    };
    let m = FrameMeta::default();
    assert_eq!(h.on_frame(t0, &syn(1, 10, 0x10), m), Verdict::Held);
    assert_eq!(h.on_frame(t0, &syn(2, 10, 0x10), m), Verdict::Held);
    assert_eq!(
        h.on_frame(t0, &syn(3, 10, 0x10), m),
        Verdict::Drop(DropReason::VmFull)
    );
    assert_eq!(h.on_frame(t0, &syn(4, 11, 0x11), m), Verdict::Held);
    assert_eq!(
        h.on_frame(t0, &syn(5, 11, 0x11), m),
        Verdict::Drop(DropReason::TableFull)
    );
    assert_eq!(h.held_now(), 3);
}

#[test]
fn refusing_when_full_a_retransmitting_client_displaces_a_spoofed_syn() {
    let mut cfg = Config::new(own_mac());
    cfg.when_full = WhenFull::Refuse;
    cfg.max_held_per_vm = Some(4);
    cfg.garp_count = 0;
    let mut h = Hold::new(cfg);
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let syn = |src_last: u8, port: u16| {
        edited_syn_v4(|f| {
            f[29] = src_last;
            f[34..36].copy_from_slice(&port.to_be_bytes());
        })
    };
    let m = FrameMeta::default();
    // A real client's SYN held early, and retransmitted once: it is protected.
    let early = syn(2, 1000);
    assert_eq!(h.on_frame(t0, &early, m), Verdict::Held);
    assert_eq!(h.on_frame(t0, &early, m), Verdict::Duplicate);
    // The flood fills the table.
    for p in 1..=3 {
        assert_eq!(h.on_frame(t0, &syn(200, p), m), Verdict::Held);
    }
    let client = syn(3, 2000);
    assert_eq!(
        h.on_frame(t0, &client, m),
        Verdict::Drop(DropReason::VmFull)
    );
    for p in 4..100 {
        assert_eq!(
            h.on_frame(t0, &syn(200, p), m),
            Verdict::Drop(DropReason::VmFull)
        );
    }
    // One second later the client retransmits: it takes a spoofed SYN's place.
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(h.on_frame(t1, &client, m), Verdict::Held);
    assert_eq!(h.counters().drops_for(DropReason::Evicted), 1);
    assert_eq!(h.held_now(), 4);
    // Flood SYNs never retransmitted stay refused even when repeated with new ISNs.
    assert_eq!(
        h.on_frame(t1, &syn(200, 500), m),
        Verdict::Drop(DropReason::VmFull)
    );
    // Nothing was sent for the evicted one (its source is likely spoofed).
    drain_tx(&mut h);
    // Both real clients are handed over.
    h.on_control(t1, &ClientMessage::Ready { name: "www".into() })
        .unwrap();
    while let Some(op) = h.poll_fdb() {
        h.on_fdb_done(t1, op.id);
    }
    let sent = drain_tx(&mut h);
    assert!(sent.contains(&early.to_vec()) && sent.contains(&client.to_vec()));
    assert_eq!(sent.len(), 4);
}

#[test]
fn held_syns_time_out_with_a_rst_to_the_client() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    h.on_frame(t0, &SYN_V6, FrameMeta::default());
    let mut now = t0;
    let mut sent = Vec::new();
    while let Some(at) = h.poll_at() {
        now = at;
        h.handle_timeout(now);
        sent.extend(drain_tx(&mut h));
    }
    assert_eq!(now - t0, Duration::from_secs(10));
    let rst = sent.last().unwrap();
    let f = parsed(rst);
    assert_eq!(
        (f.eth.src, f.eth.dst.to_string().as_str()),
        (vm_mac(), "02:77:00:00:01:02")
    );
    let Packet::Tcp(t) = f.packet else { panic!() };
    assert_eq!(t.flags, wire::tcp_flags::RST | wire::tcp_flags::ACK);
    assert_eq!(t.ack, 3_916_296_312u32.wrapping_add(1));
    assert_eq!((t.src_port, t.dst_port), (80, 39004));
    assert_eq!(h.held_now(), 0);
    assert_eq!(h.counters().drops_for(DropReason::HoldTimeout), 1);
    assert_eq!(h.counters().rst_hold_timeout, 1);
}

#[test]
fn oldest_held_is_the_capture_time_of_the_syn_held_longest() {
    let mut h = core();
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_secs(3);
    booting(&mut h, t0, Handover::Wire);
    assert_eq!(h.oldest_held(), None);
    h.on_frame(t1, &SYN_V6, FrameMeta::default());
    h.on_frame(t1 + Duration::from_secs(1), &SYN_V4, FrameMeta::default());
    assert_eq!(h.held_now(), 2);
    assert_eq!(h.oldest_held(), Some(t1));
    h.handle_timeout(t1 + Duration::from_secs(10));
    assert_eq!(h.oldest_held(), Some(t1 + Duration::from_secs(1)));
    h.handle_timeout(t1 + Duration::from_secs(11));
    assert_eq!(h.oldest_held(), None);
}

#[test]
fn announce_then_probe_then_resend_on_syn_ack() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    h.on_frame(t0, &SYN_V6, FrameMeta::default());
    drain_tx(&mut h);
    fdb_ops(&mut h);
    drain_events(&mut h);
    let t1 = t0 + Duration::from_millis(300);
    assert_eq!(
        h.on_frame(t1, &guest_garp(), FrameMeta::default()),
        Verdict::Announced
    );
    assert_eq!(
        drain_events(&mut h),
        vec![Event::GuestAnnounced { name: "www".into() }]
    );
    // No more answering for it.
    assert_eq!(
        h.on_frame(t1, &WHO_HAS, FrameMeta::default()),
        Verdict::Pass
    );
    let rel = fdb_ops(&mut h);
    assert_eq!(rel[0].action, FdbAction::Release);
    assert!(
        drain_tx(&mut h).is_empty(),
        "nothing before the release is done"
    );
    h.on_fdb_done(t1, rel[0].id);
    let probes = drain_tx(&mut h);
    assert_eq!(probes.len(), 2, "one probe per family and port");
    for p in &probes {
        let f = parsed(p);
        assert_eq!((f.eth.src, f.eth.dst), (own_mac(), vm_mac()));
        let Packet::Tcp(t) = f.packet else { panic!() };
        assert!(t.is_syn() && wire::tcp_checksum_ok(p, &t));
        assert!(h.cfg.is_probe_ip(t.src_ip));
        assert_eq!(t.dst_port, 80);
    }
    // Not listening yet: RSTs, then a probe again a quarter of a millisecond later.
    let v4_probe = probes.iter().find(|p| p[12] == 0x08).unwrap().clone();
    let rst = probe_answer(&v4_probe, wire::tcp_flags::RST | wire::tcp_flags::ACK);
    assert_eq!(
        h.on_frame(t1, &rst, FrameMeta::default()),
        Verdict::ProbeAnswer
    );
    assert_eq!(h.poll_at(), Some(t1 + Duration::from_micros(250)));
    h.handle_timeout(t1 + Duration::from_micros(250));
    assert_eq!(drain_tx(&mut h).len(), 2);
    // Listening on IPv4 (before the next probes are due, 0.5 ms after the second): reset the
    // probe, re-send the IPv4 SYN unchanged.
    let t2 = t1 + Duration::from_micros(600);
    let synack = probe_answer(&v4_probe, wire::tcp_flags::SYN | wire::tcp_flags::ACK);
    assert_eq!(
        h.on_frame(t2, &synack, FrameMeta::default()),
        Verdict::ProbeAnswer
    );
    let sent = drain_tx(&mut h);
    assert_eq!(sent.len(), 2);
    let Packet::Tcp(r) = parsed(&sent[0]).packet else {
        panic!()
    };
    assert_eq!(r.flags, wire::tcp_flags::RST);
    assert_eq!(sent[1], SYN_V4.to_vec());
    assert_eq!(
        drain_events(&mut h),
        vec![Event::Handover {
            name: "www".into(),
            count: 1,
            via: HandoverVia::Wire
        }]
    );
    assert_eq!(h.held_now(), 1);
    assert_eq!(h.vms().next().unwrap().1, VmPhase::Handover);
    // Ready: the rest goes at once, without probing.
    h.on_control(t2, &ClientMessage::Ready { name: "www".into() })
        .unwrap();
    let sent = drain_tx(&mut h);
    assert_eq!(sent, vec![SYN_V6.to_vec()]);
    assert_eq!(h.vms().next().unwrap().1, VmPhase::Running);
    assert_eq!(h.poll_at(), None);
    assert_eq!(h.counters().handed_over_wire, 2);
}

#[test]
fn probes_start_at_the_announcement_then_back_off_from_fast_to_slow() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    drain_tx(&mut h);
    fdb_ops(&mut h);
    let t1 = t0 + Duration::from_millis(300);
    h.on_frame(t1, &guest_garp(), FrameMeta::default());
    let rel = fdb_ops(&mut h);
    h.on_fdb_done(t1, rel[0].id);
    assert_eq!(drain_tx(&mut h).len(), 1, "the first probe goes at once");
    // The guest never listens: the gaps between probes, from the timer alone.
    let mut sent_at = vec![t1];
    while sent_at.len() < 10 {
        let at = h.poll_at().expect("a next probe is due");
        h.handle_timeout(at);
        if !drain_tx(&mut h).is_empty() {
            sent_at.push(at);
        }
    }
    let gaps: Vec<u128> = sent_at
        .windows(2)
        .map(|w| (w[1] - w[0]).as_micros())
        .collect();
    assert_eq!(gaps, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000, 5000]);
}

#[test]
fn without_probe_addresses_the_wire_waits_for_ready() {
    let mut cfg = Config::new(own_mac());
    cfg.garp_count = 0;
    let mut h = Hold::new(cfg);
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    h.on_frame(t0, &guest_garp(), FrameMeta::default());
    let rel = fdb_ops(&mut h).pop().unwrap();
    h.on_fdb_done(t0, rel.id);
    assert!(drain_tx(&mut h).is_empty());
    h.on_control(t0, &ClientMessage::Ready { name: "www".into() })
        .unwrap();
    assert_eq!(drain_tx(&mut h), vec![SYN_V4.to_vec()]);
}

#[test]
fn stopped_vms_hold_and_ask_to_be_woken_once_a_second() {
    let mut h = core();
    let t0 = Instant::now();
    stopped(&mut h, t0);
    assert_eq!(fdb_ops(&mut h)[0].action, FdbAction::Steer);
    assert!(
        drain_tx(&mut h).is_empty(),
        "no gratuitous ARP for a stopped VM"
    );
    assert_eq!(h.on_frame(t0, &SYN_V4, FrameMeta::default()), Verdict::Held);
    assert_eq!(
        h.on_frame(t0, &WHO_HAS, FrameMeta::default()),
        Verdict::Answered
    );
    let t1 = t0 + Duration::from_millis(1000);
    assert_eq!(
        h.on_frame(t1, &SYN_V4, FrameMeta::default()),
        Verdict::Duplicate
    );
    let wakes = drain_events(&mut h)
        .into_iter()
        .filter(|e| matches!(e, Event::WakeRequest { .. }))
        .count();
    assert_eq!(wakes, 2);
    // Booting keeps what is held.
    booting(&mut h, t1, Handover::Wire);
    assert_eq!(h.held_now(), 1);
    assert_eq!(h.vms().next().unwrap().1, VmPhase::Booting);
}

#[test]
fn sync_forgets_absent_vms_with_rsts_and_keeps_present_ones() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    drain_tx(&mut h);
    let present = vec![VmStatus {
        vm: www(Handover::Wire),
        phase: Phase::Booting,
    }];
    h.on_control(t0, &ClientMessage::Sync { vms: present })
        .unwrap();
    assert_eq!(h.held_now(), 1, "a VM present keeps what it holds");
    assert!(drain_tx(&mut h).is_empty(), "and is not a new boot");
    h.on_control(t0, &ClientMessage::Sync { vms: vec![] })
        .unwrap();
    assert_eq!(h.held_now(), 0);
    assert_eq!(h.counters().rst_vm_forgotten, 1);
    let sent = drain_tx(&mut h);
    let Packet::Tcp(t) = parsed(&sent[0]).packet else {
        panic!()
    };
    assert_eq!(t.flags & wire::tcp_flags::RST, wire::tcp_flags::RST);
    assert!(
        fdb_ops(&mut h)
            .iter()
            .any(|o| o.action == FdbAction::Release)
    );
    assert_eq!(h.vms().count(), 0);
    assert_eq!(
        h.on_control(t0, &ClientMessage::Ready { name: "www".into() })
            .unwrap_err()
            .code,
        ErrorCode::UnknownVm
    );
}

#[test]
fn xenstore_vms_write_each_syn_once_and_stop_when_managed() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Xenstore { domid: 7 });
    let open = h.poll_store().unwrap();
    assert!(matches!(open, StoreOp::Open { domid: 7, ref ips, .. } if ips.len() == 2));
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    let Some(StoreOp::Write {
        id,
        domid,
        key,
        syn,
        ..
    }) = h.poll_store()
    else {
        panic!("no write")
    };
    assert!(
        h.poll_store().is_none(),
        "a retransmit is not written twice"
    );
    assert_eq!(domid, 7);
    assert_eq!(key.conn_path(), "/ip/10-77-1-10/80/10-77-1-2/40436");
    assert_eq!((syn.tx_wnd, syn.sequence), (64240, 1_727_484_408));
    assert!(syn.tx_isn >= crate::store::layout::TX_ISN_BASE);
    drain_events(&mut h);
    h.on_store_done(
        t0,
        StoreDone {
            id,
            vm: "www".into(),
            key,
            outcome: StoreOutcome::Written,
        },
    );
    assert_eq!(
        drain_events(&mut h),
        vec![Event::Handover {
            name: "www".into(),
            count: 1,
            via: HandoverVia::Xenstore
        }]
    );
    // A second SYN finds the address managed: it goes on the wire once the guest is up.
    h.on_frame(t0, &SYN_V6, FrameMeta::default());
    let Some(StoreOp::Write { id, key, .. }) = h.poll_store() else {
        panic!()
    };
    h.on_store_done(
        t0,
        StoreDone {
            id,
            vm: "www".into(),
            key,
            outcome: StoreOutcome::Managed,
        },
    );
    assert_eq!(h.counters().xenstore_skipped_managed, 1);
    drain_tx(&mut h);
    h.on_frame(t0, &guest_garp(), FrameMeta::default());
    assert_eq!(h.held_now(), 1, "the written one is the guest's now");
    let rel = fdb_ops(&mut h).pop().unwrap();
    h.on_fdb_done(t0, rel.id);
    let probes = drain_tx(&mut h);
    assert_eq!(probes.len(), 1, "the managed one is probed for on the wire");
    let Packet::Tcp(t) = parsed(&probes[0]).packet else {
        panic!()
    };
    assert!(t.dst_ip.is_ipv6() && t.dst_port == 80 && t.is_syn());
}

#[test]
fn sync_running_hands_over_at_once_and_sync_stopped_asks_again_for_a_wake_up() {
    let mut h = core();
    let t0 = Instant::now();
    stopped(&mut h, t0);
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    drain_events(&mut h);
    // A reconnect within the wake interval: the wake request may have been lost with the
    // old connection, so it is sent again.
    let t1 = t0 + Duration::from_millis(10);
    let stopped = vec![VmStatus {
        vm: www(Handover::Wire),
        phase: Phase::Stopped,
    }];
    h.on_control(t1, &ClientMessage::Sync { vms: stopped })
        .unwrap();
    assert_eq!(
        drain_events(&mut h),
        vec![Event::WakeRequest { name: "www".into() }]
    );
    // jitsu-dns says it runs (it started it meanwhile): hand over without probing.
    let running = vec![VmStatus {
        vm: www(Handover::Wire),
        phase: Phase::Running,
    }];
    h.on_control(t1, &ClientMessage::Sync { vms: running })
        .unwrap();
    drain_tx(&mut h);
    let ops = fdb_ops(&mut h);
    let rel = ops
        .iter()
        .find(|o| o.action == FdbAction::Release)
        .expect("released");
    h.on_fdb_done(t1, rel.id);
    assert_eq!(drain_tx(&mut h), vec![SYN_V4.to_vec()]);
    assert_eq!(h.counters().probes_sent, 0);
    assert_eq!(h.vms().next().unwrap().1, VmPhase::Running);
    // Running: nothing is intercepted any more.
    assert_eq!(
        h.on_frame(t1, &WHO_HAS, FrameMeta::default()),
        Verdict::Pass
    );
    assert_eq!(h.on_frame(t1, &SYN_V6, FrameMeta::default()), Verdict::Pass);
}

#[test]
fn a_sync_saying_booting_does_not_hijack_a_guest_that_announced_itself() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    h.on_frame(t0, &guest_garp(), FrameMeta::default());
    while let Some(op) = h.poll_fdb() {
        h.on_fdb_done(t0, op.id);
    }
    drain_events(&mut h);
    drain_tx(&mut h);
    let vms = vec![VmStatus {
        vm: www(Handover::Wire),
        phase: Phase::Booting,
    }];
    h.on_control(t0, &ClientMessage::Sync { vms }).unwrap();
    assert_eq!(
        drain_events(&mut h),
        vec![Event::GuestAnnounced { name: "www".into() }]
    );
    assert!(fdb_ops(&mut h).is_empty(), "not steered back");
    assert!(drain_tx(&mut h).is_empty(), "no gratuitous ARP");
    assert_eq!(h.on_frame(t0, &SYN_V4, FrameMeta::default()), Verdict::Pass);
    // A Booting request itself is a new boot (the VM was restarted): stand in again.
    booting(&mut h, t0, Handover::Wire);
    assert_eq!(fdb_ops(&mut h)[0].action, FdbAction::Steer);
    assert_eq!(h.on_frame(t0, &SYN_V4, FrameMeta::default()), Verdict::Held);
}

#[test]
fn a_xenstore_vms_nodes_are_opened_at_each_boot_sealed_at_each_stop_and_closed_when_forgotten() {
    let mut h = core();
    let t0 = Instant::now();
    let ips: Vec<std::net::IpAddr> =
        vec!["10.77.1.10".parse().unwrap(), "fd77:1::10".parse().unwrap()];
    booting(&mut h, t0, Handover::Xenstore { domid: 7 });
    assert_eq!(
        h.poll_store(),
        Some(StoreOp::Open {
            vm: "www".into(),
            domid: 7,
            ips: ips.clone()
        })
    );
    // The same boot told again (a sync after a reconnect) is not a new boot.
    booting(&mut h, t0, Handover::Xenstore { domid: 7 });
    assert_eq!(h.poll_store(), None);
    // Stopped, it stays declared: its nodes stay, sealed (dom0's alone: domain 7 is gone and
    // its id may go to another guest before this VM's next boot).
    h.on_control(
        t0,
        &ClientMessage::Stopped {
            vm: www(Handover::Xenstore { domid: 7 }),
        },
    )
    .unwrap();
    assert_eq!(
        h.poll_store(),
        Some(StoreOp::Seal {
            vm: "www".into(),
            ips: ips.clone()
        })
    );
    // The next boot is another domain.
    booting(&mut h, t0, Handover::Xenstore { domid: 9 });
    assert_eq!(
        h.poll_store(),
        Some(StoreOp::Open {
            vm: "www".into(),
            domid: 9,
            ips: ips.clone()
        })
    );
    h.on_control(t0, &ClientMessage::Sync { vms: vec![] })
        .unwrap();
    assert_eq!(
        h.poll_store(),
        Some(StoreOp::Close {
            vm: "www".into(),
            ips
        })
    );
    // A wire VM has no nodes to open or close.
    booting(&mut h, t0, Handover::Wire);
    h.on_control(t0, &ClientMessage::Sync { vms: vec![] })
        .unwrap();
    assert_eq!(h.poll_store(), None);
}

#[test]
fn xenstore_booting_is_refused_when_xenstore_is_off() {
    let mut h = Hold::new(Config::new(own_mac()));
    let err = h
        .on_control(
            Instant::now(),
            &ClientMessage::Booting {
                vm: www(Handover::Xenstore { domid: 3 }),
            },
        )
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Failed);
    assert!(err.message.contains("xenstore"), "{}", err.message);
    assert_eq!(h.vms().count(), 0);
}

#[test]
fn a_second_vm_cannot_take_a_first_ones_address() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let mut thief = www(Handover::Wire);
    thief.name = "thief".into();
    thief.mac = "02:77:00:00:01:99".parse().unwrap();
    thief.ipv6 = None;
    let err = h
        .on_control(t0, &ClientMessage::Booting { vm: thief })
        .unwrap_err();
    assert!(
        err.message.contains("already belongs to VM www"),
        "{}",
        err.message
    );
}

/// An ARP frame from the guest's MAC, to `eth_dst`.
fn guest_arp(op: ArpOp, eth_dst: Mac, target_mac: Mac, target_ip: &str) -> Vec<u8> {
    let mut f = vec![0u8; 42];
    wire::write_eth(&mut f, eth_dst, vm_mac(), wire::ETHERTYPE_ARP);
    wire::write_arp(
        &mut f,
        &ArpRepr {
            op,
            sender_mac: vm_mac(),
            sender_ip: "10.77.1.10".parse().unwrap(),
            target_mac,
            target_ip: target_ip.parse().unwrap(),
        },
    );
    f
}

/// The guest's neighbour advertisement for its IPv6 address: unsolicited to all nodes, or
/// solicited, to the client.
fn guest_na(solicited: bool) -> Vec<u8> {
    let mut f = vec![0u8; crate::garp::MAX_LEN];
    let to = if solicited {
        crate::garp::NaTo::Asker {
            ip: "fd77:1::2".parse().unwrap(),
            mac: "02:77:00:00:01:02".parse().unwrap(),
        }
    } else {
        crate::garp::NaTo::AllNodes
    };
    let n =
        crate::garp::neighbour_advertisement(&mut f, vm_mac(), "fd77:1::10".parse().unwrap(), to);
    f.truncate(n);
    f
}

/// The VM booting with its bridge port named.
fn booting_on(h: &mut Hold, now: Instant, port: &str) {
    let mut vm = www(Handover::Wire);
    vm.port = Some(port.into());
    h.on_control(now, &ClientMessage::Booting { vm }).unwrap();
}

fn phase(h: &Hold) -> VmPhase {
    h.vms().next().unwrap().1
}

#[test]
fn only_the_guests_own_gratuitous_arp_or_unsolicited_na_ends_the_stand_in() {
    let t0 = Instant::now();
    let gateway = "10.77.1.1";
    let client: Mac = "02:77:00:00:01:02".parse().unwrap();
    // Frames that show the guest's kernel runs, not that it listens.
    let not_announcements = [
        (
            "an ARP request for its gateway",
            guest_arp(ArpOp::Request, Mac::BROADCAST, Mac([0; 6]), gateway),
        ),
        (
            "its ARP answer to a client",
            guest_arp(ArpOp::Reply, client, client, "10.77.1.2"),
        ),
        ("its solicited NA to a client", guest_na(true)),
    ];
    for (what, f) in &not_announcements {
        let mut h = core();
        booting(&mut h, t0, Handover::Wire);
        h.on_frame(t0, &SYN_V4, FrameMeta::default());
        drain_events(&mut h);
        assert_eq!(
            h.on_frame(t0, f, FrameMeta::default()),
            Verdict::Pass,
            "{what}"
        );
        assert_eq!(phase(&h), VmPhase::Booting, "{what}");
        assert_eq!(h.held_now(), 1, "{what}");
        assert!(drain_events(&mut h).is_empty(), "{what}");
    }
    let announcements = [
        ("arping -U (request form)", guest_garp()),
        (
            "arping -A (reply form)",
            guest_arp(ArpOp::Reply, Mac::BROADCAST, vm_mac(), "10.77.1.10"),
        ),
        ("an unsolicited NA", guest_na(false)),
    ];
    for (what, f) in &announcements {
        let mut h = core();
        booting(&mut h, t0, Handover::Wire);
        assert_eq!(
            h.on_frame(t0, f, FrameMeta::default()),
            Verdict::Announced,
            "{what}"
        );
        assert_eq!(phase(&h), VmPhase::Handover, "{what}");
    }
}

#[test]
fn with_its_port_named_only_an_announcement_arriving_on_that_port_counts() {
    let t0 = Instant::now();
    for (what, f) in [
        ("gratuitous ARP", guest_garp()),
        ("unsolicited NA", guest_na(false)),
    ] {
        let mut h = core();
        booting_on(&mut h, t0, "vnet3");
        h.on_frame(t0, &SYN_V4, FrameMeta::default());
        drain_events(&mut h);
        // synjitsu's own port sees it without knowing where it came from: not decided there.
        assert_eq!(
            h.on_frame(t0, &f, FrameMeta::default()),
            Verdict::Pass,
            "{what}"
        );
        assert_eq!(phase(&h), VmPhase::Booting, "{what}");
        // The watcher's copy from another port: spoofed.
        assert_eq!(
            h.on_ingress(t0, &f, FrameMeta::default(), "vnet9"),
            Verdict::Drop(DropReason::SpoofedAnnouncement),
            "{what}"
        );
        assert_eq!(phase(&h), VmPhase::Booting, "{what}");
        assert_eq!(h.held_now(), 1);
        assert!(drain_events(&mut h).is_empty(), "{what}");
        assert_eq!(h.counters().drops_for(DropReason::SpoofedAnnouncement), 1);
        // From the guest's own port: announced.
        assert_eq!(
            h.on_ingress(t0, &f, FrameMeta::default(), "vnet3"),
            Verdict::Announced,
            "{what}"
        );
        assert_eq!(
            drain_events(&mut h),
            vec![Event::GuestAnnounced { name: "www".into() }]
        );
        assert_eq!(h.counters().ingress_frames, 2);
        assert_eq!(h.counters().frames_with("announced"), 1);
    }
    // Whatever else the watcher sees is not its to count.
    let mut h = core();
    booting_on(&mut h, t0, "vnet3");
    assert_eq!(
        h.on_ingress(t0, &WHO_HAS, FrameMeta::default(), "vnet9"),
        Verdict::Pass
    );
    assert_eq!(
        h.on_ingress(t0, &[1, 2, 3], FrameMeta::default(), "vnet9"),
        Verdict::Pass
    );
    assert_eq!(h.counters().frames.iter().sum::<u64>(), 0);
    // A stopped VM has no port of its own (its old one may be another guest's): any port.
    let mut h = core();
    let mut vm = www(Handover::Wire);
    vm.port = Some("vnet3".into());
    h.on_control(t0, &ClientMessage::Stopped { vm }).unwrap();
    assert_eq!(
        h.on_ingress(t0, &guest_garp(), FrameMeta::default(), "vnet9"),
        Verdict::Pass
    );
    assert_eq!(
        h.on_frame(t0, &guest_garp(), FrameMeta::default()),
        Verdict::Announced
    );
}

#[test]
fn frames_for_a_steered_guest_go_out_of_its_port_and_its_syns_stay_held() {
    let t0 = Instant::now();
    let gateway_mac: Mac = "02:77:00:00:01:01".parse().unwrap();
    // The gateway's answer to the guest's question, sent to the guest's MAC.
    let mut reply = vec![0u8; 42];
    wire::write_eth(&mut reply, vm_mac(), gateway_mac, wire::ETHERTYPE_ARP);
    wire::write_arp(
        &mut reply,
        &ArpRepr {
            op: ArpOp::Reply,
            sender_mac: gateway_mac,
            sender_ip: "10.77.1.1".parse().unwrap(),
            target_mac: vm_mac(),
            target_ip: "10.77.1.10".parse().unwrap(),
        },
    );
    // A client's answer on a connection the guest opened, its checksum left to offload.
    let mut ack = SYN_V4_PARTIAL;
    ack[47] = 0x12;
    let partial = FrameMeta {
        checksum: Checksum::Partial,
    };

    // No port named: nowhere to send them.
    let mut h = core();
    booting(&mut h, t0, Handover::Wire);
    assert_eq!(h.on_frame(t0, &reply, FrameMeta::default()), Verdict::Pass);
    assert!(h.poll_to_guest(&mut Vec::new()).is_none());

    let mut h = core();
    booting_on(&mut h, t0, "vnet3");
    drain_tx(&mut h);
    assert_eq!(h.guest_macs(), vec![vm_mac()]);
    assert_eq!(
        h.on_frame(t0, &reply, FrameMeta::default()),
        Verdict::ToGuest
    );
    assert_eq!(h.on_frame(t0, &ack, partial), Verdict::ToGuest);
    // What synjitsu keeps is not passed: the client's SYN, and questions it answers.
    assert_eq!(h.on_frame(t0, &SYN_V4, FrameMeta::default()), Verdict::Held);
    assert_eq!(
        h.on_frame(t0, &WHO_HAS, FrameMeta::default()),
        Verdict::Answered
    );
    let mut buf = Vec::new();
    assert_eq!(h.poll_to_guest(&mut buf).as_deref(), Some("vnet3"));
    assert_eq!(buf, reply);
    assert_eq!(h.poll_to_guest(&mut buf).as_deref(), Some("vnet3"));
    let Packet::Tcp(t) = parsed(&buf).packet else {
        panic!()
    };
    assert!(wire::tcp_checksum_ok(&buf, &t), "the checksum is completed");
    assert!(h.poll_to_guest(&mut buf).is_none());
    assert_eq!(h.counters().frames_with("to_guest"), 2);
    assert_eq!(phase(&h), VmPhase::Booting);
    assert_eq!(h.held_now(), 1);
    // Until the bridge sends them to the guest itself again.
    let generation = h.guest_macs_generation();
    h.on_control(t0, &ClientMessage::Ready { name: "www".into() })
        .unwrap();
    assert_eq!(
        h.on_frame(t0, &reply, FrameMeta::default()),
        Verdict::ToGuest,
        "release pending"
    );
    while let Some(op) = h.poll_fdb() {
        h.on_fdb_done(t0, op.id);
    }
    assert_eq!(phase(&h), VmPhase::Running);
    assert_ne!(h.guest_macs_generation(), generation);
    assert!(h.guest_macs().is_empty());
    assert_eq!(h.on_frame(t0, &reply, FrameMeta::default()), Verdict::Pass);
}

#[test]
fn a_port_learnt_after_the_start_applies_from_then_on_and_changes_nothing_else() {
    let t0 = Instant::now();
    let port = |name: &str| ClientMessage::Port {
        name: name.into(),
        port: "vnet3".into(),
    };
    let mut h = core();
    let err = h.on_control(t0, &port("www")).unwrap_err();
    assert_eq!(err.code, ErrorCode::UnknownVm);
    booting(&mut h, t0, Handover::Wire);
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    drain_tx(&mut h);
    fdb_ops(&mut h);
    drain_events(&mut h);
    let generation = h.guest_macs_generation();
    h.on_control(t0, &port("www")).unwrap();
    assert_ne!(h.guest_macs_generation(), generation);
    assert_eq!(h.guest_macs(), vec![vm_mac()]);
    // Still the same boot: nothing re-sent, nothing re-steered, the SYN still held.
    assert!(drain_tx(&mut h).is_empty() && fdb_ops(&mut h).is_empty());
    assert_eq!((phase(&h), h.held_now()), (VmPhase::Booting, 1));
    assert_eq!(
        h.on_ingress(t0, &guest_garp(), FrameMeta::default(), "vnet9"),
        Verdict::Drop(DropReason::SpoofedAnnouncement)
    );
    assert_eq!(
        h.on_ingress(t0, &guest_garp(), FrameMeta::default(), "vnet3"),
        Verdict::Announced
    );
    // Learnt after the guest announced (the backend's report was slower than the guest):
    // taken, and harmless.
    let mut h = core();
    booting(&mut h, t0, Handover::Wire);
    fdb_ops(&mut h);
    assert_eq!(
        h.on_frame(t0, &guest_garp(), FrameMeta::default()),
        Verdict::Announced
    );
    h.on_control(t0, &port("www")).unwrap();
    assert_eq!(phase(&h), VmPhase::Handover);
    assert!(
        fdb_ops(&mut h)
            .iter()
            .all(|op| op.action == FdbAction::Release)
    );
}

#[test]
fn an_announcement_whose_two_copies_straddle_the_port_counts_once_and_only_from_that_port() {
    // A woken standby guest announces itself within ms of its start, while the `port` is on
    // its way: the watcher's copy comes before it (port unknown: left to synjitsu's copy),
    // synjitsu's own copy after it (port known: left to the watcher's copy).
    let t0 = Instant::now();
    let port = ClientMessage::Port {
        name: "www".into(),
        port: "vnet3".into(),
    };
    let mut h = core();
    booting(&mut h, t0, Handover::Wire);
    assert_eq!(
        h.on_ingress(t0, &guest_garp(), FrameMeta::default(), "vnet3"),
        Verdict::Pass
    );
    assert_eq!(phase(&h), VmPhase::Booting);
    h.on_control(t0, &port).unwrap();
    assert_eq!(phase(&h), VmPhase::Handover);
    assert_eq!(h.counters().guests_announced, 1);
    assert!(
        drain_events(&mut h).contains(&Event::GuestAnnounced { name: "www".into() }),
        "jitsu-dns is told"
    );
    // synjitsu's own copy, read last, does not count it again.
    assert_eq!(
        h.on_frame(t0, &guest_garp(), FrameMeta::default()),
        Verdict::Pass
    );
    assert_eq!(h.counters().guests_announced, 1);

    // From another port than the one then named, it stays refused.
    let mut h = core();
    booting(&mut h, t0, Handover::Wire);
    h.on_ingress(t0, &guest_garp(), FrameMeta::default(), "vnet9");
    h.on_control(t0, &port).unwrap();
    assert_eq!(
        (phase(&h), h.counters().guests_announced),
        (VmPhase::Booting, 0)
    );
    // And one seen in an earlier boot is forgotten by the next.
    let mut h = core();
    stopped(&mut h, t0);
    h.on_ingress(t0, &guest_garp(), FrameMeta::default(), "vnet3");
    booting(&mut h, t0, Handover::Wire);
    h.on_control(t0, &port).unwrap();
    assert_eq!(phase(&h), VmPhase::Booting);
}

/// The `i`th of many VMs, none of them `www`.
fn fleet_vm(i: usize) -> VmIdentity {
    VmIdentity {
        name: format!("v{i}"),
        mac: Mac([0x02, 0x78, 0, 0, (i >> 8) as u8, i as u8]),
        ipv4: Ipv4Addr::new(10, 77, 100 + (i / 250) as u8, 1 + (i % 250) as u8),
        ipv6: None,
        handover: Handover::Wire,
        port: None,
        announces_listening: false,
    }
}

fn sync_fleet(h: &mut Hold, now: Instant, n: usize, phase: Phase) {
    let vms = (0..n)
        .map(|i| VmStatus {
            vm: fleet_vm(i),
            phase,
        })
        .collect();
    h.on_control(now, &ClientMessage::Sync { vms }).unwrap();
}

#[test]
fn no_forwarding_change_is_dropped_however_many_vms_change_at_once() {
    let mut h = core();
    let t0 = Instant::now();
    sync_fleet(&mut h, t0, 5000, Phase::Stopped);
    let steers = fdb_ops(&mut h);
    assert_eq!(steers.len(), 5000);
    assert!(steers.iter().all(|o| o.action == FdbAction::Steer));
    sync_fleet(&mut h, t0, 5000, Phase::Running);
    let releases = fdb_ops(&mut h);
    assert_eq!(releases.len(), 5000);
    assert!(releases.iter().all(|o| o.action == FdbAction::Release));
    // Forgotten, all of them: no release twice, none left to make.
    h.on_control(t0, &ClientMessage::Sync { vms: vec![] })
        .unwrap();
    assert_eq!(fdb_ops(&mut h), vec![]);
}

#[test]
fn the_last_wish_for_a_mac_is_the_one_the_shell_gets() {
    let mut h = core();
    let t0 = Instant::now();
    stopped(&mut h, t0);
    // Steered, then forgotten before the shell took the steer: the release alone.
    h.on_control(t0, &ClientMessage::Sync { vms: vec![] })
        .unwrap();
    let ops = fdb_ops(&mut h);
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!((ops[0].mac, ops[0].action), (vm_mac(), FdbAction::Release));
}

#[test]
fn a_booting_vm_whose_mac_changes_has_its_new_mac_steered_and_its_old_released() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    fdb_ops(&mut h);
    // jitsu-dns updates the identity of a VM still booting (its MAC changed on a reload).
    let new_mac: Mac = "02:77:00:00:01:99".parse().unwrap();
    let vm = VmIdentity {
        mac: new_mac,
        ..www(Handover::Wire)
    };
    h.on_control(t0, &ClientMessage::Booting { vm }).unwrap();
    let mut ops: Vec<_> = fdb_ops(&mut h)
        .into_iter()
        .map(|o| (o.mac, o.action))
        .collect();
    ops.sort_by_key(|(mac, _)| *mac);
    assert_eq!(
        ops,
        vec![(vm_mac(), FdbAction::Release), (new_mac, FdbAction::Steer)]
    );
    let steering: Vec<_> = h.steering().map(|(_, mac, _, s)| (mac, s)).collect();
    assert_eq!(steering, vec![(new_mac, true)]);
}
