//! The end of a session: detach the probes, settle the target (reap a launched
//! child), build and write the report, and choose memtrace's exit status.
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;

use super::{
    Options, Session,
    build::{FallbackOut, Purpose, ReportMeta, build_report},
    launch::{self, ChildState},
    output::write_report,
    target::alive,
    watch::End,
};
use crate::{
    kernel::batch::process_cpu,
    kernel::collect::monotonic_ns,
    process::mapped::truncated_pages,
    process::stat::{self as procstat, ProcStat},
};

/// How long the end of tracing waits for the capture of the target's newest
/// modules.
const FINAL_CAPTURE_WAIT: Duration = Duration::from_secs(1);
/// How long the end of tracing waits for a snapshot still being written.
const SNAPSHOT_WRITE_WAIT: Duration = Duration::from_secs(10);

/// The moment tracing ended, and the target's own figures then.
struct Stopped {
    end_ns: u64,
    ended_at: SystemTime,
    duration: Duration,
    end_process: Option<ProcStat>,
}

/// How the target ended up: whether it exited, and a launched child's state.
struct Outcome {
    exited: bool,
    state: Option<ChildState>,
}

impl Outcome {
    fn exit_code(&self) -> Option<i32> {
        self.state.and_then(|s| s.exit_code())
    }
}

/// Detaches, reports, and returns memtrace's exit status.
pub(super) fn finish(opts: &Options, mut s: Session, end: End) -> Result<i32> {
    let stopped = stop_tracing(&mut s, end);
    if opts.follow_forks {
        s.watchdog
            .doing("ending the tracing of the target's children");
        super::children::end_all(opts, &mut s, stopped.end_ns);
    }
    s.watchdog.doing("settling the target");
    // While the target may still run: its last new code objects.
    super::watch::read_python_codes(&mut s.at);
    let outcome = settle_target(&mut s, end)?;
    s.capture.end(&mut s.cut_short);
    let snapshots = s.snapshots.as_mut().map(|snaps| {
        s.watchdog
            .doing("waiting for the last snapshot to be written");
        let (stats, note) = snaps.finish(SNAPSHOT_WRITE_WAIT);
        s.cut_short.extend(note);
        stats
    });
    let cpu_report = process_cpu();
    log::debug!(
        "report begins at {:.3} ms of process cpu",
        cpu_report.as_secs_f64() * 1e3
    );
    let meta = ReportMeta {
        started_at: s.started_at,
        ended_at: stopped.ended_at,
        duration: stopped.duration,
        end_reason: end.as_str(),
        end_ns: stopped.end_ns,
        exited: outcome.exited,
        exit_status: outcome.exit_code(),
        end_process: stopped.end_process,
        cut_short: cut_short(&s),
        attach: s.attach_times.clone(),
        snapshots,
        lineage: Some(super::children::lineage(opts, &s)),
    };
    let fallback = fallback_out(&s);
    let mut report = build_report(opts, &mut s, meta, Purpose::Final(fallback))?;
    if opts.follow_forks
        && let Some(lineage) = &mut report.lineage
    {
        let (mut part, sites) =
            super::children::process_part(&mut s.at, &mut s.symbolizer, opts.sampling, None);
        part.ended_s = stopped.duration.as_secs_f64();
        if outcome.exited {
            part.ended_by = "exited".into();
        }
        super::children::fill_lineage(&s, (part, sites), lineage);
    }
    s.watchdog.doing("writing the report");
    let cpu_written = process_cpu();
    for (format, file) in &mut s.outputs {
        write_report(&report, *format, opts.text_style(), file.as_mut())?;
    }
    s.watchdog.done();
    let cpu_end = process_cpu();
    log::debug!(
        "report built in {:.1} ms cpu, written in {:.1} ms cpu",
        cpu_written.saturating_sub(cpu_report).as_secs_f64() * 1e3,
        cpu_end.saturating_sub(cpu_written).as_secs_f64() * 1e3,
    );
    for (_, path) in &opts.reports {
        if let Some(path) = path {
            eprintln!("memtrace: report written to {}", path.display());
        }
    }
    // Only a launched child's status is passed on: an attached process is not ours.
    let status = if s.at.launched {
        outcome.exit_code().unwrap_or(0)
    } else {
        0
    };
    let leaks = report.verdicts.leak
        + report.resources.as_ref().map_or(0, |r| {
            r.fds.leaks()
                + r.threads.as_ref().map_or(0, |t| t.leaks())
                + r.mappings.as_ref().map_or(0, |m| m.leaks())
        });
    // The process ends next: freeing a report of ten thousand sites and the
    // symbolizer's debug info piece by piece would cost tens of milliseconds.
    std::mem::forget(report);
    std::mem::forget(s.symbolizer);
    std::mem::forget(s.history);
    Ok(exit_status(opts, status, leaks))
}

/// What was cut short, for the report: said while tracing, by the watchdog,
/// the pages of truncated files read as zeros, and files of FUSE mounts not
/// read.
pub(super) fn cut_short(s: &Session) -> Vec<String> {
    let mut notes = s.cut_short.clone();
    notes.extend(s.watchdog.notes());
    let pages = truncated_pages();
    if pages > 0 {
        notes.push(format!(
            "files: {pages} pages of files truncated while memtrace read them were read as \
             zeros; frames in those files may be unresolved"
        ));
    }
    notes.extend(crate::process::served::notes());
    notes.extend(crate::process::mem::notes());
    notes
}

/// Where the watchdog writes the report if the main thread cannot: the
/// first report's `--output` file or stdout, through descriptors of its own.
fn fallback_out(s: &Session) -> Option<FallbackOut> {
    use std::os::fd::AsFd;
    let (format, file) = s.outputs.first()?;
    let (out, truncate) = match file {
        Some(f) => (f.try_clone_file(), true),
        None => (
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map(std::fs::File::from),
            false,
        ),
    };
    match out {
        Ok(out) => Some(FallbackOut {
            out,
            truncate,
            format: *format,
        }),
        Err(e) => {
            log::warn!("no descriptor for the watchdog's report: {e}");
            None
        }
    }
}

/// Takes the end of tracing and removes the probes.
fn stop_tracing(s: &mut Session, end: End) -> Stopped {
    // Ages and the duration are taken at the end of tracing: detaching can take
    // a second. Then the probes go: the target runs at full speed again, and the
    // figures no longer move while they are read.
    let end_ns = monotonic_ns();
    log::debug!(
        "tracing ended ({}) at {:.3} ms of process cpu",
        end.as_str(),
        process_cpu().as_secs_f64() * 1e3
    );
    let ended_at = SystemTime::now();
    let duration = s.trace_start.elapsed();
    // The programs stop recording first: removing the probes takes a while,
    // and the allocation probes go before free's, so frees of blocks
    // allocated meanwhile would count as frees of blocks never seen.
    if let Err(e) = s.at.collector.maps.end_tracing() {
        log::warn!("{e:#}: what the target does while the probes are removed is counted too");
    }
    s.watchdog.detaching();
    s.at.probes.detach_all();
    s.watchdog.detached();
    Stopped {
        end_ns,
        ended_at,
        duration,
        // The process's own view at the end (not while the probes are still in).
        end_process: procstat::read(s.at.pid).ok(),
    }
}

/// Whether the target exited; a launched child is reaped, an attached
/// process that lives on has its newest modules captured for the report.
fn settle_target(s: &mut Session, end: End) -> Result<Outcome> {
    let at = &mut s.at;
    let pid = at.pid;
    let exited = end == End::TargetExited || !alive(pid);
    if at.launched {
        return reap_child(pid, end, exited);
    }
    if !exited {
        // The target lives on: pick up libraries it loaded since the last
        // capture, waiting for it a moment only (a file may not answer).
        s.capture.poll(at, FINAL_CAPTURE_WAIT, &mut s.cut_short);
    }
    Ok(Outcome {
        exited,
        state: None,
    })
}

/// Reaps the launched child if it has ended, for its exit status.
fn reap_child(pid: u32, end: End, exited: bool) -> Result<Outcome> {
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
                return Ok(Outcome {
                    exited: true,
                    state: Some(s),
                });
            }
            Some(ChildState::Stopped(_)) => launch::continue_child(pid),
            None if exited => {
                // pidfd said it exited: reap it.
                let state = launch::wait_child(pid, false)?;
                return Ok(Outcome { exited, state });
            }
            None if Instant::now() < wait_until => std::thread::sleep(Duration::from_millis(10)),
            None => {
                return Ok(Outcome {
                    exited,
                    state: None,
                });
            }
        }
    }
}

/// The child's status (0 when attached), unless `--fail-on-leak` found leaks
/// in a run that would otherwise succeed: then 3.
fn exit_status(opts: &Options, status: i32, leaks: u64) -> i32 {
    if !opts.fail_on_leak || leaks == 0 {
        return status;
    }
    let s = if leaks == 1 { "" } else { "s" };
    if status == 0 {
        eprintln!("memtrace: {leaks} site{s} got the leak verdict: exit status 3 (--fail-on-leak)");
        return 3;
    }
    eprintln!(
        "memtrace: {leaks} site{s} got the leak verdict, but the program exited with status \
         {status}: that status is memtrace's"
    );
    status
}
