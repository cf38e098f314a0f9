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
    // From its own port, the same frame hands the SYN over at once, through that port.
    assert_eq!(
        h.on_ingress(t0, &guest_garp(), FrameMeta::default(), "vnet3"),
        Verdict::Announced
    );
    assert_eq!(
        drain_to_guest(&mut h),
        vec![("vnet3".into(), SYN_V4.to_vec())]
    );
    let rel = fdb_ops(&mut h);
    h.on_fdb_done(t0, rel[0].id);
    assert!(!drain_tx(&mut h).contains(&SYN_V4.to_vec()));
    assert_eq!(h.counters().probes_sent, 0);
    assert_eq!(h.counters().handed_over_wire, 1);
}

/// Every frame queued for a guest's own port, with the port.
fn drain_to_guest(h: &mut Hold) -> Vec<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    std::iter::from_fn(|| h.poll_to_guest(&mut buf).map(|p| (p, buf.clone()))).collect()
}

#[test]
fn a_guest_that_listens_gets_its_held_syns_through_its_own_port_without_waiting_for_its_release() {
    let mut h = core();
    let t0 = Instant::now();
    booting_listening(&mut h, t0, Some("vnet3"));
    let (first, second) = (client(1000), client(2000));
    h.on_frame(t0, &first, FrameMeta::default());
    drain_tx(&mut h);
    fdb_ops(&mut h);
    let t1 = t0 + Duration::from_millis(30);
    assert_eq!(
        h.on_ingress(t1, &guest_garp(), FrameMeta::default(), "vnet3"),
        Verdict::Announced
    );
    // In the same step: the SYN out of the guest's port, its MAC's release asked for.
    assert_eq!(
        drain_to_guest(&mut h),
        vec![("vnet3".into(), first.to_vec())]
    );
    assert!(drain_tx(&mut h).is_empty(), "nothing into the bridge");
    let rel = fdb_ops(&mut h);
    assert_eq!(rel.len(), 1);
    assert_eq!(rel[0].action, FdbAction::Release);
    assert_eq!(h.held_now(), 0);
    assert_eq!(h.counters().handed_over_wire, 1);
    assert_eq!(h.counters().probes_sent, 0);
    // Still in hand-over until the release is confirmed: a SYN the bridge sends here
    // meanwhile is held and goes the same way with the next batch, after the pace's wait.
    assert_eq!(h.vms().next().unwrap().1, VmPhase::Handover);
    assert_eq!(h.on_frame(t1, &second, FrameMeta::default()), Verdict::Held);
    assert!(drain_to_guest(&mut h).is_empty());
    let t2 = t1 + h.cfg.resend_wait;
    assert_eq!(h.poll_at(), Some(t2));
    h.handle_timeout(t2);
    assert_eq!(
        drain_to_guest(&mut h),
        vec![("vnet3".into(), second.to_vec())]
    );
    assert!(drain_tx(&mut h).is_empty());
    // The release confirmed: the hand-over is over, nothing is sent twice.
    h.on_fdb_done(t2, rel[0].id);
    assert!(drain_to_guest(&mut h).is_empty());
    assert!(drain_tx(&mut h).is_empty());
    assert_eq!(h.vms().next().unwrap().1, VmPhase::Running);
    assert_eq!(h.counters().handed_over_wire, 2);
    assert_eq!(h.poll_at(), None);
}

#[test]
fn a_guest_not_known_to_listen_waits_for_its_release_even_with_its_port_named() {
    let mut h = core();
    let t0 = Instant::now();
    let mut vm = www(Handover::Wire);
    vm.port = Some("vnet3".into());
    h.on_control(t0, &ClientMessage::Booting { vm }).unwrap();
    h.on_frame(t0, &SYN_V4, FrameMeta::default());
    drain_tx(&mut h);
    fdb_ops(&mut h);
    h.on_ingress(t0, &guest_garp(), FrameMeta::default(), "vnet3");
    assert!(drain_to_guest(&mut h).is_empty());
    assert!(drain_tx(&mut h).is_empty(), "no probe before the release");
    assert_eq!(h.held_now(), 1);
    let rel = fdb_ops(&mut h);
    h.on_fdb_done(t0, rel[0].id);
    let sent = drain_tx(&mut h);
    assert_eq!(sent.len(), 1);
    assert!(is_probe(&h, &sent[0]), "a probe, into the bridge");
    assert!(drain_to_guest(&mut h).is_empty());
}

#[test]
fn a_full_batch_through_the_guests_port_is_paced_by_the_wait_not_by_a_probe() {
    let mut h = core();
    h.cfg.resend_batch = 2;
    let t0 = Instant::now();
    booting_listening(&mut h, t0, Some("vnet3"));
    for port in [1000, 2000, 3000] {
        assert_eq!(
            h.on_frame(t0, &client(port), FrameMeta::default()),
            Verdict::Held
        );
    }
    drain_tx(&mut h);
    fdb_ops(&mut h);
    h.on_ingress(t0, &guest_garp(), FrameMeta::default(), "vnet3");
    assert_eq!(drain_to_guest(&mut h).len(), 2);
    // A probe into the bridge would come back to synjitsu while the MAC is steered here.
    assert!(drain_tx(&mut h).is_empty());
    assert_eq!(h.counters().pace_probes, 0);
    assert_eq!(h.held_now(), 1);
    let wait = h.cfg.resend_wait;
    assert_eq!(h.poll_at(), Some(t0 + wait));
    h.handle_timeout(t0 + wait);
    assert_eq!(drain_to_guest(&mut h).len(), 1);
    assert_eq!(h.held_now(), 0);
}

#[test]
fn a_syn_held_before_the_guests_mac_changed_goes_to_its_new_mac_through_its_port_and_the_bridge() {
    let new_mac: Mac = "02:77:00:00:01:99".parse().unwrap();
    let garp_from_new = || {
        let mut f = guest_garp();
        f[6..12].copy_from_slice(&new_mac.0);
        f[22..28].copy_from_slice(&new_mac.0);
        f
    };
    let addressed_to_new = |syn: &[u8]| {
        let mut f = syn.to_vec();
        f[..6].copy_from_slice(&new_mac.0);
        f
    };
    for port in [Some("vnet3"), None] {
        let mut h = core();
        let t0 = Instant::now();
        booting_listening(&mut h, t0, port);
        assert_eq!(h.on_frame(t0, &SYN_V4, FrameMeta::default()), Verdict::Held);
        drain_tx(&mut h);
        fdb_ops(&mut h);
        // jitsu-dns names a new MAC for the VM still booting (a reload changed it).
        let mut vm = www(Handover::Wire);
        vm.announces_listening = true;
        vm.port = port.map(str::to_string);
        vm.mac = new_mac;
        h.on_control(t0, &ClientMessage::Booting { vm }).unwrap();
        fdb_ops(&mut h);
        drain_tx(&mut h);
        let verdict = match port {
            Some(p) => h.on_ingress(t0, &garp_from_new(), FrameMeta::default(), p),
            None => h.on_frame(t0, &garp_from_new(), FrameMeta::default()),
        };
        assert_eq!(verdict, Verdict::Announced);
        let sent = match port {
            Some(_) => drain_to_guest(&mut h).into_iter().map(|(_, f)| f).collect(),
            None => {
                let rel = fdb_ops(&mut h);
                h.on_fdb_done(t0, rel[0].id);
                drain_tx(&mut h)
            }
        };
        assert_eq!(sent, vec![addressed_to_new(&SYN_V4)], "port {port:?}");
    }
}
