//! Building the report once tracing ended, in stages: read the final counters
//! and sites → ages → totals → leak candidates with their verdicts → frames →
//! the process's figures → the assembled `Report`.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use memtrace_common::{NO_STACK, STACK_PYTHON_FOLDED, STACK_PYTHON_SHIFT};
// Keyed by stack ids: a fast hasher (SipHash showed in profiles at 10,000 sites).
use rustc_hash::FxHashMap as HashMap;

use super::{
    Format, Options, Session,
    ages::{REPORT_SCAN_MAX_BLOCKS, blocks_in_map, scan_every_block, site_blocks, site_tuples},
    frames::{self, AddressFrames, stack_walk, truncated_reason},
    target::Attached,
    watch::Signals,
    watchdog::Fallback,
};
use crate::{
    analyze::{self, History, SampleAges, SiteBlocks, SiteHistory, Trend, Verdict, VerdictConfig},
    attach::links::{self, Mechanism},
    kernel::collect::{Counters, SiteSample},
    process::stat::ProcStat,
    report::{
        self, AllocatorInfo, AllocatorModule, AttachTimes, Drops, HistoryPoint, LeftOut,
        MAX_FREED_SITES, ModuleInfo, ProcessReport, ProcessSample, Report, Sampling, Site,
        SnapshotStats, TargetInfo, Timeline, Totals, UntracedEntryPoint, VerdictCounts,
        resources::Resources,
    },
    symbolize::{Symbolizer, Taken},
};

/// When and how tracing ended, and how the target did.
pub(super) struct ReportMeta {
    pub(super) started_at: SystemTime,
    pub(super) ended_at: SystemTime,
    pub(super) duration: Duration,
    /// Why tracing ended (`End::as_str`), or `snapshot`: it goes on.
    pub(super) end_reason: &'static str,
    /// CLOCK_MONOTONIC when tracing ended: the "now" of every age.
    pub(super) end_ns: u64,
    pub(super) exited: bool,
    pub(super) exit_status: Option<i32>,
    /// The process's own figures at the end, read once the probes were out.
    pub(super) end_process: Option<ProcStat>,
    /// What was cut short while tracing, and why.
    pub(super) cut_short: Vec<String>,
    pub(super) attach: AttachTimes,
    pub(super) snapshots: Option<SnapshotStats>,
    pub(super) lineage: Option<crate::report::lineage::Lineage>,
}

/// CPU time of a phase sequence, for the debug log.
struct Laps {
    last: Duration,
    laps: Vec<(&'static str, Duration)>,
}

impl Laps {
    fn start() -> Self {
        Laps {
            last: crate::kernel::batch::process_cpu(),
            laps: Vec::new(),
        }
    }
    /// Ends the current phase; returns its CPU time.
    fn mark(&mut self, name: &'static str) -> Duration {
        let now = crate::kernel::batch::process_cpu();
        let lap = now.saturating_sub(self.last);
        self.laps.push((name, lap));
        self.last = now;
        lap
    }
    fn log(&self) {
        let parts: Vec<String> = self
            .laps
            .iter()
            .map(|(n, d)| format!("{n} {:.1}", d.as_secs_f64() * 1e3))
            .collect();
        log::debug!("report phases (ms cpu): {}", parts.join(", "));
    }
}

/// What the kernel holds at the end of tracing.
struct Final {
    counters: Counters,
    /// As the kernel counts them: with sampling, of the sampled blocks only.
    samples: Vec<SiteSample>,
    /// The outstanding blocks by site, with their ages and estimates.
    ages: HashMap<u64, SiteBlocks>,
    /// Whether the ages come from a scan of every block (else the epoch aggregates).
    scan_all: bool,
}

/// A leak candidate: a site with blocks older than `--min-age`, and the
/// estimated blocks and bytes of those.
struct Candidate<'a> {
    sample: &'a SiteSample,
    blocks: u64,
    bytes: u64,
    oldest_ns: Option<u64>,
}

/// The report's figures that the stages computed, ready to be assembled.
#[derive(Clone)]
struct Figures {
    totals: Totals,
    drops: Drops,
    process: ProcessReport,
    modules: Vec<ModuleInfo>,
    sites: Vec<Site>,
    freed_sites: Vec<Site>,
    freed_left_out: LeftOut,
    resources: Option<Resources>,
}

/// The longest the report waits for debug info still being loaded in the
/// background (the probes are out by then); a second SIGINT or SIGTERM ends the
/// wait at once. The frames of modules not loaded by then are unresolved, counted
/// as `debug_info_not_loaded_in_time` in `drops.unresolved_frames`.
const REPORT_LOAD_WAIT: Duration = Duration::from_secs(10);

/// How often the wait for debug info looks at the signals.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// How long a snapshot waits for debug info still loading: it holds the
/// watch loop meanwhile. What is not loaded by then is unresolved in that
/// snapshot (and counted), and named in the next.
const SNAPSHOT_LOAD_WAIT: Duration = Duration::from_secs(2);

/// What a report is built for.
pub(super) enum Purpose {
    /// The end of tracing: the last, partial interval goes into the history,
    /// calls in flight are counted, and the watchdog gets a fallback.
    Final(Option<FallbackOut>),
    /// A snapshot while tracing goes on: the session's state is left as it
    /// is, and every site gets its frames.
    Snapshot,
}

impl Purpose {
    fn is_final(&self) -> bool {
        matches!(self, Purpose::Final(_))
    }
}

/// Where the report goes if the watchdog has to write it (see `Fallback`).
pub(super) struct FallbackOut {
    pub(super) out: std::fs::File,
    pub(super) truncate: bool,
    /// The format of the report it goes to (the first, when there are several).
    pub(super) format: Format,
}

pub(super) fn build_report(
    opts: &Options,
    s: &mut Session,
    meta: ReportMeta,
    purpose: Purpose,
) -> Result<Report> {
    let (at, sym, history) = (&mut s.at, &mut s.symbolizer, &mut s.history);
    let mut lap = Laps::start();
    s.watchdog.doing("reading the final figures");
    let is_final = purpose.is_final();
    let fin = Final::read(opts, at, history, &meta, &mut lap, is_final)?;
    let tracers = (&mut s.fds, &mut s.threads, &mut s.mappings);
    let resources = final_resources(tracers, at, meta.end_ns, &opts.verdicts)?;
    let (totals, traced_scale) = totals(&fin, opts.sampling);
    let chosen = leak_candidates(&fin);
    let (freed, freed_left_out) = freed_candidates(&fin, opts.sampling);
    let mut sites = Vec::with_capacity(chosen.len());
    for c in &chosen {
        sites.push(site(opts, at, history, &fin, c, meta.end_ns)?);
    }
    let mut freed_sites = Vec::with_capacity(freed.len());
    for c in &freed {
        freed_sites.push(site(opts, at, history, &fin, c, meta.end_ns)?);
    }
    lap.mark("sites built");
    // The sites whose frames the report shows: the text's top sites, or every
    // site in JSON (and in snapshots), freed ones too.
    let every_site = opts.shows_every_site() || !is_final;
    let shown = shown_stacks(every_site, opts.top, &sites, &chosen, &freed, &resources);
    let stack_ids: Vec<u64> = shown.iter().map(|t| t.0).collect();
    let (addrs, occurrences) = frames::distinct_addresses(&mut at.collector, &stack_ids)?;
    lap.mark("stacks");
    let mut figures = Figures {
        totals,
        drops: Drops::from_counters(&fin.counters),
        process: process_report(
            history,
            traced_scale,
            &opts.verdicts,
            fin.counters.alloc_map_full + fin.counters.site_map_full,
        ),
        modules: Vec::new(),
        sites,
        freed_sites,
        freed_left_out,
        resources,
    };
    if let Purpose::Final(Some(out)) = purpose {
        // The report with frames unnamed, for the watchdog to write should
        // symbolizing block for good (a file that does not answer).
        let unnamed = AddressFrames::of(&addrs, frames::unnamed(&at.modules, &addrs));
        let mut f = figures.clone();
        f.drops.unresolved_frames = fill_frames(at, &unnamed, &shown, &mut f)?;
        s.watchdog.set_fallback(Some(Fallback {
            report: assemble(opts, at, history, &fin, &meta, f),
            format: out.format,
            text: opts.text_style(),
            out: out.out,
            truncate: out.truncate,
        }));
    }
    s.watchdog.doing("symbolizing the report's stacks");
    crate::knobs::debug_stall("symbolize");
    let wait = if is_final {
        LoadWait::Final(&s.signals)
    } else {
        LoadWait::Snapshot
    };
    let groups = symbolize(at, sym, &addrs, occurrences, &mut lap, wait);
    figures.drops.unresolved_frames = fill_frames(at, &groups, &shown, &mut figures)?;
    figures.drops.debug_files_refused = debug_files_refused(sym, is_final);
    // After symbolizing: the build ids of the files read for it.
    figures.modules = module_infos(at, sym);
    lap.mark("frames");
    lap.log();
    Ok(assemble(opts, at, history, &fin, &meta, figures))
}

/// The resources part at the end: each tracer's last sample, then its
/// sites. Threads and mappings are parts of the fds' report, so nothing
/// without fd tracing.
fn final_resources(
    (fds, threads, mappings): (
        &mut Option<super::resources::Fds>,
        &mut Option<super::threads::Threads>,
        &mut Option<super::mappings::Mappings>,
    ),
    at: &mut Attached,
    end_ns: u64,
    vcfg: &VerdictConfig,
) -> Result<Option<Resources>> {
    let Some(fds) = fds else { return Ok(None) };
    fds.sample(at, Some(end_ns))?;
    let mut r = fds.report(at, end_ns, vcfg)?;
    if let Some(m) = mappings {
        m.sample(at, Some(end_ns))?;
        r.mappings = Some(m.report(at, end_ns, vcfg)?);
    }
    if let Some(t) = threads {
        t.sample(at, Some(end_ns));
        r.threads = Some(t.report(at, end_ns, vcfg)?);
    }
    Ok(Some(r))
}

/// The stacks whose frames the report shows, with the site each is for:
/// the text's top sites, or every site (JSON, snapshots), freed ones too;
/// and every resource site.
fn shown_stacks(
    every_site: bool,
    top: usize,
    sites: &[Site],
    chosen: &[Candidate],
    freed: &[Candidate],
    resources: &Option<Resources>,
) -> Vec<(u64, Which)> {
    let mut shown: Vec<(u64, Which)> = frames::shown(every_site, top, sites)
        .into_iter()
        .map(|i| (chosen[i].sample.stack_id, Which::Site(i)))
        .collect();
    if every_site {
        let freed = freed.iter().enumerate();
        shown.extend(freed.map(|(i, c)| (c.sample.stack_id, Which::Freed(i))));
    }
    let Some(r) = resources else { return shown };
    let fds = r.fds.sites.iter().enumerate();
    shown.extend(fds.map(|(i, site)| (site.stack_id, Which::Fd(i))));
    let threads = r.threads.iter().flat_map(|t| &t.sites).enumerate();
    shown.extend(threads.map(|(i, site)| (site.stack_id, Which::Thread(i))));
    let mappings = r.mappings.iter().flat_map(|m| &m.sites).enumerate();
    shown.extend(mappings.map(|(i, site)| (site.stack_id, Which::Mapping(i))));
    shown
}

/// A site of the report: of `sites` or of `freed_sites`, by index.
#[derive(Clone, Copy)]
enum Which {
    Site(usize),
    Freed(usize),
    /// Of `resources.fds.sites`.
    Fd(usize),
    /// Of `resources.threads.sites`.
    Thread(usize),
    /// Of `resources.mappings.sites`.
    Mapping(usize),
}

/// Gives the `shown` sites their frames; returns the count of unresolved
/// frames by reason.
fn fill_frames(
    at: &mut Attached,
    groups: &AddressFrames,
    shown: &[(u64, Which)],
    figures: &mut Figures,
) -> Result<BTreeMap<String, u64>> {
    let mut unresolved = BTreeMap::new();
    for &(stack_id, which) in shown {
        let frames = match which {
            Which::Site(i) => &mut figures.sites[i].frames,
            Which::Freed(i) => &mut figures.freed_sites[i].frames,
            Which::Fd(i) => match &mut figures.resources {
                Some(r) => &mut r.fds.sites[i].frames,
                None => continue,
            },
            Which::Thread(i) => match figures.resources.as_mut().and_then(|r| r.threads.as_mut()) {
                Some(t) => &mut t.sites[i].frames,
                None => continue,
            },
            Which::Mapping(i) => match figures.resources.as_mut().and_then(|r| r.mappings.as_mut())
            {
                Some(m) => &mut m.sites[i].frames,
                None => continue,
            },
        };
        *frames = Default::default();
        let generation = at.collector.stack_generation(stack_id)?;
        let stack = at.collector.stack(stack_id)?;
        groups.fill(stack, generation, frames, &mut unresolved);
        if let Some(py) = at.python.as_mut() {
            let words = at.collector.python_frames(stack_id)?;
            if !words.is_empty() {
                frames::add_python(py, words, frames, &mut unresolved);
            }
        }
    }
    Ok(unresolved)
}

impl Final {
    /// Reads the final counters and sites, then the ages of the outstanding
    /// blocks and which of them outlived the run: one scan of every block, or
    /// the per-epoch aggregates when there are too many blocks for that. The
    /// final, partial interval is recorded in the history too.
    fn read(
        opts: &Options,
        at: &mut Attached,
        history: &mut History,
        meta: &ReportMeta,
        lap: &mut Laps,
        is_final: bool,
    ) -> Result<Final> {
        if is_final {
            at.collector.count_unfinished()?;
        }
        let counters = at.collector.counters()?;
        let samples = at.collector.sites()?;
        lap.mark("read");
        let now_ns = meta.end_ns;
        let min_age_ns = opts.min_age.as_nanos() as u64;
        let scan_all = scan_every_block(blocks_in_map(&samples) <= REPORT_SCAN_MAX_BLOCKS);
        let ages = site_blocks(at, now_ns, min_age_ns, opts.sampling, scan_all)?;
        if is_final {
            history.record_final(
                now_ns,
                &site_tuples(&samples),
                SampleAges::of(&ages, scan_all),
                meta.end_process,
            );
        }
        lap.mark("ages");
        Ok(Final {
            counters,
            samples,
            ages,
            scan_all,
        })
    }
}

/// The run's totals, and what a traced byte stands for overall (with
/// sampling, the estimate over the sampled bytes; else 1).
fn totals(fin: &Final, sampling: Sampling) -> (Totals, f64) {
    let counters = &fin.counters;
    let mut totals = Totals {
        alloc_bytes: if sampling.is_sampled() {
            fin.samples
                .iter()
                .map(|s| s.estimated(sampling).alloc_bytes)
                .sum()
        } else {
            counters.alloc_bytes
        },
        sites_seen: fin.samples.len() as u64,
        ..Totals::from_counters(counters)
    };
    let (mut est_blocks, mut est_bytes) = (0.0, 0.0);
    for a in fin.ages.values() {
        est_blocks += a.est.blocks;
        est_bytes += a.est.bytes;
    }
    let raw_bytes: u64 = fin.ages.values().map(|a| a.bytes).sum();
    let traced_scale = if raw_bytes > 0 {
        est_bytes / raw_bytes as f64
    } else {
        1.0
    };
    totals.outstanding_blocks = est_blocks.round() as u64;
    totals.outstanding_bytes = est_bytes.round() as u64;
    (totals, traced_scale)
}

/// The sites with blocks older than `--min-age`, most bytes first (then most
/// blocks, then by stack id, so the order is stable).
fn leak_candidates(fin: &Final) -> Vec<Candidate<'_>> {
    let mut chosen: Vec<Candidate> = fin
        .samples
        .iter()
        .filter_map(|s| {
            let a = fin.ages.get(&s.stack_id)?;
            (a.old_blocks > 0).then_some(Candidate {
                sample: s,
                blocks: a.est_old.blocks(),
                bytes: a.est_old.bytes(),
                oldest_ns: a.oldest_ns(),
            })
        })
        .collect();
    chosen.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then(b.blocks.cmp(&a.blocks))
            .then(a.sample.stack_id.cmp(&b.sample.stack_id))
    });
    chosen
}

/// The sites that allocated while traced but hold no block older than
/// `--min-age`, most bytes allocated first (then most calls, then by stack
/// id), at most [`MAX_FREED_SITES`]; and what the rest add up to.
fn freed_candidates(fin: &Final, sampling: Sampling) -> (Vec<Candidate<'_>>, LeftOut) {
    let mut freed: Vec<(Candidate, SiteSample)> = fin
        .samples
        .iter()
        .filter(|s| s.alloc_calls > 0)
        .filter_map(|s| {
            let a = fin.ages.get(&s.stack_id);
            if a.is_some_and(|a| a.old_blocks > 0) {
                return None;
            }
            let c = Candidate {
                sample: s,
                blocks: a.map_or(0, |a| a.est.blocks()),
                bytes: a.map_or(0, |a| a.est.bytes()),
                oldest_ns: a.and_then(SiteBlocks::oldest_ns),
            };
            Some((c, s.estimated(sampling)))
        })
        .collect();
    freed.sort_by(|(a, ea), (b, eb)| {
        eb.alloc_bytes
            .cmp(&ea.alloc_bytes)
            .then(eb.alloc_calls.cmp(&ea.alloc_calls))
            .then(a.sample.stack_id.cmp(&b.sample.stack_id))
    });
    let mut left_out = LeftOut::default();
    for (_, e) in freed.iter().skip(MAX_FREED_SITES) {
        left_out.sites += 1;
        left_out.alloc_calls += e.alloc_calls;
        left_out.alloc_bytes += e.alloc_bytes;
    }
    freed.truncate(MAX_FREED_SITES);
    (freed.into_iter().map(|(c, _)| c).collect(), left_out)
}

/// One candidate's entry in the report, without its frames yet.
fn site(
    opts: &Options,
    at: &mut Attached,
    history: &History,
    fin: &Final,
    c: &Candidate,
    now_ns: u64,
) -> Result<Site> {
    let stack_id = c.sample.stack_id;
    let flags = at.collector.stack_flags(stack_id)?;
    let end_blocks = fin.ages.get(&stack_id);
    let (verdict, trend, hist, peak) = assess_site(history, stack_id, end_blocks, &opts.verdicts);
    let dropped_blocks = c.sample.dropped_blocks;
    // Blocks the table had no room for could be what a stable or passing
    // site is missing; growth seen in the blocks kept is growth all the same.
    let verdict = match verdict {
        Verdict::Stable | Verdict::Transient if dropped_blocks > 0 => Verdict::Unknown,
        v => v,
    };
    let est = c.sample.estimated(opts.sampling);
    let age_s = |t: u64| now_ns.saturating_sub(t) as f64 / 1e9;
    Ok(Site {
        outstanding_blocks: c.blocks,
        outstanding_bytes: c.bytes,
        peak_bytes: peak.max(c.bytes),
        alloc_calls: est.alloc_calls,
        alloc_bytes: est.alloc_bytes,
        dropped_blocks,
        oldest_age_s: c.oldest_ns.map(age_s),
        median_age_s: end_blocks.and_then(SiteBlocks::median_birth_ns).map(age_s),
        verdict,
        growth_bytes_per_s: trend.growth_bytes_per_s,
        stack_captured: stack_id != NO_STACK,
        stack_walk: stack_walk(flags),
        truncated: truncated_reason(flags).is_some(),
        truncated_reason: truncated_reason(flags),
        native_frames_folded: (flags >> STACK_PYTHON_SHIFT & 0xff != 0)
            .then_some(flags & STACK_PYTHON_FOLDED != 0),
        frames: Default::default(),
        trend,
        history: hist,
    })
}

/// A site's verdict, trend, history and peak bytes. They are of the
/// sampled blocks: they are scaled back by what this site's outstanding
/// blocks stand for.
fn assess_site(
    history: &History,
    stack_id: u64,
    end_blocks: Option<&SiteBlocks>,
    vcfg: &VerdictConfig,
) -> (Verdict, Trend, Vec<HistoryPoint>, u64) {
    let Some(h) = history.site(stack_id) else {
        return (Verdict::Unknown, Default::default(), Vec::new(), 0);
    };
    let (byte_scale, block_scale) = end_blocks.filter(|b| b.bytes > 0).map_or((1.0, 1.0), |b| {
        (b.est.bytes / b.bytes as f64, b.est.blocks / b.blocks as f64)
    });
    let mut a = analyze::assess(h.times, h.points, end_blocks, vcfg);
    a.trend.growth_bytes_per_s = a.trend.growth_bytes_per_s.map(|g| g * byte_scale);
    a.trend.recent_growth_bytes_per_s = a.trend.recent_growth_bytes_per_s.map(|g| g * byte_scale);
    let points = history_points(history.start_ns(), &h, byte_scale, block_scale);
    let peak = (h.peak_bytes.max(0) as f64 * byte_scale).round() as u64;
    (a.verdict, a.trend, points, peak)
}

fn history_points(
    start_ns: u64,
    h: &SiteHistory,
    byte_scale: f64,
    block_scale: f64,
) -> Vec<HistoryPoint> {
    h.times
        .iter()
        .zip(h.points)
        .map(|(&t, p)| HistoryPoint {
            t_s: t.saturating_sub(start_ns) as f64 / 1e9,
            outstanding_bytes: (p.bytes as f64 * byte_scale).round() as i64,
            outstanding_blocks: (p.blocks as f64 * block_scale).round() as i64,
            oldest_age_s: p.oldest_age_ns.map(|a| a as f64 / 1e9),
            median_age_s: p.median_age_ns.map(|a| a as f64 / 1e9),
        })
        .collect()
}

/// The frames of every address of the report's stacks, symbolized in one batch.
fn symbolize(
    at: &mut Attached,
    sym: &mut Symbolizer,
    addrs: &[Taken],
    occurrences: usize,
    lap: &mut Laps,
    wait: LoadWait,
) -> AddressFrames {
    at.note_unmaps();
    wait_for_debug_info(at, sym, addrs, wait);
    // Waited above: what is still loading now is not waited for again.
    sym.set_deadline(Some(Instant::now()));
    let resolved = sym.symbolize_taken(&at.modules, addrs, true);
    sym.set_deadline(None);
    // CPU of all threads (laps are): large batches are resolved on two.
    let cpu_sym = lap.mark("symbolize");
    log::debug!(
        "report symbolized {} frames ({} addresses) in {:.1} ms cpu",
        occurrences,
        addrs.len(),
        cpu_sym.as_secs_f64() * 1e3
    );
    let groups = AddressFrames::of(addrs, resolved);
    lap.mark("groups");
    groups
}

/// How long a report waits for debug info still loading.
#[derive(Clone, Copy)]
enum LoadWait<'a> {
    /// At most [`REPORT_LOAD_WAIT`], and only until a signal (the first one
    /// ended tracing: a second ends the wait), saying why it stopped waiting.
    Final(&'a Signals),
    /// At most [`SNAPSHOT_LOAD_WAIT`], quietly: a signal is left to the
    /// watch loop (reading it here would take it).
    Snapshot,
}

/// Waits for the debug info of the modules `addrs` go through to be loaded
/// in the background, as long as `wait` says.
fn wait_for_debug_info(at: &Attached, sym: &mut Symbolizer, addrs: &[Taken], wait: LoadWait) {
    sym.load_taken_in_background(&at.modules, addrs.iter().copied());
    let longest = match wait {
        LoadWait::Final(_) => REPORT_LOAD_WAIT,
        LoadWait::Snapshot => SNAPSHOT_LOAD_WAIT,
    };
    let deadline = Instant::now() + longest;
    while sym.loading_any_taken(&at.modules, addrs) {
        let now = Instant::now();
        let LoadWait::Final(signals) = wait else {
            if now >= deadline {
                return;
            }
            sym.wait_for_any_load(deadline);
            continue;
        };
        if now >= deadline {
            eprintln!(
                "memtrace: debug info still loading after {}s: the report names what is \
                 loaded (drops.unresolved_frames.debug_info_not_loaded_in_time)",
                REPORT_LOAD_WAIT.as_secs()
            );
            return;
        }
        if signals.pending() {
            eprintln!(
                "memtrace: signal: not waiting for debug info still loading; the report \
                 names what is loaded (drops.unresolved_frames.debug_info_not_loaded_in_time)"
            );
            return;
        }
        sym.wait_for_any_load((now + SIGNAL_POLL).min(deadline));
    }
}

/// The debug-file candidates the symbolizer refused over the run, by reason;
/// said on stderr too (if `say`), since a target named them.
fn debug_files_refused(sym: &Symbolizer, say: bool) -> BTreeMap<String, u64> {
    let refused: BTreeMap<String, u64> = sym
        .stats()
        .debug_files_refused
        .iter()
        .map(|(&k, &n)| (k.to_string(), n))
        .collect();
    let total: u64 = refused.values().sum();
    if total > 0 && say {
        let parts: Vec<String> = refused.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        eprintln!(
            "memtrace: refused {total} debug file{} the target's files named or placed ({}); \
             see drops.debug_files_refused",
            if total == 1 { "" } else { "s" },
            parts.join(", ")
        );
    }
    refused
}

/// The process's own figures over the run, with the traced bytes scaled back
/// to what they stand for.
/// `unrecorded`: allocations the kernel's tables had no room for, which the
/// note about growth outside the traced heap must name.
fn process_report(
    history: &History,
    traced_scale: f64,
    vcfg: &VerdictConfig,
    unrecorded: u64,
) -> ProcessReport {
    let mut points = history.process();
    for p in &mut points {
        p.traced_bytes = (p.traced_bytes as f64 * traced_scale).round() as i64;
    }
    ProcessReport {
        samples: points
            .iter()
            .map(|p| ProcessSample {
                t_s: p.t_ns.saturating_sub(history.start_ns()) as f64 / 1e9,
                stat: p.stat,
                traced_bytes: p.traced_bytes,
            })
            .collect(),
        summary: analyze::summarize_process(&points, vcfg, unrecorded),
    }
}

fn assemble(
    opts: &Options,
    at: &Attached,
    history: &History,
    fin: &Final,
    meta: &ReportMeta,
    figures: Figures,
) -> Report {
    Report {
        schema: report::SCHEMA,
        memtrace_version: env!("CARGO_PKG_VERSION"),
        target: TargetInfo {
            pid: at.pid,
            exe: at.exe.clone(),
            cmdline: at.cmdline.clone(),
            exited: meta.exited,
            exit_status: meta.exit_status,
            namespaces: at.namespaces.clone(),
        },
        started_at: report::rfc3339(meta.started_at),
        ended_at: report::rfc3339(meta.ended_at),
        duration_s: meta.duration.as_secs_f64(),
        end_reason: meta.end_reason,
        sampling: opts.sampling,
        totals: figures.totals,
        drops: figures.drops,
        untraced_entry_points: untraced_entry_points(at),
        allocator: allocator_info(at, &fin.counters),
        min_age_s: opts.min_age.as_secs_f64(),
        ages_from: if fin.scan_all { "blocks" } else { "epochs" },
        verdict_config: opts.verdicts.clone(),
        timeline: Timeline {
            interval_s: opts.interval.as_secs_f64(),
            samples: history.len(),
            capacity: history.capacity(),
            stride_intervals: history.stride(),
            samples_without_ages: history.samples_without_ages(),
            samples_with_epoch_ages: history.samples_with_epoch_ages(),
        },
        verdicts: VerdictCounts::of(&figures.sites),
        process: figures.process,
        unwind: at.tables.stats.clone(),
        attach: meta.attach.clone(),
        attached: !at.launched,
        modules: figures.modules,
        sites: figures.sites,
        freed_sites: figures.freed_sites,
        freed_sites_left_out: figures.freed_left_out,
        cut_short: meta.cut_short.clone(),
        snapshots: meta.snapshots.clone(),
        resources: figures.resources,
        lineage: meta.lineage.clone(),
    }
}

/// The target's executable mappings, with the build ids of the files the
/// symbolizer has read (those of every module a reported stack is in).
pub(super) fn module_infos(at: &Attached, sym: &Symbolizer) -> Vec<ModuleInfo> {
    at.modules
        .modules()
        .iter()
        .map(|m| ModuleInfo {
            path: m.path.clone(),
            start: m.start,
            limit: m.end,
            file_offset: m.offset,
            build_id: sym.loaded_build_id(m),
        })
        .collect()
}

/// The allocator and how it was probed.
fn allocator_info(at: &Attached, counters: &Counters) -> AllocatorInfo {
    let allocs = &at.allocators;
    AllocatorInfo {
        module: allocs.primary().module.clone(),
        functions: at.function_names(),
        modules: allocs
            .modules
            .iter()
            .map(|a| AllocatorModule {
                module: a.module.clone(),
                functions: a.points.iter().flat_map(|p| p.names.clone()).collect(),
                forwarded: a.forwards.clone(),
            })
            .collect(),
        probes: at.nprobes,
        probe_sites: allocs.points().map(|(_, p)| p.probe_site()).collect(),
        probe_mechanism: at.probes.mechanism().name(),
        return_probes: counters.return_probes,
        calls_in_session_cookie: match at.probes.mechanism() {
            Mechanism::Session => allocs
                .points()
                .filter(|(_, p)| links::call_in_cookie(p))
                .map(|(_, p)| p.name().to_string())
                .collect(),
            _ => Vec::new(),
        },
        own_calls_told_by: match at.probes.marked_calls() {
            Some(_) => "call-site probes",
            None => "return address",
        },
        own_call_sites: at.probes.marked_calls().unwrap_or_default().to_vec(),
        result_sites: at.probes.result_sites().to_vec(),
    }
}

/// The allocator functions the target may call that memtrace does not trace.
fn untraced_entry_points(at: &Attached) -> Vec<UntracedEntryPoint> {
    at.allocators
        .untraced
        .iter()
        .map(|u| UntracedEntryPoint {
            name: u.name.clone(),
            module: u.module.clone(),
            reason: u.reason.clone(),
        })
        .collect()
}
