//! Reading the kernel's table of outstanding blocks: the arrays `ALLOC_KEYS`
//! and `ALLOCS` (see `memtrace_common::AllocKeys`), mapped read-only for the
//! length of one scan. No syscall per entry: a scan reads the keys at memory
//! speed (1.4 slots per block of `--max-blocks`, 8 bytes each) and the blocks
//! only of the slots in use.
//!
//! The BPF side writes while a scan reads. It writes a block before its key
//! and frees a slot by clearing the key, so a slot is read as key, block, key
//! again: a slot whose key changed in between was retired or taken during the
//! scan, and is left out as if the scan had passed it a moment later.
use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, IterableMap, MapData};
use memtrace_common::{ALLOC_KEY_BUSY, AllocBucket, AllocKeys, Allocation};

use crate::batch::ReadStats;

/// The block table's two maps.
pub struct BlockTable {
    keys: Array<MapData, AllocKeys>,
    blocks: Array<MapData, AllocBucket>,
}

impl BlockTable {
    pub fn new(
        keys: Array<MapData, AllocKeys>,
        blocks: Array<MapData, AllocBucket>,
    ) -> Result<Self> {
        if keys.len() != blocks.len() {
            bail!(
                "ALLOC_KEYS has {} buckets but ALLOCS {}",
                keys.len(),
                blocks.len()
            );
        }
        Ok(BlockTable { keys, blocks })
    }

    /// Buckets of the table.
    pub fn buckets(&self) -> u32 {
        self.keys.len()
    }

    /// Calls `f(address, block)` for every outstanding block.
    pub fn for_each(&self, mut f: impl FnMut(u64, &Allocation)) -> Result<ReadStats> {
        let start = Instant::now();
        let cpu0 = crate::batch::thread_cpu();
        let n = self.buckets() as usize;
        let keys = Mapping::<AllocKeys>::new(self.keys.map(), n).context("mapping ALLOC_KEYS")?;
        let blocks = Mapping::<AllocBucket>::new(self.blocks.map(), n).context("mapping ALLOCS")?;
        // SAFETY: both mappings hold `n` entries of their types, and outlive the scan.
        let entries = unsafe { scan(keys.ptr.as_ptr(), blocks.ptr.as_ptr(), n, &mut f) };
        Ok(ReadStats {
            entries,
            calls: 0,
            how: "mmap",
            wall: start.elapsed(),
            cpu: crate::batch::thread_cpu().saturating_sub(cpu0),
        })
    }
}

/// The live slots of `n` buckets: `f(address, block)` for each slot whose key
/// is an address, and stayed the same while its block was read.
///
/// # Safety
/// `keys` and `blocks` must point to `n` readable entries each.
unsafe fn scan(
    keys: *const AllocKeys,
    blocks: *const AllocBucket,
    n: usize,
    f: &mut impl FnMut(u64, &Allocation),
) -> u64 {
    let mut live = 0;
    for b in 0..n {
        // SAFETY: b < n (the caller's promise covers the rest). Volatile: the
        // kernel writes these words concurrently.
        let bucket_keys = unsafe { &raw const (*keys.add(b)).keys };
        for i in 0..memtrace_common::ALLOC_BUCKET_SLOTS {
            let key = unsafe { bucket_keys.cast::<u64>().add(i) };
            let k = unsafe { key.read_volatile() };
            if k <= ALLOC_KEY_BUSY {
                continue;
            }
            let block = unsafe {
                (&raw const (*blocks.add(b)).blocks)
                    .cast::<Allocation>()
                    .add(i)
                    .read_volatile()
            };
            if unsafe { key.read_volatile() } != k {
                continue;
            }
            live += 1;
            f(k, &block);
        }
    }
    live
}

/// A read-only shared mapping of a BPF array's values (BPF_F_MMAPABLE).
struct Mapping<T> {
    ptr: NonNull<T>,
    len: usize,
}

impl<T> Mapping<T> {
    fn new(map: &MapData, entries: usize) -> Result<Self> {
        let page = page_size();
        let len = (entries * size_of::<T>()).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh mapping, checked below; the kernel bounds it by the map's size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of a BPF array");
        }
        let ptr = NonNull::new(p.cast::<T>()).context("mmap returned NULL")?;
        Ok(Mapping { ptr, len })
    }
}

impl<T> Drop for Mapping<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

#[cfg(test)]
mod tests {
    use memtrace_common::{ALLOC_BUCKET_SLOTS, ALLOC_KEY_EMPTY};

    use super::*;

    fn block(size: u64, stack_id: u64) -> Allocation {
        Allocation {
            size,
            stack_id,
            timestamp_ns: 1000 + size,
            epoch: 0,
            birth_offset: 0,
        }
    }

    #[test]
    fn scan_reads_the_slots_that_hold_addresses() {
        let mut keys = [AllocKeys::default(); 3];
        let mut blocks = [AllocBucket::default(); 3];
        keys[0].keys[0] = 0x1000;
        blocks[0].blocks[0] = block(16, 7);
        // A slot being written (busy) and an empty one are not blocks.
        keys[0].keys[1] = ALLOC_KEY_BUSY;
        blocks[0].blocks[1] = block(99, 9);
        keys[1].keys[2] = ALLOC_KEY_EMPTY;
        blocks[1].blocks[2] = block(98, 9);
        keys[2].keys[ALLOC_BUCKET_SLOTS - 1] = 0x2000;
        blocks[2].blocks[ALLOC_BUCKET_SLOTS - 1] = block(32, 8);
        let mut seen = Vec::new();
        let n = unsafe {
            scan(
                keys.as_ptr(),
                blocks.as_ptr(),
                3,
                &mut |a, b: &Allocation| seen.push((a, b.size, b.stack_id)),
            )
        };
        assert_eq!(n, 2);
        assert_eq!(seen, [(0x1000, 16, 7), (0x2000, 32, 8)]);
    }
}
