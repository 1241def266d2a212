//! Types shared by memtrace's BPF programs (`memtrace-ebpf`) and its userspace
//! side (`memtrace`). Every struct here is the exact byte layout of a BPF map key
//! or value, so both sides must agree on it: the layouts are `#[repr(C)]`, padded
//! explicitly, and checked by the const assertions at the bottom.
#![no_std]

/// Declares a fieldless enum of codes that cross the BPF boundary (in a map, a
/// cookie, a counter index), from one list of variants with explicit values:
///
/// * the enum itself, `#[repr($int)]` (written `enum Name: $int`, as
///   `bitflags!` does), deriving `Clone, Copy, Debug, PartialEq, Eq, Hash`
///   (more derives and attributes may be given, on the enum and on each
///   variant);
/// * `ALL`: every variant in declaration order;
/// * `TryFrom<$int>`, the unknown value as the error, and `From<Self> for $int`.
///
/// A value read back from a map or a cookie must go through `try_from`: the
/// struct field holding it stays an integer, since a byte that is no
/// discriminant would make the enum itself undefined behaviour. `try_from` is a
/// plain `match` on the literals, which LLVM turns into a range check for
/// consecutive values: no table, no loop, fine for the verifier.
///
/// ```text
/// codes! {
///     /// Docs.
///     pub enum Color: u8 { Red = 0, Green = 1 }
/// }
/// ```
macro_rules! codes {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $int:ident {
            $($(#[$vmeta:meta])* $variant:ident = $value:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr($int)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant = $value),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$(stringify!($variant)),+].len()] = [$($name::$variant),+];
        }

        impl TryFrom<$int> for $name {
            /// The value that is no code.
            type Error = $int;

            #[inline(always)]
            fn try_from(v: $int) -> Result<Self, $int> {
                match v {
                    $($value => Ok($name::$variant),)+
                    _ => Err(v),
                }
            }
        }

        impl From<$name> for $int {
            #[inline(always)]
            fn from(v: $name) -> $int {
                v as $int
            }
        }
    };
}

/// Declares the event counters from one table: each line gives a counter's
/// variant, its slot in the per-CPU array `COUNTERS` and its name, which is the
/// name of its field in the report's JSON (`drops.pending_map_full`...):
///
/// * the enum of slots (via [`codes!`], `#[repr(u32)]`), `NUM_COUNTERS`, and
///   `name()`, the counter's name;
/// * behind the `user` feature, a struct with one `u64` field per counter, named
///   so, and `from_raw`, which fills it from the slots as userspace reads them.
///
/// The slots must be 0, 1, 2... in declaration order (asserted at compile
/// time), so that `ALL[i]` is slot `i`.
macro_rules! counters {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident;
        $(#[$smeta:meta])*
        struct $values:ident;
        {
            $($(#[$vmeta:meta])* $variant:ident = $value:literal => $field:ident),+ $(,)?
        }
    ) => {
        codes! {
            $(#[$meta])*
            $vis enum $name: u32 {
                $($(#[$vmeta])* $variant = $value),+
            }
        }

        /// Slots of `COUNTERS`: one per [`Counter`].
        pub const NUM_COUNTERS: u32 = $name::ALL.len() as u32;

        const _: () = {
            let mut i = 0;
            while i < $name::ALL.len() {
                assert!($name::ALL[i] as usize == i, "counter slots must be 0, 1, 2...");
                i += 1;
            }
        };

        impl $name {
            /// The counter's name: its field in the struct of counter values and
            /// in the report's JSON.
            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($field)),+
                }
            }
        }

        $(#[$smeta])*
        #[cfg(feature = "user")]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $values {
            $($(#[$vmeta])* pub $field: u64),+
        }

        #[cfg(feature = "user")]
        impl $values {
            /// The counters from `COUNTERS`' slots (summed over the CPUs).
            pub fn from_raw(raw: &[u64; NUM_COUNTERS as usize]) -> Self {
                $values {
                    $($field: raw[$name::$variant as usize]),+
                }
            }

            /// The value of counter `c`.
            pub fn get(&self, c: $name) -> u64 {
                match c {
                    $($name::$variant => self.$field),+
                }
            }
        }
    };
}

/// The name of every map of the BPF object: the BPF side's `#[map]` statics
/// are named so (memtrace's unit tests check that the object holds exactly
/// these), and userspace opens them by these constants.
pub mod map_names {
    pub const ALLOC_KEYS: &str = "ALLOC_KEYS";
    pub const ALLOCS: &str = "ALLOCS";
    pub const SITES: &str = "SITES";
    pub const EPOCH: &str = "EPOCH";
    pub const STACKS: &str = "STACKS";
    pub const PENDING: &str = "PENDING";
    pub const COUNTERS: &str = "COUNTERS";
    pub const ALLOCATOR_HULL: &str = "ALLOCATOR_HULL";
    pub const ALLOCATOR_TEXT: &str = "ALLOCATOR_TEXT";
    pub const CALL_MARK_STATE: &str = "CALL_MARK_STATE";
    pub const CALL_MARKS: &str = "CALL_MARKS";
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    pub const PC_PAGES: &str = "PC_PAGES";
    pub const PROC_TABLES: &str = "PROC_TABLES";
    pub const SAMPLE_LOG2: &str = "SAMPLE_LOG2";
    pub const COUNTDOWN: &str = "COUNTDOWN";
    pub const RESULT_SITES: &str = "RESULT_SITES";
    pub const CAPTURES: &str = "CAPTURES";
    pub const STACK_SCRATCH: &str = "STACK_SCRATCH";
    pub const STACK_WINDOW: &str = "STACK_WINDOW";
    pub const WALK_CACHE: &str = "WALK_CACHE";
    pub const TABLES_GENERATION: &str = "TABLES_GENERATION";
    pub const CODE_STATE: &str = "CODE_STATE";
    pub const CODE_UNMAP_LOG: &str = "CODE_UNMAP_LOG";
    pub const UNMAPPED_CODE: &str = "UNMAPPED_CODE";

    pub const TRACE_STATE: &str = "TRACE_STATE";
    pub const FORK_CHILDREN: &str = "FORK_CHILDREN";

    pub const PYTHON_LAYOUT: &str = "PYTHON_LAYOUT";
    pub const PYTHON_THREADS: &str = "PYTHON_THREADS";
    pub const PYTHON_CODES_SEEN: &str = "PYTHON_CODES_SEEN";
    pub const PYTHON_NEW_CODES: &str = "PYTHON_NEW_CODES";
    pub const PYTHON_FRAME: &str = "PYTHON_FRAME";
    pub const PYTHON_CODE_COPIES: &str = "PYTHON_CODE_COPIES";

    /// Every map, in the order of `memtrace-ebpf/src/maps.rs`.
    pub const ALL: [&str; 33] = [
        ALLOC_KEYS,
        ALLOCS,
        SITES,
        EPOCH,
        STACKS,
        PENDING,
        COUNTERS,
        ALLOCATOR_HULL,
        ALLOCATOR_TEXT,
        CALL_MARK_STATE,
        CALL_MARKS,
        UNWIND_ROWS,
        PC_PAGES,
        PROC_TABLES,
        SAMPLE_LOG2,
        COUNTDOWN,
        RESULT_SITES,
        CAPTURES,
        STACK_SCRATCH,
        STACK_WINDOW,
        WALK_CACHE,
        TABLES_GENERATION,
        CODE_STATE,
        CODE_UNMAP_LOG,
        UNMAPPED_CODE,
        TRACE_STATE,
        FORK_CHILDREN,
        PYTHON_LAYOUT,
        PYTHON_THREADS,
        PYTHON_CODES_SEEN,
        PYTHON_NEW_CODES,
        PYTHON_FRAME,
        PYTHON_CODE_COPIES,
    ];
}

/// Deepest user stack memtrace records. 127 is the kernel's default
/// `perf_event_max_stack`, the most `bpf_get_stack` will walk.
pub const MAX_STACK_DEPTH: usize = 127;

/// Stack id of an allocation whose stack could not be captured. Its bytes are
/// still counted, in a site of their own, so totals stay exact.
pub const NO_STACK: u64 = 0;

/// Default map sizes (entries). The userspace side may change them before load.
pub const DEFAULT_MAX_OUTSTANDING: u32 = 1 << 20;
pub const DEFAULT_MAX_STACKS: u32 = 1 << 15;
pub const DEFAULT_MAX_PENDING: u32 = 1 << 14;

/// Most allocator functions whose code ranges the BPF side knows (see
/// [`TextRange`]): every allocator of a process together (mimalloc alone
/// has some forty). A power of two.
pub const MAX_ALLOCATOR_FUNCTIONS: u32 = 128;

const _: () = assert!(MAX_ALLOCATOR_FUNCTIONS.is_power_of_two());

/// The code of one probed allocator function in the target's address space.
/// Map `ALLOCATOR_TEXT` (array), sorted by start; the unused slots after
/// them hold [`TextRange::UNUSED`], so that a binary search over every slot
/// finds the last range starting at or before an address. An allocator call
/// whose return address lies in one of these was made by the allocator itself
/// (glibc's realloc(p, 0) calls free, posix_memalign calls malloc): it is part of
/// the user's call, not a call of its own, and is not counted again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TextRange {
    pub start: u64,
    pub end: u64,
}

impl TextRange {
    /// An unused slot of `ALLOCATOR_TEXT`: it starts past every address.
    pub const UNUSED: TextRange = TextRange {
        start: u64::MAX,
        end: u64::MAX,
    };
}

// ---- unwind tables ---------------------------------------------------------
// Userspace compiles each module's .eh_frame (or .debug_frame) into sorted rows;
// the BPF unwinder walks the stack with them. The return address is always at
// CFA - 8 on x86-64, so a row says how to find the CFA and the caller's rbp.

codes! {
    /// How a row finds the CFA ([`UnwindRow::cfa_rule`]).
    pub enum CfaRule: u8 {
        /// No unwind information for this range: the BPF side falls back to frame pointers.
        None = 0,
        /// CFA = rsp + cfa_offset
        Rsp = 1,
        /// CFA = rbp + cfa_offset
        Rbp = 2,
        /// The expression every .plt section uses:
        /// CFA = rsp + 8 + ((rip & 15) >= cfa_offset ? 8 : 0)
        Plt = 3,
        /// The outermost frame (the return address is undefined, e.g. `_start`,
        /// `clone`'s child): the stack is complete here.
        End = 4,
        /// A rule the BPF unwinder cannot follow (another DWARF expression, a CFA
        /// based on another register): the walk stops, counted and marked truncated.
        Unsupported = 5,
    }
}

codes! {
    /// Where a row finds the caller's rbp ([`UnwindRow::rbp_rule`]).
    pub enum RbpRule: u8 {
        /// The caller's rbp is the same as this frame's (not saved here).
        Same = 0,
        /// The caller's rbp is saved at CFA + rbp_offset.
        AtCfa = 1,
        /// Any other rule for rbp: the walk continues with rbp unknown (0).
        Unsupported = 2,
    }
}

/// One row: from `pc` up to the next row's `pc`. `pc` is the ELF virtual
/// address minus the module's lowest PT_LOAD virtual address, so it fits 32 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    pub pc: u32,
    pub cfa_offset: i32,
    pub rbp_offset: i16,
    /// A [`CfaRule`], kept as a byte: the row is read from a map, where any byte may
    /// be found and only a `u8` is valid for every one (see [`UnwindRow::cfa`]).
    pub cfa_rule: u8,
    /// A [`RbpRule`], kept as a byte as `cfa_rule` is (see [`UnwindRow::rbp`]).
    pub rbp_rule: u8,
}

impl UnwindRow {
    /// A row from typed rules (the only way userspace makes one).
    #[inline(always)]
    pub const fn new(
        pc: u32,
        cfa: CfaRule,
        cfa_offset: i32,
        rbp: RbpRule,
        rbp_offset: i16,
    ) -> Self {
        UnwindRow {
            pc,
            cfa_offset,
            rbp_offset,
            cfa_rule: cfa as u8,
            rbp_rule: rbp as u8,
        }
    }

    /// The CFA rule, or the unknown byte found instead.
    #[inline(always)]
    pub fn cfa(&self) -> Result<CfaRule, u8> {
        CfaRule::try_from(self.cfa_rule)
    }

    /// The rbp rule, or the unknown byte found instead.
    #[inline(always)]
    pub fn rbp(&self) -> Result<RbpRule, u8> {
        RbpRule::try_from(self.rbp_rule)
    }
}

/// Default capacity of `UNWIND_ROWS` (12 bytes each).
pub const DEFAULT_MAX_UNWIND_ROWS: u32 = 1 << 21;
/// Default capacity of `PC_PAGES`.
pub const DEFAULT_MAX_PC_PAGES: u32 = 1 << 17;
/// Code is indexed in pages of 2^PC_PAGE_SHIFT bytes: a pc's page gives its
/// module and the few rows that cover the page, so the BPF side needs one hash
/// lookup and a short binary search per frame (a search over whole modules
/// would blow the verifier's budget).
pub const PC_PAGE_SHIFT: u32 = 10;
/// Most rows one page may span; the BPF binary search does this many halvings.
pub const MAX_ROWS_PER_PAGE_LOG2: u32 = 9;

/// Key of map `PC_PAGES`: a page of code in one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PageKey {
    pub tgid: u32,
    pub _pad: u32,
    /// `pc >> PC_PAGE_SHIFT`
    pub page: u64,
}

/// Value of `PC_PAGES`: the rows covering a page.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRows {
    /// Runtime address of the module's base vaddr: a pc's row key is `pc - pc_base`.
    pub pc_base: u64,
    /// `UNWIND_ROWS[first_row .. first_row + row_count]`, the first of them at
    /// or before the page's start.
    pub first_row: u32,
    pub row_count: u32,
}

/// Why a stack walk stopped early (bits of [`StackTrace::flags`]). A stack with
/// any of the `TRUNCATED_*` bits is incomplete: its outermost frames are missing.
pub const STACK_TRUNCATED_READ: u32 = 1;
pub const STACK_TRUNCATED_DEPTH: u32 = 2;
pub const STACK_TRUNCATED_UNSUPPORTED: u32 = 4;
pub const STACK_TRUNCATED_NO_FP: u32 = 8;
/// A return address was the uretprobe trampoline (another probe's pending
/// return) and the kernel's record of the real one was not found.
pub const STACK_TRUNCATED_URETPROBE: u32 = 64;
pub const STACK_TRUNCATED_MASK: u32 = 15 | STACK_TRUNCATED_URETPROBE;
/// Some frame had no unwind row and was stepped over with its frame pointer.
pub const STACK_USED_FP: u32 = 16;
/// Frame-pointer walk (bpf_get_stack), no unwind tables for this process.
pub const STACK_FP_ONLY: u32 = 32;
/// The Python frames did not all fit: the outermost are missing.
pub const STACK_PYTHON_TRUNCATED: u32 = 64;
/// Bits 16..24 of [`StackTrace::flags`]: how many Python frames the stack
/// ends with (see [`StackTrace::python_len`]).
pub const STACK_PYTHON_SHIFT: u32 = 16;
/// The native frames below the innermost Python frame's evaluation loop
/// (the interpreter's own, between Python frames) were left out: the walk
/// stopped there.
pub const STACK_PYTHON_FOLDED: u32 = 128;

// ---- Python frames -----------------------------------------------------------
// When the target runs a CPython interpreter memtrace knows, the stack walk
// also reads the calling thread's Python frame chain. Each Python frame is two
// words at the end of `StackTrace::frames`: the code object's address (bit 0:
// the frame was entered from C, see PY_FRAME_ENTRY), then the instruction's
// byte offset from the code object (low half; 3.10: `f_lasti`, see
// PY_LAYOUT_LASTI) and a check of the code object
// (high half, see `python_code_check`). Userspace reads the code object's
// names and line table from the target's memory.

/// Most Python frames recorded per stack, innermost first.
pub const MAX_PYTHON_FRAMES: usize = 48;
/// Bit 0 of a Python frame's first word: a C function called into Python here
/// (the native frames of that call sit between this frame and the next).
pub const PY_FRAME_ENTRY: u64 = 1;

/// The check kept with each Python frame: from two fields of the code object
/// next to each other (`co_stacksize` and `co_firstlineno` on 3.11–3.13,
/// `co_flags` and `co_firstlineno` on 3.10), so
/// that a code object freed and its address reused by another is told apart.
pub const fn python_code_check(word: u64) -> u32 {
    let x = word.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 32) as u32
}

/// How the BPF side finds the calling thread's Python frames (the map
/// `PYTHON_LAYOUT`, one entry, set by userspace for a CPython it knows).
/// Addresses are the target's; `*_off` fields are byte offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonLayout {
    /// 0: no Python (the walk does nothing).
    pub enabled: u32,
    /// 1: keep every native frame (no folding of the interpreter's frames).
    pub keep_native: u32,
    /// `_PyRuntime`.
    pub runtime: u64,
    /// `_PyEval_EvalFrameDefault`'s code: the native stack is cut at its
    /// first frame there (the innermost Python frame's C frame).
    pub eval_start: u64,
    pub eval_end: u64,
    /// `_Py_NoneStruct`: a 3.13 frame whose executable is None ends the walk.
    pub none: u64,
    /// `_PyRuntime.interpreters.head`.
    pub interp_head_off: u32,
    /// `PyInterpreterState.threads.head`.
    pub interp_threads_off: u32,
    /// `PyThreadState.next`, `.native_thread_id`.
    pub tstate_next_off: u32,
    pub tstate_tid_off: u32,
    /// `PyThreadState.cframe` (3.11, 3.12) or `.current_frame` (3.13).
    pub tstate_frame_off: u32,
    /// `_PyCFrame.current_frame`, or `u32::MAX` when `tstate_frame_off`
    /// leads to the frame directly.
    pub cframe_frame_off: u32,
    /// `_PyInterpreterFrame` fields.
    pub frame_code_off: u32,
    pub frame_previous_off: u32,
    pub frame_instr_off: u32,
    /// `owner` (3.12+: 3 is a C stack shim frame) or `u32::MAX`.
    pub frame_owner_off: u32,
    /// `is_entry` (3.11) or `u32::MAX`.
    pub frame_entry_off: u32,
    /// Where in the code object the 8 bytes of the check are.
    pub code_check_off: u32,
    /// `co_qualname`, `co_filename`, `co_linetable`: copied with the code
    /// object the first time it runs (see `PythonCodeCopy`).
    pub code_qualname_off: u32,
    pub code_filename_off: u32,
    pub code_linetable_off: u32,
    /// `PY_LAYOUT_*` bits: how this version differs from 3.11's model.
    pub flags: u32,
    /// `task_struct.thread.fsbase` in the running kernel (for
    /// `PY_LAYOUT_TID_PTHREAD`).
    pub task_fsbase_off: u32,
    pub _pad: u32,
}

/// `PythonLayout::flags`: the thread state's `tstate_tid_off` field is the
/// creating thread's `pthread_self()` (3.10's `thread_id`; 3.10 has no
/// `native_thread_id`), matched against the calling task's `fsbase`: glibc's
/// and musl's `pthread_self()` on x86-64.
pub const PY_LAYOUT_TID_PTHREAD: u32 = 1;
/// The frame's `frame_instr_off` field is an `int` index of the last
/// instruction in code units (3.10's `f_lasti`, -1 before the first), not a
/// pointer: recorded as it is.
pub const PY_LAYOUT_LASTI: u32 = 2;
/// Every frame has its own C frame of the evaluation function (3.10's
/// `PyFrameObject`s): each is marked `PY_FRAME_ENTRY`.
pub const PY_LAYOUT_EVERY_ENTRY: u32 = 4;

/// Bytes of each part of a [`PythonCodeCopy`].
pub const PY_COPY_CODE: usize = 256;
pub const PY_COPY_QUALNAME: usize = 192;
pub const PY_COPY_FILENAME: usize = 320;
pub const PY_COPY_LINETABLE: usize = 2048;

/// `PythonCodeCopy::copied` bits: which parts were read.
pub const PY_COPIED_CODE: u32 = 1;
pub const PY_COPIED_QUALNAME: u32 = 2;
pub const PY_COPIED_FILENAME: u32 = 4;
pub const PY_COPIED_LINETABLE: u32 = 8;

/// A code object as it was the first time it ran (the ring buffer
/// `PYTHON_CODE_COPIES`): its first bytes and those of its qualified name,
/// file name and line table objects, from their starts. Userspace reads
/// names and lines from the copy, so a code object freed (or the target gone)
/// before the report is still named. What the copy lacks (a line table
/// longer than its part) is read from the target's memory while it lives.
/// A part is read whole, or up to its page's end or 64 bytes when the
/// object sits near the end of its mapping: `*_len` say how many of its
/// bytes were read; the rest of the entry is whatever the ring buffer held.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PythonCodeCopy {
    pub code: u64,
    pub qualname: u64,
    pub filename: u64,
    pub linetable: u64,
    pub check: u32,
    /// `PY_COPIED_*` bits.
    pub copied: u32,
    pub code_len: u16,
    pub qualname_len: u16,
    pub filename_len: u16,
    pub linetable_len: u16,
    pub code_bytes: [u8; PY_COPY_CODE],
    pub qualname_bytes: [u8; PY_COPY_QUALNAME],
    pub filename_bytes: [u8; PY_COPY_FILENAME],
    pub linetable_bytes: [u8; PY_COPY_LINETABLE],
}

/// A code object the BPF side saw for the first time (the queue
/// `PYTHON_NEW_CODES`): userspace reads it at once, before it can be freed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonCode {
    pub code: u64,
    /// Its check (`python_code_check`), in the low half.
    pub check: u64,
}

/// Code objects remembered as reported (the LRU `PYTHON_CODES_SEEN`), and
/// the room of the queue `PYTHON_NEW_CODES`.
pub const PYTHON_CODES_SEEN_ENTRIES: u32 = 65536;
pub const PYTHON_NEW_CODES_ENTRIES: u32 = 16384;

/// `_PyInterpreterFrame.owner` of a shim frame that C code pushes (3.12+).
pub const PY_FRAME_OWNED_BY_CSTACK: u8 = 3;
/// Bytes of a frame read in one go: every field used above, of a
/// `PyFrameObject` (3.10, `f_lasti` at 96) or a `_PyInterpreterFrame`
/// (3.11+, in its first [`PY_FRAME_READ_MIN`] bytes).
pub const PY_FRAME_READ: usize = 104;
/// Read when `PY_FRAME_READ` bytes cannot be: a 3.11+ frame at the very end
/// of its mapping.
pub const PY_FRAME_READ_MIN: usize = 72;

/// The argument layouts of the allocator entry points memtrace probes. The
/// value is stored in [`PendingCall::kind`]; each variant is named after the
/// glibc (or allocator) function that has that layout, and every function
/// with the same layout shares it (`mi_malloc`, `mallocx`, `operator new`
/// are `Malloc`). [`AllocKind::args`] says which argument is which.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    /// `malloc(size)`
    Malloc = 0,
    /// `calloc(nmemb, size)`
    Calloc = 1,
    /// `realloc(ptr, size)`
    Realloc = 2,
    /// `reallocarray(ptr, nmemb, size)`
    ReallocArray = 3,
    /// `memalign(align, size)`, `aligned_alloc(align, size)`
    Memalign = 4,
    /// `posix_memalign(&ptr, align, size)`: the result is read through the out-pointer.
    PosixMemalign = 5,
    /// `valloc(size)`
    Valloc = 6,
    /// `pvalloc(size)`
    Pvalloc = 7,
    /// `mi_heap_malloc(heap, size)`
    HeapMalloc = 8,
    /// `mi_heap_calloc(heap, nmemb, size)`
    HeapCalloc = 9,
    /// `mi_heap_realloc(heap, ptr, size)`
    HeapRealloc = 10,
    /// `mi_heap_reallocn(heap, ptr, nmemb, size)`
    HeapReallocArray = 11,
    /// jemalloc's `xallocx(ptr, size, extra, flags)`: resizes the block in
    /// place (the pointer stays) and returns its usable size, which is below
    /// `size` when it could not.
    Xallocx = 12,
}

/// Where an allocating function's arguments are: indexes of its integer
/// arguments (0 is rdi on x86-64), for [`AllocKind::args`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgLayout {
    /// The requested size (the element size for an array).
    pub size: u8,
    /// The element count, for an array (`calloc`): the size is their product.
    pub count: Option<u8>,
    /// The block being resized (`realloc`).
    pub old_ptr: Option<u8>,
    /// Where the new block's address is stored (`posix_memalign`).
    pub out_ptr: Option<u8>,
    /// The alignment, when the call fails for some values (`memalign`).
    pub align: Option<u8>,
    /// Bytes wanted beyond `size` if they come cheap (`xallocx`).
    pub extra: Option<u8>,
}

impl ArgLayout {
    const fn size(size: u8) -> Self {
        ArgLayout {
            size,
            count: None,
            old_ptr: None,
            out_ptr: None,
            align: None,
            extra: None,
        }
    }

    /// Every argument the layout names (at most four).
    pub const fn used(&self) -> [Option<u8>; 6] {
        [
            Some(self.size),
            self.count,
            self.old_ptr,
            self.out_ptr,
            self.align,
            self.extra,
        ]
    }
}

/// The argument layouts of the freeing entry points: which argument is the
/// block. A free's attach cookie is its `FreeKind` (`SiteCookie::free`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeKind {
    /// `free(ptr)`, and every free of the C API and the allocators' own.
    Free = 0,
    /// `_PyObject_Free(ctx, ptr)`: pymalloc's, the `free` of a
    /// `PyMemAllocatorEx` (its context first).
    CtxFree = 1,
}

impl FreeKind {
    /// The index of the block's argument (0 is rdi on x86-64).
    #[inline(always)]
    pub const fn ptr_arg(self) -> usize {
        match self {
            FreeKind::Free => 0,
            FreeKind::CtxFree => 1,
        }
    }
}

// ---- attach cookies -----------------------------------------------------------
// Each probe of the session and result-site links carries a 64-bit attach
// cookie: the site's address (or a result site's index) << 8, and in the low
// byte what the probe is (an `AllocKind`, a `MarkKind`, `SITE_RESULT`) with,
// for an allocating function's entry, two flags and, from bit 40, where its
// arguments are at that site (the address keeps its low 32 bits, which are
// only for reading logs). [`SiteCookie`] makes and
// reads them; the masks are what it is made of.

/// In the attach cookie of an allocating function's uprobe session (its
/// address << 8 | its `AllocKind` | this bit): the function never jumps out of
/// its own code (no tail call into another allocator function), so the session
/// may keep a call's state in the session's own cookie instead of `PENDING`.
pub const SITE_CALL_IN_COOKIE: u64 = 0x80;

/// In the attach cookie of an allocating function's uprobe session: the
/// function jumps out of its code into code that jumps to a probed function
/// (glibc's memalign into `_mid_memalign`, then malloc), or, when calls are
/// told by return address (no marks), it may tail-call a probed function at
/// all. With sampling, an unsampled call of it is kept in `PENDING` too
/// (`PENDING_UNSAMPLED`), so that the inner entry knows the call is counted.
/// The `AllocKind` is then `cookie & SITE_KIND_MASK`.
pub const SITE_UNSAMPLED_PENDING: u64 = 0x40;
pub const SITE_KIND_MASK: u64 = 0x3f;
/// The low bits that say what a probe is when it is not an allocating
/// function's entry: a [`MarkKind`] or `SITE_RESULT` (these overlap
/// `SITE_UNSAMPLED_PENDING`, which only an entry's cookie has).
pub const SITE_TAG_MASK: u64 = 0x7f;

codes! {
    /// What a probe on the allocator's own call or jump into one of its probed
    /// functions tells the callee's entry (see `CallMarkState`); its cookie's
    /// low byte.
    pub enum MarkKind: u8 {
        /// A jump into a probed function from code outside them that they
        /// call: the callee's entry checks its return address as with
        /// `CallMarks::BySp`.
        Check = 0x7c,
        /// A `jmp` (a tail call: the callee's entry sees the same sp).
        Jump = 0x7d,
        /// A `call` (the callee's entry sees sp - 8).
        Call = 0x7e,
    }
}

/// An allocating function's entry cookie holds its [`ArgRegs`] from this bit
/// on (24 bits; the site's address below keeps its low 32 bits).
pub const SITE_ARG_REGS_SHIFT: u32 = 40;

/// Where an allocating function's arguments are at one of its entry probe
/// sites: nibble `i` for ABI argument `i` (rdi, rsi, rdx, rcx, r8, r9), 0
/// when it is in its own register, else the [`PtReg`] holding it + 1. All 0
/// at the entry; not at an entry-cover site reached after the function moved
/// an argument (mimalloc's `malloc` copies the size to rsi and loads its heap
/// into rdi before its first branch). Decided from the code by the cover
/// analysis (memtrace/src/attach/exits/cover.rs), never guessed. Registers
/// only: a cover site never follows a stack access.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArgRegs(pub u32);

impl ArgRegs {
    /// Every argument in its own register.
    pub const AT_ENTRY: ArgRegs = ArgRegs(0);
    /// The [`PtReg`] of each ABI argument register, in order.
    pub const ABI: [PtReg; 6] = [
        PtReg::Rdi,
        PtReg::Rsi,
        PtReg::Rdx,
        PtReg::Rcx,
        PtReg::R8,
        PtReg::R9,
    ];

    /// These, with argument `arg` in `reg`.
    pub const fn with(self, arg: usize, reg: PtReg) -> Self {
        let shift = 4 * arg as u32;
        let nibble = if reg as u8 == Self::ABI[arg] as u8 {
            0
        } else {
            reg as u32 + 1
        };
        ArgRegs(self.0 & !(0xf << shift) | nibble << shift)
    }

    /// The [`PtReg`] index of the register holding argument `arg` (< 6).
    #[inline(always)]
    pub const fn reg(self, arg: usize) -> u8 {
        match (self.0 >> (4 * arg as u32)) & 0xf {
            0 => Self::ABI[arg] as u8,
            n => (n - 1) as u8,
        }
    }
}

/// Attach cookie tag of a result site (`index << 8 | SITE_RESULT`): a probe
/// inside an allocating function where its outcome is known, configured by
/// entry `index` of `RESULT_SITES` (see memtrace/src/attach/exits/).
pub const SITE_RESULT: u64 = 0x7b;

/// An attach cookie (see the masks above): made by userspace with
/// [`SiteCookie::entry`], [`SiteCookie::mark`] or [`SiteCookie::result`],
/// read by the BPF side with the other methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteCookie(pub u64);

impl SiteCookie {
    /// An allocating function's entry at `addr`, of `kind`, with its flags
    /// (`SITE_CALL_IN_COOKIE`, `SITE_UNSAMPLED_PENDING`), its arguments in
    /// their own registers (see [`Self::with_args`]).
    #[inline(always)]
    pub const fn entry(
        addr: u64,
        kind: AllocKind,
        call_in_cookie: bool,
        unsampled_pending: bool,
    ) -> Self {
        // The address's low 32 bits: the bits above hold the `ArgRegs`.
        let mut c = (addr & 0xffff_ffff) << 8 | kind as u64;
        if call_in_cookie {
            c |= SITE_CALL_IN_COOKIE;
        }
        if unsampled_pending {
            c |= SITE_UNSAMPLED_PENDING;
        }
        SiteCookie(c)
    }

    /// An entry's cookie for a site where its arguments are at `args`
    /// (in bits `SITE_ARG_REGS_SHIFT..`; the address keeps its low bits).
    #[inline(always)]
    pub const fn with_args(self, args: ArgRegs) -> Self {
        SiteCookie(
            self.0 & ((1 << SITE_ARG_REGS_SHIFT) - 1) | (args.0 as u64) << SITE_ARG_REGS_SHIFT,
        )
    }

    /// Where an entry's arguments are at its site.
    #[inline(always)]
    pub const fn arg_regs(self) -> ArgRegs {
        ArgRegs((self.0 >> SITE_ARG_REGS_SHIFT) as u32)
    }

    /// A mark site at `addr`.
    #[inline(always)]
    pub const fn mark(addr: u64, kind: MarkKind) -> Self {
        SiteCookie(addr << 8 | kind as u64)
    }

    /// A freeing function's entry, of `kind` (low bits; its address is not
    /// needed).
    #[inline(always)]
    pub const fn free(kind: FreeKind) -> Self {
        SiteCookie(kind as u64)
    }

    /// The layout of a free's entry, for a cookie that is not a mark's.
    #[inline(always)]
    pub const fn free_kind(self) -> FreeKind {
        if self.0 & SITE_TAG_MASK == FreeKind::CtxFree as u64 {
            FreeKind::CtxFree
        } else {
            FreeKind::Free
        }
    }

    /// Result site number `index` (its entry in `RESULT_SITES`).
    #[inline(always)]
    pub const fn result(index: u32) -> Self {
        SiteCookie((index as u64) << 8 | SITE_RESULT)
    }

    /// The mark, if this is a mark site's cookie.
    #[inline(always)]
    pub fn mark_kind(self) -> Option<MarkKind> {
        MarkKind::try_from((self.0 & SITE_TAG_MASK) as u8).ok()
    }

    /// The allocating function's kind, for an entry's cookie (and for any
    /// other whose low bits happen to be one: ask [`Self::mark_kind`] first).
    #[inline(always)]
    pub fn alloc_kind(self) -> Option<AllocKind> {
        AllocKind::from_u32((self.0 & SITE_KIND_MASK) as u32)
    }

    /// An entry's `SITE_CALL_IN_COOKIE` flag.
    #[inline(always)]
    pub const fn call_in_cookie(self) -> bool {
        self.0 & SITE_CALL_IN_COOKIE != 0
    }

    /// An entry's `SITE_UNSAMPLED_PENDING` flag.
    #[inline(always)]
    pub const fn unsampled_pending(self) -> bool {
        self.0 & SITE_UNSAMPLED_PENDING != 0
    }

    /// A result site's index in `RESULT_SITES`.
    #[inline(always)]
    pub const fn result_index(self) -> u32 {
        (self.0 >> 8) as u32
    }
}

/// A result site's `cond` when it applies whatever the flags (any other
/// `cond` is a jcc's condition code, 0..=15).
pub const RESULT_ALWAYS: u8 = 0xff;

codes! {
    /// What a result site reports for the edge about to be taken
    /// ([`ResultSite::taken`], [`ResultSite::not_taken`]).
    pub enum SiteOutcome: u8 {
        /// Nothing: the call goes on (or was not foreseen here).
        Nothing = 0,
        /// The call returns rax.
        Record = 1,
        /// The call returns NULL.
        Null = 2,
        /// The padding after a call taken never to return: reached, it did
        /// return (`Counter::UnforeseenReturns`).
        Guard = 3,
    }
}

codes! {
    /// Where a result site finds a value ([`ResultSite::size_loc`],
    /// [`ResultSite::rbp_loc`]).
    pub enum ValueLoc: u8 {
        /// Nowhere.
        None = 0,
        /// In a register (its [`PtReg`] index).
        Reg = 1,
        /// At rsp + `off` in the stack.
        Stack = 2,
    }
}

codes! {
    /// Indexes of x86-64 `struct pt_regs`'s general registers (its field order).
    pub enum PtReg: u8 {
        R15 = 0,
        R14 = 1,
        R13 = 2,
        R12 = 3,
        Rbp = 4,
        Rbx = 5,
        R11 = 6,
        R10 = 7,
        R9 = 8,
        R8 = 9,
        Rax = 10,
        Rcx = 11,
        Rdx = 12,
        Rsi = 13,
        Rdi = 14,
    }
}

/// Entries of `RESULT_SITES`.
pub const MAX_RESULT_SITES: u32 = 64;

/// One result site. Map `RESULT_SITES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResultSite {
    /// A conditional jump's condition code (its opcode's low nibble), or
    /// `RESULT_ALWAYS`.
    pub cond: u8,
    /// A [`SiteOutcome`] when the condition holds (or always), and when it
    /// does not; bytes, as every code read from a map (see [`UnwindRow`]).
    pub taken: u8,
    pub not_taken: u8,
    /// 1: store the size for a later site of the same call (`CAPTURES`).
    pub capture: u8,
    /// A [`ValueLoc`] and a [`PtReg`], for the size and for the caller's rbp.
    pub size_loc: u8,
    pub size_reg: u8,
    pub rbp_loc: u8,
    pub rbp_reg: u8,
    /// Their offsets from rsp, for `ValueLoc::Stack`.
    pub size_off: i32,
    pub rbp_off: i32,
    /// rsp at the function's entry - rsp here.
    pub entry_sp_delta: u32,
    /// The function's `AllocKind`.
    pub kind: u16,
    /// The [`PtReg`] holding the call's result here: rax where the function
    /// has already put it there (glibc), else the register it moves to rax
    /// before `ret` (jemalloc's fast path keeps it in r11, mimalloc's in
    /// rdx). Decided from the code (memtrace/src/attach/exits/), per site.
    pub result_reg: u8,
    pub _pad: u8,
}

impl ResultSite {
    /// The outcome when the site's condition holds, or the byte found instead.
    #[inline(always)]
    pub fn taken(&self) -> Result<SiteOutcome, u8> {
        SiteOutcome::try_from(self.taken)
    }

    /// The outcome when it does not, or the byte found instead.
    #[inline(always)]
    pub fn not_taken(&self) -> Result<SiteOutcome, u8> {
        SiteOutcome::try_from(self.not_taken)
    }
}

/// A size a result site captured for a later one of the same call. Map
/// `CAPTURES`, indexed by thread id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capture {
    pub tid: u32,
    pub _pad: u32,
    /// rsp at the call's entry.
    pub sp: u64,
    pub size: u64,
}

codes! {
    /// How the BPF side tells a call made by the allocator itself (glibc's
    /// realloc(p, 0) calls free) from a user's call ([`CallMarkState::mode`]).
    pub enum CallMarks: u64 {
        /// Read the return address at [sp] at every entry and look for the
        /// function it is in.
        BySp = 0,
        /// Rely on probes on every such call and jump in the allocator's code
        /// (found in its code by userspace), each leaving a mark for its thread
        /// that the callee's entry takes. With no mark in flight, an entry
        /// needs no user-memory read and no map lookup to know it is a user's
        /// call.
        BySite = 1,
    }
}

/// The one entry of `CALL_MARK_STATE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallMarkState {
    /// A [`CallMarks`] (written by userspace before attaching), kept as a
    /// `u64` as every code read from a map.
    pub mode: u64,
    /// Marks left and not yet taken (all threads).
    pub in_flight: u64,
    /// Calls put in `PENDING` and not yet taken out by their return (at least:
    /// entries userspace expires are not subtracted). While it is 0, no entry
    /// can be a tail call of a pending call, and needs no `PENDING` lookup.
    pub pending: u64,
    /// Bit `1 << kind` for each `AllocKind` whose function may reach another
    /// probed function by jumping (a tail call: glibc's realloc(NULL, n)
    /// jumps to malloc), for classic entry probes, which have no attach
    /// cookie to say so (see `SITE_UNSAMPLED_PENDING`).
    pub tail_kinds: u64,
}

/// The one entry of `TRACE_STATE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceState {
    /// 1 once tracing has ended (written by userspace before it detaches):
    /// every program then returns at once, so that nothing the target does
    /// while the probes are being removed (which takes a while) is counted.
    pub ended: u32,
    /// 1 once the target called exec (set by the BPF side, which also sets
    /// `ended`: every address this object knows belongs to the old program).
    pub exec_seen: u32,
    /// The uretprobe trampoline's address in the target (see `UprobeOffsets`),
    /// once the BPF side has found it; 0 before.
    pub uretprobe_trampoline: u64,
    /// When the target called exec (CLOCK_MONOTONIC ns); 0 before.
    pub exec_ns: u64,
    /// Processes the target created (fork, vfork, clone without
    /// CLONE_THREAD) while traced: they are not followed.
    pub forks: u64,
    /// Set by userspace: stop the target (SIGSTOP) at its exec, before the
    /// new program runs, so that memtrace attaches to it first (launch mode,
    /// where memtrace is the parent that sees the stop).
    pub stop_at_exec: u32,
    /// Set by userspace (`--follow-forks`): each process the target creates
    /// goes into `FORK_CHILDREN` and is stopped (SIGSTOP) before its first
    /// instruction, for memtrace to attach to it first.
    pub follow_forks: u32,
    /// The pids of the first `MAX_FORK_PIDS` of `forks`.
    pub fork_pids: [u32; MAX_FORK_PIDS],
}

/// Pids of processes the target created that `TraceState` keeps.
pub const MAX_FORK_PIDS: usize = 16;

/// Entries of `FORK_CHILDREN` (pid → one of the `FORK_CHILD_*` states): the
/// children created and not yet taken by userspace. A child that finds the
/// map full is not stopped, and so not followed (it is still counted in
/// `TraceState::forks`).
pub const MAX_FORK_CHILDREN: u32 = 256;
/// A `FORK_CHILDREN` entry: created (`task_newtask`, in the parent), not yet run.
pub const FORK_CHILD_BORN: u32 = 0;
/// A `FORK_CHILDREN` entry: the child returned from its fork and was sent
/// SIGSTOP, before its first instruction.
pub const FORK_CHILD_STOPPED: u32 = 1;

/// Offsets in the kernel's own structures (from its BTF, set by userspace
/// before load; 0: unknown) through which the BPF side finds the return
/// address a pending return probe replaced. A uretprobe (or a uprobe session
/// that keeps its return) overwrites the return address on the stack with
/// its trampoline, the first word of the `[uprobes]` page, and keeps the
/// real one in `current->utask->return_instances`, innermost first, each
/// with the stack address it overwrote (`stack`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UprobeOffsets {
    /// `task_struct.mm`, `task_struct.utask`.
    pub task_mm: u32,
    pub task_utask: u32,
    /// `mm_struct.uprobes_state.xol_area`, `xol_area.vaddr`: the trampoline.
    pub mm_xol_area: u32,
    pub xol_area_vaddr: u32,
    /// `uprobe_task.return_instances`.
    pub utask_return_instances: u32,
    /// `return_instance.stack`, `.orig_ret_vaddr`, `.next`.
    pub ri_stack: u32,
    pub ri_orig_ret_vaddr: u32,
    pub ri_next: u32,
}

impl UprobeOffsets {
    /// Whether every offset is known (none of these fields is at offset 0).
    pub fn complete(&self) -> bool {
        self.task_mm != 0
            && self.task_utask != 0
            && self.mm_xol_area != 0
            && self.xol_area_vaddr != 0
            && self.utask_return_instances != 0
            && self.ri_stack != 0
            && self.ri_orig_ret_vaddr != 0
            && self.ri_next != 0
    }
}

/// Most pending return probes of one thread the kernel keeps
/// (`MAX_URETPROBE_DEPTH`): the longest list the BPF side looks through.
pub const MAX_URETPROBE_DEPTH: u32 = 64;

/// Threads that may be between an allocator-internal call and its callee's probe at once.
pub const MAX_CALL_MARKS: u32 = 1 << 12;

/// Stand-in helper numbers the session program calls; userspace rewrites each
/// such call into a call of the kernel function (kfunc) of that name, found in
/// the kernel's BTF, before loading (aya's toolchain cannot emit kfunc calls).
pub const KFUNC_SESSION_COOKIE: i32 = 0x7ff0_0001;
pub const KFUNC_SESSION_IS_RETURN: i32 = 0x7ff0_0002;
/// (stand-in number, kernel function) pairs.
pub const KFUNCS: [(i32, &str); 2] = [
    (KFUNC_SESSION_COOKIE, "bpf_session_cookie"),
    (KFUNC_SESSION_IS_RETURN, "bpf_session_is_return"),
];

impl AllocKind {
    pub const ALL: [AllocKind; 13] = [
        AllocKind::Malloc,
        AllocKind::Calloc,
        AllocKind::Realloc,
        AllocKind::ReallocArray,
        AllocKind::Memalign,
        AllocKind::PosixMemalign,
        AllocKind::Valloc,
        AllocKind::Pvalloc,
        AllocKind::HeapMalloc,
        AllocKind::HeapCalloc,
        AllocKind::HeapRealloc,
        AllocKind::HeapReallocArray,
        AllocKind::Xallocx,
    ];

    pub fn from_u32(v: u32) -> Option<AllocKind> {
        Self::ALL.get(v as usize).copied()
    }

    /// Where the function's arguments are: what the BPF side reads at its
    /// entry, and what probe placement must not see overwritten before the
    /// probe (memtrace/src/attach/placement.rs).
    #[inline(always)]
    pub const fn args(self) -> ArgLayout {
        let base = ArgLayout::size(0);
        match self {
            AllocKind::Malloc | AllocKind::Valloc | AllocKind::Pvalloc => base,
            AllocKind::Calloc => ArgLayout {
                count: Some(0),
                ..ArgLayout::size(1)
            },
            AllocKind::Realloc => ArgLayout {
                old_ptr: Some(0),
                ..ArgLayout::size(1)
            },
            AllocKind::ReallocArray => ArgLayout {
                old_ptr: Some(0),
                count: Some(1),
                ..ArgLayout::size(2)
            },
            AllocKind::Memalign => ArgLayout {
                align: Some(0),
                ..ArgLayout::size(1)
            },
            AllocKind::PosixMemalign => ArgLayout {
                out_ptr: Some(0),
                align: Some(1),
                ..ArgLayout::size(2)
            },
            AllocKind::HeapMalloc => ArgLayout::size(1),
            AllocKind::HeapCalloc => ArgLayout {
                count: Some(1),
                ..ArgLayout::size(2)
            },
            AllocKind::HeapRealloc => ArgLayout {
                old_ptr: Some(1),
                ..ArgLayout::size(2)
            },
            AllocKind::HeapReallocArray => ArgLayout {
                old_ptr: Some(1),
                count: Some(2),
                ..ArgLayout::size(3)
            },
            AllocKind::Xallocx => ArgLayout {
                old_ptr: Some(0),
                extra: Some(2),
                ..ArgLayout::size(1)
            },
        }
    }

    /// The call resizes a block (`args().old_ptr` is set): its return
    /// retires the old block.
    #[inline(always)]
    pub const fn resizes(self) -> bool {
        self.args().old_ptr.is_some()
    }
}

/// One outstanding allocation, in a slot of an [`AllocBucket`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Requested size in bytes.
    pub size: u64,
    /// Key of the allocating stack in `STACKS` and `SITES` (or [`NO_STACK`]).
    pub stack_id: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the allocator returned.
    pub timestamp_ns: u64,
    /// The [`Epoch`] the block was born in: its aggregate is `SITES[(stack_id, epoch)]`.
    pub epoch: u32,
    /// Birth time after the epoch's start, in [`EPOCH_TIME_SHIFT`] units
    /// (saturated): what the block added to its aggregate's `birth_sum`.
    pub birth_offset: u32,
}

// ---- the table of outstanding blocks ---------------------------------------
// ALLOCS is a hash table in two arrays of buckets, not a BPF hash map: a block
// has two candidate buckets (two hashes of its address), and lives in a free
// slot of one of them. A lookup reads one 64-byte line of keys per bucket,
// an insert claims a slot with one compare-and-swap: no lock, no allocation,
// no RCU-deferred free, which made it much cheaper per traced pair than the
// BPF hash map it replaced. Both arrays are mmapable, so userspace scans them
// without a syscall per entry.

/// Slots per bucket: 8 keys fill one cache line.
pub const ALLOC_BUCKET_SLOTS: usize = 8;

/// A slot's key: empty, claimed by an insert still writing its block, or the
/// block's address (never 0 or 1: allocators align to at least 8).
pub const ALLOC_KEY_EMPTY: u64 = 0;
pub const ALLOC_KEY_BUSY: u64 = 1;

/// Map `ALLOC_KEYS` (array, one entry per bucket): the addresses in a bucket.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocKeys {
    pub keys: [u64; ALLOC_BUCKET_SLOTS],
}

/// Map `ALLOCS` (array, one entry per bucket): the blocks of a bucket, slot
/// `i` belonging to `AllocKeys::keys[i]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocBucket {
    pub blocks: [Allocation; ALLOC_BUCKET_SLOTS],
}

/// Buckets for room for `max_blocks` blocks: 1.5 slots per block. With two
/// choices of 8-slot buckets, placing as many random addresses as the table is
/// sized for turned none away in 50 runs of 2^20 (at 1.4 slots per block,
/// about one per run: the failure rate falls off a cliff between the two).
/// A block whose two buckets are full is counted (`Counter::AllocMapFull`).
pub const fn alloc_buckets(max_blocks: u32) -> u32 {
    let slots = (max_blocks as u64 * 3).div_ceil(2);
    let b = slots.div_ceil(ALLOC_BUCKET_SLOTS as u64);
    if b == 0 { 1 } else { b as u32 }
}

/// The two candidate buckets of the block at `addr` in a table of `buckets`
/// buckets: the two halves of one 64-bit hash (murmur3's finalizer), each
/// mapped onto `0..buckets` by a multiply-shift (no power of two needed). Both
/// are below `buckets`. A weaker hash (one multiplication per choice) gave
/// correlated choices for the regular addresses of a real heap: 14 blocks of
/// a million turned away at 68% load, none with this one.
#[inline(always)]
pub const fn alloc_bucket_choices(addr: u64, buckets: u32) -> (u32, u32) {
    let mut h = addr;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (
        (((h & 0xffff_ffff) * buckets as u64) >> 32) as u32,
        (((h >> 32) * buckets as u64) >> 32) as u32,
    )
}

/// Key of the per-site aggregates: a site (allocation stack) and the epoch its
/// blocks were born in. Ages come from these, so a report reads one entry per
/// site and epoch that holds blocks, never one per block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SiteKey {
    pub stack_id: u64,
    pub epoch: u32,
    pub _pad: u32,
}

/// Per-site (and birth epoch) aggregate, kept in the kernel. Map `SITES`:
/// [`SiteKey`] → `SiteStats`. Updated with atomic adds from every CPU; userspace
/// removes the entries of past epochs that hold no block (after adding their
/// call counts to its own per-site totals).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteStats {
    pub outstanding_blocks: i64,
    pub outstanding_bytes: i64,
    pub alloc_calls: u64,
    pub alloc_bytes: u64,
    /// Sum of the outstanding blocks' `birth_offset`s: their mean birth time.
    pub birth_sum: u64,
    /// Allocations of this stack not recorded because the block table was
    /// full (`Counter::AllocMapFull`): its figures miss them.
    pub dropped_blocks: u64,
}

/// The current epoch (map `EPOCH`, one entry), written by userspace at every
/// history sample: blocks born after `start_ns` belong to epoch `id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Epoch {
    pub id: u32,
    pub _pad: u32,
    pub start_ns: u64,
}

/// `Allocation::birth_offset` is in units of 2^EPOCH_TIME_SHIFT ns (about 1 ms):
/// 32 bits hold 52 days of one epoch.
pub const EPOCH_TIME_SHIFT: u32 = 20;

/// A user stack, innermost return address first. Map `STACKS`: stack id → `StackTrace`.
/// The id is a 64-bit hash of the frames, and of the code generation of each frame that
/// lies in code unmapped while traced (see [`CodeState`]); a different stack with the
/// same hash is detected (the frames are compared) and counted, never merged.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackTrace {
    pub len: u32,
    /// `STACK_*` bits: how the walk went.
    pub flags: u32,
    pub frames: [u64; MAX_STACK_DEPTH],
    /// The code generation ([`CodeState::generation`]) when the stack was first stored:
    /// its frames are in the code that was mapped then.
    pub generation: u64,
}

// ---- code unmapped while traced ------------------------------------------------

/// The target's code that was unmapped while traced, for telling the stacks
/// taken in a library from those taken in one loaded at its address later. Map
/// `CODE_STATE`, one entry, written by the BPF side only.
///
/// Every unmapping of code (munmap, or a mapping replaced by mmap MAP_FIXED or
/// mremap, of a range holding an executable mapping) is seen at the syscall's entry
/// and makes a new code *generation*: `generation` is bumped, the range is logged in
/// `CODE_UNMAP_LOG` under it (for userspace, which resolves each stack's frames in
/// the mappings of its generation), and merged into `UNMAPPED_CODE`, whose
/// generations are mixed into the id of every stack with a frame in their range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeState {
    /// Code unmappings so far.
    pub generation: u64,
    /// Entries of `UNMAPPED_CODE` claimed (those in use: at most
    /// [`MAX_UNMAPPED_RANGES`]).
    pub ranges: u64,
    /// The lowest start and highest end of those ranges: a frame outside needs no
    /// look at them.
    pub lo: u64,
    pub hi: u64,
}

/// A range of code unmapped while traced, and the code generation it began.
/// `CODE_UNMAP_LOG` entries (by generation) and `UNMAPPED_CODE` entries (merged).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeUnmap {
    pub start: u64,
    pub end: u64,
    /// Written last: a log entry is complete once it holds its own generation.
    pub generation: u64,
}

/// Entries of `UNMAPPED_CODE`. A range overlapping an entry is merged into it; when
/// all are taken, a range is merged into one of them (its generation then changes the
/// ids of more stacks than needed: a site may be split in two, never two merged).
pub const MAX_UNMAPPED_RANGES: u32 = 32;

/// Entries of `CODE_UNMAP_LOG`, a ring indexed by generation: userspace reads it once
/// a second, so that many unmappings of code in a second are needed to lose one
/// (which userspace notices, and resolves nothing across it).
pub const CODE_UNMAP_LOG_ENTRIES: u32 = 4096;

/// The flag of an executable mapping in `struct vm_area_struct`'s `vm_flags` (where
/// that field is, userspace reads from the kernel's BTF: global `VMA_FLAGS_OFFSET`).
pub const VM_EXEC: u64 = 0x4;

impl StackTrace {
    /// Python frames at the end of `frames` (two words each).
    pub fn python_len(&self) -> usize {
        ((self.flags >> STACK_PYTHON_SHIFT) & 0xff) as usize
    }

    /// Native frames (return addresses) at the start of `frames`.
    pub fn native_len(&self) -> usize {
        (self.len as usize)
            .min(MAX_STACK_DEPTH)
            .saturating_sub(2 * self.python_len())
    }
}

/// Key of an allocator call in flight: the thread and its stack pointer at entry.
/// A nested call on the same thread (a signal handler that allocates, a recursive
/// allocator) has a lower stack pointer, so each call has its own key; the return
/// probe finds its call again at `sp - 8` (the return address has been popped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PendingKey {
    pub tid: u32,
    pub _pad: u32,
    pub sp: u64,
}

/// An allocator call between its entry and return probes. Map `PENDING`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingCall {
    /// [`AllocKind`] as u32.
    pub kind: u32,
    /// Number of entry probes that fired for this one call. A tail call between
    /// allocator entry points (glibc's reallocarray jumps to realloc) fires two
    /// entry probes and two return probes at the same stack pointer: the call is
    /// counted once, at the last return.
    pub refs: u32,
    /// Requested size.
    pub size: u64,
    /// realloc/reallocarray: the block being resized (0 for none).
    pub old_ptr: u64,
    /// posix_memalign: where the result pointer will be written. realloc: 1 if
    /// memtrace knew the old block at entry.
    pub out_ptr: u64,
    /// `bpf_ktime_get_ns()` at entry. Lets userspace expire calls whose return
    /// never came (longjmp out of a signal handler, a thread killed inside malloc).
    pub timestamp_ns: u64,
    /// xallocx: `size + extra` (saturated), the most the call asks for; the
    /// resized block's size is the usable size it returns, up to this.
    pub limit: u64,
}

counters! {
    /// Event counters, one slot each in the per-CPU array `COUNTERS`. Each
    /// counter's name is its field in the report's JSON, under `totals`,
    /// `drops` or `allocator` (`unsampled_calls` only adds to `alloc_calls`).
    pub enum Counter;
    /// Every counter, by name (summed over the CPUs): what userspace reads.
    struct CounterValues;
    {
        /// Successful allocations (realloc counts as one).
        AllocCalls = 0 => alloc_calls,
        /// Bytes requested by successful allocations.
        AllocBytes = 1 => alloc_bytes,
        /// free() calls with a non-NULL pointer, plus the frees done by realloc.
        FreeCalls = 2 => free_calls,
        /// Frees by the program of a block memtrace never saw allocated
        /// (allocated before attach, or its allocation was dropped).
        FreeUnknown = 3 => free_unknown,
        /// Allocator calls that failed (returned NULL / an error).
        FailedAllocs = 4 => failed_allocs,
        /// Allocations not recorded because both of their buckets in the block
        /// table (`ALLOC_KEYS`/`ALLOCS`) were full.
        AllocMapFull = 5 => alloc_map_full,
        /// Allocations not recorded because `PENDING` was full at entry (or, for a
        /// result site, because the size captured earlier in the call was lost).
        PendingMapFull = 6 => pending_map_full,
        /// Allocations not recorded because `SITES` was full.
        SiteMapFull = 7 => site_map_full,
        /// Stacks that could not be read (`bpf_get_stack` failed or returned nothing).
        StackReadErrors = 8 => stack_read_errors,
        /// Stacks not stored because `STACKS` was full.
        StackMapFull = 9 => stack_map_full,
        /// Two different stacks with one hash: the second is recorded without a stack.
        StackHashCollisions = 10 => stack_hash_collisions,
        /// posix_memalign succeeded but its out-pointer could not be read.
        OutPointerReadErrors = 11 => out_pointer_read_errors,
        /// A return probe with no matching entry (entry lost or expired).
        UnmatchedReturns = 12 => unmatched_returns,
        /// An allocator returned an address memtrace still had outstanding: the
        /// earlier block's free was not seen. The earlier block is retired.
        AddressReused = 13 => address_reused,
        /// Allocator calls made by the allocator itself (glibc's realloc(p, 0)
        /// calls free), not counted on their own.
        AllocatorInternalCalls = 14 => allocator_internal_calls,
        /// Frames stepped over with the frame pointer because no unwind row covered them.
        UnwindFpFallbackFrames = 15 => unwind_fp_fallback_frames,
        /// Walks stopped because the stack could not be read.
        UnwindBadRead = 16 => unwind_bad_read,
        /// Walks stopped at the depth limit.
        UnwindDepthLimit = 17 => unwind_depth_limit,
        /// Walks stopped at a rule the BPF unwinder cannot follow.
        UnwindUnsupported = 18 => unwind_unsupported,
        /// Walks stopped where neither a row nor a frame pointer led on.
        UnwindNoFramePointer = 19 => unwind_no_frame_pointer,
        /// Allocations seen but not sampled (`--sample-bytes`; `alloc_calls`
        /// counts the sampled ones).
        UnsampledCalls = 20 => unsampled_calls,
        /// Return probes that ran for an allocating call (uprobe sessions run one
        /// only for calls whose entry asked for it).
        ReturnProbes = 21 => return_probes,
        /// Calls that came back from a function a result-site plan took as never
        /// returning (the padding after the call was reached): that call of the
        /// allocator went where the plan did not look, and may be missed or have
        /// a wrong size.
        UnforeseenReturns = 22 => unforeseen_returns,
        /// Return addresses that were the uretprobe trampoline (a return
        /// probe pending on that frame, often another tool's) and were
        /// replaced with the real one, kept by the kernel.
        UnwindUretprobeFrames = 23 => unwind_uretprobe_frames,
        /// The same, where the kernel's record of the real return address was
        /// not found: the walk stopped there (a result site's block is kept
        /// without its stack).
        UnwindUretprobeUnresolved = 24 => unwind_uretprobe_unresolved,
        /// Frees made by the allocator's own code (outside the functions
        /// memtrace probes) of blocks memtrace did not hold: glibc hands a
        /// thread's cache of freed blocks (tcache), and the cache itself, back
        /// to the heap when the thread exits. Not frees of the program: not
        /// in `free_calls`.
        AllocatorOwnFrees = 25 => allocator_own_frees,
        /// Allocator calls whose return address, read at their entry to tell
        /// the allocator's own calls from the program's, was a uretprobe's
        /// trampoline the kernel had no record of: taken as the program's
        /// calls, rightly or not.
        OwnCallUretprobeUnresolved = 26 => own_call_uretprobe_unresolved,
    }
}

// ---- sampling (--sample-bytes) ------------------------------------------------

/// `PendingCall::kind`: the low bits are the `AllocKind`.
pub const PENDING_KIND_MASK: u32 = 0xffff;
/// `PendingCall::kind` flag: the call's new block is not sampled (a realloc
/// whose return is kept only to retire its sampled old block).
pub const PENDING_UNSAMPLED: u32 = 1 << 16;
/// Sampling draws exponential gaps as `-ln(u) = ln 2 · -log2(u)` for a 32-bit
/// uniform `u`; log2 of the mantissa comes from this table: entry `i` is
/// `log2(1 + i/1024)` in units of 2^-SAMPLE_LOG2_SHIFT (the last one is 1.0),
/// linearly interpolated between entries.
pub const SAMPLE_LOG2_ENTRIES: u32 = 1025;
pub const SAMPLE_LOG2_SHIFT: u32 = 26;
/// ln 2 in units of 2^-16.
pub const LN2_Q16: u64 = 45426;
/// Slots of the sampling countdowns, one thread's each (thread id modulo this:
/// ids are handed out in sequence, so up to this many live threads rarely share).
pub const SAMPLE_THREADS: u32 = 1 << 14;

/// A thread's sampling countdown (map `COUNTDOWN`, an array indexed by thread
/// id modulo [`SAMPLE_THREADS`]): bytes left until its next sampled allocation.
/// A slot found holding another thread's countdown is taken over with a fresh
/// gap: the exponential's lack of memory makes that harmless.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Countdown {
    pub tid: u32,
    pub _pad: u32,
    pub left: i64,
}
/// Largest `--sample-bytes`: keeps the BPF side's fixed-point product in 64 bits.
pub const MAX_SAMPLE_MEAN_BYTES: u64 = 1 << 40;

pub mod mappings;
/// aya reads and writes map values as plain bytes.
// After the macros it uses (`codes!`).
pub mod resources;
pub mod threads;

#[cfg(feature = "user")]
mod pod {
    macro_rules! pod {
        ($($t:ident),* $(,)?) => {$(
            // SAFETY: #[repr(C)], made only of integers, with explicit padding
            // (sizes asserted below): every byte pattern is a valid value.
            unsafe impl aya::Pod for super::$t {}
        )*};
    }
    pod!(
        Allocation,
        AllocKeys,
        AllocBucket,
        SiteStats,
        SiteKey,
        Epoch,
        StackTrace,
        PendingKey,
        PendingCall,
        TextRange,
        ResultSite,
        Capture,
        CallMarkState,
        UnwindRow,
        PageKey,
        PageRows,
        CodeState,
        CodeUnmap,
        TraceState,
        UprobeOffsets,
        PythonLayout,
        PythonCode,
    );
}

const _: () = {
    assert!(core::mem::size_of::<UnwindRow>() == 12);
    assert!(core::mem::size_of::<PageKey>() == 16);
    assert!(core::mem::size_of::<PageRows>() == 16);
    assert!(core::mem::size_of::<Allocation>() == 32);
    assert!(core::mem::size_of::<AllocKeys>() == 64);
    assert!(core::mem::size_of::<AllocBucket>() == 256);
    assert!(core::mem::size_of::<Countdown>() == 16);
    assert!(core::mem::size_of::<ResultSite>() == 24);
    assert!(core::mem::size_of::<Capture>() == 24);
    assert!(core::mem::size_of::<SiteStats>() == 48);
    assert!(core::mem::size_of::<TraceState>() == 104);
    assert!(core::mem::size_of::<UprobeOffsets>() == 32);
    assert!(core::mem::size_of::<SiteKey>() == 16);
    assert!(core::mem::size_of::<Epoch>() == 16);
    assert!(core::mem::size_of::<StackTrace>() == 16 + 8 * MAX_STACK_DEPTH);
    assert!(core::mem::size_of::<CodeState>() == 32);
    assert!(core::mem::size_of::<CodeUnmap>() == 24);
    assert!(core::mem::size_of::<PendingKey>() == 16);
    assert!(core::mem::size_of::<PendingCall>() == 48);
    assert!(core::mem::offset_of!(PendingCall, size) == 8);
    assert!(core::mem::offset_of!(StackTrace, frames) == 8);
    assert!(core::mem::size_of::<PythonLayout>() == 112);
    assert!(
        core::mem::size_of::<PythonCodeCopy>()
            == 48 + PY_COPY_CODE + PY_COPY_QUALNAME + PY_COPY_FILENAME + PY_COPY_LINETABLE
    );
    assert!(2 * MAX_PYTHON_FRAMES < MAX_STACK_DEPTH);
};

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn unwind_codes_round_trip() {
        // The values are the wire format: 0, 1, 2... in declaration order.
        for (i, r) in CfaRule::ALL.into_iter().enumerate() {
            assert_eq!(u8::from(r), i as u8, "{r:?}");
            assert_eq!(CfaRule::try_from(r as u8), Ok(r));
            let row = UnwindRow::new(7, r, -8, RbpRule::Same, 0);
            assert_eq!(row.cfa(), Ok(r));
        }
        for (i, r) in RbpRule::ALL.into_iter().enumerate() {
            assert_eq!(u8::from(r), i as u8, "{r:?}");
            assert_eq!(RbpRule::try_from(r as u8), Ok(r));
            let row = UnwindRow::new(7, CfaRule::Rsp, 8, r, -16);
            assert_eq!(row.rbp(), Ok(r));
        }
        assert_eq!(CfaRule::ALL.len(), 6);
        assert_eq!(RbpRule::ALL.len(), 3);
        for v in [6u8, 0x7f, 0xff] {
            assert_eq!(CfaRule::try_from(v), Err(v));
        }
        for v in [3u8, 0xff] {
            assert_eq!(RbpRule::try_from(v), Err(v));
        }
        let bad = UnwindRow {
            cfa_rule: 9,
            rbp_rule: 200,
            ..UnwindRow::default()
        };
        assert_eq!((bad.cfa(), bad.rbp()), (Err(9), Err(200)));
        // The default row (an all-zero map slot) is the frame-pointer fallback.
        assert_eq!(UnwindRow::default().cfa(), Ok(CfaRule::None));
        assert_eq!(UnwindRow::default().rbp(), Ok(RbpRule::Same));
    }

    #[test]
    fn counters_have_their_json_names() {
        assert_eq!(NUM_COUNTERS, 27);
        for (i, c) in Counter::ALL.into_iter().enumerate() {
            assert_eq!(c as usize, i);
            assert_eq!(Counter::try_from(i as u32), Ok(c));
        }
        assert_eq!(Counter::PendingMapFull.name(), "pending_map_full");
        assert_eq!(
            Counter::AllocatorInternalCalls.name(),
            "allocator_internal_calls"
        );
        assert_eq!(
            Counter::UnwindFpFallbackFrames.name(),
            "unwind_fp_fallback_frames"
        );
        let mut names: std::vec::Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Counter::ALL.len());
    }

    #[test]
    fn result_site_codes_round_trip() {
        for (i, o) in SiteOutcome::ALL.into_iter().enumerate() {
            assert_eq!(u8::from(o), i as u8);
            let site = ResultSite {
                taken: o as u8,
                not_taken: o as u8,
                ..ResultSite::default()
            };
            assert_eq!((site.taken(), site.not_taken()), (Ok(o), Ok(o)));
        }
        assert_eq!(SiteOutcome::try_from(4), Err(4));
        assert_eq!(SiteOutcome::try_from(RESULT_ALWAYS), Err(RESULT_ALWAYS));
        for (i, l) in ValueLoc::ALL.into_iter().enumerate() {
            assert_eq!(ValueLoc::try_from(i as u8), Ok(l));
        }
        assert_eq!(ValueLoc::try_from(3), Err(3));
        for (i, r) in PtReg::ALL.into_iter().enumerate() {
            assert_eq!(PtReg::try_from(i as u8), Ok(r));
        }
        assert_eq!(PtReg::ALL.len(), 15);
        assert_eq!(PtReg::try_from(15), Err(15));
        assert_eq!(CallMarks::try_from(0u64), Ok(CallMarks::BySp));
        assert_eq!(CallMarks::try_from(1u64), Ok(CallMarks::BySite));
        assert_eq!(CallMarks::try_from(2u64), Err(2));
    }

    #[test]
    fn site_cookies_round_trip() {
        let addr = 0x7f12_3456_7890u64;
        for kind in AllocKind::ALL {
            for (in_cookie, unsampled) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                let c = SiteCookie::entry(addr, kind, in_cookie, unsampled);
                assert_eq!(c.0 >> 8, addr & 0xffff_ffff);
                assert_eq!(c.arg_regs(), ArgRegs::AT_ENTRY);
                assert_eq!(c.mark_kind(), None, "{c:?}");
                assert_eq!(c.alloc_kind(), Some(kind));
                assert_eq!(
                    (c.call_in_cookie(), c.unsampled_pending()),
                    (in_cookie, unsampled)
                );
            }
        }
        for m in MarkKind::ALL {
            let c = SiteCookie::mark(addr, m);
            assert_eq!(c.0 >> 8, addr);
            assert_eq!(c.mark_kind(), Some(m));
            assert!(!c.call_in_cookie());
        }
        // The values before SiteCookie: entries keep them, marks too.
        assert_eq!(SiteCookie::mark(1, MarkKind::Call).0, 0x17e);
        assert_eq!(SiteCookie::mark(1, MarkKind::Jump).0, 0x17d);
        assert_eq!(SiteCookie::mark(1, MarkKind::Check).0, 0x17c);
        assert_eq!(
            SiteCookie::entry(1, AllocKind::Memalign, true, true).0,
            0x100 | 4 | 0x80 | 0x40
        );
        let r = SiteCookie::result(9);
        assert_eq!(r.0, 9 << 8 | 0x7b);
        assert_eq!(r.result_index(), 9);
        assert_eq!(r.mark_kind(), None);
    }

    #[test]
    fn arg_regs_ride_in_entry_cookies() {
        let args = ArgRegs::AT_ENTRY.with(0, PtReg::Rsi).with(1, PtReg::Rsi);
        assert_eq!(args.reg(0), PtReg::Rsi as u8);
        assert_eq!(args.reg(1), PtReg::Rsi as u8, "its own register: nibble 0");
        assert_eq!(args.0 >> 4, 0);
        assert_eq!(args.reg(2), PtReg::Rdx as u8);
        let all = ArgRegs::ABI
            .iter()
            .enumerate()
            .fold(ArgRegs::AT_ENTRY, |a, (i, _)| a.with(i, PtReg::R15));
        assert_eq!(all.0, 0x11_1111);
        let addr = 0x7f12_3456_7890u64;
        for args in [ArgRegs::AT_ENTRY, args, all] {
            let c = SiteCookie::entry(addr, AllocKind::Calloc, true, true).with_args(args);
            assert_eq!(c.arg_regs(), args);
            assert_eq!(c.alloc_kind(), Some(AllocKind::Calloc));
            assert!(c.call_in_cookie() && c.unsampled_pending());
            assert_eq!((c.0 >> 8) & 0xffff_ffff, addr & 0xffff_ffff);
        }
        assert_eq!(
            SiteCookie::entry(addr, AllocKind::Malloc, false, false).arg_regs(),
            ArgRegs::AT_ENTRY
        );
    }

    #[test]
    fn map_names_are_distinct() {
        let mut names = map_names::ALL.to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), map_names::ALL.len());
    }

    #[test]
    fn alloc_kind_round_trips() {
        for k in AllocKind::ALL {
            assert_eq!(AllocKind::from_u32(k as u32), Some(k));
        }
        assert_eq!(AllocKind::from_u32(AllocKind::ALL.len() as u32), None);
        // Every kind fits the attach cookie's kind bits.
        assert!(AllocKind::ALL.iter().all(|&k| (k as u64) <= SITE_KIND_MASK));
    }

    #[test]
    fn arg_layouts() {
        // The size is always named; an argument has one meaning.
        for k in AllocKind::ALL {
            let mut used: std::vec::Vec<u8> = k.args().used().into_iter().flatten().collect();
            let n = used.len();
            used.sort_unstable();
            used.dedup();
            assert_eq!(used.len(), n, "{k:?}");
            assert!(used.iter().all(|&a| a < 6), "{k:?}");
        }
        let heap = |k: AllocKind| k.args();
        assert_eq!(heap(AllocKind::HeapMalloc).size, 1);
        assert_eq!(heap(AllocKind::HeapReallocArray).old_ptr, Some(1));
        assert_eq!(AllocKind::Xallocx.args().extra, Some(2));
        assert!(AllocKind::Xallocx.resizes() && !AllocKind::PosixMemalign.resizes());
    }

    #[test]
    fn alloc_table_sizes() {
        // 1.5 slots per block, rounded up to whole buckets; never empty.
        assert_eq!(alloc_buckets(1), 1);
        assert_eq!(alloc_buckets(5), 1);
        assert_eq!(alloc_buckets(6), 2);
        assert_eq!(alloc_buckets(50), 10);
        assert_eq!(alloc_buckets(DEFAULT_MAX_OUTSTANDING), 196_608);
        assert_eq!(alloc_buckets(1 << 27), 25_165_824);
    }

    #[test]
    fn alloc_bucket_choices_spread_and_stay_in_range() {
        for buckets in [1u32, 2, 18, 183_501, u32::MAX] {
            for i in 0..10_000u64 {
                let (a, b) = alloc_bucket_choices(0x5555_0000_1000 + i * 48, buckets);
                assert!(a < buckets && b < buckets, "{buckets}: {a} {b}");
            }
        }
        // Consecutive 80-byte blocks (64-byte mallocs) fill 1000 buckets evenly:
        // no bucket gets more than a few times its share from either hash.
        let buckets = 1000u32;
        let (mut first, mut second) = ([0u32; 1000], [0u32; 1000]);
        let mut differ = 0;
        for i in 0..100_000u64 {
            let (a, b) = alloc_bucket_choices(0x55d0_c0a0_0000 + i * 80, buckets);
            first[a as usize] += 1;
            second[b as usize] += 1;
            differ += (a != b) as u32;
        }
        for (name, h) in [("first", &first), ("second", &second)] {
            let (min, max) = (h.iter().min().unwrap(), h.iter().max().unwrap());
            assert!(
                *min >= 50 && *max <= 200,
                "{name} hash: {min}..{max} per bucket, 100 expected"
            );
        }
        assert!(differ > 99_000, "the two choices are independent: {differ}");
    }

    /// Blocks turned away when `addrs` are placed as the BPF side places them:
    /// in the emptier of the two buckets, the first on a tie.
    fn turned_away(addrs: impl Iterator<Item = u64>, buckets: u32) -> usize {
        let mut load = std::vec![0u8; buckets as usize];
        let mut away = 0;
        for a in addrs {
            let (b1, b2) = alloc_bucket_choices(a, buckets);
            let (b1, b2) = (b1 as usize, b2 as usize);
            let b = if load[b2] < load[b1] { b2 } else { b1 };
            if load[b] as usize == ALLOC_BUCKET_SLOTS {
                away += 1;
            } else {
                load[b] += 1;
            }
        }
        away
    }

    #[test]
    fn a_heap_fills_the_default_table_without_drops() {
        let buckets = alloc_buckets(DEFAULT_MAX_OUTSTANDING);
        // A million glibc chunks of 64..176 bytes, back to back. (The weak
        // hash this replaced turned 14 of them away in a table of 1.4 slots
        // per block, and 57 of the 4112-byte strides below in this one.)
        let mut p = 0x55d0_c0a0_0000u64;
        let heap = (0..1_000_000u64).map(|i| {
            let a = p;
            p += 64 + 16 * (i & 7);
            a
        });
        assert_eq!(turned_away(heap, buckets), 0);
        // tests/it/scale.rs: a million 16-byte mallocs (32-byte chunks).
        let scale = (0..1_000_000u64).map(|i| 0x5612_3450_02a0 + i * 32);
        assert_eq!(turned_away(scale, buckets), 0);
        // As many blocks as the table is sized for.
        for stride in [32u64, 48, 80, 4112, 65552] {
            let blocks = (0..DEFAULT_MAX_OUTSTANDING as u64).map(|i| 0x7f00_0000_0010 + i * stride);
            assert_eq!(turned_away(blocks, buckets), 0, "stride {stride}");
        }
        // Random addresses (xorshift), as many as the table is sized for.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let random = (0..DEFAULT_MAX_OUTSTANDING).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x & 0xffff_ffff_fff0) | 0x10
        });
        assert_eq!(turned_away(random, buckets), 0);
    }
}
