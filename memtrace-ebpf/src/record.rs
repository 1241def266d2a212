//! Recording a returned block: its stack, its slot in the block table and
//! its site's aggregate.

use crate::atomic::cas;
use crate::blocks::insert_block;
use crate::counters::count;
use crate::sites::{epoch_at, site_add, site_dropped};
use crate::walk::{WalkStart, capture_stack};
use aya_ebpf::{EbpfContext, helpers::bpf_ktime_get_ns};
use memtrace_common::{ALLOC_KEY_EMPTY, Allocation, Counter};

#[inline(always)]
pub(crate) fn record_alloc<C: EbpfContext>(ctx: &C, ptr: u64, size: u64, at: Option<WalkStart>) {
    // SAFETY: a helper with no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let stack_id = capture_stack(ctx, at);
    record_block(ptr, size, stack_id, now);
}

/// Enters the block of `size` bytes at `ptr`, allocated at `now` by stack
/// `stack_id`, in the block table and its site's aggregate, or counts why
/// not. A global function: the verifier checks it once, not at every state
/// its callers reach it in (and its locals are off their stack frames).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn record_block(ptr: u64, size: u64, stack_id: u64, now: u64) -> i64 {
    let (epoch, birth_offset) = epoch_at(now);
    let a = Allocation {
        size,
        stack_id,
        timestamp_ns: now,
        epoch,
        birth_offset,
    };
    // (No free can come between the two updates: the caller has not been
    // given the address yet.)
    let Some(slot) = insert_block(ptr, &a) else {
        count(Counter::AllocMapFull, 1);
        site_dropped(&a);
        return 0;
    };
    if !site_add(&a) {
        let _ = cas(slot.key, ptr, ALLOC_KEY_EMPTY);
        count(Counter::SiteMapFull, 1);
        return 0;
    }
    count(Counter::AllocCalls, 1);
    count(Counter::AllocBytes, size);
    1
}
