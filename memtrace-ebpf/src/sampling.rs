//! Sampling (`--sample-bytes`).
//!
//! Byte-weighted Poisson sampling, as tcmalloc and jemalloc do it: each
//! thread's allocated bytes are a line on which sample points fall at
//! exponentially distributed distances with mean SAMPLE_MEAN_BYTES. An
//! allocation is sampled when a point falls inside its bytes, i.e. with
//! probability 1 - exp(-size/mean); userspace scales each sampled block back
//! up by the inverse of that probability.

use crate::maps::{COUNTDOWN, SAMPLE_LOG2};
use aya_ebpf::helpers::bpf_get_prandom_u32;
use memtrace_common::{LN2_Q16, SAMPLE_LOG2_SHIFT, SAMPLE_THREADS};

/// Distance to the next sample point: exponential with mean `mean` (bytes),
/// as `mean · ln 2 · -log2(u)` for a uniform 32-bit `u`, in fixed point.
/// `sampling::draw_gap` in userspace is the same computation (and its tests
/// check it).
#[inline(always)]
fn draw_gap(mean: u64) -> i64 {
    // SAFETY: a helper with no preconditions.
    let r = unsafe { bpf_get_prandom_u32() } | 1;
    // msb = floor(log2 r), by halving.
    let (mut v, mut msb) = (r, 0u32);
    if v >= 1 << 16 {
        v >>= 16;
        msb += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        msb += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        msb += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        msb += 2;
    }
    if v >= 1 << 1 {
        msb += 1;
    }
    // The mantissa, top bit at 31: table index (10 bits) and fraction (16 bits).
    let m = (r as u64) << (31 - (msb & 31));
    let idx = ((m >> 21) & 1023) as u32;
    let frac = (m >> 5) & 0xffff;
    let lo = SAMPLE_LOG2.get(idx).copied().unwrap_or(0) as u64;
    let hi = SAMPLE_LOG2.get(idx + 1).copied().unwrap_or(0) as u64;
    let log2_mantissa = lo + ((hi.saturating_sub(lo) * frac) >> 16);
    // -log2(r / 2^32), then in units of 2^-16.
    let neg_log2 = ((((32 - msb) as u64) << SAMPLE_LOG2_SHIFT).saturating_sub(log2_mantissa))
        >> (SAMPLE_LOG2_SHIFT - 16);
    // mean <= 2^40 and neg_log2 <= 2^21: no overflow.
    ((((mean * neg_log2) >> 16) * LN2_Q16) >> 16).max(1) as i64
}

/// Whether thread `tid`'s allocation of `size` bytes is sampled.
#[inline(always)]
pub(crate) fn sample(tid: u32, mean: u64, size: u64) -> bool {
    let size = size.min(i64::MAX as u64) as i64;
    let Some(c) = COUNTDOWN.get_ptr_mut(tid & (SAMPLE_THREADS - 1)) else {
        return false;
    };
    // SAFETY: `c` is an element of the COUNTDOWN array, valid for the program's run; two
    // threads sharing a slot can at worst disturb each other's countdown, i.e. the sampling,
    // not memory.
    unsafe {
        if (*c).tid != tid {
            // The thread's first allocation (or another thread had the slot).
            (*c).tid = tid;
            (*c).left = draw_gap(mean);
        }
        if (*c).left > size {
            (*c).left -= size;
            return false;
        }
        // Sampled. By the exponential's lack of memory, the next point is a
        // fresh gap beyond the end of this allocation.
        (*c).left = draw_gap(mean);
    }
    true
}
