// SPDX-License-Identifier: GPL-3.0-only
//! The heap (a linked-list allocator over the RAM after the kernel's image) and the virtio
//! driver's DMA: physical addresses are virtual ones, since all RAM is identity-mapped and
//! QEMU's devices see guest-physical memory directly.

use core::alloc::Layout;
use core::ptr::NonNull;

use linked_list_allocator::LockedHeap;
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

unsafe extern "C" {
    /// The end of the kernel's image, bss included (link.ld).
    #[link_name = "__kernel_end"]
    static KERNEL_END: u8;
}

/// The first byte after the kernel's image.
pub(crate) fn kernel_end() -> u64 {
    (&raw const KERNEL_END) as u64
}

/// Hands `start..end` to the allocator. Called once, before anything allocates.
pub(crate) fn init(start: u64, end: u64) {
    // SAFETY: the range is RAM from the memory map, above the kernel's image and below
    // 4 GiB (identity-mapped); nothing else uses it, and this runs once.
    unsafe {
        HEAP.lock()
            .init(start as usize as *mut u8, (end - start) as usize)
    };
}

/// virtio-drivers' view of memory: identity-mapped, no IOMMU.
#[derive(Debug)]
pub(crate) struct IdentityHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

// SAFETY: dma_alloc returns zeroed, page-aligned memory from the heap, owned by the caller
// until dma_dealloc; physical and virtual addresses are the same (identity mapping).
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = dma_layout(pages) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a non-zero size (pages >= 1 for every virtqueue).
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        match NonNull::new(p) {
            Some(p) => (p.as_ptr() as u64, p),
            // virtio-drivers reads a zero physical address as a failed allocation.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = dma_layout(pages) else {
            return -1;
        };
        // SAFETY: the caller passes what dma_alloc returned for the same number of pages.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).expect("virtio-mmio windows are not at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
