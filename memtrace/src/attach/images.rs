//! The tracepoints that watch the target's program and children (the BPF
//! object's `images`): its exec, and the processes it creates. Tracepoints
//! cannot be bound to a process: they run for every task on the host and
//! return at once unless it is the target's.
use anyhow::{Context, Result, anyhow};
use aya::{Ebpf, programs::TracePoint};

/// Each program and its tracepoint.
const IMAGE_WATCH: [(&str, &str, &str); 2] = [
    ("image_exec", "sched", "sched_process_exec"),
    ("image_fork", "task", "task_newtask"),
];

/// Loads the programs and attaches them.
pub fn attach(ebpf: &mut Ebpf) -> Result<()> {
    for (name, category, event) in IMAGE_WATCH {
        let prog: &mut TracePoint = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        prog.load().map_err(|e| anyhow!(e)).with_context(|| {
            format!("the kernel refused BPF program {name} (verifier or permissions)")
        })?;
        prog.attach(category, event)
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("attaching {name} to {category}:{event}"))?;
    }
    Ok(())
}

/// The syscalls whose exit a new process first returns through.
const FORK_EXITS: [&str; 4] = [
    "sys_exit_clone",
    "sys_exit_clone3",
    "sys_exit_fork",
    "sys_exit_vfork",
];

/// `--follow-forks`: loads `fork_child`, which stops each new child of the
/// target before its first instruction, and attaches it to the exit of
/// every syscall that creates a process.
pub fn attach_fork_stop(ebpf: &mut Ebpf) -> Result<()> {
    let prog: &mut TracePoint = ebpf
        .program_mut("fork_child")
        .context("no program fork_child")?
        .try_into()?;
    prog.load()
        .map_err(|e| anyhow!(e))
        .context("the kernel refused BPF program fork_child (verifier or permissions)")?;
    for event in FORK_EXITS {
        prog.attach("syscalls", event)
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("attaching fork_child to syscalls:{event}"))?;
    }
    Ok(())
}
