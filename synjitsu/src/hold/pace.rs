//! Re-sending held SYNs to a guest at the pace it takes them: a batch at a time, the next
//! batch once the guest has answered a probe sent behind the last one.
//!
//! Owns which held SYNs may go (those of ports a probe found listening, or all of them once
//! the guest is known to listen) and when the next batch goes. A hand-over of tens of
//! thousands of SYNs sent at once would overflow what lies between synjitsu and the guest's
//! listening socket (a virtual NIC's ring, the kernel's per-CPU backlogs), which drops frames
//! whatever they are, real clients' among them; and it would take one long loop turn, during
//! which jitsu-dns's requests wait. So each batch ([`super::Config::resend_batch`], real
//! clients first, then the oldest) is followed by a probe SYN from synjitsu's own address to
//! the guest: the guest's answer (a SYN-ACK or a RST) comes once it has taken every frame
//! before it, and lets the next batch go. An answer lost, or no probe address, costs a wait
//! of [`super::Config::resend_wait`] at most. Each batch is a few hundred frames: no turn of
//! the loop does work in proportion to what is held.
//!
//! Where a batch goes ([`Vm::resend_via`]): into the bridge once the guest's MAC is released;
//! before that, for a guest that listens and whose bridge port jitsu-dns named, straight out
//! of that port, in the same step as the announcement: the core does not wait for the
//! release to be confirmed (through the forwarding-table thread a cold start's first byte
//! waited ~0.3 ms for it, issue 12; the shell now makes it before sending these frames, and
//! should it fail there the SYNs still go), and the first batch is not flooded to every port
//! of the bridge. Frames for the guest that reach synjitsu while its MAC is still steered here
//! are passed on to the same port ([`super::guest`]).
//!
//! Holding the SYNs is [`super::syn`]'s; deciding that the guest is up, [`super::handover`]'s.

use std::time::Instant;

use shared_proto::{Event, HandoverVia};

use super::outputs::Outputs;
use super::vm::{Held, Probe, Stored, Vm, VmPhase};
use super::{Config, Hold};
use crate::wire::TcpRepr;

/// Which held SYNs may go to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resend {
    /// Every one: the guest listens.
    All,
    /// Those of one family and port: a probe found it listening.
    Port {
        /// IPv6.
        v6: bool,
        /// The guest's port.
        port: u16,
    },
}

/// The pace of one VM's re-sending. See the module documentation.
#[derive(Debug, Default)]
pub(super) struct Pace {
    /// Every held SYN may go.
    all: bool,
    /// The (IPv6, port)s whose held SYNs may go.
    open: Vec<(bool, u16)>,
    /// The next batch may go then (`None`: at once, when there is one).
    next_at: Option<Instant>,
    /// The probe sent behind the last batch, until the guest answers it.
    probe: Option<Probe>,
}

impl Pace {
    /// When [`Vm::pace_due`] must run next for `vm`, if anything waits for it.
    pub(super) fn next_at(&self, vm: &Vm) -> Option<Instant> {
        let waiting = vm.resend_via().is_some() && (self.all || !self.open.is_empty());
        self.next_at.filter(|_| waiting && !vm.held.is_empty())
    }

    /// True if the held SYNs of family `v6` to `port` may go.
    pub(super) fn is_open(&self, v6: bool, port: u16) -> bool {
        self.all || self.open.contains(&(v6, port))
    }

    fn may_go(&self, h: &Held) -> bool {
        matches!(h.stored, Stored::No | Stored::Refused)
            && self.is_open(h.key.local_ip.is_ipv6(), h.key.local_port)
    }
}

/// Where re-sent SYNs go ([`Vm::resend_via`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Via {
    /// Into the bridge from synjitsu's port: the guest's MAC is released.
    Bridge,
    /// Straight out of the guest's own bridge port, named so: its MAC is still steered to
    /// synjitsu (a frame sent into the bridge would come back to synjitsu's port).
    Port(String),
}

/// SYNs refused by the open ports that a batch looks through at most: a batch's work stays
/// bounded when many wait for a port not answering yet.
const SCAN: usize = 1024;

impl Hold {
    /// A segment to one of synjitsu's probe addresses that answers a VM's pace probe: the
    /// guest took the batch before it. True if it was one.
    pub(super) fn on_pace_answer(&mut self, now: Instant, t: &TcpRepr<'_>) -> bool {
        let found = self.vms.iter_mut().find(|vm| {
            vm.pace
                .probe
                .as_ref()
                .is_some_and(|p| p.answered_by(t).is_some())
        });
        let Some(vm) = found else {
            return false;
        };
        let p = vm.pace.probe.take().expect("found just now");
        if p.answered_by(t) == Some(true) {
            // Its half-open connection reset, so the guest forgets it at once.
            p.reset(&self.cfg, &mut self.out, vm.id.mac);
        }
        vm.pace.next_at = None;
        vm.pace_due(&self.cfg, &mut self.out, now);
        vm.finish_handover(&mut self.out);
        true
    }
}

impl Vm {
    /// Where held SYNs re-sent now would go, or `None` while they cannot reach the guest: in
    /// hand-over, into the bridge once the release of its MAC is confirmed; before that, out
    /// of its own port if it listens (its announcement promised it, or jitsu-dns said
    /// `ready`) and jitsu-dns named the port. A guest not known to listen waits for the
    /// release: its probes go through the bridge.
    pub(super) fn resend_via(&self) -> Option<Via> {
        if self.phase != VmPhase::Handover {
            return None;
        }
        if self.release_pending.is_none() {
            return Some(Via::Bridge);
        }
        self.guest_port()
            .filter(|_| self.listening)
            .map(|p| Via::Port(p.to_string()))
    }

    /// Lets the held SYNs `which` selects go to the guest, at its pace (see the module
    /// documentation); what Xenstore has stays (the guest reads it there). Callable from any
    /// path that learns the guest listens: a probe's answer, `Ready`, an announcement made
    /// once listening.
    pub(super) fn resend(&mut self, cfg: &Config, out: &mut Outputs, now: Instant, which: Resend) {
        let opened = match which {
            Resend::All => !std::mem::replace(&mut self.pace.all, true),
            Resend::Port { v6, port } => {
                let new = !self.pace.is_open(v6, port);
                if new {
                    self.pace.open.push((v6, port));
                }
                new
            }
        };
        if opened {
            // What was waiting for this may go at once: the pace spaces batches, not the
            // first one of each port.
            self.pace.next_at = None;
        }
        self.pace_due(cfg, out, now);
    }

    /// Sends the next batch if it is due: real clients first (their clients retransmitted:
    /// known to be real), then the oldest first (the nearest to their client's
    /// retransmission timeout); then a probe behind it, or a wait.
    pub(super) fn pace_due(&mut self, cfg: &Config, out: &mut Outputs, now: Instant) {
        let Some(via) = self.resend_via() else {
            return;
        };
        if self.pace.next_at.is_some_and(|at| at > now) {
            return;
        }
        let pace = &self.pace;
        let batch = cfg.resend_batch.max(1);
        let ids = self.held.next_to_send(batch, SCAN, |h| pace.may_go(h));
        self.pace.next_at = None;
        self.pace.probe = None;
        let Some(&last) = ids.last() else {
            return;
        };
        let mut to = None;
        let count = ids.len();
        for id in ids {
            let h = self.take_held_id(out, id).expect("picked just now");
            if id == last {
                to = Some((h.key.local_ip.is_ipv6(), h.key.local_port));
            }
            let cost = h.cost();
            // Addressed to the guest as it is now: a SYN held before jitsu-dns named a new MAC
            // for it would reach nobody (found by the `hold` fuzz target: out of the guest's
            // port under its old MAC).
            let mut frame = h.frame;
            frame[..6].copy_from_slice(&self.id.mac.0);
            match &via {
                Via::Bridge => out.resend(frame, cost),
                Via::Port(port) => out.resend_to_guest(port, frame),
            }
        }
        out.counters.handed_over_wire += count as u64;
        out.counters.resend_batches += 1;
        tracing::debug!(vm = %self.id.name, count, left = self.held.len(), "held SYNs re-sent to the guest");
        out.emit(Event::Handover {
            name: self.id.name.clone(),
            count: u32::try_from(count).unwrap_or(u32::MAX),
            via: HandoverVia::Wire,
        });
        // The next batch after the wait, or once the guest answers a probe sent behind this
        // one if it was full: a trickle of SYNs arriving meanwhile goes together, however
        // fast it comes, and a lost answer, or no probe address, does not stop the hand-over.
        self.pace.next_at = Some(now + cfg.resend_wait);
        // A probe sent into the bridge while the guest's MAC is still steered here would come
        // back to synjitsu: after a batch sent through the port, the wait alone paces.
        if count < batch || self.held.is_empty() || via != Via::Bridge {
            return;
        }
        let Some((v6, port)) = to else {
            return;
        };
        if let Some(p) = self.new_probe(cfg, out, now, v6, port) {
            p.send(cfg, out, self.id.mac);
            out.counters.pace_probes += 1;
            self.pace.probe = Some(p);
        }
    }
}
