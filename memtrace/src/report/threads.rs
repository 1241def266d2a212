//! The report's threads, in its `resources` part: the threads the target
//! created while traced, by creating stack (resource sites, as fds'
//! are: report/resource_site.rs); those that existed at attach, with no stack.
use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::VerdictCounts;
use super::resource_site::{ResourceSite, write_sites};

/// Threads.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ThreadReport {
    /// Threads running at the last look at /proc/PID/task (every one,
    /// traced or not); null if it was never read.
    pub alive: Option<u64>,
    /// Threads created while traced still running at the end.
    pub traced_alive: u64,
    /// Threads created while traced that exited and were neither joined nor
    /// detached: each still holds its stack mapping.
    pub exited_unjoined: u64,
    /// Threads created while traced.
    pub created: u64,
    /// Threads running before memtrace attached (launch mode: the main
    /// thread), with no stack; `exited` of them since.
    pub existed_at_attach: ThreadsAtAttach,
    /// Every event of thread tracing, by name
    /// (`memtrace_common::threads::ThreadCounter`).
    pub events: BTreeMap<&'static str, u64>,
    /// How many of `sites` got each verdict.
    pub verdicts: VerdictCounts,
    /// Every site holding threads (alive or exited unjoined) at the end,
    /// most first.
    pub sites: Vec<ResourceSite>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ThreadsAtAttach {
    pub threads: u64,
    pub exited: u64,
    /// Those still running (at most [`MAX_LISTED_THREADS`]).
    pub alive: Vec<ThreadInfo>,
}

/// One thread.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ThreadInfo {
    pub tid: u32,
    /// Its name (`comm`): as last read while it ran, or at its exit.
    pub name: Option<String>,
    /// `alive` or `exited_unjoined`.
    pub state: &'static str,
    /// Seconds since it was created (or, existing at attach, since then).
    pub age_s: f64,
}

/// Threads listed per site (the site's counts cover them all).
pub const MAX_LISTED_THREADS: usize = 64;

impl ThreadReport {
    pub fn leaks(&self) -> u64 {
        self.verdicts.leak
    }
}

/// The text report's threads: counts, then the top sites with their frames.
pub(super) fn write_text(
    w: &mut String,
    t: &ThreadReport,
    exe: Option<&str>,
    style: &super::TextStyle,
) -> std::fmt::Result {
    let alive = t.alive.map_or("?".to_string(), |n| n.to_string());
    writeln!(
        w,
        "\nTHREADS: {alive} alive; {} created while traced: {} alive, {} exited unjoined",
        t.created, t.traced_alive, t.exited_unjoined
    )?;
    let e = &t.existed_at_attach;
    if e.threads > 0 {
        writeln!(
            w,
            "  {} existed at attach (no stack; {} exited since)",
            e.threads, e.exited
        )?;
    }
    if t.sites.is_empty() {
        writeln!(w, "  no thread created while traced is alive or unjoined")?;
        return Ok(());
    }
    write_sites(w, &t.sites, "thread", exe, style)
}
