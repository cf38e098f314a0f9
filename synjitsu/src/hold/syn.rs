//! The SYN table: holding a client's SYN for a VM synjitsu stands in for, and letting it go
//! with a RST when it waited too long or its VM was forgotten.
//!
//! Owns what may be held (a SYN the bridge sent to the VM's MAC, its checksum checked or
//! completed, its options readable), retransmissions (held once, and marking the client as
//! real), and the byte budgets per VM and in total: under a flood every new SYN is held and
//! one never retransmitted is evicted to make room for it (which: [`super::table`]; why the
//! oldest: [`WhenFull`]), from the VM itself, or for the total from the VM holding the most
//! once this one holds its share. An evicted or refused SYN is remembered (see
//! [`crate::refused`]) so that its retransmission is held as a real client's. Giving the held
//! SYNs to the guest is [`super::handover`]'s and [`super::pace`]'s.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use shared_proto::Event;

use super::outputs::{Outputs, StoreOp, Tx};
use super::vm::{Held, Stored, Vm, VmPhase, held_cost};
use super::{Checksum, Config, DropReason, FrameMeta, Hold, Verdict, WhenFull};
use crate::refused::Refused;
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
        // Once its release is done, the bridge no longer sends the guest's frames here alone:
        // it knows the guest's port (none come here) or floods them, and the guest gets its
        // own copy. Holding ours would send it the same SYN twice, and under a flood keep the
        // hand-over going, at the cost of holding each SYN, for as long as the flood lasts.
        if vm.phase == VmPhase::Handover && !vm.steered && vm.release_pending.is_none() {
            return Verdict::Pass;
        }
        let (cfg, out) = (&self.cfg, &mut self.out);
        // A checksum that is complete is checked first (cheap, and a damaged frame must not
        // count as anything); a partial one is completed only once the SYN will be kept, so
        // a flood beyond the bounds costs no copies.
        if meta.checksum == Checksum::Unknown && !wire::tcp_checksum_ok(frame, t) {
            return Verdict::Drop(DropReason::BadChecksum);
        }
        // Read now so that a SYN whose options cannot be read is never held; kept only in
        // the frame (see `Held::options`).
        if options_from_wire(t.options).is_err() {
            return Verdict::Drop(DropReason::BadTcpOptions);
        }
        let key = SynKey {
            local_ip: t.dst_ip,
            local_port: t.dst_port,
            dest_ip: t.src_ip,
            dest_port: t.src_port,
        };
        if let Some(id) = vm.held.lookup(&key, t.seq) {
            vm.held.confirm(id);
            out.counters.retransmit_dedup += 1;
            tracing::trace!(vm = %vm.id.name, client = %t.src_ip, port = t.src_port, "retransmitted SYN");
            vm.wake(cfg, out, now, false);
            return Verdict::Duplicate;
        }
        let cost = held_cost(frame.len());
        let fp = self.refused.fingerprint(&key, t.seq);
        let retransmitted = match self.make_room(now, t.dst_ip, cost, fp) {
            Ok(retransmitted) => retransmitted,
            Err(reason) => return Verdict::Drop(reason),
        };
        let (cfg, out) = (&self.cfg, &mut self.out);
        let vm = self
            .vms
            .with_ip_mut(t.dst_ip)
            .expect("found above, and making room forgets no VM");
        let id = out.id();
        let mut frame = frame.to_vec();
        if meta.checksum == Checksum::Partial {
            wire::complete_tcp_checksum(&mut frame, t);
            out.counters.checksums_completed += 1;
        }
        let h = Held {
            id,
            key,
            isn: t.seq,
            window: t.window,
            client_mac: eth.src,
            frame,
            since: now,
            stored: Stored::No,
        };
        vm.push_held(out, h, retransmitted);
        let held = vm.held.len();
        out.counters.syns_held += 1;
        tracing::debug!(vm = %vm.id.name, client = %t.src_ip, port = t.dst_port, held, "SYN held");
        // One event for the first SYN, then at most one per interval: a flood must not
        // become a flood of events for jitsu-dns.
        if held == 1
            || vm
                .syn_event_at
                .is_none_or(|at| now.saturating_duration_since(at) >= SYN_HELD_EVENT_INTERVAL)
        {
            vm.syn_event_at = Some(now);
            out.emit(Event::SynHeld {
                name: vm.id.name.clone(),
                held: u32::try_from(held).unwrap_or(u32::MAX),
            });
        }
        match vm.phase {
            VmPhase::Booting => vm.write_pending(out),
            VmPhase::Stopped => vm.wake(cfg, out, now, false),
            VmPhase::Handover => {
                vm.progress_held(cfg, out, now, t.dst_ip.is_ipv6(), t.dst_port);
            }
            VmPhase::Running => {}
        }
        Verdict::Held
    }
}

/// A VM's `SynHeld` events come at most this often, besides the one for its first SYN.
const SYN_HELD_EVENT_INTERVAL: Duration = Duration::from_millis(100);

/// Where the total budget takes room from.
enum Victim {
    /// The VM the new SYN is for.
    This,
    /// Another VM, holding more than this one.
    Other(String),
}

impl Hold {
    /// Makes room for a SYN of `cost` bytes for the VM at `ip`, as [`Config::when_full`]
    /// says; whether its client is known to be real (an earlier copy was refused or
    /// evicted), or why it cannot be held.
    fn make_room(
        &mut self,
        now: Instant,
        ip: IpAddr,
        cost: usize,
        fp: u64,
    ) -> Result<bool, DropReason> {
        let cfg = &self.cfg;
        let out = &mut self.out;
        let vm = self.vms.with_ip_mut(ip).expect("the caller found it");
        let vm_full = |vm: &Vm| {
            vm.held_bytes + cost > cfg.held_bytes_per_vm
                || cfg.max_held_per_vm.is_some_and(|m| vm.held.len() >= m)
        };
        let table_full = |out: &Outputs| {
            out.held_bytes + out.resend_bytes + cost > cfg.held_bytes
                || cfg.max_held.is_some_and(|m| out.total_held >= m)
        };
        if cfg.when_full == WhenFull::Refuse {
            let full = if vm_full(vm) {
                Some(DropReason::VmFull)
            } else if table_full(out) {
                Some(DropReason::TableFull)
            } else {
                None
            };
            let Some(reason) = full else {
                return Ok(false);
            };
            // A retransmission of a SYN refused earlier comes from a real client: it takes
            // the place of a SYN that was never retransmitted (likely spoofed), if any.
            if !self.refused.contains(fp) || !vm.evict_newest_unconfirmed(out) {
                self.refused.insert(now, fp);
                return Err(reason);
            }
            return Ok(true);
        }
        let real = self.refused.contains(fp);
        while vm_full(vm) {
            if !vm.evict(out, &mut self.refused, now) {
                return Err(DropReason::VmFull);
            }
        }
        while table_full(out) {
            // From this VM while it holds its share of the total, else from the VM that
            // holds the most: a flood against one VM cannot take the others' room.
            let this = self.vms.with_ip(ip).expect("the caller found it");
            let holders = out.holding.len() + usize::from(this.held.is_empty());
            let victim = if this.held_bytes >= cfg.held_bytes / holders.max(1) {
                Victim::This
            } else {
                let vms = &self.vms;
                match out
                    .holding
                    .iter()
                    .max_by_key(|n| vms.get(n).map_or(0, |v| v.held_bytes))
                {
                    Some(n) if *n != this.id.name => Victim::Other(n.clone()),
                    _ => Victim::This,
                }
            };
            let victim = match victim {
                Victim::This => self.vms.with_ip_mut(ip),
                Victim::Other(name) => self.vms.get_mut(&name),
            }
            .expect("a VM holding SYNs is known");
            if !victim.evict(out, &mut self.refused, now) {
                return Err(DropReason::TableFull);
            }
        }
        Ok(real)
    }
}

impl Vm {
    /// Gives up the held SYN [`super::table::Table::victim`] picks (never a real client's
    /// while another remains; a prefix holding more than its share first; else the oldest),
    /// and remembers it (with `refused`) so that its retransmission is known for a real
    /// client's; false if nothing is held. No RST: its source is likely spoofed.
    fn evict(&mut self, out: &mut Outputs, refused: &mut Refused, now: Instant) -> bool {
        let Some(h) = self.held.victim().and_then(|id| self.take_held_id(out, id)) else {
            return false;
        };
        refused.insert(now, refused.fingerprint(&h.key, h.isn));
        if h.stored == Stored::Written {
            out.queue_store(StoreOp::Remove { key: h.key });
        }
        out.counters.count_drop(DropReason::Evicted);
        tracing::trace!(vm = %self.id.name, client = %h.key.dest_ip, "held SYN evicted");
        true
    }

    /// Gives up the newest held SYN that was never retransmitted and is not in Xenstore, to
    /// make room ([`WhenFull::Refuse`]); false if there is none.
    fn evict_newest_unconfirmed(&mut self, out: &mut Outputs) -> bool {
        let Some(id) = self.held.newest_unconfirmed(|h| h.stored == Stored::No) else {
            return false;
        };
        self.take_held_id(out, id).expect("found just now");
        out.counters.count_drop(DropReason::Evicted);
        tracing::debug!(vm = %self.id.name, "held SYN evicted for a retransmitted one");
        true
    }

    /// Answers every held SYN older than the hold timeout with a RST and forgets it.
    pub(super) fn expire_held(&mut self, cfg: &Config, out: &mut Outputs, now: Instant) {
        while let Some(id) = self
            .held
            .oldest()
            .filter(|h| h.since + cfg.hold_timeout <= now)
            .map(|h| h.id)
        {
            let h = self.take_held_id(out, id).expect("found just now");
            self.reset_one(out, h, DropReason::HoldTimeout);
        }
    }

    /// Answers every held SYN with a RST and forgets them.
    pub(super) fn reset_all(&mut self, out: &mut Outputs, reason: DropReason) {
        for h in self.take_held(out, |_| true) {
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
