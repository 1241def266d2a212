//! Threads the target creates, seen at syscall tracepoints (clone/clone3
//! exits, `exit` entries) and at uprobes on the rare pthread calls that
//! decide whether an exited thread's stack is still held (join, detach,
//! create): the layouts of their maps and the codes both sides agree on.
//!
//! `THREADS` maps a thread id to the thread created while traced
//! ([`ThreadRec`]); an exited thread that was joined or detached is done
//! and its entry removed. `THREAD_BY_PTHREAD` maps glibc's `pthread_t` (the
//! thread pointer the creating clone set, its `tls` argument) to the
//! thread's id, for the join and detach probes, which see only that.

/// Threads `THREADS` holds at most (created while traced and not done);
/// more are counted ([`ThreadCounter::TableFull`]), not tracked.
pub const MAX_THREADS: u32 = 1 << 16;

/// Creating stacks counted in `THREAD_SITE_CREATED`.
pub const MAX_THREAD_SITES: u32 = 1 << 12;

/// pthread calls in flight (entry seen, return not yet), by thread.
pub const MAX_THREAD_CALLS: u32 = 1 << 12;

/// The clone flag that makes a thread of the caller's process rather than
/// a process.
pub const CLONE_THREAD: u64 = 0x10000;

/// Offsets in clone3's `struct clone_args` (include/uapi/linux/sched.h).
pub const CLONE_ARGS_FLAGS: u64 = 0;
pub const CLONE_ARGS_TLS: u64 = 56;

/// glibc's `struct pthread_attr` (sysdeps/nptl/internaltypes.h, unchanged
/// since 2002): `int flags` at 8, whose bit 0 is `ATTR_FLAG_DETACHSTATE`.
pub const PTHREAD_ATTR_FLAGS: u64 = 8;
pub const ATTR_FLAG_DETACHSTATE: u32 = 1;

/// One thread created while traced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadRec {
    /// The creating stack's key in `STACKS` (`NO_STACK`: not captured).
    pub stack_id: u64,
    /// CLOCK_MONOTONIC ns of the creation (at the creating clone's exit).
    pub born_ns: u64,
    /// CLOCK_MONOTONIC ns of its `exit` syscall; 0 while it runs.
    pub exited_ns: u64,
    /// Its `pthread_t` (the clone's `tls`); 0 for a raw clone without one.
    pub pthread: u64,
    /// 1 once a join of it returned 0.
    pub joined: u32,
    /// 1 once it was detached (pthread_detach returned 0, or it was
    /// created detached).
    pub detached: u32,
    /// 1 once the creating clone's exit was seen in the creator (the
    /// stack and counts are in); the new thread's own return from clone
    /// may come first and make the entry.
    pub creator_seen: u32,
    /// 1 if its clone was made outside `pthread_create` (Go, a runtime of
    /// its own): nothing memtrace sees joins it, so its exit ends it.
    pub raw_clone: u32,
    /// Its name when it exited (`comm`); zeros while it runs.
    pub comm: [u8; 16],
}

impl ThreadRec {
    /// Whether its end is accounted for: exited and joined or detached
    /// (its stack is back in glibc's cache, or freed), or exited when no
    /// join is to be seen (a raw clone's).
    pub const fn done(&self) -> bool {
        self.exited_ns != 0 && (self.joined != 0 || self.detached != 0 || self.raw_clone != 0)
    }
}

/// Which pthread call a `THREAD_CALLS` entry is.
pub const CALL_JOIN: u32 = 1;
pub const CALL_DETACH: u32 = 2;
pub const CALL_CREATE_DETACHED: u32 = 3;
/// A `pthread_create` of a joinable thread.
pub const CALL_CREATE: u32 = 4;

/// A pthread call in flight (`THREAD_CALLS`, by the caller's thread id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCall {
    /// The `pthread_t` joined or detached.
    pub pthread: u64,
    /// `CALL_*`.
    pub call: u32,
    pub _pad: u32,
}

codes! {
    /// Slots of the per-CPU array `THREAD_COUNTERS`; [`ThreadCounter::name`]
    /// is the field in the report's `resources.threads.events`.
    pub enum ThreadCounter: u32 {
        /// Threads created while traced (clone/clone3 with CLONE_THREAD).
        Created = 0,
        /// Traced threads that called `exit`.
        Exited = 1,
        /// `exit` of a thread not created while traced (existed at attach).
        ExitedUntracked = 2,
        /// Joins that returned 0.
        Joined = 3,
        /// Detaches that returned 0, and threads created detached.
        Detached = 4,
        /// Joins or detaches that returned 0 for a `pthread_t` memtrace
        /// did not see created (existed at attach).
        JoinUntracked = 5,
        /// Threads not tracked: `THREADS` was full.
        TableFull = 6,
        /// Creations whose user registers could not be read: not tracked.
        RegsReadErrors = 7,
        /// Creations recorded without a stack (see the heap's drops).
        NoStack = 8,
        /// Threads created by a clone outside `pthread_create` (no join
        /// of theirs can be seen: their exit ends them).
        RawClone = 9,
    }
}

impl ThreadCounter {
    pub const fn name(self) -> &'static str {
        match self {
            ThreadCounter::Created => "created",
            ThreadCounter::Exited => "exited",
            ThreadCounter::ExitedUntracked => "exited_untracked",
            ThreadCounter::Joined => "joined",
            ThreadCounter::Detached => "detached",
            ThreadCounter::JoinUntracked => "join_untracked",
            ThreadCounter::TableFull => "table_full",
            ThreadCounter::RegsReadErrors => "regs_read_errors",
            ThreadCounter::NoStack => "no_stack",
            ThreadCounter::RawClone => "raw_clone",
        }
    }
}

/// Slots of `THREAD_COUNTERS`.
pub const NUM_THREAD_COUNTERS: u32 = ThreadCounter::ALL.len() as u32;

/// x86-64 syscall numbers.
pub mod nr {
    pub const CLONE: u64 = 56;
    pub const CLONE3: u64 = 435;
}

/// The syscalls whose exits create threads (`syscalls:sys_exit_NAME`).
pub const CREATE_SYSCALLS: [&str; 2] = ["clone", "clone3"];

/// The pthread functions probed: the program at the entry, and whether
/// `thread_call_return` runs at the return. pthread_create has none: a
/// return probe replaces the return address on the stack while the call
/// runs, and the stacks walked inside it (the new thread's, at clone) would
/// end there.
pub const PTHREAD_PROBES: [(&str, &str, bool); 6] = [
    ("pthread_join", "thread_join_enter", true),
    ("pthread_tryjoin_np", "thread_join_enter", true),
    ("pthread_timedjoin_np", "thread_join_enter", true),
    ("pthread_clockjoin_np", "thread_join_enter", true),
    ("pthread_detach", "thread_detach_enter", true),
    ("pthread_create", "thread_create_enter", false),
];

/// The names of the maps of thread tracing (see the crate's `map_names`).
pub mod map_names {
    pub const THREADS: &str = "THREADS";
    pub const THREAD_BY_PTHREAD: &str = "THREAD_BY_PTHREAD";
    pub const THREAD_CALLS: &str = "THREAD_CALLS";
    pub const THREAD_SITE_CREATED: &str = "THREAD_SITE_CREATED";
    pub const THREAD_COUNTERS: &str = "THREAD_COUNTERS";
    /// BPF only: a new thread's host id, from `thread_newtask` to
    /// `thread_created` (listed so that the names stay checked).
    pub const NEW_THREAD: &str = "NEW_THREAD";
    pub const ALL: [&str; 6] = [
        THREADS,
        THREAD_BY_PTHREAD,
        THREAD_CALLS,
        THREAD_SITE_CREATED,
        THREAD_COUNTERS,
        NEW_THREAD,
    ];
}

const _: () = {
    assert!(core::mem::size_of::<ThreadRec>() == 64);
    assert!(core::mem::size_of::<ThreadCall>() == 16);
    let mut i = 0;
    while i < ThreadCounter::ALL.len() {
        assert!(
            ThreadCounter::ALL[i] as usize == i,
            "counter slots must be 0, 1, 2..."
        );
        i += 1;
    }
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], made only of integers, with explicit padding
    // (sizes asserted above): every byte pattern is a valid value.
    unsafe impl aya::Pod for super::ThreadRec {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ThreadCall {}
}
