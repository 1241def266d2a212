//! `--follow-forks`: the processes the target creates, and theirs, each
//! traced by a BPF object of its own.
//!
//! The BPF side of every traced process lists its new children and stops
//! each before its first instruction (`fork_child`). The watch loop takes
//! them every [`super::images::EXEC_POLL`]: attaches to each as to a running
//! process (it shares its parent's mappings: the same allocator, modules and
//! unwind tables), then lets it run. A child's object starts with no block,
//! so the blocks it inherited stay its parent's, counted once; its frees of
//! them are its `inherited_frees`. When a child exits, its figures and sites
//! are read (its outstanding blocks were never freed) and its probes removed.
//! A child that execs is stopped there by its BPF side, closed as its old
//! program and attached to as the new one from its loader's stops (the
//! launch path), so that none of the new program's allocations is missed.
//!
//! One object per process keeps the malloc/free path of a process that never
//! forks exactly as it is (one tgid compare); see docs/design.md.
use std::{collections::BTreeMap, sync::Arc, time::Duration, time::Instant};

use super::{Options, Session, frames, launch, target, target::Attached};
use crate::{
    kernel::collect::monotonic_ns,
    report::lineage::{Forks, Lineage, ProcessPart, ProcessSite, Processes, SharedSite},
    report::{Frames, Sampling, site_id},
    steps::Steps,
    symbolize::Symbolizer,
};

/// The most processes traced at once besides the target: each holds an
/// object with its own maps (the block table first) and links. A child
/// beyond it runs untraced, counted in `forks_not_followed`.
pub(super) const MAX_FOLLOWED: usize = 64;

/// How long a child's report part waits for debug info still loading
/// (the watch loop waits meanwhile).
const CHILD_LOAD_WAIT: Duration = Duration::from_secs(2);

/// The children traced, and the parts of those whose tracing ended.
pub(super) struct Children {
    start_ns: u64,
    live: Vec<Child>,
    done: Vec<(ProcessPart, Vec<SiteFrames>)>,
    not_followed: Forks,
}

struct Child {
    at: Attached,
    parent: u32,
    started_s: f64,
    after_ms: Option<f64>,
    /// Its BPF side stops it at its exec, for memtrace to attach to the new
    /// program before it runs (as a launched target's exec).
    stops_at_exec: bool,
}

/// A site's id and frames, for the sites across processes.
type SiteFrames = (String, Frames);

/// Why a process's tracing ended.
#[derive(Clone, Copy, PartialEq)]
enum Ended {
    Exited,
    Exec,
    End,
}

impl Children {
    pub(super) fn new(start_ns: u64) -> Self {
        Children {
            start_ns,
            live: Vec::new(),
            done: Vec::new(),
            not_followed: Forks::default(),
        }
    }

    pub(super) fn not_followed_mut(&mut self) -> &mut Forks {
        &mut self.not_followed
    }

    fn seconds(&self, ns: u64) -> f64 {
        ns.saturating_sub(self.start_ns) as f64 / 1e9
    }
}

/// Takes the new children of every traced process, attaching to each, and
/// closes the children that exited or exec'd.
pub(super) fn poll(opts: &Options, s: &mut Session) {
    let mut parents: Vec<(u32, Vec<u32>)> = Vec::new();
    for at in std::iter::once(&mut s.at).chain(s.children.live.iter_mut().map(|c| &mut c.at)) {
        let (stopped, born) = at.collector.maps.fork_children();
        // A child that ended before it ran is not waited for.
        for pid in born.into_iter().filter(|&p| !target::alive(p)) {
            at.collector.maps.forget_child(pid);
        }
        for &pid in &stopped {
            at.collector.maps.forget_child(pid);
        }
        if !stopped.is_empty() {
            parents.push((at.pid, stopped));
        }
    }
    for (parent, pids) in parents {
        for pid in pids {
            follow(opts, s, parent, pid);
        }
    }
    let mut i = 0;
    while i < s.children.live.len() {
        let c = &s.children.live[i];
        let ended = if c.at.collector.maps.exec_seen().is_some() {
            Some(Ended::Exec)
        } else if !target::alive(c.at.pid) {
            Some(Ended::Exited)
        } else {
            None
        };
        match ended {
            Some(how) => {
                let c = s.children.live.remove(i);
                close(opts, s, c, how, None);
            }
            None => i += 1,
        }
    }
}

/// Attaches to `pid`, a new child of `parent` stopped before its first
/// instruction, and lets it run; one not followed is counted and runs on.
fn follow(opts: &Options, s: &mut Session, parent: u32, pid: u32) {
    let attached = if s.children.live.len() >= MAX_FOLLOWED {
        Err(anyhow::anyhow!(
            "{MAX_FOLLOWED} processes are traced already"
        ))
    } else {
        s.watchdog.doing("attaching to a child of the target");
        let steps = Arc::new(Steps::new());
        target::attach_existing(pid, &child_options(opts), &steps, &mut s.symbolizer)
    };
    let now = s.children.seconds(monotonic_ns());
    match attached {
        Ok(mut at) => {
            eprintln!(
                "memtrace: following child {pid} of {parent} ({} probes)",
                at.nprobes
            );
            let stops_at_exec = stop_at_exec(opts, &mut at);
            s.children.live.push(Child {
                at,
                parent,
                started_s: now,
                after_ms: None,
                stops_at_exec,
            });
        }
        Err(e) => {
            eprintln!("memtrace: child {pid} of {parent} is not followed: {e:#}");
            s.children.not_followed.count += 1;
            s.children.not_followed.pids.push(pid);
        }
    }
    // SAFETY: kill(2) with a pid and a signal; the child is stopped by us.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}

/// Asks `at`'s BPF side to stop the child at its exec, when execs are
/// followed (it is stopped still: set before it runs).
fn stop_at_exec(opts: &Options, at: &mut Attached) -> bool {
    if !opts.follow_exec || !at.exec_watched {
        return false;
    }
    match at.collector.maps.stop_at_exec() {
        Ok(()) => true,
        Err(e) => {
            log::warn!("child {}: its exec is followed late: {e:#}", at.pid);
            false
        }
    }
}

/// Ends tracing of a child at `end_ns` (None: now, or its exec): its part of
/// the report, its probes removed; a child that exec'd is attached to
/// again, as its new program.
fn close(opts: &Options, s: &mut Session, mut c: Child, how: Ended, end_ns: Option<u64>) {
    let end_ns = end_ns
        .or(c.at.collector.maps.exec_seen())
        .unwrap_or_else(monotonic_ns);
    if let Err(e) = c.at.collector.maps.end_tracing() {
        log::warn!("ending the tracing of child {}: {e:#}", c.at.pid);
    }
    s.watchdog.detaching();
    c.at.probes.detach_all();
    s.watchdog.detached();
    release_pending(&mut s.children.not_followed, &mut c.at);
    let ended_s = s.children.seconds(end_ns);
    let part = process_part(&mut c.at, &mut s.symbolizer, opts.sampling, Some(c.parent));
    let (mut part, sites) = part;
    part.started_s = c.started_s;
    part.ended_s = ended_s;
    part.tracing_started_after_ms = c.after_ms;
    part.ended_by = ended_name(how).into();
    s.children.done.push((part, sites));
    let stopped = c.stops_at_exec && c.at.collector.maps.exec_seen().is_some();
    if how == Ended::Exec && opts.follow_exec {
        reattach(opts, s, &c, end_ns, stopped);
    } else if stopped {
        launch::continue_child(c.at.pid);
    }
}

/// Attaches to the program child `old` exec'd at `exec_ns`: from its
/// loader's stops when the BPF side stopped it at its exec (`stopped`), as
/// a launched target's exec; else as attach mode follows an exec, once its
/// loader has mapped an allocator, retried for a while.
fn reattach(opts: &Options, s: &mut Session, old: &Child, exec_ns: u64, stopped: bool) {
    s.watchdog.doing("attaching to the program a child exec'd");
    let (pid, parent) = (old.at.pid, old.parent);
    let steps = Arc::new(Steps::new());
    let give_up = Instant::now() + Duration::from_secs(2);
    loop {
        let opts = child_options(opts);
        let attached = if stopped {
            target::launch_after_exec(pid, false, &opts, &steps)
        } else {
            target::attach_existing(pid, &opts, &steps, &mut s.symbolizer)
        };
        match attached {
            Ok(mut at) => {
                let after = monotonic_ns().saturating_sub(exec_ns) as f64 / 1e6;
                let stops_at_exec = stop_at_exec(&opts, &mut at);
                s.children.live.push(Child {
                    at,
                    parent,
                    started_s: s.children.seconds(exec_ns),
                    after_ms: (!stopped).then_some(after),
                    stops_at_exec,
                });
                return;
            }
            Err(e) if !stopped && Instant::now() < give_up && target::alive(pid) => {
                log::debug!("attaching to child {pid}'s new program: {e:#}; retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                eprintln!("memtrace: child {pid} exec'd a program memtrace cannot trace: {e:#}");
                return;
            }
        }
    }
}

/// How a child is traced: its heap only (the fds, threads and mappings
/// are the target's own), as the target is otherwise.
fn child_options(opts: &Options) -> Options {
    Options {
        resources: false,
        ..opts.clone()
    }
}

fn ended_name(how: Ended) -> &'static str {
    match how {
        Ended::Exited => "exited",
        Ended::Exec => "exec",
        Ended::End => "end",
    }
}

/// Lets the children `at`'s BPF side stopped, and memtrace did not take,
/// run on untraced (its probes are out: no more are stopped); counted as not
/// followed.
pub(super) fn release_pending(not_followed: &mut Forks, at: &mut Attached) {
    let (stopped, _) = at.collector.maps.fork_children();
    for pid in stopped {
        at.collector.maps.forget_child(pid);
        // SAFETY: kill(2) with a pid and a signal; a SIGCONT discards a
        // SIGSTOP still pending.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        not_followed.count += 1;
        not_followed.pids.push(pid);
    }
}

/// Ends the tracing of every child as the session ends at `end_ns` (the
/// target's probes are out already).
pub(super) fn end_all(opts: &Options, s: &mut Session, end_ns: u64) {
    release_pending(&mut s.children.not_followed, &mut s.at);
    while let Some(c) = s.children.live.pop() {
        let how = if target::alive(c.at.pid) {
            Ended::End
        } else {
            Ended::Exited
        };
        close(opts, s, c, how, Some(end_ns));
    }
}

/// The report's `images` and children: with `--follow-forks`, the children
/// not followed are those memtrace could not trace (the BPF side counts
/// every child created).
pub(super) fn lineage(opts: &Options, s: &Session) -> Lineage {
    let mut lineage = s.images.report(&s.at);
    if opts.follow_forks {
        lineage.forks_not_followed = s.children.not_followed.clone();
    }
    lineage
}

/// The report's `processes`, with the target's own part (`target`, read by
/// [`process_part`]) first; sets `forks_not_followed` to the children not
/// followed.
pub(super) fn fill_lineage(
    s: &Session,
    target: (ProcessPart, Vec<SiteFrames>),
    lineage: &mut Lineage,
) {
    lineage.forks_not_followed = s.children.not_followed.clone();
    let mut parts = vec![target];
    let mut done = s.children.done.clone();
    done.sort_by(|a, b| a.0.started_s.total_cmp(&b.0.started_s));
    parts.extend(done);
    lineage.processes = Some(Processes {
        sites: shared_sites(&parts),
        followed: parts.into_iter().map(|(p, _)| p).collect(),
    });
}

/// The sites summed over the processes of each executable.
fn shared_sites(parts: &[(ProcessPart, Vec<SiteFrames>)]) -> Vec<SharedSite> {
    let mut by_key: BTreeMap<(Option<String>, String), SharedSite> = BTreeMap::new();
    for (part, frames) in parts {
        let frames: BTreeMap<&str, &Frames> =
            frames.iter().map(|(id, f)| (id.as_str(), f)).collect();
        for site in &part.sites {
            let key = (part.exe.clone(), site.site_id.clone());
            let shared = by_key.entry(key).or_insert_with(|| SharedSite {
                site_id: site.site_id.clone(),
                exe: part.exe.clone(),
                frames: frames
                    .get(site.site_id.as_str())
                    .map(|f| f.iter().cloned().collect())
                    .unwrap_or_default(),
                ..Default::default()
            });
            if !shared.pids.contains(&part.pid) {
                shared.pids.push(part.pid);
                shared.processes += 1;
            }
            shared.outstanding_blocks += site.outstanding_blocks;
            shared.outstanding_bytes += site.outstanding_bytes;
            shared.alloc_calls += site.alloc_calls;
            shared.alloc_bytes += site.alloc_bytes;
        }
    }
    let mut sites: Vec<SharedSite> = by_key.into_values().collect();
    sites.sort_by(|a, b| {
        (b.outstanding_bytes, b.outstanding_blocks, &a.site_id).cmp(&(
            a.outstanding_bytes,
            a.outstanding_blocks,
            &b.site_id,
        ))
    });
    sites
}

/// One process's part: its totals and its sites with blocks outstanding,
/// symbolized (the site ids key them across processes).
pub(super) fn process_part(
    at: &mut Attached,
    sym: &mut Symbolizer,
    sampling: Sampling,
    parent: Option<u32>,
) -> (ProcessPart, Vec<SiteFrames>) {
    let mut part = ProcessPart {
        pid: at.pid,
        parent_pid: parent,
        exe: at.exe.clone(),
        ended_by: ended_name(Ended::End).into(),
        ..Default::default()
    };
    if parent.is_some() {
        part.inherited_frees = at.collector.counters().map_or(0, |c| c.free_unknown);
    }
    let samples = match at.collector.sites() {
        Ok(v) => v,
        Err(e) => {
            log::warn!("reading the sites of pid {}: {e:#}", at.pid);
            return (part, Vec::new());
        }
    };
    let mut held = Vec::new();
    for s in samples.iter().map(|s| s.estimated(sampling)) {
        part.alloc_calls += s.alloc_calls;
        part.alloc_bytes += s.alloc_bytes;
        if s.outstanding_blocks > 0 {
            part.outstanding_blocks += s.outstanding_blocks as u64;
            part.outstanding_bytes += s.outstanding_bytes.max(0) as u64;
            held.push(s);
        }
    }
    let frames = site_frames(at, sym, &held);
    for (s, (id, _)) in held.iter().zip(&frames) {
        part.sites.push(ProcessSite {
            site_id: id.clone(),
            outstanding_blocks: s.outstanding_blocks as u64,
            outstanding_bytes: s.outstanding_bytes.max(0) as u64,
            alloc_calls: s.alloc_calls,
            alloc_bytes: s.alloc_bytes,
        });
    }
    (part, frames)
}

/// The frames and site id of each of `held`'s stacks.
fn site_frames(
    at: &mut Attached,
    sym: &mut Symbolizer,
    held: &[crate::kernel::collect::SiteSample],
) -> Vec<SiteFrames> {
    let ids: Vec<u64> = held.iter().map(|s| s.stack_id).collect();
    let Ok((addrs, _)) = frames::distinct_addresses(&mut at.collector, &ids) else {
        return ids
            .iter()
            .map(|_| (site_id(None), Frames::default()))
            .collect();
    };
    at.note_unmaps();
    sym.load_taken_in_background(&at.modules, addrs.iter().copied());
    let deadline = Instant::now() + CHILD_LOAD_WAIT;
    while Instant::now() < deadline && sym.loading_any_taken(&at.modules, &addrs) {
        sym.wait_for_any_load(deadline);
    }
    sym.set_deadline(Some(Instant::now()));
    let resolved = sym.symbolize_taken(&at.modules, &addrs, true);
    sym.set_deadline(None);
    let groups = frames::AddressFrames::of(&addrs, resolved);
    let mut unresolved = BTreeMap::new();
    ids.iter()
        .map(|&id| {
            let mut f = Frames::default();
            if let (Ok(generation), Ok(stack)) = (
                at.collector.stack_generation(id),
                at.collector.stack(id).map(<[u64]>::to_vec),
            ) {
                groups.fill(&stack, generation, &mut f, &mut unresolved);
            }
            (site_id(Some(&f)), f)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(pid: u32, exe: &str, sites: &[(&str, u64)]) -> (ProcessPart, Vec<SiteFrames>) {
        let part = ProcessPart {
            pid,
            exe: Some(exe.into()),
            sites: sites
                .iter()
                .map(|&(id, blocks)| ProcessSite {
                    site_id: id.into(),
                    outstanding_blocks: blocks,
                    outstanding_bytes: blocks * 10,
                    alloc_calls: blocks,
                    alloc_bytes: blocks * 10,
                })
                .collect(),
            ..Default::default()
        };
        (part, Vec::new())
    }

    #[test]
    fn sites_are_summed_over_the_processes_of_one_executable() {
        let parts = [
            part(1, "/srv/master", &[("aa", 1)]),
            part(2, "/srv/master", &[("bb", 5), ("aa", 2)]),
            part(3, "/srv/master", &[("bb", 5)]),
            part(4, "/bin/other", &[("bb", 7)]),
        ];
        let sites = shared_sites(&parts);
        let got: Vec<String> = sites
            .iter()
            .map(|s| {
                format!(
                    "{} {} in {} {:?}: {} blocks, {} bytes",
                    s.exe.as_deref().unwrap(),
                    s.site_id,
                    s.processes,
                    s.pids,
                    s.outstanding_blocks,
                    s.outstanding_bytes,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                "/srv/master bb in 2 [2, 3]: 10 blocks, 100 bytes",
                "/bin/other bb in 1 [4]: 7 blocks, 70 bytes",
                "/srv/master aa in 2 [1, 2]: 3 blocks, 30 bytes",
            ]
        );
    }
}
