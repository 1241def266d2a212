//! The target's program and its children: `image_exec` at its exec,
//! `image_fork` when it creates a process, `fork_child` in that process when
//! it first returns to user space (`--follow-forks`). Tracepoints cannot be
//! bound to a process: they run for every task on the host and return at
//! once unless it is the target's (one tgid compare) or, for `fork_child`,
//! one of its new children (one hash lookup, in processes just created).

use core::ptr::{read_volatile, write_volatile};

use crate::atomic::fetch_inc;
use crate::maps::{FORK_CHILDREN, TRACE_STATE};
use crate::target::is_target;
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_send_signal},
    macros::tracepoint,
    programs::TracePointContext,
};
use memtrace_common::{FORK_CHILD_BORN, FORK_CHILD_STOPPED, MAX_FORK_PIDS};

/// `task:task_newtask` record offsets (its format file): the new task's
/// pid and the clone flags.
pub(crate) const NEWTASK_PID: usize = 8;
pub(crate) const NEWTASK_CLONE_FLAGS: usize = 32;
const CLONE_THREAD: u64 = 0x0001_0000;

/// `sched:sched_process_exec`, in the task that exec'd, once the new
/// program is in place and before it runs. Every address this object knows
/// (allocator, unwind tables, modules) is the old program's: tracing by it
/// ends here, so the old links, which may still match the new program's
/// copy of the same library, count nothing. In launch mode the target is
/// stopped so that memtrace attaches to the new program before it runs.
#[tracepoint]
pub fn image_exec(_ctx: TracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    let Some(st) = TRACE_STATE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the one element of an array map, valid for the program's run; aligned fields,
    // volatile as userspace reads and writes them.
    let stop = unsafe {
        write_volatile(&raw mut (*st).ended, 1);
        write_volatile(&raw mut (*st).exec_ns, bpf_ktime_get_ns());
        write_volatile(&raw mut (*st).exec_seen, 1);
        read_volatile(&raw const (*st).stop_at_exec) != 0
    };
    if stop {
        // SAFETY: bpf_send_signal only signals the current task, the target's (checked above).
        unsafe {
            bpf_send_signal(19 /* SIGSTOP */)
        };
    }
    0
}

/// `task:task_newtask`, in the parent: counts the processes the target
/// creates (a new thread is not one) and keeps the first pids. With
/// `--follow-forks` the child goes into `FORK_CHILDREN`, before it can run,
/// for `fork_child` to stop it.
#[tracepoint]
pub fn image_fork(ctx: TracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    // SAFETY: reads the tracepoint's record at its format's offsets; bpf_probe_read_kernel
    // fails rather than faults.
    let (Ok(flags), Ok(pid)) = (unsafe { ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS) }, unsafe {
        ctx.read_at::<i32>(NEWTASK_PID)
    }) else {
        return 0;
    };
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    let Some(st) = TRACE_STATE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the one element of an array map, valid for the program's run; an aligned u64.
    let n = unsafe { fetch_inc(&raw mut (*st).forks) } as usize;
    if n < MAX_FORK_PIDS {
        // SAFETY: as above; `n` is within the array.
        unsafe { write_volatile(&raw mut (*st).fork_pids[n], pid as u32) };
    }
    // SAFETY: as above; an aligned u32 userspace sets.
    if unsafe { read_volatile(&raw const (*st).follow_forks) } != 0 {
        // A full map leaves the child unstopped: userspace counts it as not
        // followed (it is in `forks` but never in the map).
        let _ = FORK_CHILDREN.insert(&(pid as u32), &FORK_CHILD_BORN, 0);
    }
    0
}

/// `syscalls:sys_exit_{clone,clone3,fork,vfork}`, in the new process as it
/// first returns to user space (the kernel runs a new task's syscall exit
/// like its parent's): a child `image_fork` put in `FORK_CHILDREN` stops
/// there, before its first instruction, until memtrace has attached to it
/// and sends SIGCONT.
#[tracepoint]
pub fn fork_child(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // (A new thread of a process, or the parent's own return, is not a new
    // process's first return.)
    if tgid != id as u32 {
        return 0;
    }
    let Some(state) = FORK_CHILDREN.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: a value of a hash map's entry, valid for the program's run; aligned.
    unsafe {
        if read_volatile(state) != FORK_CHILD_BORN {
            return 0;
        }
        write_volatile(state, FORK_CHILD_STOPPED);
        // bpf_send_signal only signals the current task: the new child.
        bpf_send_signal(19 /* SIGSTOP */);
    }
    0
}
