//! The hand-over: giving a guest the SYNs held for it, from the moment synjitsu steers its MAC
//! until the last held SYN has reached it.
//!
//! Owns the guest's side of a VM's life in the core: steering its MAC here and releasing it
//! (a forwarding-table change the shell confirms with [`Hold::on_fdb_done`]: nothing for the
//! guest goes into the bridge before; a guest that listens gets its SYNs through its own port
//! meanwhile, see [`super::pace`]), the Xenstore writes for guests that replay SYNs themselves (confirmed
//! with [`Hold::on_store_done`]), and probing each held port from synjitsu's own address until
//! the guest answers with a SYN-ACK (not for a guest that promised to announce itself only
//! once it listens: its announcement is the answer); re-sending the held SYNs on the wire, at
//! the guest's pace, is [`super::pace`]'s. Holding them is [`super::syn`]'s; noticing the
//! guest's announcement is [`super::neighbour`]'s.

use std::net::IpAddr;
use std::time::Instant;

use shared_proto::{Event, HandoverVia};

use super::outputs::{FdbAction, Outputs, StoreDone, StoreOp, StoreOutcome, Tx};
use super::pace::Resend;
use super::vm::{Probe, Stored, Vm, VmPhase};
use super::{Config, Hold, Verdict};
use crate::store::layout::HeldSyn;
use crate::wire::{self, TcpOut, TcpRepr};

/// Options a probe SYN carries: MSS 1460 (some stacks refuse option-less SYNs, none these).
const PROBE_OPTIONS: &[u8] = &[2, 4, 0x05, 0xb4];

impl Hold {
    /// A TCP segment to one of synjitsu's probe addresses: a guest answering a probe.
    pub(super) fn on_probe_answer(&mut self, now: Instant, t: &TcpRepr<'_>) -> Verdict {
        if self.on_pace_answer(now, t) {
            return Verdict::ProbeAnswer;
        }
        let found = self.vms.iter_mut().find_map(|vm| {
            let i = vm.probes.iter().position(|p| p.answered_by(t).is_some())?;
            Some((vm, i))
        });
        let Some((vm, i)) = found else {
            return Verdict::Pass;
        };
        let (cfg, out) = (&self.cfg, &mut self.out);
        let p = vm.probes[i].clone();
        if p.answered_by(t) == Some(true) {
            vm.probes.remove(i);
            // Reset the probe's half-open connection so the guest forgets it at once.
            p.reset(cfg, out, vm.id.mac);
            tracing::debug!(vm = %vm.id.name, port = p.port, "probe answered: the port listens");
            let which = Resend::Port {
                v6: p.v6,
                port: p.port,
            };
            vm.resend(cfg, out, now, which);
            vm.progress(cfg, out, now);
        } else if p.answered_by(t) == Some(false) {
            tracing::trace!(vm = %vm.id.name, port = p.port, "probe refused: not listening yet");
        }
        Verdict::ProbeAnswer
    }

    /// The result of a Xenstore write.
    pub fn on_store_done(&mut self, now: Instant, done: StoreDone) {
        let (cfg, out) = (&self.cfg, &mut self.out);
        let vm = self.vms.get_mut(&done.vm);
        let Some(vm) = vm.filter(|vm| vm.held.contains(done.id)) else {
            // Its client got a RST meanwhile: the entry is stale.
            if done.outcome == StoreOutcome::Written {
                out.queue_store(StoreOp::Remove { key: done.key });
            }
            return;
        };
        let h = vm.held.get_mut(done.id).expect("found just now");
        match &done.outcome {
            StoreOutcome::Written => {
                h.stored = Stored::Written;
                out.counters.xenstore_writes += 1;
                out.counters.handed_over_xenstore += 1;
                out.emit(Event::Handover {
                    name: done.vm.clone(),
                    count: 1,
                    via: HandoverVia::Xenstore,
                });
            }
            StoreOutcome::Managed => {
                h.stored = Stored::Refused;
                out.counters.xenstore_skipped_managed += 1;
            }
            StoreOutcome::Failed(why) => {
                h.stored = Stored::Refused;
                out.counters.xenstore_errors += 1;
                tracing::warn!(vm = %done.vm, error = %why, "xenstore write failed; the SYN will go on the wire");
            }
        }
        if vm.phase == VmPhase::Handover {
            // The guest announced while the write ran: drop what it now has, send the rest.
            vm.go_up(cfg, out, now, false);
        }
    }

    /// A forwarding-table change finished (successfully or not: either way it is over). The
    /// shell gives the core the frames its socket holds first: one judged after a release is
    /// taken for a copy the bridge flooded to the guest too.
    pub fn on_fdb_done(&mut self, now: Instant, id: u64) {
        if let Some(vm) = self.vms.iter_mut().find(|v| v.release_pending == Some(id)) {
            vm.release_pending = None;
            vm.progress(&self.cfg, &mut self.out, now);
        }
    }
}

impl Vm {
    /// Steers the VM's MAC to synjitsu's port, unless it is already.
    pub(super) fn steer(&mut self, out: &mut Outputs) {
        if self.steered {
            return;
        }
        out.queue_fdb(&self.id.name, self.id.mac, FdbAction::Steer);
        self.steered = true;
        self.release_pending = None;
    }

    /// The guest announced itself on the bridge. A guest that promised to announce itself
    /// only once it listens (`announces_listening`) listens now: its held SYNs go as soon as
    /// its MAC is released, without a probe's round trip; any other is probed first.
    pub(super) fn announced(&mut self, cfg: &Config, out: &mut Outputs, now: Instant) {
        self.announced = true;
        self.unjudged_from = None;
        out.counters.guests_announced += 1;
        tracing::info!(vm = %self.id.name, "guest announced itself");
        out.emit(Event::GuestAnnounced {
            name: self.id.name.clone(),
        });
        self.go_up(cfg, out, now, self.id.announces_listening);
    }

    /// The guest is up: stop intercepting, release its MAC, hand over what is held.
    pub(super) fn go_up(&mut self, cfg: &Config, out: &mut Outputs, now: Instant, listening: bool) {
        self.garp_at = None;
        self.garp_left = 0;
        self.listening |= listening;
        if self.phase.intercepting() || self.phase == VmPhase::Running {
            self.phase = VmPhase::Handover;
            out.guests_generation += 1;
        }
        // What Xenstore has, the guest reads itself.
        self.take_held(out, |h| h.stored == Stored::Written);
        if std::mem::replace(&mut self.steered, false) {
            self.release_pending =
                Some(out.queue_fdb(&self.id.name, self.id.mac, FdbAction::Release));
        }
        self.progress(cfg, out, now);
    }

    /// Moves a VM in hand-over forward: re-send what may go, probe what must be probed.
    pub(super) fn progress(&mut self, cfg: &Config, out: &mut Outputs, now: Instant) {
        if self.resend_via().is_none() {
            return;
        }
        if self.listening {
            self.resend(cfg, out, now, Resend::All);
        } else {
            // One probe per (family, port) of what waits for the wire.
            let mut wanted: Vec<(bool, u16)> = self
                .held
                .iter()
                .filter(|h| matches!(h.stored, Stored::No | Stored::Refused))
                .map(|h| (h.key.local_ip.is_ipv6(), h.key.local_port))
                .collect();
            wanted.sort_unstable();
            wanted.dedup();
            for (v6, port) in wanted {
                self.probe_port(cfg, out, now, v6, port);
            }
            self.send_due_probes(cfg, out, now);
            // Ports found listening before take what was held since.
            self.pace_due(cfg, out, now);
        }
        self.finish_handover(out);
    }

    /// [`Vm::progress`] for one SYN just held during the hand-over, of family `v6` and to
    /// `port`: without looking through what is held, so that a flood reaching synjitsu while
    /// the hand-over goes on (the bridge floods the guest's MAC until it learns its port) does
    /// not make each SYN cost as much as all of them.
    pub(super) fn progress_held(
        &mut self,
        cfg: &Config,
        out: &mut Outputs,
        now: Instant,
        v6: bool,
        port: u16,
    ) {
        if self.resend_via().is_none() {
            return;
        }
        if self.listening {
            self.resend(cfg, out, now, Resend::All);
        } else {
            self.probe_port(cfg, out, now, v6, port);
            self.send_due_probes(cfg, out, now);
            self.pace_due(cfg, out, now);
        }
        self.finish_handover(out);
    }

    /// Starts probing `port` (of family `v6`) unless a probe of it runs or found it
    /// listening already. Without a probe address for either family, nothing: the wire waits
    /// for `Ready`.
    fn probe_port(&mut self, cfg: &Config, out: &mut Outputs, now: Instant, v6: bool, port: u16) {
        if self.pace.is_open(v6, port) || self.probes.iter().any(|p| p.v6 == v6 && p.port == port) {
            return;
        }
        if let Some(p) = self.new_probe(cfg, out, now, v6, port) {
            self.probes.push(p);
        }
    }

    /// Ends the hand-over once the release is confirmed and nothing is held any more.
    pub(super) fn finish_handover(&mut self, out: &mut Outputs) {
        if self.phase == VmPhase::Handover && self.release_pending.is_none() && self.held.is_empty()
        {
            self.probes.clear();
            self.phase = VmPhase::Running;
            out.guests_generation += 1;
            tracing::info!(vm = %self.id.name, "hand-over complete");
        }
    }

    /// A probe of `port` (of the held SYNs' family `v6`), due at `now`; `None` without a
    /// probe address.
    pub(super) fn new_probe(
        &self,
        cfg: &Config,
        out: &mut Outputs,
        now: Instant,
        v6: bool,
        port: u16,
    ) -> Option<Probe> {
        let (vm_ip, probe_ip) = self.probe_route(cfg, v6)?;
        Some(Probe {
            v6,
            port,
            vm_ip,
            probe_ip,
            src_port: 32768 + (out.rand() % 28232) as u16,
            isn: out.rand() as u32,
            next_at: now,
            gap: cfg.probe_first_interval,
        })
    }

    /// The guest address and synjitsu address to probe with: the held SYN's family if
    /// synjitsu has a probe address in it, else the other family.
    fn probe_route(&self, cfg: &Config, v6: bool) -> Option<(IpAddr, IpAddr)> {
        let v4 = cfg
            .probe_v4
            .map(|p| (IpAddr::V4(self.id.ipv4), IpAddr::V4(p)));
        let v6r = cfg
            .probe_v6
            .zip(self.id.ipv6)
            .map(|(p, ip)| (IpAddr::V6(ip), IpAddr::V6(p)));
        if v6 { v6r.or(v4) } else { v4.or(v6r) }
    }

    /// Sends every probe due at `now` and schedules its next one. The first goes the moment
    /// the guest is said to be up; the next ones fast, then slower (a guest that announced
    /// itself just before it listens is found within a fraction of a millisecond, one that
    /// announced long before costs a probe every `probe_interval`): a fixed 5 ms alone added
    /// 0-5 ms after the listen to every hand-over (issue 12).
    pub(super) fn send_due_probes(&mut self, cfg: &Config, out: &mut Outputs, now: Instant) {
        for p in self.probes.iter_mut().filter(|p| p.next_at <= now) {
            p.next_at = now + p.gap;
            p.gap = (p.gap * 2).min(cfg.probe_interval);
            p.send(cfg, out, self.id.mac);
            tracing::trace!(vm = %self.id.name, port = p.port, "probe sent");
        }
    }

    /// Queues a Xenstore write for every held SYN of a booting Xenstore VM not yet written.
    pub(super) fn write_pending(&mut self, out: &mut Outputs) {
        let Some(domid) = self.xenstore_domid() else {
            return;
        };
        if self.phase != VmPhase::Booting {
            return;
        }
        for h in self.held.iter_mut().filter(|h| h.stored == Stored::No) {
            let random = (out.rand() % 65535) as u16;
            let syn = HeldSyn::new(h.window, h.isn, h.options(), random);
            let queued = out.queue_store(StoreOp::Write {
                id: h.id,
                vm: self.id.name.clone(),
                domid,
                key: h.key,
                syn,
            });
            h.stored = if queued {
                Stored::Pending
            } else {
                Stored::Refused
            };
        }
    }
}

impl Probe {
    /// Whether `t` answers this probe: `Some(true)` a SYN-ACK (the port listens),
    /// `Some(false)` a RST (it does not, yet), `None` not an answer to it.
    pub(super) fn answered_by(&self, t: &TcpRepr<'_>) -> Option<bool> {
        let ours = self.vm_ip == t.src_ip
            && self.port == t.src_port
            && self.probe_ip == t.dst_ip
            && self.src_port == t.dst_port
            && t.flags & wire::tcp_flags::ACK != 0
            && t.ack == self.isn.wrapping_add(1);
        let syn_ack = wire::tcp_flags::SYN | wire::tcp_flags::ACK;
        if !ours {
            None
        } else if t.flags & syn_ack == syn_ack {
            Some(true)
        } else if t.flags & wire::tcp_flags::RST != 0 {
            Some(false)
        } else {
            None
        }
    }

    /// Sends the probe SYN to the guest at `mac`.
    pub(super) fn send(&self, cfg: &Config, out: &mut Outputs, mac: shared_proto::Mac) {
        let syn = (self.isn, wire::tcp_flags::SYN, 64240, PROBE_OPTIONS);
        out.send(self.segment(cfg, mac, syn));
        out.counters.probes_sent += 1;
    }

    /// Resets the half-open connection the guest made for the probe, so it forgets it at once.
    pub(super) fn reset(&self, cfg: &Config, out: &mut Outputs, mac: shared_proto::Mac) {
        let rst = (self.isn.wrapping_add(1), wire::tcp_flags::RST, 0, &[][..]);
        out.send(self.segment(cfg, mac, rst));
        out.counters.probe_resets += 1;
    }

    /// A segment of the probe's connection to the guest at `mac`: its sequence number,
    /// flags, window and options.
    fn segment(
        &self,
        cfg: &Config,
        mac: shared_proto::Mac,
        (seq, flags, window, options): (u32, u8, u16, &'static [u8]),
    ) -> Tx {
        Tx::Tcp(TcpOut {
            eth_src: cfg.own_mac,
            eth_dst: mac,
            src_ip: self.probe_ip,
            dst_ip: self.vm_ip,
            src_port: self.src_port,
            dst_port: self.port,
            seq,
            ack: 0,
            flags,
            window,
            options,
        })
    }
}
