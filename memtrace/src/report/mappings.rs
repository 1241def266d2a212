//! The report's `resources.mappings`: the target's mmap'd ranges by
//! creating stack (anonymous or of a file, private or shared), with their
//! history and verdict as heap sites have them, in bytes; what existed at
//! attach by kind; what the allocator, thread creation and the loader
//! mapped, counted apart. JSON by serde; text by [`write_text`].
use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Serialize, Serializer};

use super::{Frames, VerdictCounts};
use crate::analyze::{Trend, Verdict};
use crate::escape::Escaped;
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
    pub sites: Vec<MappingSite>,
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

/// A creating stack whose mappings hold bytes at the end.
#[derive(Clone, Debug, Serialize)]
pub struct MappingSite {
    /// `anon_mapping` or `file_mapping`.
    pub kind: &'static str,
    /// MAP_SHARED (else private).
    pub shared: bool,
    /// The file, when every range of the site whose path was read agrees.
    pub description: Option<String>,
    /// Mappings (mmap calls) with bytes left: one unmapped in part counts
    /// once.
    pub outstanding: u64,
    /// mmap calls of this site while traced.
    pub created: u64,
    pub bytes: Option<u64>,
    pub oldest_age_s: Option<f64>,
    pub median_age_s: Option<f64>,
    pub verdict: Verdict,
    /// Theil–Sen slope of its bytes (null with fewer than two samples).
    pub growth_per_s: Option<f64>,
    pub stack_captured: bool,
    pub stack_walk: &'static str,
    pub truncated: bool,
    #[serde(serialize_with = "frames_json")]
    pub frames: Frames,
    #[serde(serialize_with = "trend_json")]
    pub trend: Trend,
    pub history: Vec<MappingHistoryPoint>,
    /// Its ranges (at most [`MAX_LISTED_RANGES`], lowest first).
    pub ranges: Vec<RangeInfo>,
    #[serde(skip)]
    pub stack_id: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MappingHistoryPoint {
    pub t_s: f64,
    pub outstanding: i64,
    pub bytes: i64,
    pub oldest_age_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RangeInfo {
    pub start: String,
    pub end: String,
    pub bytes: u64,
    pub age_s: f64,
}

fn frames_json<S: Serializer>(f: &Frames, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(f.iter())
}

/// The heap's `trend` fields, in bytes.
fn trend_json<S: Serializer>(t: &Trend, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(8))?;
    m.serialize_entry("samples", &t.samples)?;
    m.serialize_entry("span_s", &t.span_s)?;
    m.serialize_entry("growth_bytes_per_s", &t.growth_bytes_per_s)?;
    m.serialize_entry("recent_growth_bytes_per_s", &t.recent_growth_bytes_per_s)?;
    m.serialize_entry("relative_growth", &t.relative_growth)?;
    m.serialize_entry("growth_share", &t.growth_share)?;
    m.serialize_entry("early_blocks_retained", &t.early_blocks_retained)?;
    m.serialize_entry("max_oldest_age_s", &t.max_oldest_age_s)?;
    m.end()
}

impl MappingSite {
    /// `3 anonymous mappings, 12.0 MiB` / `1 shared mapping of /tmp/x, 4.0 KiB`.
    pub fn headline(&self) -> String {
        let noun = match (self.kind, self.shared) {
            ("file_mapping", false) => "private file mapping",
            ("file_mapping", true) => "shared file mapping",
            (_, false) => "anonymous mapping",
            (_, true) => "shared anonymous mapping",
        };
        let of = self
            .description
            .as_deref()
            .map(|d| format!(" of {}", Escaped(d)))
            .unwrap_or_default();
        format!(
            "{}{of}, {}",
            counted(self.outstanding, noun),
            format_bytes(self.bytes.unwrap_or(0) as i64)
        )
    }
}

/// Events lost, and what /proc/PID/maps corrected.
fn write_lost(w: &mut String, m: &MappingReport) -> std::fmt::Result {
    let lost = m.events.get("lost").copied().unwrap_or(0);
    let r = &m.reconciliation;
    if lost == 0 {
        return Ok(());
    }
    if r.scans == 0 {
        return writeln!(
            w,
            "  {} lost (event buffer full): ranges may be wrong",
            counted(lost, "event")
        );
    }
    writeln!(
        w,
        "  {} lost (event buffer full), corrected from /proc/PID/maps: {} released ({}), \
         {} seen at reconciliation ({}, no stack)",
        counted(lost, "event"),
        counted(r.released.mappings, "mapping"),
        format_bytes(r.released.bytes as i64),
        counted(r.seen.mappings, "range"),
        format_bytes(r.seen.bytes as i64)
    )
}

impl MappingReport {
    pub fn leaks(&self) -> u64 {
        self.verdicts.leak
    }
}

/// The text report's mappings part: totals, what is counted apart, the top
/// sites with their frames.
pub(super) fn write_text(w: &mut String, m: &MappingReport, top: usize) -> std::fmt::Result {
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
    for s in m.sites.iter().take(top) {
        let growth = s
            .growth_per_s
            .filter(|g| *g > 0.0)
            .map(|g| format!(", +{}/s", format_bytes(g as i64)))
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
    if m.sites.len() > top {
        writeln!(w, "  ... {} more mapping sites", m.sites.len() - top)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(kind: &'static str, shared: bool, description: Option<&str>, n: u64) -> MappingSite {
        MappingSite {
            kind,
            shared,
            description: description.map(String::from),
            outstanding: n,
            created: n,
            bytes: Some(n << 22),
            oldest_age_s: None,
            median_age_s: None,
            verdict: Verdict::Leak,
            growth_per_s: None,
            stack_captured: true,
            stack_walk: "unwind-tables",
            truncated: false,
            frames: Frames::default(),
            trend: Trend::default(),
            history: Vec::new(),
            ranges: Vec::new(),
            stack_id: 1,
        }
    }

    #[test]
    fn headlines_say_what_is_mapped() {
        assert_eq!(
            site("anon_mapping", false, None, 3).headline(),
            "3 anonymous mappings, 12.0 MiB"
        );
        assert_eq!(
            site("file_mapping", true, Some("/tmp/a\x1b"), 1).headline(),
            "1 shared file mapping of /tmp/a\\x1b, 4.0 MiB"
        );
    }
}
