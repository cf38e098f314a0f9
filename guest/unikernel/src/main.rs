// SPDX-License-Identifier: GPL-3.0-only
//! jitsu's unikernel: boots with PVH on QEMU microvm, drives virtio-net, and serves HTTP on
//! port 80 with smoltcp. See README.md.
//!
//! `main` runs once, in order: boot information, heap, command line, the network device,
//! the clock's calibration, smoltcp, an ARP request for the gateway, a rehearsal of one
//! connection to itself, what the device received meanwhile (the gateway's answer),
//! listening, the gratuitous ARP, one line on the console;
//! then the loop: poll the device and the sockets, and sleep in `hlt` until a frame or the
//! next TCP timer.

#![no_std]
#![no_main]

extern crate alloc;

#[allow(unsafe_code)]
mod sys;

use alloc::collections::VecDeque;
use alloc::string::String;
use core::fmt::Write;
use core::net::Ipv4Addr;
use core::sync::atomic::{Ordering, fence};

use jitsu_unikernel::arp::{GARP_LEN, arp_request, gratuitous_arp, reply_from};
use jitsu_unikernel::clock::{MIN_CALIBRATION_NS, Sample, TscClock};
use jitsu_unikernel::cmdline::{Config, MmioDevice};
use jitsu_unikernel::pvh::{MemoryRegion, StartInfo, heap_range};
use jitsu_unikernel::server::Server;
use smoltcp::iface::{Config as IfaceConfig, Interface};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};
use virtio_drivers::transport::{DeviceType, Transport};

use sys::cpu::{self, Serial};
use sys::net::Nic;

/// The HTTP port.
const PORT: u16 = 80;
/// How long after listening the listening line waits for the first request to be answered
/// before it is written anyway: formatting it takes about 0.5 ms the first time under TCG,
/// which a client's SYN arriving meanwhile (synjitsu re-sends it 0.3 ms after the gratuitous
/// ARP) would wait for.
const REPORT_WAITS: Duration = Duration::from_millis(20);
/// The longest sleep when the device's interrupt could not be routed: the kernel then polls.
const POLL_WITHOUT_INTERRUPT: Duration = Duration::from_millis(1);

macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(Serial, "jitsu-unikernel: {}", format_args!($($arg)*));
    }};
}

/// Stops the kernel after saying why.
fn fail(why: core::fmt::Arguments<'_>) -> ! {
    say!("fatal: {why}");
    cpu::halt_forever()
}

/// Milliseconds with three decimals, from microseconds.
struct Ms(u64);

impl core::fmt::Display for Ms {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// A MAC as `xx:xx:xx:xx:xx:xx`.
struct Mac([u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The first virtio-net device among `devices`, and its GSI.
fn find_net(devices: &[MmioDevice]) -> Option<(Nic, u32)> {
    devices.iter().find_map(|dev| {
        let transport = sys::virtio::transport(dev).ok()?;
        if transport.device_type() != DeviceType::Network {
            return None;
        }
        match Nic::new(transport) {
            Ok(nic) => Some((nic, dev.irq)),
            Err(e) => {
                say!("virtio-net at {:#x}: {e}", dev.base);
                None
            }
        }
    })
}

/// The local APIC clock read between two TSC readings, the narrowest of three.
fn sample() -> Sample {
    let read = || Sample {
        tsc_before: cpu::rdtsc(),
        ns: cpu::lapic_elapsed_ns(),
        tsc_after: cpu::rdtsc(),
    };
    Sample::narrowest([read(), read(), read()]).expect("three samples")
}

/// The TSC's rate, from `start` to now on the local APIC clock; waits until the interval is
/// long enough to be exact (boot work usually covers it).
fn calibrate(start: Sample) -> TscClock {
    while cpu::lapic_elapsed_ns() < start.ns + MIN_CALIBRATION_NS {
        core::hint::spin_loop();
    }
    let hz = TscClock::rate(start, sample()).unwrap_or_else(|| {
        fail(format_args!(
            "the TSC or the local APIC timer does not count"
        ))
    });
    TscClock::new(cpu::entry_tsc(), hz)
}

/// The kernel, from the boot code's hand-over.
fn main(start_info_paddr: u64) -> ! {
    let tsc_main = cpu::rdtsc();
    cpu::lapic_start();
    let calibration_start = sample();
    cpu::load_idt();

    let info = StartInfo::parse(sys::pvh::start_info(start_info_paddr))
        .unwrap_or_else(|e| fail(format_args!("{e}")));
    let memmap = sys::pvh::memmap(info.memmap_paddr, info.memmap_entries);
    let Some((heap_start, heap_end)) =
        heap_range(MemoryRegion::parse_all(memmap), sys::heap::kernel_end())
    else {
        fail(format_args!("no RAM after the kernel's image"));
    };
    sys::heap::init(heap_start, heap_end);
    let cmdline = core::str::from_utf8(sys::pvh::cmdline(info.cmdline_paddr))
        .unwrap_or_else(|_| fail(format_args!("the command line is not UTF-8")));
    let config = Config::parse(cmdline).unwrap_or_else(|e| fail(format_args!("{e}")));

    let tsc_virtio = cpu::rdtsc();
    let devices = if config.devices.is_empty() {
        sys::virtio::probe_microvm()
    } else {
        config.devices.clone()
    };
    let Some((mut nic, gsi)) = find_net(&devices) else {
        fail(format_args!(
            "no virtio-net device (looked at {devices:x?})"
        ));
    };
    let interrupts = cpu::ioapic_route(gsi, cpu::NET_VECTOR);
    if !interrupts {
        say!("GSI {gsi} is not on an IOAPIC: polling every {POLL_WITHOUT_INTERRUPT}");
    }
    let tsc_smoltcp = cpu::rdtsc();

    let clock = calibrate(calibration_start);
    let mac = config.mac.unwrap_or_else(|| nic.mac());
    let mut iface_config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    iface_config.random_seed = cpu::rdtsc();
    let mut iface = Interface::new(iface_config, &mut nic, clock.instant(cpu::rdtsc()));
    let network = IpCidr::new(config.ip.into(), config.prefix);
    iface.update_ip_addrs(|addrs| {
        // The list holds IFACE_MAX_ADDR_COUNT (2) addresses and is empty.
        let _ = addrs.push(network);
    });
    if let Some(gw) = config.gateway {
        // Cannot fail: the route table is empty.
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
    }
    // The gateway's MAC, asked for now, not when a client off the network first needs it.
    // Its reply is also the first frame the kernel receives: the device's receive path then
    // runs (under TCG: is translated) during boot, not on the first client's SYN. It comes
    // while the kernel rehearses (synjitsu, standing in for the guest, passes it on) and is
    // taken after.
    let gateway = config
        .gateway
        .filter(|gw| network.contains_addr(&(*gw).into()));
    if let Some(gw) = gateway {
        nic.send_raw(GARP_LEN, |frame| arp_request(frame, (mac, config.ip), gw));
    }
    let mut server = Server::new(PORT);
    // One connection to itself first, so that the first client's runs warm (server.rs).
    let tsc_rehearsal = cpu::rdtsc();
    nic.set_loopback(true);
    let rehearsal = server.rehearse(clock.instant(tsc_rehearsal), &mut iface, &mut nic);
    nic.set_loopback(false);
    if let Err(e) = rehearsal {
        say!("rehearsal: {e} (the first connection runs cold)");
    }
    // What the device received meanwhile: the gateway's reply, if it came.
    let mut gateway_mac = None;
    server.poll_seeing(
        clock.instant(cpu::rdtsc()),
        &mut iface,
        &mut nic,
        &mut |frame| {
            if let Some(mac) = gateway.and_then(|gw| reply_from(frame, gw)) {
                gateway_mac = Some(mac);
            }
        },
    );
    server.listen();
    let tsc_listening = cpu::rdtsc();
    let listening = clock.micros_since_entry(tsc_listening);
    server.set_listening_micros(listening);
    nic.send_raw(GARP_LEN, |frame| gratuitous_arp(frame, mac, config.ip));

    let us = |from: u64, to: u64| clock.micros_since_entry(to) - clock.micros_since_entry(from);
    let report = Listening {
        ip: config.ip,
        mac,
        after: listening,
        // Under TCG the TSC counts from 0 when the virtual machine starts running.
        firmware: clock.micros(cpu::entry_tsc()),
        to_main: us(cpu::entry_tsc(), tsc_main),
        virtio: us(tsc_virtio, tsc_smoltcp),
        smoltcp: us(tsc_smoltcp, tsc_rehearsal),
        rehearsal: us(tsc_rehearsal, tsc_listening),
        tsc_mhz: clock.hz() / 1_000_000,
        gateway: gateway.map(|gw| (gw, gateway_mac)),
    };
    run(
        &clock,
        &mut iface,
        &mut nic,
        &mut server,
        interrupts,
        report,
    )
}

/// The line the kernel prints once it listens: where, and how long each stage took
/// (microseconds).
struct Listening {
    ip: Ipv4Addr,
    mac: [u8; 6],
    after: u64,
    firmware: u64,
    to_main: u64,
    virtio: u64,
    smoltcp: u64,
    rehearsal: u64,
    tsc_mhz: u64,
    /// The gateway asked for as it booted, and its MAC if its reply came before listening.
    gateway: Option<(Ipv4Addr, Option<[u8; 6]>)>,
}

impl core::fmt::Display for Listening {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "listening on {}:{PORT} mac {} after {} ms (firmware {} ms before entry; entry to main \
             {} ms, virtio {} ms, smoltcp {} ms, rehearsal {} ms; TSC {} MHz)",
            self.ip,
            Mac(self.mac),
            Ms(self.after),
            Ms(self.firmware),
            Ms(self.to_main),
            Ms(self.virtio),
            Ms(self.smoltcp),
            Ms(self.rehearsal),
            self.tsc_mhz,
        )?;
        match self.gateway {
            Some((ip, Some(mac))) => write!(f, "; gateway {ip} at {}", Mac(mac)),
            Some((ip, None)) => write!(f, "; gateway {ip} not heard from"),
            None => Ok(()),
        }
    }
}

/// Console output written in idle moments, a few bytes at a time: QEMU's UART costs an exit
/// per byte (over a millisecond for the first line, formatting included), which must not hold
/// up the first SYN after the gratuitous ARP. At most [`Console::MAX`] bytes wait; more are
/// dropped.
#[derive(Default)]
struct Console {
    queue: VecDeque<u8>,
}

impl Console {
    const MAX: usize = 4096;
    const CHUNK: usize = 32;

    /// Queues one line.
    fn line(&mut self, args: core::fmt::Arguments<'_>) {
        let mut text = String::new();
        let _ = writeln!(text, "jitsu-unikernel: {args}");
        if self.queue.len() + text.len() <= Self::MAX {
            self.queue.extend(text.bytes());
        }
    }

    /// Writes the next few bytes; true if more wait.
    fn write_some(&mut self) -> bool {
        let n = self.queue.len().min(Self::CHUNK);
        let mut chunk = [0u8; Self::CHUNK];
        for (slot, byte) in chunk.iter_mut().zip(self.queue.drain(..n)) {
            *slot = byte;
        }
        cpu::serial_write(&chunk[..n]);
        !self.queue.is_empty()
    }
}

/// The event loop: never returns.
fn run(
    clock: &TscClock,
    iface: &mut Interface,
    nic: &mut Nic,
    server: &mut Server,
    interrupts: bool,
    report: Listening,
) -> ! {
    let report_at = Instant::from_micros(report.after as i64) + REPORT_WAITS;
    // A gateway that had not answered before listening: its answer is still looked for, and
    // said on a line of its own when it comes.
    let mut gateway_late = match report.gateway {
        Some((ip, None)) => Some(ip),
        _ => None,
    };
    let mut report = Some(report);
    let mut console = Console::default();
    let mut reported_first = false;
    loop {
        // Acknowledge first, drain after: a frame arriving in between raises a new edge.
        nic.ack_interrupt();
        let now = clock.instant(cpu::rdtsc());
        let mut heard = None;
        let progress = server.poll_seeing(now, iface, nic, &mut |frame| {
            if let Some(mac) = gateway_late.and_then(|gw| reply_from(frame, gw)) {
                heard = Some(mac);
            }
        });
        if let (Some(ip), Some(mac)) = (gateway_late, heard) {
            gateway_late = None;
            console.line(format_args!(
                "gateway {ip} at {} (after listening)",
                Mac(mac)
            ));
        }
        if !reported_first && let Some(at) = server.first_request() {
            reported_first = true;
            if let Some(r) = report.take() {
                console.line(format_args!("{r}"));
            }
            console.line(format_args!(
                "first request answered {} ms after entry",
                Ms(at.total_micros() as u64)
            ));
        }
        if progress {
            continue;
        }
        // The last look at the receive ring before sleeping. The driver stored `used_event`
        // (interrupt me after this entry) when it took the last frame; the device stores the
        // ring's index, then reads `used_event` to decide on an interrupt. Without a full
        // fence the CPU may read the index before its own store is visible: both sides miss
        // the new frame, and it waits for the next one to wake the CPU (a ping answered one
        // interval late, about 1 in 20 boots).
        fence(Ordering::SeqCst);
        if nic.can_recv() {
            continue;
        }
        // Idle: the console's turn, a chunk at a time.
        if now >= report_at
            && let Some(r) = report.take()
        {
            console.line(format_args!("{r}"));
        }
        if console.write_some() {
            continue;
        }
        let mut delay = iface.poll_delay(now, server.sockets());
        if report.is_some() {
            let wait = report_at - now;
            delay = Some(delay.map_or(wait, |d| d.min(wait)));
        }
        if !interrupts {
            delay = Some(delay.map_or(POLL_WITHOUT_INTERRUPT, |d| d.min(POLL_WITHOUT_INTERRUPT)));
        }
        if delay == Some(Duration::ZERO) {
            continue;
        }
        cpu::lapic_oneshot(delay.map(|d| d.total_micros().saturating_mul(1000)));
        cpu::wait_for_interrupt();
    }
}
