//! One VM as the core sees it (its identity from jitsu-dns, its [`VmPhase`], the SYNs it holds
//! and the probes of its ports), and the table of VMs by name, address and MAC ([`Vms`]).
//!
//! Owns the state and the bookkeeping that keeps it consistent: a SYN held is in `held` (see
//! [`super::table`]), charged its [`held_cost`] to its VM and to the outputs' total, and a VM
//! holding any is in the outputs' `holding`; an address or MAC belongs to one VM at most.
//! What a VM does with frames and requests is in the files named for them (`neighbour`,
//! `syn`, `handover`, `pace`, `control`), each as methods on [`Vm`] that take the outputs
//! beside it.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use shared_proto::{ErrorCode, Handover, Mac, VmIdentity};

use super::ControlError;
use super::outputs::{FdbAction, Outputs};
use super::pace::Pace;
use super::table::{Prefix, Table};
use crate::store::layout::{SynKey, TcpOption, options_from_wire};
use crate::wire::{self, Packet};

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
    /// The client's window, for Xenstore (its options are read from `frame` when written
    /// there: parsed, they took half of what a held SYN costs).
    pub(super) window: u16,
    pub(super) client_mac: Mac,
    /// The frame as received, its checksum completed.
    pub(super) frame: Vec<u8>,
    pub(super) since: Instant,
    pub(super) stored: Stored,
}

/// What one held SYN is charged against the byte budgets: its entry in `held`, its frame (of
/// `frame_len` bytes: the vector's capacity), its entry by (key, ISN) for retransmissions and,
/// at most, one source prefix's count of its own (see [`super::table`]). Allocator rounding
/// and the containers' spare room (B-tree nodes part full, hash tables up to half empty) come
/// on top; the benchmark prints the resident memory they add up to.
pub fn held_cost(frame_len: usize) -> usize {
    use std::mem::size_of;
    // Hashbrown entries: the key and value, and one control byte.
    let seen_entry = size_of::<((SynKey, u32), u64)>() + 1;
    let prefix = size_of::<(Prefix, usize)>() + 1 + size_of::<(usize, Prefix)>();
    size_of::<(u64, Held)>() + frame_len + seen_entry + prefix
}

impl Held {
    /// Its [`held_cost`].
    pub(super) fn cost(&self) -> usize {
        held_cost(self.frame.capacity())
    }

    /// The client's TCP options, read again from the frame (for Xenstore).
    pub(super) fn options(&self) -> Vec<TcpOption> {
        // Both were read without error when the SYN was held, and the frame is as it was.
        match wire::parse(&self.frame, true).map(|p| p.packet) {
            Ok(Packet::Tcp(t)) => options_from_wire(t.options).unwrap_or_default(),
            _ => Vec::new(),
        }
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
    /// Their costs add up to `held_bytes`, bounded by `held_bytes_per_vm`.
    pub(super) held: Table,
    pub(super) held_bytes: usize,
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
    /// Which held SYNs may go to the guest, and when the next of them go.
    pub(super) pace: Pace,
}

impl Vm {
    fn new(id: VmIdentity, phase: VmPhase) -> Vm {
        Vm {
            id,
            phase,
            held: Table::default(),
            held_bytes: 0,
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
            pace: Pace::default(),
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
        self.pace = Pace::default();
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
        self.held.insert(h, retransmitted);
    }

    /// Takes back what `h`, just removed from `held`, was charged.
    fn uncharge(&mut self, out: &mut Outputs, h: &Held) {
        let cost = h.cost();
        self.held_bytes -= cost;
        out.held_bytes -= cost;
        out.total_held -= 1;
        if self.held.is_empty() {
            out.holding.remove(&self.id.name);
        }
    }

    /// Removes every held SYN `pick` selects (uncharged).
    pub(super) fn take_held(
        &mut self,
        out: &mut Outputs,
        pick: impl Fn(&Held) -> bool,
    ) -> Vec<Held> {
        let ids: Vec<u64> = self.held.iter().filter(|h| pick(h)).map(|h| h.id).collect();
        ids.into_iter()
            .filter_map(|id| self.take_held_id(out, id))
            .collect()
    }

    /// Removes the held SYN `id` (uncharged).
    pub(super) fn take_held_id(&mut self, out: &mut Outputs, id: u64) -> Option<Held> {
        let h = self.held.remove(id)?;
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
