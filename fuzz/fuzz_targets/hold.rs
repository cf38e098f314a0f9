//! synjitsu's core (`synjitsu::hold::Hold`) driven as its shell drives it: control requests,
//! frames from the bridge, the results of Xenstore writes and forwarding-table changes, and
//! timer expiries, on a synthetic clock that only moves forward.
//!
//! Input: one byte of configuration (Xenstore and probe addresses on or off), then operations,
//! each a byte saying which and the bytes it reads (see `step`). The VMs come from a pool of
//! four identities (varied by the input: IPv6 or not, Xenstore or wire hand-over, another
//! VM's MAC or address, a MAC of the input's, the guest's bridge port named or not, its own or
//! another's, promising to announce itself only once it listens or not), so that requests, frames and results meet the same VMs. Frames are built whole
//! (client SYNs with correct checksums, the guest's own announcements, ARP requests,
//! neighbour solicitations, answers to the probes the core sent) or taken raw from the input,
//! or the last frame with one byte changed (its TCP checksum fixed or not, with any checksum
//! state); each is seen on synjitsu's port (`on_frame`), by the announcement watcher on a
//! bridge port (`on_ingress`), or both.
//! After each operation the outputs are drained as the shell drains them; the Xenstore writes
//! and forwarding-table changes wait until the input says how they ended.
//!
//! Checks after every operation, besides never panicking:
//! - the SYNs held add up: the VMs' counts sum to `held_now`, each within `max_held_per_vm`
//!   and all within `max_held`; every SYN counted as held was either held still, dropped for
//!   a counted reason (evicted, timed out, VM forgotten), re-sent on the wire, or taken by the
//!   guest from Xenstore (at most as many as writes committed);
//! - after `handle_timeout(now)`: nothing is held that was captured `hold_timeout` or more
//!   before `now`, and `poll_at` is not in the past;
//! - every frame the core sends is one synjitsu's own parser reads, with correct checksums
//!   where the core wrote them;
//! - a frame for a guest goes out only of a bridge port jitsu-dns named for that guest's MAC
//!   (`poll_to_guest`): never to another guest.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jitsu_fuzz::Input;
use libfuzzer_sys::fuzz_target;
use shared_proto::control::Message;
use shared_proto::{ClientMessage, Event, Handover, Mac, Phase, Request, VmIdentity, VmStatus};
use synjitsu::garp::{self, NaTo};
use synjitsu::hold::{
    Checksum, Config, DropReason, FdbAction, FdbOp, FrameMeta, Hold, StoreDone, StoreOp,
    StoreOutcome, Verdict, VmPhase, WhenFull,
};
use synjitsu::wire::{self, ArpOp, ArpRepr, Packet, TcpOut, tcp_flags};

const OWN_MAC: Mac = Mac([0x02, 0x53, 0x59, 0x4a, 0, 1]);
const PROBE_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 250);
const PROBE_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 0xfa);
const HOLD_TIMEOUT: Duration = Duration::from_secs(10);
/// The SYN table's bounds, small so that inputs reach them: bytes (the default policy, the
/// oldest evicted: about 8 SYNs per VM, 13 in all) or, for the old policy kept as the
/// flood benchmark's baseline, counts besides the bytes (the new SYN refused).
const HELD_BYTES_PER_VM: usize = 4096;
const HELD_BYTES: usize = 7000;
const MAX_HELD_PER_VM: usize = 6;
const MAX_HELD: usize = 10;
/// The results the input can still report, at most (the oldest are forgotten, as lost).
const PENDING: usize = 64;

const NAMES: [&str; 4] = ["www", "mirage", "db", "a.b-c_d"];
const CLIENTS: [(Mac, Ipv4Addr, Ipv6Addr); 2] = [
    (
        Mac([0x02, 0x77, 0, 0, 1, 0x02]),
        Ipv4Addr::new(10, 77, 1, 2),
        Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 2),
    ),
    (
        Mac([0x02, 0x77, 0, 0, 1, 0x03]),
        Ipv4Addr::new(10, 77, 1, 3),
        Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 3),
    ),
];
/// TCP options a client SYN may carry: none, MSS, a Linux SYN's, unreadable ones.
const OPTIONS: [&[u8]; 5] = [
    &[],
    &[2, 4, 0x05, 0xb4],
    &[
        2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0x2b, 0xe2, 0xda, 0x94, 0, 0, 0, 0, 1, 3, 3, 10,
    ],
    &[2, 0, 0, 0],
    &[5, 30, 0, 0],
];

/// Prints what `what` says when `HOLD_TRACE` is set (to replay one input by hand).
fn trace(what: impl FnOnce() -> String) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("HOLD_TRACE").is_some()) {
        eprintln!("{}", what());
    }
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn vm_mac(i: usize) -> Mac {
    Mac([0x02, 0x77, 0, 0, 1, 0x10 + i as u8])
}

fn vm_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 1, 10 + i as u8)
}

fn vm_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 0x10 + i as u16)
}

/// The bridge port jitsu-dns names for VM `i` of the pool, by `sel` (two bits): none (not
/// known yet), its own, the next VM's, or a Xen-style one no VM of the pool has.
fn named_port(sel: u8, i: usize) -> Option<String> {
    match sel & 3 {
        0 => None,
        1 => Some(format!("vnet{i}")),
        2 => Some(format!("vnet{}", (i + 1) % NAMES.len())),
        _ => Some("vif7.0".to_string()),
    }
}

/// The port the announcement watcher saw a frame from VM `i` of the pool arrive on, by `sel`
/// (two bits): its own, the next VM's, a port no VM has, the uplink.
fn ingress_port(sel: u8, i: usize) -> String {
    match sel & 3 {
        0 => format!("vnet{i}"),
        1 => format!("vnet{}", (i + 1) % NAMES.len()),
        2 => "vif7.0".to_string(),
        _ => "eth0".to_string(),
    }
}

/// A VM of the pool, varied by one byte (and six more for a MAC of the input's), its bridge
/// port chosen by `port` (see `named_port`), and its promise to announce itself only once it
/// listens by `port`'s third bit.
fn identity(input: &mut Input<'_>, port: u8) -> Option<VmIdentity> {
    let b = input.byte()?;
    let i = usize::from(b & 3);
    let next = (i + 1) % NAMES.len();
    let mut mac = if b & 0x10 != 0 {
        vm_mac(next)
    } else {
        vm_mac(i)
    };
    if b & 0x40 != 0 {
        mac = Mac(input.bytes(6)?.try_into().expect("six bytes"));
    }
    Some(VmIdentity {
        name: NAMES[i].to_string(),
        mac,
        ipv4: if b & 0x20 != 0 { vm_v4(next) } else { vm_v4(i) },
        ipv6: (b & 4 != 0).then(|| vm_v6(i)),
        port: named_port(port, i),
        announces_listening: port & 4 != 0,
        handover: if b & 8 != 0 {
            Handover::Xenstore {
                domid: 1 + u32::from(b >> 7) * 100 + i as u32,
            }
        } else {
            Handover::Wire
        },
    })
}

/// What the harness remembers of the core's outputs, for the input to answer.
#[derive(Default)]
struct Pending {
    writes: Vec<StoreOp>,
    fdb: Vec<FdbOp>,
    /// Probes seen on the wire: the guest's MAC and the probe's frame fields.
    probes: Vec<(Mac, IpAddr, IpAddr, u16, u16, u32)>,
    /// Every SYN the core held, after its destination MAC, as the guest must get it if it is
    /// re-sent (its checksum completed when it was partial); re-sent, it is addressed to the
    /// guest's MAC as it is then (jitsu-dns may have named a new one meanwhile).
    held_frames: HashSet<Vec<u8>>,
    /// Every MAC each VM name was given in a request the core took.
    macs: HashMap<String, HashSet<Mac>>,
    /// Every (MAC, bridge port) pair jitsu-dns named in a request the core took: where frames
    /// for a guest may go.
    ports: HashSet<(Mac, String)>,
    /// The bridge's forwarding table as the shell keeps it: every wish the core made applied
    /// in order (a MAC absent was never steered).
    bridge: HashMap<Mac, FdbAction>,
}

fn remember<T>(list: &mut Vec<T>, item: T) {
    if list.len() == PENDING {
        list.remove(0);
    }
    list.push(item);
}

struct Harness {
    hold: Hold,
    /// Whether the old policy's counts bound the table besides the bytes.
    counted: bool,
    now: Instant,
    pending: Pending,
    /// Where frames are built.
    frame: Vec<u8>,
    /// The last frame fed, for the input to change.
    last: Vec<u8>,
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(setup) = input.byte() else {
        return;
    };
    let mut cfg = Config::new(OWN_MAC);
    cfg.hold_timeout = HOLD_TIMEOUT;
    cfg.held_bytes_per_vm = HELD_BYTES_PER_VM;
    cfg.held_bytes = HELD_BYTES;
    let counted = setup & 8 != 0;
    if counted {
        cfg.when_full = WhenFull::Refuse;
        cfg.max_held_per_vm = Some(MAX_HELD_PER_VM);
        cfg.max_held = Some(MAX_HELD);
    }
    if setup & 1 != 0 {
        cfg.xenstore_off = None;
    }
    cfg.probe_v4 = (setup & 2 != 0).then_some(PROBE_V4);
    cfg.probe_v6 = (setup & 4 != 0).then_some(PROBE_V6);
    let mut h = Harness {
        hold: Hold::new(cfg),
        counted,
        now: base(),
        pending: Pending::default(),
        frame: vec![0; 1600],
        last: Vec::new(),
    };
    while let Some(op) = input.byte() {
        if h.step(op, &mut input).is_none() {
            break;
        }
        h.drain();
        h.check_counts();
        h.check_bridge();
    }
});

impl Harness {
    /// One operation; `None` when the input ran out in the middle of it.
    fn step(&mut self, op: u8, input: &mut Input<'_>) -> Option<()> {
        match op & 0x0f {
            // Time passes; the shell's timer fires if due, unless the input says it is late.
            0 => {
                let ms = input.u16()?;
                self.pass(u64::from(ms), op & 0x80 != 0);
            }
            // The timer fires exactly when the core asked.
            1 => {
                if let Some(t) = self.hold.poll_at() {
                    self.now = self.now.max(t);
                }
                self.timeout();
            }
            2 => {
                let vm = identity(input, op >> 4)?;
                self.control(ClientMessage::Booting { vm });
            }
            3 => {
                let vm = identity(input, op >> 4)?;
                self.control(ClientMessage::Stopped { vm });
            }
            // Ready, or (high bit) the guest's port learnt after its start.
            4 => {
                let b = input.byte()?;
                let i = usize::from(b & 7);
                let name = match NAMES.get(i) {
                    Some(n) => n.to_string(),
                    None => format!("unknown{b}"),
                };
                match named_port(b >> 3, i % NAMES.len()) {
                    Some(port) if op & 0x80 != 0 => {
                        self.control(ClientMessage::Port { name, port });
                    }
                    _ => self.control(ClientMessage::Ready { name }),
                }
            }
            5 => {
                let n = input.byte()? % 6;
                let mut vms = Vec::new();
                for _ in 0..n {
                    let b = input.byte()?;
                    let vm = identity(input, b >> 2)?;
                    let phase = match b % 3 {
                        0 => Phase::Booting,
                        1 => Phase::Running,
                        _ => Phase::Stopped,
                    };
                    vms.push(VmStatus { vm, phase });
                }
                self.control(ClientMessage::Sync { vms });
            }
            6 => self.client_syn(op, input)?,
            7 => self.announce(op, input)?,
            8 => self.who_has(op, input)?,
            9 => self.probe_answer(input)?,
            10 => {
                // A raw frame, with any checksum state, its TCP checksum fixed if asked.
                let len = usize::from(input.u16()? % 1600);
                let meta = input.byte()?;
                let mut frame = input.bytes(len)?.to_vec();
                if meta & 4 != 0 {
                    wire::fix_tcp_checksum(&mut frame);
                }
                self.feed_from(&frame, frame_meta(meta), meta >> 3);
            }
            11 => {
                let b = input.byte()?;
                if self.pending.writes.is_empty() {
                    return Some(());
                }
                let i = usize::from(b) % self.pending.writes.len();
                let StoreOp::Write { id, vm, key, .. } = self.pending.writes.remove(i) else {
                    unreachable!("only writes are kept");
                };
                let outcome = match b >> 6 {
                    0 | 1 => StoreOutcome::Written,
                    2 => StoreOutcome::Managed,
                    _ => StoreOutcome::Failed("refused by the fuzz input".into()),
                };
                self.hold.on_store_done(
                    self.now,
                    StoreDone {
                        id,
                        vm,
                        key,
                        outcome,
                    },
                );
            }
            12 => {
                let b = input.byte()?;
                let id = if self.pending.fdb.is_empty() || b == 0xff {
                    u64::from(b)
                } else {
                    let i = usize::from(b) % self.pending.fdb.len();
                    self.pending.fdb.remove(i).id
                };
                self.hold.on_fdb_done(self.now, id);
            }
            13 => {
                self.control(ClientMessage::Hello {
                    version: 1,
                    client: "fuzz".into(),
                });
            }
            // A moment passes (as 0, up to 255 ms).
            14 => {
                let ms = input.byte()?;
                self.pass(u64::from(ms), op & 0x80 != 0);
            }
            // The last frame fed, one byte changed, its TCP checksum fixed if asked.
            _ => {
                let at = usize::from(input.u16()?);
                let xor = input.byte()?;
                let meta = input.byte()?;
                let mut frame = self.last.clone();
                let at = at % frame.len().max(1);
                if let Some(b) = frame.get_mut(at) {
                    *b ^= xor;
                }
                if meta & 4 != 0 {
                    wire::fix_tcp_checksum(&mut frame);
                }
                self.feed_from(&frame, frame_meta(meta), meta >> 3);
            }
        }
        Some(())
    }

    /// A frame from the bridge; a SYN the core holds is remembered as the guest must get it.
    fn feed(&mut self, frame: &[u8], meta: FrameMeta) {
        self.last = frame.to_vec();
        let verdict = self.hold.on_frame(self.now, frame, meta);
        trace(|| {
            format!(
                "frame to {:02x?}: {verdict:?}",
                &frame[..frame.len().min(6)]
            )
        });
        if verdict == Verdict::Held {
            let mut held = frame.to_vec();
            if meta.checksum == Checksum::Partial {
                wire::fix_tcp_checksum(&mut held);
            }
            self.pending.held_frames.insert(held.split_off(6));
        }
    }

    /// A frame seen where `from` (three bits) says: on synjitsu's port (0 to 3), by the
    /// announcement watcher on a port (4 to 7, `ingress_port` of VM 0), or both.
    fn feed_from(&mut self, frame: &[u8], meta: FrameMeta, from: u8) {
        if from & 4 != 0 {
            self.ingress(frame, meta, &ingress_port(from, 0));
        }
        if from & 4 == 0 || from & 2 != 0 {
            self.feed(frame, meta);
        }
    }

    /// A frame the announcement watcher saw arriving on `port`.
    fn ingress(&mut self, frame: &[u8], meta: FrameMeta, port: &str) {
        self.last = frame.to_vec();
        let verdict = self.hold.on_ingress(self.now, frame, meta, port);
        trace(|| format!("frame seen on {port}: {verdict:?}"));
    }

    /// A request, if it is one the control codec lets through; what it names is remembered
    /// when the core takes it (a sync in part even when it answers an error: "applied
    /// except" the VMs it names).
    fn control(&mut self, body: ClientMessage) {
        let req = Request { id: 1, body };
        let taken = req.validate().is_ok() && {
            let r = self.hold.on_control(self.now, &req.body);
            trace(|| format!("{:?} -> {r:?}", req.body));
            r.is_ok() || matches!(req.body, ClientMessage::Sync { .. })
        };
        if !taken {
            return;
        }
        let mut named = |vm: &VmIdentity| {
            let macs = self.pending.macs.entry(vm.name.clone()).or_default();
            macs.insert(vm.mac);
            if let Some(port) = &vm.port {
                self.pending.ports.insert((vm.mac, port.clone()));
            }
        };
        match &req.body {
            ClientMessage::Booting { vm } | ClientMessage::Stopped { vm } => named(vm),
            ClientMessage::Sync { vms } => vms.iter().for_each(|s| named(&s.vm)),
            ClientMessage::Port { name, port } => {
                for mac in self.pending.macs.get(name).into_iter().flatten() {
                    self.pending.ports.insert((*mac, port.clone()));
                }
            }
            ClientMessage::Hello { .. } | ClientMessage::Ready { .. } => {}
        }
    }

    /// `ms` pass; the shell's timer fires if it is due, unless it is `late`.
    fn pass(&mut self, ms: u64, late: bool) {
        self.now += Duration::from_millis(ms);
        if !late && self.hold.poll_at().is_some_and(|t| t <= self.now) {
            self.timeout();
        }
    }

    fn timeout(&mut self) {
        self.hold.handle_timeout(self.now);
        if let Some(oldest) = self.hold.oldest_held() {
            assert!(
                oldest + HOLD_TIMEOUT > self.now,
                "a SYN captured {:?} ago is still held after handle_timeout",
                self.now - oldest
            );
        }
        if let Some(at) = self.hold.poll_at() {
            assert!(
                at > self.now,
                "poll_at is {:?} in the past after handle_timeout",
                self.now - at
            );
        }
    }

    /// A client SYN to a VM of the pool, well-formed and with a correct checksum.
    fn client_syn(&mut self, op: u8, input: &mut Input<'_>) -> Option<()> {
        let b = input.byte()?;
        let vm = usize::from(b & 3);
        let (cmac, c4, c6) = CLIENTS[usize::from(b >> 2 & 1)];
        let v6 = b & 8 != 0;
        let dst_port = match b >> 4 & 3 {
            0 => 80,
            1 => 443,
            _ => input.u16()?,
        };
        let src_port = input.u16()?;
        let seq = input.u32()?;
        let eth_dst = if op & 0x80 != 0 {
            Mac::BROADCAST
        } else {
            vm_mac(vm)
        };
        let (src_ip, dst_ip) = if v6 {
            (IpAddr::V6(c6), IpAddr::V6(vm_v6(vm)))
        } else {
            (IpAddr::V4(c4), IpAddr::V4(vm_v4(vm)))
        };
        let seg = TcpOut {
            eth_src: cmac,
            eth_dst,
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            seq,
            ack: 0,
            flags: tcp_flags::SYN,
            window: 64240,
            options: OPTIONS[usize::from(op >> 4 & 7) % OPTIONS.len()],
        };
        let n = wire::write_tcp(&mut self.frame, &seg);
        let frame = self.frame[..n].to_vec();
        self.feed(&frame, frame_meta(b >> 6));
        Some(())
    }

    /// A VM's own gratuitous ARP or unsolicited NA (or one from another MAC: spoofed).
    fn announce(&mut self, op: u8, input: &mut Input<'_>) -> Option<()> {
        let b = input.byte()?;
        let vm = usize::from(b & 3);
        let mac = if b & 4 != 0 { CLIENTS[0].0 } else { vm_mac(vm) };
        let n = if op & 0x80 != 0 {
            garp::neighbour_advertisement(&mut self.frame, mac, vm_v6(vm), NaTo::AllNodes)
        } else {
            garp::gratuitous_arp(&mut self.frame, mac, vm_v4(vm))
        };
        let frame = self.frame[..n].to_vec();
        // Seen by the watcher on a port (and on synjitsu's port too), or by synjitsu's alone.
        if op & 0x40 != 0 {
            self.ingress(&frame, frame_meta(b >> 3), &ingress_port(b >> 5, vm));
            if op & 0x20 != 0 {
                self.feed(&frame, frame_meta(b >> 3));
            }
        } else {
            self.feed(&frame, frame_meta(b >> 3));
        }
        Some(())
    }

    /// A client asking for a VM's address (or a probe address): ARP request or neighbour
    /// solicitation.
    fn who_has(&mut self, op: u8, input: &mut Input<'_>) -> Option<()> {
        let b = input.byte()?;
        let vm = usize::from(b & 3);
        let (cmac, c4, c6) = CLIENTS[usize::from(b >> 2 & 1)];
        let probe = b & 8 != 0;
        let n = if op & 0x80 != 0 {
            let target = if probe { PROBE_V6 } else { vm_v6(vm) };
            let src = if b & 0x10 != 0 {
                Ipv6Addr::UNSPECIFIED
            } else {
                c6
            };
            solicitation(&mut self.frame, cmac, src, target)
        } else {
            let target_ip = if probe { PROBE_V4 } else { vm_v4(vm) };
            let sender_ip = if b & 0x10 != 0 {
                Ipv4Addr::UNSPECIFIED
            } else {
                c4
            };
            let arp = ArpRepr {
                op: ArpOp::Request,
                sender_mac: cmac,
                sender_ip,
                target_mac: Mac([0; 6]),
                target_ip,
            };
            wire::write_eth(&mut self.frame, Mac::BROADCAST, cmac, wire::ETHERTYPE_ARP);
            wire::write_arp(&mut self.frame, &arp);
            wire::pad(&mut self.frame, wire::ETH_HDR + wire::ARP_LEN)
        };
        let frame = self.frame[..n].to_vec();
        self.feed(&frame, frame_meta(b >> 5));
        Some(())
    }

    /// The guest answering a probe the core sent: SYN-ACK, RST, or either acknowledging
    /// the wrong number.
    fn probe_answer(&mut self, input: &mut Input<'_>) -> Option<()> {
        let b = input.byte()?;
        if self.pending.probes.is_empty() {
            return Some(());
        }
        let i = usize::from(b & 0x3f) % self.pending.probes.len();
        let (vm_mac, vm_ip, probe_ip, port, src_port, isn) = self.pending.probes[i];
        let ack = if b & 0x40 != 0 {
            isn
        } else {
            isn.wrapping_add(1)
        };
        let flags = if b & 0x80 != 0 {
            tcp_flags::RST | tcp_flags::ACK
        } else {
            tcp_flags::SYN | tcp_flags::ACK
        };
        let seg = TcpOut {
            eth_src: vm_mac,
            eth_dst: OWN_MAC,
            src_ip: vm_ip,
            dst_ip: probe_ip,
            src_port: port,
            dst_port: src_port,
            seq: 0x1afe_0000,
            ack,
            flags,
            window: 65535,
            options: OPTIONS[1],
        };
        let n = wire::write_tcp(&mut self.frame, &seg);
        let frame = self.frame[..n].to_vec();
        self.feed(&frame, FrameMeta::default());
        Some(())
    }

    /// Takes every output, as the shell does, checking the frames and remembering what the
    /// input may answer.
    fn drain(&mut self) {
        let mut out = Vec::new();
        while self.hold.poll_transmit(&mut out) {
            check_sent(&out, &mut self.pending);
        }
        while let Some(port) = self.hold.poll_to_guest(&mut out) {
            let dst = Mac(out[..6].try_into().expect("a frame has an Ethernet header"));
            assert!(
                self.pending.ports.contains(&(dst, port.clone())),
                "a frame for {dst} went out of {port}, never named as its port: {out:?}"
            );
        }
        while let Some(ev) = self.hold.poll_event() {
            if let Event::SynHeld { held, .. } = ev {
                assert!(!self.counted || held as usize <= MAX_HELD_PER_VM, "{ev:?}");
            }
        }
        while let Some(op) = self.hold.poll_store() {
            if matches!(op, StoreOp::Write { .. }) {
                remember(&mut self.pending.writes, op);
            }
        }
        while let Some(op) = self.hold.poll_fdb() {
            self.pending.bridge.insert(op.mac, op.action);
            remember(&mut self.pending.fdb, op);
        }
    }

    /// The forwarding table, with every wish applied, says what the core believes: a VM
    /// stood in for has its MAC steered to synjitsu, and no MAC is steered there that no VM
    /// wants (a forgotten VM's, a VM's old MAC).
    fn check_bridge(&self) {
        let mut wanted = HashSet::new();
        for (name, mac, phase, steered) in self.hold.steering() {
            let on_bridge = self.pending.bridge.get(&mac) == Some(&FdbAction::Steer);
            assert_eq!(
                on_bridge, steered,
                "{name} ({mac}, {phase:?}): the table says steered {on_bridge}, the core {steered}"
            );
            if matches!(phase, VmPhase::Booting | VmPhase::Stopped) {
                assert!(
                    steered,
                    "{name} ({mac}) is {phase:?} but not steered to synjitsu"
                );
            }
            if steered {
                wanted.insert(mac);
            }
        }
        for (mac, action) in &self.pending.bridge {
            assert!(
                *action != FdbAction::Steer || wanted.contains(mac),
                "{mac} is left steered to synjitsu, for no VM"
            );
        }
    }

    /// The held SYNs add up, against each other and against the counters.
    fn check_counts(&self) {
        let held_now = self.hold.held_now();
        let mut sum = 0;
        for (name, _, held) in self.hold.vms() {
            assert!(
                !self.counted || held <= MAX_HELD_PER_VM,
                "{name} holds {held}"
            );
            let bytes = self.hold.vm_held_bytes(name);
            assert!(bytes <= HELD_BYTES_PER_VM, "{name} holds {bytes} bytes");
            sum += held;
        }
        assert_eq!(
            sum, held_now,
            "the VMs' held SYNs do not add up to held_now"
        );
        assert!(
            !self.counted || held_now <= MAX_HELD,
            "{held_now} held in all"
        );
        let bytes = self.hold.held_bytes_now();
        assert!(bytes <= HELD_BYTES, "{bytes} bytes held in all");
        let c = self.hold.counters();
        assert_eq!(
            c.syns_held,
            c.frames_with("held"),
            "held SYNs against held frames"
        );
        let gone = c.drops_for(DropReason::Evicted)
            + c.drops_for(DropReason::HoldTimeout)
            + c.drops_for(DropReason::VmForgotten)
            + c.handed_over_wire;
        // What Xenstore committed the guest reads itself: those leave the table uncounted.
        let taken_from_xenstore = c
            .syns_held
            .checked_sub(gone + held_now as u64)
            .unwrap_or_else(|| {
                panic!(
                    "more SYNs left ({gone}) or are held ({held_now}) than were held ({}): {c:?}",
                    c.syns_held
                )
            });
        assert!(
            taken_from_xenstore <= c.xenstore_writes,
            "{taken_from_xenstore} SYNs left the table unaccounted for, {} Xenstore writes: {c:?}",
            c.xenstore_writes
        );
    }
}

// `..FrameMeta::default()`: what else comes with a frame is not this target's to vary.
#[allow(clippy::needless_update)]
fn frame_meta(b: u8) -> FrameMeta {
    FrameMeta {
        checksum: match b & 3 {
            0 | 3 => Checksum::Unknown,
            1 => Checksum::Partial,
            _ => Checksum::Valid,
        },
        ..FrameMeta::default()
    }
}

/// A neighbour solicitation from `src` at `mac` for `target`, with a correct checksum.
fn solicitation(out: &mut [u8], mac: Mac, src: Ipv6Addr, target: Ipv6Addr) -> usize {
    let t = target.octets();
    // The solicited-node group of `target`: ff02::1:ffXX:XXXX, and its Ethernet group.
    let group = Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ]);
    let eth_dst = Mac([0x33, 0x33, 0xff, t[13], t[14], t[15]]);
    let icmp_len = 32;
    wire::write_eth(out, eth_dst, mac, wire::ETHERTYPE_IPV6);
    wire::write_ipv6(out, src, group, wire::PROTO_ICMPV6, 255, icmp_len as u16);
    let at = wire::ETH_HDR + wire::IPV6_HDR;
    let icmp = &mut out[at..at + icmp_len];
    icmp.fill(0);
    icmp[0] = wire::ICMPV6_NS;
    icmp[8..24].copy_from_slice(&t);
    icmp[24] = 1;
    icmp[25] = 1;
    icmp[26..32].copy_from_slice(&mac.0);
    let sum = wire::pseudo_sum(
        src.into(),
        group.into(),
        wire::PROTO_ICMPV6,
        icmp_len as u32,
    );
    let c = !wire::fold(wire::sum_words(icmp, sum));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    at + icmp_len
}

/// A frame the core sent: a SYN it held, byte for byte after the destination MAC, which is
/// one jitsu-dns named for a VM; or one it wrote, which parses, with correct checksums; a
/// probe is remembered for the guest to answer.
fn check_sent(frame: &[u8], pending: &mut Pending) {
    if frame.len() > 6 && pending.held_frames.contains(&frame[6..]) {
        let dst = Mac(frame[..6].try_into().expect("six bytes"));
        assert!(
            pending.macs.values().any(|m| m.contains(&dst)),
            "a held SYN re-sent to a MAC never named for a VM: {frame:?}"
        );
        return;
    }
    let parsed = wire::parse(frame, false)
        .unwrap_or_else(|e| panic!("the core sent a frame its parser refuses ({e:?}): {frame:?}"));
    let Packet::Tcp(t) = parsed.packet else {
        return;
    };
    assert!(
        wire::tcp_checksum_ok(frame, &t),
        "a segment the core wrote has a wrong checksum: {frame:?}"
    );
    if t.is_syn() {
        assert_eq!(
            parsed.eth.src, OWN_MAC,
            "a SYN the core sent is neither a held one nor a probe: {frame:?}"
        );
        remember(
            &mut pending.probes,
            (
                parsed.eth.dst,
                t.dst_ip,
                t.src_ip,
                t.dst_port,
                t.src_port,
                t.seq,
            ),
        );
    }
}
