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
use crate::config::{MAX_BOOT_BACKOFF, StopMode, VmConfig};

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
    /// The guest accepted a connection on its `wait_for=tcp:PORT` port.
    pub(super) port_open: bool,
    /// Its port is being probed.
    pub(super) probing: bool,
    /// The backend's start (resume, unpause) waits for synjitsu to acknowledge `Booting`
    /// (at most [`super::boot::ACK_WAIT`]), so that the guest cannot announce itself before
    /// synjitsu stands in for it: a guest that is up in a few ms (a woken standby) would
    /// otherwise announce itself to a synjitsu that does not know it yet, and not again.
    pub(super) start_held: bool,
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
    /// What bringing the VM up takes from here: a fresh boot, a resume or an unpause;
    /// `None` when it is up or a boot is under way (a stopping VM remembers to come back).
    pub(super) fn wake(&mut self) -> Option<BootKind> {
        match self {
            Life::Running { .. } | Life::Booting(_) => None,
            Life::Stopping { pending_wake, .. } => {
                *pending_wake = true;
                None
            }
            Life::Off | Life::Failed => Some(BootKind::Fresh),
            Life::Suspended => Some(BootKind::Resume),
            Life::Paused => Some(BootKind::Unpause),
        }
    }

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
    /// What `ctl pin`/`unpin` said last; `None`: the `pin` key decides. Kept in the store.
    pub(super) pin_override: Option<bool>,
    /// `ctl drain`: queries do not boot it, and it is stopped when idle. Kept in the store.
    pub(super) drained: bool,
    /// Boots that failed in a row (reset by one that comes up, or by `ctl start`).
    pub(super) failures: u32,
    /// Queries do not boot it before this.
    pub(super) backoff_until: Option<Instant>,
    pub(super) last_error: Option<String>,
    pub(super) last_boot_took: Option<Duration>,
    /// `ctl stop` requests waiting for the stop to finish.
    pub(super) stop_waiting: Vec<QueryId>,
    /// The restart whose stop is under way: who asked, and the `ctl` requests answered once
    /// it is up again (or when its stop fails).
    pub(super) restart: Option<(u32, Vec<QueryId>)>,
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
            pin_override: None,
            drained: false,
            failures: 0,
            backoff_until: None,
            last_error: None,
            last_boot_took: None,
            stop_waiting: Vec::new(),
            restart: None,
        }
    }

    /// Never stopped for idleness now: pinned (by `ctl`, else by its key) and not drained.
    pub(super) fn pinned(&self) -> bool {
        self.pin_override.unwrap_or(self.cfg.pin)
    }

    /// When the running VM is stopped for idleness (`None` while it is pinned and not
    /// drained: a drain is the operator taking it out, so it outranks the pin).
    pub(super) fn idle_deadline(&self, default_limit: Duration) -> Option<Instant> {
        let Life::Running { since } = self.life else {
            return None;
        };
        if self.pinned() && !self.drained {
            return None;
        }
        Some(self.idle_since(since) + self.cfg.idle_timeout.unwrap_or(default_limit))
    }

    /// A boot failed: counted, and from `max_boot_attempts` failures in a row on, queries
    /// wait for a back-off that doubles with each further failure (up to 10 minutes).
    pub(super) fn record_failure(&mut self, now: Instant, error: &str) {
        self.failures = self.failures.saturating_add(1);
        self.last_error = Some(error.to_string());
        if let Some(max) = self.cfg.max_boot_attempts
            && self.failures >= max
        {
            let doublings = (self.failures - max).min(16);
            let wait = self
                .cfg
                .boot_backoff
                .saturating_mul(1 << doublings)
                .min(MAX_BOOT_BACKOFF);
            self.backoff_until = Some(now + wait);
        }
    }

    /// A boot came up: the count of failures starts again.
    pub(super) fn record_success(&mut self) {
        self.failures = 0;
        self.backoff_until = None;
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
        let from = self.life.state();
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
        out.push(self.persist(from, cause, None));
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

    /// Its view; `idle_deadline` is the fleet's to fill in (it knows the default limit).
    pub(super) fn view(&self) -> VmView {
        let running_since = match self.life {
            Life::Running { since } => Some(since),
            _ => None,
        };
        VmView {
            running_since,
            idle_since: running_since.map(|s| self.idle_since(s)),
            idle_deadline: None,
            pinned: self.pinned(),
            pin_override: self.pin_override,
            drained: self.drained,
            failures: self.failures,
            backoff_until: self.backoff_until,
            last_error: self.last_error.clone(),
            last_boot_took: self.last_boot_took,
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
    /// An operator's `ctl` command, by this uid.
    Operator(&'static str, u32),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Query(Some(ip)) => write!(f, "query from {ip}"),
            Cause::Query(None) => f.write_str("query"),
            Cause::Wake => f.write_str("wake request from synjitsu"),
            Cause::Waiting => f.write_str("queries arrived while it stopped"),
            Cause::Operator(action, uid) => write!(f, "ctl {action} by uid {uid}"),
        }
    }
}
