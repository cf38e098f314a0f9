//! Booting: a query (or a wake request) for a VM that is not running starts, resumes or
//! unpauses it within the limits (once synjitsu stands in for it, where it takes the
//! guest's announcement from the wire); the boot is answered and promoted to running when its
//! masking condition is met ([`super::mask`]); a boot that fails, or a synjitsu-tracked guest
//! that never announces itself, lands in `Failed` and the next query tries again.
//!
//! Stopping and what the backend reports on its own are elsewhere ([`super::stop`],
//! [`super::observe`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared_proto::ClientMessage;

use super::mask::{answer_reason, tcp_probe};
use super::synjitsu::{identity, send};
use super::types::{
    Answer, COLD_STARTS_KEPT, ColdStart, Command, Lifecycle, MAX_WAITING_PER_VM, QueryId, Refusal,
    VmName,
};
use super::vm::{Boot, BootKind, Cause, Life, answer_waiting};
use super::{Fleet, cold_start, fmt_duration};
use crate::config::{DrainedAnswer, HandoverKind, StopMode, VmConfig};

/// The longest a boot's start waits for synjitsu to acknowledge `Booting` (a connected
/// synjitsu answers within a millisecond; one that does not is no reason not to boot).
pub(super) const ACK_WAIT: Duration = Duration::from_secs(1);

/// The backend command that starts a boot of `kind`.
fn backend_start(kind: BootKind, cfg: &Arc<VmConfig>) -> Command {
    let vm = cfg.clone();
    match kind {
        BootKind::Fresh => Command::Start { vm },
        BootKind::Resume => Command::Resume { vm },
        BootKind::Unpause => Command::Unpause { vm },
    }
}

/// What a drained VM's queries get while it does not run.
pub(super) fn drained_answer(policy: DrainedAnswer) -> Answer {
    match policy {
        DrainedAnswer::ServFail => Answer::ServFail(Refusal::Drained),
        DrainedAnswer::NxDomain => Answer::NxDomain,
    }
}

impl Fleet {
    pub(super) fn on_query(
        &mut self,
        now: Instant,
        name: &VmName,
        id: Option<QueryId>,
        cause: Cause,
        out: &mut Vec<Command>,
    ) {
        let Some(vm) = self.vms.get_mut(name) else {
            if let Some(id) = id {
                out.push(Command::Answer {
                    id,
                    answer: Answer::ServFail(Refusal::Unknown),
                });
            }
            return;
        };
        if id.is_some() {
            vm.requests += 1;
            vm.last_query = Some(now);
            self.counters_dirty = true;
        }
        let answer_now = match &vm.life {
            Life::Running { .. } => true,
            Life::Booting(b) => b.answered,
            _ => false,
        };
        if answer_now {
            if let Some(id) = id {
                out.push(Command::Answer {
                    id,
                    answer: Answer::Ready,
                });
            }
            return;
        }
        // Drained, or failing and waiting out its back-off: nothing boots it.
        let held_back = if vm.drained {
            Some(drained_answer(vm.cfg.drained))
        } else if matches!(vm.life, Life::Off | Life::Failed)
            && vm.backoff_until.is_some_and(|t| now < t)
        {
            Some(Answer::ServFail(Refusal::BackOff))
        } else {
            None
        };
        if let Some(answer) = held_back {
            if let Some(id) = id {
                out.push(Command::Answer { id, answer });
            }
            return;
        }
        if let Some(id) = id
            && vm.waiting.len() >= MAX_WAITING_PER_VM
        {
            out.push(Command::Answer {
                id,
                answer: Answer::ServFail(Refusal::Overloaded),
            });
            return;
        }
        // Running was answered above.
        if let Some(kind) = vm.life.wake() {
            if let Some(refusal) = self.refuse_boot(now, kind) {
                if let Some(id) = id {
                    out.push(Command::Answer {
                        id,
                        answer: Answer::ServFail(refusal),
                    });
                }
                return;
            }
            self.begin_boot(now, name, kind, cause, out);
        }
        if let Some(id) = id {
            let vm = self.vms.get_mut(name).expect("looked up above");
            vm.waiting.push(id);
        }
    }

    pub(super) fn refuse_boot(&mut self, now: Instant, kind: BootKind) -> Option<Refusal> {
        if let Some(max) = self.settings.max_running
            && self.running_count() >= max
        {
            return Some(Refusal::MaxRunning);
        }
        if kind == BootKind::Fresh
            && let Some(max) = self.settings.max_boots_per_second
        {
            while self
                .boots
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                self.boots.pop_front();
            }
            if self.boots.len() >= max as usize {
                return Some(Refusal::BootRate);
            }
        }
        None
    }

    pub(super) fn begin_boot(
        &mut self,
        now: Instant,
        name: &VmName,
        kind: BootKind,
        cause: Cause,
        out: &mut Vec<Command>,
    ) {
        let syn_up = self.synjitsu_up;
        let vm = self.vms.get_mut(name).expect("caller looked it up");
        let from = vm.life.state();
        let mut boot = Boot {
            kind,
            since: now,
            started: None,
            answered: false,
            syn_tag: None,
            acked: false,
            syn_unavailable: !syn_up,
            announced: false,
            key_seen: None,
            key_watched: false,
            port_open: false,
            probing: false,
            start_held: false,
        };
        let cfg = vm.cfg.clone();
        // synjitsu stands in at once for a wire hand-over, and the guest is started once it
        // does; a Xenstore hand-over needs the domain id, so it waits for the backend.
        let tell_synjitsu = syn_up && cfg.synjitsu_tracked() && cfg.handover == HandoverKind::Wire;
        match kind {
            BootKind::Fresh => {
                vm.starts += 1;
                vm.last_start = Some(now);
                vm.counters = None;
                vm.domid = None;
                vm.port = None;
                self.boots.push_back(now);
                if self.cold_starts.len() >= COLD_STARTS_KEPT {
                    self.cold_starts.pop_front();
                }
                self.cold_starts.push_back(ColdStart {
                    vm: name.clone(),
                    at: now,
                    answered: None,
                    handed_over: None,
                    first_packet: None,
                    failed: false,
                });
            }
            BootKind::Resume | BootKind::Unpause => {}
        }
        if !tell_synjitsu {
            out.push(backend_start(kind, &cfg));
        }
        let cause = match kind {
            BootKind::Fresh => cause.to_string(),
            BootKind::Resume => format!("resume, {cause}"),
            BootKind::Unpause => format!("unpause, {cause}"),
        };
        if tell_synjitsu {
            let msg = ClientMessage::Booting {
                vm: identity(&cfg, None, vm.bridge_port()),
            };
            boot.syn_tag = Some(send(&mut self.next_tag, msg, out));
            boot.start_held = true;
        }
        if kind == BootKind::Fresh
            && let Some(key) = &cfg.wait_for_key
            && key.starts_with('/')
        {
            boot.key_watched = true;
            out.push(Command::WatchKey {
                vm: name.clone(),
                path: key.clone(),
            });
        }
        vm.set_life(Life::Booting(boot));
        out.push(vm.persist(from, cause, None));
    }

    pub(super) fn on_started(
        &mut self,
        now: Instant,
        name: &VmName,
        domid: Option<u32>,
        port: Option<String>,
        out: &mut Vec<Command>,
    ) {
        let syn_up = self.synjitsu_up;
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let Life::Booting(b) = &mut vm.life else {
            return;
        };
        b.started = Some(now);
        b.start_held = false;
        vm.domid = domid;
        // What synjitsu was told at the boot's start, if anything, and what it is now.
        let told_port = vm.fixed_port.clone();
        let bridge_port = port.clone().or_else(|| told_port.clone());
        vm.port = port.clone();
        let cfg = vm.cfg.clone();
        if b.kind == BootKind::Fresh
            && !b.key_watched
            && let (Some(key), Some(domid)) = (&cfg.wait_for_key, domid)
        {
            b.key_watched = true;
            out.push(Command::WatchKey {
                vm: name.clone(),
                path: format!("/local/domain/{domid}/{key}"),
            });
        }
        if b.kind == BootKind::Fresh
            && !b.probing
            && let Some((port, until)) = tcp_probe(&cfg, now)
        {
            b.probing = true;
            out.push(Command::ProbeTcp {
                vm: name.clone(),
                addr: SocketAddr::from((cfg.ip, port)),
                until,
            });
        }
        if cfg.synjitsu_tracked() && syn_up {
            if cfg.handover == HandoverKind::Xenstore && b.syn_tag.is_none() {
                let msg = ClientMessage::Booting {
                    vm: identity(&cfg, domid, bridge_port),
                };
                b.syn_tag = Some(send(&mut self.next_tag, msg, out));
                b.syn_unavailable = false;
            } else if b.kind != BootKind::Fresh {
                // A resumed guest does not announce itself again: hand over now.
                let name = name.to_string();
                send(&mut self.next_tag, ClientMessage::Ready { name }, out);
            } else if let Some(port) = port.filter(|p| Some(p) != told_port.as_ref()) {
                // Named only now (libvirt): from here on synjitsu takes the guest's
                // announcement from this port alone.
                let name = name.to_string();
                send(&mut self.next_tag, ClientMessage::Port { name, port }, out);
            }
        }
        self.settle(now, name, out);
    }

    /// Starts (resumes, unpauses) the booting VM `name` if its start waited for synjitsu,
    /// which acknowledged `Booting`, refused it, went away, or was silent for [`ACK_WAIT`].
    pub(super) fn release_start(&mut self, name: &VmName, out: &mut Vec<Command>) {
        if let Some(vm) = self.vms.get_mut(name)
            && let Life::Booting(b) = &mut vm.life
            && std::mem::take(&mut b.start_held)
        {
            out.push(backend_start(b.kind, &vm.cfg));
        }
    }

    /// Starts the booting VM `name` whose start waited [`ACK_WAIT`] for synjitsu in vain.
    pub(super) fn check_start_held(&mut self, now: Instant, name: &VmName, out: &mut Vec<Command>) {
        let due = self.vms.get(name).is_some_and(
            |vm| matches!(&vm.life, Life::Booting(b) if b.start_held && now >= b.since + ACK_WAIT),
        );
        if due {
            self.release_start(name, out);
        }
    }

    pub(super) fn on_start_failed(
        &mut self,
        now: Instant,
        name: &VmName,
        error: &str,
        out: &mut Vec<Command>,
    ) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let Life::Booting(b) = &vm.life else {
            return;
        };
        if b.kind == BootKind::Fresh
            && let Some(c) = cold_start(&mut self.cold_starts, name, vm.last_start)
        {
            c.failed = true;
        }
        let probing = matches!(&vm.life, Life::Booting(b) if b.probing);
        vm.record_failure(now, error);
        vm.set_life(Life::Failed);
        let cfg = vm.cfg.clone();
        let domid = vm.domid;
        answer_waiting(&mut vm.waiting, Answer::ServFail(Refusal::BootFailed), out);
        out.push(Command::UnwatchKey { vm: name.clone() });
        if probing {
            out.push(Command::StopProbe { vm: name.clone() });
        }
        out.push(vm.persist(Lifecycle::Booting, format!("boot failed: {error}"), None));
        self.notify_stopped(&cfg, domid, out);
    }

    /// Boots a VM that has waiting queries (they arrived while it stopped), or refuses them.
    pub(super) fn restart_for_waiting(
        &mut self,
        now: Instant,
        name: &VmName,
        cause: Cause,
        out: &mut Vec<Command>,
    ) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        if vm.drained {
            let answer = drained_answer(vm.cfg.drained);
            answer_waiting(&mut vm.waiting, answer, out);
            return;
        }
        let kind = match vm.life {
            Life::Off | Life::Failed => BootKind::Fresh,
            Life::Suspended => BootKind::Resume,
            Life::Paused => BootKind::Unpause,
            _ => return,
        };
        if let Some(refusal) = self.refuse_boot(now, kind) {
            let vm = self.vms.get_mut(name).expect("looked up above");
            answer_waiting(&mut vm.waiting, Answer::ServFail(refusal), out);
            return;
        }
        self.begin_boot(now, name, kind, cause, out);
    }

    /// Answers and promotes a booting VM whose masking condition is met.
    pub(super) fn settle(&mut self, now: Instant, name: &VmName, out: &mut Vec<Command>) {
        let syn_up = self.synjitsu_up;
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let Life::Booting(b) = &mut vm.life else {
            return;
        };
        let Some(reason) = answer_reason(&vm.cfg, b, now) else {
            return;
        };
        if !b.answered {
            b.answered = true;
            answer_waiting(&mut vm.waiting, Answer::Ready, out);
            if b.kind == BootKind::Fresh {
                let last = vm.last_start;
                if let Some(c) = cold_start(&mut self.cold_starts, name, last) {
                    c.answered = Some(now);
                }
            }
        }
        if b.started.is_none() {
            return;
        }
        let took = (b.kind == BootKind::Fresh).then(|| now.duration_since(b.since));
        let (key_watched, probing) = (b.key_watched, b.probing);
        // Only synjitsu can tell that the guest came up, unless its readiness key did; while
        // it can, a guest that never announces itself is a boot that failed.
        let unconfirmed = (b.kind == BootKind::Fresh
            && vm.cfg.synjitsu_tracked()
            && !b.announced
            && b.key_seen.is_none()
            && !b.port_open
            && !b.syn_unavailable
            && syn_up)
            .then(|| b.started.map(|s| s + vm.cfg.boot_timeout))
            .flatten();
        if let Some(took) = took {
            vm.record_success();
            vm.last_boot_took = Some(took);
        }
        vm.set_life(Life::Running { since: now });
        vm.unconfirmed_until = unconfirmed;
        vm.last_traffic = None;
        if key_watched {
            out.push(Command::UnwatchKey { vm: name.clone() });
        }
        if probing {
            out.push(Command::StopProbe { vm: name.clone() });
        }
        out.push(Command::Serve {
            vm: name.clone(),
            direct: true,
        });
        out.push(vm.persist(Lifecycle::Booting, reason.into(), took));
    }

    /// Fails a synjitsu-tracked boot whose guest never announced itself: destroyed, then
    /// `Failed`, so the next query (or SYN) boots it again.
    pub(super) fn check_unconfirmed(
        &mut self,
        now: Instant,
        name: &VmName,
        out: &mut Vec<Command>,
    ) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        if !matches!(vm.life, Life::Running { .. }) || vm.unconfirmed_until.is_none_or(|t| now < t)
        {
            return;
        }
        let cause = format!(
            "the guest did not announce itself within {} of its start",
            fmt_duration(vm.cfg.boot_timeout)
        );
        vm.begin_stop(name, StopMode::Destroy, true, cause, out);
    }

    /// The VM's readiness key appeared: the guest listens (answered after its response
    /// delay, as Jitsu slept `response_delay` after the key).
    pub(super) fn on_key_appeared(&mut self, now: Instant, name: &VmName, out: &mut Vec<Command>) {
        let tracked = self.synjitsu_up;
        if let Some(v) = self.vms.get_mut(name)
            && let Life::Booting(b) = &mut v.life
            && b.key_seen.is_none()
        {
            b.key_seen = Some(now);
            if tracked && v.cfg.synjitsu_tracked() {
                if let Some(c) = cold_start(&mut self.cold_starts, name, v.last_start)
                    && c.handed_over.is_none()
                {
                    c.handed_over = Some(now);
                }
                // The guest listens: synjitsu may hand over what it holds.
                let name = name.to_string();
                send(&mut self.next_tag, ClientMessage::Ready { name }, out);
            }
            self.settle(now, name, out);
        }
    }

    /// The guest accepted a connection on its `wait_for=tcp:PORT` port: it is ready.
    pub(super) fn on_port_opened(&mut self, now: Instant, name: &VmName, out: &mut Vec<Command>) {
        if let Some(v) = self.vms.get_mut(name)
            && let Life::Booting(b) = &mut v.life
            && b.probing
        {
            b.port_open = true;
            if self.synjitsu_up && v.cfg.synjitsu_tracked() {
                // As for a readiness key: the guest listens, synjitsu may hand over.
                let name = name.to_string();
                send(&mut self.next_tag, ClientMessage::Ready { name }, out);
            }
            self.settle(now, name, out);
        }
    }
}
