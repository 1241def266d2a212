//! memtrace's kernel side: uprobes on the target's allocator entry points.
//!
//! Entry probes remember each call in `PENDING` (keyed by thread and stack
//! pointer, so nested and recursive calls on one thread do not clobber each
//! other); the shared return probe turns a successful call into an entry of
//! `ALLOCS` (address → size, stack, time) and updates the per-stack aggregate in
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
    use core::intrinsics::{AtomicOrdering, atomic_xadd};

    use aya_ebpf::{
        EbpfContext,
        bindings::{BPF_ANY, BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST},
        helpers::{
            bpf_get_current_pid_tgid, bpf_get_stack, bpf_ktime_get_ns, bpf_probe_read_user,
            bpf_send_signal,
        },
        macros::{map, uprobe, uretprobe},
        maps::{Array, HashMap, PerCpuArray},
        programs::{ProbeContext, RetProbeContext},
    };
    use memtrace_common::{
        AllocKind, Allocation, Counter, DEFAULT_MAX_OUTSTANDING, DEFAULT_MAX_PENDING,
        DEFAULT_MAX_STACKS, MAX_ALLOCATOR_FUNCTIONS, MAX_STACK_DEPTH, NO_STACK, NUM_COUNTERS,
        PendingCall, PendingKey, SiteStats, StackTrace, TextRange,
    };

    /// Process being traced (set by userspace before load). The probes are
    /// attached bound to this pid already; the check guards against anything
    /// else that shares the mapped file's inode reaching our programs.
    #[unsafe(no_mangle)]
    static TARGET_TGID: u32 = 0;

    #[map]
    static ALLOCS: HashMap<u64, Allocation> =
        HashMap::with_max_entries(DEFAULT_MAX_OUTSTANDING, BPF_F_NO_PREALLOC);

    #[map]
    static SITES: HashMap<u64, SiteStats> =
        HashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

    #[map]
    static STACKS: HashMap<u64, StackTrace> =
        HashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

    #[map]
    static PENDING: HashMap<PendingKey, PendingCall> =
        HashMap::with_max_entries(DEFAULT_MAX_PENDING, 0);

    #[map]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

    #[map]
    static ALLOCATOR_TEXT: Array<TextRange> = Array::with_max_entries(MAX_ALLOCATOR_FUNCTIONS, 0);

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
    fn is_target() -> bool {
        let tgid = unsafe { core::ptr::read_volatile(&TARGET_TGID) };
        (bpf_get_current_pid_tgid() >> 32) as u32 == tgid
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

    #[inline(always)]
    fn capture_stack<C: EbpfContext>(ctx: &C) -> u64 {
        let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
            count(Counter::StackReadErrors, 1);
            return NO_STACK;
        };
        let scratch = unsafe { &mut *scratch };
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
        let len = (n as u64 / 8).min(MAX_STACK_DEPTH as u64);
        scratch.len = len;
        let mut h: u64 = 0x6d65_6d74_7261_6365 ^ len;
        let mut i = 0usize;
        while i < MAX_STACK_DEPTH && (i as u64) < len {
            h = mix(h, scratch.frames[i]);
            i += 1;
        }
        if h == NO_STACK {
            h = 1;
        }
        match unsafe { STACKS.get(&h) } {
            Some(existing) => {
                if existing.len != len {
                    count(Counter::StackHashCollisions, 1);
                    return NO_STACK;
                }
                let mut i = 0usize;
                while i < MAX_STACK_DEPTH && (i as u64) < len {
                    if existing.frames[i] != scratch.frames[i] {
                        count(Counter::StackHashCollisions, 1);
                        return NO_STACK;
                    }
                    i += 1;
                }
                h
            }
            None => match STACKS.insert(&h, &*scratch, BPF_NOEXIST as u64) {
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

    // ---- bookkeeping -------------------------------------------------------

    #[inline(always)]
    unsafe fn add<T: Copy>(dst: *mut T, v: T) {
        unsafe { atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(dst, v) };
    }

    #[inline(always)]
    fn site_add(stack_id: u64, size: u64) -> bool {
        let mut site = SITES.get_ptr_mut(&stack_id);
        if site.is_none() {
            let zero = SiteStats::default();
            match SITES.insert(&stack_id, &zero, BPF_NOEXIST as u64) {
                Ok(()) => {}
                Err(e) if e == -17 => {}
                Err(_) => return false,
            }
            site = SITES.get_ptr_mut(&stack_id);
        }
        let Some(site) = site else { return false };
        unsafe {
            add(&raw mut (*site).outstanding_blocks, 1);
            add(&raw mut (*site).outstanding_bytes, size as i64);
            add(&raw mut (*site).alloc_calls, 1);
            add(&raw mut (*site).alloc_bytes, size);
        }
        true
    }

    #[inline(always)]
    fn site_sub(stack_id: u64, size: u64) {
        if let Some(site) = SITES.get_ptr_mut(&stack_id) {
            unsafe {
                add(&raw mut (*site).outstanding_blocks, -1);
                add(&raw mut (*site).outstanding_bytes, -(size as i64));
            }
        }
    }

    /// Retires the outstanding block at `ptr`. `not_after_ns` protects realloc:
    /// between realloc's entry and its return probe another thread may already
    /// have been handed the old address by malloc; that newer block is kept.
    #[inline(always)]
    fn retire(ptr: u64, not_after_ns: u64) -> bool {
        let Some(a) = (unsafe { ALLOCS.get(&ptr) }) else {
            return false;
        };
        if a.timestamp_ns > not_after_ns {
            return false;
        }
        let (size, stack_id) = (a.size, a.stack_id);
        if ALLOCS.remove(&ptr).is_ok() {
            site_sub(stack_id, size);
        }
        true
    }

    #[inline(always)]
    fn record_alloc<C: EbpfContext>(ctx: &C, ptr: u64, size: u64) {
        let now = unsafe { bpf_ktime_get_ns() };
        // An address still outstanding means its free was not seen: retire it so
        // its bytes are not counted twice.
        if retire(ptr, u64::MAX) {
            count(Counter::AddressReused, 1);
        }
        let stack_id = capture_stack(ctx);
        let a = Allocation {
            size,
            stack_id,
            timestamp_ns: now,
        };
        if ALLOCS.insert(&ptr, &a, BPF_ANY as u64).is_err() {
            count(Counter::DroppedAllocMapFull, 1);
            return;
        }
        if !site_add(stack_id, size) {
            let _ = ALLOCS.remove(&ptr);
            count(Counter::DroppedSiteMapFull, 1);
            return;
        }
        count(Counter::AllocCalls, 1);
        count(Counter::AllocBytes, size);
    }

    /// Whether the call being entered was made from inside a probed allocator
    /// function: its return address (at [sp] on entry) is in one of their ranges.
    #[inline(always)]
    fn called_by_allocator(sp: u64) -> bool {
        let Ok(ret) = (unsafe { bpf_probe_read_user(sp as *const u64) }) else {
            return false;
        };
        let mut i = 0;
        while i < MAX_ALLOCATOR_FUNCTIONS {
            match ALLOCATOR_TEXT.get(i) {
                Some(r) if r.end != 0 => {
                    if ret >= r.start && ret < r.end {
                        return true;
                    }
                }
                _ => return false,
            }
            i += 1;
        }
        false
    }

    #[inline(always)]
    fn enter(ctx: &ProbeContext, kind: AllocKind, size: u64, old_ptr: u64, out_ptr: u64) -> u32 {
        if !is_target() {
            return 0;
        }
        let key = PendingKey {
            tid: bpf_get_current_pid_tgid() as u32,
            _pad: 0,
            sp: regs_sp(ctx),
        };
        if let Some(p) = PENDING.get_ptr_mut(&key) {
            // A tail call from one allocator entry point into another (same stack
            // pointer, the first call not returned): one call, two probe pairs.
            unsafe { (*p).refs += 1 };
            return 0;
        }
        if called_by_allocator(key.sp) {
            count(Counter::InternalCalls, 1);
            return 0;
        }
        let call = PendingCall {
            kind: kind as u32,
            refs: 1,
            size,
            old_ptr,
            out_ptr,
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
        };
        if PENDING.insert(&key, &call, BPF_ANY as u64).is_err() {
            count(Counter::DroppedPendingFull, 1);
        }
        0
    }

    #[inline(always)]
    fn arg(ctx: &ProbeContext, n: usize) -> u64 {
        ctx.arg::<u64>(n).unwrap_or(0)
    }

    #[uprobe]
    pub fn malloc_enter(ctx: ProbeContext) -> u32 {
        enter(&ctx, AllocKind::Malloc, arg(&ctx, 0), 0, 0)
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

    #[uprobe]
    pub fn calloc_enter(ctx: ProbeContext) -> u32 {
        let size = array_size(arg(&ctx, 0), arg(&ctx, 1));
        enter(&ctx, AllocKind::Calloc, size, 0, 0)
    }

    #[uprobe]
    pub fn realloc_enter(ctx: ProbeContext) -> u32 {
        enter(&ctx, AllocKind::Realloc, arg(&ctx, 1), arg(&ctx, 0), 0)
    }

    #[uprobe]
    pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
        let size = array_size(arg(&ctx, 1), arg(&ctx, 2));
        enter(&ctx, AllocKind::ReallocArray, size, arg(&ctx, 0), 0)
    }

    #[uprobe]
    pub fn memalign_enter(ctx: ProbeContext) -> u32 {
        enter(&ctx, AllocKind::Memalign, arg(&ctx, 1), 0, 0)
    }

    #[uprobe]
    pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
        enter(
            &ctx,
            AllocKind::PosixMemalign,
            arg(&ctx, 2),
            0,
            arg(&ctx, 0),
        )
    }

    #[uprobe]
    pub fn valloc_enter(ctx: ProbeContext) -> u32 {
        enter(&ctx, AllocKind::Valloc, arg(&ctx, 0), 0, 0)
    }

    #[uprobe]
    pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
        enter(&ctx, AllocKind::Pvalloc, arg(&ctx, 0), 0, 0)
    }

    /// Return probe shared by every allocating entry point.
    #[uretprobe]
    pub fn alloc_return(ctx: RetProbeContext) -> u32 {
        if !is_target() {
            return 0;
        }
        // The return popped the return address: the entry saw sp - 8.
        let key = PendingKey {
            tid: bpf_get_current_pid_tgid() as u32,
            _pad: 0,
            sp: regs_sp(&ctx).wrapping_sub(8),
        };
        let Some(p) = PENDING.get_ptr_mut(&key) else {
            count(Counter::UnmatchedReturns, 1);
            return 0;
        };
        let call = unsafe {
            if (*p).refs > 1 {
                (*p).refs -= 1;
                return 0;
            }
            *p
        };
        let _ = PENDING.remove(&key);
        let ret: u64 = ctx.ret();
        match AllocKind::from_u32(call.kind) {
            Some(AllocKind::PosixMemalign) => {
                if ret as u32 != 0 {
                    count(Counter::FailedAllocs, 1);
                    return 0;
                }
                let ptr = match unsafe { bpf_probe_read_user(call.out_ptr as *const u64) } {
                    Ok(ptr) => ptr,
                    Err(_) => {
                        count(Counter::OutPointerReadErrors, 1);
                        return 0;
                    }
                };
                record_alloc(&ctx, ptr, call.size);
            }
            Some(AllocKind::Realloc | AllocKind::ReallocArray) => {
                if ret == 0 {
                    if call.old_ptr != 0 && call.size == 0 {
                        // realloc(p, 0): glibc frees p and returns NULL.
                        count(Counter::FreeCalls, 1);
                        if !retire(call.old_ptr, call.timestamp_ns) {
                            count(Counter::FreeUnknown, 1);
                        }
                    } else {
                        // Failure: the old block is untouched.
                        count(Counter::FailedAllocs, 1);
                    }
                    return 0;
                }
                if call.old_ptr != 0 {
                    count(Counter::FreeCalls, 1);
                    if !retire(call.old_ptr, call.timestamp_ns) {
                        count(Counter::FreeUnknown, 1);
                    }
                }
                record_alloc(&ctx, ret, call.size);
            }
            Some(_) => {
                if ret == 0 {
                    count(Counter::FailedAllocs, 1);
                    return 0;
                }
                record_alloc(&ctx, ret, call.size);
            }
            None => {}
        }
        0
    }

    #[uprobe]
    pub fn free_enter(ctx: ProbeContext) -> u32 {
        if !is_target() {
            return 0;
        }
        let ptr = arg(&ctx, 0);
        if ptr == 0 {
            return 0;
        }
        let key = PendingKey {
            tid: bpf_get_current_pid_tgid() as u32,
            _pad: 0,
            sp: regs_sp(&ctx),
        };
        // A free made by the allocator (glibc's realloc(p, 0) frees p): the
        // return probe of the outer call accounts for it.
        if PENDING.get_ptr(&key).is_some() || called_by_allocator(key.sp) {
            count(Counter::InternalCalls, 1);
            return 0;
        }
        count(Counter::FreeCalls, 1);
        if !retire(ptr, u64::MAX) {
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
