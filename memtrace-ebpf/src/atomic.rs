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

/// Compare-and-swap of a u64: whether `*p` was `old` and is now `new`.
#[inline(always)]
pub(crate) fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: the callers pass a key slot of ALLOC_KEYS: a u64 inside an array map element,
    // aligned and valid for the program's run.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
    }
}
