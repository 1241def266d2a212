//! memtrace's kernel side: uprobes on the target's allocator entry points.
//!
//! Entry probes remember each call in `PENDING` (keyed by thread and stack
//! pointer, so nested and recursive calls on one thread do not clobber each
//! other); the shared return probe turns a successful call into a slot of the
//! block table `ALLOC_KEYS`/`ALLOCS` (address → size, stack, time; see
//! `memtrace_common::AllocKeys`) and updates the per-stack aggregate in
//! `SITES`; the free probe retires blocks. Every event that cannot be recorded is
//! counted in `COUNTERS`.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The BPF target has no atomic types with fetch_add; the intrinsic lowers to the
// BPF atomic add instruction.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        internal_features,
        reason = "atomic_xadd is the only atomic add on the BPF target"
    )
)]

#[cfg(target_arch = "bpf")]
mod probes {
    use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};
    use core::ptr::{read_volatile, write_volatile};

    use aya_ebpf::{
        EbpfContext,
        bindings::{BPF_ANY, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST},
        helpers::{
            bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_get_stack,
            bpf_ktime_get_ns, bpf_loop, bpf_probe_read_user, bpf_send_signal,
        },
        macros::{map, uprobe, uretprobe},
        maps::{Array, HashMap, PerCpuArray},
        programs::{ProbeContext, RetProbeContext},
    };
    use memtrace_common::{
        ALLOC_BUCKET_SLOTS, ALLOC_KEY_BUSY, ALLOC_KEY_EMPTY, AllocBucket, AllocKeys, AllocKind,
        Allocation, CALL_MARKS_BY_SITE, CFA_END, CFA_NONE, CFA_PLT, CFA_RBP, CFA_RSP,
        CallMarkState, Capture, Countdown, Counter, DEFAULT_MAX_OUTSTANDING, DEFAULT_MAX_PC_PAGES,
        DEFAULT_MAX_PENDING, DEFAULT_MAX_STACKS, DEFAULT_MAX_UNWIND_ROWS, EPOCH_TIME_SHIFT, Epoch,
        KFUNC_SESSION_COOKIE, KFUNC_SESSION_IS_RETURN, LN2_Q16, LOC_REG, LOC_STACK,
        MAX_ALLOCATOR_FUNCTIONS, MAX_CALL_MARKS, MAX_RESULT_SITES, MAX_ROWS_PER_PAGE_LOG2,
        MAX_STACK_DEPTH, NO_STACK, NUM_COUNTERS, PC_PAGE_SHIFT, PENDING_KIND_MASK,
        PENDING_UNSAMPLED, PageKey, PageRows, PendingCall, PendingKey, RBP_AT_CFA, RBP_SAME,
        RESULT_ALWAYS, RESULT_GUARD, RESULT_NOTHING, RESULT_NULL, ResultSite, SAMPLE_LOG2_ENTRIES,
        SAMPLE_LOG2_SHIFT, SAMPLE_THREADS, SITE_CALL_IN_COOKIE, SITE_KIND_MASK, SITE_MARK_CALL,
        SITE_MARK_CHECK, SITE_MARK_JUMP, SITE_UNSAMPLED_PENDING, STACK_FP_ONLY,
        STACK_TRUNCATED_DEPTH, STACK_TRUNCATED_NO_FP, STACK_TRUNCATED_READ,
        STACK_TRUNCATED_UNSUPPORTED, STACK_USED_FP, SiteKey, SiteStats, StackTrace, TextRange,
        UnwindRow, alloc_bucket_choices, alloc_buckets,
    };

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
    fn empty_programs() -> bool {
        unsafe { core::ptr::read_volatile(&EMPTY_PROGRAMS) != 0 }
    }

    /// Buckets of the block table (set by userspace before load: the entries
    /// of `ALLOC_KEYS` and `ALLOCS`).
    #[unsafe(no_mangle)]
    static ALLOC_BUCKETS: u32 = alloc_buckets(DEFAULT_MAX_OUTSTANDING);

    /// The block table: each bucket's addresses, and its blocks.
    #[map]
    static ALLOC_KEYS: Array<AllocKeys> =
        Array::with_max_entries(alloc_buckets(DEFAULT_MAX_OUTSTANDING), BPF_F_MMAPABLE);
    #[map]
    static ALLOCS: Array<AllocBucket> =
        Array::with_max_entries(alloc_buckets(DEFAULT_MAX_OUTSTANDING), BPF_F_MMAPABLE);

    #[map]
    static SITES: HashMap<SiteKey, SiteStats> =
        HashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

    /// The current birth epoch (one entry, written by userspace).
    #[map]
    static EPOCH: Array<Epoch> = Array::with_max_entries(1, 0);

    #[map]
    static STACKS: HashMap<u64, StackTrace> =
        HashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

    #[map]
    static PENDING: HashMap<PendingKey, PendingCall> =
        HashMap::with_max_entries(DEFAULT_MAX_PENDING, 0);

    #[map]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

    /// From the lowest start to the highest end of ALLOCATOR_TEXT.
    #[map]
    static ALLOCATOR_HULL: Array<TextRange> = Array::with_max_entries(1, 0);

    #[map]
    static ALLOCATOR_TEXT: Array<TextRange> = Array::with_max_entries(MAX_ALLOCATOR_FUNCTIONS, 0);

    /// How the allocator's own calls are told from users' (see
    /// `memtrace_common::CALL_MARKS_BY_SITE`), and how many marks are in flight.
    #[map]
    static CALL_MARK_STATE: Array<CallMarkState> = Array::with_max_entries(1, 0);

    /// Marks left by the probes on the allocator's own calls: (thread, the
    /// callee's rsp at its probe) → MARK_CALL, MARK_TAIL or MARK_CHECK.
    #[map]
    static CALL_MARKS: HashMap<PendingKey, u64> = HashMap::with_max_entries(MAX_CALL_MARKS, 0);

    /// Every module's unwind rows, each module's a sorted run (see ExecMapping).
    #[map]
    static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(DEFAULT_MAX_UNWIND_ROWS, 0);

    /// (tgid, code page) → the rows covering that page.
    #[map]
    static PC_PAGES: HashMap<PageKey, PageRows> =
        HashMap::with_max_entries(DEFAULT_MAX_PC_PAGES, BPF_F_NO_PREALLOC);

    /// Processes whose unwind tables are loaded (tgid → 1). Others are walked
    /// with frame pointers (bpf_get_stack).
    #[map]
    static PROC_TABLES: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

    /// Sampling: log2(1 + i/1024), written by userspace (see
    /// `memtrace_common::SAMPLE_LOG2_ENTRIES`): BPF has no floating point.
    #[map]
    static SAMPLE_LOG2: Array<u32> = Array::with_max_entries(SAMPLE_LOG2_ENTRIES, 0);

    /// Sampling: per thread, bytes left until the next sampled allocation
    /// (see `memtrace_common::Countdown`). An array, not an LRU hash: one
    /// inlined lookup, ~70 ns less per sampled-mode allocation call.
    #[map]
    static COUNTDOWN: Array<Countdown> = Array::with_max_entries(SAMPLE_THREADS, 0);

    /// Result sites (see `memtrace_common::ResultSite`), by the index in
    /// their attach cookie. Written by userspace before attaching.
    #[map]
    static RESULT_SITES: Array<ResultSite> = Array::with_max_entries(MAX_RESULT_SITES, 0);

    /// Sizes captured by result sites for a later site of the same call, per
    /// thread (as COUNTDOWN).
    #[map]
    static CAPTURES: Array<Capture> = Array::with_max_entries(SAMPLE_THREADS, 0);

    /// Scratch space for one stack, per CPU: too big for the 512-byte BPF stack.
    #[map]
    static STACK_SCRATCH: PerCpuArray<StackTrace> = PerCpuArray::with_max_entries(1, 0);

    #[inline(always)]
    fn count(c: Counter, n: u64) {
        if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
            // Per-CPU slot: no other CPU writes it, and BPF programs do not nest on one CPU here.
            unsafe { *p += n };
        }
    }

    #[inline(always)]
    fn target_tgid() -> u32 {
        unsafe { core::ptr::read_volatile(&TARGET_TGID) }
    }

    /// Whether the current task is the target's. Every program checks this
    /// first, so past it the current tgid is `target_tgid()`.
    #[inline(always)]
    fn is_target() -> bool {
        target_thread().is_some()
    }

    /// The current thread's id, if it is one of the target's.
    #[inline(always)]
    fn target_thread() -> Option<u32> {
        let id = bpf_get_current_pid_tgid();
        ((id >> 32) as u32 == target_tgid()).then_some(id as u32)
    }

    #[inline(always)]
    fn regs_sp<C: EbpfContext>(ctx: &C) -> u64 {
        let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
        unsafe { (*regs).rsp }
    }

    // ---- stack capture -------------------------------------------------------
    // The one interface the rest of the program uses: `capture_stack(ctx)` gives
    // the key of the current user stack in STACKS, or NO_STACK (with the reason
    // counted). Replacing frame pointers with a real unwinder changes only this.

    #[inline(always)]
    fn mix(h: u64, v: u64) -> u64 {
        // 64-bit multiply-xorshift mixing (from splitmix64's finalizer).
        let mut x = h ^ v;
        x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 31;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^ (x >> 29)
    }

    /// Reads two consecutive u64s of the target's memory.
    #[inline(always)]
    fn read_user_pair(addr: u64) -> Option<[u64; 2]> {
        unsafe { bpf_probe_read_user(addr as *const [u64; 2]) }.ok()
    }

    /// Reads one u64 of the target's memory.
    #[inline(always)]
    fn read_user(addr: u64) -> Option<u64> {
        unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
    }

    /// Bytes of the stack read in one go at the start of a walk: the frames
    /// inside it cost no read of their own (each read of user memory is the
    /// walk's largest cost).
    const WINDOW_BYTES: u32 = 1024;
    const WINDOW_WORDS: usize = WINDOW_BYTES as usize / 8;
    /// Remembered walks per CPU, by (pc, sp) at the walk's start.
    const CACHE_SLOTS: u32 = 32;
    /// Stack words a remembered walk may have read.
    const CACHE_WORDS: usize = 64;

    #[repr(C)]
    struct StackWindow {
        words: [u64; WINDOW_WORDS],
    }

    /// A walk that read only the window: the same registers, the same words
    /// at the same places and the same unwind tables give the same stack, so
    /// the next walk from here only checks those words. `check` mixes every
    /// other field (0: empty), so a slot torn by two walks on one CPU (BPF
    /// programs in uprobes can be preempted) never matches.
    #[repr(C)]
    struct CachedWalk {
        check: u64,
        generation: u64,
        pc: u64,
        sp: u64,
        bp: u64,
        /// The window's first byte: `sp`, or below it for a walk that starts
        /// at a result site's caller (the window then holds the allocator's
        /// frame too).
        base: u64,
        stack_id: u64,
        tgid: u32,
        words: u32,
        /// Bytes of the window the walk used.
        extent: u32,
        fp_frames: u32,
        /// Counter of the walk's early stop, plus one (0: none).
        stop: u32,
        _pad: u32,
        index: [u32; CACHE_WORDS],
        value: [u64; CACHE_WORDS],
    }

    /// The stack window of the current walk, per CPU.
    #[map]
    static STACK_WINDOW: PerCpuArray<StackWindow> = PerCpuArray::with_max_entries(1, 0);

    #[map]
    static WALK_CACHE: PerCpuArray<CachedWalk> = PerCpuArray::with_max_entries(CACHE_SLOTS, 0);

    /// Bumped by userspace after every change to the unwind tables: remembered
    /// walks of an older generation are not used.
    #[map]
    static TABLES_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

    /// Zero, but unknown to the verifier: counters of a bpf_loop state that
    /// start from it have no exact value, so the verifier's states of two
    /// iterations compare equal and it checks the callback a few times instead
    /// of once per possible iteration (which runs out of its budget).
    #[unsafe(no_mangle)]
    static mut OPAQUE_ZERO: u32 = 0;

    #[inline(always)]
    fn opaque_zero() -> u32 {
        unsafe { core::ptr::read_volatile(&raw const OPAQUE_ZERO) }
    }

    /// State of a stack walk, on the BPF stack (bpf_loop's context must be).
    #[repr(C)]
    struct Walk {
        pc: u64,
        sp: u64,
        bp: u64,
        /// The stack pointer the walk started at: the window's first byte.
        sp0: u64,
        tgid: u32,
        flags: u32,
        len: u32,
        /// Bytes of the window that were read.
        window: u32,
        /// WALK_CACHE slot recording the walk's reads, while `cacheable`.
        slot: u32,
        cacheable: u32,
        words: u32,
        extent: u32,
        fp_frames: u32,
        stop: u32,
    }

    /// The row that covers `pc`: the page index gives the few candidate rows,
    /// a short binary search picks the last one at or before `pc`.
    #[inline(always)]
    fn find_row(tgid: u32, pc: u64) -> Option<UnwindRow> {
        let key = PageKey {
            tgid,
            _pad: 0,
            page: pc >> PC_PAGE_SHIFT,
        };
        let page = unsafe { PC_PAGES.get(&key) }?;
        if page.row_count == 0 {
            return None;
        }
        let rel = pc.wrapping_sub(page.pc_base) as u32;
        let (mut lo, mut hi) = (page.first_row, page.first_row + page.row_count);
        let mut i = 0;
        while i < MAX_ROWS_PER_PAGE_LOG2 + 1 && hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if UNWIND_ROWS.get(mid)?.pc <= rel {
                lo = mid;
            } else {
                hi = mid;
            }
            i += 1;
        }
        let row = UNWIND_ROWS.get(lo)?;
        (row.pc <= rel).then_some(*row)
    }

    /// The stack word at `addr` if the window holds it, recorded for the cache
    /// if the walk depends on it (`record`).
    #[inline(always)]
    fn window_word(w: &mut Walk, addr: u64, record: bool) -> Option<u64> {
        let off = addr.wrapping_sub(w.sp0);
        if off & 7 != 0 || off >= w.window as u64 {
            return None;
        }
        let i = (off >> 3) as usize;
        if i >= WINDOW_WORDS {
            return None;
        }
        let win = STACK_WINDOW.get_ptr(0)?;
        let v = unsafe { (*win).words[i] };
        if record && w.cacheable != 0 {
            let n = w.words as usize;
            match WALK_CACHE.get_ptr_mut(w.slot) {
                Some(c) if n < CACHE_WORDS => {
                    unsafe {
                        (*c).index[n] = i as u32;
                        (*c).value[n] = v;
                    }
                    w.words += 1;
                    w.extent = w.extent.max(off as u32 + 8);
                }
                _ => w.cacheable = 0,
            }
        }
        Some(v)
    }

    /// One word of the stack: from the window, else read (and the walk is
    /// not remembered).
    #[inline(always)]
    fn stack_word(w: &mut Walk, addr: u64) -> Option<u64> {
        if let Some(v) = window_word(w, addr, true) {
            return Some(v);
        }
        w.cacheable = 0;
        read_user(addr)
    }

    /// Two consecutive words of the stack, as `stack_word`; the walk depends
    /// on the first one only if `first_used` (a remembered walk checks only
    /// the words it depends on).
    #[inline(always)]
    fn stack_pair(w: &mut Walk, addr: u64, first_used: bool) -> Option<[u64; 2]> {
        let off = addr.wrapping_sub(w.sp0);
        if off.wrapping_add(16) <= w.window as u64 && off < w.window as u64 {
            if let (Some(a), Some(b)) = (
                window_word(w, addr, first_used),
                window_word(w, addr + 8, true),
            ) {
                return Some([a, b]);
            }
        }
        w.cacheable = 0;
        read_user_pair(addr)
    }

    /// Ends the walk early for `reason` (counted once the walk is over).
    #[inline(always)]
    fn stop(w: &mut Walk, flag: u32, reason: Counter) -> i64 {
        w.flags |= flag;
        w.stop = reason as u32 + 1;
        1
    }

    /// One step of the walk: records `w.pc`, then moves to the caller.
    /// Returns 1 to stop (bpf_loop's convention).
    extern "C" fn walk_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
        let w = unsafe { &mut *(ctx as *mut Walk) };
        let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
            return 1;
        };
        let scratch = unsafe { &mut *scratch };
        let n = w.len as usize;
        if n >= MAX_STACK_DEPTH {
            return stop(w, STACK_TRUNCATED_DEPTH, Counter::UnwindDepthLimit);
        }
        scratch.frames[n] = w.pc;
        w.len += 1;

        // Every pc is a return address: look up the call instruction, pc - 1
        // (after a call to a noreturn function, pc itself may be past the end
        // of the caller).
        let lookup = w.pc.wrapping_sub(1);
        let row = find_row(w.tgid, lookup);
        let cfa_rule = row.map_or(CFA_NONE, |r| r.cfa_rule);
        let (cfa, ra, bp) = match cfa_rule {
            CFA_END => return 1,
            CFA_RSP | CFA_RBP | CFA_PLT => {
                let r = row.unwrap_or_default();
                let cfa = match cfa_rule {
                    CFA_RSP => w.sp.wrapping_add(r.cfa_offset as i64 as u64),
                    CFA_RBP => {
                        if w.bp == 0 {
                            return stop(
                                w,
                                STACK_TRUNCATED_UNSUPPORTED,
                                Counter::UnwindUnsupported,
                            );
                        }
                        w.bp.wrapping_add(r.cfa_offset as i64 as u64)
                    }
                    _ => {
                        let extra = if (w.pc & 15) >= r.cfa_offset as u64 {
                            8
                        } else {
                            0
                        };
                        w.sp + 8 + extra
                    }
                };
                // The return address and the word below it, where the usual
                // frame saves rbp.
                let below_used = r.rbp_rule == RBP_AT_CFA && r.rbp_offset == -16;
                let Some([below, ra]) = stack_pair(w, cfa.wrapping_sub(16), below_used) else {
                    return stop(w, STACK_TRUNCATED_READ, Counter::UnwindBadRead);
                };
                let bp = match r.rbp_rule {
                    RBP_SAME => w.bp,
                    RBP_AT_CFA if r.rbp_offset == -16 => below,
                    RBP_AT_CFA => {
                        match stack_word(w, cfa.wrapping_add(r.rbp_offset as i64 as u64)) {
                            Some(bp) => bp,
                            None => {
                                return stop(w, STACK_TRUNCATED_READ, Counter::UnwindBadRead);
                            }
                        }
                    }
                    _ => 0,
                };
                (cfa, ra, bp)
            }
            CFA_NONE => {
                // No unwind information here: follow the frame pointer.
                if w.bp == 0 || w.bp < w.sp {
                    return stop(w, STACK_TRUNCATED_NO_FP, Counter::UnwindNoFramePointer);
                }
                let Some([bp, ra]) = stack_pair(w, w.bp, true) else {
                    return stop(w, STACK_TRUNCATED_READ, Counter::UnwindBadRead);
                };
                w.flags |= STACK_USED_FP;
                w.fp_frames += 1;
                (w.bp + 16, ra, bp)
            }
            _ => {
                return stop(w, STACK_TRUNCATED_UNSUPPORTED, Counter::UnwindUnsupported);
            }
        };
        if ra == 0 {
            return 1;
        }
        w.pc = ra;
        w.sp = cfa;
        w.bp = bp;
        0
    }

    /// Counts what a walk (walked or remembered) stepped over and why it stopped.
    #[inline(always)]
    fn count_walk(fp_frames: u32, stop: u32) {
        if fp_frames != 0 {
            count(Counter::UnwindFpFallback, fp_frames as u64);
        }
        if stop != 0 && stop <= NUM_COUNTERS {
            if let Some(p) = COUNTERS.get_ptr_mut(stop - 1) {
                unsafe { *p += 1 };
            }
        }
    }

    /// State of `check_step`'s loop over a remembered walk's words.
    #[repr(C)]
    struct CheckWords {
        slot: u32,
        /// 1: also compare each word with the window (a lookup).
        compare: u32,
        hash: u64,
        mismatch: u32,
        _pad: u32,
    }

    /// One word of a remembered walk: mixed into the hash and, when
    /// comparing, checked against the window. (A bpf_loop callback: the
    /// verifier checks it once, not once per word.)
    extern "C" fn check_step(k: u64, ctx: *mut core::ffi::c_void) -> i64 {
        let s = unsafe { &mut *(ctx as *mut CheckWords) };
        let (Some(c), Some(win)) = (WALK_CACHE.get_ptr(s.slot), STACK_WINDOW.get_ptr(0)) else {
            s.mismatch = 1;
            return 1;
        };
        let k = k as usize;
        let (c, win) = unsafe { (&*c, &*win) };
        if k >= CACHE_WORDS || k >= c.words as usize {
            return 1;
        }
        match check_word(c, win, k, s.compare != 0, s.hash) {
            Some(h) => {
                s.hash = h;
                0
            }
            None => {
                s.mismatch = 1;
                1
            }
        }
    }

    /// `h` with word `k` (< CACHE_WORDS) of remembered walk `c` mixed in; None
    /// if `compare` and the window no longer holds it.
    #[inline(always)]
    fn check_word(
        c: &CachedWalk,
        win: &StackWindow,
        k: usize,
        compare: bool,
        h: u64,
    ) -> Option<u64> {
        let (index, value) = (c.index[k], c.value[k]);
        if compare && win.words[index as usize & (WINDOW_WORDS - 1)] != value {
            return None;
        }
        Some(mix(h, ((index as u64) << 32) ^ value))
    }

    /// Words of a remembered walk that `walk_check` checks in a bounded loop
    /// rather than with bpf_loop.
    const UNROLLED_WORDS: usize = 16;

    /// The mix of the remembered walk in `slot` (never 0), and whether its
    /// words still hold (when `compare`).
    #[inline(always)]
    fn walk_check(slot: u32, c: &CachedWalk, compare: bool) -> Option<u64> {
        let mut h = mix(c.generation, c.pc);
        h = mix(h, c.sp);
        h = mix(h, c.bp);
        h = mix(h, c.base);
        h = mix(h, c.stack_id);
        h = mix(h, ((c.tgid as u64) << 32) | c.words as u64);
        h = mix(h, ((c.extent as u64) << 32) | c.fp_frames as u64);
        h = mix(h, c.stop as u64);
        let words = c.words as usize;
        if words <= UNROLLED_WORDS {
            // Most walks depend on a few words (two per frame at most): a
            // bounded loop, with no callback call per word.
            let win = unsafe { &*STACK_WINDOW.get_ptr(0)? };
            let mut k = 0;
            while k < UNROLLED_WORDS && k < words {
                h = check_word(c, win, k, compare, h)?;
                k += 1;
            }
            return Some(h | 1);
        }
        let mut s = CheckWords {
            slot,
            compare: compare as u32,
            hash: h,
            mismatch: 0,
            _pad: 0,
        };
        unsafe {
            bpf_loop(
                CACHE_WORDS as u32,
                check_step as *mut core::ffi::c_void,
                (&raw mut s).cast(),
                0,
            )
        };
        (s.mismatch == 0).then_some(s.hash | 1)
    }

    /// The stack id of a remembered walk from these registers, if the stack
    /// words it read still hold the same values.
    #[inline(always)]
    fn remembered_walk(
        c: &CachedWalk,
        win: *mut StackWindow,
        generation: u64,
        tgid: u32,
        start: &WalkStart,
    ) -> Option<u64> {
        if c.check == 0
            || c.generation != generation
            || c.pc != start.pc
            || c.sp != start.sp
            || c.bp != start.bp
            || c.base != start.base
            || c.tgid != tgid
        {
            return None;
        }
        let extent = c.extent;
        if extent == 0 || extent > WINDOW_BYTES {
            return None;
        }
        // A result site has read the window already.
        if start.window < extent {
            let rc = unsafe {
                aya_ebpf::helpers::generated::bpf_probe_read_user(
                    win.cast(),
                    extent,
                    start.base as *const _,
                )
            };
            if rc != 0 {
                return None;
            }
        }
        if walk_check(start.slot, c, true)? != c.check {
            return None;
        }
        Some(c.stack_id)
    }

    /// Where a stack walk starts: the first frame's pc, sp and rbp, and the
    /// window of stack memory from `base` (`window` bytes of it already read
    /// into STACK_WINDOW, 0 if none yet).
    struct WalkStart {
        pc: u64,
        sp: u64,
        bp: u64,
        base: u64,
        window: u32,
        /// 1: `window` is all `read_window` could read (else a remembered
        /// walk's extent, to be read in full if the walk must be redone).
        whole: u32,
        /// WALK_CACHE slot, from the probe's own rip and rsp (known before
        /// anything is read).
        slot: u32,
    }

    #[inline(always)]
    fn cache_slot(rip: u64, rsp: u64) -> u32 {
        (mix(rip, rsp) as u32) & (CACHE_SLOTS - 1)
    }

    /// Reads the window at `sp`: WINDOW_BYTES, or up to the end of sp's page
    /// when the stack ends sooner. Returns the bytes read.
    #[inline(always)]
    fn read_window(win: *mut StackWindow, sp: u64) -> u32 {
        let read = |len: u32| unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(win.cast(), len, sp as *const _) == 0
        };
        if read(WINDOW_BYTES) {
            return WINDOW_BYTES;
        }
        let to_page_end = 4096 - (sp & 4095) as u32;
        if to_page_end < WINDOW_BYTES && to_page_end >= 16 && read(to_page_end) {
            return to_page_end;
        }
        0
    }

    /// State of `frames_step`'s loop over the frames in STACK_SCRATCH.
    #[repr(C)]
    struct FramesLoop {
        len: u32,
        /// 0: hash the frames; 1: compare them with `stacks_key`'s entry.
        compare: u32,
        hash: u64,
        stacks_key: u64,
        differ: u32,
        _pad: u32,
    }

    /// One frame of STACK_SCRATCH: mixed into the hash, or compared with the
    /// stored stack. (A bpf_loop callback: verified once, whatever the length.)
    extern "C" fn frames_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
        let s = unsafe { &mut *(ctx as *mut FramesLoop) };
        let i = i as usize;
        if i >= MAX_STACK_DEPTH || i >= s.len as usize {
            return 1;
        }
        let Some(scratch) = STACK_SCRATCH.get_ptr(0) else {
            s.differ = 1;
            return 1;
        };
        let pc = unsafe { (*scratch).frames[i] };
        if s.compare == 0 {
            s.hash = mix(s.hash, pc);
            return 0;
        }
        match unsafe { STACKS.get(&s.stacks_key) } {
            Some(existing) if existing.frames[i] == pc => 0,
            _ => {
                s.differ = 1;
                1
            }
        }
    }

    /// The key in STACKS of the stack in STACK_SCRATCH (stored if new), or
    /// NO_STACK with the reason counted.
    #[inline(always)]
    fn store_stack(scratch: &StackTrace) -> u64 {
        let len = scratch.len.min(MAX_STACK_DEPTH as u32);
        let mut s = FramesLoop {
            len,
            compare: 0,
            hash: 0x6d65_6d74_7261_6365 ^ len as u64,
            stacks_key: 0,
            differ: 0,
            _pad: 0,
        };
        let frames_loop = |s: &mut FramesLoop| unsafe {
            bpf_loop(
                MAX_STACK_DEPTH as u32,
                frames_step as *mut core::ffi::c_void,
                (s as *mut FramesLoop).cast(),
                0,
            )
        };
        frames_loop(&mut s);
        let h = if s.hash == NO_STACK { 1 } else { s.hash };
        match unsafe { STACKS.get(&h) } {
            Some(existing) => {
                s.compare = 1;
                s.stacks_key = h;
                if existing.len != len || {
                    frames_loop(&mut s);
                    s.differ != 0
                } {
                    count(Counter::StackHashCollisions, 1);
                    return NO_STACK;
                }
                h
            }
            None => match STACKS.insert(&h, scratch, BPF_NOEXIST as u64) {
                Ok(()) => h,
                // Another CPU stored the same stack first: fine.
                Err(e) if e == -17 => h,
                Err(_) => {
                    count(Counter::StackMapFull, 1);
                    NO_STACK
                }
            },
        }
    }

    /// The key in STACKS of the current user stack, or NO_STACK (with the
    /// reason counted). Walked with the unwind tables when userspace loaded
    /// them for this process (a walk that only read its stack window is
    /// remembered, and repeated by checking those words), else with frame
    /// pointers.
    /// `at`: where to walk from instead of the context's registers (a result
    /// site inside the allocator starts at its caller's frame, with the
    /// window it read from its own rsp).
    #[inline(always)]
    fn capture_stack<C: EbpfContext>(ctx: &C, at: Option<WalkStart>) -> u64 {
        let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
            count(Counter::StackReadErrors, 1);
            return NO_STACK;
        };
        let scratch = unsafe { &mut *scratch };
        // (Only the target's tasks get here: see `is_target`.)
        let tgid = target_tgid();
        let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
        // A walk from the context's registers has its tables checked here; a
        // result site's only if its walk is not remembered (below).
        let tables_known = at.is_none();
        let start = match at {
            Some(at) => at,
            None => {
                if unsafe { PROC_TABLES.get(&tgid) }.is_none() {
                    let n = unsafe {
                        bpf_get_stack(
                            ctx.as_ptr(),
                            scratch.frames.as_mut_ptr() as *mut _,
                            (MAX_STACK_DEPTH * 8) as u32,
                            BPF_F_USER_STACK as u64,
                        )
                    };
                    if n <= 0 {
                        count(Counter::StackReadErrors, 1);
                        return NO_STACK;
                    }
                    scratch.len = (n as u64 / 8).min(MAX_STACK_DEPTH as u64) as u32;
                    scratch.flags = STACK_FP_ONLY;
                    return store_stack(scratch);
                }
                let (pc, sp, bp) = unsafe { ((*regs).rip, (*regs).rsp, (*regs).rbp) };
                WalkStart {
                    pc,
                    sp,
                    bp,
                    base: sp,
                    window: 0,
                    whole: 0,
                    slot: cache_slot(pc, sp),
                }
            }
        };
        let generation = TABLES_GENERATION.get(0).copied().unwrap_or(0);
        let (Some(win), Some(cached)) = (
            STACK_WINDOW.get_ptr_mut(0),
            WALK_CACHE.get_ptr_mut(start.slot),
        ) else {
            count(Counter::StackReadErrors, 1);
            return NO_STACK;
        };
        let cached = unsafe { &mut *cached };
        if let Some(id) = remembered_walk(cached, win, generation, tgid, &start) {
            count_walk(cached.fp_frames, cached.stop);
            return id;
        }
        // With no tables (a result site's caller) the walk below finds no
        // rows and follows frame pointers, as bpf_get_stack does.
        let no_tables = !tables_known && unsafe { PROC_TABLES.get(&tgid) }.is_none();
        let window = if start.whole != 0 {
            start.window
        } else {
            read_window(win, start.base)
        };
        // The slot records this walk's reads from now on.
        cached.check = 0;
        // Every field a step changes starts from a value the verifier does not
        // know (`opaque_zero`): it compares the loop's states exactly, and a
        // known 0 counted up by each frame-pointer step (or flags or'ed in)
        // gave it a new state per frame: 760,000 instructions to check
        // instead of 70,000.
        let mut w = Walk {
            pc: start.pc,
            sp: start.sp,
            bp: start.bp,
            sp0: start.base,
            tgid,
            flags: opaque_zero(),
            len: opaque_zero(),
            window,
            slot: start.slot,
            cacheable: 1,
            words: opaque_zero(),
            extent: opaque_zero(),
            fp_frames: opaque_zero(),
            stop: 0,
        };
        unsafe {
            bpf_loop(
                MAX_STACK_DEPTH as u32 + 1,
                walk_step as *mut core::ffi::c_void,
                (&raw mut w).cast(),
                0,
            )
        };
        scratch.len = w.len;
        scratch.flags = w.flags | if no_tables { STACK_FP_ONLY } else { 0 };
        count_walk(w.fp_frames, w.stop);
        if w.len == 0 {
            count(Counter::StackReadErrors, 1);
            return NO_STACK;
        }
        let id = store_stack(scratch);
        if id != NO_STACK && w.cacheable != 0 && w.extent != 0 {
            cached.generation = generation;
            cached.pc = start.pc;
            cached.sp = start.sp;
            cached.bp = start.bp;
            cached.base = start.base;
            cached.stack_id = id;
            cached.tgid = tgid;
            cached.words = w.words;
            cached.extent = w.extent;
            cached.fp_frames = w.fp_frames;
            cached.stop = w.stop;
            cached.check = walk_check(start.slot, cached, false).unwrap_or(0);
        }
        id
    }

    // ---- bookkeeping -------------------------------------------------------

    #[inline(always)]
    unsafe fn add<T: Copy>(dst: *mut T, v: T) {
        unsafe { atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(dst, v) };
    }

    /// The current epoch, and the offset of `now` in it (see `Allocation`).
    #[inline(always)]
    fn epoch_at(now: u64) -> (u32, u32) {
        let (epoch, start) = match EPOCH.get(0) {
            Some(e) => (e.id, e.start_ns),
            None => (0, 0),
        };
        let offset = (now.saturating_sub(start) >> EPOCH_TIME_SHIFT).min(u32::MAX as u64) as u32;
        (epoch, offset)
    }

    /// The aggregate a block belongs to: its site's, for the epoch of its birth.
    #[inline(always)]
    fn site_key(a: &Allocation) -> SiteKey {
        SiteKey {
            stack_id: a.stack_id,
            epoch: a.epoch,
            _pad: 0,
        }
    }

    /// Adds a new block to its site's aggregate for its epoch; false if SITES is full.
    #[inline(always)]
    fn site_add(a: &Allocation) -> bool {
        let key = site_key(a);
        let mut site = SITES.get_ptr_mut(&key);
        if site.is_none() {
            let zero = SiteStats::default();
            match SITES.insert(&key, &zero, BPF_NOEXIST as u64) {
                Ok(()) => {}
                Err(e) if e == -17 => {}
                Err(_) => return false,
            }
            site = SITES.get_ptr_mut(&key);
        }
        let Some(site) = site else { return false };
        unsafe {
            add(&raw mut (*site).outstanding_blocks, 1);
            add(&raw mut (*site).outstanding_bytes, a.size as i64);
            add(&raw mut (*site).alloc_calls, 1);
            add(&raw mut (*site).alloc_bytes, a.size);
            add(&raw mut (*site).birth_sum, a.birth_offset as u64);
        }
        true
    }

    /// Takes a retired block out of its aggregate.
    #[inline(always)]
    fn site_sub(a: &Allocation) {
        let key = site_key(a);
        if let Some(site) = SITES.get_ptr_mut(&key) {
            unsafe {
                add(&raw mut (*site).outstanding_blocks, -1);
                add(&raw mut (*site).outstanding_bytes, -(a.size as i64));
                add(
                    &raw mut (*site).birth_sum,
                    (a.birth_offset as u64).wrapping_neg(),
                );
            }
        }
    }

    /// A slot of the block table: its key and its block.
    #[derive(Clone, Copy)]
    struct Slot {
        key: *mut u64,
        block: *mut Allocation,
    }

    #[inline(always)]
    fn cas(p: *mut u64, old: u64, new: u64) -> bool {
        unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
                .1
        }
    }

    /// A bucket of the table: its keys and its blocks.
    #[derive(Clone, Copy)]
    struct Bucket {
        keys: *mut AllocKeys,
        blocks: *mut AllocBucket,
    }

    impl Bucket {
        /// Bucket `b`, None past the table's end.
        #[inline(always)]
        fn get(b: u32) -> Option<Bucket> {
            Some(Bucket {
                keys: ALLOC_KEYS.get_ptr_mut(b)?,
                blocks: ALLOCS.get_ptr_mut(b)?,
            })
        }

        /// The key of slot `i` (< ALLOC_BUCKET_SLOTS).
        #[inline(always)]
        fn key(self, i: usize) -> *mut u64 {
            unsafe { (&raw mut (*self.keys).keys).cast::<u64>().add(i) }
        }

        /// Slot `i` (< ALLOC_BUCKET_SLOTS).
        #[inline(always)]
        fn slot(self, i: usize) -> Slot {
            Slot {
                key: self.key(i),
                block: unsafe { (&raw mut (*self.blocks).blocks).cast::<Allocation>().add(i) },
            }
        }
    }

    /// Looks `addr` up in bucket `b`: the slot holding it, and how many slots
    /// are empty.
    #[inline(always)]
    fn scan_bucket(b: u32, addr: u64) -> (Option<Slot>, u32) {
        let Some(bucket) = Bucket::get(b) else {
            return (None, 0);
        };
        let mut empty = 0;
        let mut i = 0;
        while i < ALLOC_BUCKET_SLOTS {
            let k = unsafe { read_volatile(bucket.key(i)) };
            if k == addr {
                return (Some(bucket.slot(i)), empty);
            }
            empty += (k == ALLOC_KEY_EMPTY) as u32;
            i += 1;
        }
        (None, empty)
    }

    /// Claims an empty slot of bucket `b` (marked busy until its block is written).
    #[inline(always)]
    fn claim_in(b: u32) -> Option<Slot> {
        let bucket = Bucket::get(b)?;
        let mut i = 0;
        while i < ALLOC_BUCKET_SLOTS {
            let key = bucket.key(i);
            if unsafe { read_volatile(key) } == ALLOC_KEY_EMPTY
                && cas(key, ALLOC_KEY_EMPTY, ALLOC_KEY_BUSY)
            {
                return Some(bucket.slot(i));
            }
            i += 1;
        }
        None
    }

    #[inline(always)]
    fn table_buckets() -> u32 {
        unsafe { read_volatile(&ALLOC_BUCKETS) }
    }

    /// Where `addr` stands in the table: its two buckets, how many empty
    /// slots each has, and the slot holding it (the second bucket is not
    /// scanned once the first holds it: its count stays 0).
    struct Lookup {
        held: Option<Slot>,
        buckets: (u32, u32),
        empty: (u32, u32),
    }

    /// None for an address no block can have (a key's reserved values).
    #[inline(always)]
    fn lookup(addr: u64) -> Option<Lookup> {
        if addr <= ALLOC_KEY_BUSY {
            return None;
        }
        let (b1, b2) = alloc_bucket_choices(addr, table_buckets());
        let (mut held, empty1) = scan_bucket(b1, addr);
        let mut empty2 = 0;
        if held.is_none() && b2 != b1 {
            (held, empty2) = scan_bucket(b2, addr);
        }
        Some(Lookup {
            held,
            buckets: (b1, b2),
            empty: (empty1, empty2),
        })
    }

    /// The slot of the outstanding block at `addr`, if memtrace holds one.
    #[inline(always)]
    fn find_block(addr: u64) -> Option<Slot> {
        lookup(addr)?.held
    }

    /// Takes the block in `slot` (at `addr`) out of the table and its
    /// aggregate. Of two CPUs retiring one block (a double free), one does.
    #[inline(always)]
    fn retire_slot(slot: Slot, addr: u64, a: &Allocation) -> bool {
        if cas(slot.key, addr, ALLOC_KEY_EMPTY) {
            site_sub(a);
            return true;
        }
        false
    }

    /// Enters block `a` at `addr` into the table, in the emptier of its two
    /// buckets; the slot, or None if both are full. A block still held at
    /// `addr` (its free was missed) is retired first and counted.
    #[inline(always)]
    fn insert_block(addr: u64, a: &Allocation) -> Option<Slot> {
        let Lookup {
            held,
            buckets: (b1, b2),
            empty: (empty1, empty2),
        } = lookup(addr)?;
        if let Some(old) = held {
            // (Read before the slot is given up: another insert may take it then.)
            let prev = unsafe { read_volatile(old.block) };
            if retire_slot(old, addr, &prev) {
                count(Counter::AddressReused, 1);
            }
        }
        let (first, second) = if empty2 > empty1 { (b2, b1) } else { (b1, b2) };
        let slot = claim_in(first).or_else(|| claim_in(second))?;
        // The block before its key: a reader that sees the key sees the block.
        unsafe {
            write_volatile(slot.block, *a);
            write_volatile(slot.key, addr);
        }
        Some(slot)
    }

    /// Retires the outstanding block at `ptr`; false if memtrace never saw it.
    /// `not_after_ns` protects realloc: between realloc's entry and its return
    /// probe another thread may already have been handed the old address by
    /// malloc. That newer block is kept, and the old one counts as retired: the
    /// newer allocation retired it when it took the address (AddressReused).
    #[inline(always)]
    fn retire(ptr: u64, not_after_ns: u64) -> bool {
        let Some(slot) = find_block(ptr) else {
            return false;
        };
        let a = unsafe { read_volatile(slot.block) };
        if a.timestamp_ns > not_after_ns {
            return true;
        }
        retire_slot(slot, ptr, &a);
        true
    }

    #[inline(always)]
    fn record_alloc<C: EbpfContext>(ctx: &C, ptr: u64, size: u64, at: Option<WalkStart>) {
        let now = unsafe { bpf_ktime_get_ns() };
        let stack_id = capture_stack(ctx, at);
        let (epoch, birth_offset) = epoch_at(now);
        let a = Allocation {
            size,
            stack_id,
            timestamp_ns: now,
            epoch,
            birth_offset,
        };
        // (No free can come between the two updates: the caller has not been
        // given the address yet.)
        let Some(slot) = insert_block(ptr, &a) else {
            count(Counter::DroppedAllocMapFull, 1);
            return;
        };
        if !site_add(&a) {
            let _ = cas(slot.key, ptr, ALLOC_KEY_EMPTY);
            count(Counter::DroppedSiteMapFull, 1);
            return;
        }
        count(Counter::AllocCalls, 1);
        count(Counter::AllocBytes, size);
    }

    /// A session cookie holding a call (see `enter`): this bit, the size
    /// (saturated) << 8 and the `AllocKind` in the low byte.
    const COOKIE_CALL: u64 = 1 << 63;
    const COOKIE_SIZE_MAX: u64 = (1 << 55) - 1;

    /// `PendingCall::out_ptr` of a realloc whose old block memtrace knew at entry.
    const OLD_BLOCK_KNOWN: u64 = 1;

    /// What an entry returns. In a uprobe session the kernel skips the return
    /// probe of a call whose entry returned SKIP_RETURN; classic entry probes'
    /// return values are ignored.
    const KEEP_RETURN: u32 = 0;
    const SKIP_RETURN: u32 = 1;

    #[inline(always)]
    fn regs_ret<C: EbpfContext>(ctx: &C) -> u64 {
        let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
        unsafe { (*regs).rax }
    }

    /// Whether `addr` is inside one of the probed allocator functions.
    #[inline(always)]
    fn in_allocator(addr: u64) -> bool {
        // Most addresses (users' return addresses) are outside the span of
        // them all: one comparison.
        if let Some(hull) = ALLOCATOR_HULL.get(0) {
            if hull.end != 0 && (addr < hull.start || addr >= hull.end) {
                return false;
            }
        }
        let mut i = 0;
        while i < MAX_ALLOCATOR_FUNCTIONS {
            match ALLOCATOR_TEXT.get(i) {
                Some(r) if r.end != 0 => {
                    if addr >= r.start && addr < r.end {
                        return true;
                    }
                }
                _ => return false,
            }
            i += 1;
        }
        false
    }

    /// Whether the call being entered was made from inside a probed allocator
    /// function: its return address (at [sp] on entry) is in one of their ranges.
    #[inline(always)]
    fn called_by_allocator(sp: u64) -> bool {
        match unsafe { bpf_probe_read_user(sp as *const u64) } {
            Ok(ret) => in_allocator(ret),
            Err(_) => false,
        }
    }

    /// A mark's value: a probed function's `call`, its `jmp`, or a jump in
    /// code it called (the callee checks its return address).
    const MARK_CALL: u64 = 0;
    const MARK_TAIL: u64 = 1;
    const MARK_CHECK: u64 = 2;

    /// Who made the call being entered, as far as the allocator's own calls go.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Caller {
        /// A user's call.
        User,
        /// A call made by a probed allocator function: part of its own call.
        Allocator,
        /// A probed allocator function jumped here: still its call.
        TailCall,
        /// Unknown from marks (`CALL_MARKS_BY_SP`): look at [sp] and PENDING.
        BySp,
    }

    /// The caller of the entry of thread `tid` at stack pointer `sp`, by the
    /// marks the allocator's own call sites leave. With no mark in flight,
    /// this is one array read. (`User` and `BySp` may still be a tail call of
    /// a pending call: see `may_be_tail_call`.)
    #[inline(always)]
    fn marked_caller(tid: u32, sp: u64) -> Caller {
        let Some(st) = CALL_MARK_STATE.get_ptr_mut(0) else {
            return Caller::BySp;
        };
        unsafe {
            if core::ptr::read_volatile(&raw const (*st).mode) != CALL_MARKS_BY_SITE {
                return Caller::BySp;
            }
            if core::ptr::read_volatile(&raw const (*st).in_flight) == 0 {
                return Caller::User;
            }
        }
        let key = PendingKey { tid, _pad: 0, sp };
        let Some(&mark) = (unsafe { CALL_MARKS.get(&key) }) else {
            return Caller::User;
        };
        if CALL_MARKS.remove(&key).is_ok() {
            unsafe { add(&raw mut (*st).in_flight, u64::MAX) };
        }
        match mark {
            MARK_CALL => Caller::Allocator,
            MARK_TAIL => Caller::TailCall,
            _ => Caller::BySp,
        }
    }

    /// Whether any call is in PENDING: only then can an entry be the tail call
    /// of a pending call (glibc's memalign jumps to `_mid_memalign`, which
    /// jumps to malloc: that jump is not in a probed function). Counted with
    /// marks or without.
    #[inline(always)]
    fn may_be_tail_call() -> bool {
        match CALL_MARK_STATE.get_ptr_mut(0) {
            Some(st) => unsafe { core::ptr::read_volatile(&raw const (*st).pending) != 0 },
            None => true,
        }
    }

    /// Counts a call into or out of PENDING (see `CallMarkState::pending`).
    #[inline(always)]
    fn count_pending(delta: u64) {
        if let Some(st) = CALL_MARK_STATE.get_ptr_mut(0) {
            unsafe { add(&raw mut (*st).pending, delta) };
        }
    }

    /// A probe on one of the allocator's own calls or jumps into a probed
    /// function (`mark`: MARK_*): marks the callee's coming entry on this thread.
    #[inline(always)]
    fn leave_mark<C: EbpfContext>(ctx: &C, mark: u64) -> u32 {
        let Some(tid) = target_thread() else {
            return SKIP_RETURN;
        };
        let sp = regs_sp(ctx);
        let key = PendingKey {
            tid,
            _pad: 0,
            // A call pushes the return address before the callee's probe.
            sp: if mark == MARK_CALL {
                sp.wrapping_sub(8)
            } else {
                sp
            },
        };
        let value = mark;
        match CALL_MARKS.insert(&key, &value, BPF_NOEXIST as u64) {
            Ok(()) => {
                if let Some(st) = CALL_MARK_STATE.get_ptr_mut(0) {
                    unsafe { add(&raw mut (*st).in_flight, 1) };
                }
            }
            // The same mark, never taken: keep one.
            Err(e) if e == -17 => {
                let _ = CALL_MARKS.insert(&key, &value, BPF_ANY as u64);
            }
            // The callee will count as a user's call: say so.
            Err(_) => count(Counter::DroppedPendingFull, 1),
        }
        SKIP_RETURN
    }

    // ---- sampling (--sample-bytes) -------------------------------------------
    // Byte-weighted Poisson sampling, as tcmalloc and jemalloc do it: each
    // thread's allocated bytes are a line on which sample points fall at
    // exponentially distributed distances with mean SAMPLE_MEAN_BYTES. An
    // allocation is sampled when a point falls inside its bytes, i.e. with
    // probability 1 - exp(-size/mean); userspace scales each sampled block back
    // up by the inverse of that probability.

    #[inline(always)]
    fn sample_mean() -> u64 {
        unsafe { core::ptr::read_volatile(&SAMPLE_MEAN_BYTES) }
    }

    /// Distance to the next sample point: exponential with mean `mean` (bytes),
    /// as `mean · ln 2 · -log2(u)` for a uniform 32-bit `u`, in fixed point.
    /// `sampling::draw_gap` in userspace is the same computation (and its tests
    /// check it).
    #[inline(always)]
    fn draw_gap(mean: u64) -> i64 {
        let r = unsafe { bpf_get_prandom_u32() } | 1;
        // msb = floor(log2 r), by halving.
        let (mut v, mut msb) = (r, 0u32);
        if v >= 1 << 16 {
            v >>= 16;
            msb += 16;
        }
        if v >= 1 << 8 {
            v >>= 8;
            msb += 8;
        }
        if v >= 1 << 4 {
            v >>= 4;
            msb += 4;
        }
        if v >= 1 << 2 {
            v >>= 2;
            msb += 2;
        }
        if v >= 1 << 1 {
            msb += 1;
        }
        // The mantissa, top bit at 31: table index (10 bits) and fraction (16 bits).
        let m = (r as u64) << (31 - (msb & 31));
        let idx = ((m >> 21) & 1023) as u32;
        let frac = (m >> 5) & 0xffff;
        let lo = SAMPLE_LOG2.get(idx).copied().unwrap_or(0) as u64;
        let hi = SAMPLE_LOG2.get(idx + 1).copied().unwrap_or(0) as u64;
        let log2_mantissa = lo + ((hi.saturating_sub(lo) * frac) >> 16);
        // -log2(r / 2^32), then in units of 2^-16.
        let neg_log2 = ((((32 - msb) as u64) << SAMPLE_LOG2_SHIFT).saturating_sub(log2_mantissa))
            >> (SAMPLE_LOG2_SHIFT - 16);
        // mean <= 2^40 and neg_log2 <= 2^21: no overflow.
        ((((mean * neg_log2) >> 16) * LN2_Q16) >> 16).max(1) as i64
    }

    /// Whether thread `tid`'s allocation of `size` bytes is sampled.
    #[inline(always)]
    fn sample(tid: u32, mean: u64, size: u64) -> bool {
        let size = size.min(i64::MAX as u64) as i64;
        let Some(c) = COUNTDOWN.get_ptr_mut(tid & (SAMPLE_THREADS - 1)) else {
            return false;
        };
        unsafe {
            if (*c).tid != tid {
                // The thread's first allocation (or another thread had the slot).
                (*c).tid = tid;
                (*c).left = draw_gap(mean);
            }
            if (*c).left > size {
                (*c).left -= size;
                return false;
            }
            // Sampled. By the exponential's lack of memory, the next point is a
            // fresh gap beyond the end of this allocation.
            (*c).left = draw_gap(mean);
        }
        true
    }

    // ---- entry and return ----------------------------------------------------

    /// An allocating call's entry. Returns KEEP_RETURN if its return must be seen.
    /// `session`: called from the uprobe session program, whose skipped calls
    /// have no return probe at all. `cookie`: the session's per-call cookie
    /// when the function may keep its call there (`SITE_CALL_IN_COOKIE`), else
    /// null; a call that needs only its size is then kept there, not in PENDING.
    /// `keep_unsampled`: an unsampled call is kept to its return all the same
    /// (see below).
    #[inline(always)]
    fn enter<C: EbpfContext>(
        ctx: &C,
        kind: AllocKind,
        size: u64,
        old_ptr: u64,
        out_ptr: u64,
        session: bool,
        cookie: *mut u64,
        keep_unsampled: bool,
    ) -> u32 {
        let Some(tid) = target_thread() else {
            return SKIP_RETURN;
        };
        let key = PendingKey {
            tid,
            _pad: 0,
            sp: regs_sp(ctx),
        };
        let caller = marked_caller(key.tid, key.sp);
        match caller {
            // (Marks are used only with sessions, which skip the inner return.)
            Caller::TailCall => return SKIP_RETURN,
            Caller::Allocator => {
                count(Counter::InternalCalls, 1);
                return SKIP_RETURN;
            }
            Caller::User | Caller::BySp => {}
        }
        if may_be_tail_call() {
            if let Some(p) = PENDING.get_ptr_mut(&key) {
                // A tail call from one allocator entry point into another (same
                // stack pointer, the first call not returned): one call, two
                // probe pairs. In a session the inner return probe is skipped
                // and the outer one reports the call; classic return probes
                // both run and must pair up.
                if !session {
                    unsafe { (*p).refs += 1 };
                }
                return SKIP_RETURN;
            }
        }
        if caller == Caller::BySp && called_by_allocator(key.sp) {
            count(Counter::InternalCalls, 1);
            return SKIP_RETURN;
        }
        // realloc: whether memtrace knows the old block now. Another thread may
        // be handed (and even free) that address before this call's return
        // probe runs; the old block then is gone, but it was not unknown.
        let old_known = old_ptr != 0 && find_block(old_ptr).is_some();
        let mut flags = 0;
        let mean = sample_mean();
        if mean != 0 && !sample(tid, mean, size) {
            // Its return is still needed to retire a sampled old block
            // (realloc); for a realloc(p, 0), which glibc turns into a free
            // (returning NULL), to count it as a free and not an allocation;
            // for a call that may well fail (`keep_unsampled`, see
            // `result_in_doubt`), to count it as failed; and for a function
            // that reaches another probed one by jumping through code memtrace
            // does not mark (`keep_unsampled`, `SITE_UNSAMPLED_PENDING`), to
            // stay in PENDING, where that entry finds it: one call. The return
            // counts the call then.
            if !old_known && !keep_unsampled && !(old_ptr != 0 && size == 0) {
                count(Counter::UnsampledCalls, 1);
                // realloc of a block memtrace never saw: the free it makes is
                // counted here, as its return is not seen (so free_calls stays
                // exact; it counts a rare failed realloc too).
                if old_ptr != 0 {
                    count(Counter::FreeCalls, 1);
                }
                return SKIP_RETURN;
            }
            flags = PENDING_UNSAMPLED;
        }
        if !cookie.is_null() && flags == 0 && old_ptr == 0 && out_ptr == 0 {
            // The session keeps the call: nothing to store, look up or expire.
            unsafe { *cookie = COOKIE_CALL | (size.min(COOKIE_SIZE_MAX) << 8) | kind as u64 };
            return KEEP_RETURN;
        }
        let call = PendingCall {
            kind: kind as u32 | flags,
            refs: 1,
            size,
            old_ptr,
            out_ptr: if old_known { OLD_BLOCK_KNOWN } else { out_ptr },
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
        };
        if PENDING.insert(&key, &call, BPF_ANY as u64).is_err() {
            count(Counter::DroppedPendingFull, 1);
            return SKIP_RETURN;
        }
        count_pending(1);
        KEEP_RETURN
    }

    #[inline(always)]
    fn arg(ctx: &ProbeContext, n: usize) -> u64 {
        ctx.arg::<u64>(n).unwrap_or(0)
    }

    /// nmemb * size, or u64::MAX on overflow (the call will fail with ENOMEM; a
    /// wrapped product could be 0, which realloc would take for a free).
    #[inline(always)]
    fn array_size(nmemb: u64, size: u64) -> u64 {
        // checked_mul (and this test, which LLVM would turn back into it) needs a
        // 128-bit multiply, which BPF does not have; black_box keeps the division.
        if nmemb != 0 && size > core::hint::black_box(u64::MAX) / nmemb {
            u64::MAX
        } else {
            nmemb * size
        }
    }

    /// (size, old pointer, out pointer) of a call to an allocator function.
    #[inline(always)]
    fn call_args(ctx: &ProbeContext, kind: AllocKind) -> (u64, u64, u64) {
        match kind {
            AllocKind::Malloc | AllocKind::Valloc | AllocKind::Pvalloc => (arg(ctx, 0), 0, 0),
            AllocKind::Calloc => (array_size(arg(ctx, 0), arg(ctx, 1)), 0, 0),
            AllocKind::Realloc => (arg(ctx, 1), arg(ctx, 0), 0),
            AllocKind::ReallocArray => (array_size(arg(ctx, 1), arg(ctx, 2)), arg(ctx, 0), 0),
            AllocKind::Memalign => (arg(ctx, 1), 0, 0),
            AllocKind::PosixMemalign => (arg(ctx, 2), 0, arg(ctx, 0)),
        }
    }

    /// Whether a call may fail for its arguments alone, whatever the memory:
    /// posix_memalign with an alignment that is not a power of two multiple of
    /// 8 (EINVAL, by POSIX), memalign/aligned_alloc with one that is not a
    /// power of two (allocators differ). Unsampled, such a rare call still has
    /// its return seen, so that a failure is not counted as an allocation.
    #[inline(always)]
    fn result_in_doubt(ctx: &ProbeContext, kind: AllocKind) -> bool {
        let pow2 = |a: u64| a != 0 && a & (a - 1) == 0;
        match kind {
            AllocKind::PosixMemalign => {
                let a = arg(ctx, 1);
                !pow2(a) || a % 8 != 0
            }
            AllocKind::Memalign => !pow2(arg(ctx, 0)),
            _ => false,
        }
    }

    /// A classic entry probe's call.
    #[inline(always)]
    fn enter_kind(ctx: &ProbeContext, kind: AllocKind) -> u32 {
        if empty_programs() {
            return SKIP_RETURN;
        }
        let (size, old_ptr, out_ptr) = call_args(ctx, kind);
        // No attach cookie here: whether the function may tail-call is in
        // CALL_MARK_STATE.
        let tail_kinds = match CALL_MARK_STATE.get_ptr(0) {
            Some(st) => unsafe { core::ptr::read_volatile(&raw const (*st).tail_kinds) },
            None => u64::MAX,
        };
        enter(
            ctx,
            kind,
            size,
            old_ptr,
            out_ptr,
            false,
            core::ptr::null_mut(),
            (tail_kinds >> (kind as u32 & 63)) & 1 != 0 || result_in_doubt(ctx, kind),
        )
    }

    #[uprobe]
    pub fn malloc_enter(ctx: ProbeContext) -> u32 {
        enter_kind(&ctx, AllocKind::Malloc)
    }

    #[uprobe]
    pub fn calloc_enter(ctx: ProbeContext) -> u32 {
        enter_kind(&ctx, AllocKind::Calloc)
    }

    #[uprobe]
    pub fn realloc_enter(ctx: ProbeContext) -> u32 {
        enter_kind(&ctx, AllocKind::Realloc)
    }

    #[uprobe]
    pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
        enter_kind(&ctx, AllocKind::ReallocArray)
    }

    #[uprobe]
    pub fn memalign_enter(ctx: ProbeContext) -> u32 {
        enter_kind(&ctx, AllocKind::Memalign)
    }

    #[uprobe]
    pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
        enter_kind(&ctx, AllocKind::PosixMemalign)
    }

    #[uprobe]
    pub fn valloc_enter(ctx: ProbeContext) -> u32 {
        enter_kind(&ctx, AllocKind::Valloc)
    }

    #[uprobe]
    pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
        enter_kind(&ctx, AllocKind::Pvalloc)
    }

    /// An allocating call's return, with its return value `ret`.
    #[inline(always)]
    /// `in_cookie`: the call as its session's cookie holds it (see `enter`),
    /// or 0 for a call in PENDING.
    fn exit<C: EbpfContext>(ctx: &C, ret: u64, in_cookie: u64) -> Option<(u64, u64)> {
        let tid = target_thread()?;
        count(Counter::ReturnProbes, 1);
        // With sampling, most blocks are unknown to memtrace: not worth a count.
        let mean = sample_mean();
        let call = if in_cookie & COOKIE_CALL != 0 {
            PendingCall {
                kind: (in_cookie & 0xff) as u32,
                refs: 1,
                size: (in_cookie & !COOKIE_CALL) >> 8,
                old_ptr: 0,
                out_ptr: 0,
                timestamp_ns: 0,
            }
        } else {
            // The return popped the return address: the entry saw sp - 8.
            let key = PendingKey {
                tid,
                _pad: 0,
                sp: regs_sp(ctx).wrapping_sub(8),
            };
            let Some(p) = PENDING.get_ptr_mut(&key) else {
                // Sampling with classic return probes: every unsampled call's
                // return probe runs, with nothing pending.
                if mean == 0 {
                    count(Counter::UnmatchedReturns, 1);
                }
                return None;
            };
            let call = unsafe {
                if (*p).refs > 1 {
                    (*p).refs -= 1;
                    return None;
                }
                *p
            };
            if PENDING.remove(&key).is_ok() {
                count_pending(u64::MAX);
            }
            call
        };
        let sampled = call.kind & PENDING_UNSAMPLED == 0;
        // One record_alloc for every kind: it holds the stack walk, which the
        // verifier would otherwise check once per call site.
        let ptr = match AllocKind::from_u32(call.kind & PENDING_KIND_MASK) {
            Some(AllocKind::PosixMemalign) => {
                if ret as u32 != 0 {
                    count(Counter::FailedAllocs, 1);
                    return None;
                }
                if !sampled {
                    count(Counter::UnsampledCalls, 1);
                    return None;
                }
                match unsafe { bpf_probe_read_user(call.out_ptr as *const u64) } {
                    Ok(ptr) => ptr,
                    Err(_) => {
                        count(Counter::OutPointerReadErrors, 1);
                        return None;
                    }
                }
            }
            Some(AllocKind::Realloc | AllocKind::ReallocArray) => {
                if ret == 0 {
                    if call.old_ptr != 0 && call.size == 0 {
                        // realloc(p, 0): glibc frees p and returns NULL.
                        count(Counter::FreeCalls, 1);
                        if !retire(call.old_ptr, call.timestamp_ns)
                            && call.out_ptr != OLD_BLOCK_KNOWN
                            && mean == 0
                        {
                            count(Counter::FreeUnknown, 1);
                        }
                    } else {
                        // Failure: the old block is untouched.
                        count(Counter::FailedAllocs, 1);
                    }
                    return None;
                }
                if call.old_ptr != 0 {
                    count(Counter::FreeCalls, 1);
                    if !retire(call.old_ptr, call.timestamp_ns)
                        && call.out_ptr != OLD_BLOCK_KNOWN
                        && mean == 0
                    {
                        count(Counter::FreeUnknown, 1);
                    }
                }
                if !sampled {
                    count(Counter::UnsampledCalls, 1);
                    if retire(ret, u64::MAX) {
                        // The unsampled new block took an address memtrace still
                        // held (its free was missed): not outstanding any more.
                        count(Counter::AddressReused, 1);
                    }
                    return None;
                }
                ret
            }
            Some(_) => {
                if ret == 0 {
                    count(Counter::FailedAllocs, 1);
                    return None;
                }
                if !sampled {
                    count(Counter::UnsampledCalls, 1);
                    return None;
                }
                ret
            }
            None => return None,
        };
        Some((ptr, call.size))
    }

    /// Return probe shared by every allocating entry point (classic probes).
    #[uretprobe]
    pub fn alloc_return(ctx: RetProbeContext) -> u32 {
        if empty_programs() {
            return 0;
        }
        if let Some((ptr, size)) = exit(&ctx, regs_ret(&ctx), 0) {
            record_alloc(&ctx, ptr, size, None);
        }
        0
    }

    /// Entry and return of every allocating function as one uprobe session:
    /// userspace loads this program with the expected attach type
    /// BPF_TRACE_UPROBE_SESSION and attaches it with a single uprobe_multi link,
    /// bound to the target. Calls whose entry returns SKIP_RETURN (made by the
    /// allocator itself, tail calls, unsampled) pay no return probe at all.
    ///
    /// The same program runs at the entry and at the return
    /// (`bpf_session_is_return` tells which). Each site's attach cookie is its
    /// address in the process (<< 8) and its `AllocKind` (low bits), with
    /// `SITE_CALL_IN_COOKIE` for a function that never jumps out of its code:
    /// such a call is kept in the session's own cookie, not in PENDING.
    ///
    /// Written without `#[uprobe]`: that macro's wrapper discards the
    /// function's value and returns 0, which in a session keeps every return
    /// probe.
    #[unsafe(no_mangle)]
    #[unsafe(link_section = "uprobe")]
    pub fn alloc_session(ctx: *mut core::ffi::c_void) -> u32 {
        if empty_programs() {
            return SKIP_RETURN;
        }
        session_step(ProbeContext::new(ctx))
    }

    /// `bpf_session_cookie()`: this call's 8 bytes, shared by its entry and
    /// its return (the stand-in call is rewritten by userspace, see
    /// `memtrace_common::KFUNCS`).
    #[inline(always)]
    fn session_cookie() -> *mut u64 {
        let f: unsafe extern "C" fn() -> *mut u64 =
            unsafe { core::mem::transmute(KFUNC_SESSION_COOKIE as usize) };
        unsafe { f() }
    }

    /// `bpf_session_is_return()`.
    #[inline(always)]
    fn session_is_return() -> bool {
        let f: unsafe extern "C" fn() -> u64 =
            unsafe { core::mem::transmute(KFUNC_SESSION_IS_RETURN as usize) };
        unsafe { f() & 1 != 0 }
    }

    #[inline(always)]
    fn session_step(ctx: ProbeContext) -> u32 {
        let cookie = session_cookie();
        if !session_is_return() {
            let site = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
            return session_entry(&ctx, cookie, site);
        }
        let in_cookie = if cookie.is_null() {
            0
        } else {
            unsafe { *cookie }
        };
        if let Some((ptr, size)) = exit(&ctx, regs_ret(&ctx), in_cookie) {
            record_alloc(&ctx, ptr, size, None);
        }
        0
    }

    /// The result sites' program (see `result_site`), attached with a plain
    /// uprobe_multi link, bound to the target. Not part of the session: a
    /// session consumer that returns 0 for another process's hit (as every
    /// pid-bound one does) makes the kernel arm a return probe, which
    /// replaces the word at [rsp] with its trampoline: the return address at
    /// a function's entry, but a live stack slot inside the function.
    #[unsafe(no_mangle)]
    #[unsafe(link_section = "uprobe")]
    pub fn alloc_result(ctx: *mut core::ffi::c_void) -> u32 {
        if empty_programs() {
            return 0;
        }
        let ctx = ProbeContext::new(ctx);
        let site = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
        if let Some((ptr, size, at)) = result_site(&ctx, (site >> 8) as u32) {
            record_alloc(&ctx, ptr, size, Some(at));
        }
        0
    }

    #[inline(always)]
    fn session_entry(ctx: &ProbeContext, cookie: *mut u64, site: u64) -> u32 {
        match site & 0x7f {
            SITE_MARK_CALL => return leave_mark(ctx, MARK_CALL),
            SITE_MARK_JUMP => return leave_mark(ctx, MARK_TAIL),
            SITE_MARK_CHECK => return leave_mark(ctx, MARK_CHECK),
            _ => {}
        }
        let Some(kind) = AllocKind::from_u32((site & SITE_KIND_MASK) as u32) else {
            return SKIP_RETURN;
        };
        if !cookie.is_null() {
            unsafe { *cookie = 0 };
        }
        let keep_in = if site & SITE_CALL_IN_COOKIE != 0 {
            cookie
        } else {
            core::ptr::null_mut()
        };
        let (size, old_ptr, out_ptr) = call_args(ctx, kind);
        let keep_unsampled = site & SITE_UNSAMPLED_PENDING != 0 || result_in_doubt(ctx, kind);
        enter(
            ctx,
            kind,
            size,
            old_ptr,
            out_ptr,
            true,
            keep_in,
            keep_unsampled,
        )
    }

    // ---- result sites --------------------------------------------------------
    // Probes inside an allocating function where its outcome is already known
    // (memtrace/src/exits.rs): one trap per call instead of an entry and a
    // return probe.

    /// A general register of `struct pt_regs` by its index (`PT_REGS_*`).
    /// Every register is loaded at its own constant offset first: the
    /// verifier refuses a context load at a computed offset, which a match
    /// over the fields compiles to.
    #[inline(always)]
    fn reg_at(regs: *const aya_ebpf::bindings::pt_regs, r: u8) -> u64 {
        let all: [u64; 16] = unsafe {
            [
                read_volatile(&(*regs).r15),
                read_volatile(&(*regs).r14),
                read_volatile(&(*regs).r13),
                read_volatile(&(*regs).r12),
                read_volatile(&(*regs).rbp),
                read_volatile(&(*regs).rbx),
                read_volatile(&(*regs).r11),
                read_volatile(&(*regs).r10),
                read_volatile(&(*regs).r9),
                read_volatile(&(*regs).r8),
                read_volatile(&(*regs).rax),
                read_volatile(&(*regs).rcx),
                read_volatile(&(*regs).rdx),
                read_volatile(&(*regs).rsi),
                read_volatile(&(*regs).rdi),
                0,
            ]
        };
        all[(r & 15) as usize]
    }

    /// The stack word at `sp + off`: from the first `window` bytes of `win`
    /// (read at `sp`) when it lies there, else read from the target.
    #[inline(always)]
    fn stack_at(win: *const StackWindow, window: u32, sp: u64, off: i32) -> Option<u64> {
        // (u32 offsets and the explicit index bound: the verifier could not
        // follow the single unsigned compare LLVM made of a signed test.)
        if off >= 0 {
            let o = off as u32;
            let i = (o >> 3) as usize;
            if o & 7 == 0 && o.wrapping_add(8) <= window && i < WINDOW_WORDS {
                return Some(unsafe { (*win).words[i] });
            }
        }
        read_user(sp.wrapping_add(off as i64 as u64))
    }

    /// The value at a result site's location: a register, or a stack word
    /// relative to the site's rsp (see `stack_at`; `window` 0 reads it).
    #[inline(always)]
    fn read_loc(
        regs: *const aya_ebpf::bindings::pt_regs,
        (loc, reg, off): (u8, u8, i32),
        win: *const StackWindow,
        window: u32,
        sp: u64,
    ) -> Option<u64> {
        match loc {
            LOC_REG => Some(reg_at(regs, reg)),
            LOC_STACK => stack_at(win, window, sp, off),
            _ => None,
        }
    }

    /// Whether the condition `cc` of a jcc (its opcode's low nibble) holds
    /// for `flags` (rflags), as the CPU (and the kernel's emulation) decides.
    #[inline(always)]
    fn cond_holds(cc: u8, flags: u64) -> bool {
        let cf = flags & 1 != 0;
        let pf = flags & (1 << 2) != 0;
        let zf = flags & (1 << 6) != 0;
        let sf = flags & (1 << 7) != 0;
        let of = flags & (1 << 11) != 0;
        let base = match (cc >> 1) & 7 {
            0 => of,
            1 => cf,
            2 => zf,
            3 => cf || zf,
            4 => sf,
            5 => pf,
            6 => sf != of,
            _ => zf || sf != of,
        };
        base != (cc & 1 != 0)
    }

    /// A result site's probe: Some((ptr, size, where the walk from its caller starts))
    /// when the call returns a block to record.
    #[inline(always)]
    fn result_site(ctx: &ProbeContext, index: u32) -> Option<(u64, u64, WalkStart)> {
        let tid = target_thread()?;
        let site = *RESULT_SITES.get(index)?;
        let win = STACK_WINDOW.get_ptr_mut(0)?;
        let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
        let (sp, flags) = unsafe { ((*regs).rsp, (*regs).eflags) };
        let entry_sp = sp.wrapping_add(site.entry_sp_delta as u64);
        let tgid = target_tgid();
        let size_at = (site.size_loc, site.size_reg, site.size_off);
        if site.capture != 0 {
            if let (Some(size), Some(c)) = (
                read_loc(regs, size_at, win, 0, sp),
                CAPTURES.get_ptr_mut(tid & (SAMPLE_THREADS - 1)),
            ) {
                unsafe {
                    *c = Capture {
                        tid,
                        _pad: 0,
                        sp: entry_sp,
                        size,
                    }
                };
            }
        }
        let outcome = if site.cond == RESULT_ALWAYS || cond_holds(site.cond, flags) {
            site.taken
        } else {
            site.not_taken
        };
        if outcome == RESULT_NOTHING {
            return None;
        }
        if outcome == RESULT_GUARD {
            count(Counter::UnforeseenReturns, 1);
            return None;
        }
        // Whose call this is. No marks are left for a function probed at its
        // result sites (it has no entry probe to take them): a call of the
        // allocator's own is told by its return address, a tail call from
        // another entry point by its PENDING entry (such a function keeps
        // even its unsampled calls there).
        let key = PendingKey {
            tid,
            _pad: 0,
            sp: entry_sp,
        };
        if may_be_tail_call() && PENDING.get_ptr(&key).is_some() {
            return None;
        }
        // One read of the stack from here gives the return address, the
        // caller's rbp if it is saved, and the caller's frames for the walk:
        // as much as the walk remembered for this site last time, else a
        // whole window. (Each read of user memory costs more than the rest
        // of the lookups together.)
        let slot = cache_slot(unsafe { (*regs).rip }, sp);
        let mut need = site.entry_sp_delta.wrapping_add(8);
        if site.rbp_loc == LOC_STACK && site.rbp_off >= 0 {
            need = need.max(site.rbp_off as u32 + 8);
        }
        let remembered = match WALK_CACHE.get(slot) {
            Some(c) if c.check != 0 && c.base == sp && c.tgid == tgid => c.extent.max(need),
            _ => 0,
        };
        // (The mask, on a value the compiler cannot see through, keeps the
        // length bounded for the verifier wherever the comparison ends up.)
        let (window, whole) = if remembered != 0
            && remembered < WINDOW_BYTES
            && unsafe {
                aya_ebpf::helpers::generated::bpf_probe_read_user(
                    win.cast(),
                    read_volatile(&remembered) & (WINDOW_BYTES - 1),
                    sp as *const _,
                )
            } == 0
        {
            (remembered, 0)
        } else {
            (read_window(win, sp), 1)
        };
        let loc = |at: (u8, u8, i32)| read_loc(regs, at, win, window, sp);
        let Some(ra) = stack_at(win, window, sp, site.entry_sp_delta as i32) else {
            count(Counter::DroppedPendingFull, 1);
            return None;
        };
        if in_allocator(ra) {
            count(Counter::InternalCalls, 1);
            return None;
        }
        let ptr = unsafe { (*regs).rax };
        if outcome == RESULT_NULL || ptr == 0 {
            count(Counter::FailedAllocs, 1);
            // A size this call captured is not for the next one.
            if let Some(c) = CAPTURES.get_ptr_mut(tid & (SAMPLE_THREADS - 1)) {
                unsafe {
                    if (*c).tid == tid && (*c).sp == entry_sp {
                        (*c).sp = 0;
                    }
                }
            }
            return None;
        }
        let size = match loc(size_at) {
            Some(size) => size,
            None => {
                // Used once: a later call at the same stack pointer whose
                // capture was missed (attached in between) finds none.
                let c = CAPTURES.get_ptr_mut(tid & (SAMPLE_THREADS - 1))?;
                unsafe {
                    if (*c).tid != tid || (*c).sp != entry_sp {
                        // Another thread took the slot, a nested call, or
                        // the capture came before the probes were all in.
                        count(Counter::DroppedPendingFull, 1);
                        return None;
                    }
                    (*c).sp = 0;
                    (*c).size
                }
            }
        };
        let mean = sample_mean();
        if mean != 0 && !sample(tid, mean, size) {
            count(Counter::UnsampledCalls, 1);
            return None;
        }
        let bp = loc((site.rbp_loc, site.rbp_reg, site.rbp_off)).unwrap_or(0);
        Some((
            ptr,
            size,
            WalkStart {
                pc: ra,
                sp: entry_sp.wrapping_add(8),
                bp,
                base: sp,
                window,
                whole,
                slot,
            },
        ))
    }

    #[uprobe]
    pub fn free_enter(ctx: ProbeContext) -> u32 {
        if empty_programs() {
            return 0;
        }
        let Some(tid) = target_thread() else {
            return 0;
        };
        let ptr = arg(&ctx, 0);
        if ptr == 0 {
            return 0;
        }
        let key = PendingKey {
            tid,
            _pad: 0,
            sp: regs_sp(&ctx),
        };
        // A free made by the allocator (glibc's realloc(p, 0) frees p): the
        // return probe of the outer call accounts for it.
        let internal = match marked_caller(key.tid, key.sp) {
            Caller::Allocator | Caller::TailCall => true,
            caller => {
                (may_be_tail_call() && PENDING.get_ptr(&key).is_some())
                    || (caller == Caller::BySp && called_by_allocator(key.sp))
            }
        };
        if internal {
            count(Counter::InternalCalls, 1);
            return 0;
        }
        count(Counter::FreeCalls, 1);
        // With sampling, most freed blocks were never recorded.
        if !retire(ptr, u64::MAX) && sample_mean() == 0 {
            count(Counter::FreeUnknown, 1);
        }
        0
    }

    /// Launch mode: attached to the dynamic loader's `_dl_debug_state`, which it
    /// calls after mapping the program's libraries and before running any of their
    /// initializers. Stopping the child there lets userspace attach to the
    /// allocator it will use before its first allocation.
    #[uprobe]
    pub fn loader_breakpoint(_ctx: ProbeContext) -> u32 {
        if is_target() {
            unsafe {
                bpf_send_signal(19 /* SIGSTOP */)
            };
        }
        0
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
