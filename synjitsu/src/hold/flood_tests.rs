//! The SYN table under a flood of spoofed SYNs, driven with synthetic `Instant`s: the byte
//! budgets, eviction of the oldest, recognising an evicted client's retransmission, the share
//! of the total each VM keeps, and a hand-over larger than the transmit queue.

use std::time::{Duration, Instant};

use shared_proto::{ClientMessage, Handover};

use super::tests::{booting, booting_db, drain_tx, edited_syn_v4, fdb_ops, own_mac};
use super::*;
use crate::wire;

/// A SYN to www (10.77.1.10) from the spoofed source in 198.18.0.0/15 numbered `i`, its port
/// and ISN from `i` too; sources spread over the /24s as a random flood's are (`i` and
/// `i + 1` in two of them), so that no prefix holds more than the others.
fn spoofed(i: u32) -> [u8; 74] {
    edited_syn_v4(|f| {
        f[26..30].copy_from_slice(&[198, 18 + ((i >> 16) & 1) as u8, i as u8, (i >> 8) as u8]);
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
    assert_eq!(c, held_cost(74));
    // Under 300 bytes: 16 MiB holds the 56,000 SYNs a flood of 170,000 a second sends during
    // a 330 ms boot (parsed options, kept beside the frame, had taken half of 507 bytes).
    assert!((100..300).contains(&c), "{c} bytes a SYN");
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
fn a_hand_over_goes_a_batch_at_a_time_loses_nothing_and_starts_with_real_clients() {
    let n = MAX_TRANSMIT as u32 + 500;
    let mut h = core_with(n as usize + 10, n as usize + 10);
    let batch = h.config().resend_batch;
    let wait = h.config().resend_wait;
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
    // One batch queued (still charged until sent), the rest held.
    assert_eq!(h.held_now(), n as usize + 1 - batch);
    assert_eq!(h.held_bytes_now(), before);
    let mut sent = drain_tx(&mut h);
    assert_eq!(sent.len(), batch);
    assert_eq!(sent[0], real(20000).to_vec(), "the real client goes first");
    assert!(
        drain_tx(&mut h).is_empty(),
        "nothing more before the next is due"
    );
    // Without a probe address, a batch per `resend_wait`.
    let mut now = t1;
    while h.held_now() > 0 {
        assert_eq!(h.poll_at(), Some(now + wait));
        now += wait;
        h.handle_timeout(now);
        let more = drain_tx(&mut h);
        assert!(!more.is_empty() && more.len() <= batch, "{}", more.len());
        sent.extend(more);
    }
    assert_eq!(sent.len(), n as usize + 1);
    assert_eq!(
        sent[1..4],
        [spoofed(0), spoofed(1), spoofed(2)].map(|f| f.to_vec()),
        "then the oldest first"
    );
    assert_eq!(h.counters().transmit_overflow, 0);
    assert_eq!(h.held_bytes_now(), 0);
    assert_eq!(h.vms().next().unwrap().1, VmPhase::Running);
}

/// A core with probe addresses, budgets of `per_vm` SYNs (and room for every VM's).
fn probing_core_with(per_vm: usize) -> Hold {
    let mut h = super::tests::core();
    let mut cfg = h.config().clone();
    cfg.held_bytes_per_vm = per_vm * cost();
    cfg.held_bytes = 4 * per_vm * cost();
    cfg.garp_count = 0;
    h = Hold::new(cfg);
    h
}

#[test]
fn the_next_batch_goes_once_the_guest_answers_the_probe_sent_behind_the_last() {
    let mut h = probing_core_with(1000);
    let batch = h.config().resend_batch;
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let m = FrameMeta::default();
    let n = 2 * batch as u32 + 10;
    for i in 0..n {
        assert_eq!(h.on_frame(t0, &spoofed(i), m), Verdict::Held);
    }
    // The guest listens (jitsu-dns said so): no probe needed to start.
    let sent = hand_over(&mut h, t0, "www");
    assert_eq!(sent.len(), batch + 1, "a batch, then a probe behind it");
    assert_eq!(
        sent[..batch],
        (0..batch as u32)
            .map(|i| spoofed(i).to_vec())
            .collect::<Vec<_>>()[..]
    );
    let probe = sent[batch].clone();
    assert_eq!(
        &probe[26..30],
        &[10, 77, 1, 250],
        "from synjitsu's probe address"
    );
    assert!(drain_tx(&mut h).is_empty(), "the next waits for the answer");
    // The guest answers the probe (it took what came before): its connection is reset, and
    // the next batch goes, with a probe behind it.
    let t1 = t0 + Duration::from_micros(100);
    let synack = super::tests::probe_answer(&probe, wire::tcp_flags::SYN | wire::tcp_flags::ACK);
    assert_eq!(h.on_frame(t1, &synack, m), Verdict::ProbeAnswer);
    let sent = drain_tx(&mut h);
    assert_eq!(sent.len(), 1 + batch + 1);
    assert_eq!(
        sent[0][47] & wire::tcp_flags::RST,
        wire::tcp_flags::RST,
        "the probe reset"
    );
    assert_eq!(sent[1], spoofed(batch as u32).to_vec());
    // A RST answers too (the guest took the batch, whatever it made of the probe); the last
    // ten go, and nothing is left to pace.
    let rst = super::tests::probe_answer(
        &sent[batch + 1],
        wire::tcp_flags::RST | wire::tcp_flags::ACK,
    );
    assert_eq!(h.on_frame(t1, &rst, m), Verdict::ProbeAnswer);
    let sent = drain_tx(&mut h);
    assert_eq!(sent.len(), 10);
    assert_eq!((h.held_now(), h.held_bytes_now()), (0, 0));
    assert_eq!(h.vms().next().unwrap().1, VmPhase::Running);
    assert_eq!(h.counters().resend_batches, 3);
    assert_eq!(h.counters().pace_probes, 2);
}

#[test]
fn a_lost_probe_answer_holds_the_next_batch_back_only_for_resend_wait() {
    let mut h = probing_core_with(1000);
    let batch = h.config().resend_batch;
    let wait = h.config().resend_wait;
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let m = FrameMeta::default();
    for i in 0..batch as u32 + 1 {
        assert_eq!(h.on_frame(t0, &spoofed(i), m), Verdict::Held);
    }
    assert_eq!(hand_over(&mut h, t0, "www").len(), batch + 1);
    assert_eq!(h.poll_at(), Some(t0 + wait));
    h.handle_timeout(t0 + wait);
    assert_eq!(drain_tx(&mut h), vec![spoofed(batch as u32).to_vec()]);
    assert_eq!(h.held_now(), 0);
}

#[test]
fn a_prefix_holding_more_than_its_share_is_evicted_first_oldest_first() {
    let mut h = core_with(32, 100);
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let m = FrameMeta::default();
    // Real clients of other prefixes first (the oldest), then a flood from one /24.
    let clients: Vec<[u8; 74]> = (0..8u8)
        .map(|i| edited_syn_v4(|f| f[26..30].copy_from_slice(&[192, 0, 2 + i, 7])))
        .collect();
    for c in &clients {
        assert_eq!(h.on_frame(t0, c, m), Verdict::Held);
    }
    let one_prefix = |i: u32| {
        edited_syn_v4(|f| {
            *f = spoofed(i);
            f[28] = 9;
        })
    };
    for i in 0..1000 {
        assert_eq!(h.on_frame(t0, &one_prefix(i), m), Verdict::Held);
    }
    assert_eq!(h.held_now(), 32);
    let sent = hand_over(&mut h, t0, "www");
    assert_eq!(sent.len(), 32);
    assert_eq!(
        sent[..8],
        clients.iter().map(|f| f.to_vec()).collect::<Vec<_>>()[..],
        "every other prefix's client kept"
    );
    assert_eq!(
        sent[8],
        one_prefix(1000 - 24).to_vec(),
        "the flood's newest kept"
    );
}

#[test]
fn a_few_clients_of_one_prefix_are_not_evicted_before_older_syns_of_a_random_flood() {
    // Evicting from whichever prefix holds the most would take these three first: a random
    // flood holds one SYN per prefix.
    let mut h = core_with(64, 100);
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let m = FrameMeta::default();
    for i in 0..10 {
        assert_eq!(h.on_frame(t0, &spoofed(i), m), Verdict::Held);
    }
    for port in [20000, 20001, 20002] {
        assert_eq!(h.on_frame(t0, &real(port), m), Verdict::Held);
    }
    for i in 10..71 {
        assert_eq!(h.on_frame(t0, &spoofed(i), m), Verdict::Held);
    }
    let sent = hand_over(&mut h, t0, "www");
    assert_eq!(sent.len(), 64);
    assert_eq!(
        sent[..3],
        [real(20000), real(20001), real(20002)].map(|f| f.to_vec())
    );
}

#[test]
fn a_retransmitted_syn_is_never_evicted_while_one_never_retransmitted_remains() {
    // More real clients than eviction used to look through (64) before taking the oldest.
    let mut h = core_with(100, 100);
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let m = FrameMeta::default();
    let ports = 20000..20080u16;
    for p in ports.clone() {
        assert_eq!(h.on_frame(t0, &real(p), m), Verdict::Held);
    }
    let t1 = t0 + Duration::from_secs(1);
    for p in ports.clone() {
        assert_eq!(h.on_frame(t1, &real(p), m), Verdict::Duplicate);
    }
    for i in 0..1000 {
        assert_eq!(h.on_frame(t1, &spoofed(i), m), Verdict::Held);
    }
    assert_eq!(h.held_now(), 100);
    let sent = hand_over(&mut h, t1, "www");
    assert_eq!(
        sent[..80],
        ports.map(|p| real(p).to_vec()).collect::<Vec<_>>()[..]
    );
    assert_eq!(sent[80], spoofed(980).to_vec());
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

#[test]
fn syns_flooded_to_synjitsu_once_the_guest_is_released_are_not_held_again() {
    let mut h = probing_core_with(10_000);
    let batch = h.config().resend_batch;
    let wait = h.config().resend_wait;
    let t0 = Instant::now();
    booting(&mut h, t0, Handover::Wire);
    let m = FrameMeta::default();
    let n = batch as u32 + 44;
    for i in 0..n {
        assert_eq!(h.on_frame(t0, &spoofed(i), m), Verdict::Held);
    }
    // The guest announces itself: until its release is done, SYNs still come here alone.
    let garp = super::tests::guest_garp();
    assert_eq!(h.on_frame(t0, &garp, m), Verdict::Announced);
    assert_eq!(h.on_frame(t0, &spoofed(n), m), Verdict::Held);
    for op in fdb_ops(&mut h) {
        h.on_fdb_done(t0, op.id);
    }
    // Released, a probe finds its port listening: a batch, and a probe behind it.
    let probe = drain_tx(&mut h);
    assert_eq!(probe.len(), 1);
    let synack = super::tests::probe_answer(&probe[0], wire::tcp_flags::SYN | wire::tcp_flags::ACK);
    assert_eq!(h.on_frame(t0, &synack, m), Verdict::ProbeAnswer);
    assert_eq!(drain_tx(&mut h).len(), 1 + batch + 1);
    // The bridge floods the guest's MAC until it learns its port: the guest gets those
    // SYNs itself, and synjitsu neither holds nor re-sends them.
    for i in n + 1..n + 1001 {
        assert_eq!(h.on_frame(t0, &spoofed(i), m), Verdict::Pass);
    }
    assert_eq!(h.held_now(), 45);
    assert!(drain_tx(&mut h).is_empty());
    // The probe's answer lost: the rest after the wait.
    h.handle_timeout(t0 + wait);
    let sent = drain_tx(&mut h);
    let want: Vec<Vec<u8>> = (batch as u32..=n).map(|i| spoofed(i).to_vec()).collect();
    assert!(sent == want, "{} sent", sent.len());
    assert_eq!(h.vms().next().unwrap().1, VmPhase::Running);
}
