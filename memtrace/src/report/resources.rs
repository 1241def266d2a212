//! The report's `resources` part: the target's file descriptors by kind,
//! and each site (creating stack) that holds fds open, with its history and
//! verdict as a heap site has them. Written to JSON by its serde derive
//! (small next to the heap sites: one entry per creating stack) and to text
//! by [`write_text`].
use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::VerdictCounts;
use super::resource_site::{ResourceSite, write_sites};

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
    pub sites: Vec<ResourceSite>,
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

/// The text report's resources part: per kind, then the top sites with
/// their frames.
pub(super) fn write_text(
    w: &mut String,
    fds: &FdReport,
    exe: Option<&str>,
    style: &super::TextStyle,
) -> std::fmt::Result {
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
    write_sites(w, &fds.sites, "fd", exe, style)
}

impl FdReport {
    pub fn leaks(&self) -> u64 {
        self.verdicts.leak
    }
}
