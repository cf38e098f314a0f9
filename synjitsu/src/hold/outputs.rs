//! What the core hands the shell, kept apart from the VMs so a handler can hold one VM and
//! these at once: the bounded queues of frames to send, events for jitsu-dns and Xenstore
//! work; the forwarding-table wishes (the last one per MAC, never dropped); the [`Counters`];
//! and what every handler may move on (the number of SYNs held in all, ids, the generator of
//! ports and ISNs).
//!
//! Owns the bounds (`MAX_*`: what does not fit is counted, never queued) and building a frame
//! from what was queued, when the shell asks for it ([`crate::garp`], [`crate::wire`]). It
//! decides nothing and knows no VM ([`super::vm`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use shared_proto::{Event, Mac};

use super::{DropReason, Verdict};
use crate::garp::{self, NaTo};
use crate::store::layout::{HeldSyn, SynKey};
use crate::wire::{self, ArpRepr, TcpOut};

/// Frames queued for sending at most; beyond, new ones are dropped and counted.
pub const MAX_TRANSMIT: usize = 4096;
/// Events queued for jitsu-dns at most.
pub const MAX_EVENTS: usize = 1024;
/// Xenstore operations queued at most.
pub const MAX_STORE_OPS: usize = 8192;
/// Frames queued for guests' own ports at most.
pub const MAX_TO_GUEST: usize = 1024;

/// Work for the Xenstore writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// A new boot: `/ip/<ip>` for each address emptied (stale SYNs and a stale `managed`
    /// gone) and made the new domain's, so its guest can mark it `managed` at once.
    Open {
        /// The VM.
        vm: String,
        /// The guest's domain.
        domid: u32,
        /// Its addresses.
        ips: Vec<IpAddr>,
    },
    /// The VM stopped: `/ip/<ip>` for each address emptied and closed to every domain but
    /// dom0 until its next boot opens it for that boot's domain.
    Seal {
        /// The VM.
        vm: String,
        /// Its addresses.
        ips: Vec<IpAddr>,
    },
    /// The VM is no longer declared: `/ip/<ip>` removed for each address.
    Close {
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

/// A change of what the forwarding table should say about one MAC, for the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbOp {
    /// Identifies it in [`super::Hold::on_fdb_done`].
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
    pub frames: [u64; Verdict::LABELS.len()],
    /// Frames the announcement watcher saw (gratuitous ARPs and unsolicited NAs, any port).
    pub ingress_frames: u64,
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
    /// Batches of held SYNs re-sent to guests (see [`super::pace`]).
    pub resend_batches: u64,
    /// Probes sent behind a batch, to learn when the guest has taken it (counted in
    /// `probes_sent` too).
    pub pace_probes: u64,
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
    /// Frames for guests not queued because [`MAX_TO_GUEST`] were waiting.
    pub to_guest_overflow: u64,
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

    /// Counts one drop for `reason`.
    pub(super) fn count_drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }
}

/// Something to send, built when it is sent.
#[derive(Debug)]
pub(super) enum Tx {
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
    /// A held SYN re-sent to its guest, and what it was charged ([`super::held_cost`]).
    Resend {
        frame: Vec<u8>,
        cost: usize,
    },
}

/// The outputs. See the module documentation.
#[derive(Debug)]
pub(super) struct Outputs {
    pub(super) transmit: VecDeque<Tx>,
    pub(super) events: VecDeque<Event>,
    pub(super) store: VecDeque<StoreOp>,
    /// The latest wish per MAC not yet taken by the shell: at most one per MAC, so however
    /// many VMs change at once nothing is dropped, and a steer then a release of one MAC in
    /// between is the release alone.
    pub(super) fdb: BTreeMap<Mac, FdbOp>,
    /// Frames for a guest, with the port they go out of.
    pub(super) to_guest: VecDeque<(String, Vec<u8>)>,
    pub(super) counters: Counters,
    /// SYNs held by every VM together.
    pub(super) total_held: usize,
    /// Their costs ([`super::held_cost`]) added up.
    pub(super) held_bytes: usize,
    /// The costs of held SYNs taken for re-sending and still queued ([`Tx::Resend`]): with
    /// `held_bytes`, bounded by [`super::Config::held_bytes`].
    pub(super) resend_bytes: usize,
    /// The VMs holding at least one SYN, by name: where the total budget evicts from.
    pub(super) holding: BTreeSet<String>,
    /// Bumped whenever the guests whose frames go through their port may have changed.
    pub(super) guests_generation: u64,
    next_id: u64,
    rng: u64,
}

impl Outputs {
    /// Empty queues, zero counters, the generator seeded with `seed`.
    pub(super) fn new(seed: u64) -> Outputs {
        Outputs {
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            store: VecDeque::new(),
            fdb: BTreeMap::new(),
            to_guest: VecDeque::new(),
            counters: Counters {
                drops: vec![0; DropReason::all().count()],
                ..Counters::default()
            },
            total_held: 0,
            held_bytes: 0,
            resend_bytes: 0,
            holding: BTreeSet::new(),
            guests_generation: 0,
            next_id: 1,
            rng: seed | 1,
        }
    }

    /// The next number of the generator.
    pub(super) fn rand(&mut self) -> u64 {
        // xorshift64*: enough for ISNs and ports nobody needs to be unguessable.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A new id for a held SYN or a forwarding-table change.
    pub(super) fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Queues a frame, unless [`MAX_TRANSMIT`] wait already.
    pub(super) fn send(&mut self, tx: Tx) {
        if self.transmit.len() >= MAX_TRANSMIT {
            self.counters.transmit_overflow += 1;
            return;
        }
        self.transmit.push_back(tx);
    }

    /// Queues a held SYN for re-sending, past [`MAX_TRANSMIT`]: its memory is charged to the
    /// byte budget until it is sent, and a hand-over larger than the queue loses nothing.
    pub(super) fn resend(&mut self, frame: Vec<u8>, cost: usize) {
        self.resend_bytes += cost;
        self.transmit.push_back(Tx::Resend { frame, cost });
    }

    /// Queues a held SYN to go straight out of its guest's port `port`, past
    /// [`MAX_TO_GUEST`] (at most a batch per VM a step, and the shell sends every frame of
    /// this queue each turn): its memory was uncharged when it left the table.
    pub(super) fn resend_to_guest(&mut self, port: &str, frame: Vec<u8>) {
        self.to_guest.push_back((port.to_string(), frame));
    }

    /// Queues an event for jitsu-dns, unless [`MAX_EVENTS`] wait already.
    pub(super) fn emit(&mut self, ev: Event) {
        if self.events.len() >= MAX_EVENTS {
            self.counters.events_overflow += 1;
            return;
        }
        self.events.push_back(ev);
    }

    /// Queues Xenstore work; false if [`MAX_STORE_OPS`] wait already.
    pub(super) fn queue_store(&mut self, op: StoreOp) -> bool {
        if self.store.len() >= MAX_STORE_OPS {
            self.counters.store_overflow += 1;
            return false;
        }
        self.store.push_back(op);
        true
    }

    /// Queues `frame` to go out of the guest's port `port`; false if [`MAX_TO_GUEST`] wait
    /// already.
    pub(super) fn queue_to_guest(&mut self, port: &str, frame: Vec<u8>) -> bool {
        if self.to_guest.len() >= MAX_TO_GUEST {
            self.counters.to_guest_overflow += 1;
            return false;
        }
        self.to_guest.push_back((port.to_string(), frame));
        true
    }

    /// Wants `vm`'s entry for `mac` changed (replacing a wish for `mac` not yet taken); the
    /// change's id.
    pub(super) fn queue_fdb(&mut self, vm: &str, mac: Mac, action: FdbAction) -> u64 {
        let id = self.id();
        self.fdb.insert(
            mac,
            FdbOp {
                id,
                vm: vm.to_string(),
                mac,
                action,
            },
        );
        id
    }

    /// Builds the next queued frame into `out` (replacing its contents); false if none.
    pub(super) fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(tx) = self.transmit.pop_front() else {
            return false;
        };
        out.clear();
        match tx {
            Tx::Resend { mut frame, cost } => {
                self.resend_bytes -= cost;
                std::mem::swap(out, &mut frame);
            }
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
}
