//! The final report: its data (schema `memtrace-report/1`) and its renderings:
//! [`json`] (the one writer of the JSON form), [`text`], [`pprof`] (a heap
//! profile for pprof, Pyroscope and Parca), and [`diff`] (two JSON reports
//! compared).
pub mod diff;
#[cfg(test)]
mod fixture;
mod flame;
mod folded;
mod frames;
mod json;
pub mod lineage;
pub mod mappings;
mod pprof;
mod proto;
pub mod resource_site;
pub mod resources;
pub mod roles;
mod site_id;
mod stack_text;
mod text;
pub mod threads;

pub use flame::write_flame_graph;
pub use folded::write_folded;
pub mod metrics;
pub use pprof::{Profile, ProfileSample, write_pprof};

pub use frames::Frames;
pub use site_id::site_id;
pub use stack_text::TextStyle;
pub use text::text_order;

pub use crate::process::namespaces::Namespaces;
pub use crate::symbolize::Frame;
use crate::{
    analyze::{ProcessSummary, Trend, Verdict, VerdictConfig},
    kernel::collect::Counters,
    process::stat::ProcStat,
};

use serde::Serialize;

pub const SCHEMA: &str = "memtrace-report/1";

/// The whole report. Its JSON is written by [`json`]'s writer, in the order
/// of the fields here; the other types derive `Serialize` for the parts of it
/// they are.
#[derive(Clone, Debug)]
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
    /// Allocator functions the target may call that memtrace does not
    /// trace: blocks they allocate or free are not seen, so the report is
    /// not complete when this is not empty.
    pub untraced_entry_points: Vec<UntracedEntryPoint>,
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
    /// How long attaching took, and each of its steps.
    pub attach: AttachTimes,
    /// Attach mode: blocks allocated before memtrace attached are not traced.
    /// Not in the JSON.
    pub attached: bool,
    /// The target's executable mappings (for exports that name them: pprof).
    /// Not in the JSON.
    pub modules: Vec<ModuleInfo>,
    pub sites: Vec<Site>,
    /// Every other site that allocated while traced: its blocks were all
    /// freed, or those left are younger than `--min-age` (`outstanding_*`
    /// count them). Most bytes allocated first, at most [`MAX_FREED_SITES`].
    pub freed_sites: Vec<Site>,
    /// The sites past [`MAX_FREED_SITES`], not in `freed_sites`.
    pub freed_sites_left_out: LeftOut,
    /// What memtrace could not finish, and why (a file the target named that
    /// did not answer, ...): each a sentence. Empty when nothing was cut short.
    pub cut_short: Vec<String>,
    /// File descriptors (None with `--no-resources`: `null` in the JSON).
    pub resources: Option<resources::Resources>,
    /// `--snapshot-every`: where the snapshots went and how many were
    /// written so far. None (not in the JSON) without it.
    pub snapshots: Option<SnapshotStats>,
    /// The programs the target ran and the children it created (JSON:
    /// `images`, `forks_not_followed`). None (not in the JSON) in reports
    /// made without a live target.
    pub lineage: Option<lineage::Lineage>,
}

/// The snapshots of a run (`--snapshot-every`), as far as they went when
/// the report was made. JSON: `{"dir": "/var/lib/memtrace/app", "every_s":
/// 300.0, "keep": 12, "written": 40, "failed": 0, "skipped": 0}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SnapshotStats {
    pub dir: String,
    pub every_s: f64,
    /// How many of the newest snapshots the directory keeps.
    pub keep: u64,
    pub written: u64,
    /// Snapshots that could not be written (the first error was said on
    /// stderr); their files were removed.
    pub failed: u64,
    /// Snapshots not taken because the previous one was still being written.
    pub skipped: u64,
}

/// The most sites `freed_sites` lists: each costs its frames in the report
/// (symbolized, a few hundred bytes of JSON each), and a program can go
/// through every stack the map holds (`--max-stacks`).
pub const MAX_FREED_SITES: usize = 10_000;

/// What a capped list left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LeftOut {
    pub sites: u64,
    pub alloc_calls: u64,
    pub alloc_bytes: u64,
}

/// One executable mapping of the target.
#[derive(Clone, Debug, Default)]
pub struct ModuleInfo {
    /// As the target sees it (its maps).
    pub path: String,
    pub start: u64,
    /// The first address past the mapping.
    pub limit: u64,
    /// File offset of `start`.
    pub file_offset: u64,
    /// GNU build id, lowercase hex, when the file has one (and was read).
    pub build_id: Option<String>,
}

/// How long attaching took: `total_s` from the start of the attach (after
/// the checks of privileges, kernel and map sizes) to every probe in, and
/// each step's own wall time, in the order the steps ended. Steps run in
/// parallel (programs are verified while the unwind tables load), so they
/// may add up to more than the total. JSON: `{"total_s": 0.41, "steps":
/// {"create_maps": 0.012, ...}}`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttachTimes {
    pub total_s: f64,
    /// (step, seconds), each name once.
    pub steps: Vec<(String, f64)>,
}

impl AttachTimes {
    /// From the steps of one attach; a step run twice counts once, with
    /// both times added. Seconds to the tenth of a millisecond.
    pub fn new(total: std::time::Duration, steps: Vec<crate::steps::Step>) -> AttachTimes {
        let round = |s: f64| (s * 1e4).round() / 1e4;
        let mut out: Vec<(String, f64)> = Vec::new();
        for step in steps {
            match out.iter_mut().find(|(name, _)| *name == step.name) {
                Some((_, s)) => *s += step.seconds,
                None => out.push((step.name, step.seconds)),
            }
        }
        AttachTimes {
            total_s: round(total.as_secs_f64()),
            steps: out.into_iter().map(|(n, s)| (n, round(s))).collect(),
        }
    }
}

impl Serialize for AttachTimes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        /// The steps as one object, in their order.
        struct Steps<'a>(&'a [(String, f64)]);
        impl Serialize for Steps<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
            }
        }
        let mut st = s.serialize_struct("AttachTimes", 2)?;
        st.serialize_field("total_s", &self.total_s)?;
        st.serialize_field("steps", &Steps(&self.steps))?;
        st.end()
    }
}

impl std::fmt::Display for AttachTimes {
    /// `0.412s: create_maps 0.012s, verify_alloc_session 0.161s, ...`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3}s:", self.total_s)?;
        for (i, (name, s)) in self.steps.iter().enumerate() {
            write!(f, "{} {name} {s:.3}s", if i == 0 { "" } else { "," })?;
        }
        Ok(())
    }
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
            c.count(s.verdict);
        }
        c
    }

    /// Counts one site's verdict.
    pub fn count(&mut self, v: Verdict) {
        *match v {
            Verdict::Leak => &mut self.leak,
            Verdict::Growing => &mut self.growing,
            Verdict::Stable => &mut self.stable,
            Verdict::Transient => &mut self.transient,
            Verdict::Unknown => &mut self.unknown,
        } += 1;
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
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryPoint {
    /// Seconds since tracing started.
    pub t_s: f64,
    pub outstanding_bytes: i64,
    pub outstanding_blocks: i64,
    /// Absent from the JSON when `None` (the blocks were not scanned then), as
    /// is `median_age_s`.
    pub oldest_age_s: Option<f64>,
    pub median_age_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TargetInfo {
    /// The host's pid (memtrace's pid namespace is the host's).
    pub pid: u32,
    /// As the target sees them: in its own mount namespace or root.
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    pub exited: bool,
    pub exit_status: Option<i32>,
    /// The pid as the target's own pid namespace numbers it (a container's
    /// view; `pid` when it shares memtrace's), the namespaces it does not
    /// share with memtrace, and whether its root is another.
    #[serde(flatten)]
    pub namespaces: Namespaces,
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
    /// Frees by the program of blocks memtrace did not see allocated:
    /// allocated before it attached (normal in attach mode), or dropped.
    pub free_unknown: u64,
    /// Allocator calls that returned NULL or an error.
    pub failed_allocs: u64,
    /// Sites (distinct stacks) seen while tracing, with or without outstanding blocks.
    pub sites_seen: u64,
    /// Allocator calls made by the allocator itself (glibc's realloc(p, 0) calls
    /// free): part of the user's call, not counted on their own.
    pub allocator_internal_calls: u64,
    /// Frees the allocator's own code made of blocks memtrace did not hold
    /// (glibc empties a thread's cache into the heap when the thread exits):
    /// not the program's, not in `free_calls`.
    pub allocator_own_frees: u64,
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
    /// Return addresses that were a uretprobe's trampoline (a return probe,
    /// often another tool's, pending on that frame), replaced with the real
    /// one the kernel kept: in stacks, and where an entry tells the
    /// allocator's own calls by their return address.
    pub unwind_uretprobe_frames: u64,
    /// The same, where the kernel had no record of the real one: the walk
    /// stopped there (its site is `truncated`).
    pub unwind_uretprobe_unresolved: u64,
    /// Allocator calls whose return address, read at their entry to tell
    /// the allocator's own calls from the program's, was a uretprobe's
    /// trampoline with no record of the real one: taken as the program's
    /// calls, which they may not be (in `dropped_events`).
    pub own_call_uretprobe_unresolved: u64,
    /// Frames whose function or line could not be resolved, by reason.
    pub unresolved_frames: std::collections::BTreeMap<String, u64>,
    /// Debug files named by the target's ELF files (or found where it could
    /// write) that memtrace refused to open or read, by reason.
    pub debug_files_refused: std::collections::BTreeMap<String, u64>,
}

/// `$ty { f: c.f, ... , rest }`: fields that are counters take the counter of
/// the same name (see `memtrace_common::Counter`), so a counter's name is the
/// same in the kernel, in `Counters` and in the report.
macro_rules! counters_by_name {
    ($ty:ident from $c:ident { $($f:ident),+ $(,)? } $($rest:tt)*) => {
        $ty { $($f: $c.$f,)+ $($rest)* }
    };
}

impl Drops {
    pub fn from_counters(c: &Counters) -> Self {
        counters_by_name!(Drops from c {
            alloc_map_full,
            pending_map_full,
            site_map_full,
            out_pointer_read_errors,
            unmatched_returns,
            missed_returns,
            stack_read_errors,
            stack_map_full,
            stack_hash_collisions,
            address_reused,
            unforeseen_returns,
            unwind_bad_read,
            unwind_depth_limit,
            unwind_unsupported,
            unwind_no_frame_pointer,
            unwind_fp_fallback_frames,
            unwind_uretprobe_frames,
            unwind_uretprobe_unresolved,
            own_call_uretprobe_unresolved,
        } unresolved_frames: Default::default(), debug_files_refused: Default::default())
    }
}

impl Totals {
    /// The totals that are counters (`alloc_calls` counts sampled and
    /// unsampled calls); the caller fills in the rest.
    pub fn from_counters(c: &Counters) -> Self {
        counters_by_name!(Totals from c {
            free_calls,
            alloc_bytes,
            free_unknown,
            failed_allocs,
            allocator_internal_calls,
            allocator_own_frees,
        }
            alloc_calls: c.alloc_calls + c.unsampled_calls,
            dropped_events: c.dropped_events(),
            stack_errors: c.stack_errors(),
            ..Default::default()
        )
    }
}

/// An allocator function memtrace does not trace: `name`, which `module`
/// imports (or, the executable, defines) and may call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UntracedEntryPoint {
    pub name: String,
    pub module: String,
    /// Why, when it is not the plan's doing: its module is not probed at
    /// all (on a FUSE mount). Left out of the JSON when None.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One module whose allocator functions are probed.
#[derive(Clone, Debug, Serialize)]
pub struct AllocatorModule {
    pub module: String,
    /// The functions probed there, every name of each.
    pub functions: Vec<String>,
    /// Its functions that are not probed because each only hands its calls
    /// to a probed one (`realloc -> mi_heap_realloc`): their calls are
    /// counted there.
    pub forwarded: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AllocatorInfo {
    /// The module the process's `malloc` is in (the first of `modules`).
    pub module: String,
    /// The functions probed, in every module.
    pub functions: Vec<String>,
    /// Every module whose functions are probed: a process may call more
    /// than one allocator (a Rust program's static jemalloc and glibc's
    /// malloc; jemalloc's operator new and glibc's pvalloc).
    pub modules: Vec<AllocatorModule>,
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
    /// no call is handed over to another allocator function), one name each.
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

#[derive(Clone, Debug)]
pub struct Site {
    pub outstanding_blocks: u64,
    pub outstanding_bytes: u64,
    /// The most bytes the site held at any history sample or at the end
    /// (every block, whatever its age): a peak between samples is not seen.
    pub peak_bytes: u64,
    pub alloc_calls: u64,
    pub alloc_bytes: u64,
    /// Allocations of this stack that were not recorded: the block table
    /// was full (`drops.alloc_map_full`, `--max-blocks`). Absent from the
    /// JSON when 0. Its figures miss them, so it gets no verdict they could
    /// contradict (`stable` or `transient` becomes `unknown`).
    pub dropped_blocks: u64,
    pub oldest_age_s: Option<f64>,
    /// Age of the median outstanding block (absent from the JSON when `None`).
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
    /// Absent from the JSON when `None`.
    pub truncated_reason: Option<&'static str>,
    /// A Python stack: whether the interpreter's native frames below the
    /// innermost Python frame's evaluation loop were left out (absent from
    /// the JSON when `None`: no Python frames).
    pub native_frames_folded: Option<bool>,
    pub frames: Frames,
    /// What the verdict was made of.
    pub trend: Trend,
    pub history: Vec<HistoryPoint>,
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

    #[test]
    fn counters_keep_their_names_in_the_json() {
        use memtrace_common::{Counter, NUM_COUNTERS};
        // Every counter a distinct value: each one shown under its own name.
        let mut raw = [0u64; NUM_COUNTERS as usize];
        for (i, v) in raw.iter_mut().enumerate() {
            *v = 1000 + i as u64;
        }
        let c = Counters::from_raw(&raw, 7);
        let drops = serde_json::to_value(Drops::from_counters(&c)).unwrap();
        let totals = serde_json::to_value(Totals::from_counters(&c)).unwrap();
        assert_eq!(drops["missed_returns"], 7);
        for k in Counter::ALL {
            let name = k.name();
            let shown = [&drops[name], &totals[name]];
            match k {
                // Shown inside alloc_calls; return_probes is in `allocator`.
                Counter::UnsampledCalls | Counter::ReturnProbes => {
                    assert!(shown.iter().all(|v| v.is_null()), "{name}")
                }
                Counter::AllocCalls => {
                    assert_eq!(totals[name], c.alloc_calls + c.unsampled_calls, "{name}")
                }
                _ => {
                    let want = serde_json::Value::from(raw[k as usize]);
                    assert!(shown.contains(&&want), "{name}: {shown:?}")
                }
            }
        }
        assert_eq!(
            c.get(Counter::ReturnProbes),
            raw[Counter::ReturnProbes as usize]
        );
    }

    #[test]
    fn times_are_rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_417_200);
        assert_eq!(rfc3339(t), "2026-11-23T07:00:00Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn attach_times_add_a_repeated_step_and_keep_their_order() {
        let step = |name: &str, seconds| crate::steps::Step {
            name: name.into(),
            seconds,
        };
        let t = AttachTimes::new(
            std::time::Duration::from_micros(412_345),
            vec![
                step("create_maps", 0.012_34),
                step("verify_alloc_session", 0.2),
                step("create_maps", 0.001),
            ],
        );
        assert_eq!(t.total_s, 0.4123);
        assert_eq!(
            t.steps,
            [
                ("create_maps".to_string(), 0.0133),
                ("verify_alloc_session".to_string(), 0.2)
            ]
        );
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"total_s":0.4123,"steps":{"create_maps":0.0133,"verify_alloc_session":0.2}}"#
        );
        assert_eq!(
            t.to_string(),
            "0.412s: create_maps 0.013s, verify_alloc_session 0.200s"
        );
    }
}
