//! A thread that keeps memtrace's promises when its main thread cannot: the
//! probes are out within a second of the end of tracing, and memtrace ends.
//!
//! The main thread reads files the target can influence (its libraries and
//! their debug files, to capture modules, compile unwind tables and
//! symbolize). Such a read can block for as long as the file's filesystem
//! wants (a FUSE file the target serves), and nothing in a thread can
//! interrupt it. So this thread watches the same end of tracing (a signal,
//! `--duration`, the target's exit) on its own:
//!
//! - when tracing ends and the main thread has not removed the probes
//!   [`DETACH_GRACE`] later, it removes them itself: every BPF link and perf
//!   event of memtrace's is replaced by `/dev/null` in the fd table (dup2),
//!   which releases the kernel's link, and with it the probes, at once;
//! - when the main thread then makes no progress for [`STUCK_AFTER`] (or
//!   leaves a second signal unread for [`SIGNAL_UNREAD`]), it writes the
//!   report as far as the main thread built it, saying what was cut short,
//!   or says that there is none, and ends the process with status 1;
//! - while attaching, a signal that setup does not act on within
//!   [`SETUP_GRACE`] ends the process (probes removed first).
use std::{
    fs::File,
    io::Write,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use super::Format;
use crate::escape::Escaped;
use crate::report::Report;

/// How long after the end of tracing the main thread has to remove the
/// probes itself, before this thread does.
pub(super) const DETACH_GRACE: Duration = Duration::from_millis(500);

/// How long the main thread may make no progress (see [`Watchdog::doing`])
/// once tracing ended. Longer than any wait of its own (10 s for debug info).
const STUCK_AFTER: Duration = Duration::from_secs(20);

/// A second SIGINT/SIGTERM left unread this long: the main thread is not
/// listening, and the user wants memtrace to end.
const SIGNAL_UNREAD: Duration = Duration::from_secs(3);

/// How long setup may go on after a signal while attaching: loading and
/// verifying the BPF programs alone can take seconds on a busy machine.
const SETUP_GRACE: Duration = Duration::from_secs(30);

/// How often the thread looks at the signals and the state.
const TICK: Duration = Duration::from_millis(50);

/// The report as far as the main thread built it, and where it goes.
pub(super) struct Fallback {
    pub(super) report: Report,
    pub(super) format: Format,
    pub(super) text: crate::report::TextStyle,
    /// The `--output` file (a duplicate of its descriptor) or stdout's.
    pub(super) out: File,
    /// Whether `out` is the `--output` file, emptied before it is written.
    pub(super) truncate: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Tracing,
    /// The main thread is removing the probes: their descriptors are its own.
    Detaching,
    Detached,
}

struct State {
    phase: Phase,
    /// When tracing ended (or a signal came during setup).
    stop: Option<Instant>,
    deadline: Option<Instant>,
    pidfd: Option<RawFd>,
    /// What the main thread is doing, and since when.
    activity: String,
    progress: Instant,
    fallback: Option<Fallback>,
    /// Said by this thread, for the report.
    notes: Vec<String>,
    done: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// The main thread's side.
pub(super) struct Watchdog {
    shared: Arc<Shared>,
}

impl Watchdog {
    /// Starts the thread; `signals` is the signalfd of SIGINT and SIGTERM,
    /// which the thread only polls (the main thread reads it).
    pub(super) fn start(signals: BorrowedFd<'_>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                phase: Phase::Setup,
                stop: None,
                deadline: None,
                pidfd: None,
                activity: "attaching".into(),
                progress: Instant::now(),
                fallback: None,
                notes: Vec::new(),
                done: false,
            }),
            wake: Condvar::new(),
        });
        let devnull = File::open("/dev/null")?;
        let signal_fd = signals.as_raw_fd();
        let s = shared.clone();
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watch(&s, signal_fd, devnull))?;
        Ok(Watchdog { shared })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }

    /// Tracing has begun: it ends at `deadline`, or when `pidfd` says the
    /// target exited, or at a signal. The pidfd must outlive the watchdog.
    pub(super) fn tracing(&self, pidfd: BorrowedFd<'_>, deadline: Option<Instant>) {
        let mut s = self.lock();
        s.phase = Phase::Tracing;
        s.pidfd = Some(pidfd.as_raw_fd());
        s.deadline = deadline;
        s.stop = None;
    }

    /// What the main thread starts doing now (said if it is stuck at it).
    pub(super) fn doing(&self, activity: impl Into<String>) {
        let mut s = self.lock();
        s.activity = activity.into();
        s.progress = Instant::now();
    }

    /// The main thread removes the probes now.
    pub(super) fn detaching(&self) {
        let mut s = self.lock();
        s.stop.get_or_insert_with(Instant::now);
        if s.phase != Phase::Detached {
            s.phase = Phase::Detaching;
        }
        s.activity = "removing the probes".into();
        s.progress = Instant::now();
    }

    pub(super) fn detached(&self) {
        self.lock().phase = Phase::Detached;
        self.shared.wake.notify_all();
    }

    /// The report as far as it is built, for the watchdog to write if the
    /// main thread gets stuck finishing it.
    pub(super) fn set_fallback(&self, fallback: Option<Fallback>) {
        self.lock().fallback = fallback;
    }

    /// What this thread did that the report must say.
    pub(super) fn notes(&self) -> Vec<String> {
        self.lock().notes.clone()
    }

    /// The report is written: nothing is left to watch.
    pub(super) fn done(&self) {
        self.lock().done = true;
        self.shared.wake.notify_all();
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic elsewhere must not stop the watchdog.
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether fd is readable now.
fn readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents != 0
}

fn watch(shared: &Shared, signal_fd: RawFd, devnull: File) {
    let mut unread_since: Option<Instant> = None;
    loop {
        let mut s = lock(shared);
        if s.done {
            return;
        }
        let now = Instant::now();
        let signal = readable(signal_fd);
        match s.phase {
            Phase::Setup => {
                if signal {
                    let stop = *s.stop.get_or_insert(now);
                    if now >= stop + SETUP_GRACE {
                        detach_probes(&devnull);
                        let _ = writeln!(
                            std::io::stderr(),
                            "memtrace: error: a signal came while attaching, and memtrace is \
                             still busy {} {:.0}s later: probes removed, nothing traced",
                            Escaped(&s.activity),
                            (now - stop).as_secs_f64()
                        );
                        exit_now();
                    }
                }
            }
            Phase::Tracing => {
                let ended =
                    signal || s.deadline.is_some_and(|d| now >= d) || s.pidfd.is_some_and(readable);
                if ended {
                    s.stop.get_or_insert(now);
                }
                if let Some(stop) = s.stop
                    && now >= stop + DETACH_GRACE
                {
                    detach_probes(&devnull);
                    s.phase = Phase::Detached;
                    let note = format!(
                        "probes: removed by memtrace's watchdog {:.1}s after tracing ended, \
                         while memtrace was busy {}",
                        (now - stop).as_secs_f64(),
                        s.activity
                    );
                    let _ = writeln!(std::io::stderr(), "memtrace: {}", Escaped(&note));
                    s.notes.push(note);
                }
            }
            Phase::Detaching | Phase::Detached => {
                unread_since = match (signal, unread_since) {
                    (false, _) => None,
                    (true, None) => Some(now),
                    (true, since) => since,
                };
                let unread = unread_since.is_some_and(|t| now >= t + SIGNAL_UNREAD);
                // Stuck: no progress since tracing ended, or since the last step.
                let since = s.stop.map_or(s.progress, |stop| stop.max(s.progress));
                if s.phase == Phase::Detached && (unread || now >= since + STUCK_AFTER) {
                    give_up(&mut s, now);
                }
            }
        }
        drop(shared.wake.wait_timeout(s, TICK));
    }
}

/// Writes what the main thread built of the report, or says there is none,
/// and ends memtrace: its main thread is stuck.
fn give_up(s: &mut State, now: Instant) -> ! {
    let blocked = format!(
        "memtrace was blocked {} for {:.0}s",
        s.activity,
        (now - s.progress).as_secs_f64()
    );
    let mut err = std::io::stderr();
    match s.fallback.take() {
        Some(mut f) => {
            f.report
                .cut_short
                .push(format!("report: {blocked}; written as it was then"));
            let _ = writeln!(
                err,
                "memtrace: {}: writing the report as far as it was built (see its cut_short)",
                Escaped(&blocked)
            );
            if f.truncate {
                let _ = f.out.set_len(0);
            }
            let written = super::output::emit(&f.report, f.format, f.text, &mut f.out);
            if let Err(e) = written {
                let _ = writeln!(err, "memtrace: error: writing the report: {e}");
            }
        }
        None => {
            let _ = writeln!(
                err,
                "memtrace: error: {}: no report written (the probes are removed)",
                Escaped(&blocked)
            );
        }
    }
    exit_now()
}

/// Ends the process at once: the main thread may hold locks (stdout's) that
/// an orderly exit would wait for.
fn exit_now() -> ! {
    // SAFETY: _exit ends the process; nothing after it runs.
    unsafe { libc::_exit(1) }
}

/// Releases every BPF link and perf event memtrace holds, whatever its owner
/// is doing: each descriptor is replaced by /dev/null (dup2 is atomic), so the
/// kernel drops its last reference to the link and removes the link's probes;
/// the owner later closes a /dev/null.
fn detach_probes(devnull: &File) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let mut n = 0;
    for e in dir.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
            continue;
        };
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if t == "anon_inode:bpf_link" || t == "anon_inode:[perf_event]" {
            // SAFETY: dup2 onto a descriptor this process owns, of a kind no
            // other code of memtrace creates; its owner only closes it later.
            if unsafe { libc::dup2(devnull.as_raw_fd(), fd) } >= 0 {
                n += 1;
            }
        }
    }
    log::debug!("watchdog: {n} links and perf events released");
}
