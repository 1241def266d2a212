//! The live summary line printed every interval, the history sample taken with
//! it, and the `--alert-growth` alerts.
use std::time::{Duration, Instant};

use anyhow::Result;
// Keyed by stack ids: a fast hasher (SipHash showed in profiles at 10,000 sites).
use rustc_hash::FxHashMap as HashMap;

use super::{
    Options,
    ages::{
        AGE_SCAN_BUDGET, AGE_SCAN_MAX_BLOCKS, AGE_SCAN_NS_PER_BLOCK, blocks_in_map,
        scan_every_block, site_blocks, site_tuples,
    },
    target::Attached,
};
use super::{
    live::{self, Interval},
    serve::Published,
};
use crate::escape::{Escaped, escaped};
use crate::{
    analyze::{self, History, SampleAges, SiteBlocks},
    kernel::collect::{Counters, SiteSample, monotonic_ns},
    process::stat::{self as procstat, ProcStat},
    report::metrics::{ResourceFigures, SiteVerdicts},
    report::roles,
    symbolize::Symbolizer,
    units::{Rate, format_bytes, format_count, format_duration, format_rate},
};

/// At most this many new stacks are read per live sample, so that a burst of
/// new sites cannot stretch one interval's work (~3 µs a stack).
const STACK_READ_AHEAD: usize = 20_000;

/// How many of a stack's innermost addresses are searched for the program's
/// own frame that names a site in the summary.
const OWN_FRAME_SEARCH: usize = 8;

/// The longest one summary line waits for debug info being loaded in the
/// background to name its sites (a site of a module not loaded by then is named
/// by its address): a loader stuck on a file must not hold the watch loop, which
/// acts on signals and `--duration` between summaries.
const SUMMARY_LOAD_WAIT: Duration = Duration::from_millis(200);

/// The figures of the previous summary line, that this one shows changes from.
#[derive(Default)]
pub(super) struct Summary {
    at: Option<Instant>,
    alloc_calls: u64,
    free_calls: u64,
    site_bytes: HashMap<u64, i64>,
    outstanding_bytes: i64,
    rss_bytes: Option<u64>,
    /// Measured cost of scanning one block (0 until measured).
    scan_ns_per_block: f64,
    /// This interval's fds by kind, when they are traced (`, 12 fds (7 socket, ...)`).
    pub(super) fds: Option<String>,
    /// This interval's threads, when they are traced (`, 19 threads (18 created while traced)`).
    pub(super) threads: Option<String>,
    /// With `--listen`: the heap sites' verdicts last judged, and when the
    /// next may be (see [`VERDICT_BUDGET`]).
    verdicts: Option<SiteVerdicts>,
    verdicts_due: Option<Instant>,
}

/// The share of the time that judging the heap sites' verdicts for
/// `/metrics` may take: after a judgement that took `t`, the next waits
/// for a history sample at least `t / VERDICT_BUDGET` later. At 10,000
/// sites of full histories a judgement is a few hundred ms of CPU; a few
/// sites take microseconds, judged at every sample.
const VERDICT_BUDGET: f64 = 0.02;

/// What one interval read from the kernel and /proc.
struct Reading {
    now: Instant,
    now_ns: u64,
    counters: Counters,
    /// As the kernel counts them: with sampling, of the sampled blocks only.
    raw_sites: Vec<SiteSample>,
    process: Option<ProcStat>,
}

/// What the line shows: the estimates (sampled figures scaled back).
struct Line {
    /// Seconds since the last line.
    secs: f64,
    sites: Vec<SiteSample>,
    blocks: i64,
    bytes: i64,
}

/// A site that grew this interval, named by its innermost frame.
struct Growing {
    grew: i64,
    holds: i64,
    name: String,
}

/// The work of every interval: record the history, print the summary line,
/// and the `--alert-growth` alert if the growth of this interval calls for it.
pub(super) fn live_summary(
    at: &mut Attached,
    sym: &mut Symbolizer,
    last: &mut Summary,
    start: Instant,
    history: &mut History,
    opts: &Options,
    published: Option<(&Published, Option<ResourceFigures>)>,
) -> Result<()> {
    let r = read(at, sym)?;
    // The history keeps the sampled figures; the line shows the estimates.
    let line = Line::of(&r, last, start, opts);
    let ages = if history.tick() {
        Some(sample_history(at, history, last, opts, &r)?)
    } else {
        None
    };
    sym.set_deadline(Some(Instant::now() + SUMMARY_LOAD_WAIT));
    let growing = fastest_growing(at, sym, &line.sites, last);
    sym.set_deadline(None);
    let growing = growing?;
    print_line(&r, &line, last, start, &growing, opts);
    if let Some(limit) = opts.alert_growth {
        alert(limit, &line, last, &growing);
    }
    if let Some((p, resources)) = published {
        if let Some(ages) = &ages {
            judge_verdicts(last, history, ages, &r, opts, start);
        }
        let interval = Interval {
            counters: &r.counters,
            sites: &line.sites,
            blocks: line.blocks,
            bytes: line.bytes,
            process: r.process,
        };
        sym.set_deadline(Some(Instant::now() + SUMMARY_LOAD_WAIT));
        let m = live::metrics(at, sym, &interval, opts, start);
        sym.set_deadline(None);
        let mut m = m?;
        m.verdicts = last.verdicts.clone();
        m.resources = resources;
        p.set_metrics(m);
    }
    last.update(r, line);
    Ok(())
}

/// Reads the counters and sites, and the stacks the report will need.
fn read(at: &mut Attached, sym: &mut Symbolizer) -> Result<Reading> {
    let now = Instant::now();
    let now_ns = monotonic_ns();
    at.collector.expire_pending(now_ns)?;
    let counters = at.collector.counters()?;
    let raw_sites = at.collector.sites()?;
    read_ahead(at, sym, &raw_sites)?;
    Ok(Reading {
        now,
        now_ns,
        counters,
        raw_sites,
        process: procstat::read(at.pid).ok(),
    })
}

/// Reads the new stacks of the sites that hold blocks, which the report will
/// need, and starts loading the debug info of the modules they go through.
fn read_ahead(at: &mut Attached, sym: &mut Symbolizer, raw_sites: &[SiteSample]) -> Result<()> {
    let ahead = at.collector.read_ahead_stacks(
        raw_sites
            .iter()
            .filter(|s| s.outstanding_blocks > 0)
            .map(|s| s.stack_id),
        STACK_READ_AHEAD,
    )?;
    if ahead.is_empty() {
        return Ok(());
    }
    log::debug!("{} new stacks read", ahead.len());
    at.note_unmaps();
    // A code object is read as soon as its stack is seen: later, it may
    // have been freed.
    if let Some(py) = at.python.as_mut() {
        for &id in &ahead {
            py.resolve(at.collector.python_frames(id)?);
        }
    }
    let mut addrs = Vec::new();
    for &id in &ahead {
        let generation = at.collector.stack_generation(id)?;
        addrs.extend(at.collector.stack(id)?.iter().map(|&a| (a, generation)));
    }
    addrs.sort_unstable();
    addrs.dedup();
    let n = sym.load_taken_in_background(&at.modules, addrs);
    if n > 0 {
        log::debug!("{n} modules of those stacks loading in the background");
    }
    Ok(())
}

impl Line {
    fn of(r: &Reading, last: &Summary, start: Instant, opts: &Options) -> Self {
        let sites: Vec<SiteSample> = r
            .raw_sites
            .iter()
            .map(|s| s.estimated(opts.sampling))
            .collect();
        let secs = r
            .now
            .duration_since(last.at.unwrap_or(start))
            .as_secs_f64()
            .max(1e-3);
        let (blocks, bytes) = sites.iter().fold((0i64, 0i64), |(b, y), s| {
            (b + s.outstanding_blocks, y + s.outstanding_bytes)
        });
        Line {
            secs,
            sites,
            blocks,
            bytes,
        }
    }
}

/// Judges the heap sites' verdicts at this history sample (`ages`), for
/// `/metrics`, when [`VERDICT_BUDGET`] allows.
fn judge_verdicts(
    last: &mut Summary,
    history: &History,
    ages: &HashMap<u64, SiteBlocks>,
    r: &Reading,
    opts: &Options,
    start: Instant,
) {
    if last.verdicts_due.is_some_and(|due| r.now < due) {
        return;
    }
    let t = Instant::now();
    let counts = live::heap_verdicts(history, ages, &r.raw_sites, &opts.verdicts);
    let took = t.elapsed();
    last.verdicts_due = Some(t + took.div_f64(VERDICT_BUDGET));
    last.verdicts = Some(SiteVerdicts {
        counts,
        traced_seconds: r.now.saturating_duration_since(start).as_secs_f64(),
    });
    log::debug!(
        "live verdicts: {} sites judged in {took:?}",
        r.raw_sites.len()
    );
}

/// Records one history sample, with ages from a scan of every block when the
/// last scan's cost says it fits the budget, else from the epoch aggregates;
/// returns the sites' blocks at the sample.
fn sample_history(
    at: &mut Attached,
    history: &mut History,
    last: &mut Summary,
    opts: &Options,
    r: &Reading,
) -> Result<HashMap<u64, SiteBlocks>> {
    let scan = Instant::now();
    let scanned = blocks_in_map(&r.raw_sites);
    let per_block = if last.scan_ns_per_block > 0.0 {
        last.scan_ns_per_block
    } else {
        AGE_SCAN_NS_PER_BLOCK
    };
    let budget_ns = AGE_SCAN_BUDGET * (opts.interval.as_nanos() as f64) * history.stride() as f64;
    let scan_all =
        scan_every_block(scanned < AGE_SCAN_MAX_BLOCKS && scanned as f64 * per_block <= budget_ns);
    let ages = site_blocks(at, r.now_ns, 0, opts.sampling, scan_all)?;
    if scan_all && scanned >= 1000 {
        last.scan_ns_per_block = scan.elapsed().as_nanos() as f64 / scanned as f64;
    }
    history.record(
        r.now_ns,
        &site_tuples(&r.raw_sites),
        SampleAges::of(&ages, scan_all),
        r.process,
    );
    // Blocks born from now on are told apart from those before this sample.
    at.collector.new_epoch(monotonic_ns())?;
    log::debug!(
        "history sample: {} sites, ages from {} in {:?}",
        r.raw_sites.len(),
        if scan_all {
            format!("{scanned} blocks")
        } else {
            "epoch aggregates".to_string()
        },
        scan.elapsed()
    );
    Ok(ages)
}

/// The three sites that grew most since the last line, named.
fn fastest_growing(
    at: &mut Attached,
    sym: &mut Symbolizer,
    sites: &[SiteSample],
    last: &Summary,
) -> Result<Vec<Growing>> {
    let mut growth: Vec<(i64, &SiteSample)> = sites
        .iter()
        .map(|s| {
            (
                s.outstanding_bytes - last.site_bytes.get(&s.stack_id).copied().unwrap_or(0),
                s,
            )
        })
        .filter(|(g, _)| *g > 0)
        .collect();
    growth.sort_by_key(|g| std::cmp::Reverse(g.0));
    let mut named = Vec::new();
    for (g, s) in growth.iter().take(3) {
        named.push(Growing {
            grew: *g,
            holds: s.outstanding_bytes,
            name: site_name(at, sym, s.stack_id)?,
        });
    }
    Ok(named)
}

/// `function (file.c:line)` of a stack's innermost frame, for summary lines;
/// of its innermost Python frame if it has one (the line a Python developer
/// knows, rather than the interpreter's C function that allocated).
pub(super) fn site_name(at: &mut Attached, sym: &mut Symbolizer, stack_id: u64) -> Result<String> {
    if let Some(py) = at.python.as_mut() {
        let words = at.collector.python_frames(stack_id)?;
        if let Some(innermost) = words.get(..2) {
            py.resolve(innermost);
            let (frames, _) = py.frames(innermost);
            if let Some(f) = frames.into_iter().next().filter(|f| f.function.is_some()) {
                let func = escaped(f.function.as_deref().unwrap_or_default());
                let file = f.file.unwrap_or_default();
                let base = Escaped(file.rsplit('/').next().unwrap_or(&file));
                let line = f.line.map_or_else(|| "?".to_string(), |l| l.to_string());
                return Ok(format!("{func} ({base}:{line})"));
            }
        }
    }
    let generation = at.collector.stack_generation(stack_id)?;
    let stack = at.collector.stack(stack_id)?;
    let Some(&a) = stack.first() else {
        return Ok("[stack not captured]".to_string());
    };
    // The program's own innermost frame (not `operator new`), among the first
    // few: deeper than that, the innermost frame's function says more.
    let addrs: Vec<_> = stack
        .iter()
        .take(OWN_FRAME_SEARCH)
        .map(|&a| (a, generation))
        .collect();
    let mut frames = sym.symbolize_taken(&at.modules, &addrs, true);
    let exe = at.exe.as_deref();
    let own = frames
        .iter()
        .flatten()
        .position(|f| roles::role(f, exe) == roles::Role::Own);
    let f = match own {
        Some(i) => frames.into_iter().flatten().nth(i),
        None => frames.drain(..).next().and_then(|v| v.into_iter().last()),
    };
    Ok(match f {
        Some(f) => {
            // Names from the target's files: escaped for the terminal.
            let func = f
                .function
                .map_or_else(|| format!("{a:#x}"), |n| escaped(&n));
            match (f.file, f.line) {
                (Some(file), Some(line)) => {
                    let base = Escaped(file.rsplit('/').next().unwrap_or(&file));
                    format!("{func} ({base}:{line})")
                }
                _ => func,
            }
        }
        None => format!("{a:#x}"),
    })
}

/// The width the summary's lines fit in.
const SUMMARY_COLUMNS: usize = 100;

/// Prints the summary: outstanding memory and its change, and call rates; then
/// on lines of their own the process's figures, each fastest-growing site, and
/// drops. Written at once, so that no other message splits it.
fn print_line(
    r: &Reading,
    line: &Line,
    last: &Summary,
    start: Instant,
    growing: &[Growing],
    opts: &Options,
) {
    let est = if opts.sampling.is_sampled() { "~" } else { "" };
    let (bytes, secs, counters) = (line.bytes, line.secs, &r.counters);
    let mut lines = vec![format!(
        "memtrace: {} outstanding {est}{} in {est}{} blocks ({}{}), {}/s allocs, {}/s frees",
        format_duration(r.now.duration_since(start)),
        format_bytes(bytes),
        format_count(line.blocks.max(0) as u64),
        if bytes >= last.outstanding_bytes {
            "+"
        } else {
            ""
        },
        format_bytes(bytes - last.outstanding_bytes),
        format_count(
            ((counters.alloc_calls + counters.unsampled_calls - last.alloc_calls) as f64 / secs)
                as u64,
        ),
        format_count(((counters.free_calls - last.free_calls) as f64 / secs) as u64),
    )];
    if let Some(p) = r.process {
        lines.push(format!(
            "  {}",
            process_summary(
                &p,
                last.rss_bytes,
                bytes,
                last.fds.as_deref().is_some_and(|f| !f.is_empty()),
                last.threads.as_deref(),
            )
        ));
    }
    // The fds by kind, when they are traced: a line of their own.
    if let Some(by_kind) = last.fds.as_deref().filter(|f| !f.is_empty()) {
        lines.push(format!("  {}", by_kind.trim_start_matches(", ")));
    }
    for g in growing {
        lines.push(format!("  growing +{} {}", format_bytes(g.grew), g.name));
    }
    let dropped = counters.dropped_events() + counters.stack_errors();
    if dropped > 0 {
        lines.push(format!("  {dropped} events dropped or without stack"));
    }
    let text: String = lines
        .iter()
        .map(|l| fit(l, SUMMARY_COLUMNS) + "\n")
        .collect();
    eprint!("{text}");
}

/// `line` cut to `columns` characters, the cut marked with `…`.
fn fit(line: &str, columns: usize) -> String {
    if line.chars().count() <= columns {
        return line.to_string();
    }
    let mut s: String = line.chars().take(columns - 1).collect();
    s.push('…');
    s
}

/// The `--alert-growth` alert: the total's growth over the limit, else the
/// fastest site's.
fn alert(limit: Rate, line: &Line, last: &Summary, growing: &[Growing]) {
    let (bytes, secs) = (line.bytes, line.secs);
    let over = |rate: f64| format!("{} (> {limit})", format_rate(rate, limit.per));
    let window = format_duration(Duration::from_secs_f64(secs));
    if let Some(rate) = analyze::over_rate(bytes - last.outstanding_bytes, secs, limit.bytes_per_s)
    {
        let fastest = growing
            .first()
            .map(|g| format!("; fastest site: +{} {}", format_bytes(g.grew), g.name))
            .unwrap_or_default();
        eprintln!(
            "memtrace: ALERT: total outstanding grew {} in the last {window}, now {}{fastest}",
            over(rate),
            format_bytes(bytes)
        );
    } else if let Some(g) = growing.first()
        && let Some(rate) = analyze::over_rate(g.grew, secs, limit.bytes_per_s)
    {
        eprintln!(
            "memtrace: ALERT: site {} grew {} in the last {window}, now holds {}",
            g.name,
            over(rate),
            format_bytes(g.holds)
        );
    }
}

impl Summary {
    /// Keeps this interval's figures for the next line.
    fn update(&mut self, r: Reading, line: Line) {
        self.at = Some(r.now);
        self.alloc_calls = r.counters.alloc_calls + r.counters.unsampled_calls;
        self.free_calls = r.counters.free_calls;
        self.outstanding_bytes = line.bytes;
        self.rss_bytes = r.process.map(|p| p.rss_bytes);
        self.site_bytes = line
            .sites
            .iter()
            .map(|s| (s.stack_id, s.outstanding_bytes))
            .collect();
    }
}

/// `rss 13.4 MiB (+640.0 KiB; anon 12.4 MiB, traced 1%), heap 264.0 KiB, vm 14.6 MiB, 5 fds, 1 thread`
/// (without the fds' count when they are traced: their line says it by kind;
/// `threads`: the traced figures, when they are).
fn process_summary(
    p: &ProcStat,
    last_rss: Option<u64>,
    traced: i64,
    fds_traced: bool,
    threads: Option<&str>,
) -> String {
    let mut s = format!("rss {} (", format_bytes(p.rss_bytes as i64));
    if let Some(prev) = last_rss {
        let d = p.rss_bytes as i64 - prev as i64;
        s.push_str(&format!(
            "{}{}; ",
            if d >= 0 { "+" } else { "" },
            format_bytes(d)
        ));
    }
    s.push_str(&format!("anon {}", format_bytes(p.rss_anon_bytes as i64)));
    if p.rss_bytes > 0 {
        let share = traced.max(0) as f64 / p.rss_bytes as f64 * 100.0;
        s.push_str(&format!(", traced {share:.0}%"));
    }
    s.push(')');
    if let Some(h) = p.heap_bytes {
        s.push_str(&format!(", heap {}", format_bytes(h as i64)));
    }
    s.push_str(&format!(", vm {}", format_bytes(p.vm_size_bytes as i64)));
    if let Some(f) = p.fds.filter(|_| !fds_traced) {
        s.push_str(&format!(", {} fds", format_count(f)));
    }
    if let Some(t) = threads.filter(|t| !t.is_empty()) {
        s.push_str(t);
    } else {
        s.push_str(&format!(
            ", {} thread{}",
            p.threads,
            if p.threads == 1 { "" } else { "s" }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_fit_their_width() {
        assert_eq!(fit("short", 100), "short");
        let long = "x".repeat(120);
        let cut = fit(&long, SUMMARY_COLUMNS);
        assert_eq!(cut.chars().count(), 100);
        assert!(cut.ends_with("x…"), "{cut}");
        assert_eq!(fit("ab…cd", 4), "ab……");
    }
}
