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
mod loader;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod marks;
#[cfg(target_arch = "bpf")]
mod record;
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
