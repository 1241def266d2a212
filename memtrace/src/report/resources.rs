//! The report's `resources` part: the target's file descriptors by kind,
//! and each site (creating stack) that holds fds open, with its history and
//! verdict as a heap site has them. Written to JSON by its serde derive
//! (small next to the heap sites: one entry per creating stack) and to text
//! by [`write_text`].
use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Serialize, Serializer};

use super::{Frames, VerdictCounts};
use crate::analyze::{Trend, Verdict};
use crate::escape::Escaped;

/// Everything the report says about resources other than heap memory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Resources {
    pub fds: FdReport,
    /// Threads (absent when they are not traced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<super::threads::ThreadReport>,
    /// Memory mappings (absent when they were not traced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mappings: Option<super::mappings::MappingReport>,
}

/// File descriptors.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FdReport {
    /// Slots of the kernel's table: fds numbered from here on are counted
    /// (`events.beyond_table`), not traced.
    pub slots: u32,
    /// fds open at the last look at /proc/PID/fd (every fd, traced or not);
    /// null if it was never read.
    pub open: Option<u64>,
    /// Per kind: the fds open at the end, traced or not.
    pub by_kind: Vec<KindCount>,
    /// fds open before memtrace attached (launch mode: those the program
    /// started with): by kind, with no stack; `released` of them since.
    pub existed_at_attach: Untraced,
    /// fds that appeared with no traced creation (received with SCM_RIGHTS,
    /// opened by io_uring...), found by the reconciliation.
    pub appeared_untraced: Untraced,
    /// What the reconciliation with /proc/PID/fd had to correct.
    pub reconciliation: Reconciliation,
    /// Every event of fd tracing, by name (`memtrace_common::resources::FdCounter`).
    pub events: BTreeMap<&'static str, u64>,
    /// How many of `sites` got each verdict.
    pub verdicts: VerdictCounts,
    /// Every site holding traced fds at the end, most fds first.
    pub sites: Vec<FdSite>,
}

/// One kind's fds open at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KindCount {
    pub kind: String,
    /// Open, in all.
    pub open: u64,
    /// Of those, created while traced (with a stack, in `sites`).
    pub traced: u64,
    /// fds created while traced, of this kind.
    pub created: u64,
}

/// fds with no stack: how many there were, by kind, and how many are gone.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Untraced {
    pub fds: u64,
    pub released: u64,
    pub by_kind: BTreeMap<&'static str, UntracedKind>,
    /// Those still open (at most [`MAX_LISTED_FDS`]).
    pub open: Vec<FdInfo>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UntracedKind {
    pub fds: u64,
    pub released: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Reconciliation {
    /// Reads of /proc/PID/fd compared with the traced fds.
    pub scans: u64,
    /// fds found open that no traced syscall created, by kind.
    pub appeared_untraced: BTreeMap<&'static str, u64>,
    /// Traced fds found closed with no traced release, by kind.
    pub vanished: BTreeMap<&'static str, u64>,
}

/// One open fd.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FdInfo {
    pub fd: u32,
    pub kind: String,
    /// Its /proc/PID/fd link (`socket:[123]`, a path), null if never read.
    pub target: Option<String>,
    /// For sockets: `TCP 127.0.0.1:5432 ESTABLISHED`, `unix /run/x.sock`.
    pub peer: Option<String>,
    /// Seconds since it was created (or, untraced, first seen).
    pub age_s: f64,
}

/// fds listed per site (the site's counts cover them all).
pub const MAX_LISTED_FDS: usize = 64;

/// A creating stack that holds fds open at the end.
#[derive(Clone, Debug, Serialize)]
pub struct FdSite {
    /// `socket`, `file`, `pipe`...: of its fds (`mixed` if they differ).
    pub kind: String,
    /// The syscall family that created them: `open`, `socket`, `accept`,
    /// `socketpair`, `pipe`, `dup`, `eventfd`...
    pub origin: &'static str,
    /// What every fd of the site is, when they all agree
    /// (`TCP 127.0.0.1:5432 ESTABLISHED`, a path): of the fds whose
    /// /proc link memtrace read (one made less than an interval before the
    /// target exited was never seen there).
    pub description: Option<String>,
    pub outstanding: u64,
    /// fds this site created while traced.
    pub created: u64,
    /// Not applicable to fds: null.
    pub bytes: Option<u64>,
    pub oldest_age_s: Option<f64>,
    pub median_age_s: Option<f64>,
    pub verdict: Verdict,
    /// Theil–Sen slope of its open fds (null with fewer than two samples).
    pub growth_per_s: Option<f64>,
    pub stack_captured: bool,
    pub stack_walk: &'static str,
    pub truncated: bool,
    #[serde(serialize_with = "frames_json")]
    pub frames: Frames,
    /// What the verdict was made of.
    pub trend: FdTrend,
    pub history: Vec<FdHistoryPoint>,
    /// Its fds (at most [`MAX_LISTED_FDS`], oldest first).
    pub fds: Vec<FdInfo>,
    /// Its stack's key in the kernel's table (not in the JSON).
    #[serde(skip)]
    pub stack_id: u64,
}

/// A heap site's `trend`, in fds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FdTrend {
    pub samples: usize,
    pub span_s: f64,
    pub growth_per_s: Option<f64>,
    pub recent_growth_per_s: Option<f64>,
    pub relative_growth: Option<f64>,
    pub growth_share: Option<f64>,
    pub early_fds_retained: Option<f64>,
    pub max_oldest_age_s: Option<f64>,
}

impl From<Trend> for FdTrend {
    fn from(t: Trend) -> Self {
        let Trend {
            samples,
            span_s,
            growth_bytes_per_s,
            recent_growth_bytes_per_s,
            relative_growth,
            growth_share,
            early_blocks_retained,
            max_oldest_age_s,
        } = t;
        FdTrend {
            samples,
            span_s,
            growth_per_s: growth_bytes_per_s,
            recent_growth_per_s: recent_growth_bytes_per_s,
            relative_growth,
            growth_share,
            early_fds_retained: early_blocks_retained,
            max_oldest_age_s,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FdHistoryPoint {
    pub t_s: f64,
    pub outstanding: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_age_s: Option<f64>,
}

pub(super) fn frames_json<S: Serializer>(f: &Frames, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(f.iter())
}

impl FdSite {
    /// `12 TCP sockets to 127.0.0.1:5432, ESTABLISHED` / `3 files /tmp/x`.
    pub fn headline(&self) -> String {
        let n = self.outstanding;
        let plural = if n == 1 { "" } else { "s" };
        match self.description.as_deref() {
            Some(d) if self.kind == "socket" => {
                let (proto, rest) = d.split_once(' ').unwrap_or((d, ""));
                let rest = match rest.rsplit_once(' ') {
                    Some((peer, state)) if proto == "TCP" && !rest.starts_with("listening") => {
                        format!("to {}, {}", Escaped(peer), state)
                    }
                    _ => Escaped(rest).to_string(),
                };
                format!("{n} {proto} socket{plural} {rest}")
                    .trim_end()
                    .to_string()
            }
            Some(d) => format!("{n} {}{plural} {}", self.kind, Escaped(d)),
            None => format!("{n} {}{plural}", self.kind),
        }
    }
}

/// The text report's resources part: per kind, then the top sites with
/// their frames.
pub(super) fn write_text(
    w: &mut String,
    fds: &FdReport,
    exe: Option<&str>,
    style: &super::TextStyle,
) -> std::fmt::Result {
    let top = style.top;
    let kinds: Vec<String> = fds
        .by_kind
        .iter()
        .map(|k| format!("{} {}", k.open, k.kind))
        .collect();
    let open = fds.open.map_or("?".to_string(), |n| n.to_string());
    writeln!(w, "\nFILE DESCRIPTORS: {open} open ({})", kinds.join(", "))?;
    let e = &fds.existed_at_attach;
    if e.fds > 0 {
        writeln!(
            w,
            "  {} existed at attach (no stack; {} released since)",
            e.fds, e.released
        )?;
    }
    let a = &fds.appeared_untraced;
    let r = &fds.reconciliation;
    let vanished: u64 = r.vanished.values().sum();
    if a.fds > 0 || vanished > 0 {
        writeln!(
            w,
            "  corrected from /proc/PID/fd: {} appeared with no traced creation \
             (SCM_RIGHTS, io_uring...), {} closed with no traced release",
            a.fds, vanished
        )?;
    }
    if fds.sites.is_empty() {
        writeln!(w, "  no fd created while traced is still open")?;
        return Ok(());
    }
    // Their stacks read as the heap sites' do (report/stack_text.rs).
    let paths = super::stack_text::ShortPaths::of(
        fds.sites
            .iter()
            .take(top)
            .flat_map(|s| s.frames.iter())
            .flat_map(super::stack_text::frame_paths),
    );
    for s in fds.sites.iter().take(top) {
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
        let frames: Vec<&super::Frame> = s.frames.iter().collect();
        for line in super::stack_text::stack_lines(&frames, exe, &paths, style) {
            writeln!(w, "    {line}")?;
        }
    }
    if fds.sites.len() > top {
        writeln!(w, "  ... {} more fd sites", fds.sites.len() - top)?;
    }
    Ok(())
}

impl FdReport {
    pub fn leaks(&self) -> u64 {
        self.verdicts.leak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(kind: &str, description: Option<&str>, n: u64) -> FdSite {
        FdSite {
            kind: kind.to_string(),
            origin: "socket",
            description: description.map(String::from),
            outstanding: n,
            created: n,
            bytes: None,
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
            fds: Vec::new(),
            stack_id: 1,
        }
    }

    #[test]
    fn headlines_say_what_the_fds_are() {
        let tcp = site("socket", Some("TCP 127.0.0.1:5432 ESTABLISHED"), 12);
        assert_eq!(
            tcp.headline(),
            "12 TCP sockets to 127.0.0.1:5432, ESTABLISHED"
        );
        let listen = site("socket", Some("TCP listening on 0.0.0.0:80"), 1);
        assert_eq!(listen.headline(), "1 TCP socket listening on 0.0.0.0:80");
        let unix = site("socket", Some("unix /run/a\x1b.sock"), 2);
        assert_eq!(unix.headline(), "2 unix sockets /run/a\\x1b.sock");
        assert_eq!(site("pipe", None, 3).headline(), "3 pipes");
        assert_eq!(site("file", Some("/tmp/x"), 1).headline(), "1 file /tmp/x");
    }
}
