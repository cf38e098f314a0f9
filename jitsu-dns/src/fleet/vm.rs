//! One VM's record: its lifecycle state with what a boot or a stop has seen so far, its
//! counters and waiting queries, and the transitions every handler shares (a new state, a
//! stop, the record of a change for the store).
//!
//! It does not decide when a VM changes state: the handlers of [`super::Fleet`] do.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared_proto::Mac;

use super::types::{Answer, Command, IfCounters, Lifecycle, Persist, QueryId, VmName, VmView};
use crate::config::{StopMode, VmConfig};

/// How a boot brings the VM up: a fresh start, or a resume or unpause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BootKind {
    Fresh,
    Resume,
    Unpause,
}

/// What a boot in progress has seen so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Boot {
    pub(super) kind: BootKind,
    pub(super) since: Instant,
    /// When the backend reported the VM started.
    pub(super) started: Option<Instant>,
    /// Waiting queries were answered (new ones are answered at once).
    pub(super) answered: bool,
    /// The `Booting` request's tag, if it was sent.
    pub(super) syn_tag: Option<u64>,
    /// synjitsu acknowledged `Booting`.
    pub(super) acked: bool,
    /// synjitsu could not take the VM (down, refused): fall back to the delay.
    pub(super) syn_unavailable: bool,
    pub(super) announced: bool,
    /// When the readiness key appeared.
    pub(super) key_seen: Option<Instant>,
    pub(super) key_watched: bool,
}

/// A VM's lifecycle state, with what each state must remember.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Life {
    Off,
    Failed,
    Booting(Boot),
    Running {
        since: Instant,
    },
    Suspended,
    Paused,
    Stopping {
        mode: StopMode,
        pending_wake: bool,
        /// The stop ends a boot that never came up: it lands in `Failed`, not `Off`.
        failed: bool,
    },
}

impl Life {
    pub(super) fn state(&self) -> Lifecycle {
        match self {
            Life::Off => Lifecycle::Off,
            Life::Failed => Lifecycle::Failed,
            Life::Booting(_) => Lifecycle::Booting,
            Life::Running { .. } => Lifecycle::Running,
            Life::Suspended => Lifecycle::Suspended,
            Life::Paused => Lifecycle::Paused,
            Life::Stopping { .. } => Lifecycle::Stopping,
        }
    }
}

/// One VM: its configuration, lifecycle, waiting queries and counters.
#[derive(Debug, Clone)]
pub(super) struct Vm {
    pub(super) cfg: Arc<VmConfig>,
    pub(super) life: Life,
    /// Bumped on every change of `life`, so observations made before a change are ignored.
    pub(super) epoch: u64,
    pub(super) waiting: Vec<QueryId>,
    pub(super) domid: Option<u32>,
    pub(super) last_query: Option<Instant>,
    pub(super) last_traffic: Option<Instant>,
    pub(super) counters: Option<IfCounters>,
    pub(super) requests: u64,
    pub(super) starts: u64,
    pub(super) last_start: Option<Instant>,
    /// While a synjitsu-tracked guest runs without having announced itself: when its boot
    /// is failed. Cleared by its announcement and by every change of `life`.
    pub(super) unconfirmed_until: Option<Instant>,
    /// The MACs taken from the VM's domain ([`super::Event::MacFound`]), kept across
    /// reloads; empty until then.
    pub(super) adopted_macs: Vec<Mac>,
    /// The bridge port of the guest's interface in its current run ([`super::Event::Started`]);
    /// forgotten at each fresh boot (libvirt names a new one).
    pub(super) port: Option<String>,
    /// The port the backend gives it at every start ([`super::Event::PortFound`]).
    pub(super) fixed_port: Option<String>,
}

impl Vm {
    pub(super) fn new(cfg: Arc<VmConfig>) -> Vm {
        Vm {
            cfg,
            life: Life::Off,
            epoch: 0,
            waiting: Vec::new(),
            domid: None,
            last_query: None,
            last_traffic: None,
            counters: None,
            requests: 0,
            starts: 0,
            last_start: None,
            unconfirmed_until: None,
            adopted_macs: Vec::new(),
            port: None,
            fixed_port: None,
        }
    }

    /// The guest's bridge port as far as it is known: this run's, else the one it always has.
    pub(super) fn bridge_port(&self) -> Option<String> {
        self.port.clone().or_else(|| self.fixed_port.clone())
    }

    pub(super) fn set_life(&mut self, life: Life) {
        self.life = life;
        self.epoch += 1;
        self.unconfirmed_until = None;
    }

    /// Stops the running VM `name` in `mode`; `failed`: it lands in `Failed`, not `Off`.
    pub(super) fn begin_stop(
        &mut self,
        name: &VmName,
        mode: StopMode,
        failed: bool,
        cause: String,
        out: &mut Vec<Command>,
    ) {
        self.set_life(Life::Stopping {
            mode,
            pending_wake: false,
            failed,
        });
        out.push(Command::Serve {
            vm: name.clone(),
            direct: false,
        });
        out.push(Command::Stop {
            vm: self.cfg.clone(),
            mode,
        });
        out.push(self.persist(Lifecycle::Running, cause, None));
    }

    /// The store's record of this VM's change from `from` to the state it is in now, with
    /// its view after the change.
    pub(super) fn persist(
        &self,
        from: Lifecycle,
        cause: String,
        boot_took: Option<Duration>,
    ) -> Command {
        Command::Persist(Persist::Lifecycle {
            vm: self.cfg.name.clone(),
            from,
            to: self.life.state(),
            cause,
            boot_took,
            view: self.view(),
        })
    }

    pub(super) fn view(&self) -> VmView {
        VmView {
            cfg: self.cfg.clone(),
            state: self.life.state(),
            domid: self.domid,
            starts: self.starts,
            requests: self.requests,
            last_request: self.last_query,
            last_start: self.last_start,
        }
    }

    /// The start of the current idle period of a VM running since `since`.
    pub(super) fn idle_since(&self, since: Instant) -> Instant {
        [self.last_query, self.last_traffic]
            .into_iter()
            .flatten()
            .fold(since, Instant::max)
    }
}

/// Answers every query in `waiting` with `answer`.
pub(super) fn answer_waiting(waiting: &mut Vec<QueryId>, answer: Answer, out: &mut Vec<Command>) {
    for id in std::mem::take(waiting) {
        out.push(Command::Answer { id, answer });
    }
}

/// Why a VM is booted, spelled out only when it is.
#[derive(Debug, Clone, Copy)]
pub(super) enum Cause {
    /// A query, from this client if known.
    Query(Option<IpAddr>),
    /// synjitsu saw a SYN for the VM.
    Wake,
    /// Queries arrived while the VM stopped.
    Waiting,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Query(Some(ip)) => write!(f, "query from {ip}"),
            Cause::Query(None) => f.write_str("query"),
            Cause::Wake => f.write_str("wake request from synjitsu"),
            Cause::Waiting => f.write_str("queries arrived while it stopped"),
        }
    }
}
