//! What `--listen` serves while tracing, made by the watch loop: the last
//! interval's figures as metrics, and on request a pprof profile of the
//! blocks outstanding now.
use std::{collections::BTreeMap, time::Instant};

use anyhow::Result;

use super::{Options, frames::AddressFrames, target::Attached};
use crate::{
    analyze::{self, History, SiteBlocks, Verdict, VerdictConfig},
    kernel::collect::{Counters, SiteSample},
    process::{fds, stat::ProcStat},
    report::{
        Frames, Profile, ProfileSample, VerdictCounts,
        metrics::{Metrics, ResourceFigures, SiteMetric},
    },
    symbolize::Symbolizer,
};
use rustc_hash::FxHashMap as HashMap;

/// The longest a live profile waits for debug info still loading: a scraper
/// gets the frames that are ready (the rest by address), and the watch loop
/// goes on.
const PROFILE_LOAD_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// One interval's figures, as the summary line read them (estimates when
/// sampling).
pub(super) struct Interval<'a> {
    pub(super) counters: &'a Counters,
    pub(super) sites: &'a [SiteSample],
    pub(super) blocks: i64,
    pub(super) bytes: i64,
    pub(super) process: Option<ProcStat>,
}

/// The metrics of one interval; the top `--metrics-top-sites` sites named by
/// their innermost frame (sites whose innermost frames agree are added up:
/// a series has one name).
pub(super) fn metrics(
    at: &mut Attached,
    sym: &mut Symbolizer,
    i: &Interval,
    opts: &Options,
    start: Instant,
) -> Result<Metrics> {
    let mut top: Vec<&SiteSample> = i.sites.iter().filter(|s| s.outstanding_bytes > 0).collect();
    top.sort_by_key(|s| std::cmp::Reverse(s.outstanding_bytes));
    let mut named: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for s in top.iter().take(opts.metrics_top_sites) {
        let e = named
            .entry(super::summary::site_name(at, sym, s.stack_id)?)
            .or_default();
        e.0 += s.outstanding_bytes;
        e.1 += s.outstanding_blocks;
    }
    let c = i.counters;
    Ok(Metrics {
        pid: at.pid,
        sampling_mean_bytes: opts.sampling.mean_bytes(),
        outstanding_bytes: i.bytes,
        outstanding_blocks: i.blocks,
        alloc_calls: c.alloc_calls + c.unsampled_calls,
        free_calls: c.free_calls,
        alloc_bytes: c.alloc_bytes,
        dropped_events: c.dropped_events(),
        stack_errors: c.stack_errors(),
        sites: i.sites.iter().filter(|s| s.outstanding_blocks > 0).count() as u64,
        process: i.process,
        fd_kinds: fds::fd_kinds(at.pid),
        top_sites: named
            .into_iter()
            .map(|(name, (bytes, blocks))| SiteMetric {
                name,
                outstanding_bytes: bytes,
                outstanding_blocks: blocks,
            })
            .collect(),
        traced_seconds: start.elapsed().as_secs_f64(),
        // Set by the caller: judged at history samples only.
        verdicts: None,
        resources: None,
    })
}

/// The verdicts of the heap sites holding blocks at this history sample
/// (`ages`: their blocks then), as the report would judge them had
/// tracing ended now (`--min-age` aside: every site holding a block).
pub(super) fn heap_verdicts(
    history: &History,
    ages: &HashMap<u64, SiteBlocks>,
    sites: &[SiteSample],
    vcfg: &VerdictConfig,
) -> VerdictCounts {
    let mut c = VerdictCounts::default();
    for s in sites.iter().filter(|s| s.outstanding_blocks > 0) {
        let v = match history.site(s.stack_id) {
            Some(h) => analyze::assess(h.times, h.points, ages.get(&s.stack_id), vcfg).verdict,
            None => Verdict::Unknown,
        };
        // As the report says: a site that lost blocks to a full table may
        // have grown in the blocks missing.
        c.count(match v {
            Verdict::Stable | Verdict::Transient if s.dropped_blocks > 0 => Verdict::Unknown,
            v => v,
        });
    }
    c
}

/// The traced resources held now and their sites' verdicts (as sampled
/// this interval).
pub(super) fn resource_metrics(
    s: &super::Session,
    vcfg: &VerdictConfig,
) -> Option<ResourceFigures> {
    let fds = s.fds.as_ref()?;
    let mut r = ResourceFigures::default();
    r.verdicts.push(("fd", fds.verdicts(vcfg)));
    r.held.extend(fds.held());
    if let Some(t) = &s.threads {
        r.verdicts.push(("thread", t.verdicts(vcfg)));
        r.held.extend(t.held());
    }
    if let Some(m) = &s.mappings {
        r.verdicts.push(("mapping", m.verdicts(vcfg)));
        r.held.extend(m.held());
    }
    Some(r)
}

/// A gzipped pprof profile of the blocks outstanding now: every site that
/// holds any, with its stack (no verdicts: they come at the end).
pub(super) fn profile(
    at: &mut Attached,
    sym: &mut Symbolizer,
    opts: &Options,
    start: Instant,
) -> Result<Vec<u8>> {
    let sites: Vec<SiteSample> = at
        .collector
        .sites()?
        .iter()
        .filter(|s| s.outstanding_blocks > 0)
        .map(|s| s.estimated(opts.sampling))
        .collect();
    let stack_ids: Vec<u64> = sites.iter().map(|s| s.stack_id).collect();
    let (addrs, _) = super::frames::distinct_addresses(&mut at.collector, &stack_ids)?;
    at.note_unmaps();
    sym.load_taken_in_background(&at.modules, addrs.iter().copied());
    sym.set_deadline(Some(Instant::now() + PROFILE_LOAD_WAIT));
    let resolved = sym.symbolize_taken(&at.modules, &addrs, true);
    sym.set_deadline(None);
    let groups = AddressFrames::of(&addrs, resolved);
    let mut unresolved = BTreeMap::new();
    let mut frames = Vec::with_capacity(sites.len());
    for s in &sites {
        let mut f = Frames::default();
        let generation = at.collector.stack_generation(s.stack_id)?;
        groups.fill(
            at.collector.stack(s.stack_id)?,
            generation,
            &mut f,
            &mut unresolved,
        );
        frames.push(f);
    }
    let modules = super::build::module_infos(at, sym);
    let profile = Profile {
        samples: sites
            .iter()
            .zip(&frames)
            .map(|(s, f)| ProfileSample {
                values: [
                    s.alloc_calls,
                    s.alloc_bytes,
                    s.outstanding_blocks.max(0) as u64,
                    s.outstanding_bytes.max(0) as u64,
                ],
                frames: f,
                verdict: None,
            })
            .collect(),
        modules: &modules,
        sampling: opts.sampling,
        duration_s: start.elapsed().as_secs_f64(),
        comments: vec![format!(
            "memtrace {}: pid {}, live profile after {:.1} s of tracing",
            env!("CARGO_PKG_VERSION"),
            at.pid,
            start.elapsed().as_secs_f64()
        )],
    };
    Ok(profile.gzipped()?)
}
