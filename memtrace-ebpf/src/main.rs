//! memtrace's kernel side: uprobes on the target's allocator that keep every
//! outstanding block, and the stack that allocated it, in BPF maps.
//!
//! **Programs, by hook family.** An allocating call is seen in one of three
//! ways, chosen by userspace: classic probes (`classic`: one entry uprobe per
//! allocating function, `malloc_enter` … `pvalloc_enter`, and the shared
//! return probe `alloc_return`); a uprobe session (`session`:
//! `alloc_session` runs at the entry and at the return of every allocating
//! function through one uprobe_multi link); or result sites
//! (`result_site`: `alloc_result` runs inside an allocating function where
//! its outcome is already known, one trap per call). `free_enter` (`free`)
//! retires blocks and, on the allocator's own call sites, leaves call marks
//! (see `marks`); `loader_breakpoint` (`loader`) stops a launched child at
//! the dynamic loader's breakpoint so that userspace can attach first. The
//! tracepoints `unmap_munmap`, `unmap_mmap` and `unmap_mremap` (`unmaps`)
//! watch the target unmap code: each time, a new code generation, which
//! stacks are stored with (and keyed by, for frames in the code unmapped).
//!
//! **How an allocation flows.** The entry (`call::enter`) drops the
//! allocator's own calls and tail calls (`marks`), draws the sampling
//! decision (`sampling`) and keeps the call, by thread and stack pointer, in
//! `PENDING` (or in the session's cookie when only its size is needed). The
//! return (`call::exit`) takes the call back, works out the block (the
//! return value, posix_memalign's out pointer, realloc's old block retired),
//! and `record::record_alloc` walks the stack into `STACKS`, enters the block
//! in the block table `ALLOC_KEYS`/`ALLOCS` (`blocks`: address → size, stack,
//! time) and adds it to its site's aggregate for its birth epoch in `SITES`
//! (`sites`). A result site goes straight to `record_alloc` with the size it
//! reads (or captured earlier in `CAPTURES`). `free_enter` finds the block
//! by address, clears its slot and takes it out of its aggregate. Every event
//! that cannot be recorded is counted in `COUNTERS` (`counters`).
//!
//! **The stack walk** (`walk`) uses the unwind rows userspace compiled from
//! each module's `.eh_frame` (`UNWIND_ROWS`, indexed by code page in
//! `PC_PAGES`), one frame per `bpf_loop` iteration (`walk::step`), falling
//! back to the frame pointer where a pc has no row; a process without
//! tables is walked by `bpf_get_stack`. The first 1 KiB of stack is read in
//! one go (`STACK_WINDOW`); a walk that read only that window is remembered
//! in `WALK_CACHE` (`walk::cache`) and repeated by checking the words it
//! depended on. Stacks are stored once, by hash (`walk::store`).
//!
//! **Sampling** (`--sample-bytes`, `SAMPLE_MEAN_BYTES` != 0) is
//! byte-weighted: each thread counts down the bytes to its next sample point
//! (`COUNTDOWN`), drawn from an exponential distribution with the help of
//! the `SAMPLE_LOG2` table; unsampled calls skip their return where they can.
//!
//! Every map, program and global, with who writes and reads it: docs/bpf.md.
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
mod atomic;
#[cfg(target_arch = "bpf")]
mod blocks;
#[cfg(target_arch = "bpf")]
mod call;
#[cfg(target_arch = "bpf")]
mod classic;
#[cfg(target_arch = "bpf")]
mod counters;
#[cfg(target_arch = "bpf")]
mod free;
#[cfg(target_arch = "bpf")]
mod globals;
#[cfg(target_arch = "bpf")]
mod images;
#[cfg(target_arch = "bpf")]
mod loader;
#[cfg(target_arch = "bpf")]
mod mappings;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod marks;
#[cfg(target_arch = "bpf")]
mod record;
#[cfg(target_arch = "bpf")]
mod resources;
#[cfg(target_arch = "bpf")]
mod result_site;
#[cfg(target_arch = "bpf")]
mod sampling;
#[cfg(target_arch = "bpf")]
mod session;
#[cfg(target_arch = "bpf")]
mod sites;
#[cfg(target_arch = "bpf")]
mod target;
#[cfg(target_arch = "bpf")]
mod threads;
#[cfg(target_arch = "bpf")]
mod unmaps;
#[cfg(target_arch = "bpf")]
mod uretprobe;
#[cfg(target_arch = "bpf")]
mod walk;

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
