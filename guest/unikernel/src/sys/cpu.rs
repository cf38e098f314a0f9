// SPDX-License-Identifier: GPL-3.0-only
//! The CPU and the chips around it, as microvm provides them: the TSC, the COM1 UART, the
//! IDT, the local APIC (its timer wakes the idle loop) and the IOAPIC (routes virtio-mmio
//! interrupts). Every privileged instruction and fixed-address MMIO access of the kernel is
//! here; what to do with them is decided in `main.rs`.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::ptr::{read_volatile, write_volatile};

unsafe extern "C" {
    /// The TSC at the first instruction of `pvh_start` (boot.rs).
    #[link_name = "entry_tsc"]
    static ENTRY_TSC: u64;
    /// 32 exception stubs, 16 bytes apart (boot.rs).
    #[link_name = "exception_stubs"]
    static EXCEPTION_STUBS: [u8; 32 * 16];
    fn irq_stub();
    fn spurious_stub();
    fn idle_wait();
}

/// The TSC now.
pub(crate) fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads a counter; CR4.TSD is clear, so it is allowed in ring 0 and has no
    // side effect.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The TSC at the kernel's first instruction.
pub(crate) fn entry_tsc() -> u64 {
    // SAFETY: written once by pvh_start before any Rust code runs, never again.
    unsafe { read_volatile(&raw const ENTRY_TSC) }
}

fn outb(port: u16, value: u8) {
    // SAFETY: only called with the UART's ports, which have no effect on memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: only called with the UART's ports; reading the line status has no side effect.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack)) };
    value
}

/// COM1, as microvm's `isa-serial` (QEMU's 16550 needs no set-up to send).
#[derive(Debug)]
pub(crate) struct Serial;

const COM1: u16 = 0x3f8;

/// Writes bytes to COM1, each once the transmit holding register is empty (QEMU's is unless
/// its output backs up).
pub(crate) fn serial_write(bytes: &[u8]) {
    for &b in bytes {
        while inb(COM1 + 5) & 0x20 == 0 {
            core::hint::spin_loop();
        }
        outb(COM1, b);
    }
}

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        serial_write(s.as_bytes());
        Ok(())
    }
}

/// Stops this CPU for good.
pub(crate) fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt stops the CPU until an NMI, after which it stops again.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Vector of the virtio-net interrupt.
pub(crate) const NET_VECTOR: u8 = 0x30;
/// Vector of the local APIC timer.
pub(crate) const TIMER_VECTOR: u8 = 0x31;
const SPURIOUS_VECTOR: u8 = 0xff;

/// The interrupt descriptor table: 256 gates of 16 bytes.
#[repr(C, align(16))]
struct Idt(UnsafeCell<[u64; 512]>);

// SAFETY: written once by load_idt, on the only CPU, before interrupts are ever enabled;
// afterwards only the CPU reads it.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([0; 512]));

fn idt_gate(handler: u64) -> (u64, u64) {
    // Interrupt gate (IF cleared on entry), present, ring 0, code selector 0x08.
    let low = (handler & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((handler >> 16) & 0xffff) << 48;
    (low, handler >> 32)
}

/// Fills and loads the IDT: exceptions to `exception_handler`, every other vector to a stub
/// that acknowledges the local APIC (the main loop does the work once `hlt` returns).
pub(crate) fn load_idt() {
    let stubs = (&raw const EXCEPTION_STUBS) as u64;
    let irq = irq_stub as *const () as u64;
    let spurious = spurious_stub as *const () as u64;
    // SAFETY: runs once, on the only CPU, with interrupts off: nothing else reads the IDT
    // while it is written.
    let idt = unsafe { &mut *IDT.0.get() };
    for vector in 0..256 {
        let handler = match vector {
            0..32 => stubs + 16 * vector as u64,
            v if v == usize::from(SPURIOUS_VECTOR) => spurious,
            _ => irq,
        };
        let (low, high) = idt_gate(handler);
        idt[2 * vector] = low;
        idt[2 * vector + 1] = high;
    }
    let pointer: [u16; 5] = {
        let base = idt.as_ptr() as u64;
        [
            (256 * 16 - 1) as u16,
            base as u16,
            (base >> 16) as u16,
            (base >> 32) as u16,
            (base >> 48) as u16,
        ]
    };
    // SAFETY: the IDT is a static that lives forever and holds valid gates.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack)) };
}

const LAPIC: usize = 0xfee0_0000;
const LAPIC_TPR: usize = 0x80;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_TIMER_INITIAL: usize = 0x380;
const LAPIC_TIMER_CURRENT: usize = 0x390;
const LAPIC_TIMER_DIVIDE: usize = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;

fn lapic_write(reg: usize, value: u32) {
    // SAFETY: the local APIC's registers are identity-mapped (uncached) by boot.rs, and
    // `reg` is one of the register offsets above.
    unsafe { write_volatile((LAPIC + reg) as *mut u32, value) }
}

fn lapic_read(reg: usize) -> u32 {
    // SAFETY: as in lapic_write.
    unsafe { read_volatile((LAPIC + reg) as *const u32) }
}

/// Enables the local APIC and starts its timer counting down from 2^32 - 1, masked, divide
/// by 1: QEMU counts it at 1 GHz of its virtual clock (the host's monotonic clock under
/// TCG), so [`lapic_elapsed_ns`] is a clock to calibrate the TSC against.
pub(crate) fn lapic_start() {
    lapic_write(LAPIC_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_TIMER_DIVIDE, 0b1011);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_TIMER_INITIAL, u32::MAX);
}

/// Nanoseconds since [`lapic_start`], while under about 4 s.
pub(crate) fn lapic_elapsed_ns() -> u64 {
    u64::from(u32::MAX - lapic_read(LAPIC_TIMER_CURRENT))
}

/// Arms the local APIC timer to interrupt once after `ns` (at most about 4.29 s), or stops it
/// for `None`.
pub(crate) fn lapic_oneshot(ns: Option<u64>) {
    match ns {
        Some(ns) => {
            lapic_write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR));
            lapic_write(
                LAPIC_TIMER_INITIAL,
                u32::try_from(ns).unwrap_or(u32::MAX).max(1),
            );
        }
        None => lapic_write(LAPIC_TIMER_INITIAL, 0),
    }
}

/// microvm's IOAPICs: GSIs 0..24 on the first, 24..48 on the second (`ioapic2`).
const IOAPICS: [(usize, u32); 2] = [(0xfec0_0000, 0), (0xfec1_0000, 24)];

/// Routes `gsi` to `vector` on this CPU (local APIC 0), edge-triggered, active high: a
/// virtio-mmio device raises its line when it has used buffers and holds it until the driver
/// acknowledges, so every acknowledgement re-arms the next edge.
pub(crate) fn ioapic_route(gsi: u32, vector: u8) -> bool {
    let Some(&(base, first)) = IOAPICS.iter().rev().find(|(_, first)| gsi >= *first) else {
        return false;
    };
    let pin = gsi - first;
    if pin >= 24 {
        return false;
    }
    let write = |reg: u32, value: u32| {
        // SAFETY: IOREGSEL at +0 and IOWIN at +0x10 of an IOAPIC identity-mapped (uncached)
        // by boot.rs; the register index is a redirection entry of a pin it has.
        unsafe {
            write_volatile(base as *mut u32, reg);
            write_volatile((base + 0x10) as *mut u32, value);
        }
    };
    write(0x11 + 2 * pin, 0);
    write(0x10 + 2 * pin, u32::from(vector));
    true
}

/// Sleeps until the next interrupt (a packet, the timer), with interrupts enabled only
/// while asleep.
pub(crate) fn wait_for_interrupt() {
    // SAFETY: idle_wait (boot.rs) enables interrupts for one `hlt` and disables them again;
    // every vector has a gate (load_idt ran first).
    unsafe { idle_wait() }
}
