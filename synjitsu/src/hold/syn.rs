//! The SYN table: holding a client's SYN for a VM synjitsu stands in for, and letting it go
//! with a RST when it waited too long or its VM was forgotten.
//!
//! Owns what may be held (a SYN the bridge sent to the VM's MAC, its checksum checked or
//! completed, its options readable), retransmissions (held once, and marking the client as
//! real), the bounds per VM and in total, and, under a flood, a retransmitted SYN refused
//! earlier displacing one that never was (see [`crate::refused`]). Giving the held SYNs to the
//! guest is [`super::handover`]'s.

use std::time::Instant;

use shared_proto::Event;

use super::outputs::{Outputs, StoreOp, Tx};
use super::vm::{Held, Stored, Vm, VmPhase};
use super::{Checksum, Config, DropReason, FrameMeta, Hold, Verdict};
use crate::store::layout::{SynKey, options_from_wire};
use crate::wire::{self, EthHeader, TcpOut, TcpRepr};

impl Hold {
    pub(super) fn on_tcp(
        &mut self,
        now: Instant,
        frame: &[u8],
        eth: &EthHeader,
        t: &TcpRepr<'_>,
        meta: FrameMeta,
    ) -> Verdict {
        if !t.is_syn() {
            return Verdict::Pass;
        }
        let Some(vm) = self.vms.with_ip_mut(t.dst_ip) else {
            return Verdict::Pass;
        };
        // Only frames the bridge sent here for the guest's MAC; a SYN to its address but
        // another MAC (flooded) would not reach the guest either.
        if vm.phase == VmPhase::Running || eth.dst != vm.id.mac {
            return Verdict::Pass;
        }
        let (cfg, out) = (&self.cfg, &mut self.out);
        // A checksum that is complete is checked first (cheap, and a damaged frame must not
        // count as anything); a partial one is completed only once the SYN will be kept, so
        // a flood beyond the bounds costs no copies.
        if meta.checksum == Checksum::Unknown && !wire::tcp_checksum_ok(frame, t) {
            return Verdict::Drop(DropReason::BadChecksum);
        }
        let Ok(options) = options_from_wire(t.options) else {
            return Verdict::Drop(DropReason::BadTcpOptions);
        };
        let key = SynKey {
            local_ip: t.dst_ip,
            local_port: t.dst_port,
            dest_ip: t.src_ip,
            dest_port: t.src_port,
        };
        if let Some(retransmitted) = vm.seen.get_mut(&(key, t.seq)) {
            *retransmitted = true;
            out.counters.retransmit_dedup += 1;
            tracing::trace!(vm = %vm.id.name, client = %t.src_ip, port = t.src_port, "retransmitted SYN");
            vm.wake(cfg, out, now, false);
            return Verdict::Duplicate;
        }
        let full = if vm.held.len() >= cfg.max_held_per_vm {
            Some(DropReason::VmFull)
        } else if out.total_held >= cfg.max_held {
            Some(DropReason::TableFull)
        } else {
            None
        };
        let mut retransmitted = false;
        if let Some(reason) = full {
            // A retransmission of a SYN refused earlier comes from a real client: it takes
            // the place of a SYN that was never retransmitted (likely spoofed), if any.
            let fp = self.refused.fingerprint(&key, t.seq);
            if !self.refused.contains(fp) || !vm.evict_one(out) {
                self.refused.insert(now, fp);
                return Verdict::Drop(reason);
            }
            retransmitted = true;
        }
        let id = out.id();
        let mut frame = frame.to_vec();
        if meta.checksum == Checksum::Partial {
            wire::complete_tcp_checksum(&mut frame, t);
            out.counters.checksums_completed += 1;
        }
        vm.seen.insert((key, t.seq), retransmitted);
        vm.held.push_back(Held {
            id,
            key,
            isn: t.seq,
            window: t.window,
            options,
            client_mac: eth.src,
            frame,
            since: now,
            stored: Stored::No,
        });
        let held = vm.held.len();
        out.total_held += 1;
        out.counters.syns_held += 1;
        tracing::debug!(vm = %vm.id.name, client = %t.src_ip, port = t.dst_port, held, "SYN held");
        out.emit(Event::SynHeld {
            name: vm.id.name.clone(),
            held: u32::try_from(held).unwrap_or(u32::MAX),
        });
        match vm.phase {
            VmPhase::Booting => vm.write_pending(out),
            VmPhase::Stopped => vm.wake(cfg, out, now, false),
            VmPhase::Handover => vm.progress(cfg, out, now),
            VmPhase::Running => {}
        }
        Verdict::Held
    }
}

impl Vm {
    /// Gives up the newest held SYN that was never retransmitted and is not in Xenstore, to
    /// make room; false if there is none.
    fn evict_one(&mut self, out: &mut Outputs) -> bool {
        let victim = self.held.iter().rposition(|h| {
            h.stored == Stored::No && self.seen.get(&(h.key, h.isn)) == Some(&false)
        });
        let Some(i) = victim else {
            return false;
        };
        let h = self.take_held_at(i).expect("index from rposition");
        out.total_held -= 1;
        out.counters.count_drop(DropReason::Evicted);
        tracing::debug!(vm = %self.id.name, client = %h.key.dest_ip, "held SYN evicted for a retransmitted one");
        true
    }

    /// Answers every held SYN older than the hold timeout with a RST and forgets it.
    pub(super) fn expire_held(&mut self, cfg: &Config, out: &mut Outputs, now: Instant) {
        while self
            .held
            .front()
            .is_some_and(|h| h.since + cfg.hold_timeout <= now)
        {
            let h = self.take_held_at(0).expect("checked");
            self.reset_one(out, h, DropReason::HoldTimeout);
        }
    }

    /// Answers every held SYN with a RST and forgets them.
    pub(super) fn reset_all(&mut self, out: &mut Outputs, reason: DropReason) {
        for h in self.take_held(|_| true) {
            self.reset_one(out, h, reason);
        }
    }

    /// Answers one SYN taken from `held` with a RST, and removes its Xenstore entry.
    fn reset_one(&self, out: &mut Outputs, h: Held, reason: DropReason) {
        out.send(Tx::Tcp(TcpOut {
            eth_src: self.id.mac,
            eth_dst: h.client_mac,
            src_ip: h.key.local_ip,
            dst_ip: h.key.dest_ip,
            src_port: h.key.local_port,
            dst_port: h.key.dest_port,
            seq: 0,
            ack: h.isn.wrapping_add(1),
            flags: wire::tcp_flags::RST | wire::tcp_flags::ACK,
            window: 0,
            options: &[],
        }));
        out.total_held -= 1;
        out.counters.count_drop(reason);
        match reason {
            DropReason::VmForgotten => out.counters.rst_vm_forgotten += 1,
            _ => out.counters.rst_hold_timeout += 1,
        }
        if matches!(h.stored, Stored::Written | Stored::Pending) {
            out.queue_store(StoreOp::Remove { key: h.key });
        }
        tracing::debug!(vm = %self.id.name, client = %h.key.dest_ip, reason = reason.as_str(), "held SYN answered with a RST");
    }
}
