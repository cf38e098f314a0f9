//! One VM as the core sees it (its identity from jitsu-dns, its [`VmPhase`], the SYNs it holds
//! and the probes of its ports), and the table of VMs by name, address and MAC ([`Vms`]).
//!
//! Owns the state and the bookkeeping that keeps it consistent: a SYN held is in `held` and
//! in `seen` or in neither, charged its [`held_cost`] to its VM and to the outputs' total, and
//! a VM holding any is in the outputs' `holding`; an address or MAC belongs to one VM at most. What a VM does with
//! frames and requests is in the files named for them (`neighbour`, `syn`, `handover`,
//! `control`), each as methods on [`Vm`] that take the outputs beside it.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use shared_proto::{ErrorCode, Handover, Mac, VmIdentity};

use super::ControlError;
use super::outputs::{FdbAction, Outputs};
use crate::store::layout::{SynKey, TcpOption};

/// The phase of a VM in the core (jitsu-dns's [`shared_proto::Phase`] plus hand-over).
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

    /// Standing in for the guest: answering for it and holding its SYNs.
    pub(super) fn intercepting(self) -> bool {
        matches!(self, VmPhase::Booting | VmPhase::Stopped)
    }
}

/// Where a held SYN stands with Xenstore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
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
pub(super) struct Held {
    pub(super) id: u64,
    pub(super) key: SynKey,
    pub(super) isn: u32,
    /// The client's window and options, for Xenstore.
    pub(super) window: u16,
    pub(super) options: Vec<TcpOption>,
    pub(super) client_mac: Mac,
    /// The frame as received, its checksum completed.
    pub(super) frame: Vec<u8>,
    pub(super) since: Instant,
    pub(super) stored: Stored,
}

/// What one held SYN is charged against the byte budgets: its slot in `held`, its frame, its
/// parsed options and its entry in `seen`, for a frame of `frame_len` bytes and room for
/// `options` options (the vectors' capacities). Allocator rounding and the containers' spare capacity (up to as much again while
/// they grow) come on top; the benchmark prints the resident memory they add up to.
pub fn held_cost(frame_len: usize, options: usize) -> usize {
    // A hashbrown entry: the key and value, and one control byte.
    let seen_entry = std::mem::size_of::<((SynKey, u32), bool)>() + 1;
    std::mem::size_of::<Held>()
        + frame_len
        + options * std::mem::size_of::<TcpOption>()
        + seen_entry
}

impl Held {
    /// Its [`held_cost`].
    pub(super) fn cost(&self) -> usize {
        held_cost(self.frame.capacity(), self.options.capacity())
    }
}

/// A probe of one port of a guest, from synjitsu's own address.
#[derive(Debug, Clone)]
pub(super) struct Probe {
    /// The held SYNs it is for: their family and destination port.
    pub(super) v6: bool,
    pub(super) port: u16,
    /// Where the probe goes (the guest's address in the probe's family).
    pub(super) vm_ip: IpAddr,
    pub(super) probe_ip: IpAddr,
    pub(super) src_port: u16,
    pub(super) isn: u32,
    pub(super) next_at: Instant,
    /// The wait after the next probe sent: it doubles at each, up to `probe_interval`.
    pub(super) gap: Duration,
}

/// One VM. See the module documentation.
#[derive(Debug)]
pub(super) struct Vm {
    pub(super) id: VmIdentity,
    pub(super) phase: VmPhase,
    /// Oldest first; their costs add up to `held_bytes`, bounded by `held_bytes_per_vm`.
    pub(super) held: VecDeque<Held>,
    pub(super) held_bytes: usize,
    /// (key, ISN) of every held SYN, for retransmissions; true once it was retransmitted
    /// (the client is real: never evicted).
    pub(super) seen: HashMap<(SynKey, u32), bool>,
    pub(super) garp_left: u32,
    pub(super) garp_at: Option<Instant>,
    pub(super) last_wake: Option<Instant>,
    /// When the last `SynHeld` event for it was queued.
    pub(super) syn_event_at: Option<Instant>,
    /// A static entry for the MAC was asked for and not released since.
    pub(super) steered: bool,
    /// The release asked for and not yet confirmed; nothing goes to the guest before.
    pub(super) release_pending: Option<u64>,
    /// Every port listens (jitsu-dns said so): no probing.
    pub(super) listening: bool,
    /// The guest announced itself since it last booted (seen on the bridge, not told).
    pub(super) announced: bool,
    /// The port an announcement came in on that the watcher saw while the guest's port was
    /// not named, until it is judged: left to the copy on synjitsu's port, which a `port`
    /// read between the two copies leaves to the watcher in turn; `port` judges it then.
    pub(super) unjudged_from: Option<String>,
    pub(super) probes: Vec<Probe>,
}

impl Vm {
    fn new(id: VmIdentity, phase: VmPhase) -> Vm {
        Vm {
            id,
            phase,
            held: VecDeque::new(),
            held_bytes: 0,
            seen: HashMap::new(),
            garp_left: 0,
            garp_at: None,
            last_wake: None,
            syn_event_at: None,
            steered: false,
            release_pending: None,
            listening: false,
            announced: false,
            unjudged_from: None,
            probes: Vec::new(),
        }
    }

    /// Its IPv4 address, then its IPv6 address if it has one.
    pub(super) fn addrs(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(self.id.ipv4)];
        v.extend(self.id.ipv6.map(IpAddr::V6));
        v
    }

    /// The guest's own bridge port, while it has one: named by jitsu-dns, and the VM booting
    /// or in hand-over (a stopped VM's old port may belong to another guest by now).
    pub(super) fn guest_port(&self) -> Option<&str> {
        match self.phase {
            VmPhase::Booting | VmPhase::Handover => self.id.port.as_deref(),
            VmPhase::Stopped | VmPhase::Running => None,
        }
    }

    /// The port the guest's announcement must come from, if it can be checked.
    pub(super) fn announcing_port(&self, cfg: &super::Config) -> Option<&str> {
        self.guest_port().filter(|_| cfg.ports_watched)
    }

    /// The guest's domain if its SYNs are handed over through Xenstore.
    pub(super) fn xenstore_domid(&self) -> Option<u32> {
        match self.id.handover {
            Handover::Xenstore { domid } => Some(domid),
            Handover::Wire => None,
        }
    }

    /// Starts standing in for the guest anew in `phase` (booting or stopped), with
    /// `garp_left` gratuitous ARPs to send from `garp_at`. Nothing held is in Xenstore any
    /// more: the domain is gone or new.
    pub(super) fn restart(&mut self, phase: VmPhase, garp_left: u32, garp_at: Option<Instant>) {
        self.phase = phase;
        self.announced = false;
        self.unjudged_from = None;
        self.listening = false;
        self.probes.clear();
        self.garp_left = garp_left;
        self.garp_at = garp_at;
        for h in self.held.iter_mut() {
            h.stored = Stored::No;
        }
    }

    /// Holds `h` (newest), `retransmitted` if its client is known to be real, and charges it.
    pub(super) fn push_held(&mut self, out: &mut Outputs, h: Held, retransmitted: bool) {
        if self.held.is_empty() {
            out.holding.insert(self.id.name.clone());
        }
        let cost = h.cost();
        self.held_bytes += cost;
        out.held_bytes += cost;
        out.total_held += 1;
        self.seen.insert((h.key, h.isn), retransmitted);
        self.held.push_back(h);
    }

    /// Takes back what `h`, just removed from `held` and `seen`, was charged.
    fn uncharge(&mut self, out: &mut Outputs, h: &Held) {
        let cost = h.cost();
        self.held_bytes -= cost;
        out.held_bytes -= cost;
        out.total_held -= 1;
        if self.held.is_empty() {
            out.holding.remove(&self.id.name);
        }
    }

    /// Removes every held SYN `pick` selects (from `held` and `seen`, uncharged), in order.
    pub(super) fn take_held(
        &mut self,
        out: &mut Outputs,
        mut pick: impl FnMut(&Held) -> bool,
    ) -> Vec<Held> {
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
        for h in &taken {
            self.uncharge(out, h);
        }
        taken
    }

    /// Removes the held SYN at `i` (from `held` and `seen`, uncharged).
    pub(super) fn take_held_at(&mut self, out: &mut Outputs, i: usize) -> Option<Held> {
        let h = self.held.remove(i)?;
        self.seen.remove(&(h.key, h.isn));
        self.uncharge(out, &h);
        Some(h)
    }
}

/// Every VM the core knows, by name (in name order), by address and by MAC.
#[derive(Debug, Default)]
pub(super) struct Vms {
    by_name: BTreeMap<String, Vm>,
    by_ip: HashMap<IpAddr, String>,
    by_mac: HashMap<Mac, String>,
}

impl Vms {
    pub(super) fn get(&self, name: &str) -> Option<&Vm> {
        self.by_name.get(name)
    }

    pub(super) fn get_mut(&mut self, name: &str) -> Option<&mut Vm> {
        self.by_name.get_mut(name)
    }

    /// The VM that owns address `ip`.
    pub(super) fn with_ip(&self, ip: IpAddr) -> Option<&Vm> {
        self.by_name.get(self.by_ip.get(&ip)?)
    }

    /// The VM that owns address `ip`.
    pub(super) fn with_ip_mut(&mut self, ip: IpAddr) -> Option<&mut Vm> {
        let name = self.by_ip.get(&ip)?;
        self.by_name.get_mut(name)
    }

    /// The VM whose MAC is `mac`.
    pub(super) fn with_mac_mut(&mut self, mac: Mac) -> Option<&mut Vm> {
        let name = self.by_mac.get(&mac)?;
        self.by_name.get_mut(name)
    }

    /// Every VM, in name order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Vm> {
        self.by_name.values()
    }

    /// Every VM, in name order.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Vm> {
        self.by_name.values_mut()
    }

    /// An error if `vm`'s MAC or an address of it belongs to another VM.
    pub(super) fn check_conflicts(&self, vm: &VmIdentity) -> Result<(), ControlError> {
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

    /// Creates a VM in `phase`, or updates a known one's identity (keeping its phase and what
    /// it holds; a MAC steered here that changed is released).
    pub(super) fn upsert(&mut self, out: &mut Outputs, id: &VmIdentity, phase: VmPhase) -> &mut Vm {
        let vm = match self.by_name.entry(id.name.clone()) {
            Entry::Occupied(e) => {
                let vm = e.into_mut();
                if vm.id.mac != id.mac {
                    self.by_mac.remove(&vm.id.mac);
                    if vm.steered {
                        out.queue_fdb(&id.name, vm.id.mac, FdbAction::Release);
                        vm.steered = false;
                    }
                }
                for ip in vm.addrs() {
                    self.by_ip.remove(&ip);
                }
                vm.id = id.clone();
                vm
            }
            Entry::Vacant(e) => e.insert(Vm::new(id.clone(), phase)),
        };
        self.by_mac.insert(id.mac, id.name.clone());
        for ip in vm.addrs() {
            self.by_ip.insert(ip, id.name.clone());
        }
        vm
    }

    /// Forgets a VM; its addresses and MAC are free again.
    pub(super) fn remove(&mut self, name: &str) -> Option<Vm> {
        let vm = self.by_name.remove(name)?;
        self.by_mac.remove(&vm.id.mac);
        for ip in vm.addrs() {
            self.by_ip.remove(&ip);
        }
        Some(vm)
    }
}
