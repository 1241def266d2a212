//! Building the report once tracing ended, in stages: read the final counters
//! and sites → ages → totals → leak candidates with their verdicts → frames →
//! the process's figures → the assembled `Report`.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use memtrace_common::{NO_STACK, STACK_FP_ONLY, STACK_PYTHON_FOLDED, STACK_PYTHON_SHIFT};
// Keyed by stack ids: a fast hasher (SipHash showed in profiles at 10,000 sites).
use rustc_hash::FxHashMap as HashMap;

use super::{
    Options,
    ages::{REPORT_SCAN_MAX_BLOCKS, blocks_in_map, scan_every_block, site_blocks, site_tuples},
    frames::{self, AddressFrames, truncated_reason},
    target::Attached,
    watch::{End, Signals},
};
use crate::{
    analyze::{self, History, SampleAges, SiteBlocks, SiteHistory, Trend, Verdict, VerdictConfig},
    attach::links::{self, Mechanism},
    kernel::collect::{Counters, SiteSample},
    process::stat::ProcStat,
    report::{
        self, AllocatorInfo, Drops, HistoryPoint, ModuleInfo, ProcessReport, ProcessSample, Report,
        Sampling, Site, TargetInfo, Timeline, Totals, VerdictCounts,
    },
    symbolize::Symbolizer,
};

/// When and how tracing ended, and how the target did.
pub(super) struct ReportMeta {
    pub(super) started_at: SystemTime,
    pub(super) ended_at: SystemTime,
    pub(super) duration: Duration,
    pub(super) end: End,
    /// CLOCK_MONOTONIC when tracing ended: the "now" of every age.
    pub(super) end_ns: u64,
    pub(super) exited: bool,
    pub(super) exit_status: Option<i32>,
    /// The process's own figures at the end, read once the probes were out.
    pub(super) end_process: Option<ProcStat>,
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
struct Figures {
    totals: Totals,
    drops: Drops,
    process: ProcessReport,
    modules: Vec<ModuleInfo>,
    sites: Vec<Site>,
}

/// The longest the report waits for debug info still being loaded in the
/// background (the probes are out by then); a second SIGINT or SIGTERM ends the
/// wait at once. The frames of modules not loaded by then are unresolved, counted
/// as `debug_info_not_loaded_in_time` in `drops.unresolved_frames`.
const REPORT_LOAD_WAIT: Duration = Duration::from_secs(10);

/// How often the wait for debug info looks at the signals.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

pub(super) fn build_report(
    opts: &Options,
    at: &mut Attached,
    sym: &mut Symbolizer,
    history: &mut History,
    meta: ReportMeta,
    signals: &Signals,
) -> Result<Report> {
    let mut lap = Laps::start();
    let fin = Final::read(opts, at, history, &meta, &mut lap)?;
    let (totals, traced_scale) = totals(&fin, opts.sampling);
    let chosen = leak_candidates(&fin);
    let mut sites = Vec::with_capacity(chosen.len());
    for c in &chosen {
        sites.push(site(opts, at, history, &fin, c, meta.end_ns)?);
    }
    lap.mark("sites built");
    let unresolved = symbolize_sites(opts, at, sym, &chosen, &mut sites, &mut lap, signals)?;
    let process = process_report(history, traced_scale, &opts.verdicts);
    let mut drops = Drops::from_counters(&fin.counters);
    drops.unresolved_frames = unresolved;
    drops.debug_files_refused = debug_files_refused(sym);
    lap.mark("process");
    lap.log();
    let figures = Figures {
        totals,
        drops,
        process,
        modules: module_infos(at, sym),
        sites,
    };
    Ok(assemble(opts, at, history, &fin, meta, figures))
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
    ) -> Result<Final> {
        at.collector.count_unfinished()?;
        let counters = at.collector.counters()?;
        let samples = at.collector.sites()?;
        lap.mark("read");
        let now_ns = meta.end_ns;
        let min_age_ns = opts.min_age.as_nanos() as u64;
        let scan_all = scan_every_block(blocks_in_map(&samples) <= REPORT_SCAN_MAX_BLOCKS);
        let ages = site_blocks(at, now_ns, min_age_ns, opts.sampling, scan_all)?;
        history.record_final(
            now_ns,
            &site_tuples(&samples),
            SampleAges::of(&ages, scan_all),
            meta.end_process,
        );
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
    let (verdict, trend, hist) = assess_site(history, stack_id, end_blocks, &opts.verdicts);
    let est = c.sample.estimated(opts.sampling);
    let age_s = |t: u64| now_ns.saturating_sub(t) as f64 / 1e9;
    Ok(Site {
        outstanding_blocks: c.blocks,
        outstanding_bytes: c.bytes,
        alloc_calls: est.alloc_calls,
        alloc_bytes: est.alloc_bytes,
        oldest_age_s: c.oldest_ns.map(age_s),
        median_age_s: end_blocks.and_then(SiteBlocks::median_birth_ns).map(age_s),
        verdict,
        growth_bytes_per_s: trend.growth_bytes_per_s,
        stack_captured: stack_id != NO_STACK,
        stack_walk: if flags & STACK_FP_ONLY != 0 {
            "frame-pointers"
        } else {
            "unwind-tables"
        },
        truncated: truncated_reason(flags).is_some(),
        truncated_reason: truncated_reason(flags),
        native_frames_folded: (flags >> STACK_PYTHON_SHIFT & 0xff != 0)
            .then_some(flags & STACK_PYTHON_FOLDED != 0),
        frames: Default::default(),
        trend,
        history: hist,
    })
}

/// A site's verdict, trend and history. The history and the trend are of the
/// sampled blocks: they are scaled back by what this site's outstanding
/// blocks stand for.
fn assess_site(
    history: &History,
    stack_id: u64,
    end_blocks: Option<&SiteBlocks>,
    vcfg: &VerdictConfig,
) -> (Verdict, Trend, Vec<HistoryPoint>) {
    let Some(h) = history.site(stack_id) else {
        return (Verdict::Unknown, Default::default(), Vec::new());
    };
    let (byte_scale, block_scale) = end_blocks.filter(|b| b.bytes > 0).map_or((1.0, 1.0), |b| {
        (b.est.bytes / b.bytes as f64, b.est.blocks / b.blocks as f64)
    });
    let mut a = analyze::assess(h.times, h.points, end_blocks, vcfg);
    a.trend.growth_bytes_per_s = a.trend.growth_bytes_per_s.map(|g| g * byte_scale);
    a.trend.recent_growth_bytes_per_s = a.trend.recent_growth_bytes_per_s.map(|g| g * byte_scale);
    let points = history_points(history.start_ns(), &h, byte_scale, block_scale);
    (a.verdict, a.trend, points)
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

/// Gives the sites the report shows their frames, symbolized in one batch;
/// returns the count of unresolved frames by reason.
fn symbolize_sites(
    opts: &Options,
    at: &mut Attached,
    sym: &mut Symbolizer,
    chosen: &[Candidate],
    sites: &mut [Site],
    lap: &mut Laps,
    signals: &Signals,
) -> Result<BTreeMap<String, u64>> {
    let shown = frames::shown(opts.shows_every_site(), opts.top, sites);
    let stack_ids: Vec<u64> = shown.iter().map(|&i| chosen[i].sample.stack_id).collect();
    let (addrs, occurrences) = frames::distinct_addresses(&mut at.collector, &stack_ids)?;
    lap.mark("stacks");
    wait_for_debug_info(at, sym, &addrs, signals);
    // Waited above: what is still loading now is not waited for again.
    sym.set_deadline(Some(Instant::now()));
    let resolved = sym.symbolize(&at.modules, &addrs, true);
    sym.set_deadline(None);
    // CPU of all threads (laps are): large batches are resolved on two.
    let cpu_sym = lap.mark("symbolize");
    log::debug!(
        "report symbolized {} frames ({} addresses) in {:.1} ms cpu",
        occurrences,
        addrs.len(),
        cpu_sym.as_secs_f64() * 1e3
    );
    let groups = AddressFrames::of(&addrs, resolved);
    lap.mark("groups");
    let mut unresolved = BTreeMap::new();
    for (&i, &stack_id) in shown.iter().zip(&stack_ids) {
        let stack = at.collector.stack(stack_id)?;
        groups.fill(stack, &mut sites[i].frames, &mut unresolved);
        if let Some(py) = at.python.as_mut() {
            let words = at.collector.python_frames(stack_id)?;
            if !words.is_empty() {
                frames::add_python(py, words, &mut sites[i].frames, &mut unresolved);
            }
        }
    }
    lap.mark("frames");
    Ok(unresolved)
}

/// Waits, at most [`REPORT_LOAD_WAIT`] and only until a signal, for the debug
/// info of the modules `addrs` go through to be loaded in the background.
fn wait_for_debug_info(at: &Attached, sym: &mut Symbolizer, addrs: &[u64], signals: &Signals) {
    sym.load_in_background(&at.modules, addrs.iter().copied());
    let deadline = Instant::now() + REPORT_LOAD_WAIT;
    while sym.loading_any(&at.modules, addrs) {
        let now = Instant::now();
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
/// said on stderr too, since a target named them.
fn debug_files_refused(sym: &Symbolizer) -> BTreeMap<String, u64> {
    let refused: BTreeMap<String, u64> = sym
        .stats()
        .debug_files_refused
        .iter()
        .map(|(&k, &n)| (k.to_string(), n))
        .collect();
    let total: u64 = refused.values().sum();
    if total > 0 {
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
fn process_report(history: &History, traced_scale: f64, vcfg: &VerdictConfig) -> ProcessReport {
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
        summary: analyze::summarize_process(&points, vcfg),
    }
}

fn assemble(
    opts: &Options,
    at: &Attached,
    history: &History,
    fin: &Final,
    meta: ReportMeta,
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
        },
        started_at: report::rfc3339(meta.started_at),
        ended_at: report::rfc3339(meta.ended_at),
        duration_s: meta.duration.as_secs_f64(),
        end_reason: meta.end.as_str(),
        sampling: opts.sampling,
        totals: figures.totals,
        drops: figures.drops,
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
        attached: !at.launched,
        modules: figures.modules,
        sites: figures.sites,
    }
}

/// The target's executable mappings, with the build ids of the files the
/// symbolizer has read (those of every module a reported stack is in).
fn module_infos(at: &Attached, sym: &Symbolizer) -> Vec<ModuleInfo> {
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
    let points = &at.allocator.points;
    AllocatorInfo {
        module: at.allocator.module.clone(),
        functions: at.function_names(),
        probes: at.nprobes,
        probe_sites: points.iter().map(|p| p.probe_site()).collect(),
        probe_mechanism: at.probes.mechanism().name(),
        return_probes: counters.return_probes,
        calls_in_session_cookie: match at.probes.mechanism() {
            Mechanism::Session => points
                .iter()
                .filter(|p| links::call_in_cookie(p))
                .flat_map(|p| p.names.iter().map(|n| n.to_string()))
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
