//! The final report: its data (schema `memtrace-report/1`) and its renderings.
pub mod diff;

use std::{fmt::Write as _, sync::Arc};

use rustc_hash::FxHashMap;
use serde::Serialize;

pub use crate::symbolize::Frame;
use crate::{
    analyze::{ProcessSummary, Trend, Verdict, VerdictConfig},
    kernel::collect::Counters,
    process::stat::ProcStat,
    units::{format_bytes, format_count, format_duration, format_rate},
};

pub const SCHEMA: &str = "memtrace-report/1";

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub memtrace_version: &'static str,
    pub target: TargetInfo,
    pub started_at: String,
    pub ended_at: String,
    pub duration_s: f64,
    /// Why tracing ended: `signal`, `duration`, `target-exited`.
    pub end_reason: &'static str,
    pub sampling: Sampling,
    pub totals: Totals,
    /// Every counter behind `dropped_events` and `stack_errors`, by cause.
    pub drops: Drops,
    pub allocator: AllocatorInfo,
    pub min_age_s: f64,
    /// Where the sites' ages (and `--min-age`) come from: `blocks`, every
    /// outstanding block read; `epochs`, the kernel's per-site aggregates of the
    /// blocks born in each sampling period (too many blocks to read each one).
    pub ages_from: &'static str,
    /// The thresholds the verdicts were given with.
    pub verdict_config: VerdictConfig,
    /// How the history was sampled.
    pub timeline: Timeline,
    /// How many of `sites` got each verdict.
    pub verdicts: VerdictCounts,
    /// The target's memory as the kernel sees it, every interval.
    pub process: ProcessReport,
    /// The unwind tables memtrace loaded into the kernel for the stack walker.
    pub unwind: crate::kernel::tables::TableStats,
    /// Attach mode: blocks allocated before memtrace attached are not traced.
    #[serde(skip)]
    pub attached: bool,
    /// Last, so that `write_json` can write the sites by hand after the rest.
    #[serde(serialize_with = "serialize_sites")]
    pub sites: Vec<Site>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timeline {
    pub interval_s: f64,
    /// Samples in the history (at most `capacity`; the last one is the end of tracing).
    pub samples: usize,
    pub capacity: usize,
    /// Intervals between two kept samples (doubles each time the history fills up).
    pub stride_intervals: u64,
    /// Samples taken without ages.
    pub samples_without_ages: usize,
    /// Samples whose ages come from the kernel's per-site, per-epoch aggregates
    /// instead of every block (too many outstanding blocks to read them all):
    /// each epoch's blocks are taken as born at their mean birth time.
    pub samples_with_epoch_ages: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerdictCounts {
    pub leak: u64,
    pub growing: u64,
    pub stable: u64,
    pub transient: u64,
    pub unknown: u64,
}

impl VerdictCounts {
    pub fn of(sites: &[Site]) -> Self {
        let mut c = VerdictCounts::default();
        for s in sites {
            *match s.verdict {
                Verdict::Leak => &mut c.leak,
                Verdict::Growing => &mut c.growing,
                Verdict::Stable => &mut c.stable,
                Verdict::Transient => &mut c.transient,
                Verdict::Unknown => &mut c.unknown,
            } += 1;
        }
        c
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessReport {
    pub samples: Vec<ProcessSample>,
    pub summary: ProcessSummary,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessSample {
    pub t_s: f64,
    #[serde(flatten)]
    pub stat: ProcStat,
    /// Outstanding traced bytes then.
    pub traced_bytes: i64,
}

/// One site at one sample of the history.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HistoryPoint {
    /// Seconds since tracing started.
    pub t_s: f64,
    pub outstanding_bytes: i64,
    pub outstanding_blocks: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_age_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub median_age_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TargetInfo {
    pub pid: u32,
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    pub exited: bool,
    pub exit_status: Option<i32>,
}

pub use crate::kernel::sampling::Sampling;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub alloc_calls: u64,
    pub free_calls: u64,
    pub alloc_bytes: u64,
    pub outstanding_blocks: u64,
    pub outstanding_bytes: u64,
    pub dropped_events: u64,
    pub stack_errors: u64,
    /// Frees of blocks allocated before memtrace attached (normal in attach mode).
    pub free_unknown: u64,
    /// Allocator calls that returned NULL or an error.
    pub failed_allocs: u64,
    /// Sites (distinct stacks) seen while tracing, with or without outstanding blocks.
    pub sites_seen: u64,
    /// Allocator calls made by the allocator itself (glibc's realloc(p, 0) calls
    /// free): part of the user's call, not counted on their own.
    pub allocator_internal_calls: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Drops {
    pub alloc_map_full: u64,
    pub pending_map_full: u64,
    pub site_map_full: u64,
    pub out_pointer_read_errors: u64,
    pub unmatched_returns: u64,
    pub missed_returns: u64,
    pub stack_read_errors: u64,
    pub stack_map_full: u64,
    pub stack_hash_collisions: u64,
    pub address_reused: u64,
    /// Calls that came back from a function that memtrace, reading the
    /// allocator's code for its result sites, took as never returning (an
    /// assertion's message): such a call went where no site looks, and may
    /// be missing or have a wrong size. Expected to stay 0.
    pub unforeseen_returns: u64,
    /// Stack walks that stopped before the outermost frame, by cause (their
    /// sites are marked `truncated`).
    pub unwind_bad_read: u64,
    pub unwind_depth_limit: u64,
    pub unwind_unsupported: u64,
    pub unwind_no_frame_pointer: u64,
    /// Frames the unwinder stepped over with the frame pointer (no unwind row).
    pub unwind_fp_fallback_frames: u64,
    /// Frames whose function or line could not be resolved, by reason.
    pub unresolved_frames: std::collections::BTreeMap<String, u64>,
    /// Debug files named by the target's ELF files (or found where it could
    /// write) that memtrace refused to open or read, by reason.
    pub debug_files_refused: std::collections::BTreeMap<String, u64>,
}

impl Drops {
    pub fn from_counters(c: &Counters) -> Self {
        Drops {
            alloc_map_full: c.dropped_alloc_map_full,
            pending_map_full: c.dropped_pending_map_full,
            site_map_full: c.dropped_site_map_full,
            out_pointer_read_errors: c.out_pointer_read_errors,
            unmatched_returns: c.unmatched_returns,
            missed_returns: c.missed_returns,
            stack_read_errors: c.stack_read_errors,
            stack_map_full: c.stack_map_full,
            stack_hash_collisions: c.stack_hash_collisions,
            address_reused: c.address_reused,
            unforeseen_returns: c.unforeseen_returns,
            unwind_bad_read: c.unwind_bad_read,
            unwind_depth_limit: c.unwind_depth_limit,
            unwind_unsupported: c.unwind_unsupported,
            unwind_no_frame_pointer: c.unwind_no_frame_pointer,
            unwind_fp_fallback_frames: c.unwind_fp_fallback,
            unresolved_frames: Default::default(),
            debug_files_refused: Default::default(),
        }
    }

    fn nonzero(&self) -> Vec<(&'static str, u64)> {
        [
            (
                "allocation map full: raise --max-blocks",
                self.alloc_map_full,
            ),
            ("in-flight map full", self.pending_map_full),
            ("site map full: raise --max-blocks", self.site_map_full),
            (
                "posix_memalign result unreadable",
                self.out_pointer_read_errors,
            ),
            ("return without entry", self.unmatched_returns),
            ("return never seen", self.missed_returns),
            ("stack unreadable", self.stack_read_errors),
            ("stack map full: raise --max-stacks", self.stack_map_full),
            ("stack hash collision", self.stack_hash_collisions),
            (
                "allocator call that should not have returned",
                self.unforeseen_returns,
            ),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct AllocatorInfo {
    pub module: String,
    pub functions: Vec<String>,
    pub probes: usize,
    /// Where each function is probed: the first instruction the kernel emulates
    /// (no single-step), e.g. `free+0x3 (je)`.
    pub probe_sites: Vec<String>,
    /// `uprobe-session` (one uprobe session for the allocating functions, one
    /// uprobe_multi link for free: return probes only where needed) or `uprobe`
    /// (an entry and a return uprobe per function).
    pub probe_mechanism: &'static str,
    /// Return probes that ran while tracing. With `uprobe-session`, only calls
    /// whose return value memtrace needs pay one; with `uprobe`, every call does.
    pub return_probes: u64,
    /// Functions whose calls the uprobe session keeps in its own per-call
    /// cookie instead of a map entry (they never jump out of their code, so
    /// no call is handed over to another allocator function).
    pub calls_in_session_cookie: Vec<String>,
    /// How calls the allocator makes itself (glibc's realloc(p, 0) calls
    /// free) are told from users' calls: `call-site probes` (each of its own
    /// calls and jumps into a probed function has a probe that marks the
    /// callee's entry; no other entry looks at its caller) or `return address`
    /// (every entry reads its return address and checks whether it lies in a
    /// probed function).
    pub own_calls_told_by: &'static str,
    /// The probed call sites, e.g. `realloc+0x40 (jmp malloc)`.
    pub own_call_sites: Vec<String>,
    /// Probes inside an allocating function where its result is known, so
    /// that a call costs one probe, not an entry and a return probe: e.g.
    /// `malloc+0x157 (jne)`, and the guards after calls taken as never
    /// returning, `malloc+0x20a (guard)` (see README, "Overhead and
    /// sampling"). Such a function has no entry probe, though
    /// `probe_sites` still names where it would be. Empty when every
    /// function has entry and return probes.
    pub result_sites: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Site {
    pub outstanding_blocks: u64,
    pub outstanding_bytes: u64,
    pub alloc_calls: u64,
    pub alloc_bytes: u64,
    pub oldest_age_s: Option<f64>,
    /// Age of the median outstanding block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub median_age_s: Option<f64>,
    pub verdict: Verdict,
    /// Theil–Sen slope of outstanding bytes over the site's history (null
    /// with fewer than two samples).
    pub growth_bytes_per_s: Option<f64>,
    /// False for the site that collects allocations whose stack was not captured.
    pub stack_captured: bool,
    /// How the stack was walked: `unwind-tables` (the modules' .eh_frame) or
    /// `frame-pointers` (no tables were loaded for the process).
    pub stack_walk: &'static str,
    /// The walk stopped before the outermost frame: callers are missing.
    pub truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_reason: Option<&'static str>,
    pub frames: Frames,
    /// What the verdict was made of.
    pub trend: Trend,
    pub history: Vec<HistoryPoint>,
}

/// A site's frames, innermost first, as the frames of each address of its
/// stack. An address's frames are shared by every site whose stack holds it:
/// at scale, sites share most of their callers, and each address's frames are
/// then made, symbolized and written to JSON once.
#[derive(Clone, Debug, Default)]
pub struct Frames(Vec<Arc<[Frame]>>);

impl Frames {
    pub fn iter(&self) -> impl Iterator<Item = &Frame> {
        self.0.iter().flat_map(|g| g.iter())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.iter().map(|g| g.len()).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|g| g.is_empty())
    }

    /// Room for the frames of `n` more addresses.
    pub fn reserve(&mut self, n: usize) {
        self.0.reserve_exact(n);
    }

    /// Appends the frames of one address.
    pub fn push_group(&mut self, frames: Arc<[Frame]>) {
        self.0.push(frames);
    }

    /// Keeps the first `n` frames.
    pub fn truncate(&mut self, n: usize) {
        let mut left = n;
        for i in 0..self.0.len() {
            let len = self.0[i].len();
            if left < len {
                if left > 0 {
                    self.0[i] = self.0[i][..left].into();
                    self.0.truncate(i + 1);
                } else {
                    self.0.truncate(i);
                }
                return;
            }
            left -= len;
        }
    }
}

impl From<Vec<Frame>> for Frames {
    fn from(frames: Vec<Frame>) -> Self {
        Frames(if frames.is_empty() {
            Vec::new()
        } else {
            vec![frames.into()]
        })
    }
}

/// The JSON of one address's frames (comma-separated), by the address of the
/// shared slice, made once per report.
type FrameJsonCache = FxHashMap<usize, Vec<u8>>;

thread_local! {
    /// While `write_json` serializes the rest of the report: `sites` is
    /// written as `[]`, and then by `write_site_json`.
    static SITES_BY_HAND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn serialize_sites<S: serde::Serializer>(sites: &[Site], s: S) -> Result<S::Ok, S::Error> {
    if SITES_BY_HAND.get() {
        s.collect_seq(std::iter::empty::<&Site>())
    } else {
        s.collect_seq(sites)
    }
}

/// A site as serde writes it (`Site`'s derive, compact), without serde's
/// escaping of every key: ten thousand sites have about half a million keys,
/// all plain ASCII. The unit test `sites_are_written_as_serde_writes_them`
/// holds the two to the same bytes.
fn write_site_json<W: std::io::Write>(
    w: &mut W,
    s: &Site,
    frames: &mut FrameJsonCache,
) -> std::io::Result<()> {
    use serde_json::ser::{CompactFormatter, Formatter as _};
    let f = &mut CompactFormatter;
    // serde_json writes non-finite floats as null.
    fn float<W: std::io::Write>(w: &mut W, v: f64) -> std::io::Result<()> {
        if v.is_finite() {
            CompactFormatter.write_f64(w, v)
        } else {
            w.write_all(b"null")
        }
    }
    fn option<W: std::io::Write>(w: &mut W, v: Option<f64>) -> std::io::Result<()> {
        match v {
            Some(v) => float(w, v),
            None => w.write_all(b"null"),
        }
    }
    let counts: [(&[u8], u64); 4] = [
        (b"{\"outstanding_blocks\":", s.outstanding_blocks),
        (b",\"outstanding_bytes\":", s.outstanding_bytes),
        (b",\"alloc_calls\":", s.alloc_calls),
        (b",\"alloc_bytes\":", s.alloc_bytes),
    ];
    for (key, v) in counts {
        w.write_all(key)?;
        f.write_u64(w, v)?;
    }
    w.write_all(b",\"oldest_age_s\":")?;
    option(w, s.oldest_age_s)?;
    if let Some(m) = s.median_age_s {
        w.write_all(b",\"median_age_s\":")?;
        float(w, m)?;
    }
    w.write_all(b",\"verdict\":")?;
    serde_json::to_writer(&mut *w, &s.verdict)?;
    w.write_all(b",\"growth_bytes_per_s\":")?;
    option(w, s.growth_bytes_per_s)?;
    w.write_all(b",\"stack_captured\":")?;
    f.write_bool(w, s.stack_captured)?;
    w.write_all(b",\"stack_walk\":")?;
    serde_json::to_writer(&mut *w, s.stack_walk)?;
    w.write_all(b",\"truncated\":")?;
    f.write_bool(w, s.truncated)?;
    if let Some(r) = s.truncated_reason {
        w.write_all(b",\"truncated_reason\":")?;
        serde_json::to_writer(&mut *w, r)?;
    }
    w.write_all(b",\"frames\":")?;
    write_frames_json(w, &s.frames, frames)?;
    let t = &s.trend;
    w.write_all(b",\"trend\":{\"samples\":")?;
    f.write_u64(w, t.samples as u64)?;
    w.write_all(b",\"span_s\":")?;
    float(w, t.span_s)?;
    let trend: [(&[u8], Option<f64>); 6] = [
        (b",\"growth_bytes_per_s\":", t.growth_bytes_per_s),
        (
            b",\"recent_growth_bytes_per_s\":",
            t.recent_growth_bytes_per_s,
        ),
        (b",\"relative_growth\":", t.relative_growth),
        (b",\"growth_share\":", t.growth_share),
        (b",\"early_blocks_retained\":", t.early_blocks_retained),
        (b",\"max_oldest_age_s\":", t.max_oldest_age_s),
    ];
    for (key, v) in trend {
        w.write_all(key)?;
        option(w, v)?;
    }
    w.write_all(b"},\"history\":[")?;
    for (i, p) in s.history.iter().enumerate() {
        w.write_all(if i == 0 { b"{\"t_s\":" } else { b",{\"t_s\":" })?;
        float(w, p.t_s)?;
        w.write_all(b",\"outstanding_bytes\":")?;
        f.write_i64(w, p.outstanding_bytes)?;
        w.write_all(b",\"outstanding_blocks\":")?;
        f.write_i64(w, p.outstanding_blocks)?;
        if let Some(a) = p.oldest_age_s {
            w.write_all(b",\"oldest_age_s\":")?;
            float(w, a)?;
        }
        if let Some(a) = p.median_age_s {
            w.write_all(b",\"median_age_s\":")?;
            float(w, a)?;
        }
        w.write_all(b"}")?;
    }
    w.write_all(b"]}")
}

impl Serialize for Frames {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// A frame as serde writes it (`Frame`'s derive, compact), keys unescaped.
fn write_frame_json<W: std::io::Write>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    let mut buf = [0u8; 18];
    w.write_all(b"{\"address\":\"")?;
    w.write_all(crate::symbolize::hex_str(f.address, &mut buf).as_bytes())?;
    let strings: [(&[u8], &Option<String>); 3] = [
        (b"\",\"module\":", &f.module),
        (b",\"function\":", &f.function),
        (b",\"file\":", &f.file),
    ];
    for (key, v) in strings {
        w.write_all(key)?;
        match v {
            Some(v) => serde_json::to_writer(&mut *w, v)?,
            None => w.write_all(b"null")?,
        }
    }
    w.write_all(b",\"line\":")?;
    match f.line {
        Some(l) => {
            serde_json::ser::Formatter::write_u32(&mut serde_json::ser::CompactFormatter, w, l)?
        }
        None => w.write_all(b"null")?,
    }
    w.write_all(if f.inlined {
        b",\"inlined\":true}"
    } else {
        b",\"inlined\":false}"
    })
}

/// A site's frames as a JSON array. The frames of an address shared by
/// several sites are made once per report (`cache`, keyed by the address of
/// the shared slice, which the report holds while the cache lives).
fn write_frames_json<W: std::io::Write>(
    w: &mut W,
    frames: &Frames,
    cache: &mut FrameJsonCache,
) -> std::io::Result<()> {
    fn group<W: std::io::Write>(w: &mut W, frames: &[Frame]) -> std::io::Result<()> {
        for (i, f) in frames.iter().enumerate() {
            if i > 0 {
                w.write_all(b",")?;
            }
            write_frame_json(w, f)?;
        }
        Ok(())
    }
    w.write_all(b"[")?;
    let mut first = true;
    for g in frames.0.iter().filter(|g| !g.is_empty()) {
        if !first {
            w.write_all(b",")?;
        }
        first = false;
        // A group of one site only is written once anyway: as it is.
        if Arc::strong_count(g) == 1 {
            group(w, g)?;
            continue;
        }
        let raw = match cache.entry(g.as_ptr() as usize) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut raw = Vec::new();
                group(&mut raw, g)?;
                e.insert(raw)
            }
        };
        w.write_all(raw)?;
    }
    w.write_all(b"]")
}

fn secs(s: f64) -> String {
    format_duration(std::time::Duration::from_secs_f64(s.max(0.0)))
}

fn percent(share: f64) -> String {
    let p = share * 100.0;
    if p > 0.0 && p < 1.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

fn signed_rate(bytes_per_s: f64) -> String {
    let r = format_rate(bytes_per_s, std::time::Duration::from_secs(1));
    if bytes_per_s >= 0.0 {
        format!("+{r}")
    } else {
        r
    }
}

impl Site {
    /// The line under the site's header that says what its history shows.
    pub fn verdict_text(&self, cfg: &VerdictConfig) -> String {
        let t = &self.trend;
        let rate = self.growth_bytes_per_s.map(signed_rate).unwrap_or_default();
        let over = format!("over {} ({} samples)", secs(t.span_s), t.samples);
        let held = t
            .early_blocks_retained
            .map(|r| format!("{} of its early blocks still held", percent(r)))
            .unwrap_or_else(|| "no early blocks to judge".into());
        match self.verdict {
            Verdict::Leak => format!("LEAK: {rate} {over}, {held}"),
            Verdict::Growing => {
                format!("growing: {rate} {over}, but it frees old blocks ({held})")
            }
            Verdict::Stable => format!("stable: {rate} {over}"),
            Verdict::Transient => format!(
                "transient: no block older than {}{}",
                secs(t.max_oldest_age_s.unwrap_or(0.0)),
                if rate.is_empty() {
                    String::new()
                } else {
                    format!(", {rate} {over}")
                }
            ),
            Verdict::Unknown => format!(
                "unknown: {} sample{}, a verdict needs {}{}",
                t.samples,
                if t.samples == 1 { "" } else { "s" },
                cfg.min_samples,
                if rate.is_empty() {
                    String::new()
                } else {
                    format!(" ({rate} so far)")
                }
            ),
        }
    }
}

/// The order of the text report: leaks, then growing sites, then the rest,
/// each by outstanding bytes (the order of `sites`). Indices into `sites`.
pub fn text_order(sites: &[Site]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sites.len()).collect();
    order.sort_by_key(|&i| text_rank(sites[i].verdict));
    order
}

fn text_rank(v: Verdict) -> u8 {
    match v {
        Verdict::Leak => 0,
        Verdict::Growing => 1,
        _ => 2,
    }
}

impl Report {
    /// The JSON form, written to `w` as it is made.
    pub fn write_json(&self, w: impl std::io::Write) -> std::io::Result<()> {
        use std::io::Write as _;
        // A buffer of a concrete type here: serde_json writes a report of ten
        // thousand sites in millions of small pieces, and the caller's writer
        // is `dyn Write`, whose every call is an indirect one (in profiles).
        let mut w = std::io::BufWriter::with_capacity(256 * 1024, w);
        // Everything but the sites through serde (`sites`, the last field,
        // as `[]`), then the sites by hand in its place.
        SITES_BY_HAND.set(true);
        let head = serde_json::to_vec(self);
        SITES_BY_HAND.set(false);
        let head = head?;
        let head = head
            .strip_suffix(b"[]}")
            .expect("sites are the report's last field");
        w.write_all(head)?;
        w.write_all(b"[")?;
        let mut frames = FrameJsonCache::default();
        for (i, site) in self.sites.iter().enumerate() {
            if i > 0 {
                w.write_all(b",")?;
            }
            write_site_json(&mut w, site, &mut frames)?;
        }
        w.write_all(b"]}\n")?;
        w.flush()
    }

    #[cfg(test)]
    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        self.write_json(&mut out)
            .expect("a report always serializes");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    pub fn to_text(&self, top: usize) -> String {
        let mut o = String::new();
        let t = &self.target;
        let exe = t.exe.as_deref().unwrap_or("?");
        let _ = write!(
            o,
            "memtrace report: pid {} ({exe}), traced for {}",
            t.pid,
            format_duration(std::time::Duration::from_secs_f64(self.duration_s))
        );
        match (t.exited, t.exit_status) {
            (true, Some(s)) => {
                let _ = writeln!(o, ", target exited with status {s}");
            }
            (true, None) => {
                let _ = writeln!(o, ", target exited");
            }
            _ => {
                let _ = writeln!(o);
            }
        }
        // With sampling every byte and block figure is an estimate: marked `~`.
        let est = if self.sampling.is_sampled() { "~" } else { "" };
        if let Sampling::Bytes { mean_bytes } = self.sampling {
            let _ = writeln!(
                o,
                "sampled: one allocation per {} allocated on average (--sample-bytes); \
                 figures marked ~ are estimates",
                format_bytes(mean_bytes as i64)
            );
        }
        let tot = &self.totals;
        let _ = writeln!(
            o,
            "outstanding: {est}{} in {est}{} blocks, from {} allocations ({est}{}) and {} frees while traced",
            format_bytes(tot.outstanding_bytes as i64),
            format_count(tot.outstanding_blocks),
            format_count(tot.alloc_calls),
            format_bytes(tot.alloc_bytes as i64),
            format_count(tot.free_calls),
        );
        if tot.free_unknown > 0 {
            let _ = writeln!(
                o,
                "{} frees were of blocks allocated before memtrace attached",
                format_count(tot.free_unknown)
            );
        }
        let drops = self.drops.nonzero();
        if drops.is_empty() {
            let _ = writeln!(
                o,
                "nothing dropped: every allocator call was recorded with its stack"
            );
        } else {
            let parts: Vec<String> = drops.iter().map(|(n, c)| format!("{c} {n}")).collect();
            let _ = writeln!(
                o,
                "NOT COMPLETE: {} events dropped, {} stacks lost ({})",
                format_count(tot.dropped_events),
                format_count(tot.stack_errors),
                parts.join(", ")
            );
        }
        self.stacks_text(&mut o);
        if self.ages_from == "epochs" || self.timeline.samples_with_epoch_ages > 0 {
            let _ = writeln!(
                o,
                "ages: {} from per-interval aggregates (too many blocks to read each one): \
                 resolved to the sampling interval",
                if self.ages_from == "epochs" {
                    "the report's and the history's".to_string()
                } else {
                    format!("{} history samples'", self.timeline.samples_with_epoch_ages)
                },
            );
        }
        self.process_text(&mut o);
        self.verdicts_text(&mut o);
        let min_age = if self.min_age_s > 0.0 {
            format!(
                " older than {}",
                format_duration(std::time::Duration::from_secs_f64(self.min_age_s))
            )
        } else {
            String::new()
        };
        if self.sites.is_empty() {
            let _ = writeln!(o, "\nno outstanding allocations{min_age}");
            return o;
        }
        let shown = self.sites.len().min(top);
        let order: Vec<&Site> = text_order(&self.sites)
            .into_iter()
            .map(|i| &self.sites[i])
            .collect();
        let leaks_first = order.first().is_some_and(|s| text_rank(s.verdict) < 2);
        let _ = writeln!(
            o,
            "\ntop {shown} of {} sites by outstanding bytes{min_age}{}:",
            self.sites.len(),
            if leaks_first { ", leaks first" } else { "" }
        );
        for (i, site) in order.iter().take(top).enumerate() {
            let mut extra = site
                .oldest_age_s
                .map(|a| format!(", oldest {}", secs(a)))
                .unwrap_or_default();
            if let Some(m) = site.median_age_s {
                let _ = write!(extra, ", median age {}", secs(m));
            }
            let _ = writeln!(
                o,
                "\n#{} {est}{} in {est}{} blocks ({est}{} allocations, {est}{} in all{extra})",
                i + 1,
                format_bytes(site.outstanding_bytes as i64),
                format_count(site.outstanding_blocks),
                format_count(site.alloc_calls),
                format_bytes(site.alloc_bytes as i64),
            );
            let _ = writeln!(o, "    {}", site.verdict_text(&self.verdict_config));
            if !site.stack_captured {
                let _ = writeln!(o, "    [stack not captured]");
            }
            for f in site.frames.iter() {
                let _ = writeln!(o, "    {}", frame_text(f));
            }
            if let Some(reason) = site.truncated_reason {
                let _ = writeln!(o, "    [stack truncated: {reason}]");
            }
        }
        let rest = self.sites.len().saturating_sub(top);
        if rest > 0 {
            let bytes: u64 = order.iter().skip(top).map(|s| s.outstanding_bytes).sum();
            let _ = writeln!(
                o,
                "\n... and {rest} more sites holding {est}{} (all in --format json)",
                format_bytes(bytes as i64)
            );
        }
        o
    }

    /// The process view: its memory at the last sample, its trend, and how much
    /// of it the traced heap explains.
    fn process_text(&self, o: &mut String) {
        let p = &self.process.summary;
        let Some(last) = &p.last else {
            return;
        };
        let mut line = format!(
            "process: rss {} (anonymous {}), vm {}",
            format_bytes(last.rss_bytes as i64),
            format_bytes(last.rss_anon_bytes as i64),
            format_bytes(last.vm_size_bytes as i64),
        );
        if let Some(h) = last.heap_bytes {
            let _ = write!(line, ", heap {}", format_bytes(h as i64));
        }
        if let Some(s) = last.swap_bytes.filter(|&s| s > 0) {
            let _ = write!(line, ", swap {}", format_bytes(s as i64));
        }
        if let Some(f) = last.fds {
            let _ = write!(line, ", {} fds", format_count(f));
        }
        let _ = write!(
            line,
            ", {} thread{}",
            last.threads,
            if last.threads == 1 { "" } else { "s" }
        );
        if let Some(t) = self.process.samples.last().map(|s| s.t_s)
            && self.target.exited
        {
            let _ = write!(line, " (last sampled at {})", secs(t));
        }
        let _ = writeln!(o, "{line}");
        let mut line = String::new();
        if let (Some(r), Some(h)) = (p.rss_growth_bytes_per_s, p.traced_growth_bytes_per_s)
            && p.samples >= 2
        {
            let _ = write!(
                line,
                "  over {} samples: rss {}, traced heap {}",
                p.samples,
                signed_rate(r),
                signed_rate(h)
            );
        }
        if let Some(share) = p.traced_share_of_rss {
            let _ = write!(
                line,
                "{}the traced heap is {} of rss",
                if line.is_empty() { "  " } else { "; " },
                percent(share)
            );
            if let Some(a) = p.traced_share_of_anon_rss {
                let _ = write!(line, " ({} of anonymous rss)", percent(a));
            }
            if self.attached {
                line.push_str(", blocks allocated before memtrace attached are not traced");
            }
        }
        if !line.is_empty() {
            let _ = writeln!(o, "{line}");
        }
        if let Some(note) = &p.note {
            let _ = writeln!(o, "  NOTE: {note}");
        }
    }

    /// How many sites got each verdict, leaks first.
    fn verdicts_text(&self, o: &mut String) {
        let c = &self.verdicts;
        if self.sites.is_empty() {
            return;
        }
        let every = secs(self.timeline.interval_s * self.timeline.stride_intervals as f64);
        if c.unknown == self.sites.len() as u64 {
            let _ = writeln!(
                o,
                "verdicts: unknown for every site: {} sample{} (every {every}), a verdict needs {}: \
                 trace longer or use a shorter --interval",
                self.timeline.samples,
                if self.timeline.samples == 1 { "" } else { "s" },
                self.verdict_config.min_samples
            );
            return;
        }
        let _ = writeln!(
            o,
            "verdicts: {} leak, {} growing, {} stable, {} transient, {} unknown ({} samples, every {every})",
            c.leak, c.growing, c.stable, c.transient, c.unknown, self.timeline.samples
        );
        if self.timeline.samples_without_ages > 0 {
            let _ = writeln!(
                o,
                "  {} samples without ages: too many outstanding blocks to read them all each interval",
                self.timeline.samples_without_ages
            );
        }
        let leaks: Vec<&Site> = self
            .sites
            .iter()
            .filter(|s| s.verdict == Verdict::Leak)
            .collect();
        if leaks.is_empty() {
            let _ = writeln!(
                o,
                "no leaks: no site keeps growing while holding on to its old blocks"
            );
        } else {
            let bytes: u64 = leaks.iter().map(|s| s.outstanding_bytes).sum();
            let rate: f64 = leaks.iter().filter_map(|s| s.growth_bytes_per_s).sum();
            let _ = writeln!(
                o,
                "LEAKS: {}: {}, {}{}",
                if leaks.len() == 1 {
                    "1 site keeps growing and holds on to its old blocks".to_string()
                } else {
                    format!(
                        "{} sites keep growing and hold on to their old blocks",
                        leaks.len()
                    )
                },
                format_bytes(bytes as i64),
                signed_rate(rate),
                if leaks.len() == 1 { "" } else { " together" }
            );
        }
    }
}

impl Report {
    /// How the stacks were walked, and how many came out incomplete.
    fn stacks_text(&self, o: &mut String) {
        let u = &self.unwind;
        if u.modules > 0 {
            let _ = writeln!(
                o,
                "stacks: unwound with the .eh_frame tables of {} modules ({} of kernel memory)",
                u.modules,
                format_bytes((u.row_bytes + u.pages * 32) as i64)
            );
        } else {
            let _ = writeln!(
                o,
                "stacks: walked with frame pointers (no unwind tables loaded)"
            );
        }
        let truncated: Vec<&Site> = self.sites.iter().filter(|s| s.truncated).collect();
        if !truncated.is_empty() {
            let d = &self.drops;
            let causes: Vec<String> = [
                ("unreadable stack", d.unwind_bad_read),
                ("depth limit", d.unwind_depth_limit),
                ("unsupported unwind rule", d.unwind_unsupported),
                ("no row and no frame pointer", d.unwind_no_frame_pointer),
            ]
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(what, n)| format!("{n} {what}"))
            .collect();
            let _ = writeln!(
                o,
                "{} of {} sites have truncated stacks (walks stopped early: {})",
                truncated.len(),
                self.sites.len(),
                causes.join(", ")
            );
        }
    }
}

pub fn frame_text(f: &Frame) -> String {
    let func = f.function.as_deref().unwrap_or("??");
    let mut s = format!("{:#014x} {func}", f.address);
    match (&f.file, f.line) {
        (Some(file), Some(line)) => {
            let _ = write!(s, " at {file}:{line}");
        }
        (Some(file), None) => {
            let _ = write!(s, " at {file}");
        }
        _ => {
            if let Some(m) = &f.module {
                let _ = write!(s, " in {m}");
            }
        }
    }
    if f.inlined {
        s.push_str(" (inlined)");
    }
    s
}

/// UTC time as RFC 3339 (`2026-11-23T07:00:00Z`).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            schema: SCHEMA,
            memtrace_version: "0.1.0",
            target: TargetInfo {
                pid: 42,
                exe: Some("/usr/bin/app".into()),
                cmdline: vec!["app".into()],
                exited: true,
                exit_status: Some(7),
            },
            started_at: "2026-11-23T07:00:00Z".into(),
            ended_at: "2026-11-23T07:00:12Z".into(),
            duration_s: 12.5,
            end_reason: "target-exited",
            sampling: Sampling::Exact,
            totals: Totals {
                alloc_calls: 10,
                free_calls: 3,
                alloc_bytes: 1000,
                outstanding_blocks: 7,
                outstanding_bytes: 700,
                ..Default::default()
            },
            drops: Drops::default(),
            allocator: AllocatorInfo {
                module: "/lib/libc.so.6".into(),
                functions: vec!["malloc".into()],
                probes: 2,
                probe_sites: vec!["malloc+0x0 (push)".into()],
                probe_mechanism: "uprobe-session",
                return_probes: 10,
                calls_in_session_cookie: vec!["malloc".into()],
                own_calls_told_by: "call-site probes",
                own_call_sites: vec!["realloc+0x40 (jmp malloc)".into()],
                result_sites: vec!["malloc+0x157 (jne)".into()],
            },
            min_age_s: 0.0,
            ages_from: "blocks",
            verdict_config: VerdictConfig::default(),
            timeline: Timeline::default(),
            verdicts: VerdictCounts::default(),
            process: ProcessReport::default(),
            unwind: Default::default(),
            attached: false,
            sites: vec![Site {
                outstanding_blocks: 7,
                outstanding_bytes: 700,
                alloc_calls: 10,
                alloc_bytes: 1000,
                oldest_age_s: Some(3.2),
                median_age_s: None,
                verdict: Verdict::Unknown,
                growth_bytes_per_s: None,
                trend: Trend::default(),
                history: vec![],
                stack_captured: true,
                stack_walk: "unwind-tables",
                truncated: false,
                truncated_reason: None,
                frames: vec![
                    Frame {
                        address: 0x401136,
                        module: Some("/usr/bin/app".into()),
                        function: Some("helper".into()),
                        file: Some("/src/a.c".into()),
                        line: Some(9),
                        inlined: true,
                        unresolved: None,
                    },
                    Frame {
                        address: 0x401136,
                        module: Some("/usr/bin/app".into()),
                        function: Some("make_buffer".into()),
                        file: Some("/src/a.c".into()),
                        line: Some(38),
                        inlined: false,
                        unresolved: None,
                    },
                ]
                .into(),
            }],
        }
    }

    fn frame(address: u64, function: &str, line: u32) -> Frame {
        Frame {
            address,
            module: Some("/usr/bin/app".into()),
            function: Some(function.into()),
            file: Some("/src/a.c".into()),
            line: Some(line),
            inlined: false,
            unresolved: None,
        }
    }

    #[test]
    fn frames_are_groups_of_an_address() {
        let shared: Arc<[Frame]> = vec![frame(2, "inl", 5), frame(2, "caller", 6)].into();
        let mut f = Frames::default();
        assert!(f.is_empty());
        f.push_group(vec![frame(1, "leaf", 1)].into());
        f.push_group(shared.clone());
        f.push_group(vec![frame(3, "main", 9)].into());
        let names =
            |f: &Frames| -> Vec<String> { f.iter().map(|x| x.function.clone().unwrap()).collect() };
        assert_eq!(f.len(), 4);
        assert_eq!(names(&f), ["leaf", "inl", "caller", "main"]);
        assert_eq!(f.iter().nth(2).unwrap().line, Some(6));
        let mut cut = f.clone();
        cut.truncate(2);
        assert_eq!(names(&cut), ["leaf", "inl"]);
        // Cutting inside a shared group leaves the group itself whole.
        assert_eq!(shared.len(), 2);
        assert_eq!(names(&f), ["leaf", "inl", "caller", "main"]);
        let mut cut = f.clone();
        cut.truncate(3);
        assert_eq!(names(&cut), ["leaf", "inl", "caller"]);
        cut.truncate(10);
        assert_eq!(cut.len(), 3);
        cut.truncate(0);
        assert!(cut.is_empty());
    }

    #[test]
    fn json_follows_the_contract() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(v["schema"], "memtrace-report/1");
        assert_eq!(v["target"]["exit_status"], 7);
        assert_eq!(v["sampling"]["mode"], "exact");
        for k in [
            "alloc_calls",
            "free_calls",
            "alloc_bytes",
            "outstanding_blocks",
            "outstanding_bytes",
            "dropped_events",
            "stack_errors",
        ] {
            assert!(v["totals"][k].is_u64(), "totals.{k}");
        }
        let f = &v["sites"][0]["frames"][0];
        assert_eq!(f["address"], "0x401136");
        assert_eq!(f["inlined"], true);
        assert_eq!(v["sites"][0]["frames"][1]["line"], 38);
    }

    #[test]
    fn sites_are_written_as_serde_writes_them() {
        let mut r = sample();
        let mut odd = r.sites[0].clone();
        odd.median_age_s = Some(f64::NAN);
        odd.oldest_age_s = None;
        odd.growth_bytes_per_s = Some(f64::INFINITY);
        odd.truncated = true;
        odd.truncated_reason = Some("depth limit of 127 frames");
        odd.stack_walk = "frame-pointers";
        odd.verdict = Verdict::Leak;
        odd.trend = Trend {
            samples: 3,
            span_s: 1.5e-7,
            growth_bytes_per_s: Some(-12.25),
            recent_growth_bytes_per_s: None,
            relative_growth: Some(f64::NEG_INFINITY),
            growth_share: Some(1.0),
            early_blocks_retained: None,
            max_oldest_age_s: Some(123456789.125),
        };
        odd.history = vec![
            HistoryPoint {
                t_s: 0.25,
                outstanding_bytes: -5,
                outstanding_blocks: i64::MAX,
                oldest_age_s: None,
                median_age_s: Some(0.1),
            },
            HistoryPoint {
                t_s: 1e21,
                outstanding_bytes: 0,
                outstanding_blocks: i64::MIN,
                oldest_age_s: Some(2.0),
                median_age_s: None,
            },
        ];
        let mut empty = odd.clone();
        empty.history.clear();
        empty.frames = Frames::default();
        empty.outstanding_blocks = u64::MAX;
        r.sites.push(odd);
        r.sites.push(empty);
        // serde_json::to_string goes through Site's derive (and no cache).
        assert_eq!(r.to_json(), serde_json::to_string(&r).unwrap() + "\n");
        r.sites.clear();
        assert_eq!(r.to_json(), serde_json::to_string(&r).unwrap() + "\n");
    }

    #[test]
    fn shared_frames_are_written_as_without_the_cache() {
        let mut r = sample();
        let mut other = r.sites[0].clone();
        other.outstanding_bytes += 1;
        // Site 0's group of two frames shared by two more sites, after a leaf
        // of their own, then a frame that differs from one of the shared ones
        // only in its line, and one with characters JSON escapes.
        let shared = r.sites[0].frames.0[0].clone();
        let mut near = shared[1].clone();
        near.line = near.line.map(|l| l + 1);
        let mut frames = Frames::default();
        frames.push_group(vec![frame(0x400000, "other_leaf", 3)].into());
        frames.push_group(shared);
        frames.push_group(vec![near].into());
        frames.push_group(
            vec![Frame {
                address: u64::MAX,
                module: Some("/lib/\"quoted\"\n.so".into()),
                function: None,
                file: None,
                line: None,
                inlined: false,
                unresolved: None,
            }]
            .into(),
        );
        other.frames = frames;
        r.sites.push(other.clone());
        r.sites.push(other);
        // to_value does not go through write_json's cache.
        let plain = serde_json::to_value(&r).unwrap();
        let written: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(written, plain);
        // Byte for byte, too.
        assert_eq!(r.to_json(), serde_json::to_string(&r).unwrap() + "\n");
        let frames = &written["sites"][1]["frames"];
        assert_eq!(frames[0]["function"], "other_leaf");
        assert_eq!(frames[1]["function"], "helper");
        assert_eq!(frames[2]["line"], 38);
        assert_eq!(frames[3]["line"], 39);
        assert_eq!(frames[4]["address"], "0xffffffffffffffff");
        assert_eq!(frames[4]["module"], "/lib/\"quoted\"\n.so");
        assert_eq!(frames, &written["sites"][2]["frames"]);
        assert_eq!(written["sites"][0]["frames"][0]["address"], "0x401136");
    }

    #[test]
    fn text_shows_sites_and_limits() {
        let r = sample();
        let t = r.to_text(10);
        assert!(t.contains("700 B in 7 blocks"), "{t}");
        assert!(t.contains("make_buffer at /src/a.c:38"), "{t}");
        assert!(t.contains("(inlined)"), "{t}");
        assert!(t.contains("exited with status 7"), "{t}");
        assert!(t.contains("nothing dropped"), "{t}");
        assert!(t.contains("stacks: walked with frame pointers"), "{t}");
        let t0 = r.to_text(0);
        assert!(t0.contains("and 1 more sites"), "{t0}");
    }

    #[test]
    fn sampled_figures_are_marked_as_estimates() {
        let mut r = sample();
        let exact = r.to_text(10);
        assert!(
            !exact.contains('~') && !exact.contains("sampled:"),
            "{exact}"
        );
        r.sampling = Sampling::from_mean(512 * 1024);
        let t = r.to_text(10);
        assert!(
            t.contains("sampled: one allocation per 512.0 KiB allocated on average"),
            "{t}"
        );
        assert!(t.contains("outstanding: ~700 B in ~7 blocks"), "{t}");
        assert!(t.contains("~700 B in ~7 blocks ("), "{t}");
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(
            v["sampling"],
            serde_json::json!({"mode": "bytes", "mean_bytes": 524288})
        );
    }

    #[test]
    fn text_marks_truncated_stacks() {
        let mut r = sample();
        r.unwind.modules = 3;
        r.unwind.row_bytes = 12 * 1024;
        r.sites[0].truncated = true;
        r.sites[0].truncated_reason = Some("depth limit of 127 frames");
        r.drops.unwind_depth_limit = 1;
        let t = r.to_text(10);
        assert!(
            t.contains("tables of 3 modules (12.0 KiB of kernel memory)"),
            "{t}"
        );
        assert!(
            t.contains("1 of 1 sites have truncated stacks (walks stopped early: 1 depth limit)"),
            "{t}"
        );
        assert!(
            t.contains("[stack truncated: depth limit of 127 frames]"),
            "{t}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["sites"][0]["truncated"], true);
        assert_eq!(v["unwind"]["modules"], 3);
    }

    #[test]
    fn text_says_where_ages_come_from() {
        let mut r = sample();
        assert!(!r.to_text(10).contains("ages:"));
        r.timeline.samples_with_epoch_ages = 4;
        let t = r.to_text(10);
        assert!(
            t.contains("ages: 4 history samples' from per-interval aggregates"),
            "{t}"
        );
        r.ages_from = "epochs";
        let t = r.to_text(10);
        assert!(
            t.contains("ages: the report's and the history's from per-interval aggregates"),
            "{t}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["ages_from"], "epochs");
        assert_eq!(v["timeline"]["samples_with_epoch_ages"], 4);
    }

    #[test]
    fn text_flags_drops() {
        let mut r = sample();
        r.drops.missed_returns = 3;
        r.totals.dropped_events = 3;
        let t = r.to_text(10);
        assert!(t.contains("NOT COMPLETE: 3 events dropped"), "{t}");
        assert!(t.contains("3 return never seen"), "{t}");
        // A full map names the option that makes room.
        r.drops.alloc_map_full = 2;
        r.totals.dropped_events = 5;
        let t = r.to_text(10);
        assert!(
            t.contains("(2 allocation map full: raise --max-blocks, 3 return never seen)"),
            "{t}"
        );
    }

    /// The sample with a stable site (the larger) and a leak, a history and a process view.
    fn with_verdicts() -> Report {
        let mut r = sample();
        r.verdict_config = VerdictConfig::for_interval(std::time::Duration::from_millis(200));
        r.timeline = Timeline {
            interval_s: 0.2,
            samples: 21,
            capacity: 128,
            stride_intervals: 1,
            samples_without_ages: 0,
            samples_with_epoch_ages: 0,
        };
        r.sites[0].verdict = Verdict::Stable;
        r.sites[0].growth_bytes_per_s = Some(0.0);
        r.sites[0].trend = Trend {
            samples: 21,
            span_s: 4.0,
            growth_bytes_per_s: Some(0.0),
            ..Default::default()
        };
        let mut leak = r.sites[0].clone();
        leak.outstanding_bytes = 300;
        leak.outstanding_blocks = 3;
        leak.verdict = Verdict::Leak;
        leak.growth_bytes_per_s = Some(2048.0);
        leak.median_age_s = Some(2.0);
        leak.trend = Trend {
            samples: 21,
            span_s: 4.0,
            growth_bytes_per_s: Some(2048.0),
            early_blocks_retained: Some(1.0),
            ..Default::default()
        };
        leak.history = vec![
            HistoryPoint {
                t_s: 0.2,
                outstanding_bytes: 100,
                outstanding_blocks: 1,
                oldest_age_s: Some(0.1),
                median_age_s: Some(0.1),
            },
            HistoryPoint {
                t_s: 4.2,
                outstanding_bytes: 300,
                outstanding_blocks: 3,
                oldest_age_s: None,
                median_age_s: None,
            },
        ];
        let mut frames: Vec<Frame> = leak.frames.iter().cloned().collect();
        frames[1].function = Some("leak_fn".into());
        leak.frames = frames.into();
        r.sites.push(leak);
        r.verdicts = VerdictCounts::of(&r.sites);
        let stat = |rss: u64| ProcStat {
            rss_bytes: rss,
            rss_anon_bytes: rss / 2,
            vm_size_bytes: 4 * rss,
            heap_bytes: Some(132 << 10),
            swap_bytes: Some(0),
            fds: Some(4),
            threads: 2,
        };
        r.process = ProcessReport {
            samples: vec![ProcessSample {
                t_s: 0.2,
                stat: stat(10 << 20),
                traced_bytes: 1000,
            }],
            summary: ProcessSummary {
                samples: 21,
                first: Some(stat(10 << 20)),
                last: Some(stat(20 << 20)),
                rss_growth_bytes_per_s: Some(1048576.0),
                traced_growth_bytes_per_s: Some(0.0),
                traced_share_of_rss: Some(0.25),
                traced_share_of_anon_rss: Some(0.5),
                note: Some("RSS grew 10.0 MiB".into()),
                ..Default::default()
            },
        };
        r
    }

    #[test]
    fn text_leads_with_the_leaks() {
        let r = with_verdicts();
        let t = r.to_text(10);
        assert!(
            t.contains("verdicts: 1 leak, 0 growing, 1 stable, 0 transient, 0 unknown (21 samples, every 200ms)"),
            "{t}"
        );
        assert!(
            t.contains(
                "LEAKS: 1 site keeps growing and holds on to its old blocks: 300 B, +2.0 KiB/s\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("top 2 of 2 sites by outstanding bytes, leaks first:"),
            "{t}"
        );
        let leak = t.find("#1 300 B in 3 blocks (10 allocations, 1000 B in all, oldest 3.2s, median age 2.0s)\n    LEAK: +2.0 KiB/s over 4.0s (21 samples), 100% of its early blocks still held\n");
        let stable = t.find("#2 700 B in 7 blocks (10 allocations, 1000 B in all, oldest 3.2s)\n    stable: +0 B/s over 4.0s (21 samples)\n");
        assert!(leak.is_some() && stable.is_some(), "{t}");
        assert!(
            t.contains("process: rss 20.0 MiB (anonymous 10.0 MiB), vm 80.0 MiB, heap 132.0 KiB, 4 fds, 2 threads (last sampled at 200ms)\n"),
            "{t}"
        );
        assert!(
            t.contains("  over 21 samples: rss +1.0 MiB/s, traced heap +0 B/s; the traced heap is 25% of rss (50% of anonymous rss)\n"),
            "{t}"
        );
        assert!(t.contains("  NOTE: RSS grew 10.0 MiB\n"), "{t}");
        // -n 1 shows the leak, not the larger stable site.
        let t1 = r.to_text(1);
        assert!(t1.contains("leak_fn") && !t1.contains("#2 "), "{t1}");
        assert!(t1.contains("... and 1 more sites holding 700 B"), "{t1}");
    }

    #[test]
    fn text_says_when_verdicts_need_more_samples() {
        let mut r = sample();
        r.timeline.samples = 1;
        r.timeline.interval_s = 10.0;
        r.timeline.stride_intervals = 1;
        r.verdicts = VerdictCounts::of(&r.sites);
        r.sites[0].trend.samples = 1;
        let t = r.to_text(10);
        assert!(
            t.contains(
                "verdicts: unknown for every site: 1 sample (every 10.0s), a verdict needs 4"
            ),
            "{t}"
        );
        assert!(
            t.contains("    unknown: 1 sample, a verdict needs 4\n"),
            "{t}"
        );
        assert!(t.contains("top 1 of 1 sites by outstanding bytes:"), "{t}");
    }

    #[test]
    fn json_has_verdicts_history_and_process() {
        let r = with_verdicts();
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        // Sites stay sorted by outstanding bytes in JSON.
        assert_eq!(v["sites"][0]["verdict"], "stable");
        let leak = &v["sites"][1];
        assert_eq!(leak["verdict"], "leak");
        assert_eq!(leak["growth_bytes_per_s"], 2048.0);
        assert_eq!(leak["median_age_s"], 2.0);
        assert_eq!(leak["trend"]["early_blocks_retained"], 1.0);
        assert_eq!(
            leak["history"][0],
            serde_json::json!({"t_s": 0.2, "outstanding_bytes": 100, "outstanding_blocks": 1,
                               "oldest_age_s": 0.1, "median_age_s": 0.1})
        );
        assert_eq!(
            leak["history"][1],
            serde_json::json!({"t_s": 4.2, "outstanding_bytes": 300, "outstanding_blocks": 3})
        );
        assert!(v["sites"][0].get("median_age_s").is_none());
        assert_eq!(v["verdicts"]["leak"], 1);
        assert_eq!(v["verdict_config"]["min_samples"], 4);
        assert_eq!(v["timeline"]["samples"], 21);
        assert_eq!(v["process"]["samples"][0]["rss_bytes"], 10 << 20);
        assert_eq!(v["process"]["samples"][0]["traced_bytes"], 1000);
        assert_eq!(v["process"]["summary"]["last"]["threads"], 2);
        assert!(v.get("attached").is_none());
    }

    #[test]
    fn times_are_rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_417_200);
        assert_eq!(rfc3339(t), "2026-11-23T07:00:00Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
