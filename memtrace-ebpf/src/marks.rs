//! Telling the allocator's own calls from users': call marks, return
//! addresses, tail calls of pending calls.

use crate::atomic::add;
use crate::call::SKIP_RETURN;
use crate::counters::count;
use crate::maps::{ALLOCATOR_HULL, ALLOCATOR_TEXT, CALL_MARK_STATE, CALL_MARKS};
use crate::target::{read_user, regs_sp, target_thread};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    bindings::BPF_NOEXIST,
    helpers::{bpf_loop, bpf_probe_read_user},
};
use memtrace_common::{CallMarks, Counter, MAX_ALLOCATOR_FUNCTIONS, PendingKey};

/// Whether `addr` is inside one of the probed allocator functions.
#[inline(always)]
pub(crate) fn in_allocator(addr: u64) -> bool {
    in_allocator_text(addr) != 0
}

/// `in_allocator` as a global function, which the verifier checks once
/// rather than once per state of its callers (a loop with an exit in each
/// turn).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn in_allocator_text(addr: u64) -> i64 {
    in_ranges(addr) as i64
}

#[inline(always)]
fn in_ranges(addr: u64) -> bool {
    // Most addresses (users' return addresses) are outside the span of
    // them all: one comparison.
    if let Some(hull) = ALLOCATOR_HULL.get(0) {
        if hull.end != 0 && (addr < hull.start || addr >= hull.end) {
            return false;
        }
    }
    // The ranges are sorted by start, unused slots padded with ranges that
    // start past every address: a binary search for the last range that
    // starts at or before `addr`. (A bpf_loop callback: the verifier checks
    // one halving, not every path through all of them.)
    let mut s = TextSearch {
        addr,
        lo: 0,
        hi: MAX_ALLOCATOR_FUNCTIONS,
    };
    // SAFETY: `s` outlives the loop, and text_search_step takes exactly this context type.
    unsafe {
        bpf_loop(
            TEXT_SEARCH_STEPS,
            text_search_step as *mut core::ffi::c_void,
            (&raw mut s).cast(),
            0,
        )
    };
    match ALLOCATOR_TEXT.get(s.lo) {
        Some(r) => addr >= r.start && addr < r.end,
        None => false,
    }
}

/// Halvings that narrow `MAX_ALLOCATOR_FUNCTIONS` slots down to one.
const TEXT_SEARCH_STEPS: u32 = MAX_ALLOCATOR_FUNCTIONS.ilog2() + 1;

/// A binary search of ALLOCATOR_TEXT: the range at `lo` is the last known to
/// start at or before `addr` (if any does), the one at `hi` the first known
/// to start after it.
#[repr(C)]
struct TextSearch {
    addr: u64,
    lo: u32,
    hi: u32,
}

/// One halving of a [`TextSearch`].
extern "C" fn text_search_step(_k: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back `in_allocator`'s pointer to its TextSearch, which lives on its
    // stack for the whole loop and is used by nothing else meanwhile.
    let s = unsafe { &mut *(ctx as *mut TextSearch) };
    if s.hi <= s.lo + 1 {
        return 1;
    }
    let mid = s.lo + (s.hi - s.lo) / 2;
    match ALLOCATOR_TEXT.get(mid) {
        Some(r) if r.start <= s.addr => s.lo = mid,
        _ => s.hi = mid,
    }
    0
}

/// Whether the call being entered was made by the allocator's own code:
/// its return address (at [sp] on entry) lies between the first and the
/// last of the probed functions, where an allocator keeps its housekeeping
/// (glibc: all of malloc.c, such as the cache it empties when a thread
/// exits).
#[inline(always)]
pub(crate) fn called_from_allocator_code(sp: u64) -> bool {
    let (Some(hull), Some(ret)) = (ALLOCATOR_HULL.get(0), read_user(sp)) else {
        return false;
    };
    hull.end != 0 && ret >= hull.start && ret < hull.end
}

/// Whether the call being entered was made from inside a probed allocator
/// function: its return address (at [sp] on entry) is in one of their ranges.
#[inline(always)]
pub(crate) fn called_by_allocator(sp: u64) -> bool {
    // SAFETY: bpf_probe_read_user is fault-tolerant: a bad user address gives an error, not a
    // fault.
    match unsafe { bpf_probe_read_user(sp as *const u64) } {
        Ok(ret) => in_allocator(ret),
        Err(_) => false,
    }
}

/// A mark's value in `CALL_MARKS` (BPF-only state): a probed function's
/// `call`, its `jmp`, or a jump in code it called (the callee checks its
/// return address); left for a `MarkKind` of the same names.
pub(crate) const MARK_CALL: u64 = 0;

pub(crate) const MARK_TAIL: u64 = 1;

pub(crate) const MARK_CHECK: u64 = 2;

/// Who made the call being entered, as far as the allocator's own calls go.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A user's call.
    User,
    /// A call made by a probed allocator function: part of its own call.
    Allocator,
    /// A probed allocator function jumped here: still its call.
    TailCall,
    /// Unknown from marks (`CallMarks::BySp`): look at [sp] and PENDING.
    BySp,
}

/// The caller of the entry of thread `tid` at stack pointer `sp`, by the
/// marks the allocator's own call sites leave. With no mark in flight,
/// this is one array read. (`User` and `BySp` may still be a tail call of
/// a pending call: see `may_be_tail_call`.)
#[inline(always)]
pub(crate) fn marked_caller(tid: u32, sp: u64) -> Caller {
    let Some(st) = CALL_MARK_STATE.get_ptr_mut(0) else {
        return Caller::BySp;
    };
    // SAFETY: a pointer from an array map lookup: the element stays valid for the program's
    // run; volatile, as userspace and other CPUs change it.
    unsafe {
        let mode = core::ptr::read_volatile(&raw const (*st).mode);
        if !matches!(CallMarks::try_from(mode), Ok(CallMarks::BySite)) {
            return Caller::BySp;
        }
        if core::ptr::read_volatile(&raw const (*st).in_flight) == 0 {
            return Caller::User;
        }
    }
    let key = PendingKey { tid, _pad: 0, sp };
    // SAFETY: the u64 is copied at once; a deleted element stays readable until the program
    // ends (RCU).
    let Some(&mark) = (unsafe { CALL_MARKS.get(&key) }) else {
        return Caller::User;
    };
    if CALL_MARKS.remove(&key).is_ok() {
        // SAFETY: a pointer from an array map lookup: the element stays valid for the program's
        // run; an aligned u64 updated atomically.
        unsafe { add(&raw mut (*st).in_flight, u64::MAX) };
    }
    match mark {
        MARK_CALL => Caller::Allocator,
        MARK_TAIL => Caller::TailCall,
        _ => Caller::BySp,
    }
}

/// Whether any call is in PENDING: only then can an entry be the tail call
/// of a pending call (glibc's memalign jumps to `_mid_memalign`, which
/// jumps to malloc: that jump is not in a probed function). Counted with
/// marks or without.
#[inline(always)]
pub(crate) fn may_be_tail_call() -> bool {
    match CALL_MARK_STATE.get_ptr_mut(0) {
        // SAFETY: a pointer from an array map lookup: the element stays valid for the program's
        // run.
        Some(st) => unsafe { core::ptr::read_volatile(&raw const (*st).pending) != 0 },
        None => true,
    }
}

/// Counts a call into or out of PENDING (see `CallMarkState::pending`).
#[inline(always)]
pub(crate) fn count_pending(delta: u64) {
    if let Some(st) = CALL_MARK_STATE.get_ptr_mut(0) {
        // SAFETY: a pointer from an array map lookup: the element stays valid for the program's
        // run; an aligned u64 updated atomically.
        unsafe { add(&raw mut (*st).pending, delta) };
    }
}

/// A probe on one of the allocator's own calls or jumps into a probed
/// function (`mark`: MARK_*): marks the callee's coming entry on this thread.
#[inline(always)]
pub(crate) fn leave_mark<C: EbpfContext>(ctx: &C, mark: u64) -> u32 {
    let Some(tid) = target_thread() else {
        return SKIP_RETURN;
    };
    let sp = regs_sp(ctx);
    let key = PendingKey {
        tid,
        _pad: 0,
        // A call pushes the return address before the callee's probe.
        sp: if mark == MARK_CALL {
            sp.wrapping_sub(8)
        } else {
            sp
        },
    };
    let value = mark;
    match CALL_MARKS.insert(&key, &value, BPF_NOEXIST as u64) {
        Ok(()) => {
            if let Some(st) = CALL_MARK_STATE.get_ptr_mut(0) {
                // SAFETY: a pointer from an array map lookup: the element stays valid for the
                // program's run; an aligned u64 updated atomically.
                unsafe { add(&raw mut (*st).in_flight, 1) };
            }
        }
        // The same mark, never taken: keep one.
        Err(e) if e == -17 => {
            let _ = CALL_MARKS.insert(&key, &value, BPF_ANY as u64);
        }
        // The callee will count as a user's call: say so.
        Err(_) => count(Counter::PendingMapFull, 1),
    }
    SKIP_RETURN
}
