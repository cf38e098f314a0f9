//! What the backend reports besides the results of our own calls: a VM's state, polled or
//! pushed (a guest that exited, one paused or resumed by someone), what it was at start-up or
//! when the VM was added (reconciliation: a running VM is adopted, never booted twice), and
//! the MAC of its definition.
//!
//! Booting and stopping VMs report through their own results ([`super::boot`],
//! [`super::stop`]).

use std::sync::Arc;
use std::time::Instant;

use shared_proto::Mac;

use super::Fleet;
use super::types::{Answer, Command, Lifecycle, Observed, Persist, Stored, VmName};
use super::vm::{Life, answer_waiting};

impl Fleet {
    pub(super) fn on_observed(
        &mut self,
        now: Instant,
        name: &VmName,
        state: Observed,
        out: &mut Vec<Command>,
    ) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let from = vm.life.state();
        let cfg = vm.cfg.clone();
        match (state, &vm.life) {
            (Observed::Off, Life::Running { .. } | Life::Suspended | Life::Paused) => {
                vm.set_life(Life::Off);
                vm.counters = None;
                out.push(Command::Serve {
                    vm: name.clone(),
                    direct: false,
                });
                out.push(Command::Cleanup { vm: cfg.clone() });
                out.push(vm.persist(from, "exited by itself".into(), None));
                let domid = vm.domid;
                self.notify_stopped(&cfg, domid, out);
            }
            (Observed::Off, Life::Booting(b)) if b.started.is_some() => {
                // It died before it was ready: a failed boot.
                out.push(Command::Cleanup { vm: cfg });
                self.on_start_failed(name, "exited while booting", out);
            }
            (
                Observed::Running { domid },
                Life::Off | Life::Failed | Life::Suspended | Life::Paused,
            ) => {
                vm.set_life(Life::Running { since: now });
                vm.domid = domid.or(vm.domid);
                out.push(Command::Serve {
                    vm: name.clone(),
                    direct: true,
                });
                out.push(vm.persist(from, "found running".into(), None));
                answer_waiting(&mut vm.waiting, Answer::Ready, out);
            }
            (Observed::Running { domid }, Life::Running { .. }) => {
                vm.domid = domid.or(vm.domid);
            }
            (
                Observed::Suspended | Observed::Paused,
                Life::Running { .. } | Life::Off | Life::Failed,
            ) => {
                let life = if state == Observed::Suspended {
                    Life::Suspended
                } else {
                    Life::Paused
                };
                let to = life.state();
                vm.set_life(life);
                out.push(Command::Serve {
                    vm: name.clone(),
                    direct: false,
                });
                out.push(vm.persist(from, format!("found {to}"), None));
            }
            // Booting and stopping VMs report through their own results.
            _ => {}
        }
    }

    pub(super) fn on_reconciled(
        &mut self,
        now: Instant,
        name: &VmName,
        stored: Option<Stored>,
        observed: Observed,
        out: &mut Vec<Command>,
    ) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let stored_state = stored
            .as_ref()
            .and_then(|s| s.state)
            .unwrap_or(Lifecycle::Off);
        if let Some(s) = &stored {
            vm.starts = s.starts;
            vm.requests = s.requests;
        }
        let (life, cause) = match observed {
            Observed::Running { domid } => {
                vm.domid = domid;
                (Life::Running { since: now }, "adopted: already running")
            }
            Observed::Suspended => (Life::Suspended, "adopted: suspended"),
            Observed::Paused => (Life::Paused, "adopted: paused"),
            Observed::Off => {
                let was_up = !matches!(stored_state, Lifecycle::Off | Lifecycle::Failed);
                (
                    Life::Off,
                    if was_up {
                        "gone while jitsu-dns was away"
                    } else {
                        ""
                    },
                )
            }
        };
        let serve = matches!(life, Life::Running { .. });
        vm.set_life(life);
        if serve {
            out.push(Command::Serve {
                vm: name.clone(),
                direct: true,
            });
        }
        if !cause.is_empty() {
            out.push(vm.persist(stored_state, cause.into(), None));
        }
    }

    /// A domain's own MACs are what its guest sends from, whatever the VM's keys say:
    /// synjitsu must steer the first one, and they stay the VM's across reloads.
    pub(super) fn on_mac_found(&mut self, name: &VmName, macs: &[Mac], out: &mut Vec<Command>) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let Some(&mac) = macs.first() else {
            return;
        };
        let adopted = vm.cfg.with_macs(macs);
        if adopted == *vm.cfg {
            return;
        }
        let configured = vm.cfg.mac();
        let keyed = vm.cfg.raw.iter().any(|(k, _)| k == "mac");
        vm.adopted_macs = macs.to_vec();
        vm.cfg = Arc::new(adopted);
        if mac == configured {
            // Only another NIC's MAC: nothing synjitsu or the store follow.
            return;
        }
        out.push(Command::Persist(Persist::Mac {
            vm: name.clone(),
            mac,
            configured,
            keyed,
        }));
        if self.synjitsu_up {
            self.push_sync(out);
        }
    }
}
