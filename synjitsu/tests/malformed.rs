//! Bad input: every fixture frame cut at every length, every header byte flipped, wrong
//! lengths, and random bytes, through a core that is standing in for the fixtures' guest.
//! Nothing panics, every frame gets a verdict, every malformed one is dropped and counted,
//! and what was held before stays held.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use shared_proto::{ClientMessage, Handover};
use synjitsu::hold::{Checksum, FrameMeta, Hold, Verdict};
use synjitsu::wire;

/// The length of what a frame carries, without Ethernet padding; `None` for ethertypes
/// synjitsu does not read (any cut of those is not synjitsu's to judge).
fn meaningful_len(f: &[u8]) -> Option<usize> {
    match u16::from_be_bytes([f[12], f[13]]) {
        wire::ETHERTYPE_ARP => Some(wire::ETH_HDR + wire::ARP_LEN),
        wire::ETHERTYPE_IPV4 => {
            Some(wire::ETH_HDR + usize::from(u16::from_be_bytes([f[16], f[17]])))
        }
        wire::ETHERTYPE_IPV6 => {
            Some(wire::ETH_HDR + wire::IPV6_HDR + usize::from(u16::from_be_bytes([f[18], f[19]])))
        }
        _ => None,
    }
}

fn booting_core() -> (Hold, std::time::Instant) {
    let mut h = core();
    let t0 = std::time::Instant::now();
    h.on_control(
        t0,
        &ClientMessage::Booting {
            vm: www(Handover::Wire),
        },
    )
    .unwrap();
    (h, t0)
}

fn all_frames() -> Vec<Vec<u8>> {
    ALL.iter()
        .flat_map(|name| fixture(name).into_iter().map(|r| r.data))
        .collect()
}

fn drops(h: &Hold) -> u64 {
    h.counters().frames_with("dropped")
}

fn total(h: &Hold) -> u64 {
    h.counters().frames.iter().sum()
}

#[test]
fn every_truncation_of_every_fixture_frame_is_dropped_and_counted() {
    let (mut h, t0) = booting_core();
    let frames = all_frames();
    let mut expected_drops = 0u64;
    let mut seen = 0u64;
    for meta in [
        FrameMeta::default(),
        FrameMeta {
            checksum: Checksum::Partial,
        },
    ] {
        for f in &frames {
            let Some(full) = meaningful_len(f) else {
                continue;
            };
            assert!(
                full <= f.len(),
                "fixture frame shorter than it says: {f:02x?}"
            );
            for cut in 0..full {
                let v = h.on_frame(t0, &f[..cut], meta);
                seen += 1;
                assert!(
                    matches!(v, Verdict::Drop(_)),
                    "{cut} bytes of {f:02x?} gave {v:?}"
                );
                expected_drops += 1;
            }
        }
    }
    assert!(
        seen > 1000,
        "only {seen} truncations: are the fixtures there?"
    );
    assert_eq!(drops(&h), expected_drops);
    assert_eq!(total(&h), seen);
    let by_reason: u64 = h.counters().drops.iter().sum();
    assert_eq!(by_reason, expected_drops, "every drop has a reason");
    assert_eq!(h.held_now(), 0);
}

#[test]
fn flipped_bytes_and_wrong_lengths_never_panic_and_nothing_held_is_lost() {
    let (mut h, t0) = booting_core();
    let syn = fixture("curl-syn-v4.pcap")
        .into_iter()
        .map(|r| r.data)
        .find(|f| matches!(wire::parse(f, true), Ok(p) if matches!(p.packet, wire::Packet::Tcp(t) if t.is_syn())))
        .expect("a SYN");
    assert_eq!(h.on_frame(t0, &syn, FrameMeta::default()), Verdict::Held);
    let before = total(&h);
    let mut calls = 0u64;
    for f in all_frames() {
        for i in 0..f.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut g = f.clone();
                g[i] ^= mask;
                for meta in [
                    FrameMeta::default(),
                    FrameMeta {
                        checksum: Checksum::Partial,
                    },
                    FrameMeta {
                        checksum: Checksum::Valid,
                    },
                ] {
                    h.on_frame(t0, &g, meta);
                    calls += 1;
                }
            }
        }
        // Length fields claiming more or less than there is.
        if f.len() > 20 {
            for (at, v) in [
                (16usize, 0xffffu16),
                (16, 0),
                (16, 21),
                (18, 0xffff),
                (18, 1),
            ] {
                let mut g = f.clone();
                g[at..at + 2].copy_from_slice(&v.to_be_bytes());
                h.on_frame(t0, &g, FrameMeta::default());
                calls += 1;
            }
        }
    }
    assert_eq!(
        total(&h) - before,
        calls,
        "every frame got exactly one verdict"
    );
    // The flipped copies of the held SYN (same ISN and 4-tuple or not) never displace it.
    assert!(h.held_now() >= 1);
    // Drive time to just before the hold timeout: the original SYN is still there.
    h.handle_timeout(t0 + Duration::from_secs(9));
    assert!(h.held_now() >= 1);
    h.on_control(t0, &ClientMessage::Ready { name: "www".into() })
        .unwrap();
    while let Some(op) = h.poll_fdb() {
        h.on_fdb_done(t0, op.id);
    }
    let mut buf = Vec::new();
    let mut resent = Vec::new();
    while h.poll_transmit(&mut buf) {
        resent.push(std::mem::take(&mut buf));
    }
    assert!(
        resent.contains(&syn),
        "the SYN held before the garbage was handed over"
    );
}

#[test]
fn random_bytes_never_panic() {
    let (mut h, t0) = booting_core();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let ethertypes = [0x0800u16, 0x0806, 0x86dd, 0x8100, 0x88cc];
    let mut calls = 0;
    for _ in 0..20_000 {
        let len = (next() % 200) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Mostly the ethertypes synjitsu reads, so the generator reaches past Ethernet.
        if len >= 14 {
            let et = ethertypes[(next() % 5) as usize];
            f[12..14].copy_from_slice(&et.to_be_bytes());
            // Sometimes a plausible IP version nibble, and the VM as destination.
            if len >= 34 && et == 0x0800 {
                f[14] = 0x45;
                f[30..34].copy_from_slice(&[10, 77, 1, 10]);
            }
            if len >= 54 && et == 0x86dd {
                f[14] = 0x60;
            }
        }
        let meta = match next() % 3 {
            0 => FrameMeta::default(),
            1 => FrameMeta {
                checksum: Checksum::Partial,
            },
            _ => FrameMeta {
                checksum: Checksum::Valid,
            },
        };
        h.on_frame(t0, &f, meta);
        calls += 1;
    }
    assert_eq!(total(&h), calls);
}
