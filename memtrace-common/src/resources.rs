//! File descriptors the target creates and releases, seen at syscall
//! tracepoints (never on the malloc/free path): the layouts of their maps
//! and the codes both sides agree on.
//!
//! `FD_SLOTS` is an array indexed by fd number: slot `fd` holds the fd the
//! target created there while traced (its stack, birth time, origin), or
//! nothing (`born_ns == 0`). `FD_SITE_CREATED` counts creations per
//! (stack, origin). `FD_COUNTERS` counts every event, by [`FdCounter`].

/// Slots of `FD_SLOTS` by default: fds numbered from this on are counted
/// ([`FdCounter::BeyondTable`]), not tracked.
pub const DEFAULT_FD_SLOTS: u32 = 1 << 16;

/// Most slots userspace may ask for (a bpf_loop goes over them at exec).
pub const MAX_FD_SLOTS: u32 = 1 << 20;

/// (stack, origin) pairs counted in `FD_SITE_CREATED`.
pub const MAX_FD_SITES: u32 = 1 << 14;

/// [`FdSlot::flags`]: the fd is closed at exec (O_CLOEXEC, FD_CLOEXEC).
pub const FD_CLOEXEC: u16 = 1;

codes! {
    /// How a traced fd came to be: the family of the syscall that created
    /// it, which gives its kind (a dup takes its source's origin when the
    /// source is traced).
    pub enum FdOrigin: u16 {
        /// open, openat, openat2, creat, open_by_handle_at.
        Open = 1,
        /// socket.
        Socket = 2,
        /// accept, accept4.
        Accept = 3,
        /// socketpair (two fds).
        SocketPair = 4,
        /// pipe, pipe2 (two fds).
        Pipe = 5,
        /// dup, dup2, dup3, fcntl F_DUPFD(_CLOEXEC) of an fd not traced.
        Dup = 6,
        /// eventfd, eventfd2.
        EventFd = 7,
        /// epoll_create, epoll_create1.
        Epoll = 8,
        /// timerfd_create.
        TimerFd = 9,
        /// signalfd, signalfd4 with fd -1.
        SignalFd = 10,
        /// memfd_create.
        MemFd = 11,
        /// inotify_init, inotify_init1.
        Inotify = 12,
        /// pidfd_open.
        PidFd = 13,
        /// fanotify_init, userfaultfd, perf_event_open, io_uring_setup,
        /// pidfd_getfd: the kind is read from /proc.
        Other = 14,
    }
}

impl FdOrigin {
    /// The kind of fd this origin makes, named as `/proc/PID/fd` links are
    /// classified (None: only the link tells).
    pub const fn kind(self) -> Option<&'static str> {
        Some(match self {
            FdOrigin::Open => "file",
            FdOrigin::Socket | FdOrigin::Accept | FdOrigin::SocketPair => "socket",
            FdOrigin::Pipe => "pipe",
            FdOrigin::EventFd => "eventfd",
            FdOrigin::Epoll => "epoll",
            FdOrigin::TimerFd => "timerfd",
            FdOrigin::SignalFd => "signalfd",
            FdOrigin::MemFd => "memfd",
            FdOrigin::Inotify => "inotify",
            FdOrigin::PidFd => "pidfd",
            FdOrigin::Dup | FdOrigin::Other => return None,
        })
    }
}

/// One slot of `FD_SLOTS` (the slot's index is the fd number).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdSlot {
    /// The creating stack's key in `STACKS` (`NO_STACK`: not captured).
    pub stack_id: u64,
    /// CLOCK_MONOTONIC ns of the creation; 0: the slot is free. Written
    /// last, cleared first.
    pub born_ns: u64,
    /// [`FdOrigin`].
    pub origin: u16,
    /// `FD_CLOEXEC`.
    pub flags: u16,
    pub _pad: u32,
    /// Creations into this slot so far: a slot read twice with the same
    /// `generation` held the same fd in between.
    pub generation: u64,
}

/// Key of `FD_SITE_CREATED`: a creating stack and the origin.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FdSiteKey {
    pub stack_id: u64,
    pub origin: u16,
    pub _pad: [u16; 3],
}

codes! {
    /// Slots of the per-CPU array `FD_COUNTERS`; [`FdCounter::name`] is the
    /// field in the report's `resources.fds.events`.
    pub enum FdCounter: u32 {
        /// fds created by a traced syscall (each of a pipe's two counts).
        Created = 0,
        /// Traced fds released by close.
        Closed = 1,
        /// close calls that released an fd not created while traced (one
        /// that existed at attach, or appeared untraced).
        CloseUntracked = 2,
        /// Traced fds released by dup2/dup3/F_DUPFD onto their number.
        ReplacedByDup = 3,
        /// Traced fds released by close_range.
        ClosedByRange = 4,
        /// Traced close-on-exec fds released by exec.
        ReleasedAtExec = 5,
        /// A creation found its slot taken: the earlier fd's release was not
        /// seen (io_uring close, a dup2 onto an fd of another process's
        /// table...); it is taken as released.
        CreatedOverOpen = 6,
        /// fds numbered beyond `FD_SLOTS`: not tracked.
        BeyondTable = 7,
        /// Syscalls whose user registers (arguments, stack) could not be
        /// read: their fds are not tracked.
        RegsReadErrors = 8,
        /// Creations recorded without a stack (see the heap's drops).
        NoStack = 9,
        /// pipe/socketpair fds that could not be read back from the target.
        PairReadErrors = 10,
        /// Of `NoStack`, by cause, as the heap's `drops` name them: the
        /// stack could not be read, `STACKS` was full, two stacks had one hash.
        StackReadErrors = 11,
        StackMapFull = 12,
        StackHashCollisions = 13,
    }
}

impl FdCounter {
    pub const fn name(self) -> &'static str {
        match self {
            FdCounter::Created => "created",
            FdCounter::Closed => "closed",
            FdCounter::CloseUntracked => "close_untracked",
            FdCounter::ReplacedByDup => "replaced_by_dup",
            FdCounter::ClosedByRange => "closed_by_range",
            FdCounter::ReleasedAtExec => "released_at_exec",
            FdCounter::CreatedOverOpen => "created_over_open",
            FdCounter::BeyondTable => "beyond_table",
            FdCounter::RegsReadErrors => "regs_read_errors",
            FdCounter::NoStack => "no_stack",
            FdCounter::PairReadErrors => "pair_read_errors",
            FdCounter::StackReadErrors => "stack_read_errors",
            FdCounter::StackMapFull => "stack_map_full",
            FdCounter::StackHashCollisions => "stack_hash_collisions",
        }
    }
}

/// Slots of `FD_COUNTERS`.
pub const NUM_FD_COUNTERS: u32 = FdCounter::ALL.len() as u32;

/// x86-64 syscall numbers of everything that creates or releases an fd.
pub mod nr {
    pub const PIPE: u64 = 22;
    pub const OPEN: u64 = 2;
    pub const CLOSE: u64 = 3;
    pub const DUP: u64 = 32;
    pub const DUP2: u64 = 33;
    pub const SOCKET: u64 = 41;
    pub const ACCEPT: u64 = 43;
    pub const SOCKETPAIR: u64 = 53;
    pub const FCNTL: u64 = 72;
    pub const CREAT: u64 = 85;
    pub const EPOLL_CREATE: u64 = 213;
    pub const INOTIFY_INIT: u64 = 253;
    pub const OPENAT: u64 = 257;
    pub const SIGNALFD: u64 = 282;
    pub const TIMERFD_CREATE: u64 = 283;
    pub const EVENTFD: u64 = 284;
    pub const ACCEPT4: u64 = 288;
    pub const SIGNALFD4: u64 = 289;
    pub const EVENTFD2: u64 = 290;
    pub const EPOLL_CREATE1: u64 = 291;
    pub const DUP3: u64 = 292;
    pub const PIPE2: u64 = 293;
    pub const INOTIFY_INIT1: u64 = 294;
    pub const PERF_EVENT_OPEN: u64 = 298;
    pub const FANOTIFY_INIT: u64 = 300;
    pub const OPEN_BY_HANDLE_AT: u64 = 304;
    pub const MEMFD_CREATE: u64 = 319;
    pub const USERFAULTFD: u64 = 323;
    pub const IO_URING_SETUP: u64 = 425;
    pub const PIDFD_OPEN: u64 = 434;
    pub const CLOSE_RANGE: u64 = 436;
    pub const OPENAT2: u64 = 437;
    pub const PIDFD_GETFD: u64 = 438;
}

/// The syscalls traced, by their tracepoint names (`syscalls:sys_exit_NAME`).
pub const FD_SYSCALLS: [&str; 33] = [
    "close",
    "open",
    "openat",
    "openat2",
    "creat",
    "open_by_handle_at",
    "socket",
    "socketpair",
    "accept",
    "accept4",
    "pipe",
    "pipe2",
    "dup",
    "dup2",
    "dup3",
    "fcntl",
    "eventfd",
    "eventfd2",
    "epoll_create",
    "epoll_create1",
    "timerfd_create",
    "signalfd",
    "signalfd4",
    "memfd_create",
    "inotify_init",
    "inotify_init1",
    "pidfd_open",
    "pidfd_getfd",
    "fanotify_init",
    "userfaultfd",
    "perf_event_open",
    "io_uring_setup",
    "close_range",
];

/// The names of the maps of fd tracing (see the crate's `map_names`).
pub mod map_names {
    pub const FD_SLOTS: &str = "FD_SLOTS";
    pub const FD_SITE_CREATED: &str = "FD_SITE_CREATED";
    pub const FD_COUNTERS: &str = "FD_COUNTERS";
    pub const ALL: [&str; 3] = [FD_SLOTS, FD_SITE_CREATED, FD_COUNTERS];
}

const _: () = {
    assert!(core::mem::size_of::<FdSlot>() == 32);
    assert!(core::mem::size_of::<FdSiteKey>() == 16);
    let mut i = 0;
    while i < FdCounter::ALL.len() {
        assert!(
            FdCounter::ALL[i] as usize == i,
            "counter slots must be 0, 1, 2..."
        );
        i += 1;
    }
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], made only of integers, with explicit padding
    // (sizes asserted above): every byte pattern is a valid value.
    unsafe impl aya::Pod for super::FdSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FdSiteKey {}
}
