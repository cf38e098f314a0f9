//! The fleet: every VM's lifecycle and the decisions that drive it, as a pure core.
//!
//! [`Fleet::handle`] takes `now` and one [`Event`] (a query that needs the fleet, a tick, a
//! backend result, something synjitsu said, a readiness key that appeared) and returns the
//! [`Command`]s the shell must carry out: start, stop, resume or unpause a VM, answer a
//! waiting query, tell synjitsu, watch a key, persist a change (with the VM as it is after
//! it). [`Fleet::poll_at`] says when the next timer-driven decision is due. Nothing here reads
//! a clock, touches a socket or calls a backend, so every rule is tested with synthetic
//! `Instant`s (in `tests.rs`).
//!
//! Rules (the issue's, with the lead's precedence):
//! - one boot per VM however many queries arrive while it boots; every waiting query is
//!   answered when that boot's masking condition is met;
//! - masking, by precedence: `wait_for=announce` (synjitsu's report of the guest's gratuitous
//!   ARP, else at `wait_for_timeout`) or `wait_for=tcp:PORT` (the guest accepted a
//!   connection on PORT, probed by the shell once the backend started it, else at the
//!   timeout) > `wait_for_key` (the key appeared, else at the timeout) > `use_synjitsu`
//!   (synjitsu acknowledged `Booting`) > `response_delay`. Whenever
//!   synjitsu is not connected or refused the VM, the synjitsu-based modes fall back to
//!   `response_delay`: a synjitsu that is down never blocks an answer;
//! - a suspended VM is resumed and a paused one unpaused instead of booted;
//! - a running VM with no query and no packet sent by its interface for its `idle_timeout`
//!   (2 x TTL by default) is stopped in its `stop_mode` (packets only sent to it, like the
//!   bridge's floods, do not count), unless it is pinned (`pin`, `ctl pin`) and not drained;
//! - a drained VM (`ctl drain`) is not booted by queries, which get its `drained` answer
//!   (SERVFAIL or NXDOMAIN) while it is not running, and is stopped when idle;
//! - after `max_boot_attempts` failed boots in a row, queries do not boot the VM until a
//!   back-off passes (`boot_backoff`, doubled with each further failure, at most 10 min);
//!   they get SERVFAIL meanwhile; `ctl start` goes past it;
//! - at most `max_running` VMs booting, running or stopping, and at most
//!   `max_boots_per_second` boots: past either, the query gets SERVFAIL;
//! - a failed boot answers its waiting queries SERVFAIL and the next query retries; a guest
//!   tracked by synjitsu that has not announced itself (nor shown its readiness key)
//!   `boot_timeout` after the backend started it never came up: it is destroyed and marked failed (synjitsu answers the SYNs
//!   it held with RSTs at its own limit), and the next query boots it again;
//! - a VM the backend reports running is adopted, never booted twice;
//! - a VM whose backend definition has a MAC of its own (a libvirt domain's) takes it, since
//!   its guest sends from it, whatever its keys say, and keeps it across reloads.
//!
//! The fleet does not know DNS: the shell answers queries for running VMs itself from a table
//! and only reports that activity with each [`Event::Tick`].
//!
//! Layout: `types` holds the vocabulary shared with the shell and the other modules;
//! `vm` one VM's record and transitions; `mask` when a boot may be answered; the handlers
//! by concept: `boot`, `stop`, `observe` (what the backend reports), `synjitsu` and
//! `operator` (what `jitsu-dns ctl` asks of a VM).

mod boot;
mod mask;
mod observe;
mod operator;
mod stop;
mod synjitsu;
mod types;
mod vm;

pub use operator::{ActError, Acted, Action, Reply};
pub use synjitsu::identity;
pub use types::{
    Activity, Answer, COLD_STARTS_KEPT, COUNTERS_FLUSH_EVERY, ColdStart, Command, Event,
    IfCounters, Lifecycle, MAX_WAITING_PER_VM, Observed, Persist, QueryId, Refusal, Settings,
    Stored, VmName, VmView,
};

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::VmConfig;
use vm::{Cause, Life, Vm, answer_waiting};

/// Every VM jitsu-dns manages, and the fleet-wide limits.
#[derive(Debug)]
pub struct Fleet {
    settings: Settings,
    vms: BTreeMap<VmName, Vm>,
    /// Boot times within the last second, for `max_boots_per_second`.
    boots: VecDeque<Instant>,
    synjitsu_up: bool,
    next_tag: u64,
    counters_dirty: bool,
    last_flush: Instant,
    /// The last [`COLD_STARTS_KEPT`] fresh boots, oldest first.
    cold_starts: VecDeque<ColdStart>,
}

impl Fleet {
    /// A fleet of `vms`, all off until reconciled.
    pub fn new(
        now: Instant,
        settings: Settings,
        vms: impl IntoIterator<Item = Arc<VmConfig>>,
    ) -> Fleet {
        let mut fleet = Fleet {
            settings,
            vms: BTreeMap::new(),
            boots: VecDeque::new(),
            synjitsu_up: false,
            next_tag: 1,
            counters_dirty: false,
            last_flush: now,
            cold_starts: VecDeque::new(),
        };
        for cfg in vms {
            fleet.vms.insert(cfg.name.clone(), Vm::new(cfg));
        }
        fleet
    }

    /// The state of `vm`.
    pub fn state(&self, vm: &str) -> Option<Lifecycle> {
        self.vms.get(vm).map(|v| v.life.state())
    }

    /// A view of `vm`.
    pub fn view(&self, vm: &str) -> Option<VmView> {
        self.vms.get(vm).map(|v| self.view_of(v))
    }

    /// Every VM's view, by name.
    pub fn views(&self) -> Vec<VmView> {
        self.vms.values().map(|v| self.view_of(v)).collect()
    }

    fn view_of(&self, vm: &Vm) -> VmView {
        VmView {
            idle_deadline: vm.idle_deadline(self.idle_limit()),
            ..vm.view()
        }
    }

    /// The last [`COLD_STARTS_KEPT`] fresh boots, oldest first.
    pub fn cold_starts(&self) -> Vec<ColdStart> {
        self.cold_starts.iter().cloned().collect()
    }

    /// Running VMs, whose backend state and counters are worth polling, each with the epoch
    /// to give back with [`Event::Observed`].
    pub fn polled(&self) -> Vec<(Arc<VmConfig>, u64)> {
        self.vms
            .values()
            .filter(|v| matches!(v.life, Life::Running { .. }))
            .map(|v| (v.cfg.clone(), v.epoch))
            .collect()
    }

    /// Counts queries the shell answered by itself, without deciding anything.
    pub fn record_activity(&mut self, activity: Vec<Activity>) {
        for a in activity {
            if let Some(vm) = self.vms.get_mut(&a.vm) {
                vm.requests += a.queries;
                if a.queries > 0 {
                    self.counters_dirty = true;
                }
                vm.last_query = Some(vm.last_query.map_or(a.last, |l| l.max(a.last)));
            }
        }
    }

    /// Changes the limits and timings (on reload).
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// VMs booting, running or stopping (what `max_running` counts).
    pub fn running_count(&self) -> usize {
        self.vms
            .values()
            .filter(|v| {
                matches!(
                    v.life,
                    Life::Booting(_) | Life::Running { .. } | Life::Stopping { .. }
                )
            })
            .count()
    }

    /// VMs in `state` now.
    pub fn count_in(&self, state: Lifecycle) -> usize {
        self.vms
            .values()
            .filter(|v| v.life.state() == state)
            .count()
    }

    /// True while the synjitsu client is connected.
    pub fn synjitsu_up(&self) -> bool {
        self.synjitsu_up
    }

    /// When [`Event::Tick`] must come next, at the latest.
    pub fn poll_at(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut consider = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        for vm in self.vms.values() {
            match &vm.life {
                Life::Booting(b) => {
                    if let Some(t) = mask::boot_deadline(&vm.cfg, b) {
                        consider(t);
                    }
                    if b.start_held {
                        consider(b.since + boot::ACK_WAIT);
                    }
                }
                Life::Running { .. } => {
                    if let Some(t) = vm.idle_deadline(self.idle_limit()) {
                        consider(t);
                    }
                    if let Some(t) = vm.unconfirmed_until {
                        consider(t);
                    }
                }
                _ => {}
            }
        }
        if self.counters_dirty {
            consider(self.last_flush + self.settings.flush_every);
        }
        at
    }

    /// How long a VM without an `idle_timeout` may idle: twice the TTL.
    pub fn default_idle(&self) -> Duration {
        self.idle_limit()
    }

    fn idle_limit(&self) -> Duration {
        self.settings.ttl * 2
    }

    /// Replaces the configuration: VMs added start off (reconcile them with
    /// [`Event::Reconciled`]); VMs removed are forgotten but left as they are (a running one
    /// keeps running, unmanaged); changed VMs take their new settings at their next boot.
    pub fn reconfigure(
        &mut self,
        _now: Instant,
        vms: impl IntoIterator<Item = Arc<VmConfig>>,
    ) -> Vec<Command> {
        let mut out = Vec::new();
        let new: BTreeMap<VmName, Arc<VmConfig>> =
            vms.into_iter().map(|c| (c.name.clone(), c)).collect();
        let removed: Vec<VmName> = self
            .vms
            .keys()
            .filter(|n| !new.contains_key(*n))
            .cloned()
            .collect();
        for name in removed {
            let mut vm = self.vms.remove(&name).expect("listed above");
            let mut restart = vm.restart.take().map(|(_, ids)| ids);
            for waiting in [&mut vm.waiting, &mut vm.stop_waiting]
                .into_iter()
                .chain(restart.as_mut())
            {
                answer_waiting(waiting, Answer::ServFail(Refusal::Unknown), &mut out);
            }
            out.push(Command::Serve {
                vm: name.clone(),
                direct: false,
            });
            out.push(Command::UnwatchKey { vm: name.clone() });
            out.push(Command::StopProbe { vm: name });
        }
        for (name, cfg) in new {
            match self.vms.get_mut(&name) {
                Some(vm) => {
                    vm.cfg = if vm.adopted_macs.is_empty() {
                        cfg
                    } else {
                        Arc::new(cfg.with_macs(&vm.adopted_macs))
                    }
                }
                None => {
                    self.vms.insert(name, Vm::new(cfg));
                }
            }
        }
        if self.synjitsu_up {
            self.push_sync(&mut out);
        }
        out
    }

    /// Decides what `event` leads to.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        match event {
            Event::Query { id, vm, from } => {
                self.on_query(now, &vm, Some(id), Cause::Query(from), &mut out);
            }
            Event::WakeRequest { vm } => self.on_wake_request(now, &vm, &mut out),
            Event::Tick { activity } => self.on_tick(now, activity, &mut out),
            Event::Counters { vm, counters } => self.on_counters(now, &vm, counters),
            Event::Started { vm, domid, port } => self.on_started(now, &vm, domid, port, &mut out),
            Event::StartFailed { vm, error } => {
                self.on_start_failed(now, &vm, &error, &mut out);
            }
            Event::Stopped { vm } => self.on_stopped(now, &vm, &mut out),
            Event::StopFailed { vm, error } => self.on_stop_failed(now, &vm, &error, &mut out),
            Event::Observed { vm, state, epoch } => {
                let current = self.vms.get(&vm).map(|v| v.epoch);
                if epoch.is_none() || epoch == current {
                    self.on_observed(now, &vm, state, &mut out);
                }
            }
            Event::Reconciled {
                vm,
                stored,
                observed,
            } => self.on_reconciled(now, &vm, stored, observed, &mut out),
            Event::SynjitsuUp => self.on_synjitsu_up(&mut out),
            Event::SynjitsuDown => self.on_synjitsu_down(now, &mut out),
            Event::SynjitsuReplied { tag, ok } => {
                self.on_synjitsu_replied(now, tag, ok, &mut out);
            }
            Event::GuestAnnounced { vm } => self.on_guest_announced(now, &vm, &mut out),
            Event::MacFound { vm, macs } => self.on_mac_found(&vm, &macs, &mut out),
            Event::PortFound { vm, port } => {
                if let Some(v) = self.vms.get_mut(&vm) {
                    v.fixed_port = Some(port);
                }
            }
            Event::KeyAppeared { vm } => self.on_key_appeared(now, &vm, &mut out),
            Event::PortOpened { vm } => self.on_port_opened(now, &vm, &mut out),
        }
        out
    }

    /// Time passed: every timer-driven decision that is due.
    fn on_tick(&mut self, now: Instant, activity: Vec<Activity>, out: &mut Vec<Command>) {
        self.record_activity(activity);
        let names: Vec<VmName> = self.vms.keys().cloned().collect();
        for name in names {
            self.check_start_held(now, &name, out);
            self.settle(now, &name, out);
            self.check_unconfirmed(now, &name, out);
            self.check_idle(now, &name, out);
        }
        if self.counters_dirty && now >= self.last_flush + self.settings.flush_every {
            self.counters_dirty = false;
            self.last_flush = now;
            out.push(Command::Persist(Persist::Counters));
        }
    }
}

/// The cold start of `vm` that began at `at` (its last boot), if it is still kept.
fn cold_start<'c>(
    kept: &'c mut VecDeque<ColdStart>,
    vm: &str,
    at: Option<Instant>,
) -> Option<&'c mut ColdStart> {
    let at = at?;
    kept.iter_mut().rev().find(|c| &*c.vm == vm && c.at == at)
}

/// `2 s`, `1.5 s`, `120 s`.
pub fn fmt_duration(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    format!("{} s", s.trim_end_matches('0').trim_end_matches('.'))
}

#[cfg(test)]
mod tests;
