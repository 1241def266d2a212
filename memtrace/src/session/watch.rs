//! Watching the target while it is traced: signals, its pidfd, the schedule of
//! live summaries and module refreshes, and why tracing ended.
use crate::escape::Escaped;
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use super::{
    Options, Session,
    summary::{self, Summary},
    target::{self, Attached},
};

/// How often the target's mappings are re-read, so that a library it loads with
/// dlopen is captured (and kept open) soon after, whatever --interval is.
const MODULE_REFRESH: Duration = Duration::from_secs(1);

/// How long the watch loop waits for a capture of new modules it started
/// (it goes on without it after that, and takes it when it comes).
const CAPTURE_WAIT: Duration = Duration::from_millis(200);
/// How often the code objects a Python target ran for the first time are
/// read: soon, as the target may free them (or exit).
const PYTHON_POLL: Duration = Duration::from_millis(20);

/// Why tracing stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    Signal,
    Duration,
    TargetExited,
    /// The target called exec: the program memtrace attached to is gone.
    TargetExec,
}

impl End {
    pub(super) fn as_str(self) -> &'static str {
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
pub(super) struct Signals {
    fd: OwnedFd,
}

impl Signals {
    pub(super) fn block() -> Result<Self> {
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

    /// Whether SIGINT or SIGTERM arrived (and takes it), without waiting.
    pub(super) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    pub(super) fn pending(&self) -> bool {
        let mut info = [0u8; 128];
        // SAFETY: reading one signalfd_siginfo into a buffer of its size.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        n > 0
    }
}

pub(super) fn pidfd_open(pid: u32) -> Result<OwnedFd> {
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

/// When the next live summary, module refresh and the end of `--duration` are due.
struct Schedule {
    deadline: Option<Instant>,
    next_summary: Instant,
    next_refresh: Instant,
    /// A Python target only.
    next_python: Option<Instant>,
    /// With `--snapshot-every`.
    next_snapshot: Option<Instant>,
}

impl Schedule {
    fn new(start: Instant, opts: &Options, python: bool) -> Self {
        Schedule {
            deadline: opts.duration.map(|d| start + d),
            next_summary: start + opts.interval,
            next_refresh: start + MODULE_REFRESH,
            next_python: python.then_some(start),
            next_snapshot: opts.snapshots.as_ref().map(|o| start + o.every),
        }
    }

    /// Moves the next snapshot on from `due` past `now`; returns how many were
    /// missed (a snapshot took longer than the period).
    fn snapshot_taken(&mut self, due: Instant, now: Instant, every: Duration) -> u64 {
        let missed = (now.saturating_duration_since(due).as_nanos() / every.as_nanos()) as u64;
        self.next_snapshot = Some(due + every * (missed as u32 + 1));
        missed
    }

    /// The next moment something is due.
    fn next(&self) -> Instant {
        let mut until = self.next_summary.min(self.next_refresh);
        for t in [self.next_python, self.next_snapshot].into_iter().flatten() {
            until = until.min(t);
        }
        match self.deadline {
            Some(d) => until.min(d),
            None => until,
        }
    }
}

/// Traces until a signal, the target's end or exec, or `--duration`: a live
/// summary every interval, the target's new modules every [`MODULE_REFRESH`].
pub(super) fn watch(opts: &Options, s: &mut Session) -> End {
    let mut schedule = Schedule::new(s.trace_start, opts, s.at.python.is_some());
    {
        use std::os::fd::AsFd;
        s.watchdog.tracing(s.pidfd.as_fd(), schedule.deadline);
    }
    let mut last = Summary::default();
    loop {
        s.watchdog.doing("tracing");
        let now = Instant::now();
        if schedule.deadline.is_some_and(|d| now >= d) {
            return End::Duration;
        }
        let timeout = schedule
            .next()
            .saturating_duration_since(now)
            .min(super::images::EXEC_POLL);
        let (sig, exited) = wait_events(&s.signals, &s.pidfd, timeout);
        if exited {
            return End::TargetExited;
        }
        if sig {
            return End::Signal;
        }
        if let Some(exec_ns) = super::images::exec_seen(s) {
            if let Some(end) = exec_called(opts, s, exec_ns) {
                return end;
            }
            last = Summary::default();
            continue;
        }
        if opts.follow_forks {
            super::children::poll(opts, s);
        }
        let now = Instant::now();
        if let Some(next) = schedule.next_python.filter(|&t| now >= t) {
            schedule.next_python = Some(next.max(now - PYTHON_POLL) + PYTHON_POLL);
            read_python_codes(&mut s.at);
        }
        if now >= schedule.next_refresh {
            schedule.next_refresh = now + MODULE_REFRESH;
            s.watchdog.doing("capturing the target's new modules");
            // (With the exec watched, the BPF side says so, and the exec is
            // followed: its mappings are replaced just before it tells.)
            if !s.at.exec_watched && called_exec(&s.at) {
                return End::TargetExec;
            }
            s.capture.poll(&mut s.at, CAPTURE_WAIT, &mut s.cut_short);
        }
        if now >= schedule.next_summary {
            schedule.next_summary += opts.interval;
            interval(opts, s, &mut last);
        }
        if let Some((due, o)) = schedule.next_snapshot.zip(opts.snapshots.as_ref())
            && now >= due
        {
            s.watchdog.doing("taking a snapshot");
            super::snapshot::take(opts, s);
            let missed = schedule.snapshot_taken(due, Instant::now(), o.every);
            if let Some(snaps) = &s.snapshots {
                snaps.count_skipped(missed);
            }
        }
        if let Some(srv) = &s.server
            && srv.published.want_profile()
        {
            match super::live::profile(&mut s.at, &mut s.symbolizer, opts, s.trace_start) {
                Ok(p) => srv.published.set_profile(p),
                Err(e) => log::warn!("--listen: live profile failed: {e:#}"),
            }
        }
    }
}

/// The target called exec: follows it (None), or says why not and ends.
fn exec_called(opts: &Options, s: &mut Session, exec_ns: u64) -> Option<End> {
    if !opts.follow_exec {
        s.images.not_followed(s.at.pid, exec_ns);
        eprintln!(
            "memtrace: pid {} called exec (it now runs {}): not followed \
             (--no-follow-exec); reporting what the old program did",
            s.at.pid,
            Escaped(&target::proc_exe(s.at.pid).unwrap_or_else(|| "?".into()))
        );
        return Some(End::TargetExec);
    }
    if let Err(e) = super::images::follow_exec(opts, s, exec_ns) {
        eprintln!(
            "memtrace: pid {} exec'd {}, which memtrace cannot trace ({e:#}): \
             reporting what the program before did",
            s.at.pid,
            Escaped(&target::proc_exe(s.at.pid).unwrap_or_else(|| "?".into()))
        );
        return Some(End::TargetExec);
    }
    None
}

/// Each interval's work: the resources sampled, the live summary (and the
/// metrics, with `--listen`).
fn interval(opts: &Options, s: &mut Session, last: &mut Summary) {
    s.watchdog.doing("making the live summary");
    crate::knobs::debug_stall("summary");
    if let Some(fds) = &mut s.fds
        && let Err(e) = fds.sample(&s.at, None)
    {
        log::warn!("reading the target's fds failed: {e:#}");
    }
    if let Some(m) = &mut s.mappings
        && let Err(e) = m.sample(&mut s.at, None)
    {
        log::warn!("reading the target's mappings failed: {e:#}");
    }
    last.fds = s.fds.as_ref().map(|f| {
        f.live_part()
            + &s.mappings
                .as_ref()
                .map(|m| m.live_part())
                .unwrap_or_default()
    });
    if let Some(t) = &mut s.threads {
        t.sample(&s.at, None);
    }
    last.threads = s.threads.as_ref().map(|t| t.live_part());
    let resources = s
        .server
        .as_ref()
        .and_then(|_| super::live::resource_metrics(s, &opts.verdicts));
    let work = summary::live_summary(
        &mut s.at,
        &mut s.symbolizer,
        last,
        s.trace_start,
        &mut s.history,
        opts,
        s.server.as_ref().map(|srv| (&*srv.published, resources)),
    );
    if let Err(e) = work {
        log::warn!("live summary failed: {e:#}");
    }
}

/// Whether the target called exec, which ends tracing; says so if it did.
fn called_exec(at: &Attached) -> bool {
    let pid = at.pid;
    if !target::called_exec(pid, &at.allocators) {
        return false;
    }
    eprintln!(
        "memtrace: pid {pid} called exec (it now runs {}): the new program is not \
         traced; reporting what the old one did",
        Escaped(&target::proc_exe(pid).unwrap_or_else(|| "?".into()))
    );
    true
}

/// Reads the code objects the target's Python ran for the first time.
pub(super) fn read_python_codes(at: &mut Attached) {
    if let Some(py) = at.python.as_mut() {
        for copy in at.collector.maps.python_code_copies() {
            py.add_copy(&copy);
        }
        for (code, check) in at.collector.maps.new_python_codes() {
            py.resolve_code(code, check);
        }
    }
}
