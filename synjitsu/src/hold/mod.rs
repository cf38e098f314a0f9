//! The pure core of synjitsu: which guests it stands in for, what it holds for them, and what
//! to send, write and report next.
//!
//! It owns every decision and nothing else: no sockets, no clock (`now` is passed in), no
//! threads. The shell feeds it frames ([`Hold::on_frame`]), control requests
//! ([`Hold::on_control`]), results of the slow work it asked for ([`Hold::on_store_done`],
//! [`Hold::on_fdb_done`]) and timer expiries ([`Hold::handle_timeout`] at [`Hold::poll_at`]),
//! and drains what the core queued: frames ([`Hold::poll_transmit`]), frames for a guest's
//! own port ([`Hold::poll_to_guest`]), events for jitsu-dns ([`Hold::poll_event`]), Xenstore
//! work ([`Hold::poll_store`]) and forwarding-table changes ([`Hold::poll_fdb`]). A second
//! input, [`Hold::on_ingress`], takes announcements seen on any port with the port's name.
//!
//! Per VM, a phase:
//! - **booting**: stand in for the guest: send gratuitous ARP and an unsolicited NA for it a
//!   few times, answer ARP and neighbour solicitations with its MAC, hold its clients' SYNs
//!   (and, for a Xenstore hand-over, write each one as it is captured), and pass every other
//!   frame addressed to it on through its own port, if jitsu-dns named it, so that a guest
//!   that boots while steered gets its answers (its gateway's ARP reply, a ping's replies);
//! - **stopped**: known but off: answer and hold as above, and ask jitsu-dns to wake it (at
//!   most once per `wake_interval` while it stays stopped);
//! - **handover**: the guest announced itself or jitsu-dns said it answers (`Ready`, or
//!   `Running` in a `Sync`): stop answering for it, release its forwarding entry, and give it
//!   what is held: at once after `Ready` or after the announcement of a guest that promised
//!   to announce itself only once it listens (`announces_listening`), else once a probe from
//!   synjitsu's own address finds the port listening;
//! - **running**: nothing held, nothing intercepted.
//!
//! What ends the stand-in (`guest`, `neighbour`): the guest's own gratuitous ARP (broadcast,
//! sender and target address both its own, or a broadcast reply) or unsolicited neighbour
//! advertisement (solicited flag clear) for its address, from its MAC, and, when jitsu-dns
//! named the guest's bridge port, seen arriving on that port (any other port's is
//! `spoofed_announcement`); or jitsu-dns's `Ready`. Nothing else: an ARP request or a
//! solicited answer from the guest only shows that its kernel is up, not that it listens.
//!
//! Every queue is bounded (see [`Config`] and the `MAX_*` constants); what does not fit is
//! dropped and counted, never blocks and never grows without limit. Forwarding-table wishes
//! are not a queue but state: the last wish per MAC (at most one per MAC), never dropped,
//! since a lost release leaves a running guest unreachable. Malformed frames are a
//! [`Verdict::Drop`] with a reason, never an error or a panic.
//!
//! One file per concept, as smoltcp splits its interface by protocol; the state is split so
//! that a handler borrows one VM and the outputs at once (`&mut Vm`, `&mut Outputs`), never
//! looking a VM up again by name:
//! - this file: [`Hold`] (the VMs, the outputs, the configuration), the frame verdicts, and
//!   the entry points, which find the VM an input is about and hand it over;
//! - `vm`: one VM's state ([`VmPhase`], what it holds, its probes) and the table of VMs by
//!   name, address and MAC;
//! - `outputs`: the bounded queues the shell drains, the [`Counters`], ids and the generator;
//! - `neighbour`: ARP and neighbour discovery: answers, announcements, the guest's own;
//! - `syn`: holding a client SYN: checksum, deduplication, bounds, eviction, time-outs;
//! - `table`: one VM's held SYNs in the orders the policies read them (by age, real clients
//!   apart, counted by source prefix);
//! - `handover`: from the guest's announcement to its first SYN: forwarding-table release,
//!   Xenstore writes, probes;
//! - `pace`: re-sending held SYNs to the guest a batch at a time, as fast as it takes them;
//! - `guest`: the guest's own bridge port: announcements taken only from it, frames for the
//!   guest passed through it;
//! - `control`: what jitsu-dns asks (booting, stopped, ready, sync) and wake requests.

mod control;
mod guest;
mod handover;
mod neighbour;
mod outputs;
mod pace;
mod syn;
mod table;
mod vm;

#[cfg(test)]
mod flood_tests;
#[cfg(test)]
mod listening_tests;
#[cfg(test)]
pub(crate) mod tests;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use shared_io::RateLimited;
use shared_proto::Mac;

pub use self::control::ControlError;
use self::outputs::Outputs;
pub use self::outputs::{
    Counters, FdbAction, FdbOp, MAX_EVENTS, MAX_STORE_OPS, MAX_TO_GUEST, MAX_TRANSMIT, StoreDone,
    StoreOp, StoreOutcome,
};
use self::vm::Vms;
pub use self::vm::{VmPhase, held_cost};
use crate::refused::Refused;
use crate::wire::{self, Packet};

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
    /// Bytes the SYNs held for one VM may take (see [`held_cost`]); a SYN that does not fit
    /// evicts one of that VM's (see [`WhenFull`]).
    pub held_bytes_per_vm: usize,
    /// Bytes the SYNs held for every VM together (and the held SYNs queued for re-sending)
    /// may take; a SYN that does not fit evicts from the VM that holds the most.
    pub held_bytes: usize,
    /// What becomes of a SYN that does not fit.
    pub when_full: WhenFull,
    /// SYNs held per VM at most, besides the bytes (`None`: no count). The benchmark's
    /// baseline only: the count of 1,024 that a flood fills in milliseconds.
    pub max_held_per_vm: Option<usize>,
    /// SYNs held in total at most, besides the bytes (`None`: no count). Baseline only.
    pub max_held: Option<usize>,
    /// Why Xenstore hand-over is unavailable (`None`: it is available).
    pub xenstore_off: Option<String>,
    /// Gratuitous ARPs (and unsolicited NAs) sent per boot.
    pub garp_count: u32,
    /// Between two of them.
    pub garp_interval: Duration,
    /// Wake requests per stopped VM at most once per this.
    pub wake_interval: Duration,
    /// Between the first two probes of a port that is not listening yet; each later gap is
    /// twice the one before, up to `probe_interval`.
    pub probe_first_interval: Duration,
    /// Between two probes of a port that is not listening yet, at most.
    pub probe_interval: Duration,
    /// Held SYNs re-sent to a guest at once, at most; the next batch goes once the guest has
    /// answered a probe sent behind this one (see `pace`).
    pub resend_batch: usize,
    /// The wait for that answer before the next batch goes anyway (an answer lost), and
    /// between batches without a probe address.
    pub resend_wait: Duration,
    /// Seeds the generator of probe ports, probe ISNs and Xenstore `tx_isn`s.
    pub seed: u64,
    /// The shell watches every port for announcements ([`Hold::on_ingress`]): a guest whose
    /// port is named announces only from there. False: from any port, as if none were named.
    pub ports_watched: bool,
}

impl Config {
    /// The defaults: hold 10 s, 16 MiB of SYNs per VM (about 60,000 of them) and 64 MiB in
    /// total, the oldest evicted, 3 gratuitous ARPs 100 ms apart, a wake request per
    /// second, probes 0.25 ms apart at first, then twice as far apart each time up to every
    /// 5 ms, held SYNs re-sent 256 at a time, the next batch once the guest answered a probe
    /// behind the last or 1 ms later.
    pub fn new(own_mac: Mac) -> Config {
        Config {
            own_mac,
            probe_v4: None,
            probe_v6: None,
            hold_timeout: Duration::from_secs(10),
            held_bytes_per_vm: 16 << 20,
            held_bytes: 64 << 20,
            when_full: WhenFull::EvictOldest,
            max_held_per_vm: None,
            max_held: None,
            xenstore_off: Some("not configured".into()),
            garp_count: 3,
            garp_interval: Duration::from_millis(100),
            wake_interval: Duration::from_secs(1),
            probe_first_interval: Duration::from_micros(250),
            probe_interval: Duration::from_millis(5),
            resend_batch: 256,
            resend_wait: Duration::from_millis(1),
            seed: 0x5eed,
            ports_watched: true,
        }
    }

    /// True if `ip` is one of synjitsu's own probe addresses.
    pub(crate) fn is_probe_ip(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => Some(v4) == self.probe_v4,
            IpAddr::V6(v6) => Some(v6) == self.probe_v6,
        }
    }
}

/// What becomes of a client SYN that does not fit the byte budget (or the baseline's count).
///
/// Why the oldest goes: a spoofed source never retransmits and a real client does, after
/// its first retransmission timeout (1 s on Linux, RFC 6298). So a SYN never retransmitted
/// grows likelier to be spoofed as it ages, and once older than that timeout it no longer
/// spares its client anything (the client has sent again); the newest SYNs are those whose
/// clients still wait on their first. Under a flood that outruns the budget, a real client's
/// first SYN therefore survives if the budget covers the flood since it was sent; an evicted
/// one's retransmission is recognised (see [`crate::refused`]), held as a real client's and
/// evicted only when nothing else can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Evict a SYN never retransmitted (the default): of a source prefix holding more than
    /// its share if there is one, else the oldest (see `table`).
    EvictOldest,
    /// Refuse the new SYN (`vm_full`, `table_full`), as synjitsu did before the byte budget
    /// (the benchmark's baseline): a retransmission of a refused SYN still evicts one that
    /// was never retransmitted.
    Refuse,
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
    /// The VM's SYNs fill its byte budget (or count), and nothing of it could be evicted.
    VmFull,
    /// Every VM's SYNs together fill the total byte budget (or count), and nothing could be
    /// evicted.
    TableFull,
    /// A held SYN never retransmitted made room for a newer one (or, with
    /// [`WhenFull::Refuse`], for a retransmission of one refused earlier). No RST: its
    /// source is likely spoofed.
    Evicted,
    /// A held SYN waited longer than `hold_timeout`: its client got a RST.
    HoldTimeout,
    /// The VM was forgotten (absent from a `Sync`): its clients got a RST.
    VmForgotten,
    /// A guest's announcement (gratuitous ARP, unsolicited NA) that arrived on another bridge
    /// port than the one jitsu-dns named for it: someone else speaking for its address.
    SpoofedAnnouncement,
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
                DropReason::SpoofedAnnouncement,
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
            DropReason::SpoofedAnnouncement => "spoofed_announcement",
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
            DropReason::SpoofedAnnouncement => n + 7,
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
    /// Addressed to a guest synjitsu stands in for, not held: passed on through its port.
    ToGuest,
    /// Dropped, for a reason.
    Drop(DropReason),
}

impl Verdict {
    /// Every verdict label, for metrics.
    pub const LABELS: [&'static str; 8] = [
        "pass",
        "answered",
        "held",
        "duplicate",
        "announced",
        "probe_answer",
        "dropped",
        "to_guest",
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
            Verdict::ToGuest => 7,
        }
    }
}

/// The core. See the module documentation.
#[derive(Debug)]
pub struct Hold {
    cfg: Config,
    vms: Vms,
    out: Outputs,
    /// One dropped frame logged a second: a flood of garbage must not become a flood of log
    /// lines.
    drop_log: RateLimited,
    /// One spoofed announcement logged (at warn) a second.
    spoof_log: RateLimited,
    /// SYNs recently refused for want of room, to recognise their retransmissions.
    refused: Refused,
}

impl Hold {
    /// A core that knows no VM yet.
    pub fn new(cfg: Config) -> Hold {
        let seed = cfg.seed;
        Hold {
            cfg,
            vms: Vms::default(),
            out: Outputs::new(seed),
            drop_log: RateLimited::new(Duration::from_secs(1)),
            spoof_log: RateLimited::new(Duration::from_secs(1)),
            refused: Refused::new(Duration::from_secs(2), seed),
        }
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.out.counters
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// SYNs held now, in total.
    pub fn held_now(&self) -> usize {
        self.out.total_held
    }

    /// Bytes charged now against [`Config::held_bytes`]: the held SYNs and the re-sends
    /// queued.
    pub fn held_bytes_now(&self) -> usize {
        self.out.held_bytes + self.out.resend_bytes
    }

    /// Every VM: name, phase, SYNs held now.
    pub fn vms(&self) -> impl Iterator<Item = (&str, VmPhase, usize)> {
        self.vms
            .iter()
            .map(|v| (v.id.name.as_str(), v.phase, v.held.len()))
    }

    /// When the SYN held longest was captured, over every held SYN of every VM (not only the
    /// front of each queue, which is all [`Hold::poll_at`] looks at): for checks from outside,
    /// such as the fuzz target's "nothing is held past `hold_timeout`".
    pub fn oldest_held(&self) -> Option<Instant> {
        self.vms
            .iter()
            .flat_map(|vm| vm.held.iter().map(|h| h.since))
            .min()
    }

    /// Each VM's name, MAC, phase, and whether the core wants its MAC steered to synjitsu's
    /// port: what the forwarding table says of it once the shell has applied every
    /// [`Hold::poll_fdb`] wish. For checks from outside, such as the fuzz target's "the table
    /// converges to what the core believes".
    pub fn steering(&self) -> impl Iterator<Item = (&str, Mac, VmPhase, bool)> {
        self.vms
            .iter()
            .map(|v| (v.id.name.as_str(), v.id.mac, v.phase, v.steered))
    }

    /// The bytes one VM's held SYNs are charged (0 for an unknown VM).
    pub fn vm_held_bytes(&self, name: &str) -> usize {
        self.vms.get(name).map_or(0, |v| v.held_bytes)
    }

    // ---- outputs -------------------------------------------------------------------------

    /// The next frame to send, written into `out` (replacing its contents); false if none.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        self.out.poll_transmit(out)
    }

    /// True while frames wait in [`Hold::poll_transmit`]'s queue.
    pub fn transmit_pending(&self) -> bool {
        !self.out.transmit.is_empty()
    }

    /// The next frame for a guest's own port, written into `out` (replacing its contents);
    /// the port's name, or `None` if there is none.
    pub fn poll_to_guest(&mut self, out: &mut Vec<u8>) -> Option<String> {
        let (port, mut frame) = self.out.to_guest.pop_front()?;
        std::mem::swap(out, &mut frame);
        Some(port)
    }

    /// The MACs of the guests whose frames synjitsu passes through their port now, for the
    /// kernel filter; [`Hold::guest_macs_generation`] changes whenever they may have.
    pub fn guest_macs(&self) -> Vec<Mac> {
        self.vms
            .iter()
            .filter(|v| v.guest_port().is_some())
            .map(|v| v.id.mac)
            .collect()
    }

    /// Changes whenever [`Hold::guest_macs`] may have.
    pub fn guest_macs_generation(&self) -> u64 {
        self.out.guests_generation
    }

    /// The next event for jitsu-dns.
    pub fn poll_event(&mut self) -> Option<shared_proto::Event> {
        self.out.events.pop_front()
    }

    /// The next Xenstore operation.
    pub fn poll_store(&mut self) -> Option<StoreOp> {
        self.out.store.pop_front()
    }

    /// The next forwarding-table change: the latest wish for one MAC (the shell keeps the
    /// table as these say, retrying what fails; none is ever dropped).
    pub fn poll_fdb(&mut self) -> Option<FdbOp> {
        self.out.fdb.pop_first().map(|(_, op)| op)
    }

    /// When [`Hold::handle_timeout`] must run next, if ever.
    pub fn poll_at(&self) -> Option<Instant> {
        self.vms
            .iter()
            .flat_map(|vm| {
                let held = vm.held.oldest().map(|h| h.since + self.cfg.hold_timeout);
                let pace = vm.pace.next_at(vm);
                let probes = vm.probes.iter().map(|p| p.next_at);
                vm.garp_at.into_iter().chain(held).chain(probes).chain(pace)
            })
            .min()
    }

    // ---- inputs --------------------------------------------------------------------------

    /// Looks at one frame received on synjitsu's port and decides.
    pub fn on_frame(&mut self, now: Instant, frame: &[u8], meta: FrameMeta) -> Verdict {
        let verdict = self.judge(now, frame, meta);
        self.count(now, frame, verdict);
        verdict
    }

    /// Counts a verdict (and logs a drop, at most once a second).
    fn count(&mut self, now: Instant, frame: &[u8], verdict: Verdict) {
        self.out.counters.frames[verdict.index()] += 1;
        if let Verdict::Drop(reason) = verdict {
            self.out.counters.count_drop(reason);
            if let Some(suppressed) = self.drop_log.allow(now) {
                tracing::trace!(
                    reason = reason.as_str(),
                    len = frame.len(),
                    suppressed,
                    "frame dropped"
                );
            }
        }
    }

    fn judge(&mut self, now: Instant, frame: &[u8], meta: FrameMeta) -> Verdict {
        let trusted = meta.checksum != Checksum::Unknown;
        let parsed = match wire::parse(frame, trusted) {
            Ok(p) => p,
            Err(e) => return Verdict::Drop(DropReason::Malformed(e)),
        };
        let verdict = match parsed.packet {
            Packet::Arp(a) => self.on_arp(now, &parsed.eth, &a),
            Packet::Ndp(n) => self.on_ndp(now, &parsed.eth, &n),
            Packet::Tcp(t) if self.cfg.is_probe_ip(t.dst_ip) => self.on_probe_answer(now, &t),
            Packet::Tcp(t) => self.on_tcp(now, frame, &parsed.eth, &t, meta),
            Packet::Other => Verdict::Pass,
        };
        match verdict {
            // Not synjitsu's to keep: if it is for a guest stood in for, the guest's.
            Verdict::Pass => self.pass_to_guest(frame, &parsed.eth, meta),
            v => v,
        }
    }

    /// Runs what is due at `now`, VM by VM: gratuitous ARPs, hold timeouts, probes.
    pub fn handle_timeout(&mut self, now: Instant) {
        for vm in self.vms.iter_mut() {
            vm.announce_due(&self.cfg, &mut self.out, now);
            vm.expire_held(&self.cfg, &mut self.out, now);
            vm.send_due_probes(&self.cfg, &mut self.out, now);
            vm.pace_due(&self.cfg, &mut self.out, now);
            vm.finish_handover(&mut self.out);
        }
    }
}
