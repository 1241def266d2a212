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
    /// Found in /proc/PID/maps by a reconciliation after lost events, never
    /// seen mapped (their mmap was lost: no stack), by kind as above.
    pub seen_at_reconciliation: Existed,
    /// What reconciliations with /proc/PID/maps corrected.
    pub reconciliation: MapReconciliation,
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

/// The corrections of reconciliations with /proc/PID/maps, made after
/// events were lost (see docs/resources.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MapReconciliation {
    /// Reconciliations made: one per interval with events lost.
    pub scans: u64,
    /// Of `events.lost`, those the last reconciliation came after: when
    /// fewer, the ranges may be wrong for what was lost since (the target
    /// ended before /proc/PID/maps could be read again).
    pub lost_covered: u64,
    /// Mappings memtrace held that /proc no longer showed (their unmapping
    /// was lost): released.
    pub released: Corrected,
    /// Ranges /proc showed that memtrace never saw mapped (their mmap was
    /// lost): added as `seen_at_reconciliation`.
    pub seen: Corrected,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Corrected {
    pub mappings: u64,
    pub bytes: u64,
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

/// Events lost, and what /proc/PID/maps corrected.
fn write_lost(w: &mut String, m: &MappingReport) -> std::fmt::Result {
    let lost = m.events.get("lost").copied().unwrap_or(0);
    let r = &m.reconciliation;
    if lost == 0 {
        return Ok(());
    }
    if r.scans > 0 {
        writeln!(
            w,
            "  {} lost (event buffer full), corrected from /proc/PID/maps: {} released ({}), \
             {} seen at reconciliation ({}, no stack)",
            counted(r.lost_covered, "event"),
            counted(r.released.mappings, "mapping"),
            format_bytes(r.released.bytes as i64),
            counted(r.seen.mappings, "range"),
            format_bytes(r.seen.bytes as i64)
        )?;
    }
    if lost > r.lost_covered {
        writeln!(
            w,
            "  {} lost (event buffer full) since /proc/PID/maps was last read: ranges may be wrong",
            counted(lost - r.lost_covered, "event")
        )?;
    }
    Ok(())
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
    write_lost(w, m)?;
    if m.sites.is_empty() {
        writeln!(w, "  no mapping made while traced is still mapped")?;
        return Ok(());
    }
    write_sites(w, &m.sites, "mapping", exe, style)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_events_say_what_was_corrected_and_what_was_not() {
        let mut m = MappingReport::default();
        let text = |m: &MappingReport| {
            let mut w = String::new();
            write_lost(&mut w, m).unwrap();
            w
        };
        assert_eq!(text(&m), "");
        m.events.insert("lost", 500);
        assert_eq!(
            text(&m),
            "  500 events lost (event buffer full) since /proc/PID/maps was last read: \
             ranges may be wrong\n"
        );
        m.reconciliation = MapReconciliation {
            scans: 1,
            lost_covered: 500,
            released: Corrected {
                mappings: 2,
                bytes: 8192,
            },
            seen: Corrected {
                mappings: 1,
                bytes: 4096,
            },
        };
        assert_eq!(
            text(&m),
            "  500 events lost (event buffer full), corrected from /proc/PID/maps: \
             2 mappings released (8.0 KiB), 1 range seen at reconciliation (4.0 KiB, no stack)\n"
        );
        m.events.insert("lost", 501);
        assert!(text(&m).ends_with("  1 event lost (event buffer full) since /proc/PID/maps was last read: ranges may be wrong\n"));
    }
}
