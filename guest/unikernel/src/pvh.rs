// SPDX-License-Identifier: GPL-3.0-only
//! The PVH boot information QEMU hands the kernel (`struct hvm_start_info` and its memory
//! map, as Xen's `arch-x86/hvm/start_info.h` lays them out): parsed from bytes. Reading those
//! bytes out of guest memory is `sys::pvh`'s job.

use thiserror::Error;

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Bytes of `hvm_start_info` (version 1, which added the memory map).
pub const START_INFO_LEN: usize = 56;
/// Bytes of one `hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_LEN: usize = 24;
/// The memory map's type for usable RAM.
pub const MEMMAP_RAM: u32 = 1;

/// What the kernel uses of `hvm_start_info`. Addresses are physical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartInfo {
    /// The structure's version (1 has the memory map).
    pub version: u32,
    /// The NUL-terminated command line, or 0 for none.
    pub cmdline_paddr: u64,
    /// The memory map, or 0 for none (version 0).
    pub memmap_paddr: u64,
    /// Entries in the memory map.
    pub memmap_entries: u32,
}

/// One region of the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type: 1 is RAM.
    pub kind: u32,
}

/// Why the boot information could not be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PvhError {
    /// Not a `hvm_start_info`: the loader is not PVH, or passed something else.
    #[error("bad start_info magic {0:#x}")]
    BadMagic(u32),
    /// Fewer bytes than the structure.
    #[error("start_info is {0} bytes, short of {START_INFO_LEN}")]
    Short(usize),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl StartInfo {
    /// Parses `hvm_start_info`. A version 0 structure has no memory map.
    pub fn parse(b: &[u8]) -> Result<StartInfo, PvhError> {
        if b.len() < START_INFO_LEN {
            return Err(PvhError::Short(b.len()));
        }
        let magic = u32_at(b, 0);
        if magic != START_INFO_MAGIC {
            return Err(PvhError::BadMagic(magic));
        }
        let version = u32_at(b, 4);
        let (memmap_paddr, memmap_entries) = if version >= 1 {
            (u64_at(b, 40), u32_at(b, 48))
        } else {
            (0, 0)
        };
        Ok(StartInfo {
            version,
            cmdline_paddr: u64_at(b, 24),
            memmap_paddr,
            memmap_entries,
        })
    }
}

impl MemoryRegion {
    /// Parses the memory map's entries; a trailing partial entry is ignored.
    pub fn parse_all(b: &[u8]) -> impl Iterator<Item = MemoryRegion> + '_ {
        b.chunks_exact(MEMMAP_ENTRY_LEN).map(|e| MemoryRegion {
            addr: u64_at(e, 0),
            size: u64_at(e, 8),
            kind: u32_at(e, 16),
        })
    }

    /// The end (exclusive).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// The heap: from `above` (the kernel's end, page-aligned up) to the end of the RAM region
/// holding it, or `None` if no RAM region does.
pub fn heap_range(regions: impl Iterator<Item = MemoryRegion>, above: u64) -> Option<(u64, u64)> {
    let start = above.checked_add(0xfff)? & !0xfff;
    regions
        .filter(|r| r.kind == MEMMAP_RAM && r.addr <= start && start < r.end())
        .map(|r| (start, r.end()))
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_info_v1() -> [u8; START_INFO_LEN] {
        let mut b = [0u8; START_INFO_LEN];
        b[0..4].copy_from_slice(&START_INFO_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&0x2_0000u64.to_le_bytes());
        b[40..48].copy_from_slice(&0x6_0000u64.to_le_bytes());
        b[48..52].copy_from_slice(&3u32.to_le_bytes());
        b
    }

    #[test]
    fn a_version_1_start_info_gives_command_line_and_memory_map() {
        assert_eq!(
            StartInfo::parse(&start_info_v1()),
            Ok(StartInfo {
                version: 1,
                cmdline_paddr: 0x2_0000,
                memmap_paddr: 0x6_0000,
                memmap_entries: 3
            })
        );
    }

    #[test]
    fn a_version_0_start_info_has_no_memory_map() {
        let mut b = start_info_v1();
        b[4..8].copy_from_slice(&0u32.to_le_bytes());
        let info = StartInfo::parse(&b).unwrap();
        assert_eq!((info.memmap_paddr, info.memmap_entries), (0, 0));
    }

    #[test]
    fn anything_but_start_info_is_refused() {
        let mut b = start_info_v1();
        b[0] ^= 1;
        assert_eq!(
            StartInfo::parse(&b),
            Err(PvhError::BadMagic(START_INFO_MAGIC ^ 1))
        );
        assert_eq!(StartInfo::parse(&b[..40]), Err(PvhError::Short(40)));
    }

    fn entry(addr: u64, size: u64, kind: u32) -> [u8; MEMMAP_ENTRY_LEN] {
        let mut e = [0u8; MEMMAP_ENTRY_LEN];
        e[0..8].copy_from_slice(&addr.to_le_bytes());
        e[8..16].copy_from_slice(&size.to_le_bytes());
        e[16..20].copy_from_slice(&kind.to_le_bytes());
        e
    }

    #[test]
    fn the_heap_is_the_rest_of_the_ram_region_holding_the_kernel() {
        let mut map = [0u8; 3 * MEMMAP_ENTRY_LEN];
        map[0..24].copy_from_slice(&entry(0, 0x9fc00, 1));
        map[24..48].copy_from_slice(&entry(0xf0000, 0x10000, 2));
        map[48..72].copy_from_slice(&entry(0x10_0000, 0x7f0_0000, 1));
        let regions = || MemoryRegion::parse_all(&map);
        assert_eq!(regions().count(), 3);
        assert_eq!(
            heap_range(regions(), 0x18_0123),
            Some((0x18_1000, 0x800_0000))
        );
        assert_eq!(heap_range(regions(), 0x900_0000), None);
    }
}
