//! The pure core of synjitsu: which guests it stands in for, what it holds for them, and what
//! to send, write and report next.
//!
//! It owns every decision and nothing else: no sockets, no clock (`now` is passed in), no
//! threads. The shell feeds it frames ([`Hold::on_frame`]), control requests
//! ([`Hold::on_control`]), results of the slow work it asked for ([`Hold::on_store_done`],
//! [`Hold::on_fdb_done`]) and timer expiries ([`Hold::handle_timeout`] at [`Hold::poll_at`]),
//! and drains what the core queued: frames ([`Hold::poll_transmit`]), events for jitsu-dns
//! ([`Hold::poll_event`]), Xenstore work ([`Hold::poll_store`]) and forwarding-table changes
//! ([`Hold::poll_fdb`]).
//!
//! Per VM, a phase:
//! - **booting**: stand in for the guest: send gratuitous ARP and an unsolicited NA for it a
//!   few times, answer ARP and neighbour solicitations with its MAC, hold its clients' SYNs
//!   (and, for a Xenstore hand-over, write each one as it is captured);
//! - **stopped**: known but off: answer and hold as above, and ask jitsu-dns to wake it (at
//!   most once per `wake_interval` while it stays stopped);
//! - **handover**: the guest announced itself (its own gratuitous ARP or NA) or jitsu-dns said
//!   it answers (`Ready`, or `Running` in a `Sync`): stop answering for it, release its
//!   forwarding entry, and give it what is held: at once after `Ready`, else once a probe from
//!   synjitsu's own address finds the port listening;
//! - **running**: nothing held, nothing intercepted.
//!
//! Every queue is bounded (see [`Config`] and the `MAX_*` constants); what does not fit is
//! dropped and counted, never blocks and never grows without limit. Malformed frames are a
//! [`Verdict::Drop`] with a reason, never an error or a panic.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::store::layout::{HeldSyn, SynKey, TcpOption, options_from_wire};
use shared_proto::{
    ClientMessage, ErrorCode, Event, Handover, HandoverVia, Mac, PROTOCOL_VERSION, Phase, Reply,
    VmIdentity, VmStatus,
};

use crate::garp::{self, NaTo};
use crate::refused::Refused;
use crate::wire::{self, ArpOp, ArpRepr, EthHeader, NdpKind, NdpRepr, Packet, TcpOut, TcpRepr};

/// Frames queued for sending at most; beyond, new ones are dropped and counted.
pub const MAX_TRANSMIT: usize = 4096;
/// Events queued for jitsu-dns at most.
pub const MAX_EVENTS: usize = 1024;
/// Xenstore operations queued at most.
pub const MAX_STORE_OPS: usize = 8192;
/// Forwarding-table changes queued at most.
pub const MAX_FDB_OPS: usize = 1024;

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct Config {
    /// The MAC of synjitsu's own port: the source of probes and of answers for probe
    /// addresses.
    pub own_mac: Mac,
    /// synjitsu's IPv4 probe address, if any.
    pub probe_v4: Option<Ipv4Addr>,
    /// synjitsu's IPv6 probe address, if any.
    pub probe_v6: Option<Ipv6Addr>,
    /// A held SYN older than this is answered with a RST.
    pub hold_timeout: Duration,
    /// SYNs held per VM at most; further ones are dropped (`vm_full`).
    pub max_held_per_vm: usize,
    /// SYNs held in total at most; further ones are dropped (`table_full`).
    pub max_held: usize,
    /// Why Xenstore hand-over is unavailable (`None`: it is available).
    pub xenstore_off: Option<String>,
    /// Gratuitous ARPs (and unsolicited NAs) sent per boot.
    pub garp_count: u32,
    /// Between two of them.
    pub garp_interval: Duration,
    /// Wake requests per stopped VM at most once per this.
    pub wake_interval: Duration,
    /// Between two probes of a port that is not listening yet.
    pub probe_interval: Duration,
    /// Seeds the generator of probe ports, probe ISNs and Xenstore `tx_isn`s.
    pub seed: u64,
}

impl Config {
    /// The defaults: hold 10 s, 1024 per VM and 16384 in total, 3 gratuitous ARPs 100 ms
    /// apart, a wake request per second, a probe every 5 ms.
    pub fn new(own_mac: Mac) -> Config {
        Config {
            own_mac,
            probe_v4: None,
            probe_v6: None,
            hold_timeout: Duration::from_secs(10),
            max_held_per_vm: 1024,
            max_held: 16384,
            xenstore_off: Some("not configured".into()),
            garp_count: 3,
            garp_interval: Duration::from_millis(100),
            wake_interval: Duration::from_secs(1),
            probe_interval: Duration::from_millis(5),
            seed: 0x5eed,
        }
    }
}

/// What the kernel said about a frame's transport checksum (`PACKET_AUXDATA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checksum {
    /// Nothing known (a capture file): verify it.
    #[default]
    Unknown,
    /// `TP_STATUS_CSUMNOTREADY`: the sender left it to offload; only the pseudo-header sum
    /// is there. Complete it before holding.
    Partial,
    /// `TP_STATUS_CSUM_VALID`: already verified.
    Valid,
}

/// What comes with a frame besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameMeta {
    /// The transport checksum's state.
    pub checksum: Checksum,
}

/// Why a frame or a held SYN was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The frame is malformed.
    Malformed(wire::WireError),
    /// A SYN's TCP checksum is wrong (and not merely partial).
    BadChecksum,
    /// A SYN's TCP options cannot be read.
    BadTcpOptions,
    /// The VM holds `max_held_per_vm` SYNs already.
    VmFull,
    /// `max_held` SYNs are held already.
    TableFull,
    /// A held SYN never retransmitted made room for a retransmission of one refused earlier
    /// (under a flood: a real client displaces a spoofed SYN). No RST: its source is
    /// likely spoofed.
    Evicted,
    /// A held SYN waited longer than `hold_timeout`: its client got a RST.
    HoldTimeout,
    /// The VM was forgotten (absent from a `Sync`): its clients got a RST.
    VmForgotten,
}

impl DropReason {
    /// Every reason, for metrics.
    pub fn all() -> impl Iterator<Item = DropReason> {
        wire::WireError::ALL
            .into_iter()
            .map(DropReason::Malformed)
            .chain([
                DropReason::BadChecksum,
                DropReason::BadTcpOptions,
                DropReason::VmFull,
                DropReason::TableFull,
                DropReason::Evicted,
                DropReason::HoldTimeout,
                DropReason::VmForgotten,
            ])
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed(e) => e.as_str(),
            DropReason::BadChecksum => "bad_checksum",
            DropReason::BadTcpOptions => "bad_tcp_options",
            DropReason::VmFull => "vm_full",
            DropReason::TableFull => "table_full",
            DropReason::Evicted => "evicted",
            DropReason::HoldTimeout => "hold_timeout",
            DropReason::VmForgotten => "vm_forgotten",
        }
    }

    /// The position of `self` in [`DropReason::all`], without walking it (every dropped
    /// frame counts here).
    fn index(self) -> usize {
        // `WireError` is field-less and `WireError::ALL` lists it in declaration order.
        let n = wire::WireError::ALL.len();
        match self {
            DropReason::Malformed(e) => e as usize,
            DropReason::BadChecksum => n,
            DropReason::BadTcpOptions => n + 1,
            DropReason::VmFull => n + 2,
            DropReason::TableFull => n + 3,
            DropReason::Evicted => n + 4,
            DropReason::HoldTimeout => n + 5,
            DropReason::VmForgotten => n + 6,
        }
    }
}

/// What became of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not synjitsu's business.
    Pass,
    /// An ARP request or neighbour solicitation synjitsu answered.
    Answered,
    /// A client SYN, now held.
    Held,
    /// A retransmission of a SYN already held.
    Duplicate,
    /// A guest's own gratuitous ARP or NA: it is on the bridge.
    Announced,
    /// A guest's answer to a probe.
    ProbeAnswer,
    /// Dropped, for a reason.
    Drop(DropReason),
}

impl Verdict {
    /// Every verdict label, for metrics.
    pub const LABELS: [&'static str; 7] = [
        "pass",
        "answered",
        "held",
        "duplicate",
        "announced",
        "probe_answer",
        "dropped",
    ];

    fn index(self) -> usize {
        match self {
            Verdict::Pass => 0,
            Verdict::Answered => 1,
            Verdict::Held => 2,
            Verdict::Duplicate => 3,
            Verdict::Announced => 4,
            Verdict::ProbeAnswer => 5,
            Verdict::Drop(_) => 6,
        }
    }
}

/// A request refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// The machine-readable reason.
    pub code: ErrorCode,
    /// The detail.
    pub message: String,
}

impl ControlError {
    fn new(code: ErrorCode, message: impl Into<String>) -> ControlError {
        ControlError {
            code,
            message: message.into(),
        }
    }
}

/// Work for the Xenstore writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Remove `/ip/<ip>` for each address (a new boot: stale SYNs and a stale `managed`).
    Reset {
        /// The VM.
        vm: String,
        /// Its addresses.
        ips: Vec<IpAddr>,
    },
    /// Write one held SYN in one transaction (see [`crate::store`]).
    Write {
        /// Identifies the SYN in [`StoreDone`].
        id: u64,
        /// The VM.
        vm: String,
        /// The guest's domain: it alone may read the entry.
        domid: u32,
        /// Where.
        key: SynKey,
        /// What.
        syn: HeldSyn,
    },
    /// Remove one connection's entry (its client got a RST).
    Remove {
        /// Which.
        key: SynKey,
    },
}

/// The result of a [`StoreOp::Write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreDone {
    /// The write's id.
    pub id: u64,
    /// The VM.
    pub vm: String,
    /// The entry's key (to remove it if the SYN is gone meanwhile).
    pub key: SynKey,
    /// What happened.
    pub outcome: StoreOutcome,
}

/// How a Xenstore write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Committed.
    Written,
    /// `/ip/<ip>` reads `managed`: the guest took over; nothing written.
    Managed,
    /// Could not be written.
    Failed(String),
}

/// A forwarding-table change for the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbOp {
    /// Identifies it in [`Hold::on_fdb_done`].
    pub id: u64,
    /// The VM.
    pub vm: String,
    /// Its MAC.
    pub mac: Mac,
    /// Add or remove the static entry.
    pub action: FdbAction,
}

/// What to do with a VM's static forwarding entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdbAction {
    /// Point the MAC at synjitsu's port (static, so the bridge sends its frames here).
    Steer,
    /// Remove the static entry wherever it is now, so the bridge learns the guest's port.
    Release,
}

/// Counters a person would graph; rendered by [`crate::metrics`].
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Frames seen, by [`Verdict::LABELS`] index.
    pub frames: [u64; 7],
    /// Drops, by [`DropReason::all`] index.
    pub drops: Vec<u64>,
    /// SYNs held.
    pub syns_held: u64,
    /// Retransmitted SYNs not held twice.
    pub retransmit_dedup: u64,
    /// SYNs given to the guest on the wire.
    pub handed_over_wire: u64,
    /// SYNs written to Xenstore.
    pub handed_over_xenstore: u64,
    /// Partial checksums completed.
    pub checksums_completed: u64,
    /// RSTs sent to clients whose SYN timed out.
    pub rst_hold_timeout: u64,
    /// RSTs sent to clients of forgotten VMs.
    pub rst_vm_forgotten: u64,
    /// Gratuitous ARPs sent.
    pub garp_sent: u64,
    /// ARP replies sent.
    pub arp_replies: u64,
    /// Unsolicited NAs sent.
    pub na_unsolicited: u64,
    /// Solicited NAs sent.
    pub na_solicited: u64,
    /// Probe SYNs sent.
    pub probes_sent: u64,
    /// RSTs sent to reset a successful probe.
    pub probe_resets: u64,
    /// Wake requests emitted.
    pub wake_requests: u64,
    /// Guest announcements seen.
    pub guests_announced: u64,
    /// Xenstore writes committed.
    pub xenstore_writes: u64,
    /// Xenstore writes that failed.
    pub xenstore_errors: u64,
    /// Xenstore writes skipped because the guest marked its address `managed`.
    pub xenstore_skipped_managed: u64,
    /// Frames not queued because [`MAX_TRANSMIT`] were waiting.
    pub transmit_overflow: u64,
    /// Events not queued because [`MAX_EVENTS`] were waiting.
    pub events_overflow: u64,
    /// Store operations not queued because [`MAX_STORE_OPS`] were waiting.
    pub store_overflow: u64,
    /// Forwarding changes not queued because [`MAX_FDB_OPS`] were waiting.
    pub fdb_overflow: u64,
}

impl Counters {
    /// Frames seen with `verdict`'s label.
    pub fn frames_with(&self, label: &str) -> u64 {
        Verdict::LABELS
            .iter()
            .position(|l| *l == label)
            .map(|i| self.frames[i])
            .unwrap_or(0)
    }

    /// Drops for `reason`.
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }
}

/// Where a held SYN stands with Xenstore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// Not written (wire hand-over, a stopped VM, or not yet).
    No,
    /// A write is queued or running.
    Pending,
    /// Written: the guest has it.
    Written,
    /// Not written: the guest marked its address `managed`, or the write failed; goes on
    /// the wire instead.
    Refused,
}

/// One held client SYN.
#[derive(Debug)]
struct Held {
    id: u64,
    key: SynKey,
    isn: u32,
    /// The client's window and options, for Xenstore.
    window: u16,
    options: Vec<TcpOption>,
    client_mac: Mac,
    /// The frame as received, its checksum completed.
    frame: Vec<u8>,
    since: Instant,
    stored: Stored,
}

/// A probe of one port of a guest, from synjitsu's own address.
#[derive(Debug, Clone)]
struct Probe {
    /// The held SYNs it is for: their family and destination port.
    v6: bool,
    port: u16,
    /// Where the probe goes (the guest's address in the probe's family).
    vm_ip: IpAddr,
    probe_ip: IpAddr,
    src_port: u16,
    isn: u32,
    next_at: Instant,
}

/// The phase of a VM in the core (jitsu-dns's [`Phase`] plus hand-over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPhase {
    /// Standing in for a booting guest.
    Booting,
    /// Standing in for a stopped guest, asking for wake-ups.
    Stopped,
    /// The guest is up; held SYNs are being handed over.
    Handover,
    /// Nothing held, nothing intercepted.
    Running,
}

impl VmPhase {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            VmPhase::Booting => "booting",
            VmPhase::Stopped => "stopped",
            VmPhase::Handover => "handover",
            VmPhase::Running => "running",
        }
    }

    /// Every phase, for metrics.
    pub const ALL: [VmPhase; 4] = [
        VmPhase::Booting,
        VmPhase::Stopped,
        VmPhase::Handover,
        VmPhase::Running,
    ];

    fn intercepting(self) -> bool {
        matches!(self, VmPhase::Booting | VmPhase::Stopped)
    }
}

#[derive(Debug)]
struct Vm {
    id: VmIdentity,
    phase: VmPhase,
    held: VecDeque<Held>,
    /// (key, ISN) of every held SYN, for retransmissions; true once it was retransmitted
    /// (the client is real: never evicted).
    seen: HashMap<(SynKey, u32), bool>,
    garp_left: u32,
    garp_at: Option<Instant>,
    last_wake: Option<Instant>,
    /// A static entry for the MAC was asked for and not released since.
    steered: bool,
    /// The release asked for and not yet confirmed; nothing goes to the guest before.
    release_pending: Option<u64>,
    /// Every port listens (jitsu-dns said so): no probing.
    listening: bool,
    /// The guest announced itself since it last booted (seen on the bridge, not told).
    announced: bool,
    probes: Vec<Probe>,
}

impl Vm {
    fn new(id: VmIdentity, phase: VmPhase) -> Vm {
        Vm {
            id,
            phase,
            held: VecDeque::new(),
            seen: HashMap::new(),
            garp_left: 0,
            garp_at: None,
            last_wake: None,
            steered: false,
            release_pending: None,
            listening: false,
            announced: false,
            probes: Vec::new(),
        }
    }

    fn addrs(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(self.id.ipv4)];
        v.extend(self.id.ipv6.map(IpAddr::V6));
        v
    }

    fn xenstore_domid(&self) -> Option<u32> {
        match self.id.handover {
            Handover::Xenstore { domid } => Some(domid),
            Handover::Wire => None,
        }
    }

    /// Starts standing in for the guest anew in `phase` (booting or stopped), with
    /// `garp_left` gratuitous ARPs to send from `garp_at`. Nothing held is in Xenstore any
    /// more: the domain is gone or new.
    fn restart(&mut self, phase: VmPhase, garp_left: u32, garp_at: Option<Instant>) {
        self.phase = phase;
        self.announced = false;
        self.listening = false;
        self.probes.clear();
        self.garp_left = garp_left;
        self.garp_at = garp_at;
        for h in self.held.iter_mut() {
            h.stored = Stored::No;
        }
    }

    /// Removes every held SYN `pick` selects (from `held` and `seen`), in order. The caller
    /// subtracts them from [`Hold`]'s `total_held`.
    fn take_held(&mut self, mut pick: impl FnMut(&Held) -> bool) -> Vec<Held> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.held.len());
        for h in self.held.drain(..) {
            if pick(&h) {
                self.seen.remove(&(h.key, h.isn));
                taken.push(h);
            } else {
                kept.push_back(h);
            }
        }
        self.held = kept;
        taken
    }

    /// Removes the held SYN at `i` (from `held` and `seen`). The caller subtracts it from
    /// [`Hold`]'s `total_held`.
    fn take_held_at(&mut self, i: usize) -> Option<Held> {
        let h = self.held.remove(i)?;
        self.seen.remove(&(h.key, h.isn));
        Some(h)
    }
}

/// Something to send, built when it is sent.
#[derive(Debug)]
enum Tx {
    Garp {
        mac: Mac,
        ip: Ipv4Addr,
    },
    Na {
        mac: Mac,
        ip: Ipv6Addr,
        to: NaTo,
    },
    ArpReply {
        mac: Mac,
        ip: Ipv4Addr,
        req: ArpRepr,
    },
    Tcp(TcpOut),
    Frame(Vec<u8>),
}

/// The core. See the module documentation.
#[derive(Debug)]
pub struct Hold {
    cfg: Config,
    vms: BTreeMap<String, Vm>,
    by_ip: HashMap<IpAddr, String>,
    by_mac: HashMap<Mac, String>,
    total_held: usize,
    next_id: u64,
    rng: u64,
    transmit: VecDeque<Tx>,
    events: VecDeque<Event>,
    store: VecDeque<StoreOp>,
    fdb: VecDeque<FdbOp>,
    counters: Counters,
    /// When a dropped frame was last logged, and how many were not logged since: a flood of
    /// garbage must not become a flood of log lines.
    drop_log: (Option<Instant>, u64),
    /// SYNs recently refused for want of room, to recognise their retransmissions.
    refused: Refused,
}

/// Options a probe SYN carries: MSS 1460 (some stacks refuse option-less SYNs, none these).
const PROBE_OPTIONS: &[u8] = &[2, 4, 0x05, 0xb4];

impl Hold {
    /// A core that knows no VM yet.
    pub fn new(cfg: Config) -> Hold {
        let rng = cfg.seed | 1;
        let cfg_seed = cfg.seed;
        Hold {
            cfg,
            vms: BTreeMap::new(),
            by_ip: HashMap::new(),
            by_mac: HashMap::new(),
            total_held: 0,
            next_id: 1,
            rng,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            store: VecDeque::new(),
            fdb: VecDeque::new(),
            counters: Counters {
                drops: vec![0; DropReason::all().count()],
                ..Counters::default()
            },
            drop_log: (None, 0),
            refused: Refused::new(Duration::from_secs(2), cfg_seed),
        }
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// SYNs held now, in total.
    pub fn held_now(&self) -> usize {
        self.total_held
    }

    /// Every VM: name, phase, SYNs held now.
    pub fn vms(&self) -> impl Iterator<Item = (&str, VmPhase, usize)> {
        self.vms
            .iter()
            .map(|(n, v)| (n.as_str(), v.phase, v.held.len()))
    }

    /// Every MAC with a static entry asked for and not released (to release on exit).
    pub fn steered_macs(&self) -> Vec<(String, Mac)> {
        self.vms
            .iter()
            .filter(|(_, v)| v.steered)
            .map(|(n, v)| (n.clone(), v.id.mac))
            .collect()
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*: enough for ISNs and ports nobody needs to be unguessable.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn send(&mut self, tx: Tx) {
        if self.transmit.len() >= MAX_TRANSMIT {
            self.counters.transmit_overflow += 1;
            return;
        }
        self.transmit.push_back(tx);
    }

    fn emit(&mut self, ev: Event) {
        if self.events.len() >= MAX_EVENTS {
            self.counters.events_overflow += 1;
            return;
        }
        self.events.push_back(ev);
    }

    fn queue_store(&mut self, op: StoreOp) -> bool {
        if self.store.len() >= MAX_STORE_OPS {
            self.counters.store_overflow += 1;
            return false;
        }
        self.store.push_back(op);
        true
    }

    fn queue_fdb(&mut self, vm: &str, mac: Mac, action: FdbAction) -> Option<u64> {
        if self.fdb.len() >= MAX_FDB_OPS {
            self.counters.fdb_overflow += 1;
            return None;
        }
        let id = self.id();
        self.fdb.push_back(FdbOp {
            id,
            vm: vm.to_string(),
            mac,
            action,
        });
        Some(id)
    }

    // ---- outputs -------------------------------------------------------------------------

    /// The next frame to send, written into `out` (replacing its contents); false if none.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(tx) = self.transmit.pop_front() else {
            return false;
        };
        out.clear();
        match tx {
            Tx::Frame(mut f) => std::mem::swap(out, &mut f),
            Tx::Garp { mac, ip } => {
                out.resize(garp::MAX_LEN, 0);
                let n = garp::gratuitous_arp(out, mac, ip);
                out.truncate(n);
            }
            Tx::Na { mac, ip, to } => {
                out.resize(garp::MAX_LEN, 0);
                let n = garp::neighbour_advertisement(out, mac, ip, to);
                out.truncate(n);
            }
            Tx::ArpReply { mac, ip, req } => {
                out.resize(garp::MAX_LEN, 0);
                let n = garp::arp_reply(out, mac, ip, &req);
                out.truncate(n);
            }
            Tx::Tcp(seg) => {
                out.resize(wire::TCP_OUT_MAX, 0);
                let n = wire::write_tcp(out, &seg);
                out.truncate(n);
            }
        }
        true
    }

    /// The next event for jitsu-dns.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next Xenstore operation.
    pub fn poll_store(&mut self) -> Option<StoreOp> {
        self.store.pop_front()
    }

    /// The next forwarding-table change.
    pub fn poll_fdb(&mut self) -> Option<FdbOp> {
        self.fdb.pop_front()
    }

    /// When [`Hold::handle_timeout`] must run next, if ever.
    pub fn poll_at(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut take = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        for vm in self.vms.values() {
            if let Some(g) = vm.garp_at {
                take(g);
            }
            if let Some(h) = vm.held.front() {
                take(h.since + self.cfg.hold_timeout);
            }
            for p in &vm.probes {
                take(p.next_at);
            }
        }
        at
    }

    // ---- frames --------------------------------------------------------------------------

    /// Looks at one frame received on synjitsu's port and decides.
    pub fn on_frame(&mut self, now: Instant, frame: &[u8], meta: FrameMeta) -> Verdict {
        let verdict = self.judge(now, frame, meta);
        self.counters.frames[verdict.index()] += 1;
        if let Verdict::Drop(reason) = verdict {
            self.counters.drops[reason.index()] += 1;
            let (last, suppressed) = &mut self.drop_log;
            if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                tracing::trace!(
                    reason = reason.as_str(),
                    len = frame.len(),
                    suppressed = *suppressed,
                    "frame dropped"
                );
                *last = Some(now);
                *suppressed = 0;
            } else {
                *suppressed += 1;
            }
        }
        verdict
    }

    fn judge(&mut self, now: Instant, frame: &[u8], meta: FrameMeta) -> Verdict {
        let trusted = meta.checksum != Checksum::Unknown;
        let parsed = match wire::parse(frame, trusted) {
            Ok(p) => p,
            Err(e) => return Verdict::Drop(DropReason::Malformed(e)),
        };
        match parsed.packet {
            Packet::Arp(a) => self.on_arp(now, &parsed.eth, &a),
            Packet::Ndp(n) => self.on_ndp(now, &parsed.eth, &n),
            Packet::Tcp(t) => self.on_tcp(now, frame, &parsed.eth, &t, meta),
            Packet::Other => Verdict::Pass,
        }
    }

    fn on_arp(&mut self, now: Instant, eth: &EthHeader, a: &ArpRepr) -> Verdict {
        // The guest speaking for its own address, in either form: it is on the bridge.
        if let Some(name) = self.by_mac.get(&a.sender_mac).cloned() {
            let vm = &self.vms[&name];
            if a.sender_ip == vm.id.ipv4 && vm.phase.intercepting() {
                self.announced(now, &name);
                return Verdict::Announced;
            }
        }
        if a.op != ArpOp::Request {
            return Verdict::Pass;
        }
        // A probe (RFC 5227, sender 0.0.0.0) is most likely the booting guest checking its
        // own address: answering would make it give the address up.
        if a.sender_ip.is_unspecified() || a.sender_ip == a.target_ip {
            return Verdict::Pass;
        }
        if Some(a.target_ip) == self.cfg.probe_v4 {
            let mac = self.cfg.own_mac;
            self.send(Tx::ArpReply {
                mac,
                ip: a.target_ip,
                req: *a,
            });
            self.counters.arp_replies += 1;
            return Verdict::Answered;
        }
        let Some(name) = self.by_ip.get(&IpAddr::V4(a.target_ip)).cloned() else {
            return Verdict::Pass;
        };
        let vm = &self.vms[&name];
        if !vm.phase.intercepting() || eth.src == vm.id.mac || a.sender_mac == vm.id.mac {
            return Verdict::Pass;
        }
        let (mac, ip) = (vm.id.mac, vm.id.ipv4);
        self.send(Tx::ArpReply { mac, ip, req: *a });
        self.counters.arp_replies += 1;
        tracing::debug!(vm = %name, asker = %a.sender_ip, "answered ARP");
        self.wake(now, &name, false);
        Verdict::Answered
    }

    fn on_ndp(&mut self, now: Instant, eth: &EthHeader, n: &NdpRepr) -> Verdict {
        match n.kind {
            NdpKind::Advertisement { .. } => {
                let Some(name) = self.by_mac.get(&eth.src).cloned() else {
                    return Verdict::Pass;
                };
                let vm = &self.vms[&name];
                if Some(n.target) == vm.id.ipv6 && vm.phase.intercepting() {
                    self.announced(now, &name);
                    return Verdict::Announced;
                }
                Verdict::Pass
            }
            NdpKind::Solicitation => {
                // Duplicate address detection: the guest itself, most likely (see on_arp).
                if n.src_ip.is_unspecified() {
                    return Verdict::Pass;
                }
                let asker = NaTo::Asker {
                    ip: n.src_ip,
                    mac: n.lladdr.unwrap_or(eth.src),
                };
                if Some(n.target) == self.cfg.probe_v6 {
                    let mac = self.cfg.own_mac;
                    self.send(Tx::Na {
                        mac,
                        ip: n.target,
                        to: asker,
                    });
                    self.counters.na_solicited += 1;
                    return Verdict::Answered;
                }
                let Some(name) = self.by_ip.get(&IpAddr::V6(n.target)).cloned() else {
                    return Verdict::Pass;
                };
                let vm = &self.vms[&name];
                if !vm.phase.intercepting() || eth.src == vm.id.mac {
                    return Verdict::Pass;
                }
                let mac = vm.id.mac;
                self.send(Tx::Na {
                    mac,
                    ip: n.target,
                    to: asker,
                });
                self.counters.na_solicited += 1;
                tracing::debug!(vm = %name, asker = %n.src_ip, "answered neighbour solicitation");
                self.wake(now, &name, false);
                Verdict::Answered
            }
        }
    }

    fn is_probe_ip(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => Some(v4) == self.cfg.probe_v4,
            IpAddr::V6(v6) => Some(v6) == self.cfg.probe_v6,
        }
    }

    fn on_tcp(
        &mut self,
        now: Instant,
        frame: &[u8],
        eth: &EthHeader,
        t: &TcpRepr<'_>,
        meta: FrameMeta,
    ) -> Verdict {
        if self.is_probe_ip(t.dst_ip) {
            return self.on_probe_answer(now, t);
        }
        if !t.is_syn() {
            return Verdict::Pass;
        }
        let Some(name) = self.by_ip.get(&t.dst_ip).cloned() else {
            return Verdict::Pass;
        };
        let vm = &self.vms[&name];
        // Only frames the bridge sent here for the guest's MAC; a SYN to its address but
        // another MAC (flooded) would not reach the guest either.
        if vm.phase == VmPhase::Running || eth.dst != vm.id.mac {
            return Verdict::Pass;
        }
        // A checksum that is complete is checked first (cheap, and a damaged frame must not
        // count as anything); a partial one is completed only once the SYN will be kept, so
        // a flood beyond the bounds costs no copies.
        if meta.checksum == Checksum::Unknown && !wire::tcp_checksum_ok(frame, t) {
            return Verdict::Drop(DropReason::BadChecksum);
        }
        let Ok(options) = options_from_wire(t.options) else {
            return Verdict::Drop(DropReason::BadTcpOptions);
        };
        let key = SynKey {
            local_ip: t.dst_ip,
            local_port: t.dst_port,
            dest_ip: t.src_ip,
            dest_port: t.src_port,
        };
        let vm = self.vms.get_mut(&name).expect("looked up above");
        if let Some(retransmitted) = vm.seen.get_mut(&(key, t.seq)) {
            *retransmitted = true;
            self.counters.retransmit_dedup += 1;
            tracing::trace!(vm = %name, client = %t.src_ip, port = t.src_port, "retransmitted SYN");
            self.wake(now, &name, false);
            return Verdict::Duplicate;
        }
        let full = if vm.held.len() >= self.cfg.max_held_per_vm {
            Some(DropReason::VmFull)
        } else if self.total_held >= self.cfg.max_held {
            Some(DropReason::TableFull)
        } else {
            None
        };
        let mut retransmitted = false;
        if let Some(reason) = full {
            // A retransmission of a SYN refused earlier comes from a real client: it takes
            // the place of a SYN that was never retransmitted (likely spoofed), if any.
            let fp = self.refused.fingerprint(&key, t.seq);
            if !self.refused.contains(fp) || !self.evict_one(&name) {
                self.refused.insert(now, fp);
                return Verdict::Drop(reason);
            }
            retransmitted = true;
        }
        let id = self.id();
        let mut frame = frame.to_vec();
        if meta.checksum == Checksum::Partial {
            wire::complete_tcp_checksum(&mut frame, t);
            self.counters.checksums_completed += 1;
        }
        let vm = self.vms.get_mut(&name).expect("looked up above");
        vm.seen.insert((key, t.seq), retransmitted);
        vm.held.push_back(Held {
            id,
            key,
            isn: t.seq,
            window: t.window,
            options,
            client_mac: eth.src,
            frame,
            since: now,
            stored: Stored::No,
        });
        let held = vm.held.len();
        let phase = vm.phase;
        self.total_held += 1;
        self.counters.syns_held += 1;
        tracing::debug!(vm = %name, client = %t.src_ip, port = t.dst_port, held, "SYN held");
        self.emit(Event::SynHeld {
            name: name.clone(),
            held: u32::try_from(held).unwrap_or(u32::MAX),
        });
        match phase {
            VmPhase::Booting => self.write_pending(&name),
            VmPhase::Stopped => self.wake(now, &name, false),
            VmPhase::Handover => self.progress(now, &name),
            VmPhase::Running => {}
        }
        Verdict::Held
    }

    fn on_probe_answer(&mut self, now: Instant, t: &TcpRepr<'_>) -> Verdict {
        let found = self.vms.iter().find_map(|(name, vm)| {
            vm.probes
                .iter()
                .position(|p| {
                    p.vm_ip == t.src_ip
                        && p.port == t.src_port
                        && p.probe_ip == t.dst_ip
                        && p.src_port == t.dst_port
                })
                .map(|i| (name.clone(), i))
        });
        let Some((name, i)) = found else {
            return Verdict::Pass;
        };
        let vm = self.vms.get_mut(&name).expect("found above");
        let p = vm.probes[i].clone();
        let acks_probe = t.flags & wire::tcp_flags::ACK != 0 && t.ack == p.isn.wrapping_add(1);
        let syn_ack = t.flags & (wire::tcp_flags::SYN | wire::tcp_flags::ACK)
            == (wire::tcp_flags::SYN | wire::tcp_flags::ACK);
        if syn_ack && acks_probe {
            vm.probes.remove(i);
            let mac = vm.id.mac;
            // Reset the probe's half-open connection so the guest forgets it at once.
            self.send(Tx::Tcp(TcpOut {
                eth_src: self.cfg.own_mac,
                eth_dst: mac,
                src_ip: p.probe_ip,
                dst_ip: p.vm_ip,
                src_port: p.src_port,
                dst_port: p.port,
                seq: p.isn.wrapping_add(1),
                ack: 0,
                flags: wire::tcp_flags::RST,
                window: 0,
                options: &[],
            }));
            self.counters.probe_resets += 1;
            tracing::debug!(vm = %name, port = p.port, "probe answered: the port listens");
            self.resend(&name, |h| {
                h.key.local_port == p.port && h.key.local_ip.is_ipv6() == p.v6
            });
            self.progress(now, &name);
        } else if t.flags & wire::tcp_flags::RST != 0 && acks_probe {
            tracing::trace!(vm = %name, port = p.port, "probe refused: not listening yet");
        }
        Verdict::ProbeAnswer
    }

    // ---- phases --------------------------------------------------------------------------

    fn announced(&mut self, now: Instant, name: &str) {
        if let Some(vm) = self.vms.get_mut(name) {
            vm.announced = true;
        }
        self.counters.guests_announced += 1;
        tracing::info!(vm = %name, "guest announced itself");
        self.emit(Event::GuestAnnounced {
            name: name.to_string(),
        });
        self.go_up(now, name, false);
    }

    /// The guest is up: stop intercepting, release its MAC, hand over what is held.
    fn go_up(&mut self, now: Instant, name: &str, listening: bool) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        vm.garp_at = None;
        vm.garp_left = 0;
        vm.listening |= listening;
        if vm.phase.intercepting() || vm.phase == VmPhase::Running {
            vm.phase = VmPhase::Handover;
        }
        // What Xenstore has, the guest reads itself.
        let removed = vm.take_held(|h| h.stored == Stored::Written).len();
        let steered = std::mem::replace(&mut vm.steered, false);
        let mac = vm.id.mac;
        self.total_held -= removed;
        if steered {
            let id = self.queue_fdb(name, mac, FdbAction::Release);
            self.vms.get_mut(name).expect("present").release_pending = id;
        }
        self.progress(now, name);
    }

    /// Moves a VM in hand-over forward: re-send what may go, probe what must be probed.
    fn progress(&mut self, now: Instant, name: &str) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        if vm.phase != VmPhase::Handover || vm.release_pending.is_some() {
            return;
        }
        if vm.listening {
            self.resend(name, |_| true);
        } else {
            // One probe per (family, port) of what waits for the wire.
            let mut wanted: Vec<(bool, u16)> = vm
                .held
                .iter()
                .filter(|h| matches!(h.stored, Stored::No | Stored::Refused))
                .map(|h| (h.key.local_ip.is_ipv6(), h.key.local_port))
                .collect();
            wanted.sort_unstable();
            wanted.dedup();
            for (v6, port) in wanted {
                let vm = &self.vms[name];
                if vm.probes.iter().any(|p| p.v6 == v6 && p.port == port) {
                    continue;
                }
                let Some((vm_ip, probe_ip)) = self.probe_route(vm, v6) else {
                    // No probe address for either family: wait for `Ready`.
                    continue;
                };
                let src_port = 32768 + (self.rand() % 28232) as u16;
                let isn = self.rand() as u32;
                let probe = Probe {
                    v6,
                    port,
                    vm_ip,
                    probe_ip,
                    src_port,
                    isn,
                    next_at: now,
                };
                self.vms.get_mut(name).expect("present").probes.push(probe);
            }
            self.send_due_probes(now, name);
        }
        self.finish_handover(name);
    }

    /// Ends a VM's hand-over once the release is confirmed and nothing is held any more.
    fn finish_handover(&mut self, name: &str) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        if vm.phase == VmPhase::Handover && vm.release_pending.is_none() && vm.held.is_empty() {
            vm.probes.clear();
            vm.phase = VmPhase::Running;
            tracing::info!(vm = %name, "hand-over complete");
        }
    }

    /// The guest address and synjitsu address to probe with: the held SYN's family if
    /// synjitsu has a probe address in it, else the other family.
    fn probe_route(&self, vm: &Vm, v6: bool) -> Option<(IpAddr, IpAddr)> {
        let v4 = self
            .cfg
            .probe_v4
            .map(|p| (IpAddr::V4(vm.id.ipv4), IpAddr::V4(p)));
        let v6r = self
            .cfg
            .probe_v6
            .zip(vm.id.ipv6)
            .map(|(p, ip)| (IpAddr::V6(ip), IpAddr::V6(p)));
        if v6 { v6r.or(v4) } else { v4.or(v6r) }
    }

    fn send_due_probes(&mut self, now: Instant, name: &str) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let mac = vm.id.mac;
        let interval = self.cfg.probe_interval;
        let mut due = Vec::new();
        for p in vm.probes.iter_mut().filter(|p| p.next_at <= now) {
            p.next_at = now + interval;
            due.push(p.clone());
        }
        for p in due {
            self.send(Tx::Tcp(TcpOut {
                eth_src: self.cfg.own_mac,
                eth_dst: mac,
                src_ip: p.probe_ip,
                dst_ip: p.vm_ip,
                src_port: p.src_port,
                dst_port: p.port,
                seq: p.isn,
                ack: 0,
                flags: wire::tcp_flags::SYN,
                window: 64240,
                options: PROBE_OPTIONS,
            }));
            self.counters.probes_sent += 1;
            tracing::trace!(vm = %name, port = p.port, "probe sent");
        }
    }

    /// Re-sends every held SYN that `pick` selects and Xenstore does not have.
    fn resend(&mut self, name: &str, pick: impl Fn(&Held) -> bool) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        let out = vm.take_held(|h| matches!(h.stored, Stored::No | Stored::Refused) && pick(h));
        if out.is_empty() {
            return;
        }
        let count = out.len();
        self.total_held -= count;
        self.counters.handed_over_wire += count as u64;
        for h in out {
            self.send(Tx::Frame(h.frame));
        }
        tracing::info!(vm = %name, count, "held SYNs re-sent to the guest");
        self.emit(Event::Handover {
            name: name.to_string(),
            count: u32::try_from(count).unwrap_or(u32::MAX),
            via: HandoverVia::Wire,
        });
    }

    /// Queues a Xenstore write for every held SYN of a booting Xenstore VM not yet written.
    fn write_pending(&mut self, name: &str) {
        let Some(vm) = self.vms.get(name) else {
            return;
        };
        let Some(domid) = vm.xenstore_domid() else {
            return;
        };
        if vm.phase != VmPhase::Booting {
            return;
        }
        let todo: Vec<usize> = vm
            .held
            .iter()
            .enumerate()
            .filter(|(_, h)| h.stored == Stored::No)
            .map(|(i, _)| i)
            .collect();
        for i in todo {
            let random = (self.rand() % 65535) as u16;
            let h = &self.vms[name].held[i];
            let (id, key) = (h.id, h.key);
            let syn = HeldSyn::new(h.window, h.isn, h.options.clone(), random);
            let queued = self.queue_store(StoreOp::Write {
                id,
                vm: name.to_string(),
                domid,
                key,
                syn,
            });
            let h = &mut self.vms.get_mut(name).expect("present").held[i];
            h.stored = if queued {
                Stored::Pending
            } else {
                Stored::Refused
            };
        }
    }

    /// Gives up the newest held SYN of `name` that was never retransmitted and is not in
    /// Xenstore, to make room; false if there is none.
    fn evict_one(&mut self, name: &str) -> bool {
        let Some(vm) = self.vms.get_mut(name) else {
            return false;
        };
        let victim = vm
            .held
            .iter()
            .rposition(|h| h.stored == Stored::No && vm.seen.get(&(h.key, h.isn)) == Some(&false));
        let Some(i) = victim else {
            return false;
        };
        let h = vm.take_held_at(i).expect("index from rposition");
        self.total_held -= 1;
        self.counters.drops[DropReason::Evicted.index()] += 1;
        tracing::debug!(vm = %name, client = %h.key.dest_ip, "held SYN evicted for a retransmitted one");
        true
    }

    fn wake(&mut self, now: Instant, name: &str, force: bool) {
        let interval = self.cfg.wake_interval;
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        if vm.phase != VmPhase::Stopped {
            return;
        }
        let due = force
            || vm
                .last_wake
                .is_none_or(|t| now.duration_since(t) >= interval);
        if !due {
            return;
        }
        vm.last_wake = Some(now);
        self.counters.wake_requests += 1;
        tracing::info!(vm = %name, "wake request");
        self.emit(Event::WakeRequest {
            name: name.to_string(),
        });
    }

    fn steer(&mut self, name: &str) {
        let vm = &self.vms[name];
        if vm.steered {
            return;
        }
        let mac = vm.id.mac;
        if self.queue_fdb(name, mac, FdbAction::Steer).is_some() {
            let vm = self.vms.get_mut(name).expect("present");
            vm.steered = true;
            vm.release_pending = None;
        }
    }

    /// Answers every held SYN of `name` with a RST and forgets them.
    fn reset_all(&mut self, name: &str, reason: DropReason) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        for h in vm.take_held(|_| true) {
            self.reset_one(name, h, reason);
        }
    }

    fn reset_one(&mut self, name: &str, h: Held, reason: DropReason) {
        let vm = &self.vms[name];
        let seg = TcpOut {
            eth_src: vm.id.mac,
            eth_dst: h.client_mac,
            src_ip: h.key.local_ip,
            dst_ip: h.key.dest_ip,
            src_port: h.key.local_port,
            dst_port: h.key.dest_port,
            seq: 0,
            ack: h.isn.wrapping_add(1),
            flags: wire::tcp_flags::RST | wire::tcp_flags::ACK,
            window: 0,
            options: &[],
        };
        self.send(Tx::Tcp(seg));
        self.total_held -= 1;
        self.counters.drops[reason.index()] += 1;
        match reason {
            DropReason::VmForgotten => self.counters.rst_vm_forgotten += 1,
            _ => self.counters.rst_hold_timeout += 1,
        }
        if matches!(h.stored, Stored::Written | Stored::Pending) {
            self.queue_store(StoreOp::Remove { key: h.key });
        }
        tracing::debug!(vm = %name, client = %h.key.dest_ip, reason = reason.as_str(), "held SYN answered with a RST");
    }

    fn check_conflicts(&self, vm: &VmIdentity) -> Result<(), ControlError> {
        let clash = |other: Option<&String>, what: String| match other {
            Some(o) if *o != vm.name => Err(ControlError::new(
                ErrorCode::Failed,
                format!("VM {}: {what} already belongs to VM {o}", vm.name),
            )),
            _ => Ok(()),
        };
        clash(self.by_mac.get(&vm.mac), format!("MAC {}", vm.mac))?;
        clash(
            self.by_ip.get(&IpAddr::V4(vm.ipv4)),
            format!("address {}", vm.ipv4),
        )?;
        if let Some(v6) = vm.ipv6 {
            clash(self.by_ip.get(&IpAddr::V6(v6)), format!("address {v6}"))?;
        }
        Ok(())
    }

    /// Creates or updates a VM's identity, keeping what it holds.
    fn upsert(&mut self, id: &VmIdentity, phase: VmPhase) {
        if let Some(vm) = self.vms.get(&id.name) {
            let old = vm.id.clone();
            if old.mac != id.mac {
                self.by_mac.remove(&old.mac);
                if vm.steered {
                    self.queue_fdb(&id.name, old.mac, FdbAction::Release);
                    self.vms.get_mut(&id.name).expect("present").steered = false;
                }
            }
            for ip in self.vms[&id.name].addrs() {
                self.by_ip.remove(&ip);
            }
            self.vms.get_mut(&id.name).expect("present").id = id.clone();
        } else {
            self.vms.insert(id.name.clone(), Vm::new(id.clone(), phase));
        }
        self.by_mac.insert(id.mac, id.name.clone());
        for ip in self.vms[&id.name].addrs() {
            self.by_ip.insert(ip, id.name.clone());
        }
    }

    fn forget(&mut self, name: &str) {
        self.reset_all(name, DropReason::VmForgotten);
        let Some(vm) = self.vms.remove(name) else {
            return;
        };
        if vm.steered {
            self.queue_fdb(name, vm.id.mac, FdbAction::Release);
        }
        self.by_mac.remove(&vm.id.mac);
        for ip in vm.addrs() {
            self.by_ip.remove(&ip);
        }
        tracing::info!(vm = %name, "forgotten");
    }

    // ---- control -------------------------------------------------------------------------

    /// Carries out one request from jitsu-dns (the session's hello is the control server's).
    pub fn on_control(&mut self, now: Instant, msg: &ClientMessage) -> Result<Reply, ControlError> {
        match msg {
            ClientMessage::Hello { .. } => Ok(Reply::Hello {
                version: PROTOCOL_VERSION,
                server: format!("synjitsu {}", env!("CARGO_PKG_VERSION")),
            }),
            ClientMessage::Booting { vm } => self.on_booting(now, vm).map(|()| Reply::Ack),
            ClientMessage::Stopped { vm } => self.on_stopped(now, vm).map(|()| Reply::Ack),
            ClientMessage::Ready { name } => self.on_ready(now, name).map(|()| Reply::Ack),
            ClientMessage::Sync { vms } => self.on_sync(now, vms).map(|()| Reply::Ack),
        }
    }

    fn on_booting(&mut self, now: Instant, id: &VmIdentity) -> Result<(), ControlError> {
        if let (Handover::Xenstore { .. }, Some(why)) = (id.handover, &self.cfg.xenstore_off) {
            return Err(ControlError::new(
                ErrorCode::Failed,
                format!(
                    "VM {}: xenstore hand-over is unavailable ({why}); use the wire hand-over",
                    id.name
                ),
            ));
        }
        self.check_conflicts(id)?;
        let previous = self.vms.get(&id.name).map(|v| v.phase);
        self.upsert(id, VmPhase::Booting);
        if previous == Some(VmPhase::Booting) {
            // Already standing in for it: an identity update, not a new boot.
            self.write_pending(&id.name);
            return Ok(());
        }
        let vm = self.vms.get_mut(&id.name).expect("upserted");
        // A new boot: what Xenstore held for an earlier one is stale, the guest reads the
        // writes below, and the domid may be new.
        let garps = self.cfg.garp_count;
        vm.restart(VmPhase::Booting, garps, (garps > 0).then_some(now));
        if vm.xenstore_domid().is_some() {
            let ips = vm.addrs();
            self.queue_store(StoreOp::Reset {
                vm: id.name.clone(),
                ips,
            });
        }
        self.steer(&id.name);
        tracing::info!(vm = %id.name, mac = %id.mac, ip = %id.ipv4, "booting: standing in");
        self.handle_timeout(now);
        self.write_pending(&id.name);
        Ok(())
    }

    fn on_stopped(&mut self, _now: Instant, id: &VmIdentity) -> Result<(), ControlError> {
        self.check_conflicts(id)?;
        self.upsert(id, VmPhase::Stopped);
        // The domain is gone; its Xenstore entries with it.
        let vm = self.vms.get_mut(&id.name).expect("upserted");
        vm.restart(VmPhase::Stopped, 0, None);
        self.steer(&id.name);
        tracing::info!(vm = %id.name, "stopped: holding for a wake-up");
        Ok(())
    }

    fn on_ready(&mut self, now: Instant, name: &str) -> Result<(), ControlError> {
        if !self.vms.contains_key(name) {
            return Err(ControlError::new(
                ErrorCode::UnknownVm,
                format!("no VM named {name:?}"),
            ));
        }
        tracing::info!(vm = %name, "ready");
        self.go_up(now, name, true);
        Ok(())
    }

    fn on_sync(&mut self, now: Instant, vms: &[VmStatus]) -> Result<(), ControlError> {
        let keep: HashSet<&str> = vms.iter().map(|s| s.vm.name.as_str()).collect();
        let gone: Vec<String> = self
            .vms
            .keys()
            .filter(|n| !keep.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.forget(&name);
        }
        let mut refused = Vec::new();
        for s in vms {
            let up = self.vms.get(&s.vm.name).is_some_and(|v| {
                v.announced && matches!(v.phase, VmPhase::Handover | VmPhase::Running)
            });
            let r = match s.phase {
                // synjitsu saw the guest announce itself; jitsu-dns may have missed the event
                // with its old connection. What was seen wins (standing in for a guest that is
                // up would hijack its traffic), and the event is sent again.
                Phase::Booting if up => self.check_conflicts(&s.vm).map(|()| {
                    self.upsert(&s.vm, VmPhase::Running);
                    self.emit(Event::GuestAnnounced {
                        name: s.vm.name.clone(),
                    });
                }),
                Phase::Booting => self.on_booting(now, &s.vm),
                Phase::Stopped => self.on_stopped(now, &s.vm).map(|()| {
                    // A wake request may have been lost with the old connection.
                    if !self.vms[&s.vm.name].held.is_empty() {
                        self.wake(now, &s.vm.name, true);
                    }
                }),
                Phase::Running => self.check_conflicts(&s.vm).map(|()| {
                    if self.vms.contains_key(&s.vm.name) {
                        self.upsert(&s.vm, VmPhase::Running);
                        self.go_up(now, &s.vm.name, true);
                    } else {
                        self.upsert(&s.vm, VmPhase::Running);
                    }
                }),
            };
            if let Err(e) = r {
                refused.push(e.message);
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(ControlError::new(
                ErrorCode::Failed,
                format!("sync applied except: {}", refused.join("; ")),
            ))
        }
    }

    /// The result of a Xenstore write.
    pub fn on_store_done(&mut self, now: Instant, done: StoreDone) {
        let found = self
            .vms
            .get_mut(&done.vm)
            .and_then(|vm| vm.held.iter_mut().find(|h| h.id == done.id));
        let Some(h) = found else {
            // Its client got a RST meanwhile: the entry is stale.
            if done.outcome == StoreOutcome::Written {
                self.queue_store(StoreOp::Remove { key: done.key });
            }
            return;
        };
        match &done.outcome {
            StoreOutcome::Written => {
                h.stored = Stored::Written;
                self.counters.xenstore_writes += 1;
                self.counters.handed_over_xenstore += 1;
                self.emit(Event::Handover {
                    name: done.vm.clone(),
                    count: 1,
                    via: HandoverVia::Xenstore,
                });
            }
            StoreOutcome::Managed => {
                h.stored = Stored::Refused;
                self.counters.xenstore_skipped_managed += 1;
            }
            StoreOutcome::Failed(why) => {
                h.stored = Stored::Refused;
                self.counters.xenstore_errors += 1;
                tracing::warn!(vm = %done.vm, error = %why, "xenstore write failed; the SYN will go on the wire");
            }
        }
        let phase = self.vms[&done.vm].phase;
        if phase == VmPhase::Handover {
            // The guest announced while the write ran: drop what it now has, send the rest.
            self.go_up(now, &done.vm, false);
        }
    }

    /// A forwarding-table change finished (successfully or not: either way it is over).
    pub fn on_fdb_done(&mut self, now: Instant, id: u64) {
        let name = self
            .vms
            .iter()
            .find(|(_, v)| v.release_pending == Some(id))
            .map(|(n, _)| n.clone());
        if let Some(name) = name {
            self.vms.get_mut(&name).expect("found").release_pending = None;
            self.progress(now, &name);
        }
    }

    /// Runs what is due at `now`: gratuitous ARPs, hold timeouts, probes.
    pub fn handle_timeout(&mut self, now: Instant) {
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            let vm = self.vms.get_mut(&name).expect("listed");
            if let Some(at) = vm.garp_at
                && at <= now
            {
                vm.garp_left = vm.garp_left.saturating_sub(1);
                vm.garp_at = (vm.garp_left > 0).then(|| now + self.cfg.garp_interval);
                let (mac, v4, v6) = (vm.id.mac, vm.id.ipv4, vm.id.ipv6);
                self.send(Tx::Garp { mac, ip: v4 });
                self.counters.garp_sent += 1;
                if let Some(ip) = v6 {
                    self.send(Tx::Na {
                        mac,
                        ip,
                        to: NaTo::AllNodes,
                    });
                    self.counters.na_unsolicited += 1;
                }
            }
            loop {
                let vm = self.vms.get_mut(&name).expect("listed");
                let expired = vm
                    .held
                    .front()
                    .is_some_and(|h| h.since + self.cfg.hold_timeout <= now);
                if !expired {
                    break;
                }
                let h = vm.take_held_at(0).expect("checked");
                self.reset_one(&name, h, DropReason::HoldTimeout);
            }
            self.send_due_probes(now, &name);
            self.finish_handover(&name);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wire::tests::{NS, SYN_V4, SYN_V4_PARTIAL, SYN_V6, WHO_HAS};

    pub(crate) fn vm_mac() -> Mac {
        "02:77:00:00:01:10".parse().unwrap()
    }

    pub(crate) fn own_mac() -> Mac {
        "02:53:59:4a:00:01".parse().unwrap()
    }

    pub(crate) fn www(handover: Handover) -> VmIdentity {
        VmIdentity {
            name: "www".into(),
            mac: vm_mac(),
            ipv4: "10.77.1.10".parse().unwrap(),
            ipv6: Some("fd77:1::10".parse().unwrap()),
            handover,
        }
    }

    pub(crate) fn core() -> Hold {
        let mut cfg = Config::new(own_mac());
        cfg.probe_v4 = Some("10.77.1.250".parse().unwrap());
        cfg.probe_v6 = Some("fd77:1::fa".parse().unwrap());
        cfg.xenstore_off = None;
        Hold::new(cfg)
    }

    pub(crate) fn booting(h: &mut Hold, now: Instant, handover: Handover) {
        h.on_control(now, &ClientMessage::Booting { vm: www(handover) })
            .unwrap();
    }

    pub(crate) fn drain_tx(h: &mut Hold) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while h.poll_transmit(&mut buf) {
            out.push(std::mem::take(&mut buf));
        }
        out
    }

    fn drain_events(h: &mut Hold) -> Vec<Event> {
        std::iter::from_fn(|| h.poll_event()).collect()
    }

    fn fdb_ops(h: &mut Hold) -> Vec<FdbOp> {
        std::iter::from_fn(|| h.poll_fdb()).collect()
    }

    fn parsed(f: &[u8]) -> wire::Frame<'_> {
        wire::parse(f, false).unwrap()
    }

    /// The guest's own gratuitous ARP (request form, as `arping -U` sends it).
    fn guest_garp() -> Vec<u8> {
        let mut f = vec![0u8; 42];
        wire::write_eth(&mut f, Mac::BROADCAST, vm_mac(), wire::ETHERTYPE_ARP);
        wire::write_arp(
            &mut f,
            &ArpRepr {
                op: ArpOp::Request,
                sender_mac: vm_mac(),
                sender_ip: "10.77.1.10".parse().unwrap(),
                target_mac: Mac::BROADCAST,
                target_ip: "10.77.1.10".parse().unwrap(),
            },
        );
        f
    }

    /// The guest's answer to a probe: a SYN-ACK (or RST) from the guest's port to the probe's.
    fn probe_answer(probe: &[u8], flags: u8) -> Vec<u8> {
        let Packet::Tcp(p) = parsed(probe).packet else {
            panic!("not a probe")
        };
        let mut out = vec![0u8; wire::TCP_OUT_MAX];
        let n = wire::write_tcp(
            &mut out,
            &TcpOut {
                eth_src: vm_mac(),
                eth_dst: own_mac(),
                src_ip: p.dst_ip,
                dst_ip: p.src_ip,
                src_port: p.dst_port,
                dst_port: p.src_port,
                seq: 77,
                ack: p.seq.wrapping_add(1),
                flags,
                window: 0,
                options: &[],
            },
        );
        out.truncate(n);
        out
    }

    #[test]
    fn drop_reason_index_is_its_position_in_all() {
        for (i, r) in DropReason::all().enumerate() {
            assert_eq!(r.index(), i, "{}", r.as_str());
        }
    }

    #[test]
    fn booting_sends_gratuitous_arp_and_na_three_times_over_200ms() {
        let mut h = core();
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        let ops = fdb_ops(&mut h);
        assert_eq!(ops.len(), 1);
        assert_eq!((ops[0].mac, ops[0].action), (vm_mac(), FdbAction::Steer));
        let mut sent = drain_tx(&mut h);
        let mut now = t0;
        while let Some(at) = h.poll_at() {
            assert!(at >= now);
            now = at;
            h.handle_timeout(now);
            sent.extend(drain_tx(&mut h));
        }
        assert!(now - t0 <= Duration::from_millis(200), "{:?}", now - t0);
        let garps: Vec<_> = sent.iter().filter(|f| f.len() == 60).collect();
        let nas: Vec<_> = sent.iter().filter(|f| f.len() == 86).collect();
        assert_eq!((garps.len(), nas.len()), (3, 3), "{sent:02x?}");
        for g in garps {
            let f = parsed(g);
            assert_eq!((f.eth.dst, f.eth.src), (Mac::BROADCAST, vm_mac()));
            let Packet::Arp(a) = f.packet else { panic!() };
            assert_eq!((a.op, a.sender_mac), (ArpOp::Reply, vm_mac()));
        }
        for n in nas {
            let Packet::Ndp(na) = parsed(n).packet else {
                panic!()
            };
            assert!(matches!(
                na.kind,
                NdpKind::Advertisement {
                    override_: true,
                    solicited: false,
                    ..
                }
            ));
        }
        assert_eq!(h.counters().garp_sent, 3);
    }

    #[test]
    fn arp_and_ns_for_the_vm_are_answered_with_its_mac() {
        let mut h = core();
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        drain_tx(&mut h);
        assert_eq!(
            h.on_frame(t0, &WHO_HAS, FrameMeta::default()),
            Verdict::Answered
        );
        assert_eq!(h.on_frame(t0, &NS, FrameMeta::default()), Verdict::Answered);
        let sent = drain_tx(&mut h);
        assert_eq!(sent.len(), 2);
        let Packet::Arp(a) = parsed(&sent[0]).packet else {
            panic!()
        };
        assert_eq!((a.op, a.sender_mac), (ArpOp::Reply, vm_mac()));
        assert_eq!(a.target_ip, "10.77.1.2".parse::<Ipv4Addr>().unwrap());
        let f = parsed(&sent[1]);
        assert_eq!(f.eth.dst.to_string(), "02:77:00:00:01:02");
        let Packet::Ndp(na) = f.packet else { panic!() };
        assert_eq!(na.lladdr, Some(vm_mac()));
        assert!(matches!(
            na.kind,
            NdpKind::Advertisement {
                solicited: true,
                ..
            }
        ));
        // Unknown addresses, DAD and the guest's own questions are not answered.
        let mut dad = NS;
        dad[22..38].fill(0);
        assert_eq!(
            h.on_frame(
                t0,
                &dad,
                FrameMeta {
                    checksum: Checksum::Valid
                }
            ),
            Verdict::Pass
        );
        let mut other = WHO_HAS;
        other[41] = 11;
        assert_eq!(h.on_frame(t0, &other, FrameMeta::default()), Verdict::Pass);
        assert!(drain_tx(&mut h).is_empty());
    }

    #[test]
    fn the_probe_addresses_are_answered_with_synjitsus_own_mac() {
        let mut h = core();
        let t0 = Instant::now();
        let mut who = WHO_HAS;
        who[41] = 250;
        assert_eq!(
            h.on_frame(t0, &who, FrameMeta::default()),
            Verdict::Answered
        );
        let sent = drain_tx(&mut h);
        let Packet::Arp(a) = parsed(&sent[0]).packet else {
            panic!()
        };
        assert_eq!(a.sender_mac, own_mac());
    }

    #[test]
    fn a_syn_is_held_once_and_its_retransmits_are_deduplicated() {
        let mut h = core();
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        drain_events(&mut h);
        assert_eq!(h.on_frame(t0, &SYN_V4, FrameMeta::default()), Verdict::Held);
        for i in 1..4 {
            let t = t0 + Duration::from_secs(i);
            assert_eq!(
                h.on_frame(t, &SYN_V4, FrameMeta::default()),
                Verdict::Duplicate
            );
        }
        assert_eq!(h.held_now(), 1);
        assert_eq!(h.counters().retransmit_dedup, 3);
        assert_eq!(
            drain_events(&mut h),
            vec![Event::SynHeld {
                name: "www".into(),
                held: 1
            }]
        );
        // A new attempt on the same 4-tuple (another ISN) is another SYN.
        let mut again = SYN_V4;
        again[41] ^= 1;
        assert!(wire::fix_tcp_checksum(&mut again));
        assert_eq!(h.on_frame(t0, &again, FrameMeta::default()), Verdict::Held);
        assert_eq!(h.held_now(), 2);
    }

    #[test]
    fn checksums_partial_are_completed_bad_are_dropped() {
        let mut h = core();
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        // Unknown status: the partial checksum looks bad, and is.
        assert_eq!(
            h.on_frame(t0, &SYN_V4_PARTIAL, FrameMeta::default()),
            Verdict::Drop(DropReason::BadChecksum)
        );
        assert_eq!(h.counters().drops_for(DropReason::BadChecksum), 1);
        let partial = FrameMeta {
            checksum: Checksum::Partial,
        };
        assert_eq!(h.on_frame(t0, &SYN_V4_PARTIAL, partial), Verdict::Held);
        assert_eq!(h.counters().checksums_completed, 1);
        // Hand it over and look at what goes to the guest.
        h.on_control(t0, &ClientMessage::Ready { name: "www".into() })
            .unwrap();
        let op = fdb_ops(&mut h).pop().unwrap();
        assert_eq!(op.action, FdbAction::Release);
        drain_tx(&mut h);
        h.on_fdb_done(t0, op.id);
        let sent = drain_tx(&mut h);
        assert_eq!(sent.len(), 1);
        assert_eq!(&sent[0][50..52], &0x4c76u16.to_be_bytes());
        assert_eq!(&sent[0][..50], &SYN_V4_PARTIAL[..50]);
        assert_eq!(&sent[0][52..], &SYN_V4_PARTIAL[52..]);
    }

    #[test]
    fn bounds_per_vm_and_in_total_are_enforced() {
        let mut cfg = Config::new(own_mac());
        cfg.max_held_per_vm = 2;
        cfg.max_held = 3;
        let mut h = Hold::new(cfg);
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        let mut other = www(Handover::Wire);
        other.name = "db".into();
        other.mac = "02:77:00:00:01:11".parse().unwrap();
        other.ipv4 = "10.77.1.11".parse().unwrap();
        other.ipv6 = None;
        h.on_control(t0, &ClientMessage::Booting { vm: other })
            .unwrap();
        let syn = |port: u16, ip_last: u8, mac_last: u8| {
            let mut f = SYN_V4;
            f[5] = mac_last;
            f[33] = ip_last;
            f[34..36].copy_from_slice(&port.to_be_bytes());
            // Fix both checksums after the edits.
            f[24] = 0;
            f[25] = 0;
            let c = !wire::fold(wire::sum_words(&f[14..34], 0));
            f[24..26].copy_from_slice(&c.to_be_bytes());
            assert!(wire::fix_tcp_checksum(&mut f));
            f
        };
        let m = FrameMeta::default();
        assert_eq!(h.on_frame(t0, &syn(1, 10, 0x10), m), Verdict::Held);
        assert_eq!(h.on_frame(t0, &syn(2, 10, 0x10), m), Verdict::Held);
        assert_eq!(
            h.on_frame(t0, &syn(3, 10, 0x10), m),
            Verdict::Drop(DropReason::VmFull)
        );
        assert_eq!(h.on_frame(t0, &syn(4, 11, 0x11), m), Verdict::Held);
        assert_eq!(
            h.on_frame(t0, &syn(5, 11, 0x11), m),
            Verdict::Drop(DropReason::TableFull)
        );
        assert_eq!(h.held_now(), 3);
    }

    #[test]
    fn under_a_flood_a_retransmitting_client_displaces_a_spoofed_syn() {
        let mut cfg = Config::new(own_mac());
        cfg.max_held_per_vm = 4;
        cfg.garp_count = 0;
        let mut h = Hold::new(cfg);
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        let syn = |src_last: u8, port: u16| {
            let mut f = SYN_V4;
            f[29] = src_last;
            f[34..36].copy_from_slice(&port.to_be_bytes());
            f[24] = 0;
            f[25] = 0;
            let c = !wire::fold(wire::sum_words(&f[14..34], 0));
            f[24..26].copy_from_slice(&c.to_be_bytes());
            assert!(wire::fix_tcp_checksum(&mut f));
            f
        };
        let m = FrameMeta::default();
        // A real client's SYN held early, and retransmitted once: it is protected.
        let early = syn(2, 1000);
        assert_eq!(h.on_frame(t0, &early, m), Verdict::Held);
        assert_eq!(h.on_frame(t0, &early, m), Verdict::Duplicate);
        // The flood fills the table.
        for p in 1..=3 {
            assert_eq!(h.on_frame(t0, &syn(200, p), m), Verdict::Held);
        }
        let client = syn(3, 2000);
        assert_eq!(
            h.on_frame(t0, &client, m),
            Verdict::Drop(DropReason::VmFull)
        );
        for p in 4..100 {
            assert_eq!(
                h.on_frame(t0, &syn(200, p), m),
                Verdict::Drop(DropReason::VmFull)
            );
        }
        // One second later the client retransmits: it takes a spoofed SYN's place.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(h.on_frame(t1, &client, m), Verdict::Held);
        assert_eq!(h.counters().drops_for(DropReason::Evicted), 1);
        assert_eq!(h.held_now(), 4);
        // Flood SYNs never retransmitted stay refused even when repeated with new ISNs.
        assert_eq!(
            h.on_frame(t1, &syn(200, 500), m),
            Verdict::Drop(DropReason::VmFull)
        );
        // Nothing was sent for the evicted one (its source is likely spoofed).
        drain_tx(&mut h);
        // Both real clients are handed over.
        h.on_control(t1, &ClientMessage::Ready { name: "www".into() })
            .unwrap();
        while let Some(op) = h.poll_fdb() {
            h.on_fdb_done(t1, op.id);
        }
        let sent = drain_tx(&mut h);
        assert!(sent.contains(&early.to_vec()) && sent.contains(&client.to_vec()));
        assert_eq!(sent.len(), 4);
    }

    #[test]
    fn held_syns_time_out_with_a_rst_to_the_client() {
        let mut h = core();
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        h.on_frame(t0, &SYN_V6, FrameMeta::default());
        let mut now = t0;
        let mut sent = Vec::new();
        while let Some(at) = h.poll_at() {
            now = at;
            h.handle_timeout(now);
            sent.extend(drain_tx(&mut h));
        }
        assert_eq!(now - t0, Duration::from_secs(10));
        let rst = sent.last().unwrap();
        let f = parsed(rst);
        assert_eq!(
            (f.eth.src, f.eth.dst.to_string().as_str()),
            (vm_mac(), "02:77:00:00:01:02")
        );
        let Packet::Tcp(t) = f.packet else { panic!() };
        assert_eq!(t.flags, wire::tcp_flags::RST | wire::tcp_flags::ACK);
        assert_eq!(t.ack, 3_916_296_312u32.wrapping_add(1));
        assert_eq!((t.src_port, t.dst_port), (80, 39004));
        assert_eq!(h.held_now(), 0);
        assert_eq!(h.counters().drops_for(DropReason::HoldTimeout), 1);
        assert_eq!(h.counters().rst_hold_timeout, 1);
    }

    #[test]
    fn announce_then_probe_then_resend_on_syn_ack() {
        let mut h = core();
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        h.on_frame(t0, &SYN_V4, FrameMeta::default());
        h.on_frame(t0, &SYN_V6, FrameMeta::default());
        drain_tx(&mut h);
        fdb_ops(&mut h);
        drain_events(&mut h);
        let t1 = t0 + Duration::from_millis(300);
        assert_eq!(
            h.on_frame(t1, &guest_garp(), FrameMeta::default()),
            Verdict::Announced
        );
        assert_eq!(
            drain_events(&mut h),
            vec![Event::GuestAnnounced { name: "www".into() }]
        );
        // No more answering for it.
        assert_eq!(
            h.on_frame(t1, &WHO_HAS, FrameMeta::default()),
            Verdict::Pass
        );
        let rel = fdb_ops(&mut h);
        assert_eq!(rel[0].action, FdbAction::Release);
        assert!(
            drain_tx(&mut h).is_empty(),
            "nothing before the release is done"
        );
        h.on_fdb_done(t1, rel[0].id);
        let probes = drain_tx(&mut h);
        assert_eq!(probes.len(), 2, "one probe per family and port");
        for p in &probes {
            let f = parsed(p);
            assert_eq!((f.eth.src, f.eth.dst), (own_mac(), vm_mac()));
            let Packet::Tcp(t) = f.packet else { panic!() };
            assert!(t.is_syn() && wire::tcp_checksum_ok(p, &t));
            assert!(h.is_probe_ip(t.src_ip));
            assert_eq!(t.dst_port, 80);
        }
        // Not listening yet: RSTs, then a probe again 5 ms later.
        let v4_probe = probes.iter().find(|p| p[12] == 0x08).unwrap().clone();
        let rst = probe_answer(&v4_probe, wire::tcp_flags::RST | wire::tcp_flags::ACK);
        assert_eq!(
            h.on_frame(t1, &rst, FrameMeta::default()),
            Verdict::ProbeAnswer
        );
        assert_eq!(h.poll_at(), Some(t1 + Duration::from_millis(5)));
        h.handle_timeout(t1 + Duration::from_millis(5));
        assert_eq!(drain_tx(&mut h).len(), 2);
        // Listening on IPv4: reset the probe, re-send the IPv4 SYN unchanged.
        let t2 = t1 + Duration::from_millis(7);
        let synack = probe_answer(&v4_probe, wire::tcp_flags::SYN | wire::tcp_flags::ACK);
        assert_eq!(
            h.on_frame(t2, &synack, FrameMeta::default()),
            Verdict::ProbeAnswer
        );
        let sent = drain_tx(&mut h);
        assert_eq!(sent.len(), 2);
        let Packet::Tcp(r) = parsed(&sent[0]).packet else {
            panic!()
        };
        assert_eq!(r.flags, wire::tcp_flags::RST);
        assert_eq!(sent[1], SYN_V4.to_vec());
        assert_eq!(
            drain_events(&mut h),
            vec![Event::Handover {
                name: "www".into(),
                count: 1,
                via: HandoverVia::Wire
            }]
        );
        assert_eq!(h.held_now(), 1);
        assert_eq!(h.vms().next().unwrap().1, VmPhase::Handover);
        // Ready: the rest goes at once, without probing.
        h.on_control(t2, &ClientMessage::Ready { name: "www".into() })
            .unwrap();
        let sent = drain_tx(&mut h);
        assert_eq!(sent, vec![SYN_V6.to_vec()]);
        assert_eq!(h.vms().next().unwrap().1, VmPhase::Running);
        assert_eq!(h.poll_at(), None);
        assert_eq!(h.counters().handed_over_wire, 2);
    }

    #[test]
    fn without_probe_addresses_the_wire_waits_for_ready() {
        let mut cfg = Config::new(own_mac());
        cfg.garp_count = 0;
        let mut h = Hold::new(cfg);
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        h.on_frame(t0, &SYN_V4, FrameMeta::default());
        h.on_frame(t0, &guest_garp(), FrameMeta::default());
        let rel = fdb_ops(&mut h).pop().unwrap();
        h.on_fdb_done(t0, rel.id);
        assert!(drain_tx(&mut h).is_empty());
        h.on_control(t0, &ClientMessage::Ready { name: "www".into() })
            .unwrap();
        assert_eq!(drain_tx(&mut h), vec![SYN_V4.to_vec()]);
    }

    #[test]
    fn stopped_vms_hold_and_ask_to_be_woken_once_a_second() {
        let mut h = core();
        let t0 = Instant::now();
        h.on_control(
            t0,
            &ClientMessage::Stopped {
                vm: www(Handover::Wire),
            },
        )
        .unwrap();
        assert_eq!(fdb_ops(&mut h)[0].action, FdbAction::Steer);
        assert!(
            drain_tx(&mut h).is_empty(),
            "no gratuitous ARP for a stopped VM"
        );
        assert_eq!(h.on_frame(t0, &SYN_V4, FrameMeta::default()), Verdict::Held);
        assert_eq!(
            h.on_frame(t0, &WHO_HAS, FrameMeta::default()),
            Verdict::Answered
        );
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(
            h.on_frame(t1, &SYN_V4, FrameMeta::default()),
            Verdict::Duplicate
        );
        let wakes = drain_events(&mut h)
            .into_iter()
            .filter(|e| matches!(e, Event::WakeRequest { .. }))
            .count();
        assert_eq!(wakes, 2);
        // Booting keeps what is held.
        booting(&mut h, t1, Handover::Wire);
        assert_eq!(h.held_now(), 1);
        assert_eq!(h.vms().next().unwrap().1, VmPhase::Booting);
    }

    #[test]
    fn sync_forgets_absent_vms_with_rsts_and_keeps_present_ones() {
        let mut h = core();
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        h.on_frame(t0, &SYN_V4, FrameMeta::default());
        drain_tx(&mut h);
        let present = vec![VmStatus {
            vm: www(Handover::Wire),
            phase: Phase::Booting,
        }];
        h.on_control(t0, &ClientMessage::Sync { vms: present })
            .unwrap();
        assert_eq!(h.held_now(), 1, "a VM present keeps what it holds");
        assert!(drain_tx(&mut h).is_empty(), "and is not a new boot");
        h.on_control(t0, &ClientMessage::Sync { vms: vec![] })
            .unwrap();
        assert_eq!(h.held_now(), 0);
        assert_eq!(h.counters().rst_vm_forgotten, 1);
        let sent = drain_tx(&mut h);
        let Packet::Tcp(t) = parsed(&sent[0]).packet else {
            panic!()
        };
        assert_eq!(t.flags & wire::tcp_flags::RST, wire::tcp_flags::RST);
        assert!(
            fdb_ops(&mut h)
                .iter()
                .any(|o| o.action == FdbAction::Release)
        );
        assert_eq!(h.vms().count(), 0);
        assert_eq!(
            h.on_control(t0, &ClientMessage::Ready { name: "www".into() })
                .unwrap_err()
                .code,
            ErrorCode::UnknownVm
        );
    }

    #[test]
    fn xenstore_vms_write_each_syn_once_and_stop_when_managed() {
        let mut h = core();
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Xenstore { domid: 7 });
        let reset = h.poll_store().unwrap();
        assert!(matches!(reset, StoreOp::Reset { ref ips, .. } if ips.len() == 2));
        h.on_frame(t0, &SYN_V4, FrameMeta::default());
        h.on_frame(t0, &SYN_V4, FrameMeta::default());
        let Some(StoreOp::Write {
            id,
            domid,
            key,
            syn,
            ..
        }) = h.poll_store()
        else {
            panic!("no write")
        };
        assert!(
            h.poll_store().is_none(),
            "a retransmit is not written twice"
        );
        assert_eq!(domid, 7);
        assert_eq!(key.conn_path(), "/ip/10-77-1-10/80/10-77-1-2/40436");
        assert_eq!((syn.tx_wnd, syn.sequence), (64240, 1_727_484_408));
        assert!(syn.tx_isn >= crate::store::layout::TX_ISN_BASE);
        drain_events(&mut h);
        h.on_store_done(
            t0,
            StoreDone {
                id,
                vm: "www".into(),
                key,
                outcome: StoreOutcome::Written,
            },
        );
        assert_eq!(
            drain_events(&mut h),
            vec![Event::Handover {
                name: "www".into(),
                count: 1,
                via: HandoverVia::Xenstore
            }]
        );
        // A second SYN finds the address managed: it goes on the wire once the guest is up.
        h.on_frame(t0, &SYN_V6, FrameMeta::default());
        let Some(StoreOp::Write { id, key, .. }) = h.poll_store() else {
            panic!()
        };
        h.on_store_done(
            t0,
            StoreDone {
                id,
                vm: "www".into(),
                key,
                outcome: StoreOutcome::Managed,
            },
        );
        assert_eq!(h.counters().xenstore_skipped_managed, 1);
        drain_tx(&mut h);
        h.on_frame(t0, &guest_garp(), FrameMeta::default());
        assert_eq!(h.held_now(), 1, "the written one is the guest's now");
        let rel = fdb_ops(&mut h).pop().unwrap();
        h.on_fdb_done(t0, rel.id);
        let probes = drain_tx(&mut h);
        assert_eq!(probes.len(), 1, "the managed one is probed for on the wire");
        let Packet::Tcp(t) = parsed(&probes[0]).packet else {
            panic!()
        };
        assert!(t.dst_ip.is_ipv6() && t.dst_port == 80 && t.is_syn());
    }

    #[test]
    fn sync_running_hands_over_at_once_and_sync_stopped_asks_again_for_a_wake_up() {
        let mut h = core();
        let t0 = Instant::now();
        h.on_control(
            t0,
            &ClientMessage::Stopped {
                vm: www(Handover::Wire),
            },
        )
        .unwrap();
        h.on_frame(t0, &SYN_V4, FrameMeta::default());
        drain_events(&mut h);
        // A reconnect within the wake interval: the wake request may have been lost with the
        // old connection, so it is sent again.
        let t1 = t0 + Duration::from_millis(10);
        let stopped = vec![VmStatus {
            vm: www(Handover::Wire),
            phase: Phase::Stopped,
        }];
        h.on_control(t1, &ClientMessage::Sync { vms: stopped })
            .unwrap();
        assert_eq!(
            drain_events(&mut h),
            vec![Event::WakeRequest { name: "www".into() }]
        );
        // jitsu-dns says it runs (it started it meanwhile): hand over without probing.
        let running = vec![VmStatus {
            vm: www(Handover::Wire),
            phase: Phase::Running,
        }];
        h.on_control(t1, &ClientMessage::Sync { vms: running })
            .unwrap();
        drain_tx(&mut h);
        let ops = fdb_ops(&mut h);
        let rel = ops
            .iter()
            .find(|o| o.action == FdbAction::Release)
            .expect("released");
        h.on_fdb_done(t1, rel.id);
        assert_eq!(drain_tx(&mut h), vec![SYN_V4.to_vec()]);
        assert_eq!(h.counters().probes_sent, 0);
        assert_eq!(h.vms().next().unwrap().1, VmPhase::Running);
        // Running: nothing is intercepted any more.
        assert_eq!(
            h.on_frame(t1, &WHO_HAS, FrameMeta::default()),
            Verdict::Pass
        );
        assert_eq!(h.on_frame(t1, &SYN_V6, FrameMeta::default()), Verdict::Pass);
    }

    #[test]
    fn a_sync_saying_booting_does_not_hijack_a_guest_that_announced_itself() {
        let mut h = core();
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        h.on_frame(t0, &guest_garp(), FrameMeta::default());
        while let Some(op) = h.poll_fdb() {
            h.on_fdb_done(t0, op.id);
        }
        drain_events(&mut h);
        drain_tx(&mut h);
        let vms = vec![VmStatus {
            vm: www(Handover::Wire),
            phase: Phase::Booting,
        }];
        h.on_control(t0, &ClientMessage::Sync { vms }).unwrap();
        assert_eq!(
            drain_events(&mut h),
            vec![Event::GuestAnnounced { name: "www".into() }]
        );
        assert!(fdb_ops(&mut h).is_empty(), "not steered back");
        assert!(drain_tx(&mut h).is_empty(), "no gratuitous ARP");
        assert_eq!(h.on_frame(t0, &SYN_V4, FrameMeta::default()), Verdict::Pass);
        // A Booting request itself is a new boot (the VM was restarted): stand in again.
        booting(&mut h, t0, Handover::Wire);
        assert_eq!(fdb_ops(&mut h)[0].action, FdbAction::Steer);
        assert_eq!(h.on_frame(t0, &SYN_V4, FrameMeta::default()), Verdict::Held);
    }

    #[test]
    fn xenstore_booting_is_refused_when_xenstore_is_off() {
        let mut h = Hold::new(Config::new(own_mac()));
        let err = h
            .on_control(
                Instant::now(),
                &ClientMessage::Booting {
                    vm: www(Handover::Xenstore { domid: 3 }),
                },
            )
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Failed);
        assert!(err.message.contains("xenstore"), "{}", err.message);
        assert_eq!(h.vms().count(), 0);
    }

    #[test]
    fn a_second_vm_cannot_take_a_first_ones_address() {
        let mut h = core();
        let t0 = Instant::now();
        booting(&mut h, t0, Handover::Wire);
        let mut thief = www(Handover::Wire);
        thief.name = "thief".into();
        thief.mac = "02:77:00:00:01:99".parse().unwrap();
        thief.ipv6 = None;
        let err = h
            .on_control(t0, &ClientMessage::Booting { vm: thief })
            .unwrap_err();
        assert!(
            err.message.contains("already belongs to VM www"),
            "{}",
            err.message
        );
    }
}
