//! The conversation with synjitsu: a full sync at every (re)connect, `Booting` and `Ready`
//! for the VMs it tracks, `Stopped` so it can wake them, and what its replies and reports
//! (an acknowledgement, a guest's announcement, a SYN for a VM that is off) change.
//!
//! The client and its socket are the shell's ([`crate::synjitsu`]): the fleet only says what
//! to send, each request under a tag its reply comes back with.

use std::time::Instant;

use shared_proto::{ClientMessage, Handover, Phase, VmIdentity, VmStatus};

use super::Fleet;
use super::types::{Command, VmName};
use super::vm::{Cause, Life};
use crate::config::{Announce, HandoverKind, VmConfig};

impl Fleet {
    /// synjitsu connected: it hears of every VM it tracks at once.
    pub(super) fn on_synjitsu_up(&mut self, out: &mut Vec<Command>) {
        self.synjitsu_up = true;
        self.push_sync(out);
    }

    /// synjitsu is gone: boots waiting for it fall back to their delay.
    pub(super) fn on_synjitsu_down(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.synjitsu_up = false;
        for vm in self.vms.values_mut() {
            // Nobody can report its announcement now: give it the benefit of the doubt.
            vm.unconfirmed_until = None;
            if let Life::Booting(b) = &mut vm.life
                && !b.acked
            {
                b.syn_unavailable = true;
            }
        }
        let names: Vec<VmName> = self.vms.keys().cloned().collect();
        for name in names {
            self.release_start(&name, out);
            self.settle(now, &name, out);
        }
    }

    /// synjitsu answered the request tagged `tag`.
    pub(super) fn on_synjitsu_replied(
        &mut self,
        now: Instant,
        tag: u64,
        ok: bool,
        out: &mut Vec<Command>,
    ) {
        let hit = self
            .vms
            .iter_mut()
            .find_map(|(name, vm)| match &mut vm.life {
                Life::Booting(b) if b.syn_tag == Some(tag) => {
                    if ok {
                        b.acked = true;
                    } else {
                        b.syn_unavailable = true;
                    }
                    Some(name.clone())
                }
                _ => None,
            });
        if let Some(name) = hit {
            // synjitsu stands in for the guest now (or cannot): it may start.
            self.release_start(&name, out);
            self.settle(now, &name, out);
        }
    }

    /// synjitsu saw the guest's own gratuitous ARP.
    pub(super) fn on_guest_announced(
        &mut self,
        now: Instant,
        name: &VmName,
        out: &mut Vec<Command>,
    ) {
        if let Some(v) = self.vms.get_mut(name) {
            // Answered early (synjitsu held its SYNs), it is confirmed now.
            v.unconfirmed_until = None;
            // The announcement ends synjitsu's hold: its SYNs go to the guest now.
            if let Some(c) = super::cold_start(&mut self.cold_starts, name, v.last_start)
                && c.handed_over.is_none()
            {
                c.handed_over = Some(now);
            }
            if let Life::Booting(b) = &mut v.life {
                b.announced = true;
                self.settle(now, name, out);
            }
        }
    }

    /// synjitsu holds a SYN for the VM: boot it as a query would.
    pub(super) fn on_wake_request(&mut self, now: Instant, name: &VmName, out: &mut Vec<Command>) {
        if let Some(v) = self.vms.get(name)
            && matches!(v.life, Life::Running { .. })
            && v.cfg.synjitsu_tracked()
            && self.synjitsu_up
        {
            // synjitsu holds a SYN for a VM that runs: its view is stale.
            let name = name.to_string();
            send(&mut self.next_tag, ClientMessage::Ready { name }, out);
        } else {
            self.on_query(now, name, None, Cause::Wake, out);
        }
    }

    /// Tells synjitsu every VM it tracks and its phase.
    pub(super) fn push_sync(&mut self, out: &mut Vec<Command>) {
        let vms = self
            .vms
            .values()
            .filter(|v| v.cfg.synjitsu_tracked())
            .map(|v| {
                let (phase, port) = match v.life {
                    Life::Booting(_) => (Phase::Booting, v.bridge_port()),
                    Life::Running { .. } => (Phase::Running, v.bridge_port()),
                    // An old run's port may be another guest's by now.
                    _ => (Phase::Stopped, None),
                };
                VmStatus {
                    vm: identity(&v.cfg, v.domid, port),
                    phase,
                }
            })
            .collect();
        send(&mut self.next_tag, ClientMessage::Sync { vms }, out);
    }

    /// Tells synjitsu, if it is connected, that a VM it tracks stopped.
    pub(super) fn notify_stopped(
        &mut self,
        cfg: &VmConfig,
        domid: Option<u32>,
        out: &mut Vec<Command>,
    ) {
        if self.synjitsu_up && cfg.synjitsu_tracked() {
            let msg = ClientMessage::Stopped {
                vm: identity(cfg, domid, None),
            };
            send(&mut self.next_tag, msg, out);
        }
    }
}

/// What synjitsu is told about a VM, with its bridge port if known. A Xenstore hand-over with
/// no domain id yet (a VM that never ran) is announced as wire: synjitsu learns the domain id
/// with the next `Booting`.
pub fn identity(cfg: &VmConfig, domid: Option<u32>, port: Option<String>) -> VmIdentity {
    let handover = match (cfg.handover, domid) {
        (HandoverKind::Xenstore, Some(domid)) if domid != 0 => Handover::Xenstore { domid },
        _ => Handover::Wire,
    };
    VmIdentity {
        name: cfg.name.to_string(),
        mac: cfg.mac(),
        ipv4: cfg.ip,
        ipv6: cfg.ip6,
        handover,
        port,
        announces_listening: cfg.announce == Announce::Listening,
    }
}

/// Queues `msg` for synjitsu under the next tag, and returns the tag.
pub(super) fn send(next_tag: &mut u64, msg: ClientMessage, out: &mut Vec<Command>) -> u64 {
    let tag = *next_tag;
    *next_tag += 1;
    out.push(Command::Synjitsu { tag, msg });
    tag
}
