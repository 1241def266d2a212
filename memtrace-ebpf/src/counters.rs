//! The event counters (`COUNTERS`): every event that cannot be recorded is
//! counted.

use crate::maps::COUNTERS;
use memtrace_common::Counter;

#[inline(always)]
pub(crate) fn count(c: Counter, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // Per-CPU slot: no other CPU writes it, and BPF programs do not nest on one CPU here.
        unsafe { *p += n };
    }
}
