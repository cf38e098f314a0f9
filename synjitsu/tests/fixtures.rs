//! The pcap fixtures (real captures, `pcap-fixtures/`) replayed through the core with their
//! capture timestamps as `now`: no privileges, no sockets, the frames real tools sent.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use shared_proto::{ClientMessage, Event, Handover, Mac};
use synjitsu::hold::{Checksum, DropReason, FrameMeta, Verdict};
use synjitsu::wire::{self, ArpOp, NdpKind, Packet};

fn vm_ip4() -> IpAddr {
    "10.77.1.10".parse().unwrap()
}

fn is_syn_to_vm(frame: &[u8]) -> bool {
    matches!(wire::parse(frame, true), Ok(f) if matches!(f.packet,
        Packet::Tcp(t) if t.is_syn() && (t.dst_ip == vm_ip4() || t.dst_ip == "fd77:1::10".parse::<IpAddr>().unwrap())))
}

fn booting(replay: &mut Replay) {
    replay.control(ClientMessage::Booting {
        vm: www(Handover::Wire),
    });
    // The gratuitous ARP/NA burst is not what these tests look at.
    replay.advance(replay.base + Duration::from_millis(250));
    replay.sent.clear();
    replay.events.clear();
}

fn curl_replay(name: &str, meta: FrameMeta) {
    let recs = fixture(name);
    let syns = recs.iter().filter(|r| is_syn_to_vm(&r.data)).count();
    assert!(
        syns >= 2,
        "{name}: expected curl's SYN and retransmits, found {syns}"
    );
    let mut r = Replay::new(core(), &recs);
    booting(&mut r);
    let verdicts = r.run(&recs, meta);
    let held = verdicts.iter().filter(|v| **v == Verdict::Held).count();
    let dup = verdicts
        .iter()
        .filter(|v| **v == Verdict::Duplicate)
        .count();
    assert_eq!(held, 1, "{name}: exactly one SYN held: {verdicts:?}");
    assert_eq!(dup, syns - 1, "{name}: every retransmit deduplicated");
    assert_eq!(r.core.counters().retransmit_dedup as usize, syns - 1);
    assert_eq!(r.core.held_now(), 1);
    for (rec, v) in recs.iter().zip(&verdicts) {
        if !is_syn_to_vm(&rec.data) {
            assert_eq!(*v, Verdict::Pass, "{name}: {:02x?}", rec.data);
        }
    }
    let held_events: Vec<_> = r
        .events
        .iter()
        .filter(|e| matches!(e, Event::SynHeld { .. }))
        .collect();
    assert_eq!(held_events.len(), 1);
    // Curl gives up before the hold timeout; synjitsu then answers with a RST at 10 s.
    let first_syn = recs.iter().find(|x| is_syn_to_vm(&x.data)).unwrap().ts;
    let deadline = r.at(first_syn) + Duration::from_secs(10);
    r.advance(deadline);
    assert_eq!(r.core.held_now(), 0);
    assert_eq!(r.core.counters().rst_hold_timeout, 1);
    let rst = r.sent.last().expect("a RST");
    let Packet::Tcp(t) = wire::parse(rst, false).unwrap().packet else {
        panic!("not TCP")
    };
    assert!(wire::tcp_checksum_ok(rst, &t));
    assert_eq!(t.flags & wire::tcp_flags::RST, wire::tcp_flags::RST);
    assert_eq!(t.dst_ip.is_ipv6(), name.contains("v6"));
}

#[test]
fn curl_syn_v4_is_held_once() {
    curl_replay("curl-syn-v4.pcap", FrameMeta::default());
}

#[test]
fn curl_syn_v6_is_held_once() {
    curl_replay("curl-syn-v6.pcap", FrameMeta::default());
}

#[test]
fn partial_checksums_are_completed_to_the_correct_value() {
    let name = "curl-syn-v4-csum-partial.pcap";
    let recs = fixture(name);
    let first = recs.iter().find(|r| is_syn_to_vm(&r.data)).expect("a SYN");
    let Packet::Tcp(t) = wire::parse(&first.data, true).unwrap().packet else {
        unreachable!()
    };
    assert!(
        !wire::tcp_checksum_ok(&first.data, &t),
        "{name}: the captured checksum should be partial (offload pending)"
    );
    let correct = wire::tcp_checksum(&first.data, &t);

    // Without the kernel's word that it is partial, it is a bad checksum: dropped.
    let mut r = Replay::new(core(), &recs);
    booting(&mut r);
    let verdicts = r.run(&recs, FrameMeta::default());
    let syns = recs.iter().filter(|r| is_syn_to_vm(&r.data)).count();
    assert_eq!(
        verdicts
            .iter()
            .filter(|v| **v == Verdict::Drop(DropReason::BadChecksum))
            .count(),
        syns
    );
    assert_eq!(r.core.held_now(), 0);

    // With TP_STATUS_CSUMNOTREADY: held, and what is handed over carries the correct sum.
    let mut r = Replay::new(core(), &recs);
    booting(&mut r);
    let partial = FrameMeta {
        checksum: Checksum::Partial,
    };
    let verdicts = r.run(&recs, partial);
    assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Held).count(), 1);
    r.control(ClientMessage::Ready { name: "www".into() });
    let handed: Vec<_> = r.sent.iter().filter(|f| is_syn_to_vm(f)).collect();
    assert_eq!(handed.len(), 1);
    let Packet::Tcp(h) = wire::parse(handed[0], true).unwrap().packet else {
        unreachable!()
    };
    assert_eq!(h.checksum, correct);
    assert!(wire::tcp_checksum_ok(handed[0], &h));
    assert_eq!(handed[0].len(), first.data.len());
    let at = h.tcp_offset + 16;
    assert_eq!(handed[0][..at], first.data[..at]);
    assert_eq!(handed[0][at + 2..], first.data[at + 2..]);
}

fn announces(recs: &[Record], what: &str) {
    let mut r = Replay::new(core(), recs);
    booting(&mut r);
    let verdicts = r.run(recs, FrameMeta::default());
    let n = verdicts
        .iter()
        .filter(|v| **v == Verdict::Announced)
        .count();
    assert_eq!(n, 1, "{what}: announced exactly once: {verdicts:?}");
    let announced: Vec<_> = r
        .events
        .iter()
        .filter(|e| matches!(e, Event::GuestAnnounced { .. }))
        .collect();
    assert_eq!(
        announced,
        vec![&Event::GuestAnnounced { name: "www".into() }],
        "{what}"
    );
    // Nothing synjitsu sent answered the guest's own probes or solicitations.
    for f in &r.sent {
        let p = wire::parse(f, false).unwrap();
        assert!(
            !matches!(p.packet, Packet::Arp(_) | Packet::Ndp(_)),
            "{what}: synjitsu answered the guest: {p:?}"
        );
    }
}

#[test]
fn the_guests_gratuitous_arp_in_both_forms_announces_it() {
    let recs = fixture("garp-arping.pcap");
    let vm: Mac = VM_MAC.parse().unwrap();
    let arp_of = |op: ArpOp| {
        recs.iter()
            .filter(|r| {
                matches!(wire::parse(&r.data, true), Ok(f) if matches!(f.packet,
                    Packet::Arp(a) if a.op == op && a.sender_mac == vm))
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    let requests = arp_of(ArpOp::Request);
    let replies = arp_of(ArpOp::Reply);
    assert!(
        !requests.is_empty(),
        "arping -U (request form) is in the fixture"
    );
    assert!(
        !replies.is_empty(),
        "arping -A (reply form) is in the fixture"
    );
    announces(&requests, "request form");
    announces(&replies, "reply form");
    announces(&recs, "whole capture");
}

#[test]
fn a_guest_coming_up_with_arp_notify_announces_it_and_its_dad_is_not_answered() {
    let recs = fixture("garp-arp-notify.pcap");
    let dad = recs
        .iter()
        .filter(|r| {
            matches!(wire::parse(&r.data, true), Ok(f) if matches!(f.packet,
                Packet::Ndp(n) if n.kind == NdpKind::Solicitation && n.src_ip.is_unspecified()))
        })
        .count();
    assert!(
        dad > 0,
        "the guest's duplicate address detection is in the fixture"
    );
    announces(&recs, "arp_notify");
}

#[test]
fn who_has_is_answered_with_the_vms_mac() {
    let recs = fixture("who-has.pcap");
    let mut r = Replay::new(core(), &recs);
    booting(&mut r);
    let verdicts = r.run(&recs, FrameMeta::default());
    let asked = verdicts.iter().filter(|v| **v == Verdict::Answered).count();
    assert!(asked >= 2, "{verdicts:?}");
    assert_eq!(r.sent.len(), asked, "one answer per question");
    let vm: Mac = VM_MAC.parse().unwrap();
    let client: Mac = CLIENT_MAC.parse().unwrap();
    let (mut arp, mut na) = (0, 0);
    for f in &r.sent {
        let p = wire::parse(f, false).unwrap();
        assert_eq!((p.eth.src, p.eth.dst), (vm, client));
        match p.packet {
            Packet::Arp(a) => {
                assert_eq!(
                    (a.op, a.sender_mac, a.sender_ip),
                    (ArpOp::Reply, vm, "10.77.1.10".parse().unwrap())
                );
                assert_eq!(f.len(), 60);
                arp += 1;
            }
            Packet::Ndp(n) => {
                assert_eq!(
                    n.target,
                    "fd77:1::10".parse::<std::net::Ipv6Addr>().unwrap()
                );
                assert_eq!(n.lladdr, Some(vm));
                na += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(arp > 0 && na > 0, "both ARP ({arp}) and NA ({na}) answered");
    assert_eq!(r.core.counters().arp_replies as usize, arp);
    assert_eq!(r.core.counters().na_solicited as usize, na);

    // Nobody is stood in for: nothing is answered.
    let mut idle = Replay::new(core(), &recs);
    let verdicts = idle.run(&recs, FrameMeta::default());
    assert!(verdicts.iter().all(|v| *v == Verdict::Pass));
    assert!(idle.sent.is_empty());
}

#[test]
fn noise_passes_untouched() {
    let recs = fixture("noise.pcap");
    let syns = recs
        .iter()
        .filter(|r| {
            matches!(wire::parse(&r.data, true), Ok(f) if matches!(f.packet, Packet::Tcp(t) if t.is_syn()))
        })
        .count();
    assert!(syns > 0, "the HTTP exchange's SYN is in the noise");
    let mut r = Replay::new(core(), &recs);
    booting(&mut r);
    let verdicts = r.run(&recs, FrameMeta::default());
    assert!(verdicts.iter().all(|v| *v == Verdict::Pass), "{verdicts:?}");
    assert_eq!(r.core.held_now(), 0);
    assert!(r.sent.is_empty(), "nothing answered: {:02x?}", r.sent);
}
