//! The event counters (`COUNTERS`): every event that cannot be recorded is
//! counted.

use crate::maps::COUNTERS;
use memtrace_common::Counter;

/// Adds `n` to counter `c` (this CPU's slot; userspace sums them).
#[inline(always)]
pub(crate) fn count(c: Counter, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run; no other
        // CPU writes it.
        unsafe { *p += n };
    }
}
