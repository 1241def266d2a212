//! One step of the walk: the `.eh_frame` row of a pc, or the frame pointer
//! where there is none.

use crate::counters::count;
use crate::maps::{COUNTERS, PC_PAGES, STACK_SCRATCH, STACK_WINDOW, UNWIND_ROWS, WALK_CACHE};
use crate::target::{read_user, read_user_pair};
use crate::uretprobe::known_trampoline;
use crate::walk::{CACHE_WORDS, WINDOW_WORDS, WalkStart};
use aya_ebpf::helpers::bpf_loop;
use memtrace_common::{
    CfaRule, Counter, MAX_ROWS_PER_PAGE_LOG2, MAX_STACK_DEPTH, NUM_COUNTERS, PC_PAGE_SHIFT,
    PageKey, RbpRule, STACK_TRUNCATED_DEPTH, STACK_TRUNCATED_NO_FP, STACK_TRUNCATED_READ,
    STACK_TRUNCATED_UNSUPPORTED, STACK_TRUNCATED_URETPROBE, STACK_USED_FP, UnwindRow,
};

/// State of a stack walk, on the BPF stack (bpf_loop's context must be).
#[repr(C)]
pub(crate) struct Walk {
    pub(crate) pc: u64,
    pub(crate) sp: u64,
    pub(crate) bp: u64,
    /// The stack pointer the walk started at: the window's first byte.
    pub(crate) sp0: u64,
    pub(crate) tgid: u32,
    pub(crate) flags: u32,
    pub(crate) len: u32,
    /// Bytes of the window that were read.
    pub(crate) window: u32,
    /// WALK_CACHE slot recording the walk's reads, while `cacheable`.
    pub(crate) slot: u32,
    pub(crate) cacheable: u32,
    pub(crate) words: u32,
    pub(crate) extent: u32,
    pub(crate) fp_frames: u32,
    pub(crate) stop: u32,
}

impl Walk {
    /// A walk from `start`, with `window` bytes of its window read.
    #[inline(always)]
    pub(crate) fn new(start: &WalkStart, tgid: u32, window: u32) -> Walk {
        Walk {
            pc: start.pc,
            sp: start.sp,
            bp: start.bp,
            sp0: start.base,
            tgid,
            flags: 0,
            len: 0,
            window,
            slot: start.slot,
            cacheable: 1,
            words: 0,
            extent: 0,
            fp_frames: 0,
            stop: 0,
        }
    }
}

/// Walks the stack from `w` into STACK_SCRATCH, one `walk_step` per frame.
#[inline(always)]
pub(crate) fn walk(w: &mut Walk) {
    // SAFETY: `w` outlives the loop, and walk_step takes exactly this context type.
    unsafe {
        bpf_loop(
            MAX_STACK_DEPTH as u32 + 1,
            walk_step as *mut core::ffi::c_void,
            (w as *mut Walk).cast(),
            0,
        )
    };
}

/// The row that covers `pc`: the page index gives the few candidate rows,
/// a short binary search picks the last one at or before `pc`.
#[inline(always)]
fn find_row(tgid: u32, pc: u64) -> Option<UnwindRow> {
    let key = PageKey {
        tgid,
        _pad: 0,
        page: pc >> PC_PAGE_SHIFT,
    };
    // SAFETY: a hash map element stays readable until the program ends even if userspace
    // deletes it (RCU); a concurrent update can at worst give a torn row range, and
    // UNWIND_ROWS.get bounds every index.
    let page = unsafe { PC_PAGES.get(&key) }?;
    if page.row_count == 0 {
        return None;
    }
    let rel = pc.wrapping_sub(page.pc_base) as u32;
    let (mut lo, mut hi) = (page.first_row, page.first_row + page.row_count);
    let mut i = 0;
    while i < MAX_ROWS_PER_PAGE_LOG2 + 1 && hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if UNWIND_ROWS.get(mid)?.pc <= rel {
            lo = mid;
        } else {
            hi = mid;
        }
        i += 1;
    }
    let row = UNWIND_ROWS.get(lo)?;
    (row.pc <= rel).then_some(*row)
}

/// The stack word at `addr` if the window holds it, recorded for the cache
/// if the walk depends on it (`record`).
#[inline(always)]
fn window_word(w: &mut Walk, addr: u64, record: bool) -> Option<u64> {
    let off = addr.wrapping_sub(w.sp0);
    if off & 7 != 0 || off >= w.window as u64 {
        return None;
    }
    let i = (off >> 3) as usize;
    if i >= WINDOW_WORDS {
        return None;
    }
    let win = STACK_WINDOW.get_ptr(0)?;
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run; `i` <
    // WINDOW_WORDS was checked.
    let v = unsafe { (*win).words[i] };
    if record && w.cacheable != 0 {
        let n = w.words as usize;
        match WALK_CACHE.get_ptr_mut(w.slot) {
            Some(c) if n < CACHE_WORDS => {
                // SAFETY: this CPU's element of a per-CPU array, valid for the program's run;
                // `n` < CACHE_WORDS was checked.
                unsafe {
                    (*c).index[n] = i as u32;
                    (*c).value[n] = v;
                }
                w.words += 1;
                w.extent = w.extent.max(off as u32 + 8);
            }
            _ => w.cacheable = 0,
        }
    }
    Some(v)
}

/// One word of the stack: from the window, else read (and the walk is
/// not remembered).
#[inline(always)]
fn stack_word(w: &mut Walk, addr: u64) -> Option<u64> {
    if let Some(v) = window_word(w, addr, true) {
        return Some(v);
    }
    w.cacheable = 0;
    read_user(addr)
}

/// Two consecutive words of the stack, as `stack_word`; the walk depends
/// on the first one only if `first_used` (a remembered walk checks only
/// the words it depends on).
#[inline(always)]
fn stack_pair(w: &mut Walk, addr: u64, first_used: bool) -> Option<[u64; 2]> {
    let off = addr.wrapping_sub(w.sp0);
    if off.wrapping_add(16) <= w.window as u64 && off < w.window as u64 {
        if let (Some(a), Some(b)) = (
            window_word(w, addr, first_used),
            window_word(w, addr + 8, true),
        ) {
            return Some([a, b]);
        }
    }
    w.cacheable = 0;
    read_user_pair(addr)
}

/// Ends the walk early for `reason` (counted once the walk is over).
#[inline(always)]
pub(crate) fn stop(w: &mut Walk, flag: u32, reason: Counter) -> i64 {
    w.flags |= flag;
    w.stop = reason as u32 + 1;
    1
}

/// bpf_loop's callback: one `walk_frame`. (A callback must be a static
/// function, which the verifier checks again for every state it is
/// called in; the frame's work is in a global one, checked once.)
extern "C" fn walk_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // The verifier wants a callback's 0 or 1 known as such, not the
    // global function's unknown result (black_box: LLVM would see that
    // walk_frame returns 0 or 1 and drop the test).
    (core::hint::black_box(walk_frame(ctx as *mut Walk)) != 0) as i64
}

/// One step of the walk: records `w.pc`, then moves to the caller.
/// Returns 1 to stop (bpf_loop's convention).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn walk_frame(w: *mut Walk) -> i64 {
    // SAFETY: bpf_loop passes back `walk`'s pointer to the Walk on its caller's stack, live for
    // the whole loop and used by nothing else meanwhile.
    let Some(w) = (unsafe { w.as_mut() }) else {
        return 1;
    };
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run; nothing else
    // in this program refers to it during the step.
    let scratch = unsafe { &mut *scratch };
    let n = w.len as usize;
    if n >= MAX_STACK_DEPTH {
        return stop(w, STACK_TRUNCATED_DEPTH, Counter::UnwindDepthLimit);
    }
    scratch.frames[n] = w.pc;
    w.len += 1;

    // Every pc is a return address: look up the call instruction, pc - 1
    // (after a call to a noreturn function, pc itself may be past the end
    // of the caller).
    let lookup = w.pc.wrapping_sub(1);
    let row = find_row(w.tgid, lookup);
    // No row: the frame-pointer fallback, as for a `CfaRule::None` row.
    let cfa_rule = row.map_or(Ok(CfaRule::None), |r| r.cfa());
    let (cfa, ra, bp) = match cfa_rule {
        Ok(CfaRule::End) => return 1,
        Ok(rule @ (CfaRule::Rsp | CfaRule::Rbp | CfaRule::Plt)) => {
            let r = row.unwrap_or_default();
            let cfa = match rule {
                CfaRule::Rsp => w.sp.wrapping_add(r.cfa_offset as i64 as u64),
                CfaRule::Rbp => {
                    if w.bp == 0 {
                        return stop(w, STACK_TRUNCATED_UNSUPPORTED, Counter::UnwindUnsupported);
                    }
                    w.bp.wrapping_add(r.cfa_offset as i64 as u64)
                }
                // CfaRule::Plt, the one left (the outer match took the others).
                _ => {
                    let extra = if (w.pc & 15) >= r.cfa_offset as u64 {
                        8
                    } else {
                        0
                    };
                    w.sp + 8 + extra
                }
            };
            // The return address and the word below it, where the usual
            // frame saves rbp. (`matches!` and `r.rbp()` twice, not a
            // `Result` compared with `==`: that compiled to other code, which
            // cost the verifier 30% more work in alloc_result.)
            let below_used = matches!(r.rbp(), Ok(RbpRule::AtCfa)) && r.rbp_offset == -16;
            let Some([below, ra]) = stack_pair(w, cfa.wrapping_sub(16), below_used) else {
                return stop(w, STACK_TRUNCATED_READ, Counter::UnwindBadRead);
            };
            let bp = match r.rbp() {
                Ok(RbpRule::Same) => w.bp,
                Ok(RbpRule::AtCfa) if r.rbp_offset == -16 => below,
                Ok(RbpRule::AtCfa) => {
                    match stack_word(w, cfa.wrapping_add(r.rbp_offset as i64 as u64)) {
                        Some(bp) => bp,
                        None => {
                            return stop(w, STACK_TRUNCATED_READ, Counter::UnwindBadRead);
                        }
                    }
                }
                Ok(RbpRule::Unsupported) | Err(_) => 0,
            };
            (cfa, ra, bp)
        }
        Ok(CfaRule::None) => {
            if w.pc == known_trampoline() {
                // Not a frame: a return probe pending on this one (another
                // tool's uretprobe on a function of the program) replaced the
                // return address the last step read. (The trampoline has no
                // row, so it always comes here.) The kernel keeps the real
                // one, but looking it up in this loop costs the verifier too
                // much; a result site's caller, the usual case, is looked up
                // (`caller_of`).
                w.len -= 1;
                return stop(
                    w,
                    STACK_TRUNCATED_URETPROBE,
                    Counter::UnwindUretprobeUnresolved,
                );
            }
            // No unwind information here: follow the frame pointer.
            if w.bp == 0 || w.bp < w.sp {
                return stop(w, STACK_TRUNCATED_NO_FP, Counter::UnwindNoFramePointer);
            }
            let Some([bp, ra]) = stack_pair(w, w.bp, true) else {
                return stop(w, STACK_TRUNCATED_READ, Counter::UnwindBadRead);
            };
            w.flags |= STACK_USED_FP;
            w.fp_frames += 1;
            (w.bp + 16, ra, bp)
        }
        // A rule the walk cannot follow, or a byte that is no rule.
        Ok(CfaRule::Unsupported) | Err(_) => {
            return stop(w, STACK_TRUNCATED_UNSUPPORTED, Counter::UnwindUnsupported);
        }
    };
    if ra == 0 {
        return 1;
    }
    w.pc = ra;
    w.sp = cfa;
    w.bp = bp;
    0
}

/// Counts what a walk (walked or remembered) stepped over and why it stopped.
#[inline(always)]
pub(crate) fn count_walk(fp_frames: u32, stop: u32) {
    if fp_frames != 0 {
        count(Counter::UnwindFpFallbackFrames, fp_frames as u64);
    }
    if stop != 0 && stop <= NUM_COUNTERS {
        if let Some(p) = COUNTERS.get_ptr_mut(stop - 1) {
            // SAFETY: this CPU's counter, valid for the program's run (see `count`).
            unsafe { *p += 1 };
        }
    }
}
