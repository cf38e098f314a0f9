//! What an operator asks of one VM through `jitsu-dns ctl`: start (pre-warm), stop,
//! restart, pin, unpin, drain, undrain, decided here like any other event.
//!
//! [`Fleet::act`] takes the uid that asked and a [`QueryId`] to answer later, and says
//! whether the request is done at once, waits (a boot is answered as a query is, when its
//! masking condition is met; a stop when the backend stopped the VM), or is refused. Every
//! change it makes is persisted with the action and the uid in its cause, so the store's
//! history says who did what.
//!
//! The rules, where a request meets a VM in some state:
//! - `start` bypasses the back-off (the operator asks once, knowingly) but not the fleet's
//!   limits, and is refused for a drained VM (undrain it first); a running VM is already
//!   started;
//! - `stop` of a booting VM is refused (the backend's start is in flight; stop it once it
//!   runs); of a VM that is off, done at once; a pinned VM may be stopped;
//! - `restart` stops the VM in its stop mode (`destroy` if that is `suspend`, which would
//!   only freeze it) and boots it again; its answer comes when the new boot is answered;
//! - `pin`, `unpin`, `drain`, `undrain` change nothing when the VM already is so.
//!
//! Whether the socket's peer may ask at all is the shell's: this module trusts the uid.

use std::time::Instant;

use super::Fleet;
use super::types::{Command, Lifecycle, Persist, QueryId, VmName};
use super::vm::{Cause, Life, Vm};
use crate::config::StopMode;

/// What an operator asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Boot it now, masking as for a query.
    Start,
    /// Stop it in this mode (its `stop_mode` if `None`).
    Stop(Option<StopMode>),
    /// Stop it and boot it again.
    Restart,
    /// Never stop it for idleness.
    Pin,
    /// Stop it for idleness again (outranks a `pin` key).
    Unpin,
    /// Queries no longer boot it; stop it when idle.
    Drain,
    /// Undo `drain`.
    Undrain,
}

impl Action {
    /// The `ctl` word, for the history.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop(_) => "stop",
            Action::Restart => "restart",
            Action::Pin => "pin",
            Action::Unpin => "unpin",
            Action::Drain => "drain",
            Action::Undrain => "undrain",
        }
    }
}

/// How a request the fleet took is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Done now; what to tell the operator.
    Done(String),
    /// A [`Command::Answer`] to the request's id follows: `Ready` when the VM is up (start,
    /// restart) or stopped (stop), `ServFail` with why if that failed.
    Wait,
}

/// A request the fleet took: its reply and the commands to carry out.
#[derive(Debug, Clone, PartialEq)]
pub struct Acted {
    /// How the request is answered.
    pub reply: Reply,
    /// What the shell must do.
    pub commands: Vec<Command>,
}

/// Why a request was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActError {
    /// No VM of that name.
    #[error("no VM named {0:?}")]
    UnknownVm(String),
    /// The VM's state or the fleet's limits do not allow it now.
    #[error("{0}")]
    Refused(String),
}

impl Fleet {
    /// `action` on `vm`, asked by `uid`; a reply that waits is answered to `id`.
    pub fn act(
        &mut self,
        now: Instant,
        vm: &str,
        action: Action,
        uid: u32,
        id: QueryId,
    ) -> Result<Acted, ActError> {
        let Some((name, v)) = self.vms.get_key_value(vm) else {
            return Err(ActError::UnknownVm(vm.to_string()));
        };
        let name = name.clone();
        let state = v.life.state();
        let mut out = Vec::new();
        let cause = Cause::Operator(action.as_str(), uid);
        let reply = match action {
            Action::Start => self.op_start(now, &name, id, cause, &mut out)?,
            Action::Restart => match state {
                Lifecycle::Running | Lifecycle::Suspended | Lifecycle::Paused => {
                    let v = self.vm_mut(&name);
                    // Suspending would only freeze it: a restart starts it afresh.
                    let mode = match v.cfg.stop_mode {
                        StopMode::Suspend => StopMode::Destroy,
                        m => m,
                    };
                    if v.drained {
                        return Err(ActError::Refused(format!(
                            "{name} is drained: undrain it first, or stop it"
                        )));
                    }
                    v.restart = Some((uid, vec![id]));
                    v.begin_stop(&name, mode, false, cause.to_string(), &mut out);
                    Reply::Wait
                }
                Lifecycle::Off | Lifecycle::Failed => {
                    self.op_start(now, &name, id, cause, &mut out)?
                }
                Lifecycle::Booting | Lifecycle::Stopping => {
                    return Err(ActError::Refused(format!(
                        "{name} is {state}: restart it once it settled"
                    )));
                }
            },
            Action::Stop(mode) => {
                let v = self.vm_mut(&name);
                let mode = mode.unwrap_or(v.cfg.stop_mode);
                match state {
                    Lifecycle::Off | Lifecycle::Failed => Reply::Done(format!("{name} is {state}")),
                    Lifecycle::Suspended if mode == StopMode::Suspend => {
                        Reply::Done(format!("{name} is suspended"))
                    }
                    Lifecycle::Booting => {
                        return Err(ActError::Refused(format!(
                            "{name} is booting: stop it once it runs"
                        )));
                    }
                    Lifecycle::Stopping => {
                        v.stop_waiting.push(id);
                        Reply::Wait
                    }
                    Lifecycle::Running | Lifecycle::Suspended | Lifecycle::Paused => {
                        v.stop_waiting.push(id);
                        v.begin_stop(&name, mode, false, cause.to_string(), &mut out);
                        Reply::Wait
                    }
                }
            }
            Action::Pin | Action::Unpin => {
                let v = self.vm_mut(&name);
                let want = action == Action::Pin;
                let before = (v.pin_override, v.pinned());
                v.pin_override = Some(want);
                let word = if want { "pinned" } else { "unpinned" };
                if before == (Some(want), want) {
                    Reply::Done(format!("{name} is already {word}"))
                } else {
                    out.push(policy(v, word, cause));
                    Reply::Done(format!("{name} {word}"))
                }
            }
            Action::Drain | Action::Undrain => {
                let v = self.vm_mut(&name);
                let want = action == Action::Drain;
                let word = if want { "drained" } else { "undrained" };
                if v.drained == want {
                    Reply::Done(format!("{name} is already {word}"))
                } else {
                    v.drained = want;
                    out.push(policy(v, word, cause));
                    let how = if want {
                        format!(
                            "; its queries get {} and it is stopped when idle",
                            v.cfg.drained.as_str().to_uppercase()
                        )
                    } else {
                        String::new()
                    };
                    Reply::Done(format!("{name} {word}{how}"))
                }
            }
        };
        Ok(Acted {
            reply,
            commands: out,
        })
    }

    fn vm_mut(&mut self, name: &VmName) -> &mut Vm {
        self.vms.get_mut(name).expect("the caller looked it up")
    }

    /// Boots `name` for an operator (past its back-off), its answer to `id`.
    fn op_start(
        &mut self,
        now: Instant,
        name: &VmName,
        id: QueryId,
        cause: Cause,
        out: &mut Vec<Command>,
    ) -> Result<Reply, ActError> {
        let v = self.vm_mut(name);
        if v.drained {
            return Err(ActError::Refused(format!(
                "{name} is drained: undrain it first"
            )));
        }
        let up = match &v.life {
            Life::Running { .. } => true,
            Life::Booting(b) => b.answered,
            _ => false,
        };
        if up {
            return Ok(Reply::Done(format!("{name} is running")));
        }
        if let Some(kind) = v.life.wake() {
            if let Some(refusal) = self.refuse_boot(now, kind) {
                return Err(ActError::Refused(format!(
                    "{name} not started: limit {} reached",
                    refusal.as_str()
                )));
            }
            // Asked once, knowingly: the back-off is for queries.
            self.vm_mut(name).record_success();
            self.begin_boot(now, name, kind, cause, out);
        }
        self.vm_mut(name).waiting.push(id);
        Ok(Reply::Wait)
    }
}

/// The store's record of an operator's pin or drain.
fn policy(v: &Vm, what: &'static str, cause: Cause) -> Command {
    Command::Persist(Persist::Policy {
        vm: v.cfg.name.clone(),
        what,
        cause: cause.to_string(),
        view: v.view(),
    })
}
