//! One tracing session: attach (or launch), watch, report.
use std::{
    fs::File,
    io::Write,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, anyhow, bail};
use memtrace_common::{NO_STACK, STACK_FP_ONLY};
// Keyed by stack ids: a fast hasher (SipHash showed in profiles at 10,000 sites).
use rustc_hash::FxHashMap as HashMap;

mod launch;
mod preflight;

use launch::{ChildState, Loading};

use crate::{
    analyze::{
        self, BlockGrouper, HISTORY_CAPACITY, History, SampleAges, SiteBlocks, Verdict,
        VerdictConfig,
    },
    attach::allocator::{self, Allocator, AllocatorError},
    attach::links::Probes,
    kernel::collect::{Collector, SiteSample, monotonic_ns},
    kernel::tables::UnwindTables,
    kernel::{
        maps::{MapSizes, TraceMaps},
        object,
    },
    process::maps::read_maps,
    process::stat::{self as procstat, ProcStat},
    report::{
        self, AllocatorInfo, Drops, HistoryPoint, ProcessReport, ProcessSample, Report, Sampling,
        Site, TargetInfo, Timeline, Totals, VerdictCounts,
    },
    symbolize::{ProcessModules, Symbolizer, Unresolved},
    units::{format_bytes, format_count, format_duration, format_rate},
};

/// At each sample the ages of a site's blocks (oldest, median) are read by
/// scanning every outstanding block: only while there are fewer than this many,
/// and while the scan is expected to take at most [`AGE_SCAN_BUDGET`] of the
/// sampling period (~0.07-0.3 µs per block, after ~4 ms for the block table's
/// keys at the default `--max-blocks`; a block cost 0.5-3 µs when the table was
/// a BPF hash map read in batches, and the limits date from then). Otherwise
/// they come from the kernel's per-site aggregates of the blocks born in each
/// epoch (one epoch per sample), which cost one step per aggregate. The final report scans every
/// block up to [`REPORT_SCAN_MAX_BLOCKS`].
const AGE_SCAN_MAX_BLOCKS: i64 = 200_000;
const AGE_SCAN_BUDGET: f64 = 0.1;
const REPORT_SCAN_MAX_BLOCKS: i64 = 100_000;
/// Cost of scanning one block, until measured.
const AGE_SCAN_NS_PER_BLOCK: f64 = 3000.0;

/// Whether ages come from a scan of every block (else from the per-epoch
/// aggregates): `scan_if` unless `MEMTRACE_AGES=epochs` (or `blocks`) says
/// otherwise, for tests and comparisons.
fn scan_every_block(scan_if: bool) -> bool {
    match crate::knobs::get().ages {
        crate::knobs::Ages::Epochs => false,
        crate::knobs::Ages::Blocks => true,
        crate::knobs::Ages::Auto => scan_if,
    }
}

/// The outstanding blocks by site, from a scan of every block (`scan_all`) or
/// from the aggregates the last `Collector::sites` read.
fn site_blocks(
    at: &Attached,
    now_ns: u64,
    min_age_ns: u64,
    sampling: Sampling,
    scan_all: bool,
) -> Result<HashMap<u64, SiteBlocks>> {
    let mut g = BlockGrouper::new(now_ns, min_age_ns, sampling);
    if scan_all {
        at.collector
            .for_each_block(|stack_id, birth, size| g.add(stack_id, birth, size))?;
    } else {
        at.collector
            .for_each_epoch_group(now_ns, |stack_id, birth, blocks, bytes| {
                g.add_group(stack_id, birth, blocks, bytes)
            });
    }
    Ok(g.finish())
}

/// At most this many new stacks are read per live sample (~3 µs each).
const STACK_READ_AHEAD: usize = 20_000;

/// How often the target's mappings are re-read, so that a library it loads with
/// dlopen is captured (and kept open) soon after, whatever --interval is.
const MODULE_REFRESH: Duration = Duration::from_secs(1);

/// Why tracing stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Signal,
    Duration,
    TargetExited,
    /// The target called exec: the program memtrace attached to is gone.
    TargetExec,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Signal => "signal",
            End::Duration => "duration",
            End::TargetExited => "target-exited",
            End::TargetExec => "target-exec",
        }
    }
}

/// SIGINT and SIGTERM, blocked and read from a signalfd, so that Ctrl-C ends
/// tracing cleanly (report written, probes removed) at any point.
struct Signals {
    fd: OwnedFd,
}

impl Signals {
    fn block() -> Result<Self> {
        // SAFETY: plain sigset manipulation and signalfd creation.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                bail!("blocking SIGINT/SIGTERM failed");
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                bail!("signalfd: {}", std::io::Error::last_os_error());
            }
            Ok(Signals {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    fn pending(&self) -> bool {
        let mut info = [0u8; 128];
        // SAFETY: reading one signalfd_siginfo into a buffer of its size.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        n > 0
    }
}

fn pidfd_open(pid: u32) -> Result<OwnedFd> {
    // SAFETY: the pidfd_open syscall returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(anyhow!(std::io::Error::last_os_error()))
            .with_context(|| format!("watching pid {pid}"));
    }
    // SAFETY: fd was just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until a signal, the target's exit, or the timeout. Returns (signal, exited).
fn wait_events(signals: &Signals, pidfd: &OwnedFd, timeout: Duration) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: signals.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: fds is a valid array of two pollfds.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    if n <= 0 {
        return (false, false);
    }
    let sig = fds[0].revents & libc::POLLIN != 0 && signals.pending();
    (sig, fds[1].revents != 0)
}

/// The `--output` file, opened before attaching so an unwritable path fails
/// early. An existing report is only replaced once the new one is ready, and a
/// file created for a run that failed is removed again.
struct ReportFile {
    file: File,
    path: PathBuf,
    created: bool,
    written: bool,
}

impl ReportFile {
    fn open(path: &Option<PathBuf>) -> Result<Option<Self>> {
        let Some(path) = path else { return Ok(None) };
        let created = !path.exists();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| {
                format!(
                    "cannot write the report to {}: check the directory exists and is writable",
                    path.display()
                )
            })?;
        Ok(Some(ReportFile {
            file,
            path: path.clone(),
            created,
            written: false,
        }))
    }

    fn write(&mut self, emit: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
        // Only a file with content is truncated: on ext4, truncating to 0 also
        // makes closing the file write it out (its replace-by-truncate safety),
        // tens of milliseconds for a report at scale.
        let has_content = self.file.metadata().map(|m| m.len() > 0).unwrap_or(true);
        if has_content {
            self.file.set_len(0)
        } else {
            Ok(())
        }
        .and_then(|_| {
            let mut w = std::io::BufWriter::new(&mut self.file);
            emit(&mut w)?;
            w.flush()
        })
        .with_context(|| format!("writing the report to {}", self.path.display()))?;
        self.written = true;
        Ok(())
    }
}

impl Drop for ReportFile {
    fn drop(&mut self) {
        if self.created && !self.written {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn proc_exe(pid: u32) -> Option<String> {
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

fn alive(pid: u32) -> bool {
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

/// Everything known about the target once the probes are in.
struct Attached {
    pid: u32,
    comm: String,
    exe: Option<String>,
    cmdline: Vec<String>,
    allocator: Allocator,
    probes: Probes,
    collector: Collector,
    modules: ProcessModules,
    /// Launch mode: we are the parent and reap the child.
    launched: bool,
    nprobes: usize,
    /// Unwind tables loaded into the kernel for this process.
    tables: UnwindTables,
}

/// Whether `pid` replaced its program (exec): the mapping of the allocator
/// memtrace probes is gone. Every address memtrace knows (allocator code,
/// unwind tables, modules) belongs to the old program.
fn called_exec(pid: u32, allocator: &Allocator) -> bool {
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
fn load_tables(
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

fn attach_existing(pid: u32, sizes: MapSizes, sampling: Sampling) -> Result<Attached> {
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
    })
}

fn launch_new(cmd: &[std::ffi::OsString], sizes: MapSizes, sampling: Sampling) -> Result<Attached> {
    let program = launch::resolve_command(&cmd[0]).context("cannot launch the command")?;
    let loading = launch::loading(&program)?;
    let (bp_path, bp_offset) = match &loading {
        Loading::Dynamic { interpreter } => (
            interpreter.clone(),
            launch::loader_breakpoint_offset(interpreter)?,
        ),
        Loading::Static { entry_offset } => (program.clone(), *entry_offset),
    };
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
    let kill = || {
        // SAFETY: our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let _ = launch::wait_child(pid, false);
    };
    // glibc's loader stops the child twice: before it maps the initial libraries
    // and once they are all mapped. The allocator probes go in at the first stop
    // where the allocator is visible (an executable's own allocator: the first),
    // the modules are captured at the last, when every initial library is mapped.
    let dynamic = matches!(loading, Loading::Dynamic { .. });
    let mut found: Option<(Allocator, usize)> = None;
    let mut stops = 0;
    loop {
        match launch::wait_child(pid, false)? {
            Some(ChildState::Stopped(libc::SIGSTOP)) => {
                stops += 1;
                if found.is_none() {
                    let maps = read_maps(pid)?;
                    match allocator::find_allocator(pid, &maps) {
                        Ok(a) => {
                            debug_attach_delay();
                            let text = allocator::text_ranges(&a, &maps);
                            let attached = trace_maps.set_allocator_text(&text).and_then(|_| {
                                probes.attach_allocator(&a, pid, &maps, &mut trace_maps)
                            });
                            match attached {
                                Ok(n) => found = Some((a, n)),
                                Err(e) => {
                                    kill();
                                    return Err(e);
                                }
                            }
                        }
                        Err(AllocatorError::NotFound { .. }) if dynamic && stops < 2 => {}
                        Err(e) => {
                            kill();
                            return Err(e.into());
                        }
                    }
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
    let (allocator, nprobes) = found.expect("the loop ends only once the allocator is attached");
    let modules = probes
        .detach_loader_breakpoint()
        .and_then(|_| ProcessModules::capture(pid).map_err(|e| anyhow!(e)));
    let modules = match modules {
        Ok(m) => m,
        Err(e) => {
            kill();
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
    })
}

/// What to trace.
#[derive(Debug, Clone)]
pub enum Target {
    Attach(u32),
    Launch(Vec<std::ffi::OsString>),
}

/// What one tracing run is asked to do (the command line's options).
#[derive(Debug, Clone)]
pub struct Options {
    /// Period of the live summary and of the history's samples.
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub min_age: Duration,
    /// Sites in the text report.
    pub top: usize,
    pub format: Format,
    pub output: Option<PathBuf>,
    pub fail_on_leak: bool,
    pub alert_growth: Option<crate::units::Rate>,
    pub map_sizes: MapSizes,
    pub sampling: Sampling,
    pub verdicts: VerdictConfig,
}

/// The final report's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

pub fn run(opts: &Options, target: Target) -> Result<i32> {
    preflight::check_privileges()?;
    preflight::check_kernel()?;
    preflight::check_map_memory(&opts.map_sizes)?;
    let mut output = ReportFile::open(&opts.output)?;
    let signals = Signals::block()?;
    let started_at = SystemTime::now();
    let t0 = Instant::now();

    let mut at = match &target {
        Target::Attach(pid) => attach_existing(*pid, opts.map_sizes, opts.sampling)?,
        Target::Launch(cmd) => launch_new(cmd, opts.map_sizes, opts.sampling)?,
    };
    let pid = at.pid;
    let pidfd = pidfd_open(pid)?;
    let functions: Vec<String> = at
        .allocator
        .points
        .iter()
        .flat_map(|p| p.names.iter().map(|n| n.to_string()))
        .collect();
    eprintln!(
        "memtrace: attached to pid {pid} ({}): {} probes on {} ({}) in {}",
        at.comm,
        at.nprobes,
        at.allocator.module,
        functions.join(", "),
        format_duration(t0.elapsed()),
    );

    let mut symbolizer = Symbolizer::new();
    // Nearly every stack has frames in the program and in the allocator's library
    // (libc: the bottom of every thread's stack): their debug info is loaded while
    // tracing, so that the report does not wait for it (libc with libc6-dbg: ~30 ms).
    let exe = proc_exe(pid);
    symbolizer.load_modules_in_background(
        &at.modules,
        at.modules
            .modules()
            .iter()
            .filter(|m| Some(&m.path) == exe.as_ref() || m.path == at.allocator.module),
    );
    let trace_start = Instant::now();
    let vcfg = opts.verdicts.clone();
    let mut history = History::new(HISTORY_CAPACITY, monotonic_ns(), opts.interval);
    let deadline = opts.duration.map(|d| trace_start + d);
    let mut next_summary = trace_start + opts.interval;
    let mut next_refresh = trace_start + MODULE_REFRESH;
    let mut last = Summary::default();
    let mut exit_state: Option<ChildState> = None;
    let end = loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break End::Duration;
        }
        let mut until = next_summary.min(next_refresh);
        if let Some(d) = deadline {
            until = until.min(d);
        }
        let (sig, exited) = wait_events(&signals, &pidfd, until.saturating_duration_since(now));
        if exited {
            break End::TargetExited;
        }
        if sig {
            break End::Signal;
        }
        let now = Instant::now();
        if now >= next_refresh {
            next_refresh = now + MODULE_REFRESH;
            if called_exec(pid, &at.allocator) {
                eprintln!(
                    "memtrace: pid {pid} called exec (it now runs {}): the new program is not \
                     traced; reporting what the old one did",
                    proc_exe(pid).unwrap_or_else(|| "?".into())
                );
                break End::TargetExec;
            }
            if let Ok(true) = at.modules.refresh(pid) {
                load_tables(&mut at.tables, &mut at.collector.maps, pid, &at.modules);
            }
        }
        if now >= next_summary {
            next_summary += opts.interval;
            let work = live_summary(
                &mut at,
                &mut symbolizer,
                &mut last,
                trace_start,
                &mut history,
                opts,
            );
            if let Err(e) = work {
                log::warn!("live summary failed: {e:#}");
            }
        }
    };

    // Ages and the duration are taken at the end of tracing: detaching can take
    // a second. Then the probes go: the target runs at full speed again, and the
    // figures no longer move while they are read.
    let end_ns = monotonic_ns();
    log::debug!(
        "tracing ended ({}) at {:.3} ms of process cpu",
        end.as_str(),
        crate::kernel::batch::process_cpu().as_secs_f64() * 1e3
    );
    let ended_at = SystemTime::now();
    let duration = trace_start.elapsed();
    at.probes.detach_all();
    // The process's own view at the end (not while the probes are still in).
    let end_process = procstat::read(pid).ok();

    let mut exited = end == End::TargetExited || !alive(pid);
    if at.launched {
        // Ctrl-C reaches the whole foreground process group: give the child a
        // moment to exit on the same signal, so its status can be reported.
        let wait_until = Instant::now()
            + if end == End::Signal {
                Duration::from_millis(300)
            } else {
                Duration::ZERO
            };
        loop {
            match launch::wait_child(pid, true)? {
                Some(s @ (ChildState::Exited(_) | ChildState::Signaled(_))) => {
                    exit_state = Some(s);
                    exited = true;
                    break;
                }
                Some(ChildState::Stopped(_)) => launch::continue_child(pid),
                None if exited || Instant::now() < wait_until => {
                    if exited {
                        // pidfd said it exited: reap it.
                        if let Some(s) = launch::wait_child(pid, false)? {
                            exit_state = Some(s);
                        }
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                None => break,
            }
        }
    } else if !exited {
        // The target lives on: pick up libraries it loaded since the last refresh.
        let _ = at.modules.refresh(pid);
    }

    let cpu_report = crate::kernel::batch::process_cpu();
    log::debug!(
        "report begins at {:.3} ms of process cpu",
        cpu_report.as_secs_f64() * 1e3
    );
    let report = build_report(
        opts,
        &mut at,
        &mut symbolizer,
        &mut history,
        &vcfg,
        end_process,
        ReportMeta {
            started_at,
            ended_at,
            duration,
            end,
            end_ns,
            exited,
            exit_status: exit_state.and_then(|s| s.exit_code()),
        },
    )?;
    let cpu_written = crate::kernel::batch::process_cpu();
    // JSON is streamed out: for ten thousand sites it is tens of megabytes.
    let emit = |w: &mut dyn Write| match opts.format {
        Format::Json => report.write_json(w),
        Format::Text => w.write_all(report.to_text(opts.top).as_bytes()),
    };
    match output.as_mut() {
        Some(f) => f.write(emit)?,
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            emit(&mut out).context("writing the report to stdout")?;
            out.flush().ok();
        }
    }
    let cpu_end = crate::kernel::batch::process_cpu();
    log::debug!(
        "report built in {:.1} ms cpu, written in {:.1} ms cpu",
        cpu_written.saturating_sub(cpu_report).as_secs_f64() * 1e3,
        cpu_end.saturating_sub(cpu_written).as_secs_f64() * 1e3,
    );
    if let Some(path) = &opts.output {
        eprintln!("memtrace: report written to {}", path.display());
    }
    let status = if at.launched {
        exit_state.and_then(|s| s.exit_code()).unwrap_or(0)
    } else {
        0
    };
    let leaks = report.verdicts.leak;
    // The process ends next: freeing a report of ten thousand sites and the
    // symbolizer's debug info piece by piece would cost tens of milliseconds.
    std::mem::forget(report);
    std::mem::forget(symbolizer);
    std::mem::forget(history);
    if opts.fail_on_leak && leaks > 0 {
        if status == 0 {
            eprintln!(
                "memtrace: {leaks} site{} got the leak verdict: exit status 3 (--fail-on-leak)",
                if leaks == 1 { "" } else { "s" }
            );
            return Ok(3);
        }
        eprintln!(
            "memtrace: {leaks} site{} got the leak verdict, but the program exited with status \
             {status}: that status is memtrace's",
            if leaks == 1 { "" } else { "s" }
        );
    }
    Ok(status)
}

#[derive(Default)]
struct Summary {
    at: Option<Instant>,
    alloc_calls: u64,
    free_calls: u64,
    site_bytes: HashMap<u64, i64>,
    outstanding_bytes: i64,
    rss_bytes: Option<u64>,
    /// Measured cost of scanning one block (0 until measured).
    scan_ns_per_block: f64,
}

/// `function (file.c:line)` of a stack's innermost frame, for summary lines.
fn site_name(at: &mut Attached, sym: &mut Symbolizer, stack_id: u64) -> Result<String> {
    let addrs = at.collector.stack(stack_id)?.to_vec();
    Ok(match addrs.first() {
        None => "[stack not captured]".to_string(),
        Some(&a) => {
            let frames = sym.symbolize(&at.modules, &[a], true);
            let f = frames.into_iter().next().and_then(|v| v.into_iter().last());
            match f {
                Some(f) => {
                    let func = f.function.unwrap_or_else(|| format!("{a:#x}"));
                    match (f.file, f.line) {
                        (Some(file), Some(line)) => {
                            let base = file.rsplit('/').next().unwrap_or(&file).to_string();
                            format!("{func} ({base}:{line})")
                        }
                        _ => func,
                    }
                }
                None => format!("{a:#x}"),
            }
        }
    })
}

/// The work of every interval: record the history, print the summary line,
/// and the `--alert-growth` alert if the growth of this interval calls for it.
fn live_summary(
    at: &mut Attached,
    sym: &mut Symbolizer,
    last: &mut Summary,
    start: Instant,
    history: &mut History,
    opts: &Options,
) -> Result<()> {
    let now = Instant::now();
    let now_ns = monotonic_ns();
    at.collector.expire_pending(now_ns)?;
    let counters = at.collector.counters()?;
    let raw_sites = at.collector.sites()?;
    // The report will need the stacks of the sites that hold blocks.
    let ahead = at.collector.read_ahead_stacks(
        raw_sites
            .iter()
            .filter(|s| s.outstanding_blocks > 0)
            .map(|s| s.stack_id),
        STACK_READ_AHEAD,
    )?;
    if !ahead.is_empty() {
        log::debug!("{} new stacks read", ahead.len());
        // And the debug info of the modules they go through.
        let mut addrs = Vec::new();
        for &id in &ahead {
            addrs.extend_from_slice(at.collector.stack(id)?);
        }
        addrs.sort_unstable();
        addrs.dedup();
        let n = sym.load_in_background(&at.modules, addrs);
        if n > 0 {
            log::debug!("{n} modules of those stacks loading in the background");
        }
    }
    let process = procstat::read(at.pid).ok();
    // The history keeps the sampled figures; the line shows the estimates.
    let sampling = opts.sampling;
    let est = if sampling.is_sampled() { "~" } else { "" };
    let sites: Vec<SiteSample> = raw_sites.iter().map(|s| s.estimated(sampling)).collect();
    // Blocks in the kernel's map: what an age scan reads.
    let scanned: i64 = raw_sites.iter().map(|s| s.outstanding_blocks).sum();
    let secs = now
        .duration_since(last.at.unwrap_or(start))
        .as_secs_f64()
        .max(1e-3);
    let (blocks, bytes) = sites.iter().fold((0i64, 0i64), |(b, y), s| {
        (b + s.outstanding_blocks, y + s.outstanding_bytes)
    });
    if history.tick() {
        let scan = Instant::now();
        let per_block = if last.scan_ns_per_block > 0.0 {
            last.scan_ns_per_block
        } else {
            AGE_SCAN_NS_PER_BLOCK
        };
        let budget_ns =
            AGE_SCAN_BUDGET * (opts.interval.as_nanos() as f64) * history.stride() as f64;
        let scan_all = scan_every_block(
            scanned < AGE_SCAN_MAX_BLOCKS && scanned as f64 * per_block <= budget_ns,
        );
        let ages = site_blocks(at, now_ns, 0, sampling, scan_all)?;
        if scan_all && scanned >= 1000 {
            last.scan_ns_per_block = scan.elapsed().as_nanos() as f64 / scanned as f64;
        }
        history.record(
            now_ns,
            &site_tuples(&raw_sites),
            SampleAges::of(&ages, scan_all),
            process,
        );
        // Blocks born from now on are told apart from those before this sample.
        at.collector.new_epoch(monotonic_ns())?;
        log::debug!(
            "history sample: {} sites, ages from {} in {:?}",
            sites.len(),
            if scan_all {
                format!("{scanned} blocks")
            } else {
                "epoch aggregates".to_string()
            },
            scan.elapsed()
        );
    }
    let mut growth: Vec<(i64, &SiteSample)> = sites
        .iter()
        .map(|s| {
            (
                s.outstanding_bytes - last.site_bytes.get(&s.stack_id).copied().unwrap_or(0),
                s,
            )
        })
        .filter(|(g, _)| *g > 0)
        .collect();
    growth.sort_by_key(|g| std::cmp::Reverse(g.0));
    let mut named = Vec::new();
    for (g, s) in growth.iter().take(3) {
        named.push((*g, s.outstanding_bytes, site_name(at, sym, s.stack_id)?));
    }
    let parts: Vec<String> = named
        .iter()
        .map(|(g, _, name)| format!("+{} {name}", format_bytes(*g)))
        .collect();
    let dropped = counters.dropped_events() + counters.stack_errors();
    let process_part = process
        .map(|p| process_summary(&p, last.rss_bytes, bytes))
        .unwrap_or_default();
    eprintln!(
        "memtrace: {} outstanding {est}{} in {est}{} blocks ({}{}), {}/s allocs, {}/s frees{}{}{}",
        format_duration(now.duration_since(start)),
        format_bytes(bytes),
        format_count(blocks.max(0) as u64),
        if bytes >= last.outstanding_bytes {
            "+"
        } else {
            ""
        },
        format_bytes(bytes - last.outstanding_bytes),
        format_count(
            ((counters.alloc_calls + counters.unsampled_calls - last.alloc_calls) as f64 / secs)
                as u64,
        ),
        format_count(((counters.free_calls - last.free_calls) as f64 / secs) as u64),
        if parts.is_empty() {
            String::new()
        } else {
            format!("; growing: {}", parts.join(", "))
        },
        process_part,
        if dropped > 0 {
            format!("; {dropped} events dropped or without stack")
        } else {
            String::new()
        },
    );
    if let Some(limit) = opts.alert_growth {
        let over = |rate: f64| format!("{} (> {limit})", format_rate(rate, limit.per));
        let window = format_duration(Duration::from_secs_f64(secs));
        if let Some(rate) =
            analyze::over_rate(bytes - last.outstanding_bytes, secs, limit.bytes_per_s)
        {
            let fastest = named
                .first()
                .map(|(g, _, name)| format!("; fastest site: +{} {name}", format_bytes(*g)))
                .unwrap_or_default();
            eprintln!(
                "memtrace: ALERT: total outstanding grew {} in the last {window}, now {}{fastest}",
                over(rate),
                format_bytes(bytes)
            );
        } else if let Some((g, held, name)) = named.first()
            && let Some(rate) = analyze::over_rate(*g, secs, limit.bytes_per_s)
        {
            eprintln!(
                "memtrace: ALERT: site {name} grew {} in the last {window}, now holds {}",
                over(rate),
                format_bytes(*held)
            );
        }
    }
    last.at = Some(now);
    last.alloc_calls = counters.alloc_calls + counters.unsampled_calls;
    last.free_calls = counters.free_calls;
    last.outstanding_bytes = bytes;
    last.rss_bytes = process.map(|p| p.rss_bytes);
    last.site_bytes = sites
        .iter()
        .map(|s| (s.stack_id, s.outstanding_bytes))
        .collect();
    Ok(())
}

/// `; rss 13.4 MiB (+640.0 KiB; anon 12.4 MiB, traced 1%), heap 264.0 KiB, vm 14.6 MiB, 5 fds, 1 thread`
fn process_summary(p: &ProcStat, last_rss: Option<u64>, traced: i64) -> String {
    let mut s = format!("; rss {} (", format_bytes(p.rss_bytes as i64));
    if let Some(prev) = last_rss {
        let d = p.rss_bytes as i64 - prev as i64;
        s.push_str(&format!(
            "{}{}; ",
            if d >= 0 { "+" } else { "" },
            format_bytes(d)
        ));
    }
    s.push_str(&format!("anon {}", format_bytes(p.rss_anon_bytes as i64)));
    if p.rss_bytes > 0 {
        let share = traced.max(0) as f64 / p.rss_bytes as f64 * 100.0;
        s.push_str(&format!(", traced {share:.0}%"));
    }
    s.push(')');
    if let Some(h) = p.heap_bytes {
        s.push_str(&format!(", heap {}", format_bytes(h as i64)));
    }
    s.push_str(&format!(", vm {}", format_bytes(p.vm_size_bytes as i64)));
    if let Some(f) = p.fds {
        s.push_str(&format!(", {} fds", format_count(f)));
    }
    s.push_str(&format!(
        ", {} thread{}",
        p.threads,
        if p.threads == 1 { "" } else { "s" }
    ));
    s
}

fn site_tuples(sites: &[SiteSample]) -> Vec<(u64, i64, i64)> {
    sites
        .iter()
        .map(|s| (s.stack_id, s.outstanding_bytes, s.outstanding_blocks))
        .collect()
}

/// Functions at the bottom of every stack: where the process or a thread starts.
const STACK_BOTTOMS: &[&str] = &[
    "__libc_start_call_main",
    "__libc_start_main",
    "__libc_start_main_impl",
    "_start",
    "start_thread",
    "clone",
    "clone3",
];

fn is_bottom(f: &report::Frame) -> bool {
    f.function
        .as_deref()
        .is_some_and(|n| STACK_BOTTOMS.contains(&n))
}

/// Where a thread's entry code is in the frames of one address: the first of
/// its frames there, and the run of them that starts with it.
#[derive(Clone, Copy, Debug, Default)]
struct Bottoms {
    first: Option<usize>,
    run: usize,
    len: usize,
}

impl Bottoms {
    fn of(frames: &[report::Frame]) -> Self {
        let first = frames.iter().position(is_bottom);
        Bottoms {
            first,
            run: first.map_or(0, |f| {
                frames[f..].iter().take_while(|x| is_bottom(x)).count()
            }),
            len: frames.len(),
        }
    }
}

/// A stack's frames are kept down to the thread's entry code: whatever a
/// frame-pointer walk read past it are stale stack contents, not callers. Fed
/// the `Bottoms` of each address in turn, this finds how many frames that
/// keeps (the first entry frame and those right after it), address by address.
#[derive(Default)]
struct KeepAboveEntry {
    /// Frames before the first entry frame (while none was seen).
    above: usize,
    /// The frames kept once an entry frame was seen, and whether the run of
    /// entry frames may go on into the next address.
    keep: Option<(usize, bool)>,
}

impl KeepAboveEntry {
    fn add(&mut self, b: &Bottoms) {
        match &mut self.keep {
            None => match b.first {
                Some(f) => self.keep = Some((self.above + f + b.run, f + b.run == b.len)),
                None => self.above += b.len,
            },
            Some((keep, open @ true)) => {
                // Only a run that starts the group goes on from the last one.
                let leading = if b.first == Some(0) { b.run } else { 0 };
                *keep += leading;
                *open = leading == b.len;
            }
            Some((_, false)) => {}
        }
    }

    fn frames(&self) -> Option<usize> {
        self.keep.map(|(k, _)| k)
    }
}

/// Why a walk stopped early, from its `STACK_TRUNCATED_*` bits.
fn truncated_reason(flags: u32) -> Option<&'static str> {
    use memtrace_common::{
        STACK_TRUNCATED_DEPTH, STACK_TRUNCATED_NO_FP, STACK_TRUNCATED_READ,
        STACK_TRUNCATED_UNSUPPORTED,
    };
    [
        (STACK_TRUNCATED_READ, "stack memory unreadable"),
        (STACK_TRUNCATED_DEPTH, "depth limit of 127 frames"),
        (
            STACK_TRUNCATED_UNSUPPORTED,
            "an unwind rule the BPF walker does not follow",
        ),
        (STACK_TRUNCATED_NO_FP, "no unwind row and no frame pointer"),
    ]
    .into_iter()
    .find(|(bit, _)| flags & bit != 0)
    .map(|(_, why)| why)
}

fn unresolved_name(r: Unresolved) -> &'static str {
    match r {
        Unresolved::Unmapped => "unmapped",
        Unresolved::FileUnavailable => "file_unavailable",
        Unresolved::Malformed => "malformed_file",
        Unresolved::NoSymbol => "no_symbol",
        Unresolved::NoLineInfo => "no_line_info",
    }
}

struct ReportMeta {
    started_at: SystemTime,
    ended_at: SystemTime,
    duration: Duration,
    end: End,
    /// CLOCK_MONOTONIC when tracing ended: the "now" of every age.
    end_ns: u64,
    exited: bool,
    exit_status: Option<i32>,
}

/// CPU time of a phase sequence, for the debug log.
struct Laps {
    last: Duration,
    laps: Vec<(&'static str, Duration)>,
}

impl Laps {
    fn start() -> Self {
        Laps {
            last: crate::kernel::batch::process_cpu(),
            laps: Vec::new(),
        }
    }
    /// Ends the current phase; returns its CPU time.
    fn mark(&mut self, name: &'static str) -> Duration {
        let now = crate::kernel::batch::process_cpu();
        let lap = now.saturating_sub(self.last);
        self.laps.push((name, lap));
        self.last = now;
        lap
    }
    fn log(&self) {
        let parts: Vec<String> = self
            .laps
            .iter()
            .map(|(n, d)| format!("{n} {:.1}", d.as_secs_f64() * 1e3))
            .collect();
        log::debug!("report phases (ms cpu): {}", parts.join(", "));
    }
}

fn build_report(
    opts: &Options,
    at: &mut Attached,
    sym: &mut Symbolizer,
    history: &mut History,
    vcfg: &VerdictConfig,
    end_process: Option<ProcStat>,
    meta: ReportMeta,
) -> Result<Report> {
    let mut lap = Laps::start();
    at.collector.count_unfinished()?;
    let counters = at.collector.counters()?;
    let samples = at.collector.sites()?;
    lap.mark("read");
    let now_ns = meta.end_ns;
    let min_age_ns = opts.min_age.as_nanos() as u64;
    // Ages, and which blocks outlived the run: one scan of every block, or the
    // per-epoch aggregates when there are too many blocks for that.
    let sampling = opts.sampling;
    let scanned: i64 = samples.iter().map(|s| s.outstanding_blocks).sum();
    let scan_all = scan_every_block(scanned <= REPORT_SCAN_MAX_BLOCKS);
    let ages = site_blocks(at, now_ns, min_age_ns, sampling, scan_all)?;
    // The final, partial interval is part of the history too.
    history.record_final(
        now_ns,
        &site_tuples(&samples),
        SampleAges::of(&ages, scan_all),
        end_process,
    );
    lap.mark("ages");

    let mut totals = Totals {
        // Every call is counted, sampled or not.
        alloc_calls: counters.alloc_calls + counters.unsampled_calls,
        free_calls: counters.free_calls,
        alloc_bytes: if sampling.is_sampled() {
            samples
                .iter()
                .map(|s| s.estimated(sampling).alloc_bytes)
                .sum()
        } else {
            counters.alloc_bytes
        },
        dropped_events: counters.dropped_events(),
        stack_errors: counters.stack_errors(),
        free_unknown: counters.free_unknown,
        failed_allocs: counters.failed_allocs,
        sites_seen: samples.len() as u64,
        allocator_internal_calls: counters.internal_calls,
        ..Default::default()
    };
    let (mut est_blocks, mut est_bytes) = (0.0, 0.0);
    for a in ages.values() {
        est_blocks += a.est.blocks;
        est_bytes += a.est.bytes;
    }
    let raw_bytes: u64 = ages.values().map(|a| a.bytes).sum();
    let traced_scale = if raw_bytes > 0 {
        est_bytes / raw_bytes as f64
    } else {
        1.0
    };
    totals.outstanding_blocks = est_blocks.round() as u64;
    totals.outstanding_bytes = est_bytes.round() as u64;

    // Leak candidates: sites with blocks older than --min-age.
    let mut chosen: Vec<(&SiteSample, u64, u64, Option<u64>)> = samples
        .iter()
        .filter_map(|s| {
            let a = ages.get(&s.stack_id)?;
            (a.old_blocks > 0).then_some((s, a.est_old.blocks(), a.est_old.bytes(), a.oldest_ns()))
        })
        .collect();
    chosen.sort_by(|a, b| {
        b.2.cmp(&a.2)
            .then(b.1.cmp(&a.1))
            .then(a.0.stack_id.cmp(&b.0.stack_id))
    });

    let mut sites = Vec::with_capacity(chosen.len());
    for (s, blocks, bytes, oldest) in &chosen {
        let flags = at.collector.stack_flags(s.stack_id)?;
        let end_blocks = ages.get(&s.stack_id);
        // The history and the trend are of the sampled blocks: scaled back by
        // what this site's outstanding blocks stand for.
        let (byte_scale, block_scale) =
            end_blocks.filter(|b| b.bytes > 0).map_or((1.0, 1.0), |b| {
                (b.est.bytes / b.bytes as f64, b.est.blocks / b.blocks as f64)
            });
        let (verdict, trend, hist) = match history.site(s.stack_id) {
            Some(h) => {
                let mut a = analyze::assess(h.times, h.points, end_blocks, vcfg);
                a.trend.growth_bytes_per_s = a.trend.growth_bytes_per_s.map(|g| g * byte_scale);
                a.trend.recent_growth_bytes_per_s =
                    a.trend.recent_growth_bytes_per_s.map(|g| g * byte_scale);
                let points = h
                    .times
                    .iter()
                    .zip(h.points)
                    .map(|(&t, p)| HistoryPoint {
                        t_s: t.saturating_sub(history.start_ns()) as f64 / 1e9,
                        outstanding_bytes: (p.bytes as f64 * byte_scale).round() as i64,
                        outstanding_blocks: (p.blocks as f64 * block_scale).round() as i64,
                        oldest_age_s: p.oldest_age_ns.map(|a| a as f64 / 1e9),
                        median_age_s: p.median_age_ns.map(|a| a as f64 / 1e9),
                    })
                    .collect();
                (a.verdict, a.trend, points)
            }
            None => (Verdict::Unknown, Default::default(), Vec::new()),
        };
        let est = s.estimated(sampling);
        sites.push(Site {
            outstanding_blocks: *blocks,
            outstanding_bytes: *bytes,
            alloc_calls: est.alloc_calls,
            alloc_bytes: est.alloc_bytes,
            oldest_age_s: oldest.map(|t| now_ns.saturating_sub(t) as f64 / 1e9),
            median_age_s: end_blocks
                .and_then(SiteBlocks::median_birth_ns)
                .map(|t| now_ns.saturating_sub(t) as f64 / 1e9),
            verdict,
            growth_bytes_per_s: trend.growth_bytes_per_s,
            stack_captured: s.stack_id != NO_STACK,
            stack_walk: if flags & STACK_FP_ONLY != 0 {
                "frame-pointers"
            } else {
                "unwind-tables"
            },
            truncated: truncated_reason(flags).is_some(),
            truncated_reason: truncated_reason(flags),
            frames: Default::default(),
            trend,
            history: hist,
        });
    }

    lap.mark("sites built");
    // The stacks of the sites the report shows (JSON: all of them), symbolized
    // in one batch.
    let shown: Vec<usize> = match opts.format {
        Format::Json => (0..sites.len()).collect(),
        Format::Text => report::text_order(&sites)
            .into_iter()
            .take(opts.top)
            .collect(),
    };
    // Each distinct address is symbolized once; the sites holding it share
    // its frames.
    let mut addrs: Vec<u64> = Vec::new();
    for &i in &shown {
        addrs.extend_from_slice(at.collector.stack(chosen[i].0.stack_id)?);
    }
    let occurrences = addrs.len();
    addrs.sort_unstable();
    addrs.dedup();
    lap.mark("stacks");
    let resolved = sym.symbolize(&at.modules, &addrs, true);
    // CPU of all threads (laps are): large batches are resolved on two.
    let cpu_sym = lap.mark("symbolize");
    log::debug!(
        "report symbolized {} frames ({} addresses) in {:.1} ms cpu",
        occurrences,
        addrs.len(),
        cpu_sym.as_secs_f64() * 1e3
    );
    // Each address's frames, the reasons of those unresolved, and where the
    // thread's entry code is in them.
    type Group = (std::sync::Arc<[report::Frame]>, Vec<Unresolved>, Bottoms);
    let groups: HashMap<u64, Group> = addrs
        .iter()
        .zip(resolved)
        .map(|(&a, frames)| {
            let reasons = frames.iter().filter_map(|f| f.unresolved).collect();
            let bottoms = Bottoms::of(&frames);
            (a, (frames.into(), reasons, bottoms))
        })
        .collect();
    lap.mark("groups");
    let mut unresolved = std::collections::BTreeMap::new();
    for &i in &shown {
        let stack = at.collector.stack(chosen[i].0.stack_id)?;
        let frames = &mut sites[i].frames;
        frames.reserve(stack.len());
        let mut keep = KeepAboveEntry::default();
        for addr in stack {
            let Some((group, reasons, bottoms)) = groups.get(addr) else {
                continue;
            };
            for &reason in reasons {
                *unresolved
                    .entry(unresolved_name(reason).to_string())
                    .or_insert(0u64) += 1;
            }
            frames.push_group(group.clone());
            keep.add(bottoms);
        }
        if let Some(n) = keep.frames() {
            frames.truncate(n);
        }
    }
    lap.mark("frames");
    let mut process_points = history.process();
    for p in &mut process_points {
        p.traced_bytes = (p.traced_bytes as f64 * traced_scale).round() as i64;
    }
    let process = ProcessReport {
        samples: process_points
            .iter()
            .map(|p| ProcessSample {
                t_s: p.t_ns.saturating_sub(history.start_ns()) as f64 / 1e9,
                stat: p.stat,
                traced_bytes: p.traced_bytes,
            })
            .collect(),
        summary: analyze::summarize_process(&process_points, vcfg),
    };

    let mut drops = Drops::from_counters(&counters);
    drops.unresolved_frames = unresolved;
    lap.mark("process");
    lap.log();

    Ok(Report {
        schema: report::SCHEMA,
        memtrace_version: env!("CARGO_PKG_VERSION"),
        target: TargetInfo {
            pid: at.pid,
            exe: at.exe.clone(),
            cmdline: at.cmdline.clone(),
            exited: meta.exited,
            exit_status: meta.exit_status,
        },
        started_at: report::rfc3339(meta.started_at),
        ended_at: report::rfc3339(meta.ended_at),
        duration_s: meta.duration.as_secs_f64(),
        end_reason: meta.end.as_str(),
        sampling: opts.sampling,
        totals,
        drops,
        allocator: AllocatorInfo {
            module: at.allocator.module.clone(),
            functions: at
                .allocator
                .points
                .iter()
                .flat_map(|p| p.names.iter().map(|n| n.to_string()))
                .collect(),
            probes: at.nprobes,
            probe_sites: at.allocator.points.iter().map(|p| p.probe_site()).collect(),
            probe_mechanism: at.probes.mechanism().name(),
            return_probes: counters.return_probes,
            calls_in_session_cookie: match at.probes.mechanism() {
                crate::attach::links::Mechanism::Session => at
                    .allocator
                    .points
                    .iter()
                    .filter(|p| crate::attach::links::call_in_cookie(p))
                    .flat_map(|p| p.names.iter().map(|n| n.to_string()))
                    .collect(),
                _ => Vec::new(),
            },
            own_calls_told_by: match at.probes.marked_calls() {
                Some(_) => "call-site probes",
                None => "return address",
            },
            own_call_sites: at.probes.marked_calls().unwrap_or_default().to_vec(),
            result_sites: at.probes.result_sites().to_vec(),
        },
        min_age_s: opts.min_age.as_secs_f64(),
        ages_from: if scan_all { "blocks" } else { "epochs" },
        verdict_config: vcfg.clone(),
        timeline: Timeline {
            interval_s: opts.interval.as_secs_f64(),
            samples: history.len(),
            capacity: history.capacity(),
            stride_intervals: history.stride(),
            samples_without_ages: history.samples_without_ages(),
            samples_with_epoch_ages: history.samples_with_epoch_ages(),
        },
        verdicts: VerdictCounts::of(&sites),
        process,
        unwind: at.tables.stats.clone(),
        attached: !at.launched,
        sites,
    })
}

#[cfg(test)]
mod tests {
    use super::{Bottoms, KeepAboveEntry, is_bottom};
    use crate::report::Frame;

    fn frame(bottom: bool) -> Frame {
        Frame {
            address: 1,
            module: None,
            function: Some(if bottom { "_start" } else { "work" }.into()),
            file: None,
            line: None,
            inlined: false,
            unresolved: None,
        }
    }

    /// The rule on the flat list of frames.
    fn keep_flat(frames: &[Frame]) -> Option<usize> {
        let first = frames.iter().position(is_bottom)?;
        Some(first + frames[first..].iter().take_while(|f| is_bottom(f)).count())
    }

    #[test]
    fn entry_frames_are_found_across_addresses_as_in_the_flat_stack() {
        // Every stack of up to 4 addresses, each of 0 to 3 frames that are
        // entry code or not.
        let groups: Vec<Vec<Frame>> = (0..=3usize)
            .flat_map(|len| {
                (0..1u32 << len)
                    .map(move |bits| (0..len).map(|i| frame(bits >> i & 1 == 1)).collect())
            })
            .collect();
        let mut checked = 0;
        let mut stack = Vec::new();
        fn each(groups: &[Vec<Frame>], stack: &mut Vec<usize>, depth: usize, checked: &mut usize) {
            let flat: Vec<Frame> = stack.iter().flat_map(|&g| groups[g].clone()).collect();
            let mut keep = KeepAboveEntry::default();
            for &g in stack.iter() {
                keep.add(&Bottoms::of(&groups[g]));
            }
            assert_eq!(keep.frames(), keep_flat(&flat), "{flat:?}");
            *checked += 1;
            if depth == 4 {
                return;
            }
            for g in 0..groups.len() {
                stack.push(g);
                each(groups, stack, depth + 1, checked);
                stack.pop();
            }
        }
        each(&groups, &mut stack, 0, &mut checked);
        assert!(checked > 15 * 15 * 15 * 15, "{checked} stacks");
    }
}
