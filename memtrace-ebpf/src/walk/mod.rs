//! The stack walk. The one interface the rest of the program uses:
//! `capture_stack(ctx)` gives the key of the current user stack in STACKS, or
//! NO_STACK (with the reason counted).

pub(crate) mod cache;
pub(crate) mod python;
pub(crate) mod step;
pub(crate) mod store;

use crate::counters::count;
use crate::globals::target_tgid;
use crate::maps::{
    CODE_STATE, PROC_TABLES, STACK_SCRATCH, STACK_WINDOW, TABLES_GENERATION, WALK_CACHE,
};
use crate::uretprobe::trampoline;
use crate::walk::cache::{remember, remembered_walk};
use crate::walk::step::{Walk, count_walk, walk};
use crate::walk::store::store_stack;
use aya_ebpf::{EbpfContext, bindings::BPF_F_USER_STACK, helpers::bpf_get_stack};
use memtrace_common::{Counter, MAX_STACK_DEPTH, NO_STACK, STACK_FP_ONLY};

#[inline(always)]
pub(crate) fn mix(h: u64, v: u64) -> u64 {
    // 64-bit multiply-xorshift mixing (from splitmix64's finalizer).
    let mut x = h ^ v;
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 29)
}

/// Bytes of the stack read in one go at the start of a walk: the frames
/// inside it cost no read of their own (each read of user memory is the
/// walk's largest cost).
pub(crate) const WINDOW_BYTES: u32 = 1024;

pub(crate) const WINDOW_WORDS: usize = WINDOW_BYTES as usize / 8;

/// Remembered walks per CPU, by (pc, sp) at the walk's start.
pub(crate) const CACHE_SLOTS: u32 = 32;

/// Stack words a remembered walk may have read.
pub(crate) const CACHE_WORDS: usize = 64;

#[repr(C)]
pub(crate) struct StackWindow {
    pub(crate) words: [u64; WINDOW_WORDS],
}

/// Where a stack walk starts: the first frame's pc, sp and rbp, and the
/// window of stack memory from `base` (`window` bytes of it already read
/// into STACK_WINDOW, 0 if none yet). (Passed by pointer to a global
/// function: C layout, every byte a field, as the verifier reads them all.)
#[repr(C)]
#[derive(Default)]
pub(crate) struct WalkStart {
    pub(crate) pc: u64,
    pub(crate) sp: u64,
    pub(crate) bp: u64,
    pub(crate) base: u64,
    pub(crate) window: u32,
    /// 1: `window` is all `read_window` could read (else a remembered
    /// walk's extent, to be read in full if the walk must be redone).
    pub(crate) whole: u32,
    /// WALK_CACHE slot, from the probe's own rip and rsp (known before
    /// anything is read).
    pub(crate) slot: u32,
    /// 1: the process has unwind tables (checked before the walk from the
    /// context's registers; a result site's caller checks only if its walk
    /// is not remembered).
    pub(crate) tables_known: u32,
}

#[inline(always)]
pub(crate) fn cache_slot(rip: u64, rsp: u64) -> u32 {
    (mix(rip, rsp) as u32) & (CACHE_SLOTS - 1)
}

/// Reads the window at `sp`: WINDOW_BYTES, or up to the end of sp's page
/// when the stack ends sooner. Returns the bytes read.
#[inline(always)]
pub(crate) fn read_window(win: *mut StackWindow, sp: u64) -> u32 {
    // SAFETY: `win` is this CPU's StackWindow and every `len` is at most WINDOW_BYTES, its
    // size; bpf_probe_read_user is fault-tolerant: a bad user address gives an error, not a
    // fault.
    let read = |len: u32| unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(win.cast(), len, sp as *const _) == 0
    };
    if read(WINDOW_BYTES) {
        return WINDOW_BYTES;
    }
    let to_page_end = 4096 - (sp & 4095) as u32;
    if to_page_end < WINDOW_BYTES && to_page_end >= 16 && read(to_page_end) {
        return to_page_end;
    }
    0
}

/// The key in STACKS of the current user stack, or NO_STACK (with the
/// reason counted). Walked with the unwind tables when userspace loaded
/// them for this process (a walk that only read its stack window is
/// remembered, and repeated by checking those words), else with frame
/// pointers.
/// `at`: where to walk from instead of the context's registers (a result
/// site inside the allocator starts at its caller's frame, with the
/// window it read from its own rsp); a pc of 0 there: the caller is
/// unknown, no stack (counted by the caller).
#[inline(always)]
pub(crate) fn capture_stack<C: EbpfContext>(ctx: &C, at: Option<WalkStart>) -> u64 {
    let start = match at {
        Some(at) if at.pc == 0 => return NO_STACK,
        Some(at) => at,
        None => {
            // (Only the target's tasks get here: see `is_target`.)
            // SAFETY: only the presence of the key is used, not the value.
            if unsafe { PROC_TABLES.get(&target_tgid()) }.is_none() {
                return frame_pointer_stack(ctx);
            }
            start_at_registers(ctx)
        }
    };
    match walk_stack(&start) {
        UNSTORED => {
            python::python_append();
            store_stack()
        }
        id => id,
    }
}

/// What `walk_stack` returns for a walk it left in STACK_SCRATCH unstored:
/// a Python target's, whose Python frames its caller appends first. Never
/// a key of STACKS (see `store_stack`).
pub(crate) const UNSTORED: u64 = u64::MAX;

/// The key in STACKS of the stack walked from `start` with the unwind
/// tables, or NO_STACK (with the reason counted), or UNSTORED for a
/// Python target's stack (left in STACK_SCRATCH). A global function: the
/// verifier checks the walk once, on its own, not again at every state
/// the program reaches it in.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn walk_stack(start: *const WalkStart) -> u64 {
    // SAFETY: the caller's WalkStart, on its stack for the call.
    let (Some(start), Some(scratch)) = (unsafe { start.as_ref() }, STACK_SCRATCH.get_ptr_mut(0))
    else {
        count(Counter::StackReadErrors, 1);
        return NO_STACK;
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run; nothing else
    // in this program refers to it.
    let scratch = unsafe { &mut *scratch };
    let tgid = target_tgid();
    // A remembered walk is stale once the tables change, or code is
    // unmapped (its stack id may then be another, see `store`).
    let code_generation = CODE_STATE.get(0).map_or(0, |c| c.generation);
    let generation = TABLES_GENERATION
        .get(0)
        .copied()
        .unwrap_or(0)
        .wrapping_add(code_generation << 32);
    let (Some(win), Some(cached)) = (
        STACK_WINDOW.get_ptr_mut(0),
        WALK_CACHE.get_ptr_mut(start.slot),
    ) else {
        count(Counter::StackReadErrors, 1);
        return NO_STACK;
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run. (Another
    // program preempting this one may write the same slot: `check` then fails to match, see
    // CachedWalk.)
    let cached = unsafe { &mut *cached };
    // (A Python target's walks are never remembered, see below: this
    // finds none.)
    if let Some(id) = remembered_walk(cached, win, generation, tgid, start) {
        count_walk(cached.fp_frames, cached.stop);
        return id;
    }
    // With no tables (a result site's caller) the walk below finds no
    // rows and follows frame pointers, as bpf_get_stack does.
    // SAFETY: only the presence of the key is used, not the value.
    let no_tables = start.tables_known == 0 && unsafe { PROC_TABLES.get(&tgid) }.is_none();
    let window = if start.whole != 0 {
        start.window
    } else {
        read_window(win, start.base)
    };
    // The slot records this walk's reads from now on.
    cached.check = 0;
    // (Found before the walk, which then only compares with it.)
    trampoline();
    let mut w = Walk::new(start, tgid, window);
    walk(&mut w);
    scratch.len = w.len;
    scratch.flags = w.flags | if no_tables { STACK_FP_ONLY } else { 0 };
    count_walk(w.fp_frames, w.stop);
    if w.len == 0 {
        count(Counter::StackReadErrors, 1);
        return NO_STACK;
    }
    // A Python stack also depends on the interpreter's frames, which a
    // remembered walk does not check: not remembered. Its Python frames are
    // appended by the caller, outside this function's frame (the deepest
    // chain of frames must fit the BPF stack).
    if python::enabled() {
        return UNSTORED;
    }
    let id = store_stack();
    if id != NO_STACK && w.cacheable != 0 && w.extent != 0 {
        remember(cached, start, &w, generation, tgid, id);
    }
    id
}

/// The stack from the context's registers by frame pointers
/// (bpf_get_stack), for a process with no unwind tables: its key in
/// STACKS, or NO_STACK.
#[inline(always)]
fn frame_pointer_stack<C: EbpfContext>(ctx: &C) -> u64 {
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        count(Counter::StackReadErrors, 1);
        return NO_STACK;
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run; nothing else
    // in this program refers to it.
    let scratch = unsafe { &mut *scratch };
    // SAFETY: the buffer is the scratch stack's `frames`, MAX_STACK_DEPTH u64s: exactly the
    // size passed; bpf_get_stack reads user memory fault-tolerantly.
    let n = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            scratch.frames.as_mut_ptr() as *mut _,
            (MAX_STACK_DEPTH * 8) as u32,
            BPF_F_USER_STACK as u64,
        )
    };
    if n <= 0 {
        count(Counter::StackReadErrors, 1);
        return NO_STACK;
    }
    scratch.len = (n as u64 / 8).min(MAX_STACK_DEPTH as u64) as u32;
    scratch.flags = STACK_FP_ONLY;
    python::python_append();
    store_stack()
}

/// A walk from the context's registers, with no window read yet.
#[inline(always)]
fn start_at_registers<C: EbpfContext>(ctx: &C) -> WalkStart {
    let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
    // SAFETY: the context is the kernel's pt_regs of this probe hit, readable for the program's
    // run.
    let (pc, sp, bp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
    WalkStart {
        pc,
        sp,
        bp,
        base: sp,
        window: 0,
        whole: 0,
        slot: cache_slot(pc, sp),
        tables_known: 1,
    }
}
