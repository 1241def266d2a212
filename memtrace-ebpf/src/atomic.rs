//! Atomic updates of map values shared between CPUs.

use core::intrinsics::AtomicOrdering;
use core::intrinsics::atomic_cxchg;
use core::intrinsics::atomic_xadd;

/// Adds `v` to `*dst` atomically (the BPF atomic add instruction).
///
/// # Safety
/// `dst` must be aligned and valid for writes: a field of a map value from
/// a lookup in this program.
#[inline(always)]
pub(crate) unsafe fn add<T: Copy>(dst: *mut T, v: T) {
    // SAFETY: the caller's contract (see `# Safety`).
    unsafe { atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(dst, v) };
}

/// Adds 1 to `*p` and returns the value before: compare-and-swap, as the
/// BPF CPU version the object is built for has no fetching add. Tried a few
/// times; under more contention than that (never seen: its callers run at
/// code unmappings) the value is bumped without being claimed alone.
///
/// # Safety
/// As for [`add`].
#[inline(always)]
pub(crate) unsafe fn fetch_inc(p: *mut u64) -> u64 {
    for _ in 0..8 {
        // SAFETY: the caller's contract (see `# Safety`).
        let old = unsafe { core::ptr::read_volatile(p) };
        if cas_ptr(p, old, old.wrapping_add(1)) {
            return old;
        }
    }
    // SAFETY: as above.
    unsafe { add(p, 1u64) };
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(p) }.wrapping_sub(1)
}

/// Compare-and-swap of a u64: whether `*p` was `old` and is now `new`.
#[inline(always)]
pub(crate) fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    // The callers pass a key slot of ALLOC_KEYS: a u64 inside an array map element, aligned
    // and valid for the program's run.
    cas_ptr(p, old, new)
}

#[inline(always)]
fn cas_ptr(p: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: every caller passes an aligned u64 of a map element, valid for the program's
    // run.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
    }
}
