// SPDX-License-Identifier: GPL-3.0-only
//! Reads what the PVH loader left in guest memory: `hvm_start_info`, the command line and the
//! memory map. Parsing is the library's `pvh` module.

use jitsu_unikernel::pvh::{MEMMAP_ENTRY_LEN, START_INFO_LEN};

/// The longest command line read (QEMU's limit for x86 is 64 KiB; a unikernel's is short).
const MAX_CMDLINE: usize = 4096;
/// The most memory map entries read.
const MAX_MEMMAP: usize = 128;

fn bytes(paddr: u64, len: usize) -> &'static [u8] {
    // SAFETY: the first 4 GiB are identity-mapped and nothing in the kernel writes the
    // loader's structures; callers pass addresses the loader gave (below 4 GiB on microvm).
    unsafe { core::slice::from_raw_parts(paddr as usize as *const u8, len) }
}

/// The `hvm_start_info` bytes at `paddr`.
pub(crate) fn start_info(paddr: u64) -> &'static [u8] {
    bytes(paddr, START_INFO_LEN)
}

/// The NUL-terminated command line at `paddr` (empty for 0), up to 4 KiB.
pub(crate) fn cmdline(paddr: u64) -> &'static [u8] {
    if paddr == 0 {
        return &[];
    }
    let mut len = 0;
    while len < MAX_CMDLINE {
        // SAFETY: as in `bytes`; the loader NUL-terminates the line, and the read stops at
        // the NUL or at 4 KiB.
        if unsafe { core::ptr::read((paddr as usize + len) as *const u8) } == 0 {
            break;
        }
        len += 1;
    }
    bytes(paddr, len)
}

/// The memory map's bytes (`entries` entries at `paddr`, at most 128).
pub(crate) fn memmap(paddr: u64, entries: u32) -> &'static [u8] {
    if paddr == 0 {
        return &[];
    }
    let n = (entries as usize).min(MAX_MEMMAP);
    bytes(paddr, n * MEMMAP_ENTRY_LEN)
}
