//! The target check, the probe context's registers and reads of the
//! target's memory.

use crate::globals::target_tgid;
use crate::maps::TRACE_STATE;
use aya_ebpf::{EbpfContext, helpers::bpf_get_current_pid_tgid, helpers::bpf_probe_read_user};

/// Whether the current task is the target's. Every program checks this
/// first, so past it the current tgid is `target_tgid()`.
#[inline(always)]
pub(crate) fn is_target() -> bool {
    target_thread().is_some()
}

/// The current thread's id, if it is one of the target's and tracing has
/// not ended.
#[inline(always)]
pub(crate) fn target_thread() -> Option<u32> {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32 == target_tgid() && !tracing_ended()).then_some(id as u32)
}

/// Whether the current task is the target's, tracing ended or not: for
/// what the target's exec itself does, at the tracepoint where
/// `image_exec` ends tracing (the order in which programs of one
/// tracepoint run is not theirs to choose).
#[inline(always)]
pub(crate) fn is_target_process() -> bool {
    (bpf_get_current_pid_tgid() >> 32) as u32 == target_tgid()
}

/// Whether tracing has ended: userspace sets it before it removes the
/// probes, which takes a while (an RCU grace period per link), so that
/// what the target does meanwhile is not half counted (frees whose
/// allocations are no longer seen, say).
#[inline(always)]
fn tracing_ended() -> bool {
    match TRACE_STATE.get(0) {
        // SAFETY: an aligned u32 of an array map's element, valid for the program's run;
        // volatile, as userspace changes it.
        Some(s) => (unsafe { core::ptr::read_volatile(&s.ended) }) != 0,
        None => false,
    }
}

#[inline(always)]
pub(crate) fn regs_sp<C: EbpfContext>(ctx: &C) -> u64 {
    let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
    // SAFETY: the context is the kernel's pt_regs of this probe hit, readable for the program's
    // run.
    unsafe { (*regs).rsp }
}

/// Reads two consecutive u64s of the target's memory.
#[inline(always)]
pub(crate) fn read_user_pair(addr: u64) -> Option<[u64; 2]> {
    // SAFETY: bpf_probe_read_user is fault-tolerant: a bad user address gives an error, not a
    // fault.
    unsafe { bpf_probe_read_user(addr as *const [u64; 2]) }.ok()
}

/// Reads one u64 of the target's memory.
#[inline(always)]
pub(crate) fn read_user(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user is fault-tolerant: a bad user address gives an error, not a
    // fault.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

#[inline(always)]
pub(crate) fn regs_ret<C: EbpfContext>(ctx: &C) -> u64 {
    let regs = ctx.as_ptr() as *const aya_ebpf::bindings::pt_regs;
    // SAFETY: the context is the kernel's pt_regs of this probe hit, readable for the program's
    // run.
    unsafe { (*regs).rax }
}
