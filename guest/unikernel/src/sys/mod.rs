// SPDX-License-Identifier: GPL-3.0-only
//! Everything that needs `unsafe`: the boot code, the CPU and its chips, memory the boot
//! loader wrote, the heap and the DMA the virtio driver asks for, the network device's
//! buffers. Each module says what it
//! owns; the rest of the kernel calls safe functions.

pub(crate) mod boot;
pub(crate) mod cpu;
pub(crate) mod entry;
pub(crate) mod heap;
pub(crate) mod mem;
pub(crate) mod net;
pub(crate) mod pvh;
pub(crate) mod virtio;
