//! Memory mappings the target makes and unmaps, seen at the exits of
//! mmap, munmap and mremap (syscall tracepoints, never on the malloc/free
//! path): the event the BPF side sends for each, and its counters.
//!
//! The ranges themselves are kept in userspace (`analyze::mappings`): a
//! partial munmap splits a range, mremap moves or resizes one, MAP_FIXED
//! replaces part of several; an ordered map of ranges does that exactly,
//! which BPF maps do not. Events go through the ring buffer `MAP_EVENTS`,
//! in the order the syscalls returned; one that finds the buffer full is
//! counted ([`MapCounter::Lost`]), not sent.

/// Bytes of `MAP_EVENTS` (a power of two, a multiple of the page size):
/// some 23,000 events (88 bytes with the ring's header) between two reads.
pub const MAP_EVENTS_BYTES: u32 = 1 << 21;

codes! {
    /// What a [`MapEvent`] reports.
    pub enum MapOp: u32 {
        /// mmap returned `addr`; `[addr, addr + len)` is a new mapping
        /// (replacing what was there with MAP_FIXED).
        Map = 1,
        /// munmap(addr, len) succeeded.
        Unmap = 2,
        /// mremap(addr, len, new_len, ...) returned `new_addr`.
        Remap = 3,
    }
}

/// One successful mmap, munmap or mremap of the target.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapEvent {
    /// [`MapOp`].
    pub op: u32,
    /// mmap's `prot`; mremap's `flags`.
    pub prot: u32,
    /// mmap's `flags` (MAP_SHARED, MAP_ANONYMOUS, MAP_STACK...).
    pub flags: u64,
    /// mmap: the address returned; munmap, mremap: the old address.
    pub addr: u64,
    /// The length asked for (the old length for mremap).
    pub len: u64,
    /// mremap: the address returned, and the new length.
    pub new_addr: u64,
    pub new_len: u64,
    /// mmap: the fd mapped (-1 for anonymous) and the offset.
    pub fd: i64,
    pub offset: u64,
    /// mmap: the creating stack's key in `STACKS` (`NO_STACK` otherwise).
    pub stack_id: u64,
    /// CLOCK_MONOTONIC ns at the syscall's exit.
    pub time_ns: u64,
}

/// mmap flags userspace tells mappings apart by.
pub const MAP_SHARED: u64 = 0x01;
pub const MAP_ANONYMOUS: u64 = 0x20;
/// glibc's pthread_create asks for its threads' stacks with MAP_STACK.
pub const MAP_STACK: u64 = 0x20000;
/// mremap's MREMAP_DONTUNMAP: the old range stays mapped (emptied).
pub const MREMAP_DONTUNMAP: u32 = 4;

codes! {
    /// Slots of the per-CPU array `MAP_COUNTERS`; [`MapCounter::name`] is
    /// the field in the report's `resources.mappings.events`.
    pub enum MapCounter: u32 {
        /// Successful mmap, munmap, mremap calls of the target.
        Maps = 0,
        Unmaps = 1,
        Remaps = 2,
        /// Events not sent: `MAP_EVENTS` was full (the ranges they changed
        /// are then wrong until /proc/PID/maps corrects them).
        Lost = 3,
        /// Syscalls whose user registers could not be read.
        RegsReadErrors = 4,
        /// mmaps recorded without a stack, and by cause (see the heap's drops).
        NoStack = 5,
        StackReadErrors = 6,
        StackMapFull = 7,
        StackHashCollisions = 8,
    }
}

impl MapCounter {
    pub const fn name(self) -> &'static str {
        match self {
            MapCounter::Maps => "mmap",
            MapCounter::Unmaps => "munmap",
            MapCounter::Remaps => "mremap",
            MapCounter::Lost => "lost",
            MapCounter::RegsReadErrors => "regs_read_errors",
            MapCounter::NoStack => "no_stack",
            MapCounter::StackReadErrors => "stack_read_errors",
            MapCounter::StackMapFull => "stack_map_full",
            MapCounter::StackHashCollisions => "stack_hash_collisions",
        }
    }
}

/// Slots of `MAP_COUNTERS`.
pub const NUM_MAP_COUNTERS: u32 = MapCounter::ALL.len() as u32;

/// x86-64 syscall numbers.
pub mod nr {
    pub const MMAP: u64 = 9;
    pub const MUNMAP: u64 = 11;
    pub const MREMAP: u64 = 25;
}

/// The syscalls traced, by their tracepoint names (`syscalls:sys_exit_NAME`).
pub const MAP_SYSCALLS: [&str; 3] = ["mmap", "munmap", "mremap"];

/// The names of the maps of mapping tracing.
pub mod map_names {
    pub const MAP_EVENTS: &str = "MAP_EVENTS";
    pub const MAP_COUNTERS: &str = "MAP_COUNTERS";
    pub const MAP_WALKING: &str = "MAP_WALKING";
    pub const ALL: [&str; 3] = [MAP_EVENTS, MAP_COUNTERS, MAP_WALKING];
}

const _: () = {
    assert!(core::mem::size_of::<MapEvent>() == 80);
    let mut i = 0;
    while i < MapCounter::ALL.len() {
        assert!(
            MapCounter::ALL[i] as usize == i,
            "counter slots must be 0, 1, 2..."
        );
        i += 1;
    }
};
