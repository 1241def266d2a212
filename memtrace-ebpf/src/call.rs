//! An allocating call's entry and return, shared by the classic probes and
//! the uprobe session.

use crate::blocks::{block_known, retire};
use crate::counters::count;
use crate::globals::sample_mean;
use crate::maps::PENDING;
use crate::marks::{Caller, called_by_allocator, count_pending, marked_caller, may_be_tail_call};
use crate::sampling::sample;
use crate::target::{regs_sp, target_thread};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user},
    programs::ProbeContext,
};
use memtrace_common::{
    AllocKind, ArgLayout, ArgRegs, Counter, PENDING_KIND_MASK, PENDING_UNSAMPLED, PendingCall,
    PendingKey, PtReg,
};

/// A session cookie holding a call (see `enter`): this bit, the size
/// (saturated) << 8 and the `AllocKind` in the low byte.
const COOKIE_CALL: u64 = 1 << 63;

const COOKIE_SIZE_MAX: u64 = (1 << 55) - 1;

/// `PendingCall::out_ptr` of a realloc whose old block memtrace knew at entry.
const OLD_BLOCK_KNOWN: u64 = 1;

/// What an entry returns. In a uprobe session the kernel skips the return
/// probe of a call whose entry returned SKIP_RETURN; classic entry probes'
/// return values are ignored.
const KEEP_RETURN: u32 = 0;

pub(crate) const SKIP_RETURN: u32 = 1;

/// An allocating call's entry. Returns KEEP_RETURN if its return must be seen.
/// `session`: called from the uprobe session program, whose skipped calls
/// have no return probe at all. `cookie`: the session's per-call cookie
/// when the function may keep its call there (`SITE_CALL_IN_COOKIE`), else
/// null; a call that needs only its size is then kept there, not in PENDING.
/// `keep_unsampled`: an unsampled call is kept to its return all the same
/// (see below).
#[inline(always)]
pub(crate) fn enter<C: EbpfContext>(
    ctx: &C,
    kind: AllocKind,
    args: CallArgs,
    session: bool,
    cookie: *mut u64,
    keep_unsampled: bool,
) -> u32 {
    let CallArgs {
        size,
        old_ptr,
        out_ptr,
        limit,
    } = args;
    let Some(tid) = target_thread() else {
        return SKIP_RETURN;
    };
    let key = PendingKey {
        tid,
        _pad: 0,
        sp: regs_sp(ctx),
    };
    let caller = marked_caller(key.tid, key.sp);
    match caller {
        // (Marks are used only with sessions, which skip the inner return.)
        Caller::TailCall => return SKIP_RETURN,
        Caller::Allocator => {
            count(Counter::AllocatorInternalCalls, 1);
            return SKIP_RETURN;
        }
        Caller::User | Caller::BySp => {}
    }
    if may_be_tail_call() {
        if let Some(p) = PENDING.get_ptr_mut(&key) {
            // A tail call from one allocator entry point into another (same
            // stack pointer, the first call not returned): one call, two
            // probe pairs. In a session the inner return probe is skipped
            // and the outer one reports the call; classic return probes
            // both run and must pair up.
            if !session {
                // SAFETY: `p` comes from a PENDING lookup: the kernel keeps the element's
                // memory until the program ends (RCU), and only this thread uses its own key.
                unsafe { (*p).refs += 1 };
            }
            return SKIP_RETURN;
        }
    }
    if caller == Caller::BySp && called_by_allocator(key.sp) {
        count(Counter::AllocatorInternalCalls, 1);
        return SKIP_RETURN;
    }
    // realloc: whether memtrace knows the old block now. Another thread may
    // be handed (and even free) that address before this call's return
    // probe runs; the old block then is gone, but it was not unknown.
    let old_known = old_ptr != 0 && block_known(old_ptr);
    let mut flags = 0;
    let mean = sample_mean();
    if mean != 0 && !sample(tid, mean, size) {
        // Its return is still needed to retire a sampled old block
        // (realloc); for a realloc(p, 0), which glibc turns into a free
        // (returning NULL), to count it as a free and not an allocation;
        // for a call that may well fail (`keep_unsampled`, see
        // `result_in_doubt`), to count it as failed; and for a function
        // that reaches another probed one by jumping through code memtrace
        // does not mark (`keep_unsampled`, `SITE_UNSAMPLED_PENDING`), to
        // stay in PENDING, where that entry finds it: one call. The return
        // counts the call then.
        if !old_known && !keep_unsampled && !(old_ptr != 0 && size == 0) {
            count(Counter::UnsampledCalls, 1);
            // realloc of a block memtrace never saw: the free it makes is
            // counted here, as its return is not seen (so free_calls stays
            // exact; it counts a rare failed realloc too).
            if old_ptr != 0 {
                count(Counter::FreeCalls, 1);
            }
            return SKIP_RETURN;
        }
        flags = PENDING_UNSAMPLED;
    }
    if !cookie.is_null() && flags == 0 && old_ptr == 0 && out_ptr == 0 {
        // The session keeps the call: nothing to store, look up or expire.
        // SAFETY: `cookie` is this call's session cookie (8 bytes from bpf_session_cookie),
        // checked non-null.
        unsafe { *cookie = COOKIE_CALL | (size.min(COOKIE_SIZE_MAX) << 8) | kind as u64 };
        return KEEP_RETURN;
    }
    let call = PendingCall {
        kind: kind as u32 | flags,
        refs: 1,
        size,
        old_ptr,
        out_ptr: if old_known { OLD_BLOCK_KNOWN } else { out_ptr },
        // SAFETY: a helper with no preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        limit,
    };
    if PENDING.insert(&key, &call, BPF_ANY as u64).is_err() {
        count(Counter::PendingMapFull, 1);
        return SKIP_RETURN;
    }
    count_pending(1);
    KEEP_RETURN
}

#[inline(always)]
pub(crate) fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// ABI argument `n` (< 6) where `at` says it is: its own register (read at
/// a constant place, as always at a function's entry), or, at an entry-cover
/// site after the function moved it, another register of pt_regs, read by
/// its index (the verifier refuses a context read at a computed offset).
#[inline(always)]
pub(crate) fn arg_at(ctx: &ProbeContext, n: usize, at: ArgRegs) -> u64 {
    if at.0 == 0 {
        arg(ctx, n)
    } else {
        arg_moved(ctx, n, at)
    }
}

/// ABI argument `n` in the register `at` says (any of pt_regs's).
#[inline(always)]
fn arg_moved(ctx: &ProbeContext, n: usize, at: ArgRegs) -> u64 {
    let index = (at.reg(n) as usize).min(PtReg::ALL.len() - 1);
    let regs = ctx.as_ptr() as *const u64;
    // SAFETY: reads one u64 of this hit's pt_regs (the context the kernel
    // passes), the field `index` (< 15) of its general registers, which
    // begin the struct; bpf_probe_read_kernel fails rather than faults.
    unsafe { bpf_probe_read_kernel(regs.wrapping_add(index)) }.unwrap_or(0)
}

/// nmemb * size, or u64::MAX on overflow (the call will fail with ENOMEM; a
/// wrapped product could be 0, which realloc would take for a free).
#[inline(always)]
fn array_size(nmemb: u64, size: u64) -> u64 {
    // checked_mul (and this test, which LLVM would turn back into it) needs a
    // 128-bit multiply, which BPF does not have; black_box keeps the division.
    if nmemb != 0 && size > core::hint::black_box(u64::MAX) / nmemb {
        u64::MAX
    } else {
        nmemb * size
    }
}

/// What an allocating call's entry keeps of its arguments (see
/// `AllocKind::args`): the size requested, the block it resizes and where
/// it stores its result (0 for none), and the most it asks for (xallocx's
/// `size + extra`; else the size).
#[derive(Clone, Copy)]
pub(crate) struct CallArgs {
    pub(crate) size: u64,
    pub(crate) old_ptr: u64,
    pub(crate) out_ptr: u64,
    pub(crate) limit: u64,
}

/// The arguments of a call to an allocator function of `kind`, read where
/// `AllocKind::args` says they are.
#[inline(always)]
pub(crate) fn call_args(ctx: &ProbeContext, kind: AllocKind, at: ArgRegs) -> CallArgs {
    // One arm per kind, each with its layout a constant: the registers are
    // read at constant places in pt_regs (the verifier refuses a read at an
    // offset computed from a kind known only at run time).
    macro_rules! by_kind {
        ($($k:ident),+) => {
            match kind {
                $(AllocKind::$k => {
                    const LAYOUT: ArgLayout = AllocKind::$k.args();
                    read_args(ctx, LAYOUT, at)
                })+
            }
        };
    }
    by_kind!(
        Malloc,
        Calloc,
        Realloc,
        ReallocArray,
        Memalign,
        PosixMemalign,
        Valloc,
        Pvalloc,
        HeapMalloc,
        HeapCalloc,
        HeapRealloc,
        HeapReallocArray,
        Xallocx
    )
}

/// The arguments where `layout` says they are, in the registers `at` says.
#[inline(always)]
fn read_args(ctx: &ProbeContext, layout: ArgLayout, at: ArgRegs) -> CallArgs {
    // One branch for the whole layout, not one per argument: the verifier
    // then checks two paths per kind, not two per argument read.
    if at.0 == 0 {
        read_args_with(layout, |a| arg(ctx, a as usize))
    } else {
        read_args_with(layout, |a| arg_moved(ctx, a as usize, at))
    }
}

/// The arguments where `layout` says they are, each read by `arg`.
#[inline(always)]
fn read_args_with(layout: ArgLayout, arg: impl Fn(u8) -> u64) -> CallArgs {
    let nth = |a: Option<u8>| match a {
        Some(a) => arg(a),
        None => 0,
    };
    let size = match layout.count {
        Some(count) => array_size(arg(count), arg(layout.size)),
        None => arg(layout.size),
    };
    let limit = match layout.extra {
        Some(extra) => size.saturating_add(arg(extra)),
        None => size,
    };
    CallArgs {
        size,
        old_ptr: nth(layout.old_ptr),
        out_ptr: nth(layout.out_ptr),
        limit,
    }
}

/// Whether a call may fail for its arguments alone, whatever the memory:
/// posix_memalign with an alignment that is not a power of two multiple of
/// 8 (EINVAL, by POSIX), memalign/aligned_alloc with one that is not a
/// power of two (allocators differ). Unsampled, such a rare call still has
/// its return seen, so that a failure is not counted as an allocation.
#[inline(always)]
pub(crate) fn result_in_doubt(ctx: &ProbeContext, kind: AllocKind, at: ArgRegs) -> bool {
    let pow2 = |a: u64| a != 0 && a & (a - 1) == 0;
    match kind {
        AllocKind::PosixMemalign => {
            let a = arg_at(ctx, 1, at);
            !pow2(a) || a % 8 != 0
        }
        AllocKind::Memalign => !pow2(arg_at(ctx, 0, at)),
        _ => false,
    }
}

/// An allocating call's return, with its return value `ret`: the block to
/// record, as (address, size), if there is one.
/// `in_cookie`: the call as its session's cookie holds it (see `enter`),
/// or 0 for a call in PENDING.
#[inline(always)]
pub(crate) fn exit<C: EbpfContext>(ctx: &C, ret: u64, in_cookie: u64) -> Option<(u64, u64)> {
    let tid = target_thread()?;
    count(Counter::ReturnProbes, 1);
    // With sampling, most blocks are unknown to memtrace: not worth a count.
    let mean = sample_mean();
    let call = if in_cookie & COOKIE_CALL != 0 {
        let size = (in_cookie & !COOKIE_CALL) >> 8;
        PendingCall {
            kind: (in_cookie & 0xff) as u32,
            refs: 1,
            size,
            old_ptr: 0,
            out_ptr: 0,
            timestamp_ns: 0,
            limit: size,
        }
    } else {
        take_pending(ctx, tid, mean)?
    };
    let sampled = call.kind & PENDING_UNSAMPLED == 0;
    // One record_alloc for every kind: it holds the stack walk, which the
    // verifier would otherwise check once per call site.
    let ptr = match AllocKind::from_u32(call.kind & PENDING_KIND_MASK) {
        Some(AllocKind::PosixMemalign) => posix_memalign_block(&call, ret, sampled)?,
        Some(AllocKind::Xallocx) => {
            let ptr = xallocx_block(&call, ret, sampled, mean)?;
            return Some((ptr, if ret < call.limit { ret } else { call.limit }));
        }
        Some(kind) if kind.resizes() => realloc_block(&call, ret, sampled, mean)?,
        Some(_) => {
            if ret == 0 {
                count(Counter::FailedAllocs, 1);
                return None;
            }
            if !sampled {
                count(Counter::UnsampledCalls, 1);
                return None;
            }
            ret
        }
        None => return None,
    };
    Some((ptr, call.size))
}

/// The pending call of thread `tid` that is returning, taken out of
/// PENDING; None if there is none, or if an inner call of a tail call
/// returns (the outer one reports the call).
#[inline(always)]
fn take_pending<C: EbpfContext>(ctx: &C, tid: u32, mean: u64) -> Option<PendingCall> {
    // The return popped the return address: the entry saw sp - 8.
    let key = PendingKey {
        tid,
        _pad: 0,
        sp: regs_sp(ctx).wrapping_sub(8),
    };
    let Some(p) = PENDING.get_ptr_mut(&key) else {
        // Sampling with classic return probes: every unsampled call's
        // return probe runs, with nothing pending.
        if mean == 0 {
            count(Counter::UnmatchedReturns, 1);
        }
        return None;
    };
    // SAFETY: `p` comes from a PENDING lookup: the kernel keeps the element's memory until the
    // program ends (RCU), and only this thread uses its own key.
    let call = unsafe {
        if (*p).refs > 1 {
            (*p).refs -= 1;
            return None;
        }
        *p
    };
    if PENDING.remove(&key).is_ok() {
        count_pending(u64::MAX);
    }
    Some(call)
}

/// The block a returning posix_memalign stored through its out pointer, if
/// it succeeded and was sampled.
#[inline(always)]
fn posix_memalign_block(call: &PendingCall, ret: u64, sampled: bool) -> Option<u64> {
    if ret as u32 != 0 {
        count(Counter::FailedAllocs, 1);
        return None;
    }
    if !sampled {
        count(Counter::UnsampledCalls, 1);
        return None;
    }
    // SAFETY: bpf_probe_read_user is fault-tolerant: a bad user address gives an error, not a
    // fault.
    match unsafe { bpf_probe_read_user(call.out_ptr as *const u64) } {
        Ok(ptr) => Some(ptr),
        Err(_) => {
            count(Counter::OutPointerReadErrors, 1);
            None
        }
    }
}

/// A returning realloc or reallocarray: retires its old block, and gives
/// the new one if it was sampled.
#[inline(always)]
fn realloc_block(call: &PendingCall, ret: u64, sampled: bool, mean: u64) -> Option<u64> {
    if ret == 0 {
        if call.old_ptr != 0 && call.size == 0 {
            // realloc(p, 0): glibc frees p and returns NULL.
            retire_old_block(call, mean);
        } else {
            // Failure: the old block is untouched.
            count(Counter::FailedAllocs, 1);
        }
        return None;
    }
    if call.old_ptr != 0 {
        retire_old_block(call, mean);
    }
    if !sampled {
        count(Counter::UnsampledCalls, 1);
        if retire(ret, u64::MAX) {
            // The unsampled new block took an address memtrace still
            // held (its free was missed): not outstanding any more.
            count(Counter::AddressReused, 1);
        }
        return None;
    }
    Some(ret)
}

/// A returning xallocx (its return value `ret` is the block's usable size):
/// if it resized the block to at least the size asked for, it is a realloc
/// that kept its address: the old block is retired, and the block is given
/// again (with its new size) if sampled. Else nothing changed: the call
/// failed, the block stays as it was.
#[inline(always)]
fn xallocx_block(call: &PendingCall, ret: u64, sampled: bool, mean: u64) -> Option<u64> {
    if ret < call.size || call.old_ptr == 0 {
        count(Counter::FailedAllocs, 1);
        return None;
    }
    retire_old_block(call, mean);
    if !sampled {
        count(Counter::UnsampledCalls, 1);
        return None;
    }
    Some(call.old_ptr)
}

/// Counts the free a realloc made of its old block, and retires the block.
#[inline(always)]
fn retire_old_block(call: &PendingCall, mean: u64) {
    count(Counter::FreeCalls, 1);
    if !retire(call.old_ptr, call.timestamp_ns) && call.out_ptr != OLD_BLOCK_KNOWN && mean == 0 {
        count(Counter::FreeUnknown, 1);
    }
}
