//! Code unmapped while traced: tracepoints at the entry of munmap, mmap and
//! mremap see the target unmap, or map over, a range that holds executable
//! code (a library's dlclose). Each such range makes a new code generation
//! (see `memtrace_common::CodeState`): logged for userspace, and merged into
//! `UNMAPPED_CODE`, which `walk::store` mixes into the ids of stacks with
//! frames there. So a stack taken in a library and the same addresses taken
//! in another one loaded there later are two stacks, each of its generation.
//!
//! Seen at the syscall's entry, before anything is unmapped: a stack whose
//! generation is older was taken in the code mapped before.

use core::ffi::c_void;
use core::ptr::write_volatile;

use crate::atomic::fetch_inc;
use crate::globals::{target_tgid, vma_flags_offset};
use crate::maps::{CODE_STATE, CODE_UNMAP_LOG, PC_PAGES, UNMAPPED_CODE};
use crate::target::is_target;
use aya_ebpf::{
    helpers::{
        bpf_loop,
        generated::{bpf_find_vma, bpf_get_current_task_btf, bpf_probe_read_kernel},
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use memtrace_common::{
    CODE_UNMAP_LOG_ENTRIES, CodeState, CodeUnmap, MAX_UNMAPPED_RANGES, PC_PAGE_SHIFT, PageKey,
    VM_EXEC,
};

/// The arguments in a `syscalls:sys_enter_*` record (after the common
/// header and `__syscall_nr`): unsigned longs from offset 16.
const ARG: [usize; 5] = [16, 24, 32, 40, 48];

/// mmap's MAP_FIXED: the new mapping replaces whatever is there.
/// (MAP_FIXED_NOREPLACE fails instead, and has its own bit.)
const MAP_FIXED: u64 = 0x10;
/// mremap's MREMAP_FIXED: the range at `new_address` is replaced.
const MREMAP_FIXED: u64 = 2;

/// Mappings looked at in one range before taking it as code unseen (a
/// library spans four or five: its segments and the holes between).
const MAX_VMAS: u32 = 16;

#[inline(always)]
fn arg(ctx: &TracePointContext, i: usize) -> Option<u64> {
    // SAFETY: reads the syscall's argument from the tracepoint's record, which is as long as
    // the format says (`ARG` offsets); bpf_probe_read_kernel fails rather than faults.
    unsafe { ctx.read_at::<u64>(ARG[i]) }.ok()
}

/// `munmap(addr, len)`.
#[tracepoint]
pub fn unmap_munmap(ctx: TracePointContext) -> u32 {
    if is_target()
        && let (Some(addr), Some(len)) = (arg(&ctx, 0), arg(&ctx, 1))
    {
        unmapping(addr, len);
    }
    0
}

/// `mmap(addr, len, prot, flags, fd, off)`: only MAP_FIXED replaces.
#[tracepoint]
pub fn unmap_mmap(ctx: TracePointContext) -> u32 {
    if is_target()
        && let (Some(addr), Some(len), Some(flags)) = (arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 3))
        && flags & MAP_FIXED != 0
    {
        unmapping(addr, len);
    }
    0
}

/// `mremap(addr, old_len, new_len, flags, new_addr)`: the old range moves
/// or changes; with MREMAP_FIXED the new one is replaced.
#[tracepoint]
pub fn unmap_mremap(ctx: TracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    if let (Some(addr), Some(len)) = (arg(&ctx, 0), arg(&ctx, 1)) {
        unmapping(addr, len);
    }
    if let (Some(len), Some(flags), Some(to)) = (arg(&ctx, 2), arg(&ctx, 3), arg(&ctx, 4))
        && flags & MREMAP_FIXED != 0
    {
        unmapping(to, len);
    }
    0
}

/// `[addr, addr + len)` is about to be unmapped or replaced: a new code
/// generation if it holds code (or may: what cannot be looked at counts).
#[inline(always)]
fn unmapping(addr: u64, len: u64) {
    let end = addr.saturating_add(len).saturating_add(4095) & !4095;
    if len == 0 {
        return;
    }
    match holds_code(addr, end) {
        Some(false) => {}
        Some(true) => {
            record(addr, end);
            forget_pages(addr, end);
        }
        // Maybe code: a new generation all the same, but no pages removed
        // (this may be a large range of data, each page a lookup).
        None => record(addr, end),
    }
}

/// Pages of code removed from PC_PAGES at most per unmapping (64 MiB of
/// code); userspace removes what is left at its next read of the maps.
const MAX_FORGOTTEN_PAGES: u32 = 1 << 16;

/// The code pages of `forget_page`'s loop.
#[repr(C)]
struct Pages {
    tgid: u32,
    _pad: u32,
    first: u64,
    count: u64,
}

/// One page's unwind rows removed. (A bpf_loop callback.)
extern "C" fn forget_page(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back `forget_pages`'s Pages, on its stack, used by nothing else
    // meanwhile.
    let p = unsafe { &*(ctx as *const Pages) };
    if i >= p.count {
        return 1;
    }
    let key = PageKey {
        tgid: p.tgid,
        _pad: 0,
        page: p.first + i,
    };
    let _ = PC_PAGES.remove(&key);
    0
}

/// The unwind rows of the code in `[start, end)` are removed: code mapped
/// there next is walked with frame pointers until userspace loads its own
/// rows, never with those of the code unmapped.
#[inline(always)]
fn forget_pages(start: u64, end: u64) {
    let mut p = Pages {
        tgid: target_tgid(),
        _pad: 0,
        first: start >> PC_PAGE_SHIFT,
        count: (end >> PC_PAGE_SHIFT).saturating_sub(start >> PC_PAGE_SHIFT),
    };
    // SAFETY: `p` outlives the loop, and forget_page takes exactly this context type.
    unsafe {
        bpf_loop(
            MAX_FORGOTTEN_PAGES,
            forget_page as *mut c_void,
            (&raw mut p).cast(),
            0,
        )
    };
}

/// The walk of the mappings over a range, one `bpf_find_vma` at a time.
#[repr(C)]
struct VmaWalk {
    /// Where the next mapping is looked for.
    at: u64,
    /// The end of the mapping found at `at`.
    vma_end: u64,
    /// Its `vm_flags`.
    flags: u64,
    /// Whether the last callback could read both.
    read: u32,
    _pad: u32,
}

/// `bpf_find_vma`'s callback: the end and flags of the mapping holding `at`.
extern "C" fn vma_found(_task: *mut c_void, vma: *mut c_void, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_find_vma passes back `holds_code`'s VmaWalk, on its stack, used by nothing
    // else meanwhile.
    let w = unsafe { &mut *(ctx as *mut VmaWalk) };
    let vma = vma as *const u8;
    // SAFETY: reads of the kernel's vm_area_struct, which bpf_find_vma holds for the callback:
    // vm_end is its second word in every kernel memtrace runs on, vm_flags where its BTF says;
    // bpf_probe_read_kernel fails rather than faults.
    let (end, flags) = unsafe {
        (
            bpf_probe_read_kernel((&raw mut w.vma_end).cast(), 8, vma.wrapping_add(8).cast()),
            bpf_probe_read_kernel(
                (&raw mut w.flags).cast(),
                8,
                vma.wrapping_add(vma_flags_offset() as usize).cast(),
            ),
        )
    };
    w.read = (end == 0 && flags == 0) as u32;
    0
}

/// Whether an executable mapping lies in `[start, end)`; None when that
/// cannot be told (the mappings are being changed by another thread, a
/// hole, too many mappings, no `vm_flags` offset).
#[inline(always)]
fn holds_code(start: u64, end: u64) -> Option<bool> {
    if vma_flags_offset() == 0 {
        return None;
    }
    // SAFETY: a helper with no preconditions; its task is the current one.
    let task = unsafe { bpf_get_current_task_btf() };
    let mut w = VmaWalk {
        at: start,
        vma_end: 0,
        flags: 0,
        read: 0,
        _pad: 0,
    };
    for _ in 0..MAX_VMAS {
        if w.at >= end {
            return Some(false);
        }
        w.read = 0;
        // SAFETY: `w` outlives the call, and vma_found takes exactly this context type.
        let found =
            unsafe { bpf_find_vma(task, w.at, vma_found as *mut c_void, (&raw mut w).cast(), 0) };
        // Not found: a hole (the next mapping cannot be had); -EBUSY: the
        // mappings are being changed.
        if found != 0 || w.read == 0 || w.vma_end <= w.at {
            return None;
        }
        if w.flags & VM_EXEC != 0 {
            return Some(true);
        }
        w.at = w.vma_end;
    }
    None
}

/// A new code generation for `[start, end)`: logged, and merged into
/// UNMAPPED_CODE.
#[inline(always)]
fn record(start: u64, end: u64) {
    let Some(state) = CODE_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the only element of an array map, valid for the program's run; the generation
    // is a u64 updated atomically.
    let generation = unsafe { fetch_inc(&raw mut (*state).generation) } + 1;
    if let Some(e) = CODE_UNMAP_LOG.get_ptr_mut((generation % CODE_UNMAP_LOG_ENTRIES as u64) as u32)
    {
        // SAFETY: an element of an array map, valid for the program's run. The generation is
        // written last: userspace takes an entry as complete once it holds its own.
        unsafe {
            (*e).start = start;
            (*e).end = end;
            write_volatile(&raw mut (*e).generation, generation);
        }
    }
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    merge(state, start, end, generation);
}

/// Into the UNMAPPED_CODE entry the range overlaps, else a free one, else
/// (all taken) the one its generation picks: merged, an entry stands for
/// more code than was unmapped, which splits stacks, never merges them.
#[inline(always)]
fn merge(state: &mut CodeState, start: u64, end: u64, generation: u64) {
    let used = state.ranges.min(MAX_UNMAPPED_RANGES as u64) as u32;
    let mut slot = u32::MAX;
    for i in 0..MAX_UNMAPPED_RANGES {
        if i >= used {
            break;
        }
        if let Some(e) = UNMAPPED_CODE.get(i)
            && e.start < end
            && start < e.end
        {
            slot = i;
            break;
        }
    }
    if slot == u32::MAX {
        // SAFETY: a u64 of the state's element, updated atomically.
        let claimed = unsafe { fetch_inc(&raw mut state.ranges) };
        slot = if claimed < MAX_UNMAPPED_RANGES as u64 {
            claimed as u32
        } else {
            (generation % MAX_UNMAPPED_RANGES as u64) as u32
        };
    }
    let Some(e) = UNMAPPED_CODE.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: an element of an array map, valid for the program's run.
    let e = unsafe { &mut *e };
    let (lo, hi) = if e.end > e.start {
        (e.start.min(start), e.end.max(end))
    } else {
        (start, end)
    };
    *e = CodeUnmap {
        start: lo,
        end: hi,
        generation,
    };
    state.lo = if state.hi == 0 { lo } else { state.lo.min(lo) };
    state.hi = state.hi.max(hi);
}
