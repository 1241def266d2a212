//! The report's threads, in its `resources` part: the threads the target
//! created while traced, by creating stack, with the same fields, history
//! and verdict as an fd site; those that existed at attach, with no stack.
use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::VerdictCounts;
use super::resources::{FdHistoryPoint, FdTrend, frames_json};
use crate::analyze::Verdict;
use crate::escape::Escaped;
use crate::report::Frames;

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
    pub sites: Vec<ThreadSite>,
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

/// A creating stack that holds threads at the end (an fd site's fields,
/// `kind` "thread", with `alive`, `exited_unjoined` and `threads`).
#[derive(Clone, Debug, Serialize)]
pub struct ThreadSite {
    /// "thread".
    pub kind: &'static str,
    /// "clone": the syscall family that made them.
    pub origin: &'static str,
    /// Their name, when they all have the same.
    pub description: Option<String>,
    /// alive + exited_unjoined.
    pub outstanding: u64,
    /// Threads this site created while traced.
    pub created: u64,
    /// Not applicable: null.
    pub bytes: Option<u64>,
    pub alive: u64,
    pub exited_unjoined: u64,
    pub oldest_age_s: Option<f64>,
    pub median_age_s: Option<f64>,
    pub verdict: Verdict,
    pub growth_per_s: Option<f64>,
    pub stack_captured: bool,
    pub stack_walk: &'static str,
    pub truncated: bool,
    #[serde(serialize_with = "frames_json")]
    pub frames: Frames,
    pub trend: FdTrend,
    pub history: Vec<FdHistoryPoint>,
    /// Its threads (at most [`MAX_LISTED_THREADS`], oldest first).
    pub threads: Vec<ThreadInfo>,
    #[serde(skip)]
    pub stack_id: u64,
}

impl ThreadSite {
    /// `12 threads alive "worker"` / `3 threads exited unjoined`.
    pub fn headline(&self) -> String {
        let plural = |n: u64| if n == 1 { "thread" } else { "threads" };
        let mut parts = Vec::new();
        if self.alive > 0 {
            parts.push(format!("{} {} alive", self.alive, plural(self.alive)));
        }
        if self.exited_unjoined > 0 {
            let n = self.exited_unjoined;
            parts.push(if parts.is_empty() {
                format!("{n} {} exited unjoined", plural(n))
            } else {
                format!("{n} exited unjoined")
            });
        }
        let mut s = parts.join(", ");
        if let Some(d) = &self.description {
            let _ = write!(s, " \"{}\"", Escaped(d));
        }
        s
    }
}

impl ThreadReport {
    pub fn leaks(&self) -> u64 {
        self.verdicts.leak
    }
}

/// The text report's threads: counts, then the top sites with their frames.
pub(super) fn write_text(w: &mut String, t: &ThreadReport, top: usize) -> std::fmt::Result {
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
    for s in t.sites.iter().take(top) {
        let growth = s
            .growth_per_s
            .filter(|g| *g > 0.0)
            .map(|g| format!(", +{g:.1}/s"))
            .unwrap_or_default();
        let oldest = s
            .oldest_age_s
            .map(|a| format!(", oldest {a:.1}s"))
            .unwrap_or_default();
        writeln!(
            w,
            "  {}, {} ({} created{growth}{oldest})",
            s.headline(),
            s.verdict.as_str().to_uppercase(),
            s.created
        )?;
        if !s.stack_captured {
            writeln!(w, "      [stack not captured]")?;
        }
        for f in s.frames.iter() {
            writeln!(w, "      {}", super::frames::frame_text(f))?;
        }
    }
    if t.sites.len() > top {
        writeln!(w, "  ... {} more thread sites", t.sites.len() - top)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(alive: u64, unjoined: u64, name: Option<&str>) -> ThreadSite {
        ThreadSite {
            kind: "thread",
            origin: "clone",
            description: name.map(String::from),
            outstanding: alive + unjoined,
            created: alive + unjoined,
            bytes: None,
            alive,
            exited_unjoined: unjoined,
            oldest_age_s: None,
            median_age_s: None,
            verdict: Verdict::Leak,
            growth_per_s: None,
            stack_captured: true,
            stack_walk: "unwind-tables",
            truncated: false,
            frames: Frames::default(),
            trend: FdTrend::default(),
            history: Vec::new(),
            threads: Vec::new(),
            stack_id: 1,
        }
    }

    #[test]
    fn headlines_say_how_the_threads_are_held() {
        assert_eq!(
            site(12, 0, Some("worker")).headline(),
            "12 threads alive \"worker\""
        );
        assert_eq!(site(0, 1, None).headline(), "1 thread exited unjoined");
        assert_eq!(
            site(1, 3, Some("a\x1b")).headline(),
            "1 thread alive, 3 exited unjoined \"a\\x1b\""
        );
    }
}
