//! The fd tracepoints (the BPF object's `resources`): one program at the
//! exit of every syscall that creates or releases an fd, and one at exec. Tracepoints cannot be bound to a process: they run
//! for every caller on the host and return at once unless it is the target.
use anyhow::{Context, Result, anyhow};
use aya::{Ebpf, programs::TracePoint};
use memtrace_common::resources::FD_SYSCALLS;

/// Loads the fd programs and attaches them; returns the tracepoints attached.
pub fn attach(ebpf: &mut Ebpf) -> Result<usize> {
    let exits = FD_SYSCALLS
        .iter()
        .map(|s| ("fd_exit", "syscalls", format!("sys_exit_{s}")));
    let exec = std::iter::once(("fd_exec", "sched", "sched_process_exec".to_string()));
    attach_tracepoints(ebpf, exits.chain(exec))
}

/// Loads each (program, category, event) once and attaches it there;
/// returns the tracepoints attached.
pub(super) fn attach_tracepoints(
    ebpf: &mut Ebpf,
    points: impl Iterator<Item = (&'static str, &'static str, String)>,
) -> Result<usize> {
    let mut n = 0;
    for (name, category, event) in points {
        let prog: &mut TracePoint = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        if prog.fd().is_err() {
            let started = std::time::Instant::now();
            prog.load().map_err(|e| anyhow!(e)).with_context(|| {
                format!("the kernel refused BPF program {name} (verifier or permissions)")
            })?;
            log::debug!(
                "BPF program {name} verified in {:?}: processed {} insns",
                started.elapsed(),
                prog.info()
                    .ok()
                    .and_then(|i| i.verified_instruction_count())
                    .map_or_else(|| "?".to_string(), |n| n.to_string())
            );
        }
        prog.attach(category, &event)
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("attaching {name} to {category}:{event}"))?;
        n += 1;
    }
    Ok(n)
}
