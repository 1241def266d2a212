//! Reading the kernel's table of outstanding blocks: the arrays `ALLOC_KEYS`
//! and `ALLOCS` (see `memtrace_common::AllocKeys`), mapped read-only for the
//! length of one scan. No syscall per entry: a scan reads the keys at memory
//! speed (1.5 slots per block of `--max-blocks`, 8 bytes each) and the blocks
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
use memtrace_common::{ALLOC_BUCKET_SLOTS, ALLOC_KEY_BUSY, AllocBucket, AllocKeys, Allocation};

use crate::kernel::batch::ReadStats;

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

    /// Calls `f(address, block)` for every outstanding block. (`calls` in
    /// the stats: mmap and munmap, and lookups of single buckets.)
    pub fn for_each(&self, mut f: impl FnMut(u64, &Allocation)) -> Result<ReadStats> {
        let start = Instant::now();
        let cpu0 = crate::kernel::batch::thread_cpu();
        let n = self.buckets() as usize;
        let (mut entries, mut calls) = (0, 0);
        let mut live = Vec::new();
        for first in (0..n).step_by(WINDOW_BUCKETS) {
            let len = WINDOW_BUCKETS.min(n - first);
            let keys_map = Mapping::<AllocKeys>::new(self.keys.map(), first, len)
                .context("mapping ALLOC_KEYS")?;
            calls += 2;
            let keys = keys_map.ptr.as_ptr();
            live.clear();
            // The mappings hold `len` entries of their types, and live
            // (keys_map, blocks_map) until the end of this window's iteration:
            // that is what makes each unsafe call below sound.
            // SAFETY: b < len entries of the keys mapping.
            live.extend((0..len).filter(|&b| unsafe { holds_blocks(keys, b) }));
            if live.len() <= SPARSE_BUCKETS {
                for &b in &live {
                    let bucket = self
                        .blocks
                        .get(&((first + b) as u32), 0)
                        .context("reading ALLOCS")?;
                    calls += 1;
                    // SAFETY: b < len entries of the keys mapping.
                    entries += unsafe { visit(keys, b, |i| bucket.blocks[i], &mut f) };
                }
                continue;
            }
            let blocks_map = Mapping::<AllocBucket>::new(self.blocks.map(), first, len)
                .context("mapping ALLOCS")?;
            calls += 2;
            let blocks = blocks_map.ptr.as_ptr();
            for &b in &live {
                // SAFETY: b < len buckets of the blocks mapping, and i is a
                // slot of that bucket (visit passes i < ALLOC_BUCKET_SLOTS).
                let block_of = |i: usize| unsafe {
                    (&raw const (*blocks.add(b)).blocks)
                        .cast::<Allocation>()
                        .add(i)
                        .read_volatile()
                };
                // SAFETY: b < len entries of the keys mapping.
                entries += unsafe { visit(keys, b, block_of, &mut f) };
            }
        }
        Ok(ReadStats {
            entries,
            calls,
            how: "mmap",
            wall: start.elapsed(),
            cpu: crate::kernel::batch::thread_cpu().saturating_sub(cpu0),
        })
    }
}

/// Buckets mapped at a time: 256 KiB of keys, 1 MiB of blocks. The kernel
/// maps every page of a BPF array's mapping at mmap (remap_vmalloc_range),
/// and each counts in memtrace's RSS while mapped: the default table whole
/// is 60 MiB. (A multiple of 64, so that windows start on page boundaries.)
const WINDOW_BUCKETS: usize = 4096;

/// A window with at most this many buckets in use has them read one by one
/// (a syscall each) rather than its 1 MiB of blocks mapped (mapping and
/// faulting in 256 pages costs as much as a hundred or so syscalls).
const SPARSE_BUCKETS: usize = 128;

/// Bucket `b`'s keys, its whole line at once (volatile: the kernel writes
/// them concurrently).
///
/// # Safety
/// `keys` must point to more than `b` readable entries.
unsafe fn bucket_keys(keys: *const AllocKeys, b: usize) -> [u64; ALLOC_BUCKET_SLOTS] {
    // SAFETY: the caller guarantees entry b is readable.
    unsafe { (&raw const (*keys.add(b)).keys).read_volatile() }
}

/// Whether bucket `b` holds a block.
///
/// # Safety
/// As for [`bucket_keys`].
unsafe fn holds_blocks(keys: *const AllocKeys, b: usize) -> bool {
    // SAFETY: the caller's guarantee, passed on.
    unsafe { bucket_keys(keys, b) }
        .iter()
        .any(|&k| k > ALLOC_KEY_BUSY)
}

/// The blocks of bucket `b`: `f(address, block)` for each slot whose key is
/// an address and stayed the same while `block_of(slot)` read its block (a
/// slot retired or retaken meanwhile is left out, as if the scan had passed
/// it a moment later). Returns how many.
///
/// # Safety
/// As for [`bucket_keys`].
unsafe fn visit(
    keys: *const AllocKeys,
    b: usize,
    block_of: impl Fn(usize) -> Allocation,
    f: &mut impl FnMut(u64, &Allocation),
) -> u64 {
    let mut n = 0;
    // SAFETY: the caller's guarantee, passed on (also below).
    for (i, &k) in unsafe { bucket_keys(keys, b) }.iter().enumerate() {
        if k <= ALLOC_KEY_BUSY {
            continue;
        }
        let block = block_of(i);
        // SAFETY: as above.
        if unsafe { bucket_keys(keys, b) }[i] != k {
            continue;
        }
        n += 1;
        f(k, &block);
    }
    n
}

/// A read-only shared mapping of a BPF array's values (BPF_F_MMAPABLE). Not
/// a `memmap2::Mmap`, as the symbolizer uses for files: that hands out a
/// `&[u8]`, which promises the bytes do not change, and the kernel writes
/// these while they are mapped; they are read only through raw pointers.
pub(super) struct Mapping<T> {
    pub(super) ptr: NonNull<T>,
    len: usize,
}

impl<T> Mapping<T> {
    /// Maps entries `first..first + entries` of `map` (`first` times the
    /// entry size must be a multiple of the page size).
    pub(super) fn new(map: &MapData, first: usize, entries: usize) -> Result<Self> {
        let page = page_size();
        let offset = first * size_of::<T>();
        if !offset.is_multiple_of(page) {
            bail!("window at entry {first} is not page aligned");
        }
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
                offset as libc::off_t,
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
    use memtrace_common::ALLOC_KEY_EMPTY;

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
        let mut record = |a, b: &Allocation| seen.push((a, b.size, b.stack_id));
        let mut n = 0;
        for (b, bucket) in blocks.iter().enumerate() {
            // SAFETY: b indexes `keys`, which is as long as `blocks`.
            if unsafe { holds_blocks(keys.as_ptr(), b) } {
                // SAFETY: as above.
                n += unsafe { visit(keys.as_ptr(), b, |i| bucket.blocks[i], &mut record) };
            }
        }
        // SAFETY: `keys` has more than one entry.
        assert!(!unsafe { holds_blocks(keys.as_ptr(), 1) });
        assert_eq!(n, 2);
        assert_eq!(seen, [(0x1000, 16, 7), (0x2000, 32, 8)]);
    }
}
