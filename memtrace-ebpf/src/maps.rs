//! Every map of the BPF object, in one place; each static is named as in
//! `memtrace_common::map_names`, which userspace uses (memtrace's unit tests
//! check the object against that list). (See docs/bpf.md for who
//! writes and reads each.)

use crate::walk::cache::CachedWalk;
use crate::walk::python::{FrameWords, PythonThread};
use crate::walk::{CACHE_SLOTS, StackWindow};
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE, bindings::BPF_F_NO_PREALLOC, macros::map, maps::Array, maps::HashMap,
    maps::LruHashMap, maps::PerCpuArray, maps::Queue, maps::RingBuf,
};
use memtrace_common::{
    AllocBucket, AllocKeys, CODE_UNMAP_LOG_ENTRIES, CallMarkState, Capture, CodeState, CodeUnmap,
    Countdown, DEFAULT_MAX_OUTSTANDING, DEFAULT_MAX_PC_PAGES, DEFAULT_MAX_PENDING,
    DEFAULT_MAX_STACKS, DEFAULT_MAX_UNWIND_ROWS, Epoch, MAX_ALLOCATOR_FUNCTIONS, MAX_CALL_MARKS,
    MAX_FORK_CHILDREN, MAX_RESULT_SITES, MAX_UNMAPPED_RANGES, NUM_COUNTERS,
    PYTHON_CODES_SEEN_ENTRIES, PYTHON_NEW_CODES_ENTRIES, PageKey, PageRows, PendingCall,
    PendingKey, PythonCode, PythonLayout, ResultSite, SAMPLE_LOG2_ENTRIES, SAMPLE_THREADS, SiteKey,
    SiteStats, StackTrace, TextRange, TraceState, UnwindRow, alloc_buckets,
};

/// The block table: each bucket's addresses, and its blocks.
#[map]
pub(crate) static ALLOC_KEYS: Array<AllocKeys> =
    Array::with_max_entries(alloc_buckets(DEFAULT_MAX_OUTSTANDING), BPF_F_MMAPABLE);

/// The block table's blocks: bucket → one `Allocation` per slot of its
/// ALLOC_KEYS bucket. Sized by userspace (`ALLOC_BUCKETS`).
#[map]
pub(crate) static ALLOCS: Array<AllocBucket> =
    Array::with_max_entries(alloc_buckets(DEFAULT_MAX_OUTSTANDING), BPF_F_MMAPABLE);

/// Per-stack aggregates, by (stack, birth epoch). Sized by userspace.
#[map]
pub(crate) static SITES: HashMap<SiteKey, SiteStats> =
    HashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

/// The current birth epoch (one entry, written by userspace).
#[map]
pub(crate) static EPOCH: Array<Epoch> = Array::with_max_entries(1, 0);

/// Walked stacks by the hash of their frames. Sized by userspace
/// (`--max-stacks`).
#[map]
pub(crate) static STACKS: HashMap<u64, StackTrace> =
    HashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

/// Calls between their entry and their return: (thread, sp at entry) → call.
#[map]
pub(crate) static PENDING: HashMap<PendingKey, PendingCall> =
    HashMap::with_max_entries(DEFAULT_MAX_PENDING, 0);

/// Event counters (`Counter`), per CPU; userspace sums them.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

/// From the lowest start to the highest end of ALLOCATOR_TEXT.
#[map]
pub(crate) static ALLOCATOR_HULL: Array<TextRange> = Array::with_max_entries(1, 0);

/// The probed allocator functions' code ranges (end 0: no more).
#[map]
pub(crate) static ALLOCATOR_TEXT: Array<TextRange> =
    Array::with_max_entries(MAX_ALLOCATOR_FUNCTIONS, 0);

/// How the allocator's own calls are told from users' (see
/// `memtrace_common::CallMarks`), and how many marks are in flight.
#[map]
pub(crate) static CALL_MARK_STATE: Array<CallMarkState> = Array::with_max_entries(1, 0);

/// Marks left by the probes on the allocator's own calls: (thread, the
/// callee's rsp at its probe) → MARK_CALL, MARK_TAIL or MARK_CHECK.
#[map]
pub(crate) static CALL_MARKS: HashMap<PendingKey, u64> =
    HashMap::with_max_entries(MAX_CALL_MARKS, 0);

/// Every module's unwind rows, each module's a sorted run (see ExecMapping).
#[map]
pub(crate) static UNWIND_ROWS: Array<UnwindRow> =
    Array::with_max_entries(DEFAULT_MAX_UNWIND_ROWS, 0);

/// (tgid, code page) → the rows covering that page.
#[map]
pub(crate) static PC_PAGES: HashMap<PageKey, PageRows> =
    HashMap::with_max_entries(DEFAULT_MAX_PC_PAGES, BPF_F_NO_PREALLOC);

/// Processes whose unwind tables are loaded (tgid → 1). Others are walked
/// with frame pointers (bpf_get_stack).
#[map]
pub(crate) static PROC_TABLES: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

/// Sampling: log2(1 + i/1024), written by userspace (see
/// `memtrace_common::SAMPLE_LOG2_ENTRIES`): BPF has no floating point.
#[map]
pub(crate) static SAMPLE_LOG2: Array<u32> = Array::with_max_entries(SAMPLE_LOG2_ENTRIES, 0);

/// Sampling: per thread, bytes left until the next sampled allocation
/// (see `memtrace_common::Countdown`). An array, not an LRU hash: one
/// inlined lookup instead of a helper call and the LRU's bookkeeping, on
/// every sampled-mode allocation call.
#[map]
pub(crate) static COUNTDOWN: Array<Countdown> = Array::with_max_entries(SAMPLE_THREADS, 0);

/// Result sites (see `memtrace_common::ResultSite`), by the index in
/// their attach cookie. Written by userspace before attaching.
#[map]
pub(crate) static RESULT_SITES: Array<ResultSite> = Array::with_max_entries(MAX_RESULT_SITES, 0);

/// Sizes captured by result sites for a later site of the same call, per
/// thread (as COUNTDOWN).
#[map]
pub(crate) static CAPTURES: Array<Capture> = Array::with_max_entries(SAMPLE_THREADS, 0);

/// Scratch space for one stack, per CPU: too big for the 512-byte BPF stack.
#[map]
pub(crate) static STACK_SCRATCH: PerCpuArray<StackTrace> = PerCpuArray::with_max_entries(1, 0);

/// The stack window of the current walk, per CPU.
#[map]
pub(crate) static STACK_WINDOW: PerCpuArray<StackWindow> = PerCpuArray::with_max_entries(1, 0);

/// Remembered walks, per CPU, by a hash of (rip, rsp) at the walk's start.
#[map]
pub(crate) static WALK_CACHE: PerCpuArray<CachedWalk> =
    PerCpuArray::with_max_entries(CACHE_SLOTS, 0);

/// Bumped by userspace after every change to the unwind tables: remembered
/// walks of an older generation are not used.
#[map]
pub(crate) static TABLES_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

/// The code generation and the use of UNMAPPED_CODE (see
/// `memtrace_common::CodeState`), written by the unmapping tracepoints.
#[map]
pub(crate) static CODE_STATE: Array<CodeState> = Array::with_max_entries(1, 0);

/// Every code unmapping, by generation (a ring), for userspace.
#[map]
pub(crate) static CODE_UNMAP_LOG: Array<CodeUnmap> =
    Array::with_max_entries(CODE_UNMAP_LOG_ENTRIES, 0);

/// The ranges of code unmapped so far, merged, with the generation of the
/// last unmapping in each: mixed into the ids of stacks with frames there.
#[map]
pub(crate) static UNMAPPED_CODE: Array<CodeUnmap> = Array::with_max_entries(MAX_UNMAPPED_RANGES, 0);
/// Whether tracing has ended, and the uretprobe trampoline's address (see
/// `TraceState`).
#[map]
pub(crate) static TRACE_STATE: Array<TraceState> = Array::with_max_entries(1, 0);
/// `--follow-forks`: the processes the target created that userspace has
/// not yet taken, pid → `FORK_CHILD_*` state (`images.rs`).
#[map]
pub(crate) static FORK_CHILDREN: HashMap<u32, u32> =
    HashMap::with_max_entries(MAX_FORK_CHILDREN, 0);

/// How to read the target's Python frames (one entry, written by userspace
/// when the target runs a CPython it knows; `enabled` 0 otherwise).
#[map]
pub(crate) static PYTHON_LAYOUT: Array<PythonLayout> = Array::with_max_entries(1, 0);

/// Each thread's Python thread state, found by walking the interpreter's
/// thread list (tid → state; 0: the thread had none when last looked).
#[map]
pub(crate) static PYTHON_THREADS: LruHashMap<u32, PythonThread> =
    LruHashMap::with_max_entries(4096, 0);

/// Code objects already put in PYTHON_NEW_CODES (address → check).
#[map]
pub(crate) static PYTHON_CODES_SEEN: LruHashMap<u64, u32> =
    LruHashMap::with_max_entries(PYTHON_CODES_SEEN_ENTRIES, 0);

/// Code objects seen for the first time, for userspace to read at once.
#[map]
pub(crate) static PYTHON_NEW_CODES: Queue<PythonCode> =
    Queue::with_max_entries(PYTHON_NEW_CODES_ENTRIES, 0);

/// The Python frame being read, per CPU (the BPF stack has no room left
/// for it in the programs that walk from a result site).
#[map]
pub(crate) static PYTHON_FRAME: PerCpuArray<FrameWords> = PerCpuArray::with_max_entries(1, 0);

/// Copies of code objects (`PythonCodeCopy`) the first time they run.
#[map]
pub(crate) static PYTHON_CODE_COPIES: RingBuf = RingBuf::with_byte_size(8 << 20, 0);
