//! The programs the target runs: following its exec, and what the report
//! says of each program and of the children it created.
//!
//! At an exec the BPF side ends tracing by the old program's object (every
//! address it knows is gone with the old program) and, in launch mode, stops
//! the process before the new program runs. memtrace then closes the old
//! image (its figures kept, its outstanding blocks counted as released by the
//! exec), removes its probes, and attaches to the new program as to a new
//! target: a launched one at its loader's stops, so that none of its
//! allocations is missed; a running one (attach mode) as soon as it is seen,
//! the report saying how long after its exec.
use std::{sync::Arc, time::Duration, time::Instant};

use anyhow::{Result, bail};

use super::{Options, Session, Target, preload_debug_info, target};
use crate::{
    analyze::{HISTORY_CAPACITY, History},
    escape::Escaped,
    kernel::collect::monotonic_ns,
    report::lineage::{Forks, Image, Lineage},
    steps::Steps,
};

/// How often the watch loop looks for an exec (one map read).
pub(super) const EXEC_POLL: Duration = Duration::from_millis(20);
/// Attach mode: how long memtrace retries attaching to the new program
/// while its loader has not yet mapped its allocator.
const ATTACH_RETRY_FOR: Duration = Duration::from_secs(2);
const ATTACH_RETRY_EVERY: Duration = Duration::from_millis(20);

/// The images the target ran before its current one, and the children of
/// those.
pub(super) struct Images {
    /// CLOCK_MONOTONIC when tracing started.
    start_ns: u64,
    past: Vec<Image>,
    /// The current image: when it started (seconds from the start), how
    /// long after its exec tracing began (attach mode).
    current_started_s: f64,
    current_after_ms: Option<f64>,
    /// The current image exec'd a program memtrace does not trace (it could
    /// not, or `--no-follow-exec`): that program, which ends the list.
    untraced_next: Option<Image>,
    /// Children of past images.
    forks: Forks,
}

impl Images {
    pub(super) fn new(start_ns: u64) -> Self {
        Images {
            start_ns,
            past: Vec::new(),
            current_started_s: 0.0,
            current_after_ms: None,
            untraced_next: None,
            forks: Forks::default(),
        }
    }

    /// The report's part: the past images, the current one, and every child.
    pub(super) fn report(&self, at: &target::Attached) -> Lineage {
        let mut images = self.past.clone();
        images.push(Image {
            exe: at.exe.clone(),
            cmdline: at.cmdline.clone(),
            started_s: self.current_started_s,
            traced: true,
            tracing_started_after_ms: self.current_after_ms,
            ended_by_exec: self.untraced_next.is_some(),
            ..Default::default()
        });
        images.extend(self.untraced_next.clone());
        let mut forks = self.forks.clone();
        add_forks(&mut forks, at);
        Lineage {
            images,
            forks_not_followed: forks,
            processes: None,
        }
    }

    /// The current image exec'd a program memtrace does not trace (it could
    /// not, or `--no-follow-exec`): tracing ends; the report is the current
    /// image's, and names that program last.
    pub(super) fn not_followed(&mut self, pid: u32, exec_ns: u64) {
        self.untraced_next = Some(Image {
            exe: target::proc_exe(pid),
            cmdline: target::proc_cmdline(pid),
            started_s: exec_ns.saturating_sub(self.start_ns) as f64 / 1e9,
            ..Default::default()
        });
    }
}

fn add_forks(forks: &mut Forks, at: &target::Attached) {
    let (count, pids) = at.collector.maps.forks();
    forks.count += count;
    forks.pids.extend(pids);
}

/// When the target called exec, if it did since the current image was attached.
pub(super) fn exec_seen(s: &Session) -> Option<u64> {
    s.at.collector.maps.exec_seen()
}

/// Follows the target's exec at `exec_ns`: closes the old image and attaches
/// to the new one. An error (the new program has no allocator memtrace
/// knows, it exited...) ends tracing: the report is then the old image's.
pub(super) fn follow_exec(opts: &Options, s: &mut Session, exec_ns: u64) -> Result<()> {
    let pid = s.at.pid;
    let started_s = exec_ns.saturating_sub(s.images.start_ns) as f64 / 1e9;
    let old = close_image(opts, s, started_s);
    // (Children stopped for `--follow-forks` and not yet taken run on.)
    super::children::release_pending(s.children.not_followed_mut(), &mut s.at);
    s.watchdog
        .doing("attaching to the program the target exec'd");
    let steps = Arc::new(Steps::new());
    let attached = if s.at.launched {
        target::launch_after_exec(pid, true, opts, &steps)
    } else {
        attach_running(opts, s, &steps)
    };
    let at = match attached {
        Ok(at) => at,
        Err(e) => {
            // The report is the old image's: it stays the current one.
            s.images.not_followed(pid, exec_ns);
            bail!(e)
        }
    };
    let after_ms = (!at.launched).then(|| monotonic_ns().saturating_sub(exec_ns) as f64 / 1e6);
    if at.launched {
        preload_debug_info(
            &mut s.symbolizer,
            &at.modules,
            at.exe.as_deref(),
            &at.allocators
                .modules
                .iter()
                .map(|a| a.module.as_str())
                .collect::<Vec<_>>(),
        );
    }
    eprintln!(
        "memtrace: pid {pid} exec'd {}: traced on ({} probes){}",
        Escaped(at.exe.as_deref().unwrap_or("?")),
        at.nprobes,
        after_ms.map_or(String::new(), |ms| format!(
            ", from {ms:.0} ms after its exec: its allocations before are not seen"
        )),
    );
    add_forks(&mut s.images.forks, &s.at);
    s.images.past.push(old);
    s.images.current_started_s = started_s;
    s.images.current_after_ms = after_ms;
    // The old image's object goes with its maps; the history and the
    // resources (fds, threads, mappings) are the new image's.
    s.at = at;
    s.history = History::new(HISTORY_CAPACITY, monotonic_ns(), opts.interval);
    s.capture = Default::default();
    (s.fds, s.threads, s.mappings) = super::start_resources(&s.at, monotonic_ns(), opts.interval);
    Ok(())
}

/// The old image's figures, its probes removed (the BPF side stopped
/// counting at the exec already).
fn close_image(opts: &Options, s: &mut Session, started_s: f64) -> Image {
    let at = &mut s.at;
    let mut image = Image {
        exe: at.exe.clone(),
        cmdline: at.cmdline.clone(),
        started_s: s.images.current_started_s,
        traced: true,
        tracing_started_after_ms: s.images.current_after_ms,
        ended_by_exec: true,
        ..Default::default()
    };
    match at.collector.sites() {
        Ok(sites) => {
            for site in sites.iter().map(|x| x.estimated(opts.sampling)) {
                image.alloc_calls += site.alloc_calls;
                image.alloc_bytes += site.alloc_bytes;
                image.closed_blocks += site.outstanding_blocks.max(0) as u64;
                image.closed_bytes += site.outstanding_bytes.max(0) as u64;
            }
        }
        Err(e) => log::warn!("reading the old program's sites: {e:#}"),
    }
    s.watchdog.detaching();
    at.probes.detach_all();
    s.watchdog.detached();
    log::debug!(
        "image {:?} closed at {started_s:.3} s: {} blocks of {} bytes outstanding",
        image.exe,
        image.closed_blocks,
        image.closed_bytes
    );
    image
}

/// Attach mode: attaches to the program the target exec'd as to a running
/// process, once its loader has mapped its allocator.
fn attach_running(opts: &Options, s: &mut Session, steps: &Arc<Steps>) -> Result<target::Attached> {
    let pid = s.at.pid;
    let give_up = Instant::now() + ATTACH_RETRY_FOR;
    loop {
        let attached = target::attach(&Target::Attach(pid), opts, steps, &mut s.symbolizer);
        match attached {
            Ok(at) => return Ok(at),
            Err(e) if Instant::now() < give_up && target::alive(pid) => {
                log::debug!("attaching to the new program: {e:#}; retrying");
                std::thread::sleep(ATTACH_RETRY_EVERY);
            }
            Err(e) => return Err(e),
        }
    }
}
