//! The free probe: retires a block. Its uprobe_multi link also carries the
//! allocator's own call sites, where it leaves call marks.

use crate::blocks::retire;
use crate::call::arg;
use crate::counters::count;
use crate::globals::{empty_programs, sample_mean};
use crate::maps::PENDING;
use crate::marks::{
    Caller, MARK_CALL, MARK_CHECK, MARK_TAIL, called_by_allocator, called_from_allocator_code,
    leave_mark, marked_caller, may_be_tail_call,
};
use crate::target::{regs_sp, target_thread};
use aya_ebpf::{
    EbpfContext, helpers::bpf_get_attach_cookie, macros::uprobe, programs::ProbeContext,
};
use memtrace_common::{Counter, MarkKind, PendingKey, SiteCookie};

/// A freeing function's entry (attach cookie `SiteCookie::free`: where its
/// pointer is), or a mark site (its `SiteCookie`).
///
/// The marks are on this plain uprobe_multi link, not in the uprobe
/// session: a pid-bound session arms a return probe for another process's
/// hit (docs/probes.md), and at a mark, inside a function, that would write
/// the trampoline over a live stack slot of the other instance's target.
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    if empty_programs() {
        return 0;
    }
    // SAFETY: the program's own context, as the helper expects.
    let site = SiteCookie(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    match site.mark_kind() {
        Some(MarkKind::Call) => return leave_mark(&ctx, MARK_CALL),
        Some(MarkKind::Jump) => return leave_mark(&ctx, MARK_TAIL),
        Some(MarkKind::Check) => return leave_mark(&ctx, MARK_CHECK),
        None => {}
    }
    let Some(tid) = target_thread() else {
        return 0;
    };
    // Both read at constant offsets (black_box keeps LLVM from selecting
    // the address instead): the verifier refuses a context read at a
    // variable one.
    let first = core::hint::black_box(arg(&ctx, 0));
    let second = core::hint::black_box(arg(&ctx, 1));
    let ptr = if site.free_kind().ptr_arg() == 1 {
        second
    } else {
        first
    };
    if ptr == 0 {
        return 0;
    }
    let key = PendingKey {
        tid,
        _pad: 0,
        sp: regs_sp(&ctx),
    };
    // A free made by the allocator (glibc's realloc(p, 0) frees p): the
    // return probe of the outer call accounts for it.
    let internal = match marked_caller(key.tid, key.sp) {
        Caller::Allocator | Caller::TailCall => true,
        caller => {
            (may_be_tail_call() && PENDING.get_ptr(&key).is_some())
                || (caller == Caller::BySp && called_by_allocator(key.sp))
        }
    };
    if internal {
        count(Counter::AllocatorInternalCalls, 1);
        return 0;
    }
    if retire(ptr, u64::MAX) {
        count(Counter::FreeCalls, 1);
        return 0;
    }
    // A block memtrace does not hold. The allocator's own code frees such
    // blocks too: glibc gives a thread's cache of blocks the program freed
    // (and the cache itself) back to the heap when the thread exits.
    if called_from_allocator_code(key.sp) {
        count(Counter::AllocatorOwnFrees, 1);
        return 0;
    }
    count(Counter::FreeCalls, 1);
    // With sampling, most freed blocks were never recorded.
    if sample_mean() == 0 {
        count(Counter::FreeUnknown, 1);
    }
    0
}
