//! Thread tracing's probes (the BPF object's `threads`): tracepoints at the
//! exits of clone and clone3 and at the entry of exit, which run for every
//! caller on the host and return at once unless it is the target, and
//! uprobes bound to the target at the pthread calls that tell whether an
//! exited thread was joined or detached (rare calls: nothing on the
//! malloc/free path).
use std::path::PathBuf;

use anyhow::Result;
use aya::Ebpf;
use memtrace_common::threads::CREATE_SYSCALLS;

use crate::process::maps::MapEntry;

/// Loads the thread tracepoints and attaches them; returns how many.
///
/// `thread_newtask` goes first: it gives `thread_created` the new thread's
/// host id where clone returns another (a target in a pid namespace).
pub fn attach_tracepoints(ebpf: &mut Ebpf) -> Result<usize> {
    let newtask = std::iter::once(("thread_newtask", "task", "task_newtask".to_string()));
    let creates = CREATE_SYSCALLS
        .iter()
        .map(|s| ("thread_created", "syscalls", format!("sys_exit_{s}")));
    let exit = std::iter::once(("thread_exit", "syscalls", "sys_enter_exit".to_string()));
    super::fds::attach_tracepoints(ebpf, newtask.chain(creates).chain(exit))
}

/// The file the target's pthread functions are in: glibc's libc (2.34 on),
/// or an older glibc's libpthread, as the target maps it; or why its
/// functions cannot be probed.
pub fn pthread_module(pid: u32, maps: &[MapEntry]) -> Result<PathBuf, String> {
    let named = |prefix: &str| {
        maps.iter().find(|m| {
            m.is_exec()
                && m.path
                    .as_deref()
                    .and_then(|p| p.rsplit('/').next())
                    .is_some_and(|f| f.starts_with(prefix))
        })
    };
    let m = named("libpthread.so")
        .or_else(|| named("libc.so"))
        .ok_or("the target maps no libc or libpthread")?;
    if !super::allocator::probeable(pid, m) {
        return Err(format!(
            "{} is {}",
            m.path.as_deref().unwrap_or("?"),
            super::allocator::ON_FUSE
        ));
    }
    Ok(super::allocator::open_path(pid, m))
}
