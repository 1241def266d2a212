//! The target process: attach to a running pid or launch a command, the state
//! kept once the probes are in, and the /proc helpers (exe, cmdline, alive, exec).
use std::{ffi::OsString, path::Path, path::PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use super::{
    Target,
    launch::{self, ChildState, Loading},
    preflight,
};
use crate::escape::Escaped;
use crate::{
    attach::allocator::{self, Allocator, AllocatorError},
    attach::links::Probes,
    kernel::collect::Collector,
    kernel::tables::UnwindTables,
    kernel::{
        maps::{MapSizes, TraceMaps},
        object,
    },
    process::maps::read_maps,
    report::Sampling,
    symbolize::ProcessModules,
    symbolize::python::{self, PythonResolver},
};

/// Everything known about the target once the probes are in.
pub(super) struct Attached {
    pub(super) pid: u32,
    pub(super) comm: String,
    pub(super) exe: Option<String>,
    pub(super) cmdline: Vec<String>,
    pub(super) allocator: Allocator,
    pub(super) probes: Probes,
    pub(super) collector: Collector,
    pub(super) modules: ProcessModules,
    /// Launch mode: we are the parent and reap the child.
    pub(super) launched: bool,
    pub(super) nprobes: usize,
    /// Unwind tables loaded into the kernel for this process.
    pub(super) tables: UnwindTables,
    /// The target's CPython, whose frames the stacks hold.
    pub(super) python: Option<PythonResolver>,
}

impl Attached {
    /// The names of the allocator functions probed, as the user knows them.
    pub(super) fn function_names(&self) -> Vec<String> {
        self.allocator
            .points
            .iter()
            .flat_map(|p| p.names.iter().map(|n| n.to_string()))
            .collect()
    }
}

/// Attaches to `target`: the running process, or the command launched for it.
pub(super) fn attach(
    target: &Target,
    sizes: MapSizes,
    sampling: Sampling,
    keep_native: bool,
) -> Result<Attached> {
    match target {
        Target::Attach(pid) => attach_existing(*pid, sizes, sampling, keep_native),
        Target::Launch(cmd) => launch_new(cmd, sizes, sampling, keep_native),
    }
}

/// Finds the target's CPython and tells the BPF side how to read its
/// frames. Not finding one (or not one memtrace reads) costs the Python
/// frames, not the run; the reason is said on stderr.
fn setup_python(
    maps: &mut TraceMaps,
    pid: u32,
    modules: &ProcessModules,
    keep_native: bool,
) -> Option<PythonResolver> {
    match python::find(modules) {
        python::Found::None => None,
        python::Found::Unsupported { module, why } => {
            eprintln!(
                "memtrace: {}: {}: stacks show no Python frames",
                Escaped(&module),
                Escaped(&why)
            );
            None
        }
        python::Found::Python(interp) => {
            let layout = memtrace_common::PythonLayout {
                keep_native: u32::from(keep_native),
                ..interp.bpf
            };
            if let Err(e) = maps.set_python(layout) {
                eprintln!("memtrace: stacks show no Python frames: {e:#}");
                return None;
            }
            eprintln!(
                "memtrace: Python {} in {}: stacks show Python frames",
                interp.version,
                Escaped(&interp.module)
            );
            Some(PythonResolver::new(pid, *interp))
        }
    }
}

pub(super) fn proc_exe(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| {
            p.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string()
        })
}

fn proc_cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| preflight::parse_stat(&s))
        .is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

/// Test hook: pause between finding the allocator and attaching, so a test can
/// make the target exit in that window.
fn debug_attach_delay() {
    if let Some(delay) = crate::knobs::get().debug_attach_delay {
        std::thread::sleep(delay);
    }
}

/// Whether `pid` replaced its program (exec): the mapping of the allocator
/// memtrace probes is gone. Every address memtrace knows (allocator code,
/// unwind tables, modules) belongs to the old program.
pub(super) fn called_exec(pid: u32, allocator: &Allocator) -> bool {
    match read_maps(pid) {
        Ok(maps) => !maps.iter().any(|m| {
            m.is_exec()
                && m.start == allocator.text_start
                && m.path.as_deref() == Some(allocator.module.as_str())
        }),
        Err(_) => false,
    }
}

/// Loads the unwind tables of every module `pid` maps. Without them the BPF
/// side walks frame pointers, so a failure costs stack quality, not the run.
pub(super) fn load_tables(
    tables: &mut UnwindTables,
    maps: &mut TraceMaps,
    pid: u32,
    modules: &ProcessModules,
) {
    if crate::knobs::get().frame_pointers_only {
        return;
    }
    if let Err(e) = tables.load_process(maps, pid, modules) {
        log::warn!("unwind tables not loaded, stacks will use frame pointers: {e:#}");
    }
}

fn exited_during_attach(pid: u32, e: anyhow::Error) -> anyhow::Error {
    if alive(pid) {
        e
    } else {
        e.context(format!(
            "target process {pid} exited while memtrace was attaching"
        ))
    }
}

fn attach_existing(
    pid: u32,
    sizes: MapSizes,
    sampling: Sampling,
    keep_native: bool,
) -> Result<Attached> {
    let stat = preflight::check_target(pid)?;
    let maps = read_maps(pid).map_err(|e| exited_during_attach(pid, anyhow!(e)))?;
    let modules = ProcessModules::capture(pid).map_err(|e| {
        exited_during_attach(pid, anyhow!(e).context("reading the target's modules"))
    })?;
    let allocator =
        allocator::find_allocator(pid, &maps).map_err(|e| exited_during_attach(pid, anyhow!(e)))?;
    let exe = proc_exe(pid);
    let cmdline = proc_cmdline(pid);
    debug_attach_delay();
    let (programs, mut trace_maps) = object::load(pid, sizes, sampling.mean_bytes())?;
    let mut probes = Probes::new(programs, sampling.mean_bytes() != 0);
    trace_maps.set_allocator_text(&allocator::text_ranges(&allocator, &maps))?;
    let mut tables = UnwindTables::new(memtrace_common::DEFAULT_MAX_UNWIND_ROWS);
    load_tables(&mut tables, &mut trace_maps, pid, &modules);
    let python = setup_python(&mut trace_maps, pid, &modules, keep_native);
    let nprobes = probes
        .attach_allocator(&allocator, pid, &maps, &mut trace_maps)
        .map_err(|e| exited_during_attach(pid, e))?;
    if !alive(pid) {
        bail!("target process {pid} exited while memtrace was attaching");
    }
    Ok(Attached {
        pid,
        comm: stat.comm,
        exe,
        cmdline,
        allocator,
        probes,
        collector: Collector::new(trace_maps),
        modules,
        launched: false,
        nprobes,
        tables,
        python,
    })
}

/// Kills the launched child and reaps it, after a failure to attach to it.
fn kill_child(pid: u32) {
    // SAFETY: our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = launch::wait_child(pid, false);
}

/// Where the one-shot breakpoint that stops a new program goes: the loader's
/// `_dl_debug_state`, or a static executable's entry point.
fn breakpoint(program: &Path, loading: &Loading) -> Result<(PathBuf, u64)> {
    Ok(match loading {
        Loading::Dynamic { interpreter } => (
            interpreter.clone(),
            launch::loader_breakpoint_offset(interpreter)?,
        ),
        Loading::Static { entry_offset } => (program.to_path_buf(), *entry_offset),
    })
}

fn launch_new(
    cmd: &[OsString],
    sizes: MapSizes,
    sampling: Sampling,
    keep_native: bool,
) -> Result<Attached> {
    let program = launch::resolve_command(&cmd[0]).context("cannot launch the command")?;
    let loading = launch::loading(&program)?;
    let (bp_path, bp_offset) = breakpoint(&program, &loading)?;
    let child = launch::spawn_suspended(&program, cmd)?;
    let pid = child.pid;
    let loaded = object::load(pid, sizes, sampling.mean_bytes()).and_then(|(programs, maps)| {
        let mut probes = Probes::new(programs, sampling.mean_bytes() != 0);
        probes.attach_loader_breakpoint(&bp_path, bp_offset, pid)?;
        Ok((probes, maps))
    });
    let (mut probes, mut trace_maps) = match loaded {
        Ok(v) => v,
        Err(e) => {
            child.abandon();
            return Err(e);
        }
    };
    child
        .release()
        .with_context(|| format!("cannot launch {}", program.display()))?;
    let dynamic = matches!(loading, Loading::Dynamic { .. });
    let (allocator, nprobes) =
        attach_at_loader_stops(pid, &program, dynamic, &mut probes, &mut trace_maps)?;
    let modules = probes
        .detach_loader_breakpoint()
        .and_then(|_| ProcessModules::capture(pid).map_err(|e| anyhow!(e)));
    let modules = match modules {
        Ok(m) => m,
        Err(e) => {
            kill_child(pid);
            return Err(e);
        }
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let exe = proc_exe(pid);
    let cmdline = proc_cmdline(pid);
    let mut tables = UnwindTables::new(memtrace_common::DEFAULT_MAX_UNWIND_ROWS);
    load_tables(&mut tables, &mut trace_maps, pid, &modules);
    let python = setup_python(&mut trace_maps, pid, &modules, keep_native);
    launch::continue_child(pid);
    Ok(Attached {
        pid,
        comm,
        exe,
        cmdline,
        allocator,
        probes,
        collector: Collector::new(trace_maps),
        modules,
        launched: true,
        nprobes,
        tables,
        python,
    })
}

/// Follows the released child through its loader stops and attaches the
/// allocator probes; returns with the child stopped at its last stop.
///
/// glibc's loader stops the child twice: before it maps the initial libraries
/// and once they are all mapped. The allocator probes go in at the first stop
/// where the allocator is visible (an executable's own allocator: the first),
/// the modules are captured at the last, when every initial library is mapped.
fn attach_at_loader_stops(
    pid: u32,
    program: &Path,
    dynamic: bool,
    probes: &mut Probes,
    trace_maps: &mut TraceMaps,
) -> Result<(Allocator, usize)> {
    let mut found: Option<(Allocator, usize)> = None;
    let mut stops = 0;
    loop {
        match launch::wait_child(pid, false)? {
            Some(ChildState::Stopped(libc::SIGSTOP)) => {
                stops += 1;
                if found.is_none() {
                    let later_stop = dynamic && stops < 2;
                    found = attach_at_stop(pid, later_stop, probes, trace_maps)?;
                }
                if !dynamic || stops >= 2 {
                    break;
                }
                launch::continue_child(pid);
            }
            Some(ChildState::Stopped(_)) => launch::continue_child(pid),
            Some(state) => bail!(
                "{} ended (exit status {}) before its libraries were loaded: nothing to trace",
                program.display(),
                state.exit_code().unwrap_or(-1)
            ),
            None => {}
        }
    }
    Ok(found.expect("the loop ends only once the allocator is attached"))
}

/// At one loader stop: attaches the allocator probes if the allocator is
/// mapped. Not mapped yet is fine while a `later_stop` is to come; any other
/// failure kills the child.
fn attach_at_stop(
    pid: u32,
    later_stop: bool,
    probes: &mut Probes,
    trace_maps: &mut TraceMaps,
) -> Result<Option<(Allocator, usize)>> {
    let maps = read_maps(pid)?;
    match allocator::find_allocator(pid, &maps) {
        Ok(a) => {
            debug_attach_delay();
            let text = allocator::text_ranges(&a, &maps);
            let attached = trace_maps
                .set_allocator_text(&text)
                .and_then(|_| probes.attach_allocator(&a, pid, &maps, trace_maps));
            match attached {
                Ok(n) => Ok(Some((a, n))),
                Err(e) => {
                    kill_child(pid);
                    Err(e)
                }
            }
        }
        Err(AllocatorError::NotFound { .. }) if later_stop => Ok(None),
        Err(e) => {
            kill_child(pid);
            Err(e.into())
        }
    }
}
