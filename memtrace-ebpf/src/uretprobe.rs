//! Return addresses a pending return probe replaced. A uretprobe, or a
//! uprobe session that keeps its return, overwrites the return address on
//! the stack with its trampoline (the first word of the target's `[uprobes]`
//! page) until the function returns; the kernel keeps the real one with the
//! stack address it overwrote. Such probes need not be memtrace's: any
//! uretprobe on a function of the target (another tool's, or a pid-bound
//! session of another tracer whose probe shares an address with ours, which
//! the kernel arms for every process that hits it) puts the trampoline in
//! the stacks memtrace walks. Read as a frame, it is a bogus one.

use crate::counters::count;
use crate::globals::uprobe_offsets;
use crate::maps::TRACE_STATE;
use crate::target::read_user;
use aya_ebpf::helpers::{bpf_get_current_task, bpf_loop, bpf_probe_read_kernel};
use core::ptr::{read_volatile, write_volatile};
use memtrace_common::{Counter, MAX_URETPROBE_DEPTH};

/// The u64 at kernel address `addr`, if it is readable and not null.
#[inline(always)]
fn kernel_word(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_kernel is fault-tolerant: a bad address gives an error, not a
    // fault.
    let v = unsafe { bpf_probe_read_kernel(addr as *const u64) }.ok()?;
    (v != 0).then_some(v)
}

/// The current task's `task_struct`.
#[inline(always)]
fn current_task() -> u64 {
    // SAFETY: a helper with no preconditions.
    unsafe { bpf_get_current_task() }
}

/// The uretprobe trampoline's address as `trampoline` last found it (0:
/// not yet). Never 0 for a real return address.
#[inline(always)]
pub(crate) fn known_trampoline() -> u64 {
    match TRACE_STATE.get(0) {
        // SAFETY: an aligned u64 of an array map's element, valid for the program's run.
        Some(st) => unsafe { read_volatile(&st.uretprobe_trampoline) },
        None => 0,
    }
}

/// The uretprobe trampoline's address in the target, or 0 while the kernel
/// has not made one (then no return address can have been replaced) or its
/// structures' offsets are unknown. Found once in the kernel's memory
/// (`mm->uprobes_state.xol_area->vaddr`, which never changes for a process)
/// and kept in TRACE_STATE.
#[inline(always)]
pub(crate) fn trampoline() -> u64 {
    let Some(st) = TRACE_STATE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the one element of an array map, valid for the program's run; an aligned u64
    // that every writer sets to the same value.
    let known = unsafe { read_volatile(&raw const (*st).uretprobe_trampoline) };
    if known != 0 {
        return known;
    }
    let o = uprobe_offsets();
    if !o.complete() {
        return 0;
    }
    let found = kernel_word(current_task() + o.task_mm as u64)
        .and_then(|mm| kernel_word(mm + o.mm_xol_area as u64))
        .and_then(|area| kernel_word(area + o.xol_area_vaddr as u64))
        .unwrap_or(0);
    if found != 0 {
        // SAFETY: as above.
        unsafe { write_volatile(&raw mut (*st).uretprobe_trampoline, found) };
    }
    found
}

/// State of `pending_step`'s loop over the thread's pending return probes.
#[repr(C)]
struct PendingReturns {
    /// The next `return_instance` (0: none left).
    ri: u64,
    /// The stack address whose return address is wanted.
    slot: u64,
    found: u64,
}

/// One pending return probe: the real return address if it overwrote `slot`.
/// (A bpf_loop callback: verified once, whatever the depth.)
extern "C" fn pending_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back `original_return`'s pointer to its PendingReturns, which
    // lives on its stack for the whole loop and is used by nothing else meanwhile.
    let s = unsafe { &mut *(ctx as *mut PendingReturns) };
    let o = uprobe_offsets();
    if s.ri == 0 {
        return 1;
    }
    if kernel_word(s.ri + o.ri_stack as u64) == Some(s.slot) {
        s.found = kernel_word(s.ri + o.ri_orig_ret_vaddr as u64).unwrap_or(0);
        return 1;
    }
    s.ri = kernel_word(s.ri + o.ri_next as u64).unwrap_or(0);
    0
}

/// The return address that the trampoline found at stack address `slot`
/// stands for: the one the kernel kept when the pending return probe that
/// overwrote `slot` was armed. None if no pending return probe of this
/// thread overwrote it (or the offsets are unknown).
#[inline(always)]
pub(crate) fn original_return(slot: u64) -> Option<u64> {
    let o = uprobe_offsets();
    if !o.complete() {
        return None;
    }
    let utask = kernel_word(current_task() + o.task_utask as u64)?;
    let mut s = PendingReturns {
        ri: kernel_word(utask + o.utask_return_instances as u64)?,
        slot,
        found: 0,
    };
    // SAFETY: `s` outlives the loop, and pending_step takes exactly this context type.
    unsafe {
        bpf_loop(
            MAX_URETPROBE_DEPTH,
            pending_step as *mut core::ffi::c_void,
            (&raw mut s).cast(),
            0,
        )
    };
    (s.found != 0).then_some(s.found)
}

/// The return address of the call being entered, the word at its entry
/// stack pointer `sp`, as the caller put it there; 0 if it cannot be read,
/// or if it is the trampoline and the kernel has no record of the real one
/// (counted: `own_call_uretprobe_unresolved`).
///
/// Where an entry finds the trampoline: a function that jumps to another
/// entry point (a tail call) leaves its own caller's return address on the
/// stack, and a return probe pending on that function, armed by anyone's
/// uprobe session at its entry, has put the trampoline there. Another
/// memtrace tracing another process on the same library arms one on every
/// call of a function it probes (see docs/probes.md). Telling the
/// allocator's own calls by that word would then take them for the
/// program's.
///
/// A global function: verified once, whatever state its callers are in;
/// on the common path one read and one compare.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn entry_return_address(sp: u64) -> u64 {
    let Some(ra) = read_user(sp) else {
        return 0;
    };
    if ra != trampoline() {
        return ra;
    }
    match original_return(sp) {
        Some(real) => {
            count(Counter::UnwindUretprobeFrames, 1);
            real
        }
        None => {
            count(Counter::OwnCallUretprobeUnresolved, 1);
            0
        }
    }
}
