//! File descriptors: who creates them and when they go, at syscall
//! tracepoints (nothing on the malloc/free path).
//!
//! One program, `fd_exit`, is attached to the `sys_exit_*` tracepoint of
//! every syscall that creates or releases an fd: every such record has the
//! syscall's number at offset 8 and its return value at 16, so one program
//! tells them apart, and the verifier checks its stack walk once rather
//! than once per syscall. The arguments are read from the task's user
//! registers, where the kernel keeps them for the whole syscall: no program
//! at the entries, no map of calls in flight. On success it walks the stack
//! from those registers (a tracepoint's own context is the kernel's: the
//! walk starts inside the libc wrapper, whose caller the unwind tables find)
//! and fills the fd's slot in `FD_SLOTS`; close releases it.
//! `fd_exec` (`sched:sched_process_exec`) releases the close-on-exec fds.
//!
//! Releases that raise no close are handled where they happen: dup2/dup3 and
//! F_DUPFD onto an fd in use, close_range (and its CLOSE_RANGE_CLOEXEC),
//! exec. Creations no syscall here shows (SCM_RIGHTS, io_uring) are left to
//! userspace's reconciliation with /proc/PID/fd.

use core::ffi::c_void;
use core::ptr::{read_volatile, write_volatile};

use crate::atomic::add;
use crate::maps::COUNTERS;
use crate::target::{is_target, is_target_process, read_user};
use crate::walk::{WalkStart, cache_slot, capture_stack};
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_ktime_get_ns, bpf_loop,
        generated::{bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_task_pt_regs},
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::TracePointContext,
};
use memtrace_common::resources::{
    DEFAULT_FD_SLOTS, FD_CLOEXEC, FdCounter, FdOrigin, FdSiteKey, FdSlot, MAX_FD_SITES,
    MAX_FD_SLOTS, NUM_FD_COUNTERS, nr,
};
use memtrace_common::{Counter, NO_STACK};

/// fd number → the traced fd there (see `FdSlot`). Sized by userspace.
#[map]
static FD_SLOTS: Array<FdSlot> = Array::with_max_entries(DEFAULT_FD_SLOTS, BPF_F_MMAPABLE);

/// (stack, origin) → fds created there.
#[map]
static FD_SITE_CREATED: HashMap<FdSiteKey, u64> =
    HashMap::with_max_entries(MAX_FD_SITES, BPF_F_NO_PREALLOC);

/// Event counters (`FdCounter`), per CPU.
#[map]
static FD_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_FD_COUNTERS, 0);

/// Slots of FD_SLOTS (set by userspace before load).
#[unsafe(no_mangle)]
static FD_SLOT_COUNT: u32 = DEFAULT_FD_SLOTS;

#[inline(always)]
fn slot_count() -> u32 {
    // SAFETY: a static is always readable; volatile, so that LLVM does not fold in the initial
    // value (userspace sets it before load).
    unsafe { read_volatile(&FD_SLOT_COUNT) }
}

/// O_CLOEXEC, and the flags of the same value (SOCK_, EFD_, TFD_, SFD_, IN_,
/// EPOLL_CLOEXEC).
const O_CLOEXEC: u64 = 0o2000000;
/// MFD_CLOEXEC and FAN_CLOEXEC.
const MFD_CLOEXEC: u64 = 1;
const PERF_FLAG_FD_CLOEXEC: u64 = 8;
const F_DUPFD: u64 = 0;
const F_SETFD: u64 = 2;
const F_DUPFD_CLOEXEC: u64 = 1030;
const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;

#[inline(always)]
fn fd_count(c: FdCounter, n: u64) {
    if let Some(p) = FD_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run.
        unsafe { *p += n };
    }
}

/// The syscall's number in a `sys_enter_*`/`sys_exit_*` record.
#[inline(always)]
pub(crate) fn syscall_nr(ctx: &TracePointContext) -> Option<u64> {
    // SAFETY: every syscall tracepoint record has `int __syscall_nr` at offset 8;
    // bpf_probe_read_kernel fails rather than faults.
    unsafe { ctx.read_at::<i32>(8) }.ok().map(|n| n as u64)
}

/// The user registers the syscall was entered with: its arguments (rdi,
/// rsi, rdx, r10, r8, kept there by the kernel for the whole syscall) and
/// where the stack walk starts (rip, rsp, rbp).
pub(crate) struct UserRegs {
    pub(crate) args: [u64; 5],
    pub(crate) pc: u64,
    pub(crate) sp: u64,
    pub(crate) bp: u64,
}

/// Reads one u64 of the task's user registers at `off`.
#[inline(always)]
fn reg(regs: *const pt_regs, off: usize) -> Option<u64> {
    let mut v = 0u64;
    // SAFETY: reads one u64 of the task's pt_regs into `v`; bpf_probe_read_kernel fails rather
    // than faults.
    let failed = unsafe {
        bpf_probe_read_kernel(
            (&raw mut v).cast(),
            8,
            regs.cast::<u8>().wrapping_add(off).cast(),
        )
    } != 0;
    (!failed).then_some(v)
}

impl UserRegs {
    /// Steps out of a leaf function that keeps its return address at sp
    /// (no push, no frame): the registers its caller sees once it returns.
    #[inline(always)]
    pub(crate) fn return_from_leaf(&mut self) -> Option<()> {
        self.pc = read_user(self.sp)?;
        self.sp = self.sp.wrapping_add(8);
        Some(())
    }
}

#[inline(always)]
pub(crate) fn user_regs() -> Option<UserRegs> {
    use core::mem::offset_of;
    // SAFETY: helpers with no preconditions; the task is the current one, whose user registers
    // bpf_task_pt_regs gives (a kernel pointer, read with bpf_probe_read_kernel).
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    Some(UserRegs {
        args: [
            reg(regs, offset_of!(pt_regs, rdi))?,
            reg(regs, offset_of!(pt_regs, rsi))?,
            reg(regs, offset_of!(pt_regs, rdx))?,
            reg(regs, offset_of!(pt_regs, r10))?,
            reg(regs, offset_of!(pt_regs, r8))?,
        ],
        pc: reg(regs, offset_of!(pt_regs, rip))?,
        sp: reg(regs, offset_of!(pt_regs, rsp))?,
        bp: reg(regs, offset_of!(pt_regs, rbp))?,
    })
}

/// The task's user r9: a syscall's sixth argument (mmap's offset).
#[inline(always)]
pub(crate) fn user_reg_r9() -> Option<u64> {
    // SAFETY: as in `user_regs`.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    reg(regs, core::mem::offset_of!(pt_regs, r9))
}

/// `EBADF`: the one error of close that leaves no fd released.
const EBADF: i64 = 9;

#[tracepoint]
pub fn fd_exit(ctx: TracePointContext) -> u32 {
    if !is_target() {
        return 0;
    }
    // SAFETY: `long ret` at offset 16 of every sys_exit record; bpf_probe_read_kernel fails
    // rather than faults.
    let (Some(nr), Ok(ret)) = (syscall_nr(&ctx), unsafe { ctx.read_at::<i64>(16) }) else {
        return 0;
    };
    let Some(regs) = user_regs() else {
        fd_count(FdCounter::RegsReadErrors, 1);
        return 0;
    };
    if nr == nr::CLOSE {
        // The kernel frees the number whatever close then reports (EINTR,
        // EIO), unless it was no open fd.
        if ret != -EBADF {
            release_on_close(regs.args[0] as i32);
        }
        return 0;
    }
    if ret >= 0 {
        exited(&ctx, nr, &regs, ret);
    }
    0
}

/// What a syscall's exit does to the table.
enum Action {
    None,
    /// `ret` is a new fd.
    Create(FdOrigin, bool),
    /// Two new fds, in the int[2] at this address.
    Pair(FdOrigin, u64, bool),
    /// `ret` is a copy of this fd.
    Dup(u64, bool),
    SetCloexec(u64, bool),
    /// close_range(first, last, CLOSE_RANGE_CLOEXEC).
    CloseRange(u64, u64, bool),
}

/// A syscall of `call` returned `ret` (≥ 0): what it created or released.
/// The stack is walked at one place only: the verifier checks the walk once
/// per call site.
#[inline(always)]
fn exited(ctx: &TracePointContext, nr: u64, regs: &UserRegs, ret: i64) {
    let action = action(nr, &regs.args, ret);
    let stack = match action {
        Action::Create(..) | Action::Pair(..) | Action::Dup(..) => creator_stack(ctx, regs),
        _ => NO_STACK,
    };
    match action {
        Action::None => {}
        Action::Create(origin, cloexec) => created(ret, origin, cloexec, stack, false),
        Action::Pair(origin, at, cloexec) => {
            let Some(pair) = read_user(at) else {
                fd_count(FdCounter::PairReadErrors, 1);
                return;
            };
            created(pair as u32 as i32 as i64, origin, cloexec, stack, false);
            created(
                (pair >> 32) as u32 as i32 as i64,
                origin,
                cloexec,
                stack,
                false,
            );
        }
        Action::Dup(old, cloexec) => {
            // The copy is of its source's origin when the source is traced.
            let origin = FD_SLOTS
                .get(old as u32)
                .filter(|s| old < slot_count() as u64 && s.born_ns != 0)
                .and_then(|s| FdOrigin::try_from(s.origin).ok())
                .unwrap_or(FdOrigin::Dup);
            created(ret, origin, cloexec, stack, true);
        }
        Action::SetCloexec(fd, on) => set_cloexec(fd, on),
        Action::CloseRange(first, last, cloexec_only) => close_range(first, last, cloexec_only),
    }
}

#[inline(always)]
fn action(nr: u64, a: &[u64; 5], ret: i64) -> Action {
    let cloexec = |bits: u64, mask: u64| bits & mask != 0;
    let (origin, flags) = match nr {
        nr::OPEN => (FdOrigin::Open, cloexec(a[1], O_CLOEXEC)),
        nr::OPENAT | nr::OPEN_BY_HANDLE_AT => (FdOrigin::Open, cloexec(a[2], O_CLOEXEC)),
        nr::OPENAT2 => (
            FdOrigin::Open,
            cloexec(read_user(a[2]).unwrap_or(0), O_CLOEXEC),
        ),
        nr::CREAT => (FdOrigin::Open, false),
        nr::SOCKET => (FdOrigin::Socket, cloexec(a[1], O_CLOEXEC)),
        nr::ACCEPT => (FdOrigin::Accept, false),
        nr::ACCEPT4 => (FdOrigin::Accept, cloexec(a[3], O_CLOEXEC)),
        nr::EVENTFD => (FdOrigin::EventFd, false),
        nr::EVENTFD2 => (FdOrigin::EventFd, cloexec(a[1], O_CLOEXEC)),
        nr::EPOLL_CREATE => (FdOrigin::Epoll, false),
        nr::EPOLL_CREATE1 => (FdOrigin::Epoll, cloexec(a[0], O_CLOEXEC)),
        nr::TIMERFD_CREATE => (FdOrigin::TimerFd, cloexec(a[1], O_CLOEXEC)),
        // With an fd of its own, signalfd changes that one's mask.
        nr::SIGNALFD | nr::SIGNALFD4 if a[0] as i32 != -1 => return Action::None,
        nr::SIGNALFD => (FdOrigin::SignalFd, false),
        nr::SIGNALFD4 => (FdOrigin::SignalFd, cloexec(a[3], O_CLOEXEC)),
        nr::MEMFD_CREATE => (FdOrigin::MemFd, cloexec(a[1], MFD_CLOEXEC)),
        nr::INOTIFY_INIT => (FdOrigin::Inotify, false),
        nr::INOTIFY_INIT1 => (FdOrigin::Inotify, cloexec(a[0], O_CLOEXEC)),
        nr::PIDFD_OPEN => (FdOrigin::PidFd, true),
        nr::PIDFD_GETFD | nr::IO_URING_SETUP => (FdOrigin::Other, true),
        nr::FANOTIFY_INIT => (FdOrigin::Other, cloexec(a[0], MFD_CLOEXEC)),
        nr::USERFAULTFD => (FdOrigin::Other, cloexec(a[0], O_CLOEXEC)),
        nr::PERF_EVENT_OPEN => (FdOrigin::Other, cloexec(a[4], PERF_FLAG_FD_CLOEXEC)),
        nr::SOCKETPAIR => {
            return Action::Pair(FdOrigin::SocketPair, a[3], cloexec(a[1], O_CLOEXEC));
        }
        nr::PIPE => return Action::Pair(FdOrigin::Pipe, a[0], false),
        nr::PIPE2 => return Action::Pair(FdOrigin::Pipe, a[0], cloexec(a[1], O_CLOEXEC)),
        // dup2(fd, fd) changes nothing.
        nr::DUP2 if a[0] as i32 as i64 == ret => return Action::None,
        nr::DUP | nr::DUP2 => return Action::Dup(a[0], false),
        nr::DUP3 => return Action::Dup(a[0], cloexec(a[2], O_CLOEXEC)),
        nr::FCNTL => {
            return match a[1] {
                F_DUPFD => Action::Dup(a[0], false),
                F_DUPFD_CLOEXEC => Action::Dup(a[0], true),
                F_SETFD => Action::SetCloexec(a[0], a[2] & 1 != 0),
                _ => Action::None,
            };
        }
        nr::CLOSE_RANGE => {
            return Action::CloseRange(a[0], a[1], a[2] & CLOSE_RANGE_CLOEXEC != 0);
        }
        _ => return Action::None,
    };
    Action::Create(origin, flags)
}

/// The stack of the syscall's caller: walked from the task's user registers.
#[inline(always)]
fn creator_stack(ctx: &TracePointContext, regs: &UserRegs) -> u64 {
    let (id, failed) = syscall_stack(ctx, regs);
    for (n, (_, fc)) in failed.into_iter().zip(STACK_FAILURES) {
        if n != 0 {
            fd_count(fc, n);
        }
    }
    id
}

/// The stack of the syscall's caller, walked from the task's user registers
/// (fds, mappings). A walk that stored no stack counted why in the heap's
/// counters: that count is taken back out (the heap's `drops` count
/// allocations only) and returned by `STACK_FAILURES` cause.
#[inline(always)]
pub(crate) fn syscall_stack(ctx: &TracePointContext, regs: &UserRegs) -> (u64, [u64; 3]) {
    let (pc, sp, bp) = (regs.pc, regs.sp, regs.bp);
    let start = WalkStart {
        pc,
        sp,
        bp,
        base: sp,
        window: 0,
        whole: 0,
        slot: cache_slot(pc, sp),
        // Looked up by the walk unless it is remembered.
        tables_known: 0,
    };
    let before = heap_stack_failures();
    let id = capture_stack(ctx, Some(start));
    let mut failed = [0u64; 3];
    if id == NO_STACK {
        failed = take_stack_failures(before);
    }
    (id, failed)
}

/// The heap's counters of stacks not stored, which the walk counts in, and
/// the fd counters they belong to when the walk was an fd's.
const STACK_FAILURES: [(Counter, FdCounter); 3] = [
    (Counter::StackReadErrors, FdCounter::StackReadErrors),
    (Counter::StackMapFull, FdCounter::StackMapFull),
    (Counter::StackHashCollisions, FdCounter::StackHashCollisions),
];

/// This CPU's values of the heap's stack failure counters.
#[inline(always)]
fn heap_stack_failures() -> [u64; 3] {
    let mut v = [0u64; 3];
    for (out, (c, _)) in v.iter_mut().zip(STACK_FAILURES) {
        *out = COUNTERS.get(c as u32).copied().unwrap_or(0);
    }
    v
}

/// Takes what a syscall's walk added to the heap's stack failure counters
/// back out of them, and returns it. (Per CPU: nothing else runs on this
/// CPU meanwhile but an NMI's program.)
#[inline(always)]
fn take_stack_failures(before: [u64; 3]) -> [u64; 3] {
    let after = heap_stack_failures();
    let mut taken = [0u64; 3];
    for (i, ((b, a), (c, _))) in before
        .into_iter()
        .zip(after)
        .zip(STACK_FAILURES)
        .enumerate()
    {
        let added = a.wrapping_sub(b);
        if added == 0 || added > 1 {
            continue;
        }
        if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
            // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run.
            unsafe { *p -= added };
        }
        taken[i] = added;
    }
    taken
}

/// Fd `fd` was created (by `origin`, with its stack).
#[inline(always)]
fn created(fd: i64, origin: FdOrigin, cloexec: bool, stack: u64, dup: bool) {
    if fd < 0 {
        return;
    }
    fd_count(FdCounter::Created, 1);
    if stack == NO_STACK {
        fd_count(FdCounter::NoStack, 1);
    }
    count_site(stack, origin);
    let Some(slot) = (fd < slot_count() as i64)
        .then(|| FD_SLOTS.get_ptr_mut(fd as u32))
        .flatten()
    else {
        fd_count(FdCounter::BeyondTable, 1);
        return;
    };
    // SAFETY: an element of an array map, valid for the program's run. born_ns is cleared
    // first and written last: userspace takes a slot with born_ns 0 as free, and one whose
    // generation changed while it read it as retaken.
    unsafe {
        if read_volatile(&raw const (*slot).born_ns) != 0 {
            fd_count(
                if dup {
                    FdCounter::ReplacedByDup
                } else {
                    FdCounter::CreatedOverOpen
                },
                1,
            );
            write_volatile(&raw mut (*slot).born_ns, 0);
        }
        (*slot).stack_id = stack;
        (*slot).origin = origin as u16;
        (*slot).flags = if cloexec { FD_CLOEXEC } else { 0 };
        add(&raw mut (*slot).generation, 1u64);
        write_volatile(&raw mut (*slot).born_ns, bpf_ktime_get_ns());
    }
}

/// One more fd created at (stack, origin).
#[inline(always)]
fn count_site(stack: u64, origin: FdOrigin) {
    let key = FdSiteKey {
        stack_id: stack,
        origin: origin as u16,
        _pad: [0; 3],
    };
    if FD_SITE_CREATED.get_ptr_mut(&key).is_none() {
        let _ = FD_SITE_CREATED.insert(&key, &0, BPF_NOEXIST as u64);
    }
    if let Some(n) = FD_SITE_CREATED.get_ptr_mut(&key) {
        // SAFETY: an element from a hash map lookup, valid for the program's run (RCU); an
        // aligned u64 updated atomically.
        unsafe { add(n, 1u64) };
    }
}

/// Releases slot `fd` if it holds a traced fd; whether it did.
#[inline(always)]
fn release(fd: u64) -> bool {
    if fd >= slot_count() as u64 {
        return false;
    }
    let Some(slot) = FD_SLOTS.get_ptr_mut(fd as u32) else {
        return false;
    };
    // SAFETY: an element of an array map, valid for the program's run.
    unsafe {
        if read_volatile(&raw const (*slot).born_ns) == 0 {
            return false;
        }
        write_volatile(&raw mut (*slot).born_ns, 0);
    }
    true
}

#[inline(always)]
fn release_on_close(fd: i32) {
    if fd < 0 {
        return;
    }
    if release(fd as u64) {
        fd_count(FdCounter::Closed, 1);
    } else {
        fd_count(FdCounter::CloseUntracked, 1);
    }
}

/// fcntl(fd, F_SETFD): close-on-exec set or cleared.
#[inline(always)]
fn set_cloexec(fd: u64, on: bool) {
    if fd >= slot_count() as u64 {
        return;
    }
    if let Some(slot) = FD_SLOTS.get_ptr_mut(fd as u32) {
        // SAFETY: an element of an array map, valid for the program's run.
        unsafe { (*slot).flags = if on { FD_CLOEXEC } else { 0 } };
    }
}

/// The range a bpf_loop over slots covers, and what it does there.
#[repr(C)]
struct SlotRange {
    first: u64,
    count: u64,
    /// 0: release every traced fd; 1: mark them close-on-exec; 2: release
    /// the close-on-exec ones (exec).
    action: u64,
    done: u64,
}

extern "C" fn slot_step(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the caller's SlotRange, on its stack, used by nothing else
    // meanwhile.
    let r = unsafe { &mut *(ctx as *mut SlotRange) };
    if i >= r.count {
        return 1;
    }
    let fd = r.first + i;
    match r.action {
        0 => {
            if release(fd) {
                r.done += 1;
            }
        }
        1 => {
            if fd < slot_count() as u64
                && let Some(slot) = FD_SLOTS.get_ptr_mut(fd as u32)
            {
                // SAFETY: an element of an array map, valid for the program's run.
                unsafe { (*slot).flags = FD_CLOEXEC };
            }
        }
        _ => {
            if fd < slot_count() as u64
                && let Some(slot) = FD_SLOTS.get(fd as u32)
                && slot.flags & FD_CLOEXEC != 0
                && release(fd)
            {
                r.done += 1;
            }
        }
    }
    0
}

/// Runs `action` over slots `first..=last` (those of FD_SLOTS).
#[inline(always)]
fn over_slots(first: u64, last: u64, action: u64) -> u64 {
    let end = last.min(slot_count() as u64 - 1);
    if first > end {
        return 0;
    }
    let mut r = SlotRange {
        first,
        count: end - first + 1,
        action,
        done: 0,
    };
    // SAFETY: `r` outlives the loop, and slot_step takes exactly this context type.
    unsafe {
        bpf_loop(
            MAX_FD_SLOTS,
            slot_step as *mut c_void,
            (&raw mut r).cast(),
            0,
        )
    };
    r.done
}

/// close_range(first, last, flags) succeeded.
#[inline(always)]
fn close_range(first: u64, last: u64, cloexec_only: bool) {
    let (first, last) = (first as u32 as u64, last as u32 as u64);
    if cloexec_only {
        over_slots(first, last, 1);
    } else {
        fd_count(FdCounter::ClosedByRange, over_slots(first, last, 0));
    }
}

/// `sched:sched_process_exec`: the close-on-exec fds are gone. (Whether
/// `image_exec`, at the same tracepoint, ended tracing already or not.)
#[tracepoint]
pub fn fd_exec(_ctx: TracePointContext) -> u32 {
    if !is_target_process() {
        return 0;
    }
    fd_count(FdCounter::ReleasedAtExec, over_slots(0, u64::MAX, 2));
    0
}
