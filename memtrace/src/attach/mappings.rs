//! The mapping tracepoints (the BPF object's `mappings`): one program at the
//! exits of mmap, munmap and mremap, attached with the fd tracepoints.
use anyhow::Result;
use aya::Ebpf;
use memtrace_common::mappings::MAP_SYSCALLS;

/// Loads the mapping program and attaches it; returns the tracepoints attached.
pub fn attach(ebpf: &mut Ebpf) -> Result<usize> {
    let exits = MAP_SYSCALLS
        .iter()
        .map(|s| ("map_exit", "syscalls", format!("sys_exit_{s}")));
    super::fds::attach_tracepoints(ebpf, exits)
}
