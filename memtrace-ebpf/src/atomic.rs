//! Atomic updates of map values shared between CPUs.

use core::intrinsics::AtomicOrdering;
use core::intrinsics::atomic_cxchg;
use core::intrinsics::atomic_xadd;

#[inline(always)]
pub(crate) unsafe fn add<T: Copy>(dst: *mut T, v: T) {
    unsafe { atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(dst, v) };
}

#[inline(always)]
pub(crate) fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
    }
}
