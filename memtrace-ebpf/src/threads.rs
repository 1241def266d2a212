//! Threads: who creates them, when they end, and whether their end was
//! accounted for (joined or detached), at syscall tracepoints and at uprobes
//! on the rare pthread calls; nothing on the malloc/free path.
//!
//! `thread_created` runs at the exit of clone and clone3 in both tasks: in
//! the creator (the result is the new thread's id) it walks the stack from
//! the task's user registers, as `fd_exit` does, through the libc wrapper;
//! in the new thread (result 0) it makes the entry if the creator's exit has
//! not yet, since the new thread may run and end before its creator returns.
//! `thread_exit` (`sys_enter_exit`, the syscall a thread ends by; a process
//! ends by exit_group, which ends its other threads without it) marks the
//! thread exited. Join and detach are seen at their returns
//! (`thread_call_return`), with the `pthread_t` their entries kept: an
//! exited thread joined or detached is done and its entry removed; one that
//! exited and was neither still holds its stack mapping.

use core::ptr::{read_volatile, write_volatile};

use crate::images::{NEWTASK_CLONE_FLAGS, NEWTASK_PID};
use crate::resources::{UserRegs, syscall_stack, user_regs};
use crate::target::{read_user, regs_ret, target_thread};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns},
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{HashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use memtrace_common::NO_STACK;
use memtrace_common::threads::{
    ATTR_FLAG_DETACHSTATE, CALL_CREATE, CALL_CREATE_DETACHED, CALL_DETACH, CALL_JOIN,
    CLONE_ARGS_FLAGS, CLONE_ARGS_TLS, CLONE_THREAD, MAX_THREAD_CALLS, MAX_THREAD_SITES,
    MAX_THREADS, NUM_THREAD_COUNTERS, PTHREAD_ATTR_FLAGS, ThreadCall, ThreadCounter, ThreadRec, nr,
};

/// Thread id → the thread created while traced and not yet done.
#[map]
static THREADS: HashMap<u32, ThreadRec> = HashMap::with_max_entries(MAX_THREADS, 0);

/// `pthread_t` → thread id, for join and detach.
#[map]
static THREAD_BY_PTHREAD: HashMap<u64, u32> = HashMap::with_max_entries(MAX_THREADS, 0);

/// Caller's thread id → its pthread call in flight.
#[map]
static THREAD_CALLS: HashMap<u32, ThreadCall> = HashMap::with_max_entries(MAX_THREAD_CALLS, 0);

/// Creating stack → threads created there.
#[map]
static THREAD_SITE_CREATED: HashMap<u64, u64> =
    HashMap::with_max_entries(MAX_THREAD_SITES, BPF_F_NO_PREALLOC);

/// Creator's thread id → the host's id of the thread its clone just made,
/// from `thread_newtask`: clone returns the id in the creator's pid
/// namespace, which in a container is not the host's id that
/// `bpf_get_current_pid_tgid` gives the new thread and every other probe.
#[map]
static NEW_THREAD: HashMap<u32, u32> = HashMap::with_max_entries(MAX_THREAD_CALLS, 0);

/// Event counters (`ThreadCounter`), per CPU.
#[map]
static THREAD_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_THREAD_COUNTERS, 0);

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper with no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn count(c: ThreadCounter) {
    if let Some(p) = THREAD_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run.
        unsafe { *p += 1 };
    }
}

/// The clone's flags and `tls` (glibc's `pthread_t` for the new thread).
#[inline(always)]
fn clone_flags_tls(nr: u64, regs: &UserRegs) -> Option<(u64, u64)> {
    match nr {
        // clone(flags, stack, parent_tid, child_tid, tls) on x86-64.
        nr::CLONE => Some((regs.args[0], regs.args[4])),
        nr::CLONE3 => {
            let args = regs.args[0];
            Some((
                read_user(args + CLONE_ARGS_FLAGS)?,
                read_user(args + CLONE_ARGS_TLS)?,
            ))
        }
        _ => None,
    }
}

/// `task:task_newtask`, in the creator, before its clone returns: the new
/// thread's host id (the record's `pid` is the task's id in the initial
/// namespace), for `thread_created`.
#[tracepoint]
pub fn thread_newtask(ctx: TracePointContext) -> u32 {
    let Some(me) = target_thread() else {
        return 0;
    };
    // SAFETY: reads the tracepoint's record at its format's offsets; bpf_probe_read_kernel
    // fails rather than faults.
    let (Ok(flags), Ok(tid)) = (unsafe { ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS) }, unsafe {
        ctx.read_at::<i32>(NEWTASK_PID)
    }) else {
        return 0;
    };
    if flags & CLONE_THREAD != 0 {
        let _ = NEW_THREAD.insert(&me, &(tid as u32), 0);
    }
    0
}

/// The new thread's host id, as `thread_newtask` saw it made by `me`; else
/// clone's result (the same outside a pid namespace).
#[inline(always)]
fn new_thread_id(me: u32, ret: i64) -> u32 {
    // SAFETY: a value from a hash map lookup, copied at once.
    match unsafe { NEW_THREAD.get(&me) }.copied() {
        Some(tid) => {
            let _ = NEW_THREAD.remove(&me);
            tid
        }
        None => ret as u32,
    }
}

#[tracepoint]
pub fn thread_created(ctx: TracePointContext) -> u32 {
    let Some(me) = target_thread() else {
        return 0;
    };
    // SAFETY: `int __syscall_nr` at 8 and `long ret` at 16 of every sys_exit record;
    // bpf_probe_read_kernel fails rather than faults.
    let (Ok(nr), Ok(ret)) = (unsafe { (ctx.read_at::<i32>(8), ctx.read_at::<i64>(16)) }) else {
        return 0;
    };
    if ret < 0 {
        return 0;
    }
    if ret == 0 {
        // A new thread of the target (a new process has a tgid of its
        // own), back from clone: its entry, if its creator's exit has not
        // made it (the stack and pthread_t come with that one).
        let rec = ThreadRec {
            stack_id: NO_STACK,
            born_ns: now(),
            ..Default::default()
        };
        let _ = THREADS.insert(&me, &rec, BPF_NOEXIST as u64);
        return 0;
    }
    let tid = new_thread_id(me, ret);
    let Some(mut regs) = user_regs() else {
        count(ThreadCounter::RegsReadErrors);
        return 0;
    };
    let Some((flags, tls)) = clone_flags_tls(nr as u64, &regs) else {
        return 0;
    };
    if flags & CLONE_THREAD == 0 {
        return 0;
    }
    // glibc's __clone3 and __clone end their unwind info before the
    // syscall (it would be wrong in the child), and neither moves rsp: the
    // walk starts at their caller, whose return address is at rsp.
    if regs.return_from_leaf().is_none() {
        count(ThreadCounter::RegsReadErrors);
        return 0;
    }
    created(&ctx, &regs, me, tid, tls);
    0
}

/// The creator's side: thread `tid` was created with this stack.
#[inline(always)]
fn created(ctx: &TracePointContext, regs: &UserRegs, me: u32, tid: u32, tls: u64) {
    count(ThreadCounter::Created);
    let (stack, _) = syscall_stack(ctx, regs);
    if stack == NO_STACK {
        count(ThreadCounter::NoStack);
    }
    count_site(stack);
    let (detached, raw_clone) = creating_call(me);
    let rec = ThreadRec {
        stack_id: stack,
        born_ns: now(),
        pthread: tls,
        detached,
        creator_seen: 1,
        raw_clone,
        ..Default::default()
    };
    if THREADS.insert(&tid, &rec, BPF_NOEXIST as u64).is_err() {
        // The new thread made the entry first, and may have ended since.
        let Some(r) = THREADS.get_ptr_mut(&tid) else {
            count(ThreadCounter::TableFull);
            return;
        };
        // SAFETY: an element from a hash map lookup, valid for the program's run (RCU); the
        // fields written here are the creator's only.
        unsafe {
            (*r).stack_id = stack;
            (*r).pthread = tls;
            (*r).detached |= detached;
            (*r).raw_clone = raw_clone;
            write_volatile(&raw mut (*r).creator_seen, 1);
            if (*r).done() {
                finish(tid, tls);
                return;
            }
        }
    }
    if tls != 0 {
        let _ = THREAD_BY_PTHREAD.insert(&tls, &tid, 0);
    }
}

/// What made the clone of a thread `me` created, from the pthread_create
/// its entry probe saw in flight: (created detached, a raw clone, made
/// outside pthread_create). Each is counted.
#[inline(always)]
fn creating_call(me: u32) -> (u32, u32) {
    // SAFETY: an element from a hash map lookup, valid for the program's run (RCU).
    let call = THREAD_CALLS.get_ptr_mut(&me).map(|c| unsafe { (*c).call });
    match call {
        Some(CALL_CREATE_DETACHED) => {
            let _ = THREAD_CALLS.remove(&me);
            count(ThreadCounter::Detached);
            (1, 0)
        }
        Some(CALL_CREATE) => {
            let _ = THREAD_CALLS.remove(&me);
            (0, 0)
        }
        _ => {
            count(ThreadCounter::RawClone);
            (0, 1)
        }
    }
}

#[inline(always)]
fn count_site(stack: u64) {
    if THREAD_SITE_CREATED.get_ptr_mut(&stack).is_none() {
        let _ = THREAD_SITE_CREATED.insert(&stack, &0, BPF_NOEXIST as u64);
    }
    if let Some(n) = THREAD_SITE_CREATED.get_ptr_mut(&stack) {
        // SAFETY: an element from a hash map lookup, valid for the program's run (RCU); an
        // aligned u64 updated atomically.
        unsafe { crate::atomic::add(n, 1u64) };
    }
}

/// Thread `tid` is done: its entries go.
#[inline(always)]
fn finish(tid: u32, pthread: u64) {
    let _ = THREADS.remove(&tid);
    // Only if it still names this thread: a pthread_t is reused once done.
    // SAFETY: only the value's copy is used.
    if pthread != 0 && unsafe { THREAD_BY_PTHREAD.get(&pthread) } == Some(&tid) {
        let _ = THREAD_BY_PTHREAD.remove(&pthread);
    }
}

/// `syscalls:sys_enter_exit`: a thread ends (a process's exit_group ends
/// its other threads without this: what it held at its end stays held).
#[tracepoint]
pub fn thread_exit(_ctx: TracePointContext) -> u32 {
    let Some(me) = target_thread() else {
        return 0;
    };
    let Some(r) = THREADS.get_ptr_mut(&me) else {
        count(ThreadCounter::ExitedUntracked);
        return 0;
    };
    count(ThreadCounter::Exited);
    let comm = bpf_get_current_comm().unwrap_or_default();
    // SAFETY: an element from a hash map lookup, valid for the program's run (RCU); the
    // exit fields are this thread's only, written before its join can return.
    unsafe {
        (*r).comm = comm;
        write_volatile(&raw mut (*r).exited_ns, now());
        let no_join = read_volatile(&raw const (*r).detached) != 0 || (*r).raw_clone != 0;
        if no_join && read_volatile(&raw const (*r).creator_seen) != 0 {
            finish(me, (*r).pthread);
        }
    }
    0
}

/// Keeps the caller's pthread call for its return.
#[inline(always)]
fn call_enter(pthread: u64, call: u32) -> u32 {
    let Some(me) = target_thread() else {
        return 0;
    };
    let _ = THREAD_CALLS.insert(
        &me,
        &ThreadCall {
            pthread,
            call,
            _pad: 0,
        },
        0,
    );
    0
}

#[inline(always)]
fn arg<C: EbpfContext>(ctx: &C, i: usize) -> u64 {
    let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
    // SAFETY: the context is the kernel's pt_regs of this probe hit, readable for the program's
    // run.
    unsafe {
        match i {
            0 => (*regs).rdi,
            _ => (*regs).rsi,
        }
    }
}

/// pthread_join and its variants: `pthread_t` first.
#[uprobe]
pub fn thread_join_enter(ctx: ProbeContext) -> u32 {
    call_enter(arg(&ctx, 0), CALL_JOIN)
}

#[uprobe]
pub fn thread_detach_enter(ctx: ProbeContext) -> u32 {
    call_enter(arg(&ctx, 0), CALL_DETACH)
}

/// pthread_create(thread, attr, ...): that the clone it makes is
/// pthread_create's (a clone made with none in flight is a raw clone), and
/// whether attr asks for a detached thread (read from glibc's attr, see
/// `PTHREAD_ATTR_FLAGS`), for that clone to take (no return probe: an entry
/// left by a create that failed before its clone is replaced by the
/// caller's next create).
#[uprobe]
pub fn thread_create_enter(ctx: ProbeContext) -> u32 {
    if target_thread().is_none() {
        return 0;
    }
    let attr = arg(&ctx, 1);
    let detached = attr != 0
        && read_user(attr + PTHREAD_ATTR_FLAGS)
            .is_some_and(|f| f as u32 & ATTR_FLAG_DETACHSTATE != 0);
    call_enter(
        0,
        if detached {
            CALL_CREATE_DETACHED
        } else {
            CALL_CREATE
        },
    )
}

#[uretprobe]
pub fn thread_call_return(ctx: RetProbeContext) -> u32 {
    let Some(me) = target_thread() else {
        return 0;
    };
    // SAFETY: only the value's copy is used.
    let Some(call) = (unsafe { THREAD_CALLS.get(&me) }).copied() else {
        return 0;
    };
    let _ = THREAD_CALLS.remove(&me);
    if regs_ret(&ctx) as u32 != 0 || call.call == CALL_CREATE_DETACHED || call.call == CALL_CREATE {
        return 0;
    }
    // SAFETY: only the value's copy is used.
    let Some(tid) = (unsafe { THREAD_BY_PTHREAD.get(&call.pthread) }).copied() else {
        count(ThreadCounter::JoinUntracked);
        return 0;
    };
    let Some(r) = THREADS.get_ptr_mut(&tid) else {
        count(ThreadCounter::JoinUntracked);
        return 0;
    };
    // SAFETY: an element from a hash map lookup, valid for the program's run (RCU).
    unsafe {
        if call.call == CALL_JOIN {
            count(ThreadCounter::Joined);
            write_volatile(&raw mut (*r).joined, 1);
        } else {
            count(ThreadCounter::Detached);
            write_volatile(&raw mut (*r).detached, 1);
        }
        if read_volatile(&raw const (*r).exited_ns) != 0 {
            finish(tid, call.pthread);
        }
    }
    0
}
