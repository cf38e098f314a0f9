//! Stopping: a running VM without queries or traffic for 2 x TTL is stopped in its stop
//! mode; a stop that finished lands the VM in `Off`, `Suspended` or `Failed` (and boots it
//! again for queries that arrived meanwhile); a stop that failed leaves it running.
//!
//! Booting is [`super::boot`]'s; a VM that stops by itself is [`super::observe`]'s.

use std::time::Instant;

use super::types::{Answer, Command, IfCounters, Lifecycle, Refusal, VmName};
use super::vm::{Cause, Life, answer_waiting};
use super::{Fleet, fmt_duration};
use crate::config::StopMode;

impl Fleet {
    pub(super) fn check_idle(&mut self, now: Instant, name: &VmName, out: &mut Vec<Command>) {
        let default_limit = self.idle_limit();
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let Some(deadline) = vm.idle_deadline(default_limit) else {
            return;
        };
        if now < deadline {
            return;
        }
        let limit = vm.cfg.idle_timeout.unwrap_or(default_limit);
        let cause = if vm.drained {
            format!("drained, idle for {}", fmt_duration(limit))
        } else {
            format!("idle for {}", fmt_duration(limit))
        };
        vm.begin_stop(name, vm.cfg.stop_mode, false, cause, out);
    }

    /// New counters of the VM's interface: traffic the guest sent keeps it up.
    pub(super) fn on_counters(
        &mut self,
        now: Instant,
        name: &VmName,
        counters: Option<IfCounters>,
    ) {
        if let Some(v) = self.vms.get_mut(name)
            && let Some(c) = counters
        {
            // Only what the guest sends counts: broadcasts and multicasts flooded to
            // every port of a busy bridge would keep every VM up for ever, while any
            // real conversation makes the guest send too.
            if v.counters.is_some_and(|old| old.rx_packets != c.rx_packets) {
                v.last_traffic = Some(now);
                if let Some(cs) = super::cold_start(&mut self.cold_starts, name, v.last_start)
                    && cs.first_packet.is_none()
                {
                    cs.first_packet = Some(now);
                }
            }
            v.counters = Some(c);
        }
    }

    pub(super) fn on_stopped(&mut self, now: Instant, name: &VmName, out: &mut Vec<Command>) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let Life::Stopping {
            mode,
            pending_wake,
            failed,
        } = vm.life
        else {
            return;
        };
        let to = if failed {
            vm.record_failure(now, "the guest did not announce itself");
            Life::Failed
        } else if mode == StopMode::Suspend {
            Life::Suspended
        } else {
            Life::Off
        };
        vm.set_life(to);
        vm.counters = None;
        let cfg = vm.cfg.clone();
        let domid = vm.domid;
        let wake = pending_wake || !vm.waiting.is_empty();
        let restart = vm.restart.take();
        if let Some((_, ids)) = &restart {
            // Its requests wait for the new boot as queries do.
            vm.waiting.extend(ids);
        }
        answer_waiting(&mut vm.stop_waiting, Answer::Ready, out);
        out.push(vm.persist(Lifecycle::Stopping, format!("stopped ({mode})"), None));
        self.notify_stopped(&cfg, domid, out);
        if let Some((uid, _)) = restart {
            self.restart_for_waiting(now, name, Cause::Operator("restart", uid), out);
        } else if wake {
            // Queries came while it stopped: bring it back for them.
            self.restart_for_waiting(now, name, Cause::Waiting, out);
        }
    }

    /// A stop failed: the VM still runs as far as anyone can tell.
    pub(super) fn on_stop_failed(
        &mut self,
        now: Instant,
        name: &VmName,
        error: &str,
        out: &mut Vec<Command>,
    ) {
        if let Some(v) = self.vms.get_mut(name)
            && matches!(v.life, Life::Stopping { .. })
        {
            // Serve it and try again after another idle period.
            v.set_life(Life::Running { since: now });
            v.last_traffic = Some(now);
            out.push(Command::Serve {
                vm: name.clone(),
                direct: true,
            });
            answer_waiting(&mut v.waiting, Answer::Ready, out);
            answer_waiting(
                &mut v.stop_waiting,
                Answer::ServFail(Refusal::StopFailed),
                out,
            );
            if let Some((_, mut ids)) = v.restart.take() {
                answer_waiting(&mut ids, Answer::ServFail(Refusal::StopFailed), out);
            }
            v.last_error = Some(format!("stop failed: {error}"));
            out.push(v.persist(Lifecycle::Stopping, format!("stop failed: {error}"), None));
        }
    }
}
