//! What memtrace reads from the running kernel's BTF before it loads its
//! programs: where `vm_flags` is in a mapping (the watch on code unmapped,
//! `unmaps`) and where a pending return probe keeps the return address it
//! replaced (`uprobe_offsets`). The BTF is parsed once, on a thread of its
//! own started with the attach ([`read_ahead`]), so that the parse overlaps
//! reading the target instead of delaying the maps.
use std::{path::Path, sync::OnceLock};

use btf_rs::{Backend, Btf};
use memtrace_common::UprobeOffsets;

use super::{unmaps, uprobe_offsets};

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The facts, or their defaults (0: not known) where the BTF lacks them.
#[derive(Debug, Default)]
pub struct KernelFacts {
    pub vma_flags_offset: u32,
    pub uprobe_offsets: UprobeOffsets,
}

static FACTS: OnceLock<KernelFacts> = OnceLock::new();

/// Starts reading the facts on a thread of its own (at most once; [`get`]
/// then waits for that read rather than making its own).
pub fn read_ahead() {
    if FACTS.get().is_none() {
        let _ = std::thread::Builder::new()
            .name("kernel-btf".into())
            .spawn(get);
    }
}

/// The facts, read now if [`read_ahead`] did not.
pub fn get() -> &'static KernelFacts {
    FACTS.get_or_init(read)
}

fn read() -> KernelFacts {
    let btf = match Btf::from_file_with_backend(Path::new(VMLINUX_BTF), Backend::Mmap) {
        Ok(btf) => btf,
        Err(e) => {
            log::warn!(
                "the kernel's BTF is not readable ({e}): every unmapping counts as one of \
                 code, and stacks through another tool's pending return probe stop there"
            );
            return KernelFacts::default();
        }
    };
    KernelFacts {
        vma_flags_offset: unmaps::vma_flags_offset(&btf).unwrap_or_else(|e| {
            log::info!("every unmapping counts as one of code: {e:#}");
            0
        }),
        uprobe_offsets: uprobe_offsets::offsets(&btf).unwrap_or_else(|e| {
            log::warn!(
                "the kernel's uprobe structures are not known ({e:#}): stacks through a \
                 pending return probe (another tool's uretprobe) will stop there"
            );
            UprobeOffsets::default()
        }),
    }
}
