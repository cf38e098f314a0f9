//! The SYN table under a flood of spoofed SYNs, driven with synthetic `Instant`s: the byte
//! budgets, eviction of the oldest, recognising an evicted client's retransmission, the share
//! of the total each VM keeps, and a hand-over larger than the transmit queue.

use std::time::{Duration, Instant};

use shared_proto::{ClientMessage, Handover};

use super::tests::{booting, booting_db, drain_tx, edited_syn_v4, fdb_ops, own_mac};
use super::*;

/// A SYN to www (10.77.1.10) from the spoofed source 198.18.0.0/15 numbered `i`, its port
/// and ISN from `i` too.
fn spoofed(i: u32) -> [u8; 74] {
    edited_syn_v4(|f| {
        f[26..30].copy_from_slice(&[198, 18 + ((i >> 16) & 1) as u8, (i >> 8) as u8, i as u8]);
        f[34..36].copy_from_slice(&(1024 + (i % 60000) as u16).to_be_bytes());
        f[38..42].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
    })
}

/// A real client's SYN to www (from 10.77.1.2, port `port`).
fn real(port: u16) -> [u8; 74] {
    edited_syn_v4(|f| f[34..36].copy_from_slice(&port.to_be_bytes()))
}

/// `f` sent to the VM `db` (10.77.1.11, MAC ..:11) instead.
fn to_db(mut f: [u8; 74]) -> [u8; 74] {
    f[5] = 0x11;
    edited_syn_v4(|g| {
        *g = f;
        g[33] = 11;
    })
}

/// What one of these SYNs is charged (they all have the same size and options).
fn cost() -> usize {
    let mut h = Hold::new(Config::new(own_mac()));
    booting(&mut h, Instant::now(), Handover::Wire);
    assert_eq!(
        h.on_frame(Instant::now(), &spoofed(0), FrameMeta::default()),
        Verdict::Held
    );
    h.held_bytes_now()
}

fn core_with(per_vm: usize, total: usize) -> Hold {
    let mut cfg = Config::new(own_mac());
    cfg.held_bytes_per_vm = per_vm * cost();
    cfg.held_bytes = total * cost();
    cfg.garp_count = 0;
    Hold::new(cfg)
}

/// Tells the core the guest `name` answers, confirms its release, and returns every frame
/// it then sends.
fn hand_over(h: &mut Hold, now: Instant, name: &str) -> Vec<Vec<u8>> {
    h.on_control(now, &ClientMessage::Ready { name: name.into() })
        .unwrap();
    for op in fdb_ops(h) {
        h.on_fdb_done(now, op.id);
    }
    drain_tx(h)
}

#[test]
fn a_syn_costs_its_frame_and_bookkeeping_in_a_few_hundred_bytes() {
    let c = cost();
    assert!(c > held_cost(74, 0), "the options count too");
    assert!((200..600).contains(&c), "{c} bytes a SYN");
}

#[test]
fn under_a_flood_every_syn_is_held_and_the_oldest_make_room() {
    let mut h = core_with(4, 100);
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let m = FrameMeta::default();
    for i in 0..100 {
        assert_eq!(h.on_frame(t0, &spoofed(i), m), Verdict::Held, "SYN {i}");
        assert!(h.held_bytes_now() <= 4 * cost());
    }
    assert_eq!(h.held_now(), 4);
    assert_eq!(h.counters().drops_for(DropReason::Evicted), 96);
    assert_eq!(h.counters().drops_for(DropReason::VmFull), 0);
    // Evicted SYNs get no RST (their sources are likely spoofed): nothing was sent.
    assert!(drain_tx(&mut h).is_empty());
    let sent = hand_over(&mut h, t0, "www");
    let newest: Vec<Vec<u8>> = (96..100).map(|i| spoofed(i).to_vec()).collect();
    assert_eq!(
        sent, newest,
        "the four newest are handed over, oldest first"
    );
}

#[test]
fn an_evicted_syn_that_comes_again_is_held_as_a_real_clients_and_outlasts_the_flood() {
    let mut h = core_with(4, 100);
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let m = FrameMeta::default();
    assert_eq!(h.on_frame(t0, &real(20000), m), Verdict::Held);
    for i in 0..10 {
        assert_eq!(h.on_frame(t0, &spoofed(i), m), Verdict::Held);
    }
    // The client's first SYN was evicted; its retransmission a second later is held, and
    // known for a real client's.
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(h.on_frame(t1, &real(20000), m), Verdict::Held);
    for i in 10..1000 {
        assert_eq!(h.on_frame(t1, &spoofed(i), m), Verdict::Held);
    }
    assert_eq!(h.held_now(), 4);
    let sent = hand_over(&mut h, t1, "www");
    assert_eq!(sent.len(), 4);
    assert_eq!(sent[0], real(20000).to_vec(), "the real client goes first");
    assert_eq!(
        sent[1..],
        [spoofed(997), spoofed(998), spoofed(999)].map(|f| f.to_vec())
    );
}

#[test]
fn a_flood_on_one_vm_cannot_take_the_room_another_vm_needs() {
    let mut h = core_with(8, 8);
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    booting_db(&mut h, t0);
    let m = FrameMeta::default();
    for i in 0..50 {
        assert_eq!(h.on_frame(t0, &spoofed(i), m), Verdict::Held);
    }
    assert_eq!(h.vm_held_bytes("www"), 8 * cost());
    // db's SYNs take room from www, down to half each, then from db itself.
    for i in 0..3 {
        assert_eq!(h.on_frame(t0, &to_db(real(30000 + i)), m), Verdict::Held);
    }
    assert_eq!(h.vm_held_bytes("db"), 3 * cost());
    assert_eq!(h.vm_held_bytes("www"), 5 * cost());
    for i in 0..10 {
        assert_eq!(h.on_frame(t0, &to_db(spoofed(1000 + i)), m), Verdict::Held);
        assert_eq!(h.on_frame(t0, &spoofed(2000 + i), m), Verdict::Held);
    }
    assert_eq!(h.vm_held_bytes("db"), 4 * cost());
    assert_eq!(h.vm_held_bytes("www"), 4 * cost());
    assert_eq!(h.held_bytes_now(), 8 * cost());
}

#[test]
fn budgets_hold_counts_add_up_and_nothing_outlives_the_hold_timeout() {
    let mut h = core_with(50, 80);
    let mut now = Instant::now();
    booting(&mut h, now, Handover::Wire);
    booting_db(&mut h, now);
    let m = FrameMeta::default();
    let per_vm = 50 * cost();
    let total = 80 * cost();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut sent: Vec<[u8; 74]> = Vec::new();
    let hold_timeout = h.config().hold_timeout;
    for step in 0..40_000u32 {
        let r = next();
        let frame = match r % 10 {
            // A real client sends again (same 4-tuple and ISN), as after its timeout.
            0 if !sent.is_empty() => sent[(r >> 8) as usize % sent.len()],
            1..=3 => to_db(spoofed(step)),
            _ => spoofed(step),
        };
        sent.push(frame);
        let v = h.on_frame(now, &frame, m);
        assert!(
            matches!(v, Verdict::Held | Verdict::Duplicate),
            "step {step}: {v:?}"
        );
        now += Duration::from_micros((r >> 32) % 2000);
        if h.poll_at().is_some_and(|at| at <= now) {
            h.handle_timeout(now);
        }
        // Nothing due is left undone: no SYN outlives the hold timeout.
        assert!(h.poll_at().is_none_or(|at| at > now), "step {step}");
        assert!(h.held_bytes_now() <= total, "step {step}");
        assert!(h.vm_held_bytes("www") <= per_vm && h.vm_held_bytes("db") <= per_vm);
        assert_eq!(
            h.held_bytes_now(),
            h.vm_held_bytes("www") + h.vm_held_bytes("db")
        );
        let c = h.counters();
        assert_eq!(
            c.syns_held,
            h.held_now() as u64
                + c.drops_for(DropReason::Evicted)
                + c.drops_for(DropReason::HoldTimeout),
            "step {step}"
        );
    }
    assert!(
        now - Instant::now() > 2 * hold_timeout,
        "time went past the timeout"
    );
    assert!(h.counters().drops_for(DropReason::HoldTimeout) > 0);
    assert!(h.counters().drops_for(DropReason::Evicted) > 0);
    drain_tx(&mut h);
    let held = h.held_now();
    let handed = hand_over(&mut h, now, "www").len() + hand_over(&mut h, now, "db").len();
    assert_eq!(handed, held);
    assert_eq!((h.held_now(), h.held_bytes_now()), (0, 0));
}

#[test]
fn a_hand_over_bigger_than_the_transmit_queue_loses_nothing_and_starts_with_real_clients() {
    let n = MAX_TRANSMIT as u32 + 500;
    let mut h = core_with(n as usize + 10, n as usize + 10);
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let m = FrameMeta::default();
    for i in 0..n / 2 {
        assert_eq!(h.on_frame(t0, &spoofed(i), m), Verdict::Held);
    }
    assert_eq!(h.on_frame(t0, &real(20000), m), Verdict::Held);
    for i in n / 2..n {
        assert_eq!(h.on_frame(t0, &spoofed(i), m), Verdict::Held);
    }
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(h.on_frame(t1, &real(20000), m), Verdict::Duplicate);
    let before = h.held_bytes_now();
    h.on_control(t1, &ClientMessage::Ready { name: "www".into() })
        .unwrap();
    for op in fdb_ops(&mut h) {
        h.on_fdb_done(t1, op.id);
    }
    // Queued for sending, the SYNs are still charged.
    assert_eq!(h.held_now(), 0);
    assert_eq!(h.held_bytes_now(), before);
    let sent = drain_tx(&mut h);
    assert_eq!(sent.len(), n as usize + 1);
    assert_eq!(sent[0], real(20000).to_vec());
    assert_eq!(h.counters().transmit_overflow, 0);
    assert_eq!(h.held_bytes_now(), 0);
}

#[test]
fn a_flood_gives_jitsu_dns_one_syn_held_event_per_interval_not_one_per_syn() {
    let mut h = core_with(4, 100);
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    while h.poll_event().is_some() {}
    let m = FrameMeta::default();
    // 10,000 SYNs over one second.
    for i in 0..10_000u32 {
        let now = t0 + Duration::from_micros(u64::from(i) * 100);
        assert_eq!(h.on_frame(now, &spoofed(i), m), Verdict::Held);
    }
    let held_events = std::iter::from_fn(|| h.poll_event())
        .filter(|e| matches!(e, shared_proto::Event::SynHeld { .. }))
        .count();
    assert_eq!(held_events, 10, "the first, then one per 100 ms");
}
