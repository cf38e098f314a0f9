//! The promise "this guest announces itself only once it listens" (`announces_listening`):
//! its held SYNs go at its announcement, with no probe; without the promise the probe still
//! comes first; and the promise does not make an announcement from anywhere count.

use std::time::{Duration, Instant};

use shared_proto::{ClientMessage, Event, Handover};

use super::tests::{
    booting, core, drain_events, drain_tx, edited_syn_v4, fdb_ops, guest_garp, www,
};
use super::*;
use crate::wire::tests::{SYN_V4, SYN_V6};

/// www booting with the promise, its bridge port `port` if given.
fn booting_listening(h: &mut Hold, now: Instant, port: Option<&str>) {
    let mut vm = www(Handover::Wire);
    vm.announces_listening = true;
    vm.port = port.map(str::to_string);
    h.on_control(now, &ClientMessage::Booting { vm }).unwrap();
}

/// A client's SYN to www:80 from 10.77.1.2, port `port`.
fn client(port: u16) -> [u8; 74] {
    edited_syn_v4(|f| f[34..36].copy_from_slice(&port.to_be_bytes()))
}

/// True if `f` is a TCP segment from one of synjitsu's probe addresses.
fn is_probe(h: &Hold, f: &[u8]) -> bool {
    matches!(
        wire::parse(f, false).map(|p| p.packet),
        Ok(Packet::Tcp(t)) if h.cfg.is_probe_ip(t.src_ip)
    )
}

#[test]
fn the_promise_sends_the_held_syns_in_the_same_step_as_the_announcement() {
    let mut h = core();
    let t0 = Instant::now();
    booting_listening(&mut h, t0, None);
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    h.on_frame(t0, &SYN_V6, FrameMeta::default());
    drain_tx(&mut h);
    fdb_ops(&mut h);
    drain_events(&mut h);
    let t1 = t0 + Duration::from_millis(30);
    assert_eq!(
        h.on_frame(t1, &guest_garp(), FrameMeta::default()),
        Verdict::Announced
    );
    // Its MAC is released first (a frame sent before would come back to synjitsu's port).
    let rel = fdb_ops(&mut h);
    assert_eq!(rel.len(), 1);
    assert_eq!(rel[0].action, FdbAction::Release);
    assert!(drain_tx(&mut h).is_empty(), "nothing before the release");
    // The release confirmed, at the same instant: every held SYN, unchanged, and nothing else.
    h.on_fdb_done(t1, rel[0].id);
    let mut sent = drain_tx(&mut h);
    sent.sort();
    let mut want = vec![SYN_V4.to_vec(), SYN_V6.to_vec()];
    want.sort();
    assert_eq!(sent, want);
    assert_eq!(h.counters().probes_sent, 0);
    assert_eq!(h.counters().handed_over_wire, 2);
    assert_eq!(h.held_now(), 0);
    assert_eq!(h.vms().next().unwrap().1, VmPhase::Running);
    // No timer left: no probe will follow.
    assert_eq!(h.poll_at(), None);
    assert_eq!(
        drain_events(&mut h),
        vec![
            Event::GuestAnnounced { name: "www".into() },
            Event::Handover {
                name: "www".into(),
                count: 2,
                via: shared_proto::HandoverVia::Wire
            }
        ]
    );
}

#[test]
fn under_the_promise_real_clients_still_go_first() {
    let mut h = core();
    let t0 = Instant::now();
    booting_listening(&mut h, t0, None);
    let (first, second) = (client(1000), client(2000));
    h.on_frame(t0, &first, FrameMeta::default());
    h.on_frame(t0, &second, FrameMeta::default());
    // The second client retransmits: it is real.
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(
        h.on_frame(t1, &second, FrameMeta::default()),
        Verdict::Duplicate
    );
    drain_tx(&mut h);
    fdb_ops(&mut h);
    h.on_frame(t1, &guest_garp(), FrameMeta::default());
    let rel = fdb_ops(&mut h);
    h.on_fdb_done(t1, rel[0].id);
    assert_eq!(drain_tx(&mut h), vec![second.to_vec(), first.to_vec()]);
}

#[test]
fn without_the_promise_the_probe_still_comes_first() {
    let mut h = core();
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    assert!(!www(Handover::Wire).announces_listening);
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    drain_tx(&mut h);
    fdb_ops(&mut h);
    let t1 = t0 + Duration::from_millis(30);
    h.on_frame(t1, &guest_garp(), FrameMeta::default());
    let rel = fdb_ops(&mut h);
    h.on_fdb_done(t1, rel[0].id);
    let sent = drain_tx(&mut h);
    assert_eq!(sent.len(), 1);
    assert!(is_probe(&h, &sent[0]), "a probe, not the client's SYN");
    assert_eq!(h.counters().probes_sent, 1);
    assert_eq!(h.held_now(), 1);
    assert_eq!(h.counters().handed_over_wire, 0);
}

#[test]
fn under_the_promise_a_spoofed_announcement_from_another_port_still_ends_nothing() {
    let mut h = core();
    let t0 = Instant::now();
    booting_listening(&mut h, t0, Some("vnet3"));
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    drain_tx(&mut h);
    fdb_ops(&mut h);
    drain_events(&mut h);
    assert_eq!(
        h.on_ingress(t0, &guest_garp(), FrameMeta::default(), "vnet9"),
        Verdict::Drop(DropReason::SpoofedAnnouncement)
    );
    assert_eq!(h.vms().next().unwrap().1, VmPhase::Booting);
    assert!(fdb_ops(&mut h).is_empty(), "its MAC stays steered");
    assert!(!drain_tx(&mut h).contains(&SYN_V4.to_vec()));
    assert_eq!(h.held_now(), 1);
    assert_eq!(h.counters().handed_over_wire, 0);
    assert!(drain_events(&mut h).is_empty());
    // From its own port, the same frame hands the SYN over at once.
    assert_eq!(
        h.on_ingress(t0, &guest_garp(), FrameMeta::default(), "vnet3"),
        Verdict::Announced
    );
    let rel = fdb_ops(&mut h);
    h.on_fdb_done(t0, rel[0].id);
    assert_eq!(drain_tx(&mut h), vec![SYN_V4.to_vec()]);
    assert_eq!(h.counters().probes_sent, 0);
}
