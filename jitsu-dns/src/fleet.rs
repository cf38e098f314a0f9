//! The fleet: every VM's lifecycle and the decisions that drive it, as a pure core.
//!
//! [`Fleet::handle`] takes `now` and one [`Event`] (a query that needs the fleet, a tick, a
//! backend result, something synjitsu said, a readiness key that appeared) and returns the
//! [`Command`]s the shell must carry out: start, stop, resume or unpause a VM, answer a
//! waiting query, tell synjitsu, watch a key, persist a change (with the VM as it is after
//! it). [`Fleet::poll_at`] says when the next timer-driven decision is due. Nothing here reads
//! a clock, touches a socket or calls a backend, so every rule is tested with synthetic
//! `Instant`s below.
//!
//! Rules (the issue's, with the lead's precedence):
//! - one boot per VM however many queries arrive while it boots; every waiting query is
//!   answered when that boot's masking condition is met;
//! - masking, by precedence: `wait_for=announce` (synjitsu's report of the guest's gratuitous
//!   ARP, else at `wait_for_timeout`) > `wait_for_key` (the key appeared, else at the
//!   timeout) > `use_synjitsu` (synjitsu acknowledged `Booting`) > `response_delay`. Whenever
//!   synjitsu is not connected or refused the VM, the synjitsu-based modes fall back to
//!   `response_delay`: a synjitsu that is down never blocks an answer;
//! - a suspended VM is resumed and a paused one unpaused instead of booted;
//! - a running VM with no query and no packet sent by its interface for 2 x TTL is stopped
//!   in its `stop_mode` (packets only sent to it, like the bridge's floods, do not count);
//! - at most `max_running` VMs booting, running or stopping, and at most
//!   `max_boots_per_second` boots: past either, the query gets SERVFAIL;
//! - a failed boot answers its waiting queries SERVFAIL and the next query retries; a guest
//!   tracked by synjitsu that has not announced itself `boot_timeout` after the backend
//!   started it never came up: it is destroyed and marked failed (synjitsu answers the SYNs
//!   it held with RSTs at its own limit), and the next query boots it again;
//! - a VM the backend reports running is adopted, never booted twice;
//! - a VM whose backend definition has a MAC of its own (a libvirt domain's) takes it, since
//!   its guest sends from it, whatever its keys say, and keeps it across reloads.
//!
//! The fleet does not know DNS: the shell answers queries for running VMs itself from a table
//! and only reports that activity with each [`Event::Tick`].

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared_proto::{ClientMessage, Handover, Mac, Phase, VmIdentity, VmStatus};

use crate::config::{HandoverKind, StopMode, VmConfig, WaitFor};

/// A VM's name, shared cheaply.
pub type VmName = Arc<str>;

/// Queries waiting for one VM: past this, more get SERVFAIL rather than memory.
pub const MAX_WAITING_PER_VM: usize = 1024;

/// How often request counters are committed to the store when they changed.
pub const COUNTERS_FLUSH_EVERY: Duration = Duration::from_secs(10);

/// Identifies a query waiting for an answer; chosen by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueryId(pub u64);

/// A VM's lifecycle state, as stored and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lifecycle {
    /// Not running.
    Off,
    /// Being started (or resumed, or unpaused) and not yet ready.
    Booting,
    /// Up; queries are answered at once.
    Running,
    /// Suspended by jitsu-dns (frozen or saved); a query resumes it.
    Suspended,
    /// Paused (by someone); a query unpauses it.
    Paused,
    /// Being stopped.
    Stopping,
    /// The last boot failed; the next query retries.
    Failed,
}

impl Lifecycle {
    /// The word stored and logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Off => "off",
            Lifecycle::Booting => "booting",
            Lifecycle::Running => "running",
            Lifecycle::Suspended => "suspended",
            Lifecycle::Paused => "paused",
            Lifecycle::Stopping => "stopping",
            Lifecycle::Failed => "failed",
        }
    }
}

impl fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Lifecycle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "off" => Lifecycle::Off,
            "booting" => Lifecycle::Booting,
            "running" => Lifecycle::Running,
            "suspended" => Lifecycle::Suspended,
            "paused" => Lifecycle::Paused,
            "stopping" => Lifecycle::Stopping,
            "failed" => Lifecycle::Failed,
            other => return Err(format!("unknown lifecycle state {other:?}")),
        })
    }
}

/// What the backend says a VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Not running (never started, exited, crashed, destroyed).
    Off,
    /// Running, with its Xen domain id if it has one.
    Running {
        /// Domain id.
        domid: Option<u32>,
    },
    /// Suspended (frozen or saved).
    Suspended,
    /// Paused.
    Paused,
}

/// Packet counters of a VM's interface, as the host sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IfCounters {
    /// Packets received from the guest.
    pub rx_packets: u64,
    /// Packets sent to the guest.
    pub tx_packets: u64,
}

/// Queries the shell answered by itself for a running VM since the last tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    /// The VM.
    pub vm: VmName,
    /// How many.
    pub queries: u64,
    /// When the last one came.
    pub last: Instant,
}

/// What the store remembered about a VM from before a restart.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    /// Its last recorded state.
    pub state: Option<Lifecycle>,
    /// Boots so far.
    pub starts: u64,
    /// Queries so far.
    pub requests: u64,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A query for a VM's address that the shell could not answer from its table.
    Query {
        /// To answer with [`Command::Answer`].
        id: QueryId,
        /// The VM.
        vm: VmName,
        /// The client, for the history.
        from: Option<IpAddr>,
    },
    /// Time passed; carries the queries answered without the fleet since the last tick.
    Tick {
        /// Per VM.
        activity: Vec<Activity>,
    },
    /// The backend's counters for a VM's interface (`None`: it cannot tell).
    Counters {
        /// The VM.
        vm: VmName,
        /// The counters.
        counters: Option<IfCounters>,
    },
    /// A start, resume or unpause finished.
    Started {
        /// The VM.
        vm: VmName,
        /// Its domain id, if the backend has them.
        domid: Option<u32>,
    },
    /// A start, resume or unpause failed.
    StartFailed {
        /// The VM.
        vm: VmName,
        /// Why, for the log and history.
        error: String,
    },
    /// A stop finished.
    Stopped {
        /// The VM.
        vm: VmName,
    },
    /// A stop failed.
    StopFailed {
        /// The VM.
        vm: VmName,
        /// Why.
        error: String,
    },
    /// The backend's view of a VM, polled or pushed.
    Observed {
        /// The VM.
        vm: VmName,
        /// Its state.
        state: Observed,
        /// For a poll: the epoch [`Fleet::polled`] gave with the VM; the observation is
        /// dropped if the VM changed state since. `None` for pushed events, which are current.
        epoch: Option<u64>,
    },
    /// At start-up or when a VM is added: what the store remembered and what the backend
    /// sees now.
    Reconciled {
        /// The VM.
        vm: VmName,
        /// From the store, if it knew the VM.
        stored: Option<Stored>,
        /// From the backend.
        observed: Observed,
    },
    /// The synjitsu client connected (hello done).
    SynjitsuUp,
    /// The synjitsu client lost its connection.
    SynjitsuDown,
    /// synjitsu answered the request tagged `tag` (`ok: false` also when it was never sent).
    SynjitsuReplied {
        /// The tag of [`Command::Synjitsu`].
        tag: u64,
        /// Acknowledged.
        ok: bool,
    },
    /// synjitsu saw the guest's own gratuitous ARP.
    GuestAnnounced {
        /// The VM.
        vm: VmName,
    },
    /// synjitsu saw a SYN for a stopped VM.
    WakeRequest {
        /// The VM.
        vm: VmName,
    },
    /// The VM's `wait_for_key` appeared.
    KeyAppeared {
        /// The VM.
        vm: VmName,
    },
    /// The backend's definition of the VM (a libvirt domain's XML) gives its interface this
    /// MAC. Reported before [`Event::Reconciled`].
    MacFound {
        /// The VM.
        vm: VmName,
        /// The MAC.
        mac: Mac,
    },
}

/// Why a query got SERVFAIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `max_running` VMs are already booting or running.
    MaxRunning,
    /// `max_boots_per_second` boots happened in the last second.
    BootRate,
    /// The boot failed.
    BootFailed,
    /// Too many queries wait for this VM.
    Overloaded,
    /// The VM was removed from the configuration.
    Unknown,
}

impl Refusal {
    /// The label in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxRunning => "max_running",
            Refusal::BootRate => "boot_rate",
            Refusal::BootFailed => "boot_failed",
            Refusal::Overloaded => "overloaded",
            Refusal::Unknown => "unknown_vm",
        }
    }

    /// True for the configured limits (counted as limit refusals).
    pub fn is_limit(self) -> bool {
        matches!(self, Refusal::MaxRunning | Refusal::BootRate)
    }
}

/// The answer to a waiting query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Answer with the VM's addresses.
    Ready,
    /// SERVFAIL.
    ServFail(Refusal),
}

/// A change worth a commit in the state store.
#[derive(Debug, Clone, PartialEq)]
pub enum Persist {
    /// A VM changed state.
    Lifecycle {
        /// The VM.
        vm: VmName,
        /// Before.
        from: Lifecycle,
        /// After.
        to: Lifecycle,
        /// Why, for the commit message.
        cause: String,
        /// For booting -> running after a fresh boot: how long the boot took.
        boot_took: Option<Duration>,
        /// The VM right after the change (its `state` is `to`), for the store.
        view: VmView,
    },
    /// The VM took the MAC of its domain (see [`Event::MacFound`]).
    Mac {
        /// The VM.
        vm: VmName,
        /// The domain's MAC, the VM's from now on.
        mac: Mac,
        /// The MAC its keys gave it.
        configured: Mac,
        /// The keys named that MAC (`mac=`) rather than deriving it from the name.
        keyed: bool,
    },
    /// Request counters changed and are due for a batch commit.
    Counters,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Boot the VM.
    Start {
        /// The VM.
        vm: Arc<VmConfig>,
    },
    /// Resume the suspended VM.
    Resume {
        /// The VM.
        vm: Arc<VmConfig>,
    },
    /// Unpause the paused VM.
    Unpause {
        /// The VM.
        vm: Arc<VmConfig>,
    },
    /// Stop the VM.
    Stop {
        /// The VM.
        vm: Arc<VmConfig>,
        /// How.
        mode: StopMode,
    },
    /// Remove what is left of a VM that exited by itself; no event comes back.
    Cleanup {
        /// The VM.
        vm: Arc<VmConfig>,
    },
    /// Answer a waiting query.
    Answer {
        /// The query.
        id: QueryId,
        /// How.
        answer: Answer,
    },
    /// Answer (or stop answering) the VM's address queries directly, without the fleet.
    Serve {
        /// The VM.
        vm: VmName,
        /// True while it runs.
        direct: bool,
    },
    /// Send to synjitsu; the client reports [`Event::SynjitsuReplied`] with the tag.
    Synjitsu {
        /// Matches the reply.
        tag: u64,
        /// The request.
        msg: ClientMessage,
    },
    /// Watch for this Xenstore key and report [`Event::KeyAppeared`].
    WatchKey {
        /// The VM.
        vm: VmName,
        /// Absolute path.
        path: String,
    },
    /// Stop watching the VM's key.
    UnwatchKey {
        /// The VM.
        vm: VmName,
    },
    /// Commit to the state store.
    Persist(Persist),
}

/// Limits and timings of the whole fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The TTL of answers; VMs idle for twice this are stopped.
    pub ttl: Duration,
    /// At most this many VMs booting, running or stopping.
    pub max_running: Option<usize>,
    /// At most this many boots in any second.
    pub max_boots_per_second: Option<u32>,
    /// Batch period for request counters.
    pub flush_every: Duration,
}

/// How one boot is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mask {
    Announce { timeout: Duration, delay: Duration },
    Key { timeout: Duration },
    Synjitsu { timeout: Duration, delay: Duration },
    Delay(Duration),
}

fn mask_of(cfg: &VmConfig) -> Mask {
    if cfg.wait_for == Some(WaitFor::Announce) {
        Mask::Announce {
            timeout: cfg.wait_for_timeout,
            delay: cfg.response_delay,
        }
    } else if cfg.wait_for_key.is_some() {
        Mask::Key {
            timeout: cfg.wait_for_timeout,
        }
    } else if cfg.use_synjitsu {
        Mask::Synjitsu {
            timeout: cfg.wait_for_timeout,
            delay: cfg.response_delay,
        }
    } else {
        Mask::Delay(cfg.response_delay)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BootKind {
    Fresh,
    Resume,
    Unpause,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Boot {
    kind: BootKind,
    since: Instant,
    /// When the backend reported the VM started.
    started: Option<Instant>,
    /// Waiting queries were answered (new ones are answered at once).
    answered: bool,
    /// The `Booting` request's tag, if it was sent.
    syn_tag: Option<u64>,
    /// synjitsu acknowledged `Booting`.
    acked: bool,
    /// synjitsu could not take the VM (down, refused): fall back to the delay.
    syn_unavailable: bool,
    announced: bool,
    key_seen: bool,
    key_watched: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Life {
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
    fn state(&self) -> Lifecycle {
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

#[derive(Debug, Clone)]
struct Vm {
    cfg: Arc<VmConfig>,
    life: Life,
    /// Bumped on every change of `life`, so observations made before a change are ignored.
    epoch: u64,
    waiting: Vec<QueryId>,
    domid: Option<u32>,
    last_query: Option<Instant>,
    last_traffic: Option<Instant>,
    counters: Option<IfCounters>,
    requests: u64,
    starts: u64,
    last_start: Option<Instant>,
    /// While a synjitsu-tracked guest runs without having announced itself: when its boot
    /// is failed. Cleared by its announcement and by every change of `life`.
    unconfirmed_until: Option<Instant>,
    /// The MAC taken from the VM's domain ([`Event::MacFound`]), kept across reloads.
    adopted_mac: Option<Mac>,
}

/// A read-only view of one VM, for the store and the shell.
#[derive(Debug, Clone, PartialEq)]
pub struct VmView {
    /// Configuration.
    pub cfg: Arc<VmConfig>,
    /// State.
    pub state: Lifecycle,
    /// Domain id, if known.
    pub domid: Option<u32>,
    /// Boots so far.
    pub starts: u64,
    /// Queries so far.
    pub requests: u64,
    /// Last query.
    pub last_request: Option<Instant>,
    /// Last boot.
    pub last_start: Option<Instant>,
}

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
        self.vms.get(vm).map(Vm::view)
    }

    /// Every VM's view, by name.
    pub fn views(&self) -> Vec<VmView> {
        self.vms.values().map(Vm::view).collect()
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
                    if let Some(t) = self.boot_deadline(vm, b) {
                        consider(t);
                    }
                }
                Life::Running { since } => {
                    consider(vm.idle_since(*since) + self.idle_limit());
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
            answer_waiting(
                &mut vm.waiting,
                Answer::ServFail(Refusal::Unknown),
                &mut out,
            );
            out.push(Command::Serve {
                vm: name.clone(),
                direct: false,
            });
            out.push(Command::UnwatchKey { vm: name });
        }
        for (name, cfg) in new {
            match self.vms.get_mut(&name) {
                Some(vm) => {
                    vm.cfg = match vm.adopted_mac {
                        Some(mac) if mac != cfg.mac => Arc::new(VmConfig {
                            mac,
                            ..(*cfg).clone()
                        }),
                        _ => cfg,
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
            Event::WakeRequest { vm } => {
                if let Some(v) = self.vms.get(&vm)
                    && matches!(v.life, Life::Running { .. })
                    && v.cfg.synjitsu_tracked()
                    && self.synjitsu_up
                {
                    // synjitsu holds a SYN for a VM that runs: its view is stale.
                    let name = vm.to_string();
                    send(&mut self.next_tag, ClientMessage::Ready { name }, &mut out);
                } else {
                    self.on_query(now, &vm, None, Cause::Wake, &mut out);
                }
            }
            Event::Tick { activity } => {
                self.record_activity(activity);
                let names: Vec<VmName> = self.vms.keys().cloned().collect();
                for name in names {
                    self.settle(now, &name, &mut out);
                    self.check_unconfirmed(now, &name, &mut out);
                    self.check_idle(now, &name, &mut out);
                }
                if self.counters_dirty && now >= self.last_flush + self.settings.flush_every {
                    self.counters_dirty = false;
                    self.last_flush = now;
                    out.push(Command::Persist(Persist::Counters));
                }
            }
            Event::Counters { vm, counters } => {
                if let Some(v) = self.vms.get_mut(&vm)
                    && let Some(c) = counters
                {
                    // Only what the guest sends counts: broadcasts and multicasts flooded to
                    // every port of a busy bridge would keep every VM up for ever, while any
                    // real conversation makes the guest send too.
                    if v.counters.is_some_and(|old| old.rx_packets != c.rx_packets) {
                        v.last_traffic = Some(now);
                    }
                    v.counters = Some(c);
                }
            }
            Event::Started { vm, domid } => self.on_started(now, &vm, domid, &mut out),
            Event::StartFailed { vm, error } => self.on_start_failed(&vm, &error, &mut out),
            Event::Stopped { vm } => self.on_stopped(now, &vm, &mut out),
            Event::StopFailed { vm, error } => {
                if let Some(v) = self.vms.get_mut(&vm)
                    && matches!(v.life, Life::Stopping { .. })
                {
                    // It still runs as far as anyone can tell: serve it and try again after
                    // another idle period.
                    v.set_life(Life::Running { since: now });
                    v.last_traffic = Some(now);
                    out.push(Command::Serve {
                        vm: vm.clone(),
                        direct: true,
                    });
                    answer_waiting(&mut v.waiting, Answer::Ready, &mut out);
                    out.push(v.persist(Lifecycle::Stopping, format!("stop failed: {error}"), None));
                }
            }
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
            Event::SynjitsuUp => {
                self.synjitsu_up = true;
                self.push_sync(&mut out);
            }
            Event::SynjitsuDown => {
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
                    self.settle(now, &name, &mut out);
                }
            }
            Event::SynjitsuReplied { tag, ok } => {
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
                    self.settle(now, &name, &mut out);
                }
            }
            Event::GuestAnnounced { vm } => {
                if let Some(v) = self.vms.get_mut(&vm) {
                    // Answered early (synjitsu held its SYNs), it is confirmed now.
                    v.unconfirmed_until = None;
                    if let Life::Booting(b) = &mut v.life {
                        b.announced = true;
                        self.settle(now, &vm, &mut out);
                    }
                }
            }
            Event::MacFound { vm, mac } => self.on_mac_found(&vm, mac, &mut out),
            Event::KeyAppeared { vm } => {
                let tracked = self.synjitsu_up;
                if let Some(v) = self.vms.get_mut(&vm)
                    && let Life::Booting(b) = &mut v.life
                    && !b.key_seen
                {
                    b.key_seen = true;
                    if tracked && v.cfg.synjitsu_tracked() {
                        // The guest listens: synjitsu may hand over what it holds.
                        let name = vm.to_string();
                        send(&mut self.next_tag, ClientMessage::Ready { name }, &mut out);
                    }
                    self.settle(now, &vm, &mut out);
                }
            }
        }
        out
    }

    /// A domain's own MAC is what its guest sends from, whatever the VM's keys say: synjitsu
    /// must steer that one, and it stays the VM's across reloads.
    fn on_mac_found(&mut self, name: &VmName, mac: Mac, out: &mut Vec<Command>) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        if vm.cfg.mac == mac {
            return;
        }
        let configured = vm.cfg.mac;
        let keyed = vm.cfg.raw.iter().any(|(k, _)| k == "mac");
        vm.adopted_mac = Some(mac);
        vm.cfg = Arc::new(VmConfig {
            mac,
            ..(*vm.cfg).clone()
        });
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

    fn on_query(
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
        if let Some(id) = id
            && vm.waiting.len() >= MAX_WAITING_PER_VM
        {
            out.push(Command::Answer {
                id,
                answer: Answer::ServFail(Refusal::Overloaded),
            });
            return;
        }
        let kind = match &mut vm.life {
            Life::Booting(_) => None,
            Life::Stopping { pending_wake, .. } => {
                *pending_wake = true;
                None
            }
            Life::Off | Life::Failed => Some(BootKind::Fresh),
            Life::Suspended => Some(BootKind::Resume),
            Life::Paused => Some(BootKind::Unpause),
            Life::Running { .. } => unreachable!("answered above"),
        };
        if let Some(kind) = kind {
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

    fn refuse_boot(&mut self, now: Instant, kind: BootKind) -> Option<Refusal> {
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

    fn begin_boot(
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
            key_seen: false,
            key_watched: false,
        };
        let cfg = vm.cfg.clone();
        match kind {
            BootKind::Fresh => {
                vm.starts += 1;
                vm.last_start = Some(now);
                vm.counters = None;
                vm.domid = None;
                self.boots.push_back(now);
                out.push(Command::Start { vm: cfg.clone() });
            }
            BootKind::Resume => out.push(Command::Resume { vm: cfg.clone() }),
            BootKind::Unpause => out.push(Command::Unpause { vm: cfg.clone() }),
        }
        let cause = match kind {
            BootKind::Fresh => cause.to_string(),
            BootKind::Resume => format!("resume, {cause}"),
            BootKind::Unpause => format!("unpause, {cause}"),
        };
        // synjitsu stands in at once for a wire hand-over; a Xenstore hand-over needs the
        // domain id, so it waits for the backend.
        if syn_up && cfg.synjitsu_tracked() && cfg.handover == HandoverKind::Wire {
            let msg = ClientMessage::Booting {
                vm: identity(&cfg, None),
            };
            boot.syn_tag = Some(send(&mut self.next_tag, msg, out));
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

    fn on_started(
        &mut self,
        now: Instant,
        name: &VmName,
        domid: Option<u32>,
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
        vm.domid = domid;
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
        if cfg.synjitsu_tracked() && syn_up {
            if cfg.handover == HandoverKind::Xenstore && b.syn_tag.is_none() {
                let msg = ClientMessage::Booting {
                    vm: identity(&cfg, domid),
                };
                b.syn_tag = Some(send(&mut self.next_tag, msg, out));
                b.syn_unavailable = false;
            } else if b.kind != BootKind::Fresh {
                // A resumed guest does not announce itself again: hand over now.
                let name = name.to_string();
                send(&mut self.next_tag, ClientMessage::Ready { name }, out);
            }
        }
        self.settle(now, name, out);
    }

    fn on_start_failed(&mut self, name: &VmName, error: &str, out: &mut Vec<Command>) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        if !matches!(vm.life, Life::Booting(_)) {
            return;
        }
        vm.set_life(Life::Failed);
        let cfg = vm.cfg.clone();
        let domid = vm.domid;
        answer_waiting(&mut vm.waiting, Answer::ServFail(Refusal::BootFailed), out);
        out.push(Command::UnwatchKey { vm: name.clone() });
        out.push(vm.persist(Lifecycle::Booting, format!("boot failed: {error}"), None));
        self.notify_stopped(&cfg, domid, out);
    }

    fn on_stopped(&mut self, now: Instant, name: &VmName, out: &mut Vec<Command>) {
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
        out.push(vm.persist(Lifecycle::Stopping, format!("stopped ({mode})"), None));
        self.notify_stopped(&cfg, domid, out);
        if wake {
            // Queries came while it stopped: bring it back for them.
            self.restart_for_waiting(now, name, Cause::Waiting, out);
        }
    }

    /// Boots a VM that has waiting queries (they arrived while it stopped), or refuses them.
    fn restart_for_waiting(
        &mut self,
        now: Instant,
        name: &VmName,
        cause: Cause,
        out: &mut Vec<Command>,
    ) {
        let Some(vm) = self.vms.get(name) else { return };
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

    fn on_observed(
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

    fn on_reconciled(
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

    /// Answers and promotes a booting VM whose masking condition is met.
    fn settle(&mut self, now: Instant, name: &VmName, out: &mut Vec<Command>) {
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
        }
        if b.started.is_none() {
            return;
        }
        let took = (b.kind == BootKind::Fresh).then(|| now.duration_since(b.since));
        let key_watched = b.key_watched;
        // Only synjitsu can tell that the guest came up; while it can, a guest that never
        // announces itself is a boot that failed.
        let unconfirmed = (b.kind == BootKind::Fresh
            && vm.cfg.synjitsu_tracked()
            && !b.announced
            && !b.syn_unavailable
            && syn_up)
            .then(|| b.started.map(|s| s + vm.cfg.boot_timeout))
            .flatten();
        vm.set_life(Life::Running { since: now });
        vm.unconfirmed_until = unconfirmed;
        vm.last_traffic = None;
        if key_watched {
            out.push(Command::UnwatchKey { vm: name.clone() });
        }
        out.push(Command::Serve {
            vm: name.clone(),
            direct: true,
        });
        out.push(vm.persist(Lifecycle::Booting, reason.into(), took));
    }

    /// Fails a synjitsu-tracked boot whose guest never announced itself: destroyed, then
    /// `Failed`, so the next query (or SYN) boots it again.
    fn check_unconfirmed(&mut self, now: Instant, name: &VmName, out: &mut Vec<Command>) {
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

    fn check_idle(&mut self, now: Instant, name: &VmName, out: &mut Vec<Command>) {
        let limit = self.idle_limit();
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let Life::Running { since } = vm.life else {
            return;
        };
        if now < vm.idle_since(since) + limit {
            return;
        }
        let cause = format!("idle for {}", fmt_duration(limit));
        vm.begin_stop(name, vm.cfg.stop_mode, false, cause, out);
    }

    fn boot_deadline(&self, vm: &Vm, b: &Boot) -> Option<Instant> {
        if b.kind != BootKind::Fresh {
            return None;
        }
        give_up_at(mask_of(&vm.cfg), b)
    }

    fn push_sync(&mut self, out: &mut Vec<Command>) {
        let vms = self
            .vms
            .values()
            .filter(|v| v.cfg.synjitsu_tracked())
            .map(|v| VmStatus {
                vm: identity(&v.cfg, v.domid),
                phase: match v.life {
                    Life::Booting(_) => Phase::Booting,
                    Life::Running { .. } => Phase::Running,
                    _ => Phase::Stopped,
                },
            })
            .collect();
        send(&mut self.next_tag, ClientMessage::Sync { vms }, out);
    }

    /// Tells synjitsu, if it is connected, that a VM it tracks stopped.
    fn notify_stopped(&mut self, cfg: &VmConfig, domid: Option<u32>, out: &mut Vec<Command>) {
        if self.synjitsu_up && cfg.synjitsu_tracked() {
            let msg = ClientMessage::Stopped {
                vm: identity(cfg, domid),
            };
            send(&mut self.next_tag, msg, out);
        }
    }
}

/// Why a boot may be answered now, or `None`.
fn answer_reason(cfg: &VmConfig, b: &Boot, now: Instant) -> Option<&'static str> {
    if b.kind != BootKind::Fresh {
        return b.started.map(|_| match b.kind {
            BootKind::Resume => "resumed",
            _ => "unpaused",
        });
    }
    let mask = mask_of(cfg);
    // synjitsu's acknowledgement is the one condition met before the backend started the VM.
    if matches!(mask, Mask::Synjitsu { .. }) && b.acked {
        return Some("synjitsu holds its SYNs");
    }
    let give_up = give_up_at(mask, b)?;
    Some(match mask {
        Mask::Announce { .. } if b.announced => "guest announced itself",
        Mask::Key { .. } if b.key_seen => "readiness key appeared",
        _ if now < give_up => return None,
        Mask::Announce { .. } | Mask::Synjitsu { .. } if b.syn_unavailable => {
            "response delay (synjitsu unavailable)"
        }
        Mask::Announce { .. } => "no announcement in time",
        Mask::Synjitsu { .. } => "synjitsu did not answer in time",
        Mask::Key { .. } => "readiness key did not appear in time",
        Mask::Delay(_) => "response delay",
    })
}

/// When a fresh boot is answered although its masking condition was not met: at the
/// response delay if synjitsu is unavailable to a synjitsu-based mode, else at the timeout,
/// counted from the start. `None` until the backend started the VM.
fn give_up_at(mask: Mask, b: &Boot) -> Option<Instant> {
    let wait = match mask {
        Mask::Announce { timeout, delay } | Mask::Synjitsu { timeout, delay } => {
            if b.syn_unavailable { delay } else { timeout }
        }
        Mask::Key { timeout } => timeout,
        Mask::Delay(delay) => delay,
    };
    b.started.map(|started| started + wait)
}

impl Vm {
    fn new(cfg: Arc<VmConfig>) -> Vm {
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
            adopted_mac: None,
        }
    }

    fn set_life(&mut self, life: Life) {
        self.life = life;
        self.epoch += 1;
        self.unconfirmed_until = None;
    }

    /// Stops the running VM `name` in `mode`; `failed`: it lands in `Failed`, not `Off`.
    fn begin_stop(
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
    fn persist(&self, from: Lifecycle, cause: String, boot_took: Option<Duration>) -> Command {
        Command::Persist(Persist::Lifecycle {
            vm: self.cfg.name.clone(),
            from,
            to: self.life.state(),
            cause,
            boot_took,
            view: self.view(),
        })
    }

    fn view(&self) -> VmView {
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
    fn idle_since(&self, since: Instant) -> Instant {
        [self.last_query, self.last_traffic]
            .into_iter()
            .flatten()
            .fold(since, Instant::max)
    }
}

/// What synjitsu is told about a VM. A Xenstore hand-over with no domain id yet (a VM that
/// never ran) is announced as wire: synjitsu learns the domain id with the next `Booting`.
pub fn identity(cfg: &VmConfig, domid: Option<u32>) -> VmIdentity {
    let handover = match (cfg.handover, domid) {
        (HandoverKind::Xenstore, Some(domid)) if domid != 0 => Handover::Xenstore { domid },
        _ => Handover::Wire,
    };
    VmIdentity {
        name: cfg.name.to_string(),
        mac: cfg.mac,
        ipv4: cfg.ip,
        ipv6: cfg.ip6,
        handover,
    }
}

/// Answers every query in `waiting` with `answer`.
fn answer_waiting(waiting: &mut Vec<QueryId>, answer: Answer, out: &mut Vec<Command>) {
    for id in std::mem::take(waiting) {
        out.push(Command::Answer { id, answer });
    }
}

/// Queues `msg` for synjitsu under the next tag, and returns the tag.
fn send(next_tag: &mut u64, msg: ClientMessage, out: &mut Vec<Command>) -> u64 {
    let tag = *next_tag;
    *next_tag += 1;
    out.push(Command::Synjitsu { tag, msg });
    tag
}

/// Why a VM is booted, spelled out only when it is.
#[derive(Debug, Clone, Copy)]
enum Cause {
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

/// `2 s`, `1.5 s`, `120 s`.
pub fn fmt_duration(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    format!("{} s", s.trim_end_matches('0').trim_end_matches('.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Flags, merge};

    const TTL: Duration = Duration::from_secs(1);

    fn settings() -> Settings {
        Settings {
            ttl: TTL,
            max_running: None,
            max_boots_per_second: None,
            flush_every: COUNTERS_FLUSH_EVERY,
        }
    }

    fn vms_with(backend: &str, specs: &[&str]) -> Vec<Arc<VmConfig>> {
        let f = Flags {
            backend: Some(backend.into()),
            specs: specs.iter().map(|s| s.to_string()).collect(),
            ..Flags::default()
        };
        merge(&f, None)
            .unwrap()
            .vms
            .into_iter()
            .map(Arc::new)
            .collect()
    }

    fn vms(specs: &[&str]) -> Vec<Arc<VmConfig>> {
        vms_with("process", specs)
    }

    fn spec(name: &str, n: u8, extra: &str) -> String {
        format!("name={name},dns={name}.example.org,ip=10.0.0.{n},command=x{extra}")
    }

    /// A fleet at `t0` with VMs reconciled as off.
    fn fleet(specs: &[String], s: Settings) -> (Fleet, Instant) {
        let t0 = Instant::now();
        let refs: Vec<&str> = specs.iter().map(String::as_str).collect();
        let cfgs = vms(&refs);
        let mut f = Fleet::new(t0, s, cfgs.clone());
        for c in cfgs {
            let out = f.handle(
                t0,
                Event::Reconciled {
                    vm: c.name.clone(),
                    stored: None,
                    observed: Observed::Off,
                },
            );
            assert!(
                out.is_empty(),
                "a new VM that is off needs nothing: {out:?}"
            );
        }
        (f, t0)
    }

    fn name(n: &str) -> VmName {
        Arc::from(n)
    }

    fn query(f: &mut Fleet, t: Instant, vm: &str, id: u64) -> Vec<Command> {
        f.handle(
            t,
            Event::Query {
                id: QueryId(id),
                vm: name(vm),
                from: Some("10.0.0.99".parse().unwrap()),
            },
        )
    }

    fn started(f: &mut Fleet, t: Instant, vm: &str, domid: Option<u32>) -> Vec<Command> {
        f.handle(
            t,
            Event::Started {
                vm: name(vm),
                domid,
            },
        )
    }

    fn tick(f: &mut Fleet, t: Instant) -> Vec<Command> {
        f.handle(t, Event::Tick { activity: vec![] })
    }

    fn answers(out: &[Command]) -> Vec<(u64, Answer)> {
        out.iter()
            .filter_map(|c| match c {
                Command::Answer { id, answer } => Some((id.0, *answer)),
                _ => None,
            })
            .collect()
    }

    fn starts(out: &[Command]) -> usize {
        out.iter()
            .filter(|c| matches!(c, Command::Start { .. }))
            .count()
    }

    fn stops(out: &[Command]) -> Vec<StopMode> {
        out.iter()
            .filter_map(|c| match c {
                Command::Stop { mode, .. } => Some(*mode),
                _ => None,
            })
            .collect()
    }

    fn synjitsu(out: &[Command]) -> Vec<(u64, ClientMessage)> {
        out.iter()
            .filter_map(|c| match c {
                Command::Synjitsu { tag, msg } => Some((*tag, msg.clone())),
                _ => None,
            })
            .collect()
    }

    fn lifecycle(out: &[Command]) -> Vec<(Lifecycle, Lifecycle, String)> {
        out.iter()
            .filter_map(|c| match c {
                Command::Persist(Persist::Lifecycle {
                    from, to, cause, ..
                }) => Some((*from, *to, cause.clone())),
                _ => None,
            })
            .collect()
    }

    fn serve(out: &[Command]) -> Option<bool> {
        out.iter().rev().find_map(|c| match c {
            Command::Serve { direct, .. } => Some(*direct),
            _ => None,
        })
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn one_boot_however_many_queries_and_all_answered_at_the_delay() {
        let (mut f, t0) = fleet(&[spec("www", 1, ",response_delay=0.1")], settings());
        let mut all = Vec::new();
        for i in 0..50 {
            all.extend(query(&mut f, t0 + MS * i, "www", i as u64));
        }
        assert_eq!(starts(&all), 1, "one boot for 50 queries");
        assert!(
            answers(&all).is_empty(),
            "nothing answered before the VM started"
        );
        assert_eq!(
            lifecycle(&all),
            vec![(
                Lifecycle::Off,
                Lifecycle::Booting,
                "query from 10.0.0.99".into()
            )]
        );
        assert_eq!(f.state("www"), Some(Lifecycle::Booting));
        assert_eq!(f.view("www").unwrap().starts, 1);
        assert_eq!(f.view("www").unwrap().requests, 50);

        let t_started = t0 + MS * 60;
        let out = started(&mut f, t_started, "www", None);
        assert!(answers(&out).is_empty(), "the delay has not passed");
        assert_eq!(f.poll_at(), Some(t_started + MS * 100));
        assert!(answers(&tick(&mut f, t_started + MS * 99)).is_empty());
        let out = tick(&mut f, t_started + MS * 100);
        let a = answers(&out);
        assert_eq!(a.len(), 50);
        assert!(a.iter().all(|(_, ans)| *ans == Answer::Ready));
        let ids: std::collections::BTreeSet<u64> = a.iter().map(|(i, _)| *i).collect();
        assert_eq!(ids, (0..50).collect());
        assert_eq!(serve(&out), Some(true));
        assert_eq!(f.state("www"), Some(Lifecycle::Running));
        let boot = out
            .iter()
            .find_map(|c| match c {
                Command::Persist(Persist::Lifecycle { boot_took, .. }) => *boot_took,
                _ => None,
            })
            .unwrap();
        assert_eq!(boot, MS * 160);

        // Later queries are answered at once and boot nothing.
        let out = query(&mut f, t_started + MS * 200, "www", 99);
        assert_eq!(answers(&out), vec![(99, Answer::Ready)]);
        assert_eq!(starts(&out), 0);
    }

    #[test]
    fn zero_delay_answers_when_the_backend_reports_started() {
        let (mut f, t0) = fleet(&[spec("www", 1, ",response_delay=0")], settings());
        let out = query(&mut f, t0, "www", 1);
        assert!(answers(&out).is_empty());
        let out = started(&mut f, t0 + MS, "www", None);
        assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
    }

    #[test]
    fn wait_for_key_answers_when_the_key_appears_or_at_the_timeout() {
        let (mut f, t0) = fleet(
            &[spec(
                "www",
                1,
                ",wait_for_key=/jitsu/www/ready,wait_for_timeout=5,response_delay=0",
            )],
            settings(),
        );
        let out = query(&mut f, t0, "www", 1);
        assert!(out.contains(&Command::WatchKey {
            vm: name("www"),
            path: "/jitsu/www/ready".into()
        }));
        let out = started(&mut f, t0 + MS, "www", None);
        assert!(
            answers(&out).is_empty(),
            "the delay does not apply: the key does"
        );
        assert!(answers(&tick(&mut f, t0 + MS * 500)).is_empty());
        let out = f.handle(t0 + MS * 700, Event::KeyAppeared { vm: name("www") });
        assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
        assert!(out.contains(&Command::UnwatchKey { vm: name("www") }));
        assert_eq!(lifecycle(&out)[0].2, "readiness key appeared");

        // A key that never comes: answered at the timeout anyway.
        let (mut f, t0) = fleet(
            &[spec(
                "b",
                2,
                ",wait_for_key=/jitsu/b/ready,wait_for_timeout=5",
            )],
            settings(),
        );
        query(&mut f, t0, "b", 2);
        started(&mut f, t0 + MS, "b", None);
        assert_eq!(f.poll_at(), Some(t0 + MS + Duration::from_secs(5)));
        assert!(answers(&tick(&mut f, t0 + Duration::from_secs(5))).is_empty());
        let out = tick(&mut f, t0 + MS + Duration::from_secs(5));
        assert_eq!(answers(&out), vec![(2, Answer::Ready)]);
        assert_eq!(lifecycle(&out)[0].2, "readiness key did not appear in time");
    }

    #[test]
    fn relative_keys_are_watched_under_the_domain_once_its_id_is_known() {
        let cfgs = vms_with(
            "libvirt",
            &["name=m,dns=m.example.org,ip=10.0.0.1,wait_for_key=data/ready,kernel=/k"],
        );
        let t0 = Instant::now();
        let mut f = Fleet::new(t0, settings(), cfgs);
        f.handle(
            t0,
            Event::Reconciled {
                vm: name("m"),
                stored: None,
                observed: Observed::Off,
            },
        );
        let out = query(&mut f, t0, "m", 1);
        assert!(!out.iter().any(|c| matches!(c, Command::WatchKey { .. })));
        let out = started(&mut f, t0 + MS, "m", Some(7));
        assert!(out.contains(&Command::WatchKey {
            vm: name("m"),
            path: "/local/domain/7/data/ready".into()
        }));
        let out = f.handle(t0 + MS * 2, Event::KeyAppeared { vm: name("m") });
        assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
        assert_eq!(f.view("m").unwrap().domid, Some(7));
    }

    #[test]
    fn use_synjitsu_answers_on_the_ack_even_before_the_vm_started() {
        let (mut f, t0) = fleet(
            &[spec("www", 1, ",use_synjitsu=true,response_delay=5")],
            settings(),
        );
        let out = f.handle(t0, Event::SynjitsuUp);
        let sync = synjitsu(&out);
        assert_eq!(sync.len(), 1);
        let ClientMessage::Sync { vms } = &sync[0].1 else {
            panic!("{sync:?}")
        };
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].phase, Phase::Stopped);

        let out = query(&mut f, t0, "www", 1);
        let sent = synjitsu(&out);
        assert_eq!(sent.len(), 1);
        let (tag, ClientMessage::Booting { vm }) = &sent[0] else {
            panic!("{sent:?}")
        };
        assert_eq!(vm.name, "www");
        assert_eq!(vm.ipv4.to_string(), "10.0.0.1");
        assert_eq!(vm.handover, Handover::Wire);
        assert_eq!(
            starts(&out),
            1,
            "booting and telling synjitsu happen in parallel"
        );
        assert!(answers(&out).is_empty());

        let out = f.handle(
            t0 + MS * 3,
            Event::SynjitsuReplied {
                tag: *tag,
                ok: true,
            },
        );
        assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
        assert_eq!(
            f.state("www"),
            Some(Lifecycle::Booting),
            "running only once started"
        );
        // More queries during the boot are answered at once.
        assert_eq!(
            answers(&query(&mut f, t0 + MS * 4, "www", 2)),
            vec![(2, Answer::Ready)]
        );
        let out = started(&mut f, t0 + MS * 50, "www", None);
        assert_eq!(f.state("www"), Some(Lifecycle::Running));
        assert_eq!(lifecycle(&out)[0].2, "synjitsu holds its SYNs");
    }

    #[test]
    fn use_synjitsu_falls_back_to_the_delay_when_synjitsu_is_down_refuses_or_drops() {
        // Never connected.
        let (mut f, t0) = fleet(
            &[spec("www", 1, ",use_synjitsu=true,response_delay=0.3")],
            settings(),
        );
        let out = query(&mut f, t0, "www", 1);
        assert!(
            synjitsu(&out).is_empty(),
            "nothing is sent to a synjitsu that is down"
        );
        started(&mut f, t0 + MS, "www", None);
        assert!(answers(&tick(&mut f, t0 + MS * 300)).is_empty());
        assert_eq!(
            answers(&tick(&mut f, t0 + MS * 301)),
            vec![(1, Answer::Ready)]
        );

        // Refused.
        let (mut f, t0) = fleet(
            &[spec("www", 1, ",use_synjitsu=true,response_delay=0.3")],
            settings(),
        );
        f.handle(t0, Event::SynjitsuUp);
        let out = query(&mut f, t0, "www", 1);
        let tag = synjitsu(&out)[0].0;
        started(&mut f, t0 + MS, "www", None);
        f.handle(t0 + MS * 2, Event::SynjitsuReplied { tag, ok: false });
        assert_eq!(
            answers(&tick(&mut f, t0 + MS * 301)),
            vec![(1, Answer::Ready)]
        );

        // Connection lost while waiting for the ack.
        let (mut f, t0) = fleet(
            &[spec("www", 1, ",use_synjitsu=true,response_delay=0.3")],
            settings(),
        );
        f.handle(t0, Event::SynjitsuUp);
        query(&mut f, t0, "www", 1);
        started(&mut f, t0 + MS, "www", None);
        assert!(
            answers(&tick(&mut f, t0 + MS * 400)).is_empty(),
            "connected: waits for the ack"
        );
        let out = f.handle(t0 + MS * 500, Event::SynjitsuDown);
        assert_eq!(
            answers(&out),
            vec![(1, Answer::Ready)],
            "down: the delay has passed already"
        );

        // Connected but silent: answered at wait_for_timeout.
        let (mut f, t0) = fleet(
            &[spec(
                "www",
                1,
                ",use_synjitsu=true,response_delay=0.3,wait_for_timeout=2",
            )],
            settings(),
        );
        f.handle(t0, Event::SynjitsuUp);
        query(&mut f, t0, "www", 1);
        started(&mut f, t0, "www", None);
        assert_eq!(f.poll_at(), Some(t0 + Duration::from_secs(2)));
        assert_eq!(
            answers(&tick(&mut f, t0 + Duration::from_secs(2))),
            vec![(1, Answer::Ready)]
        );
    }

    #[test]
    fn wait_for_announce_answers_on_the_guests_announcement_or_at_the_timeout() {
        let (mut f, t0) = fleet(
            &[spec(
                "www",
                1,
                ",wait_for=announce,wait_for_timeout=3,response_delay=0",
            )],
            settings(),
        );
        f.handle(t0, Event::SynjitsuUp);
        let out = query(&mut f, t0, "www", 1);
        let (tag, msg) = &synjitsu(&out)[0];
        assert!(matches!(msg, ClientMessage::Booting { .. }));
        f.handle(
            t0,
            Event::SynjitsuReplied {
                tag: *tag,
                ok: true,
            },
        );
        let out = started(&mut f, t0 + MS, "www", None);
        assert!(answers(&out).is_empty(), "the ack is not the announcement");
        let out = f.handle(t0 + MS * 800, Event::GuestAnnounced { vm: name("www") });
        assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
        assert_eq!(lifecycle(&out)[0].2, "guest announced itself");

        let (mut f, t0) = fleet(
            &[spec(
                "www",
                1,
                ",wait_for=announce,wait_for_timeout=3,response_delay=0",
            )],
            settings(),
        );
        f.handle(t0, Event::SynjitsuUp);
        query(&mut f, t0, "www", 1);
        started(&mut f, t0, "www", None);
        assert!(answers(&tick(&mut f, t0 + MS * 2999)).is_empty());
        assert_eq!(
            answers(&tick(&mut f, t0 + MS * 3000)),
            vec![(1, Answer::Ready)]
        );

        // Without synjitsu nobody can announce: the delay applies.
        let (mut f, t0) = fleet(
            &[spec(
                "www",
                1,
                ",wait_for=announce,wait_for_timeout=3,response_delay=0.2",
            )],
            settings(),
        );
        query(&mut f, t0, "www", 1);
        started(&mut f, t0, "www", None);
        assert_eq!(
            answers(&tick(&mut f, t0 + MS * 200)),
            vec![(1, Answer::Ready)]
        );
    }

    #[test]
    fn masking_precedence_is_announce_then_key_then_synjitsu_then_delay() {
        let all = ",wait_for=announce,wait_for_key=/k,use_synjitsu=true,response_delay=0";
        let cfg = &vms(&[&spec("a", 1, all)])[0];
        assert!(matches!(mask_of(cfg), Mask::Announce { .. }));
        let cfg = &vms(&[&spec("a", 1, ",wait_for_key=/k,use_synjitsu=true")])[0];
        assert!(matches!(mask_of(cfg), Mask::Key { .. }));
        let cfg = &vms(&[&spec("a", 1, ",use_synjitsu=true")])[0];
        assert!(matches!(mask_of(cfg), Mask::Synjitsu { .. }));
        let cfg = &vms(&[&spec("a", 1, "")])[0];
        assert_eq!(mask_of(cfg), Mask::Delay(Duration::from_millis(100)));
    }

    fn running(specs: &[String], s: Settings) -> (Fleet, Instant) {
        let (mut f, t0) = fleet(specs, s);
        let mut end = t0;
        for vm in f.vms.keys().cloned().collect::<Vec<_>>() {
            let delay = f.view(&vm).unwrap().cfg.response_delay;
            query(&mut f, t0, &vm, 0);
            started(&mut f, t0, &vm, None);
            tick(&mut f, t0 + delay);
            assert_eq!(f.state(&vm), Some(Lifecycle::Running));
            end = end.max(t0 + delay);
        }
        (f, end)
    }

    #[test]
    fn idle_vms_stop_after_twice_the_ttl_and_queries_or_traffic_keep_them_up() {
        let (mut f, t) = running(&[spec("www", 1, "")], settings());
        assert_eq!(f.poll_at(), Some(t + TTL * 2));
        assert!(stops(&tick(&mut f, t + TTL * 2 - MS)).is_empty());
        // A query answered by the shell directly, reported by the tick.
        let out = f.handle(
            t + TTL * 2,
            Event::Tick {
                activity: vec![Activity {
                    vm: name("www"),
                    queries: 3,
                    last: t + TTL,
                }],
            },
        );
        assert!(stops(&out).is_empty(), "queried one TTL ago");
        assert_eq!(f.view("www").unwrap().requests, 4);
        assert_eq!(f.poll_at(), Some(t + TTL * 3));
        // Traffic on its interface (a first sample, then a change); only what the guest
        // sends counts.
        f.handle(
            t + TTL * 2,
            Event::Counters {
                vm: name("www"),
                counters: Some(IfCounters {
                    rx_packets: 5,
                    tx_packets: 5,
                }),
            },
        );
        f.handle(
            t + TTL * 2 + MS,
            Event::Counters {
                vm: name("www"),
                counters: Some(IfCounters {
                    rx_packets: 5,
                    tx_packets: 5,
                }),
            },
        );
        assert_eq!(
            f.poll_at(),
            Some(t + TTL * 3),
            "unchanged counters are no traffic"
        );
        f.handle(
            t + TTL * 2 + MS * 2,
            Event::Counters {
                vm: name("www"),
                counters: Some(IfCounters {
                    rx_packets: 6,
                    tx_packets: 5,
                }),
            },
        );
        assert_eq!(f.poll_at(), Some(t + TTL * 4 + MS * 2));
        assert!(stops(&tick(&mut f, t + TTL * 3)).is_empty());
        let out = tick(&mut f, t + TTL * 4 + MS * 2);
        assert_eq!(stops(&out), vec![StopMode::Destroy]);
        assert_eq!(
            serve(&out),
            Some(false),
            "stopped VMs go back to the slow path first"
        );
        assert_eq!(
            lifecycle(&out),
            vec![(
                Lifecycle::Running,
                Lifecycle::Stopping,
                "idle for 2 s".into()
            )]
        );
        assert_eq!(f.state("www"), Some(Lifecycle::Stopping));
        let out = f.handle(t + TTL * 5, Event::Stopped { vm: name("www") });
        assert_eq!(
            lifecycle(&out),
            vec![(
                Lifecycle::Stopping,
                Lifecycle::Off,
                "stopped (destroy)".into()
            )]
        );
        assert_eq!(f.state("www"), Some(Lifecycle::Off));
    }

    #[test]
    fn each_stop_mode_is_used_and_lands_in_its_state() {
        for (mode, end) in [
            ("destroy", Lifecycle::Off),
            ("shutdown", Lifecycle::Off),
            ("suspend", Lifecycle::Suspended),
        ] {
            let (mut f, t) = running(&[spec("www", 1, &format!(",stop_mode={mode}"))], settings());
            let out = tick(&mut f, t + TTL * 2);
            assert_eq!(stops(&out), vec![mode.parse().unwrap()]);
            f.handle(t + TTL * 3, Event::Stopped { vm: name("www") });
            assert_eq!(f.state("www"), Some(end), "{mode}");
        }
    }

    #[test]
    fn suspended_vms_are_resumed_and_paused_ones_unpaused_not_booted() {
        let (mut f, t) = running(
            &[spec("www", 1, ",stop_mode=suspend,response_delay=5")],
            settings(),
        );
        tick(&mut f, t + TTL * 2);
        f.handle(t + TTL * 2, Event::Stopped { vm: name("www") });
        let out = query(&mut f, t + TTL * 3, "www", 7);
        assert_eq!(starts(&out), 0);
        assert!(out.iter().any(|c| matches!(c, Command::Resume { .. })));
        assert_eq!(lifecycle(&out)[0].2, "resume, query from 10.0.0.99");
        // Resuming is not a boot: no response delay, answered as soon as it runs again.
        let out = started(&mut f, t + TTL * 3 + MS, "www", None);
        assert_eq!(answers(&out), vec![(7, Answer::Ready)]);
        assert_eq!(f.state("www"), Some(Lifecycle::Running));
        assert_eq!(f.view("www").unwrap().starts, 1, "a resume is not a start");

        let (mut f, t0) = fleet(&[spec("p", 1, "")], settings());
        f.handle(
            t0,
            Event::Observed {
                vm: name("p"),
                state: Observed::Paused,
                epoch: None,
            },
        );
        assert_eq!(f.state("p"), Some(Lifecycle::Paused));
        let out = query(&mut f, t0, "p", 1);
        assert!(out.iter().any(|c| matches!(c, Command::Unpause { .. })));
        let out = started(&mut f, t0 + MS, "p", None);
        assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
    }

    #[test]
    fn limits_refuse_with_servfail() {
        let s = Settings {
            max_running: Some(1),
            ..settings()
        };
        let (mut f, t0) = fleet(&[spec("a", 1, ""), spec("b", 2, "")], s);
        assert_eq!(starts(&query(&mut f, t0, "a", 1)), 1);
        let out = query(&mut f, t0, "b", 2);
        assert_eq!(
            answers(&out),
            vec![(2, Answer::ServFail(Refusal::MaxRunning))]
        );
        assert_eq!(starts(&out), 0);
        assert_eq!(f.state("b"), Some(Lifecycle::Off));

        let s = Settings {
            max_boots_per_second: Some(2),
            ..settings()
        };
        let (mut f, t0) = fleet(&[spec("a", 1, ""), spec("b", 2, ""), spec("c", 3, "")], s);
        assert_eq!(starts(&query(&mut f, t0, "a", 1)), 1);
        assert_eq!(starts(&query(&mut f, t0 + MS * 10, "b", 2)), 1);
        let out = query(&mut f, t0 + MS * 999, "c", 3);
        assert_eq!(
            answers(&out),
            vec![(3, Answer::ServFail(Refusal::BootRate))]
        );
        assert!(Refusal::BootRate.is_limit());
        let out = query(&mut f, t0 + MS * 1000, "c", 4);
        assert_eq!(starts(&out), 1, "a second later the rate allows it");
    }

    #[test]
    fn a_failed_boot_answers_servfail_and_the_next_query_retries() {
        let (mut f, t0) = fleet(&[spec("www", 1, ",use_synjitsu=true")], settings());
        f.handle(t0, Event::SynjitsuUp);
        query(&mut f, t0, "www", 1);
        query(&mut f, t0, "www", 2);
        let out = f.handle(
            t0 + MS,
            Event::StartFailed {
                vm: name("www"),
                error: "no such bridge".into(),
            },
        );
        assert_eq!(
            answers(&out),
            vec![
                (1, Answer::ServFail(Refusal::BootFailed)),
                (2, Answer::ServFail(Refusal::BootFailed))
            ]
        );
        assert_eq!(f.state("www"), Some(Lifecycle::Failed));
        assert_eq!(
            lifecycle(&out),
            vec![(
                Lifecycle::Booting,
                Lifecycle::Failed,
                "boot failed: no such bridge".into()
            )]
        );
        assert!(
            synjitsu(&out)
                .iter()
                .any(|(_, m)| matches!(m, ClientMessage::Stopped { .. }))
        );
        let out = query(&mut f, t0 + MS * 2, "www", 3);
        assert_eq!(starts(&out), 1);
        assert_eq!(f.view("www").unwrap().starts, 2);
    }

    #[test]
    fn a_synjitsu_guest_that_never_announces_itself_is_failed_and_retried() {
        let boot = |f: &mut Fleet, t: Instant, id: u64| {
            let out = query(f, t, "www", id);
            let (tag, _) = synjitsu(&out)[0].clone();
            f.handle(t, Event::SynjitsuReplied { tag, ok: true });
            started(f, t + MS, "www", None);
        };
        let (mut f, t0) = fleet(
            &[spec("www", 1, ",use_synjitsu=true,boot_timeout=1.5")],
            settings(),
        );
        f.handle(t0, Event::SynjitsuUp);
        boot(&mut f, t0, 1);
        assert_eq!(f.state("www"), Some(Lifecycle::Running));
        assert_eq!(f.poll_at(), Some(t0 + MS * 1501));
        assert!(stops(&tick(&mut f, t0 + MS * 1500)).is_empty());
        let out = tick(&mut f, t0 + MS * 1501);
        assert_eq!(stops(&out), vec![StopMode::Destroy]);
        assert_eq!(
            lifecycle(&out)[0].2,
            "the guest did not announce itself within 1.5 s of its start"
        );
        assert_eq!(serve(&out), Some(false), "no longer answered directly");
        let out = f.handle(t0 + MS * 1510, Event::Stopped { vm: name("www") });
        assert_eq!(f.state("www"), Some(Lifecycle::Failed));
        assert!(
            synjitsu(&out)
                .iter()
                .any(|(_, m)| matches!(m, ClientMessage::Stopped { .. })),
            "synjitsu holds and wakes for it again"
        );
        // The next query boots it again.
        let out = query(&mut f, t0 + MS * 1600, "www", 2);
        assert_eq!(starts(&out), 1);
        assert_eq!(f.view("www").unwrap().starts, 2);

        // A guest that announces itself, even after the answer, is never failed.
        let (mut f, t0) = fleet(
            &[spec("www", 1, ",use_synjitsu=true,boot_timeout=1.5")],
            settings(),
        );
        f.handle(t0, Event::SynjitsuUp);
        boot(&mut f, t0, 1);
        f.handle(t0 + MS * 300, Event::GuestAnnounced { vm: name("www") });
        assert!(stops(&tick(&mut f, t0 + MS * 1600)).is_empty());
        assert_eq!(f.state("www"), Some(Lifecycle::Running));

        // Nor when synjitsu, the only witness, went away.
        let (mut f, t0) = fleet(
            &[spec("www", 1, ",use_synjitsu=true,boot_timeout=1.5")],
            settings(),
        );
        f.handle(t0, Event::SynjitsuUp);
        boot(&mut f, t0, 1);
        f.handle(t0 + MS * 300, Event::SynjitsuDown);
        assert!(stops(&tick(&mut f, t0 + MS * 1600)).is_empty());
    }

    #[test]
    fn a_running_vm_is_adopted_never_booted_twice() {
        let t0 = Instant::now();
        let cfgs = vms(&[
            &spec("www", 1, ""),
            &spec("gone", 2, ""),
            &spec("new", 3, ""),
        ]);
        let mut f = Fleet::new(t0, settings(), cfgs);
        let out = f.handle(
            t0,
            Event::Reconciled {
                vm: name("www"),
                stored: Some(Stored {
                    state: Some(Lifecycle::Running),
                    starts: 4,
                    requests: 90,
                }),
                observed: Observed::Running { domid: None },
            },
        );
        assert_eq!(starts(&out), 0);
        assert_eq!(serve(&out), Some(true));
        assert_eq!(
            lifecycle(&out),
            vec![(
                Lifecycle::Running,
                Lifecycle::Running,
                "adopted: already running".into()
            )]
        );
        assert_eq!(
            f.view("www").unwrap().starts,
            4,
            "counters continue from the store"
        );
        let out = query(&mut f, t0, "www", 1);
        assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
        assert_eq!(starts(&out), 0);

        let out = f.handle(
            t0,
            Event::Reconciled {
                vm: name("gone"),
                stored: Some(Stored {
                    state: Some(Lifecycle::Running),
                    starts: 1,
                    requests: 1,
                }),
                observed: Observed::Off,
            },
        );
        assert_eq!(
            lifecycle(&out),
            vec![(
                Lifecycle::Running,
                Lifecycle::Off,
                "gone while jitsu-dns was away".into()
            )]
        );
        assert_eq!(f.state("gone"), Some(Lifecycle::Off));

        let out = f.handle(
            t0,
            Event::Reconciled {
                vm: name("new"),
                stored: None,
                observed: Observed::Suspended,
            },
        );
        assert_eq!(f.state("new"), Some(Lifecycle::Suspended));
        assert_eq!(lifecycle(&out)[0].2, "adopted: suspended");
    }

    #[test]
    fn a_vm_that_exits_by_itself_is_off_and_cleaned_up() {
        let (mut f, t) = running(&[spec("www", 1, "")], settings());
        let out = f.handle(
            t,
            Event::Observed {
                vm: name("www"),
                state: Observed::Off,
                epoch: None,
            },
        );
        assert_eq!(f.state("www"), Some(Lifecycle::Off));
        assert_eq!(serve(&out), Some(false));
        assert!(out.iter().any(|c| matches!(c, Command::Cleanup { .. })));
        assert_eq!(starts(&query(&mut f, t, "www", 1)), 1);
    }

    #[test]
    fn wake_requests_boot_like_queries_and_resync_a_running_vm() {
        let (mut f, t0) = fleet(&[spec("www", 1, ",use_synjitsu=true")], settings());
        f.handle(t0, Event::SynjitsuUp);
        let out = f.handle(t0, Event::WakeRequest { vm: name("www") });
        assert_eq!(starts(&out), 1);
        assert_eq!(lifecycle(&out)[0].2, "wake request from synjitsu");
        assert_eq!(f.view("www").unwrap().requests, 0, "not a query");
        let tag = synjitsu(&out)[0].0;
        f.handle(t0, Event::SynjitsuReplied { tag, ok: true });
        started(&mut f, t0, "www", None);
        assert_eq!(f.state("www"), Some(Lifecycle::Running));
        let out = f.handle(t0, Event::WakeRequest { vm: name("www") });
        assert_eq!(starts(&out), 0);
        assert!(matches!(&synjitsu(&out)[0].1, ClientMessage::Ready { name } if name == "www"));
    }

    #[test]
    fn every_reconnect_gets_a_full_sync_with_phases() {
        let (mut f, t0) = fleet(
            &[
                spec("a", 1, ",use_synjitsu=true"),
                spec("b", 2, ",wait_for=announce"),
                spec("c", 3, ""),
            ],
            settings(),
        );
        query(&mut f, t0, "a", 1);
        started(&mut f, t0, "a", None);
        tick(&mut f, t0 + Duration::from_millis(100));
        query(&mut f, t0, "b", 2);
        for _ in 0..2 {
            let out = f.handle(t0, Event::SynjitsuUp);
            let s = synjitsu(&out);
            let ClientMessage::Sync { vms } = &s[0].1 else {
                panic!()
            };
            let phases: Vec<(&str, Phase)> =
                vms.iter().map(|v| (v.vm.name.as_str(), v.phase)).collect();
            assert_eq!(
                phases,
                vec![("a", Phase::Running), ("b", Phase::Booting)],
                "c is not synjitsu's"
            );
            f.handle(t0, Event::SynjitsuDown);
        }
    }

    #[test]
    fn stopped_synjitsu_vms_are_reported_so_synjitsu_can_wake_them() {
        let (mut f, t) = running(&[spec("www", 1, ",use_synjitsu=true")], settings());
        f.handle(t, Event::SynjitsuUp);
        tick(&mut f, t + TTL * 2);
        let out = f.handle(t + TTL * 2, Event::Stopped { vm: name("www") });
        assert!(matches!(&synjitsu(&out)[0].1, ClientMessage::Stopped { vm } if vm.name == "www"));
    }

    #[test]
    fn queries_during_a_stop_bring_the_vm_back_afterwards() {
        let (mut f, t) = running(&[spec("www", 1, ",response_delay=0")], settings());
        tick(&mut f, t + TTL * 2);
        let out = query(&mut f, t + TTL * 2 + MS, "www", 5);
        assert!(
            answers(&out).is_empty() && starts(&out) == 0,
            "waits for the stop to finish"
        );
        let out = f.handle(t + TTL * 3, Event::Stopped { vm: name("www") });
        assert_eq!(starts(&out), 1);
        let out = started(&mut f, t + TTL * 3, "www", None);
        assert_eq!(answers(&out), vec![(5, Answer::Ready)]);
    }

    #[test]
    fn a_failed_stop_keeps_the_vm_running_and_served() {
        let (mut f, t) = running(&[spec("www", 1, "")], settings());
        tick(&mut f, t + TTL * 2);
        let out = f.handle(
            t + TTL * 2,
            Event::StopFailed {
                vm: name("www"),
                error: "EPERM".into(),
            },
        );
        assert_eq!(f.state("www"), Some(Lifecycle::Running));
        assert_eq!(serve(&out), Some(true));
        assert_eq!(f.poll_at(), Some(t + TTL * 4));
    }

    #[test]
    fn overload_and_unknown_vms_get_servfail() {
        let (mut f, t0) = fleet(&[spec("www", 1, "")], settings());
        for i in 0..MAX_WAITING_PER_VM as u64 {
            assert!(answers(&query(&mut f, t0, "www", i)).is_empty());
        }
        let out = query(&mut f, t0, "www", 9999);
        assert_eq!(
            answers(&out),
            vec![(9999, Answer::ServFail(Refusal::Overloaded))]
        );
        let out = query(&mut f, t0, "nope", 1);
        assert_eq!(answers(&out), vec![(1, Answer::ServFail(Refusal::Unknown))]);
    }

    #[test]
    fn reconfiguring_adds_and_forgets_vms_without_stopping_them() {
        let (mut f, t) = running(&[spec("a", 1, ""), spec("b", 2, "")], settings());
        query(&mut f, t, "a", 1);
        let new = vms(&[&spec("b", 2, ",response_delay=1"), &spec("c", 3, "")]);
        let out = f.reconfigure(t, new);
        assert!(
            stops(&out).is_empty(),
            "a removed VM is left running, unmanaged"
        );
        assert!(out.contains(&Command::Serve {
            vm: name("a"),
            direct: false
        }));
        assert_eq!(f.state("a"), None);
        assert_eq!(f.state("b"), Some(Lifecycle::Running));
        assert_eq!(
            f.view("b").unwrap().cfg.response_delay,
            Duration::from_secs(1)
        );
        assert_eq!(f.state("c"), Some(Lifecycle::Off));
    }

    #[test]
    fn the_domains_mac_wins_over_the_keys_and_outlives_a_reload() {
        let specs = [
            spec("www", 1, ",use_synjitsu=true"),
            spec("m", 2, ",mac=02:00:00:00:00:02"),
        ];
        let (mut f, t) = fleet(&specs, settings());
        f.handle(t, Event::SynjitsuUp);
        let derived = f.view("www").unwrap().cfg.mac;
        let domain: Mac = "02:aa:00:00:00:77".parse().unwrap();
        let out = f.handle(
            t,
            Event::MacFound {
                vm: name("www"),
                mac: domain,
            },
        );
        assert!(out.contains(&Command::Persist(Persist::Mac {
            vm: name("www"),
            mac: domain,
            configured: derived,
            keyed: false,
        })));
        let told = synjitsu(&out);
        let [(_, ClientMessage::Sync { vms: synced })] = &told[..] else {
            panic!("synjitsu is told at once: {told:?}")
        };
        assert_eq!(synced[0].vm.mac, domain);
        assert_eq!(f.view("www").unwrap().cfg.mac, domain);
        let same = f.handle(
            t,
            Event::MacFound {
                vm: name("www"),
                mac: domain,
            },
        );
        assert!(same.is_empty(), "{same:?}");
        let out = f.handle(
            t,
            Event::MacFound {
                vm: name("m"),
                mac: domain,
            },
        );
        assert!(matches!(
            &out[..],
            [Command::Persist(Persist::Mac { keyed: true, .. }), ..]
        ));

        // A reload gives the keys' MAC again; the domain's stays.
        let refs: Vec<&str> = specs.iter().map(String::as_str).collect();
        f.reconfigure(t, vms(&refs));
        assert_eq!(f.view("www").unwrap().cfg.mac, domain);
        // Removed, the VM is forgotten with its MAC.
        f.reconfigure(t, vms(&refs[1..]));
        f.reconfigure(t, vms(&refs));
        assert_eq!(f.view("www").unwrap().cfg.mac, derived);
    }

    #[test]
    fn a_lifecycle_record_carries_the_vm_as_it_is_after_the_change() {
        let (mut f, t0) = fleet(&[spec("www", 1, ",response_delay=0")], settings());
        let out = query(&mut f, t0, "www", 1);
        let views: Vec<&VmView> = out
            .iter()
            .filter_map(|c| match c {
                Command::Persist(Persist::Lifecycle { view, to, .. }) => {
                    assert_eq!(view.state, *to);
                    Some(view)
                }
                _ => None,
            })
            .collect();
        assert_eq!(views.len(), 1);
        assert_eq!(
            (views[0].state, views[0].starts, views[0].requests),
            (Lifecycle::Booting, 1, 1)
        );
        assert_eq!(views[0].last_start, Some(t0));
        let out = started(&mut f, t0 + MS, "www", Some(7));
        let Some(Command::Persist(Persist::Lifecycle { view, .. })) =
            out.iter().find(|c| matches!(c, Command::Persist(_)))
        else {
            panic!("{out:?}")
        };
        assert_eq!((view.state, view.domid), (Lifecycle::Running, Some(7)));
    }

    #[test]
    fn request_counters_are_flushed_in_batches() {
        let (mut f, t0) = fleet(&[spec("www", 1, "")], settings());
        query(&mut f, t0, "www", 1);
        let flushes = |out: &[Command]| {
            out.iter()
                .filter(|c| **c == Command::Persist(Persist::Counters))
                .count()
        };
        assert_eq!(flushes(&tick(&mut f, t0 + Duration::from_secs(5))), 0);
        assert_eq!(
            f.poll_at().map(|p| p <= t0 + COUNTERS_FLUSH_EVERY),
            Some(true)
        );
        assert_eq!(flushes(&tick(&mut f, t0 + COUNTERS_FLUSH_EVERY)), 1);
        assert_eq!(
            flushes(&tick(&mut f, t0 + COUNTERS_FLUSH_EVERY * 3)),
            0,
            "nothing new"
        );
    }

    #[test]
    fn xenstore_handover_tells_synjitsu_once_the_domain_id_is_known() {
        let cfgs = vms_with(
            "libvirt",
            &["name=m,dns=m.example.org,ip=10.0.0.1,use_synjitsu=true,handover=xenstore,kernel=/k"],
        );
        let t0 = Instant::now();
        let mut f = Fleet::new(t0, settings(), cfgs);
        f.handle(t0, Event::SynjitsuUp);
        let out = query(&mut f, t0, "m", 1);
        assert!(synjitsu(&out).is_empty());
        let out = started(&mut f, t0 + MS, "m", Some(12));
        let s = synjitsu(&out);
        let (tag, ClientMessage::Booting { vm }) = &s[0] else {
            panic!("{s:?}")
        };
        assert_eq!(vm.handover, Handover::Xenstore { domid: 12 });
        let out = f.handle(
            t0 + MS * 2,
            Event::SynjitsuReplied {
                tag: *tag,
                ok: true,
            },
        );
        assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
    }

    #[test]
    fn stale_polls_are_ignored() {
        let (mut f, t) = running(&[spec("www", 1, "")], settings());
        let (_, epoch) = f.polled()[0].clone();
        // The VM stops and boots again while the poll was out...
        tick(&mut f, t + TTL * 2);
        f.handle(t + TTL * 2, Event::Stopped { vm: name("www") });
        query(&mut f, t + TTL * 3, "www", 1);
        started(&mut f, t + TTL * 3, "www", None);
        // ...so its old "off" must not kill the new boot.
        let out = f.handle(
            t + TTL * 3,
            Event::Observed {
                vm: name("www"),
                state: Observed::Off,
                epoch: Some(epoch),
            },
        );
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(f.state("www"), Some(Lifecycle::Booting));
        // A current one is heard.
        let out = tick(&mut f, t + TTL * 4);
        assert_eq!(answers(&out), vec![(1, Answer::Ready)]);
        let (_, epoch) = f.polled()[0].clone();
        f.handle(
            t + TTL * 4,
            Event::Observed {
                vm: name("www"),
                state: Observed::Off,
                epoch: Some(epoch),
            },
        );
        assert_eq!(f.state("www"), Some(Lifecycle::Off));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_secs(2)), "2 s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(fmt_duration(Duration::from_secs(120)), "120 s");
    }
}
