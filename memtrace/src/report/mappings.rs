//! The report's `resources.mappings`: the target's mmap'd ranges by
//! creating stack (anonymous or of a file, private or shared), with their
//! history and verdict as heap sites have them, in bytes; what existed at
//! attach by kind; what the allocator, thread creation and the loader
//! mapped, counted apart. JSON by serde; text by [`write_text`].
use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::VerdictCounts;
use super::resource_site::{ResourceSite, write_sites};
use crate::units::{counted, format_bytes};

/// Mappings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MappingReport {
    /// Bytes mapped at the end by traced mmaps of the sites below.
    pub bytes: u64,
    /// Per kind (`anon_mapping`, `file_mapping`): outstanding at the end,
    /// and created while traced.
    pub by_kind: Vec<MappingKind>,
    /// Mapped before memtrace attached (from /proc/PID/maps, no stack), by
    /// kind: `anon`, `file`, `heap` (brk), `stack`, `special` ([vdso]...).
    pub existed_at_attach: Existed,
    /// Made for the heap by the allocator (malloc's own mmap of large
    /// blocks, its arenas): counted in the heap sites, not here.
    pub allocator: Apart,
    /// Threads' stacks (mmap with MAP_STACK, as pthread_create makes them):
    /// they belong to their threads.
    pub thread_stacks: Apart,
    /// Made by the dynamic loader (libraries it maps, dlopen).
    pub loader: Apart,
    /// Every event, by name (`memtrace_common::mappings::MapCounter`), and
    /// `unmapped_unknown_bytes`: bytes munmap'd where memtrace knew no
    /// mapping.
    pub events: BTreeMap<&'static str, u64>,
    pub verdicts: VerdictCounts,
    /// Every site with bytes mapped at the end, most bytes first.
    pub sites: Vec<ResourceSite>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MappingKind {
    pub kind: &'static str,
    pub outstanding: u64,
    pub bytes: u64,
    pub created: u64,
}

/// Mappings that existed at attach.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Existed {
    /// Ranges (lines of /proc/PID/maps) and their bytes.
    pub mappings: u64,
    pub bytes: u64,
    /// Bytes of them unmapped (or replaced) since.
    pub released_bytes: u64,
    pub by_kind: BTreeMap<&'static str, ExistedKind>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExistedKind {
    pub mappings: u64,
    pub bytes: u64,
    pub released_bytes: u64,
}

/// Mappings counted apart: made while traced, outstanding at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Apart {
    pub created: u64,
    pub outstanding: u64,
    pub bytes: u64,
}

/// Ranges listed per site (the site's counts cover them all).
pub const MAX_LISTED_RANGES: usize = 64;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RangeInfo {
    pub start: String,
    pub end: String,
    pub bytes: u64,
    pub age_s: f64,
}

impl MappingReport {
    pub fn leaks(&self) -> u64 {
        self.verdicts.leak
    }
}

/// The text report's mappings part: totals, what is counted apart, the top
/// sites with their frames.
pub(super) fn write_text(
    w: &mut String,
    m: &MappingReport,
    exe: Option<&str>,
    style: &super::TextStyle,
) -> std::fmt::Result {
    let n: u64 = m.sites.iter().map(|s| s.outstanding).sum();
    writeln!(
        w,
        "\nMAPPINGS: {}, {} traced",
        counted(n, "mapping"),
        format_bytes(m.bytes as i64)
    )?;
    let e = &m.existed_at_attach;
    if e.mappings > 0 {
        writeln!(
            w,
            "  {} existed at attach, {} (no stack; {} unmapped since)",
            counted(e.mappings, "range"),
            format_bytes(e.bytes as i64),
            format_bytes(e.released_bytes as i64)
        )?;
    }
    for (what, a) in [
        (
            "made by the allocator for the heap (counted as heap)",
            &m.allocator,
        ),
        (
            "of thread stacks (MAP_STACK: see threads)",
            &m.thread_stacks,
        ),
        ("made by the dynamic loader", &m.loader),
    ] {
        if a.created > 0 || a.outstanding > 0 {
            writeln!(
                w,
                "  {} {what}, {} outstanding",
                counted(a.outstanding, "mapping"),
                format_bytes(a.bytes as i64)
            )?;
        }
    }
    let lost = m.events.get("lost").copied().unwrap_or(0);
    if lost > 0 {
        writeln!(
            w,
            "  {} lost (event buffer full): ranges may be wrong",
            counted(lost, "event")
        )?;
    }
    if m.sites.is_empty() {
        writeln!(w, "  no mapping made while traced is still mapped")?;
        return Ok(());
    }
    write_sites(w, &m.sites, "mapping", exe, style)
}
