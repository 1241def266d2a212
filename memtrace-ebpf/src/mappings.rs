//! Memory mappings: every successful mmap, munmap and mremap of the target,
//! sent to userspace, which keeps the ranges (see
//! `memtrace_common::mappings`). At syscall tracepoints: nothing on the
//! malloc/free path.
//!
//! One program, `map_exit`, at the exits of the three syscalls, as
//! `resources::fd_exit` is for fds: the arguments come from the task's user
//! registers, the creating stack of an mmap is walked from them (through
//! the libc wrapper) into the shared `STACKS`. `unmaps`' programs at the
//! entries of the same syscalls watch for code unmapped; this one sees what
//! the syscall did, once it succeeded.

use crate::resources::{UserRegs, syscall_nr, syscall_ret, syscall_stack, user_regs};
use crate::target::is_target;
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use memtrace_common::NO_STACK;
use memtrace_common::mappings::{
    MAP_EVENTS_BYTES, MapCounter, MapEvent, MapOp, NUM_MAP_COUNTERS, nr,
};

/// The events, in the order the syscalls returned.
#[map]
static MAP_EVENTS: RingBuf = RingBuf::with_byte_size(MAP_EVENTS_BYTES, 0);

/// 1 on this CPU while `map_exit` walks a stack (see `walking_mmap`).
#[map]
static MAP_WALKING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Whether this CPU is walking an mmap's stack: such a walk may come before
/// a new thread has its Python state (glibc makes the thread's malloc arena
/// with mmap), and must not have the thread remembered as one without.
#[inline(always)]
pub(crate) fn walking_mmap() -> bool {
    MAP_WALKING.get(0).is_some_and(|w| *w != 0)
}

#[inline(always)]
fn set_walking(on: u32) {
    if let Some(p) = MAP_WALKING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run.
        unsafe { *p = on };
    }
}

/// Event counters (`MapCounter`), per CPU.
#[map]
static MAP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_MAP_COUNTERS, 0);

#[inline(always)]
fn map_count(c: MapCounter, n: u64) {
    if let Some(p) = MAP_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run.
        unsafe { *p += n };
    }
}

/// Errors are returned as -4095..-1: anything else is an address.
const MAX_ERRNO: u64 = 4095;

#[tracepoint]
pub fn map_exit(ctx: TracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    let (Some(nr), ret) = (syscall_nr(&ctx), syscall_ret(&ctx) as u64) else {
        return 0;
    };
    if ret >= MAX_ERRNO.wrapping_neg() {
        return 0;
    }
    let Some(regs) = user_regs() else {
        map_count(MapCounter::RegsReadErrors, 1);
        return 0;
    };
    let a = &regs.args;
    let mut e = MapEvent {
        addr: a[0],
        len: a[1],
        fd: -1,
        stack_id: NO_STACK,
        ..MapEvent::default()
    };
    match nr {
        nr::MMAP => {
            map_count(MapCounter::Maps, 1);
            e.op = MapOp::Map as u32;
            e.addr = ret;
            e.prot = a[2] as u32;
            e.flags = a[3];
            e.fd = a[4] as i32 as i64;
            e.offset = mmap_offset();
            e.stack_id = stack(&ctx, &regs);
        }
        nr::MUNMAP => {
            map_count(MapCounter::Unmaps, 1);
            e.op = MapOp::Unmap as u32;
        }
        nr::MREMAP => {
            map_count(MapCounter::Remaps, 1);
            e.op = MapOp::Remap as u32;
            e.new_len = a[2];
            e.prot = a[3] as u32;
            e.new_addr = ret;
        }
        _ => return 0,
    }
    // SAFETY: a helper with no preconditions.
    e.time_ns = unsafe { bpf_ktime_get_ns() };
    if MAP_EVENTS.output::<MapEvent>(&e, 0).is_err() {
        map_count(MapCounter::Lost, 1);
    }
    0
}

/// mmap's sixth argument (r9), which `UserRegs` does not keep.
#[inline(always)]
fn mmap_offset() -> u64 {
    crate::resources::user_reg_r9().unwrap_or(0)
}

/// The mmap's stack; what kept it from being stored is counted.
#[inline(always)]
fn stack(ctx: &TracePointContext, regs: &UserRegs) -> u64 {
    set_walking(1);
    let (id, failed) = syscall_stack(ctx, regs);
    set_walking(0);
    if id == NO_STACK {
        map_count(MapCounter::NoStack, 1);
        let causes = [
            MapCounter::StackReadErrors,
            MapCounter::StackMapFull,
            MapCounter::StackHashCollisions,
        ];
        for (n, c) in failed.into_iter().zip(causes) {
            if n != 0 {
                map_count(c, n);
            }
        }
    }
    id
}
