//! The outstanding-block table (`ALLOC_KEYS`/`ALLOCS`): address → block.

use crate::atomic::cas;
use crate::counters::count;
use crate::globals::table_buckets;
use crate::maps::{ALLOC_KEYS, ALLOCS};
use crate::sites::site_sub;
use core::ptr::read_volatile;
use core::ptr::write_volatile;
use memtrace_common::{
    ALLOC_BUCKET_SLOTS, ALLOC_KEY_BUSY, ALLOC_KEY_EMPTY, AllocBucket, AllocKeys, Allocation,
    Counter, alloc_bucket_choices,
};

/// A slot of the block table: its key and its block.
#[derive(Clone, Copy)]
pub(crate) struct Slot {
    pub(crate) key: *mut u64,
    pub(crate) block: *mut Allocation,
}

/// A bucket of the table: its keys and its blocks.
#[derive(Clone, Copy)]
struct Bucket {
    keys: *mut AllocKeys,
    blocks: *mut AllocBucket,
}

impl Bucket {
    /// Bucket `b`, None past the table's end.
    #[inline(always)]
    fn get(b: u32) -> Option<Bucket> {
        Some(Bucket {
            keys: ALLOC_KEYS.get_ptr_mut(b)?,
            blocks: ALLOCS.get_ptr_mut(b)?,
        })
    }

    /// The key of slot `i` (< ALLOC_BUCKET_SLOTS).
    #[inline(always)]
    fn key(self, i: usize) -> *mut u64 {
        // SAFETY: `keys` points to a live ALLOC_KEYS element and `i` < ALLOC_BUCKET_SLOTS, so
        // the offset stays inside its array.
        unsafe { (&raw mut (*self.keys).keys).cast::<u64>().add(i) }
    }

    /// Slot `i` (< ALLOC_BUCKET_SLOTS).
    #[inline(always)]
    fn slot(self, i: usize) -> Slot {
        Slot {
            key: self.key(i),
            // SAFETY: `blocks` points to a live ALLOCS element and `i` < ALLOC_BUCKET_SLOTS, so
            // the offset stays inside its array.
            block: unsafe { (&raw mut (*self.blocks).blocks).cast::<Allocation>().add(i) },
        }
    }
}

/// Looks `addr` up in bucket `b`: the slot holding it, and how many slots
/// are empty.
#[inline(always)]
fn scan_bucket(b: u32, addr: u64) -> (Option<Slot>, u32) {
    let found = scan_bucket_keys(b, addr);
    let (i, empty) = ((found & 0xff) as usize, (found >> 8) as u32);
    match Bucket::get(b) {
        Some(bucket) if i < ALLOC_BUCKET_SLOTS => (Some(bucket.slot(i)), empty),
        _ => (None, empty),
    }
}

/// `scan_bucket` as a global function, which the verifier checks once
/// rather than once per state of its callers (a loop over the slots with
/// an exit in each): the slot holding `addr` (ALLOC_BUCKET_SLOTS if none)
/// in the low byte, the count of empty slots before it above.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn scan_bucket_keys(b: u32, addr: u64) -> i64 {
    let Some(bucket) = Bucket::get(b) else {
        return ALLOC_BUCKET_SLOTS as i64;
    };
    let mut empty = 0;
    let mut i = 0;
    while i < ALLOC_BUCKET_SLOTS {
        // SAFETY: a key inside a live ALLOC_KEYS element (`i` < ALLOC_BUCKET_SLOTS), aligned.
        let k = unsafe { read_volatile(bucket.key(i)) };
        if k == addr {
            break;
        }
        empty += (k == ALLOC_KEY_EMPTY) as i64;
        i += 1;
    }
    i as i64 | empty << 8
}

/// Claims an empty slot of bucket `b` (marked busy until its block is written).
#[inline(always)]
fn claim_in(b: u32) -> Option<Slot> {
    let i = claim_slot(b) as usize;
    let bucket = Bucket::get(b)?;
    (i < ALLOC_BUCKET_SLOTS).then(|| bucket.slot(i))
}

/// `claim_in` as a global function (see `scan_bucket_keys`): the slot
/// claimed, ALLOC_BUCKET_SLOTS if none.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn claim_slot(b: u32) -> i64 {
    let Some(bucket) = Bucket::get(b) else {
        return ALLOC_BUCKET_SLOTS as i64;
    };
    let mut i = 0;
    while i < ALLOC_BUCKET_SLOTS {
        let key = bucket.key(i);
        // SAFETY: a key inside a live ALLOC_KEYS element (`i` < ALLOC_BUCKET_SLOTS), aligned.
        if unsafe { read_volatile(key) } == ALLOC_KEY_EMPTY
            && cas(key, ALLOC_KEY_EMPTY, ALLOC_KEY_BUSY)
        {
            break;
        }
        i += 1;
    }
    i as i64
}

/// Where `addr` stands in the table: its two buckets, how many empty
/// slots each has, and the slot holding it (the second bucket is not
/// scanned once the first holds it: its count stays 0).
struct Lookup {
    held: Option<Slot>,
    buckets: (u32, u32),
    empty: (u32, u32),
}

/// None for an address no block can have (a key's reserved values).
#[inline(always)]
fn lookup(addr: u64) -> Option<Lookup> {
    if addr <= ALLOC_KEY_BUSY {
        return None;
    }
    let (b1, b2) = alloc_bucket_choices(addr, table_buckets());
    let (mut held, empty1) = scan_bucket(b1, addr);
    let mut empty2 = 0;
    if held.is_none() && b2 != b1 {
        (held, empty2) = scan_bucket(b2, addr);
    }
    Some(Lookup {
        held,
        buckets: (b1, b2),
        empty: (empty1, empty2),
    })
}

/// The slot of the outstanding block at `addr`, if memtrace holds one.
#[inline(always)]
fn find_block(addr: u64) -> Option<Slot> {
    lookup(addr)?.held
}

/// Whether memtrace holds a block at `addr`.
#[inline(always)]
pub(crate) fn block_known(addr: u64) -> bool {
    held_block(addr) != 0
}

/// `block_known`, as a global function: the verifier checks the bucket
/// scans once, not at every state its callers reach it in.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn held_block(addr: u64) -> i64 {
    find_block(addr).is_some() as i64
}

/// Takes the block in `slot` (at `addr`) out of the table and its
/// aggregate. Of two CPUs retiring one block (a double free), one does.
#[inline(always)]
fn retire_slot(slot: Slot, addr: u64, a: &Allocation) -> bool {
    if cas(slot.key, addr, ALLOC_KEY_EMPTY) {
        site_sub(a);
        return true;
    }
    false
}

/// Enters block `a` at `addr` into the table, in the emptier of its two
/// buckets; the slot, or None if both are full. A block still held at
/// `addr` (its free was missed) is retired first and counted.
#[inline(always)]
pub(crate) fn insert_block(addr: u64, a: &Allocation) -> Option<Slot> {
    let Lookup {
        held,
        buckets: (b1, b2),
        empty: (empty1, empty2),
    } = lookup(addr)?;
    if let Some(old) = held {
        // (Read before the slot is given up: another insert may take it then.)
        // SAFETY: a block inside a live ALLOCS element; a concurrent writer can at worst tear
        // the copy.
        let prev = unsafe { read_volatile(old.block) };
        if retire_slot(old, addr, &prev) {
            count(Counter::AddressReused, 1);
        }
    }
    let (first, second) = if empty2 > empty1 { (b2, b1) } else { (b1, b2) };
    let slot = claim_in(first).or_else(|| claim_in(second))?;
    // The block before its key: a reader that sees the key sees the block.
    // SAFETY: the slot lies in live map elements, and this CPU claimed it (ALLOC_KEY_BUSY): no
    // other program writes it until its key is published.
    unsafe {
        write_volatile(slot.block, *a);
        write_volatile(slot.key, addr);
    }
    Some(slot)
}

/// Retires the outstanding block at `ptr`; false if memtrace never saw it.
/// `not_after_ns` protects realloc: between realloc's entry and its return
/// probe another thread may already have been handed the old address by
/// malloc. That newer block is kept, and the old one counts as retired: the
/// newer allocation retired it when it took the address (AddressReused).
#[inline(always)]
pub(crate) fn retire(ptr: u64, not_after_ns: u64) -> bool {
    retire_block(ptr, not_after_ns) != 0
}

/// `retire`, as a global function (checked once by the verifier).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn retire_block(ptr: u64, not_after_ns: u64) -> i64 {
    let Some(slot) = find_block(ptr) else {
        return 0;
    };
    // SAFETY: a block inside a live ALLOCS element; a concurrent writer can at worst tear the
    // copy.
    let a = unsafe { read_volatile(slot.block) };
    if a.timestamp_ns <= not_after_ns {
        retire_slot(slot, ptr, &a);
    }
    1
}
