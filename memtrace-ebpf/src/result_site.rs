//! Result sites: probes inside an allocating function where its outcome is
//! already known (memtrace/src/exits.rs): one trap per call instead of an
//! entry and a return probe.

use crate::counters::count;
use crate::globals::{empty_programs, sample_mean, target_tgid};
use crate::maps::{CAPTURES, PENDING, RESULT_SITES, STACK_WINDOW, WALK_CACHE};
use crate::marks::{in_allocator, may_be_tail_call};
use crate::record::record_alloc;
use crate::sampling::sample;
use crate::target::{read_user, target_thread};
use crate::uretprobe::{original_return, trampoline};
use crate::walk::{StackWindow, WINDOW_BYTES, WINDOW_WORDS, WalkStart, cache_slot, read_window};
use aya_ebpf::{EbpfContext, helpers::bpf_get_attach_cookie, programs::ProbeContext};
use core::ptr::read_volatile;
use memtrace_common::{
    Capture, Counter, PendingKey, RESULT_ALWAYS, ResultSite, SAMPLE_THREADS, SiteCookie,
    SiteOutcome, ValueLoc,
};

/// The result sites' program (see `result_site`), attached with a plain
/// uprobe_multi link, bound to the target. Not part of the session: a
/// session consumer that returns 0 for another process's hit (as every
/// pid-bound one does) makes the kernel arm a return probe, which
/// replaces the word at [rsp] with its trampoline: the return address at
/// a function's entry, but a live stack slot inside the function.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn alloc_result(ctx: *mut core::ffi::c_void) -> u32 {
    if empty_programs() {
        return 0;
    }
    let ctx = ProbeContext::new(ctx);
    // SAFETY: the program's own context, as the helper expects.
    let site = SiteCookie(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let mut hit = ResultHit {
        ptr: 0,
        size: 0,
        at: WalkStart::default(),
    };
    if result_hit(ctx.as_ptr().cast(), site.result_index(), &mut hit) != 0 {
        record_alloc(&ctx, hit.ptr, hit.size, Some(hit.at));
    }
    0
}

/// A block a result site records: its address and size, and where the
/// walk from the allocator's caller starts.
#[repr(C)]
pub(crate) struct ResultHit {
    ptr: u64,
    size: u64,
    at: WalkStart,
}

/// `result_site` into `hit`: 1 if the call returns a block to record. A
/// global function: the verifier checks it once, and its state (the
/// site's configuration, its registers) stays off the stack frame that
/// the walk's frames are added to.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn result_hit(
    regs: *const aya_ebpf::bindings::pt_regs,
    index: u32,
    hit: *mut ResultHit,
) -> i64 {
    // SAFETY: the caller's ResultHit, on its stack for the call.
    let Some(hit) = (unsafe { hit.as_mut() }) else {
        return 0;
    };
    match result_site(regs, index) {
        Some((ptr, size, at)) => {
            *hit = ResultHit { ptr, size, at };
            1
        }
        None => 0,
    }
}

/// A general register of `struct pt_regs` by its index (a `PtReg`).
/// Every register is loaded at its own constant offset first: the
/// verifier refuses a context load at a computed offset, which a match
/// over the fields compiles to.
#[inline(always)]
fn reg_at(regs: *const aya_ebpf::bindings::pt_regs, r: u8) -> u64 {
    // SAFETY: the context is the kernel's pt_regs of this probe hit, readable for the program's
    // run; each field is read at its own constant offset.
    let all: [u64; 16] = unsafe {
        [
            read_volatile(&(*regs).r15),
            read_volatile(&(*regs).r14),
            read_volatile(&(*regs).r13),
            read_volatile(&(*regs).r12),
            read_volatile(&(*regs).rbp),
            read_volatile(&(*regs).rbx),
            read_volatile(&(*regs).r11),
            read_volatile(&(*regs).r10),
            read_volatile(&(*regs).r9),
            read_volatile(&(*regs).r8),
            read_volatile(&(*regs).rax),
            read_volatile(&(*regs).rcx),
            read_volatile(&(*regs).rdx),
            read_volatile(&(*regs).rsi),
            read_volatile(&(*regs).rdi),
            0,
        ]
    };
    all[(r & 15) as usize]
}

/// The stack word at `sp + off`: from the first `window` bytes of `win`
/// (read at `sp`) when it lies there, else read from the target.
#[inline(always)]
fn stack_at(win: *const StackWindow, window: u32, sp: u64, off: i32) -> Option<u64> {
    // (u32 offsets and the explicit index bound: the verifier could not
    // follow the single unsigned compare LLVM made of a signed test.)
    if off >= 0 {
        let o = off as u32;
        let i = (o >> 3) as usize;
        if o & 7 == 0 && o.wrapping_add(8) <= window && i < WINDOW_WORDS {
            // SAFETY: this CPU's element of a per-CPU array, valid for the program's run; `i` <
            // WINDOW_WORDS was checked.
            return Some(unsafe { (*win).words[i] });
        }
    }
    read_user(sp.wrapping_add(off as i64 as u64))
}

/// The value at a result site's location: a register, or a stack word
/// relative to the site's rsp (see `stack_at`; `window` 0 reads it).
#[inline(always)]
fn read_loc(
    regs: *const aya_ebpf::bindings::pt_regs,
    (loc, reg, off): (u8, u8, i32),
    win: *const StackWindow,
    window: u32,
    sp: u64,
) -> Option<u64> {
    match ValueLoc::try_from(loc) {
        Ok(ValueLoc::Reg) => Some(reg_at(regs, reg)),
        Ok(ValueLoc::Stack) => stack_at(win, window, sp, off),
        Ok(ValueLoc::None) | Err(_) => None,
    }
}

/// Whether the condition `cc` of a jcc (its opcode's low nibble) holds
/// for `flags` (rflags), as the CPU (and the kernel's emulation) decides.
#[inline(always)]
fn cond_holds(cc: u8, flags: u64) -> bool {
    let cf = flags & 1 != 0;
    let pf = flags & (1 << 2) != 0;
    let zf = flags & (1 << 6) != 0;
    let sf = flags & (1 << 7) != 0;
    let of = flags & (1 << 11) != 0;
    let base = match (cc >> 1) & 7 {
        0 => of,
        1 => cf,
        2 => zf,
        3 => cf || zf,
        4 => sf,
        5 => pf,
        6 => sf != of,
        _ => zf || sf != of,
    };
    base != (cc & 1 != 0)
}

/// A result site's probe: Some((ptr, size, where the walk from its caller starts))
/// when the call returns a block to record.
#[inline(always)]
fn result_site(
    regs: *const aya_ebpf::bindings::pt_regs,
    index: u32,
) -> Option<(u64, u64, WalkStart)> {
    let tid = target_thread()?;
    // (By reference: a copy would take stack the walk needs.)
    let site = RESULT_SITES.get(index)?;
    let win = STACK_WINDOW.get_ptr_mut(0)?;
    // SAFETY: the context is the kernel's pt_regs of this probe hit, readable for the program's
    // run.
    let (sp, flags) = unsafe { ((*regs).rsp, (*regs).eflags) };
    let entry_sp = sp.wrapping_add(site.entry_sp_delta as u64);
    let tgid = target_tgid();
    let size_at = (site.size_loc, site.size_reg, site.size_off);
    if site.capture != 0 {
        capture_size(regs, size_at, win, tid, sp, entry_sp);
    }
    let null = match site_outcome(site, flags) {
        Ok(SiteOutcome::Record) => false,
        Ok(SiteOutcome::Null) => true,
        Ok(SiteOutcome::Guard) => {
            count(Counter::UnforeseenReturns, 1);
            return None;
        }
        // (A byte that is no outcome: as nothing, userspace writes none.)
        Ok(SiteOutcome::Nothing) | Err(_) => return None,
    };
    // Whose call this is. No marks are left for a function probed at its
    // result sites (it has no entry probe to take them): a call of the
    // allocator's own is told by its return address, a tail call from
    // another entry point by its PENDING entry (such a function keeps
    // even its unsampled calls there).
    let key = PendingKey {
        tid,
        _pad: 0,
        sp: entry_sp,
    };
    if may_be_tail_call() && PENDING.get_ptr(&key).is_some() {
        return None;
    }
    // SAFETY: the context is the kernel's pt_regs of this probe hit, readable for the program's
    // run.
    let slot = cache_slot(unsafe { (*regs).rip }, sp);
    let (window, whole) = read_site_window(site, win, sp, slot, tgid);
    let loc = |at: (u8, u8, i32)| read_loc(regs, at, win, window, sp);
    let Some(ra) = stack_at(win, window, sp, site.entry_sp_delta as i32) else {
        count(Counter::PendingMapFull, 1);
        return None;
    };
    let ra = caller_of(ra, entry_sp);
    if in_allocator(ra) {
        count(Counter::AllocatorInternalCalls, 1);
        return None;
    }
    // The result where this site has it (rax, or the register the function
    // moves to rax before it returns).
    let ptr = reg_at(regs, site.result_reg);
    if null || ptr == 0 {
        count(Counter::FailedAllocs, 1);
        forget_capture(tid, entry_sp);
        return None;
    }
    let size = match loc(size_at) {
        Some(size) => size,
        None => captured_size(tid, entry_sp)?,
    };
    let mean = sample_mean();
    if mean != 0 && !sample(tid, mean, size) {
        count(Counter::UnsampledCalls, 1);
        return None;
    }
    let bp = loc((site.rbp_loc, site.rbp_reg, site.rbp_off)).unwrap_or(0);
    Some((
        ptr,
        size,
        WalkStart {
            pc: ra,
            sp: entry_sp.wrapping_add(8),
            bp,
            base: sp,
            window,
            whole,
            slot,
            tables_known: 0,
        },
    ))
}

/// The caller's return address `ra`, read at `entry_sp`, unless it is the
/// uretprobe trampoline (a return probe on this call, another tool's): then
/// the real one the kernel kept, or 0 if it has none (the block is then
/// recorded without its stack, counted in `stack_read_errors`).
#[inline(always)]
fn caller_of(ra: u64, entry_sp: u64) -> u64 {
    if ra != trampoline() {
        return ra;
    }
    match original_return(entry_sp) {
        Some(real) => {
            count(Counter::UnwindUretprobeFrames, 1);
            real
        }
        None => {
            count(Counter::StackReadErrors, 1);
            0
        }
    }
}

/// What the call does at this site, by the jcc's condition on `flags`.
#[inline(always)]
fn site_outcome(site: &ResultSite, flags: u64) -> Result<SiteOutcome, u8> {
    if site.cond == RESULT_ALWAYS || cond_holds(site.cond, flags) {
        site.taken()
    } else {
        site.not_taken()
    }
}

/// Keeps the size at `size_at` for a later site of the same call on thread
/// `tid`, where it may no longer be at hand.
#[inline(always)]
fn capture_size(
    regs: *const aya_ebpf::bindings::pt_regs,
    size_at: (u8, u8, i32),
    win: *const StackWindow,
    tid: u32,
    sp: u64,
    entry_sp: u64,
) {
    if let (Some(size), Some(c)) = (
        read_loc(regs, size_at, win, 0, sp),
        CAPTURES.get_ptr_mut(tid & (SAMPLE_THREADS - 1)),
    ) {
        // SAFETY: `c` is an element of the CAPTURES array, valid for the program's run; a
        // thread sharing its slot can at worst overwrite the capture, which the tid/sp check on
        // use catches.
        unsafe {
            *c = Capture {
                tid,
                _pad: 0,
                sp: entry_sp,
                size,
            }
        };
    }
}

/// Reads the stack window at `sp`: (bytes read, 1 if that is a whole window).
/// One read of the stack from here gives the return address, the caller's
/// rbp if it is saved, and the caller's frames for the walk: as much as the
/// walk remembered for this site last time, else a whole window. (Each
/// read of user memory costs more than the rest of the lookups together.)
#[inline(always)]
fn read_site_window(
    site: &ResultSite,
    win: *mut StackWindow,
    sp: u64,
    slot: u32,
    tgid: u32,
) -> (u32, u32) {
    let mut need = site.entry_sp_delta.wrapping_add(8);
    if matches!(ValueLoc::try_from(site.rbp_loc), Ok(ValueLoc::Stack)) && site.rbp_off >= 0 {
        need = need.max(site.rbp_off as u32 + 8);
    }
    let remembered = match WALK_CACHE.get(slot) {
        Some(c) if c.check != 0 && c.base == sp && c.tgid == tgid => c.extent.max(need),
        _ => 0,
    };
    // (The mask, on a value the compiler cannot see through, keeps the
    // length bounded for the verifier wherever the comparison ends up.)
    if remembered != 0
        && remembered < WINDOW_BYTES
        // SAFETY: `win` is this CPU's StackWindow and the length is masked below WINDOW_BYTES,
        // its size; bpf_probe_read_user is fault-tolerant: a bad user address gives an error,
        // not a fault.
        && unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                win.cast(),
                read_volatile(&remembered) & (WINDOW_BYTES - 1),
                sp as *const _,
            )
        } == 0
    {
        (remembered, 0)
    } else {
        (read_window(win, sp), 1)
    }
}

/// A failed call: a size it captured is not for the next one.
#[inline(always)]
fn forget_capture(tid: u32, entry_sp: u64) {
    if let Some(c) = CAPTURES.get_ptr_mut(tid & (SAMPLE_THREADS - 1)) {
        // SAFETY: `c` is an element of the CAPTURES array, valid for the program's run.
        unsafe {
            if (*c).tid == tid && (*c).sp == entry_sp {
                (*c).sp = 0;
            }
        }
    }
}

/// The size an earlier site of this call captured, taken: used once, so a
/// later call at the same stack pointer whose capture was missed (attached
/// in between) finds none.
#[inline(always)]
fn captured_size(tid: u32, entry_sp: u64) -> Option<u64> {
    let c = CAPTURES.get_ptr_mut(tid & (SAMPLE_THREADS - 1))?;
    // SAFETY: `c` is an element of the CAPTURES array, valid for the program's run.
    unsafe {
        if (*c).tid != tid || (*c).sp != entry_sp {
            // Another thread took the slot, a nested call, or
            // the capture came before the probes were all in.
            count(Counter::PendingMapFull, 1);
            return None;
        }
        (*c).sp = 0;
        Some((*c).size)
    }
}
