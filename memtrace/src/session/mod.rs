//! One tracing session: setup (attach or launch) → watch → finish (report).
//!
//! - [`target`]: attach to a pid or launch a command; the [`target::Attached`] state.
//! - [`launch`]: starting a program suspended; [`preflight`]: checks before anything loads.
//! - [`watch`]: signals, the target's pidfd, the loop until tracing ends.
//! - [`summary`]: the live line each interval, history samples, growth alerts.
//! - [`ages`]: ages of outstanding blocks, from a scan or the epoch aggregates.
//! - [`finish`]: detach, reap a launched child, write the report, exit status.
//! - [`build`]: the report's stages; [`frames`]: its stacks as frames.
//! - [`output`]: the `--output` file or stdout.
use std::{
    os::fd::OwnedFd,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};

mod ages;
mod build;
mod capture;
mod children;
mod finish;
mod frames;
mod images;
mod launch;
mod live;
mod mappings;
mod output;
mod preflight;
mod progress;
mod resources;
mod serve;
mod site_history;
pub mod snapshot;
mod summary;
mod target;
mod threads;
mod watch;
mod watchdog;

use output::ReportFile;
pub use snapshot::SnapshotOptions;
use target::Attached;
pub use target::PythonOptions;
use watch::Signals;
use watchdog::Watchdog;

use crate::escape::{Escaped, untraced_entry};
use crate::{
    analyze::{HISTORY_CAPACITY, History, VerdictConfig},
    kernel::{collect::monotonic_ns, maps::MapSizes},
    report::{AttachTimes, Sampling},
    steps::Steps,
    symbolize::Symbolizer,
    units::format_duration,
};

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
    /// `-v`: every frame of the text report, with addresses and full paths.
    pub verbose: bool,
    /// Each report to write, in its format, to its file (None: stdout).
    pub reports: Vec<(Format, Option<PathBuf>)>,
    /// `--listen`: where to serve /metrics and /debug/pprof/heap.
    pub listen: Option<std::net::SocketAddr>,
    /// Per-site series in /metrics: the top N sites by outstanding bytes.
    pub metrics_top_sites: usize,
    /// `--snapshot-every`: the report as it stands, written every so often.
    pub snapshots: Option<SnapshotOptions>,
    pub fail_on_leak: bool,
    pub alert_growth: Option<crate::units::Rate>,
    /// What to do with a Python target.
    pub python: PythonOptions,
    pub map_sizes: MapSizes,
    pub sampling: Sampling,
    pub verdicts: VerdictConfig,
    /// Trace resources beyond the heap (file descriptors); `--no-resources`.
    pub resources: bool,
    /// Trace on as the new program when the target calls exec; `--no-follow-exec`.
    pub follow_exec: bool,
    /// Trace the processes the target creates, each from its first
    /// instruction; `--follow-forks`.
    pub follow_forks: bool,
}

/// The final report's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Pprof,
    Folded,
    Svg,
}

impl Format {
    /// Whether the report shows every site (else the top `--top` only).
    fn shows_every_site(self) -> bool {
        self != Format::Text
    }
}

impl Options {
    /// How the text report is written (colours are decided where it goes).
    pub fn text_style(&self) -> crate::report::TextStyle {
        crate::report::TextStyle {
            top: self.top,
            verbose: self.verbose,
            color: false,
        }
    }

    /// Whether some report shows every site (else only the text report's top).
    fn shows_every_site(&self) -> bool {
        self.reports.iter().any(|(f, _)| f.shows_every_site())
    }

    /// The formats of each snapshot: those of the reports that show every
    /// site (the text report is for a person at the end), JSON last and
    /// always (`memtrace diff` reads it).
    fn snapshot_formats(&self) -> Vec<Format> {
        let mut formats: Vec<Format> = Vec::new();
        for (f, _) in &self.reports {
            if !matches!(f, Format::Text | Format::Json) && !formats.contains(f) {
                formats.push(*f);
            }
        }
        formats.push(Format::Json);
        formats
    }
}

/// Traces `target` as `opts` say; returns memtrace's exit status.
pub fn run(opts: &Options, target: Target) -> Result<i32> {
    let mut session = setup(opts, &target)?;
    let end = watch::watch(opts, &mut session);
    finish::finish(opts, session, end)
}

/// A session once the probes are in, carried from setup to finish.
// Fields drop in declaration order: the reverse of their creation in `setup`,
// as its locals would (the output file, opened first, is closed last).
struct Session {
    history: History,
    symbolizer: Symbolizer,
    pidfd: OwnedFd,
    at: Attached,
    /// Polls `signals` and `pidfd`: declared before them, so it is dropped first.
    watchdog: Watchdog,
    signals: Signals,
    /// Each report's format and its `--output` file (None: stdout).
    outputs: Vec<(Format, Option<ReportFile>)>,
    /// `--listen`'s server, when asked for.
    server: Option<serve::Server>,
    /// `--snapshot-every`'s directory and writer, when asked for.
    snapshots: Option<snapshot::Snapshots>,
    started_at: SystemTime,
    /// When tracing began: the start of the summary schedule and the duration.
    trace_start: Instant,
    /// What was cut short while tracing (for the report's `cut_short`).
    cut_short: Vec<String>,
    /// The capture of new modules under way.
    capture: capture::Capture,
    /// How long attaching took, step by step.
    attach_times: AttachTimes,
    /// fd tracing, when on.
    fds: Option<resources::Fds>,
    /// Thread tracing, when on.
    threads: Option<threads::Threads>,
    /// Mapping tracing, when on (with fd tracing).
    mappings: Option<mappings::Mappings>,
    /// The programs the target ran before the current one (exec).
    images: images::Images,
    /// `--follow-forks`: the processes it created, traced.
    children: children::Children,
}

/// Checks, opens the output, attaches, and starts loading debug info.
fn setup(opts: &Options, target: &Target) -> Result<Session> {
    preflight::check_privileges()?;
    preflight::check_kernel()?;
    preflight::check_map_memory(&opts.map_sizes)?;
    let outputs = opts
        .reports
        .iter()
        .map(|(f, path)| Ok((*f, ReportFile::open(path)?)))
        .collect::<Result<Vec<_>>>()?;
    let signals = Signals::block()?;
    let watchdog = Watchdog::start(signals.as_fd()).context("starting the watchdog thread")?;
    // After blocking the signals (its thread inherits the mask: a SIGINT must
    // reach the watch loop, not kill memtrace), and before attaching (a taken
    // port fails before any probe goes in).
    let server = opts.listen.map(serve::start).transpose()?;
    let snapshots = opts
        .snapshots
        .as_ref()
        .map(|o| snapshot::Snapshots::open(o, opts.snapshot_formats()))
        .transpose()?;
    let started_at = SystemTime::now();
    let steps = Arc::new(Steps::new());
    let progress = progress::Progress::start(Arc::clone(&steps));
    let mut symbolizer = Symbolizer::new();
    let at = target::attach(target, opts, &steps, &mut symbolizer);
    // (The progress line is gone before any message.)
    drop(progress);
    let at = at?;
    let pidfd = watch::pidfd_open(at.pid)?;
    let attach_times = AttachTimes::new(steps.start_time().elapsed(), steps.finished());
    log::debug!("attach steps: {attach_times}");
    announce(opts, &at, server.as_ref(), &attach_times);
    let trace_start = Instant::now();
    let start_ns = monotonic_ns();
    let history = History::new(HISTORY_CAPACITY, start_ns, opts.interval);
    let (fds, threads, mappings) = start_resources(&at, start_ns, opts.interval);
    Ok(Session {
        history,
        symbolizer,
        pidfd,
        at,
        watchdog,
        signals,
        outputs,
        server,
        snapshots,
        started_at,
        trace_start,
        cut_short: Vec::new(),
        capture: Default::default(),
        attach_times,
        fds,
        threads,
        mappings,
        images: images::Images::new(start_ns),
        children: children::Children::new(start_ns),
    })
}

/// Starts reading the resources the BPF side traces in `at` (each when its
/// probes are in; a failure is said and leaves that kind untraced).
fn start_resources(
    at: &Attached,
    start_ns: u64,
    interval: Duration,
) -> (
    Option<resources::Fds>,
    Option<threads::Threads>,
    Option<mappings::Mappings>,
) {
    let fds = if at.fd_tracepoints > 0 {
        match resources::Fds::start(at, start_ns, interval) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("memtrace: warning: file descriptors are not traced: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let threads = (at.thread_probes > 0).then(|| threads::Threads::start(at, start_ns, interval));
    let mappings = if fds.is_some() {
        match mappings::Mappings::start(at, start_ns, interval) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("memtrace: warning: mappings are not traced: {e:#}");
                None
            }
        }
    } else {
        None
    };
    (fds, threads, mappings)
}

/// Says on stderr what was attached, where metrics are served, and which
/// allocator functions are not traced.
fn announce(
    opts: &Options,
    at: &Attached,
    server: Option<&serve::Server>,
    attach_times: &AttachTimes,
) {
    let on: Vec<String> = at
        .allocators
        .modules
        .iter()
        .map(|a| {
            let names: Vec<&str> = a
                .points
                .iter()
                .flat_map(|p| &p.names)
                .map(String::as_str)
                .collect();
            format!("{} ({})", Escaped(&a.module), names.join(", "))
        })
        .collect();
    let ns_pid = match at.namespaces.other_pid(at.pid) {
        Some(p) => format!(", {p} in its pid namespace"),
        None => String::new(),
    };
    eprintln!(
        "memtrace: attached to pid {} ({}{ns_pid}): {} probes on {} in {}",
        at.pid,
        Escaped(&at.comm),
        at.nprobes,
        on.join(" and "),
        format_duration(Duration::from_secs_f64(attach_times.total_s)),
    );
    if let Some(srv) = server {
        // Until the first interval: the target, and nothing counted yet.
        srv.published.set_metrics(crate::report::metrics::Metrics {
            pid: at.pid,
            sampling_mean_bytes: opts.sampling.mean_bytes(),
            ..Default::default()
        });
        eprintln!(
            "memtrace: serving http://{}/metrics and /debug/pprof/heap",
            srv.addr
        );
    }
    warn_untraced(&at.allocators);
}

/// Says on stderr which allocator modules are not probed (on FUSE mounts)
/// and which allocator functions are not traced.
fn warn_untraced(allocators: &crate::attach::allocator::Allocators) {
    for module in &allocators.on_fuse {
        eprintln!(
            "memtrace: warning: {} is on a FUSE mount: its allocator functions are not \
             probed (putting a uprobe in a file makes the kernel read it on memtrace's own \
             thread, where a FUSE server that never answers would hold memtrace for good); \
             the blocks they allocate are not seen",
            Escaped(module)
        );
    }
    if !allocators.untraced.is_empty() {
        let list: Vec<String> = allocators
            .untraced
            .iter()
            .map(|u| untraced_entry(&u.name, &u.module, u.reason.as_deref()))
            .collect();
        eprintln!(
            "memtrace: warning: the target may call allocator functions memtrace does not \
             trace, whose blocks it will not see: {}",
            list.join(", ")
        );
    }
}

/// Starts loading the debug info nearly every stack needs, in the
/// background: the program's (`exe`) and the allocator library's (libc: the
/// bottom of every thread's stack), so that the report does not wait for
/// it (libc's, with libc6-dbg installed, takes tens of milliseconds). Called
/// as soon as they are known, while the kernel verifies the programs.
fn preload_debug_info(
    symbolizer: &mut Symbolizer,
    modules: &crate::symbolize::ProcessModules,
    exe: Option<&str>,
    allocator_modules: &[&str],
) {
    symbolizer.load_modules_in_background(
        modules,
        modules.modules().iter().filter(|m| {
            Some(m.path.as_str()) == exe || allocator_modules.iter().any(|a| *a == m.path)
        }),
    );
}
