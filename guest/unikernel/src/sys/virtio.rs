// SPDX-License-Identifier: GPL-3.0-only
//! virtio-mmio transports over the register windows the command line names.

use core::ptr::NonNull;

use alloc::vec::Vec;

use jitsu_unikernel::cmdline::{MICROVM_MMIO_BASE, MICROVM_MMIO_SIZE, MmioDevice, microvm_gsi};
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};

/// The highest address boot.rs maps.
const MAPPED_END: u64 = 1 << 32;

/// Why a device window cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WindowError {
    /// Outside the identity-mapped first 4 GiB, or at address 0.
    #[error("window {base:#x}+{size:#x} is outside mapped memory")]
    Unmapped { base: u64, size: u64 },
    /// No virtio device there, or one virtio-drivers does not support.
    #[error("window {base:#x}: {source}")]
    Transport {
        base: u64,
        #[source]
        source: MmioError,
    },
}

/// The transport of the device at `dev` (checks its magic, version and device type).
pub(crate) fn transport(dev: &MmioDevice) -> Result<MmioTransport<'static>, WindowError> {
    let unmapped = WindowError::Unmapped {
        base: dev.base,
        size: dev.size,
    };
    let end = dev
        .base
        .checked_add(dev.size)
        .ok_or(WindowError::Unmapped {
            base: dev.base,
            size: dev.size,
        })?;
    if end > MAPPED_END || !dev.base.is_multiple_of(4) {
        return Err(unmapped);
    }
    let header = NonNull::new(dev.base as usize as *mut VirtIOHeader).ok_or(unmapped)?;
    // SAFETY: the window is in the identity-mapped, uncached MMIO range, aligned, and the
    // command line says a virtio-mmio device is there (the transport checks its magic
    // before using anything else); each window gets one transport, kept for the kernel's life.
    unsafe { MmioTransport::new(header, dev.size as usize) }.map_err(|source| {
        WindowError::Transport {
            base: dev.base,
            source,
        }
    })
}

/// "virt", the first register of every virtio-mmio window.
const MAGIC: u32 = 0x7472_6976;
/// microvm makes at most 24 transports.
const MAX_SLOTS: u64 = 24;

/// The devices in microvm's virtio-mmio window, found by their magic and a non-zero device
/// ID, with the GSI microvm wires each slot to.
pub(crate) fn probe_microvm() -> Vec<MmioDevice> {
    let read = |addr: u64| {
        // SAFETY: microvm's window is identity-mapped and uncached; reading a transport's
        // magic or device ID has no side effect, and QEMU reads an empty slot as 0.
        unsafe { core::ptr::read_volatile(addr as usize as *const u32) }
    };
    let slot = |i: u64| MICROVM_MMIO_BASE + i * MICROVM_MMIO_SIZE;
    let slots = (0..MAX_SLOTS)
        .take_while(|i| read(slot(*i)) == MAGIC)
        .count() as u64;
    (0..slots)
        .filter(|i| read(slot(*i) + 8) != 0)
        .map(|i| MmioDevice {
            base: slot(i),
            size: MICROVM_MMIO_SIZE,
            irq: microvm_gsi(i as u32, slots as u32),
        })
        .collect()
}
