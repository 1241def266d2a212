//! Launch mode: stops the child at the dynamic loader's breakpoint.

use crate::target::is_target;
use aya_ebpf::{helpers::bpf_send_signal, macros::uprobe, programs::ProbeContext};

/// Launch mode: attached to the dynamic loader's `_dl_debug_state`, which it
/// calls after mapping the program's libraries and before running any of their
/// initializers. Stopping the child there lets userspace attach to the
/// allocator it will use before its first allocation.
#[uprobe]
pub fn loader_breakpoint(_ctx: ProbeContext) -> u32 {
    if is_target() {
        // SAFETY: bpf_send_signal only signals the current task, the target's (checked just
        // above).
        unsafe {
            bpf_send_signal(19 /* SIGSTOP */)
        };
    }
    0
}
