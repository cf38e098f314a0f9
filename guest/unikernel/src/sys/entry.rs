// SPDX-License-Identifier: GPL-3.0-only
//! The symbols the boot code calls: `rust_start` (once, in long mode, on the boot stack) and
//! `exception_handler` (a CPU exception, which is fatal), and the panic handler. Each reports
//! on the serial console and hands over to safe code or stops the CPU.

use core::fmt::Write;
use core::panic::PanicInfo;

use super::cpu::{Serial, halt_forever};

/// Called by boot.rs with the physical address of `hvm_start_info`.
#[unsafe(no_mangle)]
extern "C" fn rust_start(start_info: u32) -> ! {
    crate::main(u64::from(start_info))
}

/// Called by the exception stubs; never returns.
#[unsafe(no_mangle)]
extern "C" fn exception_handler(vector: u64, error: u64, rip: u64, cr2: u64) -> ! {
    let _ = writeln!(
        Serial,
        "jitsu-unikernel: CPU exception {vector} (error {error:#x}) at rip {rip:#x}, cr2 {cr2:#x}"
    );
    halt_forever()
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let _ = writeln!(Serial, "jitsu-unikernel: panic: {info}");
    halt_forever()
}
