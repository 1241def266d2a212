//! The target process: attach to a running pid or launch a command, the state
//! kept once the probes are in, and the /proc helpers (exe, cmdline, alive, exec).
use std::{collections::HashMap, ffi::OsString, path::Path, path::PathBuf, sync::Arc};

use anyhow::{Context, Result, anyhow, bail};

use super::{
    Options, Target,
    launch::{self, ChildState, Loading},
    preflight, preload_debug_info,
};
use crate::escape::Escaped;
use crate::{
    attach::allocator::{self, Allocators},
    attach::links::Probes,
    attach::pymalloc,
    attach::resolve::UntracedEntry,
    kernel::collect::Collector,
    kernel::tables::{FileKey, ModuleUnwind, UnwindTables},
    kernel::{btf_facts, maps::TraceMaps, object},
    process::maps::read_maps,
    process::modules::Generation,
    process::namespaces::{self, Namespaces},
    process::open::{Links, Root},
    steps::Steps,
    symbolize::python::{self, PythonResolver},
    symbolize::{ProcessModules, Symbolizer},
};

/// Everything known about the target once the probes are in.
pub(super) struct Attached {
    pub(super) pid: u32,
    pub(super) comm: String,
    pub(super) exe: Option<String>,
    pub(super) cmdline: Vec<String>,
    /// Its pid in its own namespace, the namespaces it does not share.
    pub(super) namespaces: Namespaces,
    pub(super) allocators: Allocators,
    pub(super) probes: Probes,
    pub(super) collector: Collector,
    pub(super) modules: ProcessModules,
    /// Launch mode: we are the parent and reap the child.
    pub(super) launched: bool,
    pub(super) nprobes: usize,
    /// Unwind tables loaded into the kernel for this process.
    pub(super) tables: UnwindTables,
    /// The code unmapped while traced is in `modules` up to this generation.
    pub(super) unmaps_read: Generation,
    /// The target's CPython, whose frames the stacks hold.
    pub(super) python: Option<PythonResolver>,
    /// The fd tracepoints attached (0: fds are not traced).
    pub(super) fd_tracepoints: usize,
    /// The target's fds once the fd tracepoints were in, before it ran on:
    /// those not traced existed at attach.
    pub(super) fds_at_attach: FdsAtAttach,
    /// The thread probes attached (0: threads are not traced).
    pub(super) thread_probes: usize,
    /// The target's threads once the thread probes were in, before it ran on.
    pub(super) threads_at_attach: super::threads::ThreadsAtAttachRead,
    /// Whether the BPF side watches the target's exec (and says when it
    /// happens, `images.rs`).
    pub(super) exec_watched: bool,
}

/// The target's fds (`/proc/PID/fd` links) and the traced ones, when fd
/// tracing began, and when that was (CLOCK_MONOTONIC ns).
#[derive(Default)]
pub(super) struct FdsAtAttach {
    pub(super) links: std::collections::BTreeMap<u32, String>,
    pub(super) traced: Vec<crate::kernel::resources::TracedFd>,
    pub(super) at_ns: u64,
}

impl FdsAtAttach {
    fn read(pid: u32, maps: &TraceMaps, fd_tracepoints: usize) -> Self {
        if fd_tracepoints == 0 {
            return Self::default();
        }
        FdsAtAttach {
            links: crate::process::fds::fd_links(pid).unwrap_or_default(),
            traced: maps.fds.open_fds().unwrap_or_default(),
            at_ns: crate::kernel::collect::monotonic_ns(),
        }
    }
}

/// Starts tracing threads (`resources`), with the target's mappings (the
/// pthread functions are probed in its libc), before it runs on; a failure
/// costs the threads part of the report, not the run. Returns the probes
/// attached and the threads running then.
fn trace_threads(
    probes: &mut Probes,
    resources: bool,
    pid: u32,
    maps: &[crate::process::maps::MapEntry],
    steps: &Arc<Steps>,
) -> (usize, super::threads::ThreadsAtAttachRead) {
    let none = (0, Default::default());
    if !resources {
        return none;
    }
    let module = match crate::attach::threads::pthread_module(pid, maps) {
        Ok(module) => module,
        Err(why) => {
            eprintln!(
                "memtrace: warning: threads are not traced: {}",
                Escaped(&why)
            );
            return none;
        }
    };
    match steps.time("thread_probes", "attaching thread probes", || {
        probes.attach_thread_tracing(&module, pid)
    }) {
        Ok(n) => (
            n,
            super::threads::ThreadsAtAttachRead {
                names: super::threads::task_names(pid).unwrap_or_default(),
                at_ns: crate::kernel::collect::monotonic_ns(),
            },
        ),
        Err(e) => {
            eprintln!("memtrace: warning: threads are not traced: {e:#}");
            none
        }
    }
}

/// Starts tracing fds (`resources`), before the program runs on in launch
/// mode; a failure costs the resources part of the report, not the run.
fn trace_fds(probes: &mut Probes, resources: bool, steps: &Arc<Steps>) -> usize {
    if !resources {
        return 0;
    }
    match steps.time("fd_tracepoints", "attaching fd tracepoints", || {
        probes.attach_fd_tracing()
    }) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("memtrace: warning: file descriptors are not traced: {e:#}");
            0
        }
    }
}

impl Attached {
    /// The names of the allocator functions probed, as the user knows them.
    pub(super) fn function_names(&self) -> Vec<String> {
        self.allocators
            .points()
            .flat_map(|(_, p)| p.names.iter().cloned())
            .collect()
    }

    /// Takes the code the target unmapped since the last look into its
    /// modules' timeline (for the stacks to be resolved in the code of their
    /// time; a log that cannot be read leaves them as they are).
    pub(super) fn note_unmaps(&mut self) {
        match self.collector.maps.code_unmaps(self.unmaps_read) {
            Ok(log) => {
                if !log.unmapped.is_empty() {
                    log::debug!(
                        "{} code unmappings, through generation {}",
                        log.unmapped.len(),
                        log.through
                    );
                }
                self.modules.note_unmapped(log.unmapped, log.through);
                self.unmaps_read = log.through;
            }
            Err(e) => log::warn!("reading the code unmapped: {e:#}"),
        }
    }
}

/// Watches the target's exec and the processes it creates (`images`);
/// `stop_at_exec`: stop it at its exec, for memtrace to attach to the new
/// program before it runs (launch mode, following execs); `follow_forks`:
/// stop each child before it runs, for memtrace to attach to it first. A
/// failure costs following execs and children, not the run.
fn watch_images(
    probes: &mut Probes,
    maps: &mut TraceMaps,
    stop_at_exec: bool,
    follow_forks: bool,
) -> bool {
    let watched = probes.attach_image_watch().and_then(|()| {
        if stop_at_exec {
            maps.stop_at_exec()?;
        }
        if follow_forks {
            probes.attach_fork_stop()?;
            maps.follow_forks()?;
        }
        Ok(())
    });
    match watched {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "memtrace: warning: the target's exec and children are not watched ({e:#}): \
                 an exec ends tracing once seen, children are not counted"
            );
            false
        }
    }
}

/// Starts the watch on code the target unmaps; without it a stack in a library
/// unloaded and replaced is left unresolved (`module_ambiguous`).
fn watch_unmaps(probes: &mut Probes) {
    if let Err(e) = probes.attach_unmap_watch() {
        log::warn!(
            "code the target unmaps is not watched ({e:#}): frames in a library \
             replaced by another at its address are left unresolved"
        );
    }
}

/// What the user asked of a Python target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonOptions {
    /// Keep the interpreter's native frames between Python frames
    /// (`--python-native-frames`).
    pub keep_native: bool,
    /// Trace pymalloc's functions as another allocator (`--python-objects`).
    pub objects: bool,
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
            let mut layout = memtrace_common::PythonLayout {
                keep_native: u32::from(keep_native),
                ..interp.bpf
            };
            if !namespaces::shares(pid, "pid") {
                layout = python::keyed_by_pthread(layout);
            }
            if layout.flags & memtrace_common::PY_LAYOUT_TID_PTHREAD != 0 {
                layout.task_fsbase_off = btf_facts::get().task_fsbase_offset;
                if layout.task_fsbase_off == 0 {
                    eprintln!(
                        "memtrace: Python {}: threads cannot be told apart (no \
                         task_struct.thread.fsbase in the kernel's BTF): stacks show no \
                         Python frames",
                        interp.version
                    );
                    return None;
                }
            }
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

/// Lists pymalloc's functions among the untraced entry points of a Python
/// target whose pymalloc is not traced (`--python-objects` not given, or its
/// functions not found) and that was not started with `PYTHONMALLOC=malloc`:
/// the report then says it is not complete, and which blocks it does not see.
fn note_pymalloc(
    pid: u32,
    python: Option<&PythonResolver>,
    objects: bool,
    allocators: &mut Allocators,
) {
    let Some(interp) = python.map(PythonResolver::interpreter) else {
        return;
    };
    if pymalloc_traced(allocators) {
        eprintln!(
            "memtrace: Python objects of 512 bytes or less (pymalloc) are traced \
             (--python-objects)"
        );
        return;
    }
    let environ = proc_environ(pid);
    if python::allocates_with_malloc(&environ) {
        return;
    }
    if objects && python::has_debug_hooks(&environ) {
        eprintln!(
            "memtrace: Python objects of 512 bytes or less (pymalloc) are not traced: \
             --python-objects does not apply under the debug hooks \
             (PYTHONMALLOC=...debug, PYTHONDEVMODE)"
        );
    } else if objects {
        eprintln!(
            "memtrace: Python objects of 512 bytes or less (pymalloc) are not traced: {}: \
             start the target with PYTHONMALLOC=malloc to see them",
            why_no_pymalloc(pid, &interp.module)
        );
    } else {
        eprintln!(
            "memtrace: Python objects of 512 bytes or less (pymalloc) are not traced: \
             trace them with --python-objects, or start the target with \
             PYTHONMALLOC=malloc"
        );
    }
    for name in python::PYMALLOC_ENTRY_POINTS {
        allocators.untraced.push(UntracedEntry {
            name: name.to_string(),
            module: interp.module.clone(),
            reason: None,
        });
    }
    allocators.untraced.sort();
    allocators.untraced.dedup();
}

/// Why `--python-objects` found no pymalloc function to probe in the
/// interpreter's `module` (see `attach::pymalloc`).
fn why_no_pymalloc(pid: u32, module: &str) -> String {
    let shown = Escaped(module);
    let file = Root::open(Path::new(&format!("/proc/{pid}/root")), "/")
        .ok()
        .and_then(|root| root.open_file(Path::new(module), Links::InRoot).ok());
    // SAFETY: read-only private mapping of a file the target maps; a
    // concurrent truncation would crash the target first.
    let data = file.and_then(|f| unsafe { memmap2::Mmap::map(&f) }.ok());
    let Some(data) = data else {
        return format!("{shown} cannot be read");
    };
    let found = ::object::File::parse(&*data)
        .map_err(|e| e.to_string())
        .and_then(|elf| pymalloc::find(&elf));
    match found {
        Ok(pymalloc::Found::Inlined { .. }) => format!(
            "{shown} is an LTO+PGO build that copies pymalloc's code into its callers \
             (its PyObject_Malloc runs a copy of _PyObject_Malloc): probes on the \
             functions would see only some of the allocations and frees"
        ),
        Ok(pymalloc::Found::Functions { .. }) => {
            format!("{shown}: pymalloc's functions could not be probed")
        }
        Err(e) => format!("{shown}: pymalloc's functions not found ({e})"),
    }
}

/// Whether to probe pymalloc's functions in process `pid`: asked for, and
/// not under the debug hooks, where a block above 512 bytes would be
/// counted twice (see `python::has_debug_hooks`).
fn pymalloc_wanted(pid: u32, objects: bool) -> bool {
    objects && !python::has_debug_hooks(&proc_environ(pid))
}

fn proc_environ(pid: u32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default()
}

/// Whether pymalloc's functions are probed (`--python-objects` on a build
/// that has their symbols).
fn pymalloc_traced(allocators: &Allocators) -> bool {
    allocators
        .points()
        .any(|(_, p)| p.names.iter().any(|n| n == "_PyObject_Malloc"))
}

/// Attaches to `target`: the running process, or the command launched for
/// it, as `opts` say (map sizes, sampling, Python's native frames, fds,
/// following execs). Each step is timed in `steps`. `symbolizer` starts
/// loading the debug info every report needs as soon as the modules are known.
pub(super) fn attach(
    target: &Target,
    opts: &Options,
    steps: &Arc<Steps>,
    symbolizer: &mut Symbolizer,
) -> Result<Attached> {
    // Needed when the maps are created; read meanwhile.
    crate::kernel::btf_facts::read_ahead();
    let at = match target {
        Target::Attach(pid) => attach_existing(*pid, opts, steps, symbolizer),
        Target::Launch(cmd) => launch_new(cmd, opts, steps),
    }?;
    if at.launched {
        preload_debug_info(
            symbolizer,
            &at.modules,
            at.exe.as_deref(),
            &allocator_modules(&at.allocators),
        );
    }
    Ok(at)
}

/// The paths of the modules whose allocator functions are probed.
fn allocator_modules(allocators: &Allocators) -> Vec<&str> {
    allocators
        .modules
        .iter()
        .map(|a| a.module.as_str())
        .collect()
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

pub(super) fn proc_cmdline(pid: u32) -> Vec<String> {
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
pub(super) fn called_exec(pid: u32, allocators: &Allocators) -> bool {
    let allocator = allocators.primary();
    match read_maps(pid) {
        Ok(maps) => !maps.iter().any(|m| {
            m.is_exec()
                && m.start == allocator.text_start
                && m.path.as_deref() == Some(allocator.module.as_str())
        }),
        Err(_) => false,
    }
}

/// Starts compiling the unwind tables of `modules` (see `load_tables`).
fn compile_tables_ahead(tables: &mut UnwindTables, modules: &ProcessModules, steps: &Arc<Steps>) {
    if !crate::knobs::get().frame_pointers_only {
        tables.compile_ahead(modules, steps);
    }
}

/// Loads the unwind tables of every module `pid` maps (those of `read` as
/// read already, or compiled ahead). Without them the BPF side walks frame
/// pointers, so a failure costs stack quality, not the run.
pub(super) fn load_tables(
    tables: &mut UnwindTables,
    maps: &mut TraceMaps,
    pid: u32,
    modules: &ProcessModules,
    read: HashMap<FileKey, ModuleUnwind>,
) {
    if crate::knobs::get().frame_pointers_only {
        return;
    }
    if let Err(e) = tables.load_process(maps, pid, modules, read) {
        log::warn!("unwind tables not loaded, stacks will use frame pointers: {e:#}");
    }
}

/// The modules of running process `pid` at code generation `generation`
/// (an error saying so if it exited meanwhile).
fn capture_running(pid: u32, generation: &mut dyn FnMut() -> Generation) -> Result<ProcessModules> {
    ProcessModules::capture_at(pid, generation)
        .map_err(|e| exited_during_attach(pid, anyhow!(e).context("reading the target's modules")))
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

pub(super) fn attach_existing(
    pid: u32,
    opts: &Options,
    steps: &Arc<Steps>,
    symbolizer: &mut Symbolizer,
) -> Result<Attached> {
    let (sizes, sampling) = (opts.map_sizes, opts.sampling);
    let (python_opts, resources) = (opts.python, opts.resources);
    let inspect = steps.start("inspect_target", "reading the target's modules");
    let stat = preflight::check_target(pid)?;
    let maps = read_maps(pid).map_err(|e| exited_during_attach(pid, anyhow!(e)))?;
    // Read once now, for the unwind tables to compile and the debug info to
    // load while the kernel verifies the programs; read again (below) once
    // code unmapped is watched, for the modules the stacks are resolved in.
    let early = capture_running(pid, &mut || 0)?;
    let mut tables = UnwindTables::new(memtrace_common::DEFAULT_MAX_UNWIND_ROWS);
    compile_tables_ahead(&mut tables, &early, steps);
    inspect.doing("finding the allocator");
    let mut allocators =
        allocator::find_allocators(pid, &maps, pymalloc_wanted(pid, python_opts.objects))
            .map_err(|e| exited_during_attach(pid, anyhow!(e)))?;
    let exe = proc_exe(pid);
    let cmdline = proc_cmdline(pid);
    let namespaces = Namespaces::read(pid);
    preload_debug_info(
        symbolizer,
        &early,
        exe.as_deref(),
        &allocator_modules(&allocators),
    );
    drop(inspect);
    if let Some(delay) = crate::knobs::get().debug_attach_delay {
        let _wait = steps.start("debug_delay", "waiting (MEMTRACE_DEBUG_ATTACH_DELAY_MS)");
        std::thread::sleep(delay);
    }
    crate::knobs::debug_stall("attach");
    // The programs are verified on other threads while the tables load.
    let (verifying, mut trace_maps) = object::load(pid, sizes, sampling.mean_bytes(), steps)?;
    trace_maps.set_allocator_text(&allocator::all_text_ranges(&allocators, &maps))?;
    steps.time("unwind_tables", "loading unwind tables", || {
        load_tables(&mut tables, &mut trace_maps, pid, &early, HashMap::new())
    });
    let python = setup_python(&mut trace_maps, pid, &early, python_opts.keep_native);
    note_pymalloc(pid, python.as_ref(), python_opts.objects, &mut allocators);
    drop(early);
    let mut probes = Probes::new(verifying.wait()?, sampling.mean_bytes() != 0);
    // Watched from before the modules are read: no unmapping goes unseen.
    watch_unmaps(&mut probes);
    let fd_tracepoints = trace_fds(&mut probes, resources, steps);
    let fds_at_attach = FdsAtAttach::read(pid, &trace_maps, fd_tracepoints);
    let (thread_probes, threads_at_attach) =
        trace_threads(&mut probes, resources, pid, &maps, steps);
    let exec_watched = watch_images(&mut probes, &mut trace_maps, false, opts.follow_forks);
    let modules = capture_running(pid, &mut || trace_maps.code_generation())?;
    // (Only what changed since the first read.)
    load_tables(&mut tables, &mut trace_maps, pid, &modules, HashMap::new());
    let nprobes = steps
        .time("attach_probes", "attaching probes", || {
            probes.attach_allocators(&allocators, pid, &maps, &mut trace_maps)
        })
        .map_err(|e| exited_during_attach(pid, e))?;
    if !alive(pid) {
        bail!("target process {pid} exited while memtrace was attaching");
    }
    Ok(Attached {
        pid,
        comm: stat.comm,
        exe,
        cmdline,
        namespaces,
        allocators,
        probes,
        collector: Collector::new(trace_maps),
        modules,
        launched: false,
        nprobes,
        tables,
        unmaps_read: 0,
        python,
        fd_tracepoints,
        fds_at_attach,
        thread_probes,
        threads_at_attach,
        exec_watched,
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

fn launch_new(cmd: &[OsString], opts: &Options, steps: &Arc<Steps>) -> Result<Attached> {
    let launching = steps.start("launch", "starting the command");
    let program = launch::resolve_command(&cmd[0]).context("cannot launch the command")?;
    // (A script runs its interpreter.)
    let exe = launch::executable(&program)?;
    let child = launch::spawn_suspended(&program, cmd)?;
    drop(launching);
    let pid = child.pid;
    let start = NewProgram {
        program,
        exe,
        after_exec: false,
        own_child: true,
    };
    let release = |released: bool| {
        if released {
            child.release().context("cannot launch the command")
        } else {
            child.abandon();
            Ok(())
        }
    };
    attach_new_program(pid, start, release, opts, steps)
}

/// Launch mode, once the child called exec and the BPF side stopped it
/// there (see `watch_images`), before the new program ran: attaches to the
/// new program as to a launched one, at its loader's stops.
pub(super) fn launch_after_exec(
    pid: u32,
    own_child: bool,
    opts: &Options,
    steps: &Arc<Steps>,
) -> Result<Attached> {
    loop {
        match launch::wait_stop(pid, own_child)? {
            Some(ChildState::Stopped(libc::SIGSTOP)) => break,
            Some(ChildState::Stopped(_)) => launch::continue_child(pid),
            Some(state) => bail!(
                "pid {pid} ended (exit status {}) at its exec",
                state.exit_code().unwrap_or(-1)
            ),
            None => {}
        }
    }
    let attached = proc_exe(pid)
        .context("reading the new program's path")
        .and_then(|program| {
            let start = NewProgram {
                program: PathBuf::from(&program),
                exe: PathBuf::from(program),
                after_exec: true,
                own_child,
            };
            let release = |_released: bool| {
                launch::continue_child(pid);
                Ok(())
            };
            attach_new_program(pid, start, release, opts, steps)
        });
    if attached.is_err() {
        // Not left stopped: it runs on untraced.
        launch::continue_child(pid);
    }
    attached
}

/// A program about to start in a process memtrace holds stopped (launched,
/// or stopped at its exec).
struct NewProgram {
    /// The program named (a script, for one run by its interpreter).
    program: PathBuf,
    /// The executable the kernel loads (the script's interpreter).
    exe: PathBuf,
    /// The traced process exec'd it (else memtrace launched it).
    after_exec: bool,
    /// The process is memtrace's child (else a descendant of the target).
    own_child: bool,
}

/// The launch path shared by a launched command and a program exec'd by a
/// launched target: puts the breakpoint that stops the new program in its
/// loader (or at a static executable's entry), lets the process go with
/// `release(true)` (`release(false)` if that failed), and attaches at the
/// loader's stops.
fn attach_new_program(
    pid: u32,
    start: NewProgram,
    release: impl FnOnce(bool) -> Result<()>,
    opts: &Options,
    steps: &Arc<Steps>,
) -> Result<Attached> {
    let setup = (|| {
        // After an exec the program is read through the process: the path
        // it exec'd is its own view (another mount namespace or root).
        let (loading, bp_path, bp_offset) = if start.after_exec {
            launch::breakpoint_after_exec(pid, &start.exe)?
        } else {
            let loading = launch::loading(&start.exe)?;
            let (bp_path, bp_offset) = breakpoint(&start.exe, &loading)?;
            (loading, bp_path, bp_offset)
        };
        let loaded = load_with_breakpoint(pid, &bp_path, bp_offset, opts, steps)?;
        Ok((loading, loaded))
    })();
    let (loading, loaded) = match setup {
        Ok(v) => v,
        Err(e) => {
            release(false)?;
            return Err(e);
        }
    };
    release(true).with_context(|| format!("cannot launch {}", start.program.display()))?;
    let stops = LoaderStops {
        program: start.program,
        dynamic: matches!(loading, Loading::Dynamic { .. }),
        stop_at_exec: opts.follow_exec,
        follow_forks: opts.follow_forks,
        after_exec: start.after_exec,
        own_child: start.own_child,
    };
    attach_at_start(pid, stops, loaded, opts.python, opts.resources, steps)
}

/// The new program's loading: where it stops, and whether it is to stop at
/// its own exec.
struct LoaderStops {
    program: PathBuf,
    dynamic: bool,
    stop_at_exec: bool,
    /// Whether to stop its children before they run (`--follow-forks`).
    follow_forks: bool,
    /// The traced process exec'd it (else memtrace launched it).
    after_exec: bool,
    /// The process is memtrace's child, waited with waitpid.
    own_child: bool,
}

/// The programs loaded and the loader breakpoint in, before a new program runs.
type Loaded = (Probes, TraceMaps, usize);

/// Loads the programs and puts the breakpoint that stops the new program
/// of `pid` in its loader (or at a static executable's entry).
fn load_with_breakpoint(
    pid: u32,
    bp_path: &Path,
    bp_offset: u64,
    opts: &Options,
    steps: &Arc<Steps>,
) -> Result<Loaded> {
    let (sizes, sampling, resources) = (opts.map_sizes, opts.sampling, opts.resources);
    let (v, maps) = object::load(pid, sizes, sampling.mean_bytes(), steps)?;
    let mut probes = Probes::new(v.wait()?, sampling.mean_bytes() != 0);
    steps.time("attach_loader_breakpoint", "attaching probes", || {
        probes.attach_loader_breakpoint(bp_path, bp_offset, pid)
    })?;
    watch_unmaps(&mut probes);
    let fd_tracepoints = trace_fds(&mut probes, resources, steps);
    Ok((probes, maps, fd_tracepoints))
}

/// A new program released towards its loader breakpoint: attaches the
/// allocator probes at its last loader stop, reads its modules, loads their
/// tables, and lets it run.
fn attach_at_start(
    pid: u32,
    stops: LoaderStops,
    loaded: Loaded,
    python_opts: PythonOptions,
    resources: bool,
    steps: &Arc<Steps>,
) -> Result<Attached> {
    let after_exec = stops.after_exec;
    let attached = attach_at_loader(pid, stops, loaded, python_opts, resources, steps);
    // A launched command memtrace cannot trace is not left to run untraced;
    // a program exec'd by the traced one goes on (the caller lets it run).
    if attached.is_err() && !after_exec {
        kill_child(pid);
    }
    attached
}

fn attach_at_loader(
    pid: u32,
    stops: LoaderStops,
    loaded: Loaded,
    python_opts: PythonOptions,
    resources: bool,
    steps: &Arc<Steps>,
) -> Result<Attached> {
    let (mut probes, mut trace_maps, fd_tracepoints) = loaded;
    let (mut allocators, nprobes) = steps.time("attach_probes", "attaching probes", || {
        attach_at_loader_stops(
            pid,
            &stops,
            python_opts.objects,
            &mut probes,
            &mut trace_maps,
        )
    })?;
    // (The child is stopped: its mappings stay as captured while the
    // tables compile and the breakpoint's removal waits for the kernel.)
    let modules = steps.time("inspect_target", "reading the target's modules", || {
        ProcessModules::capture_at(pid, &mut || trace_maps.code_generation())
            .map_err(|e| anyhow!(e))
    });
    let mut tables = UnwindTables::new(memtrace_common::DEFAULT_MAX_UNWIND_ROWS);
    let detached = modules.and_then(|m| {
        compile_tables_ahead(&mut tables, &m, steps);
        let _step = steps.start("detach_loader_breakpoint", "removing the loader breakpoint");
        probes.detach_loader_breakpoint().map(|_| m)
    });
    let modules = detached?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let exe = proc_exe(pid);
    let cmdline = proc_cmdline(pid);
    let namespaces = Namespaces::read(pid);
    steps.time("unwind_tables", "loading unwind tables", || {
        load_tables(&mut tables, &mut trace_maps, pid, &modules, HashMap::new())
    });
    let python = setup_python(&mut trace_maps, pid, &modules, python_opts.keep_native);
    note_pymalloc(pid, python.as_ref(), python_opts.objects, &mut allocators);
    let fds_at_attach = FdsAtAttach::read(pid, &trace_maps, fd_tracepoints);
    // (The child is stopped with its libraries mapped.)
    let (thread_probes, threads_at_attach) = match read_maps(pid) {
        Ok(maps) => trace_threads(&mut probes, resources, pid, &maps, steps),
        Err(e) => {
            if resources {
                eprintln!("memtrace: warning: threads are not traced: {e}");
            }
            (0, Default::default())
        }
    };
    // After the program's own exec: watched from here on.
    let exec_watched = watch_images(
        &mut probes,
        &mut trace_maps,
        stops.stop_at_exec,
        stops.follow_forks,
    );
    launch::continue_child(pid);
    Ok(Attached {
        pid,
        comm,
        exe,
        cmdline,
        namespaces,
        allocators,
        probes,
        collector: Collector::new(trace_maps),
        modules,
        launched: true,
        nprobes,
        tables,
        unmaps_read: 0,
        python,
        fd_tracepoints,
        fds_at_attach,
        thread_probes,
        threads_at_attach,
        exec_watched,
    })
}

/// Follows the released child through its loader stops and attaches the
/// allocator probes; returns with the child stopped at its last stop.
///
/// glibc's loader stops the child twice: before it maps the initial libraries
/// and once they are all mapped, before any of their code runs. The probes go
/// in at the last stop, where every allocator the process starts with is
/// mapped and its link map (symbol lookup order) is complete; a static
/// executable stops once, at its entry point.
fn attach_at_loader_stops(
    pid: u32,
    stops: &LoaderStops,
    pymalloc: bool,
    probes: &mut Probes,
    trace_maps: &mut TraceMaps,
) -> Result<(Allocators, usize)> {
    let mut stopped = 0;
    loop {
        match launch::wait_stop(pid, stops.own_child)? {
            Some(ChildState::Stopped(libc::SIGSTOP)) => {
                stopped += 1;
                if !stops.dynamic || stopped >= 2 {
                    return attach_at_stop(pid, pymalloc, probes, trace_maps);
                }
                launch::continue_child(pid);
            }
            Some(ChildState::Stopped(_)) => launch::continue_child(pid),
            Some(state) => bail!(
                "{} ended (exit status {}) before its libraries were loaded: nothing to trace",
                stops.program.display(),
                state.exit_code().unwrap_or(-1)
            ),
            None => {}
        }
    }
}

/// At the last loader stop: attaches the allocator probes.
fn attach_at_stop(
    pid: u32,
    pymalloc: bool,
    probes: &mut Probes,
    trace_maps: &mut TraceMaps,
) -> Result<(Allocators, usize)> {
    let maps = read_maps(pid).map_err(|e| anyhow!(e))?;
    let a = allocator::find_allocators(pid, &maps, pymalloc_wanted(pid, pymalloc))?;
    debug_attach_delay();
    trace_maps.set_allocator_text(&allocator::all_text_ranges(&a, &maps))?;
    let n = probes.attach_allocators(&a, pid, &maps, trace_maps)?;
    Ok((a, n))
}
