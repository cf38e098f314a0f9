//! The fleet's vocabulary, shared with the modules around it: what happened ([`Event`]),
//! what to do ([`Command`], [`Answer`], [`Persist`]), what the backend sees ([`Observed`],
//! [`IfCounters`]), a VM's lifecycle state ([`Lifecycle`]) and the read-only view of a VM
//! ([`VmView`]).
//!
//! Plain data only: every decision over it is the fleet's ([`super::Fleet`]).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared_proto::{ClientMessage, Mac};

use crate::config::{StopMode, VmConfig};

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
        /// The host-side bridge port of its interface, if the backend names it.
        port: Option<String>,
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
        /// For a poll: the epoch [`super::Fleet::polled`] gave with the VM; the observation is
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
    /// The backend names the bridge port the VM's interface will have before it starts it
    /// (the process backend's veth), so synjitsu can know it from the first `booting`.
    /// Reported before [`Event::Reconciled`].
    PortFound {
        /// The VM.
        vm: VmName,
        /// The port.
        port: String,
    },
    /// The backend's definition of the VM (a libvirt domain's XML) gives its interfaces
    /// these MACs, in order (at least one). Reported before [`Event::Reconciled`].
    MacFound {
        /// The VM.
        vm: VmName,
        /// The MACs; the first is the interface its `ip` is served on.
        macs: Vec<Mac>,
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
