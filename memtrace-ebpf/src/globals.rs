//! The globals, read-only ones userspace sets before load, and their
//! readers (always volatile reads).

use core::ptr::read_volatile;
use memtrace_common::{DEFAULT_MAX_OUTSTANDING, UprobeOffsets, alloc_buckets};

/// Process being traced (set by userspace before load). The probes are
/// attached bound to this pid already; the check guards against anything
/// else that shares the mapped file's inode reaching our programs.
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;

/// `--sample-bytes`: mean distance in bytes between sampled allocations
/// (0: exact, every allocation is recorded). Set by userspace before load.
#[unsafe(no_mangle)]
static SAMPLE_MEAN_BYTES: u64 = 0;

/// 1: every program returns at once (`MEMTRACE_EMPTY_PROGRAMS=1`, for the
/// benchmark's floor: the cost of the traps alone at memtrace's probe
/// sites). A read-only global: the verifier drops the branch when it is 0.
#[unsafe(no_mangle)]
static EMPTY_PROGRAMS: u32 = 0;

#[inline(always)]
pub(crate) fn empty_programs() -> bool {
    // SAFETY: a static is always readable; volatile, so that LLVM does not fold in the initial
    // value (userspace sets it before load).
    unsafe { read_volatile(&EMPTY_PROGRAMS) != 0 }
}

/// Buckets of the block table (set by userspace before load: the entries
/// of `ALLOC_KEYS` and `ALLOCS`).
#[unsafe(no_mangle)]
static ALLOC_BUCKETS: u32 = alloc_buckets(DEFAULT_MAX_OUTSTANDING);

#[inline(always)]
pub(crate) fn target_tgid() -> u32 {
    // SAFETY: a static is always readable; volatile, so that LLVM does not fold in the initial
    // value (userspace sets it before load).
    unsafe { read_volatile(&TARGET_TGID) }
}

/// Zero, but unknown to the verifier: counters of a bpf_loop state that
/// start from it have no exact value, so the verifier's states of two
/// iterations compare equal and it checks the callback a few times instead
/// of once per possible iteration (which runs out of its budget).
#[unsafe(no_mangle)]
static mut OPAQUE_ZERO: u32 = 0;

#[inline(always)]
pub(crate) fn opaque_zero() -> u32 {
    // SAFETY: a static is always readable; volatile, so that LLVM does not fold in the initial
    // value.
    unsafe { read_volatile(&raw const OPAQUE_ZERO) }
}

/// Where `vm_flags` is in the kernel's `struct vm_area_struct`, from its
/// BTF (set by userspace before load; 0: unknown, every unmapping of the
/// target is taken as one of code).
#[unsafe(no_mangle)]
static VMA_FLAGS_OFFSET: u32 = 0;

#[inline(always)]
pub(crate) fn vma_flags_offset() -> u32 {
    // SAFETY: a static is always readable; volatile, so that LLVM does not fold in the initial
    // value (userspace sets it before load).
    unsafe { read_volatile(&VMA_FLAGS_OFFSET) }
}

#[inline(always)]
pub(crate) fn table_buckets() -> u32 {
    // SAFETY: a static is always readable; volatile, so that LLVM does not fold in the initial
    // value (userspace sets it before load).
    unsafe { read_volatile(&ALLOC_BUCKETS) }
}

#[inline(always)]
pub(crate) fn sample_mean() -> u64 {
    // SAFETY: a static is always readable; volatile, so that LLVM does not fold in the initial
    // value (userspace sets it before load).
    unsafe { read_volatile(&SAMPLE_MEAN_BYTES) }
}

/// The kernel's structure offsets the BPF side reads pending return probes
/// with (see `memtrace_common::UprobeOffsets`; set by userspace before load,
/// all 0 when unknown).
#[unsafe(no_mangle)]
static UPROBE_OFFSETS: UprobeOffsets = UprobeOffsets {
    task_mm: 0,
    task_utask: 0,
    mm_xol_area: 0,
    xol_area_vaddr: 0,
    utask_return_instances: 0,
    ri_stack: 0,
    ri_orig_ret_vaddr: 0,
    ri_next: 0,
};

#[inline(always)]
pub(crate) fn uprobe_offsets() -> UprobeOffsets {
    // SAFETY: a static is always readable; volatile, so that LLVM does not fold in the initial
    // value (userspace sets it before load).
    unsafe { read_volatile(&UPROBE_OFFSETS) }
}
