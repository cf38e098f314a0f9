//! What jitsu-dns tells the core over the control socket, and the one thing the core asks of
//! it unprompted: to wake a stopped VM that someone is trying to reach.
//!
//! Owns carrying out each request (`booting`, `stopped`, `ready`, `port`, a full `sync` after
//! every reconnect) and refusing the ones that cannot be (an address or MAC another VM has, a
//! Xenstore hand-over without Xenstore), with a [`ControlError`]. Framing and sessions are
//! [`crate::control`]'s; what a VM then does is in the other files of [`super`].

use std::collections::HashSet;
use std::time::Instant;

use shared_proto::{
    ClientMessage, ErrorCode, Event, Handover, PROTOCOL_VERSION, Phase, Reply, VmIdentity, VmStatus,
};

use super::outputs::{FdbAction, Outputs, StoreOp};
use super::vm::{Vm, VmPhase};
use super::{Config, DropReason, Hold};

/// A request refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// The machine-readable reason.
    pub code: ErrorCode,
    /// The detail.
    pub message: String,
}

impl ControlError {
    pub(super) fn new(code: ErrorCode, message: impl Into<String>) -> ControlError {
        ControlError {
            code,
            message: message.into(),
        }
    }
}

impl Hold {
    /// Carries out one request from jitsu-dns (the session's hello is the control server's).
    pub fn on_control(&mut self, now: Instant, msg: &ClientMessage) -> Result<Reply, ControlError> {
        // Any request may change which guests synjitsu passes frames to.
        self.out.guests_generation += 1;
        match msg {
            ClientMessage::Hello { .. } => Ok(Reply::Hello {
                version: PROTOCOL_VERSION,
                server: format!("synjitsu {}", env!("CARGO_PKG_VERSION")),
            }),
            ClientMessage::Booting { vm } => self.on_booting(now, vm).map(|()| Reply::Ack),
            ClientMessage::Stopped { vm } => self.on_stopped(now, vm).map(|()| Reply::Ack),
            ClientMessage::Ready { name } => self.on_ready(now, name).map(|()| Reply::Ack),
            ClientMessage::Port { name, port } => {
                self.on_port(now, name, port).map(|()| Reply::Ack)
            }
            ClientMessage::Sync { vms } => self.on_sync(now, vms).map(|()| Reply::Ack),
        }
    }

    fn on_booting(&mut self, now: Instant, id: &VmIdentity) -> Result<(), ControlError> {
        if let (Handover::Xenstore { .. }, Some(why)) = (id.handover, &self.cfg.xenstore_off) {
            return Err(ControlError::new(
                ErrorCode::Failed,
                format!(
                    "VM {}: xenstore hand-over is unavailable ({why}); use the wire hand-over",
                    id.name
                ),
            ));
        }
        self.vms.check_conflicts(id)?;
        let previous = self.vms.get(&id.name).map(|v| v.phase);
        let vm = self.vms.upsert(&mut self.out, id, VmPhase::Booting);
        if previous == Some(VmPhase::Booting) {
            // Already standing in for it: an identity update, not a new boot. A new MAC was
            // released from its old one by `upsert`, and must be steered here in turn.
            vm.steer(&mut self.out);
            vm.write_pending(&mut self.out);
            return Ok(());
        }
        // A new boot: what Xenstore held for an earlier one is stale, the domid may be new,
        // and the guest may mark its address `managed` before any SYN is written: its node
        // must be there, and its domain's, from now on.
        let garps = self.cfg.garp_count;
        vm.restart(VmPhase::Booting, garps, (garps > 0).then_some(now));
        if let Some(domid) = vm.xenstore_domid() {
            self.out.queue_store(StoreOp::Open {
                vm: id.name.clone(),
                domid,
                ips: vm.addrs(),
            });
        }
        vm.steer(&mut self.out);
        tracing::info!(vm = %id.name, mac = %id.mac, ip = %id.ipv4, port = ?id.port, "booting: standing in");
        // Its first gratuitous ARP is due now. Only its own timers: a sync of thousands of
        // booting VMs would otherwise walk every VM for each of them (the others' timers
        // run at the shell's next turn, as always).
        vm.announce_due(&self.cfg, &mut self.out, now);
        vm.write_pending(&mut self.out);
        Ok(())
    }

    fn on_stopped(&mut self, _now: Instant, id: &VmIdentity) -> Result<(), ControlError> {
        self.vms.check_conflicts(id)?;
        let vm = self.vms.upsert(&mut self.out, id, VmPhase::Stopped);
        // The domain is gone: nothing of its boot stays readable, by it or by whichever guest
        // gets its id next.
        vm.restart(VmPhase::Stopped, 0, None);
        if vm.xenstore_domid().is_some() {
            self.out.queue_store(StoreOp::Seal {
                vm: id.name.clone(),
                ips: vm.addrs(),
            });
        }
        vm.steer(&mut self.out);
        tracing::info!(vm = %id.name, "stopped: holding for a wake-up");
        Ok(())
    }

    fn on_ready(&mut self, now: Instant, name: &str) -> Result<(), ControlError> {
        let Some(vm) = self.vms.get_mut(name) else {
            return Err(ControlError::new(
                ErrorCode::UnknownVm,
                format!("no VM named {name:?}"),
            ));
        };
        tracing::info!(vm = %name, "ready");
        vm.go_up(&self.cfg, &mut self.out, now, true);
        Ok(())
    }

    /// The guest's bridge port, learnt after its start: from now on its announcement counts
    /// only from there (one seen before counted from anywhere), and frames for it go there.
    /// An announcement the watcher saw before, whose copy on synjitsu's port is not read yet
    /// (a guest that wakes in a few ms announces itself while the `port` is on its way),
    /// counts if it came in on this port: that copy will leave it to the watcher.
    fn on_port(&mut self, now: Instant, name: &str, port: &str) -> Result<(), ControlError> {
        let Some(vm) = self.vms.get_mut(name) else {
            return Err(ControlError::new(
                ErrorCode::UnknownVm,
                format!("no VM named {name:?}"),
            ));
        };
        tracing::info!(vm = %name, port, "guest's bridge port");
        vm.id.port = Some(port.to_string());
        let from = vm.unjudged_from.take();
        if vm.phase.intercepting()
            && !vm.announced
            && from.as_deref() == Some(port)
            && vm.announcing_port(&self.cfg).is_some()
        {
            vm.announced(&self.cfg, &mut self.out, now);
        }
        Ok(())
    }

    fn on_sync(&mut self, now: Instant, vms: &[VmStatus]) -> Result<(), ControlError> {
        let keep: HashSet<&str> = vms.iter().map(|s| s.vm.name.as_str()).collect();
        let gone: Vec<String> = self
            .vms
            .iter()
            .map(|v| &v.id.name)
            .filter(|n| !keep.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.forget(&name);
        }
        let mut refused = Vec::new();
        for s in vms {
            let known = self.vms.get(&s.vm.name);
            let up = known.is_some_and(|v| {
                v.announced && matches!(v.phase, VmPhase::Handover | VmPhase::Running)
            });
            let existed = known.is_some();
            let r = match s.phase {
                // synjitsu saw the guest announce itself; jitsu-dns may have missed the event
                // with its old connection. What was seen wins (standing in for a guest that is
                // up would hijack its traffic), and the event is sent again.
                Phase::Booting if up => self.vms.check_conflicts(&s.vm).map(|()| {
                    self.vms.upsert(&mut self.out, &s.vm, VmPhase::Running);
                    self.out.emit(Event::GuestAnnounced {
                        name: s.vm.name.clone(),
                    });
                }),
                Phase::Booting => self.on_booting(now, &s.vm),
                Phase::Stopped => self.on_stopped(now, &s.vm).map(|()| {
                    // A wake request may have been lost with the old connection.
                    if let Some(vm) = self.vms.get_mut(&s.vm.name)
                        && !vm.held.is_empty()
                    {
                        vm.wake(&self.cfg, &mut self.out, now, true);
                    }
                }),
                Phase::Running => self.vms.check_conflicts(&s.vm).map(|()| {
                    let vm = self.vms.upsert(&mut self.out, &s.vm, VmPhase::Running);
                    if existed {
                        vm.go_up(&self.cfg, &mut self.out, now, true);
                    }
                }),
            };
            if let Err(e) = r {
                refused.push(e.message);
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(ControlError::new(
                ErrorCode::Failed,
                format!("sync applied except: {}", refused.join("; ")),
            ))
        }
    }

    /// Forgets a VM absent from a `Sync`: its clients get a RST, its MAC is released, its
    /// Xenstore nodes are removed.
    fn forget(&mut self, name: &str) {
        let Some(mut vm) = self.vms.remove(name) else {
            return;
        };
        vm.reset_all(&mut self.out, DropReason::VmForgotten);
        if vm.steered {
            self.out.queue_fdb(name, vm.id.mac, FdbAction::Release);
        }
        if vm.xenstore_domid().is_some() {
            self.out.queue_store(StoreOp::Close {
                vm: name.to_string(),
                ips: vm.addrs(),
            });
        }
        tracing::info!(vm = %name, "forgotten");
    }
}

impl Vm {
    /// Asks jitsu-dns to start a stopped VM someone is trying to reach: at most once per
    /// `wake_interval`, unless `force`d (after a reconnect the last request may be lost).
    pub(super) fn wake(&mut self, cfg: &Config, out: &mut Outputs, now: Instant, force: bool) {
        if self.phase != VmPhase::Stopped {
            return;
        }
        let due = force
            || self
                .last_wake
                .is_none_or(|t| now.duration_since(t) >= cfg.wake_interval);
        if !due {
            return;
        }
        self.last_wake = Some(now);
        out.counters.wake_requests += 1;
        tracing::info!(vm = %self.id.name, "wake request");
        out.emit(Event::WakeRequest {
            name: self.id.name.clone(),
        });
    }
}
