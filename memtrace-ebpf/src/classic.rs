//! Classic probes: one entry uprobe per argument layout of an allocating
//! function (`AllocKind`) and the shared return probe.

use crate::call::{SKIP_RETURN, call_args, enter, exit, result_in_doubt};
use crate::globals::empty_programs;
use crate::maps::CALL_MARK_STATE;
use crate::record::record_alloc;
use crate::target::regs_ret;
use aya_ebpf::{
    macros::uprobe, macros::uretprobe, programs::ProbeContext, programs::RetProbeContext,
};
use memtrace_common::{AllocKind, ArgRegs};

/// A classic entry probe's call.
#[inline(always)]
fn enter_kind(ctx: &ProbeContext, kind: AllocKind) -> u32 {
    if empty_programs() {
        return SKIP_RETURN;
    }
    // Classic probes sit where the arguments are in their own registers
    // (`links`: a cover site that moved them is not used for them).
    let args = call_args(ctx, kind, ArgRegs::AT_ENTRY);
    // No attach cookie here: whether the function may tail-call is in
    // CALL_MARK_STATE.
    let tail_kinds = match CALL_MARK_STATE.get_ptr(0) {
        // SAFETY: a pointer from an array map lookup: the element stays valid for the program's
        // run.
        Some(st) => unsafe { core::ptr::read_volatile(&raw const (*st).tail_kinds) },
        None => u64::MAX,
    };
    enter(
        ctx,
        kind,
        args,
        false,
        core::ptr::null_mut(),
        (tail_kinds >> (kind as u32 & 63)) & 1 != 0
            || result_in_doubt(ctx, kind, ArgRegs::AT_ENTRY),
    )
}

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::Malloc)
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::Calloc)
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::Realloc)
}

#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::ReallocArray)
}

#[uprobe]
pub fn memalign_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::Memalign)
}

#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::PosixMemalign)
}

#[uprobe]
pub fn valloc_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::Valloc)
}

#[uprobe]
pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::Pvalloc)
}

#[uprobe]
pub fn heap_malloc_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::HeapMalloc)
}

#[uprobe]
pub fn heap_calloc_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::HeapCalloc)
}

#[uprobe]
pub fn heap_realloc_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::HeapRealloc)
}

#[uprobe]
pub fn heap_reallocarray_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::HeapReallocArray)
}

#[uprobe]
pub fn xallocx_enter(ctx: ProbeContext) -> u32 {
    enter_kind(&ctx, AllocKind::Xallocx)
}

/// Return probe shared by every allocating entry point (classic probes).
#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    if empty_programs() {
        return 0;
    }
    if let Some((ptr, size)) = exit(&ctx, regs_ret(&ctx), 0) {
        record_alloc(&ctx, ptr, size, None);
    }
    0
}
