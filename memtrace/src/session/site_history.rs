//! What fd, thread and mapping tracing share: each interval's held items,
//! grouped by site, recorded into a history; at the end, a report site
//! ([`ResourceSite`]) with its verdict, trend and history from it.
use std::time::Duration;

use anyhow::Result;
use memtrace_common::NO_STACK;

use super::frames::{stack_walk, truncated_reason};
use super::target::Attached;
use crate::{
    analyze::{
        self, BlockGrouper, HISTORY_CAPACITY, History, SampleAges, SiteBlocks, VerdictConfig,
    },
    report::VerdictCounts,
    report::resource_site::{HistoryPoint, ResourceSite, SiteDetail},
};

/// One resource's sites over the run, by history id.
pub(super) struct SiteHistory {
    history: History,
    /// What each site held at the last sample.
    blocks: rustc_hash::FxHashMap<u64, SiteBlocks>,
}

/// What one site holds at the end: the fields that are not its history's.
pub(super) struct Held {
    pub(super) kind: String,
    pub(super) description: Option<String>,
    pub(super) outstanding: u64,
    pub(super) created: u64,
    pub(super) bytes: Option<u64>,
    /// The birth of its oldest item.
    pub(super) oldest_ns: Option<u64>,
    pub(super) stack_id: u64,
    pub(super) detail: SiteDetail,
}

impl SiteHistory {
    pub(super) fn new(start_ns: u64, interval: Duration) -> Self {
        SiteHistory {
            history: History::new(HISTORY_CAPACITY, start_ns, interval),
            blocks: Default::default(),
        }
    }

    /// One sample: `held` is what each site holds now (an item's bytes are
    /// 1 for a counted resource), `ids` every site known (one holding
    /// nothing is recorded at 0). `last`: the end of tracing, always
    /// recorded; else at the history's own pace.
    pub(super) fn record(
        &mut self,
        now_ns: u64,
        last: bool,
        ids: impl Iterator<Item = u64>,
        held: BlockGrouper,
    ) {
        let blocks = held.finish();
        let mut sites: Vec<(u64, i64, i64)> = ids
            .map(|id| match blocks.get(&id) {
                Some(b) => (id, b.bytes as i64, b.blocks as i64),
                None => (id, 0, 0),
            })
            .collect();
        sites.sort_unstable();
        if last {
            self.history
                .record_final(now_ns, &sites, SampleAges::Blocks(&blocks), None);
        } else if self.history.tick() {
            self.history
                .record(now_ns, &sites, SampleAges::Blocks(&blocks), None);
        }
        self.blocks = blocks;
    }

    /// What the sites held at the last sample.
    pub(super) fn held(&self) -> &rustc_hash::FxHashMap<u64, SiteBlocks> {
        &self.blocks
    }

    /// How many of the sites holding items at the last sample get each
    /// verdict, judged as the report would had tracing ended then.
    pub(super) fn verdicts(&self, vcfg: &VerdictConfig) -> VerdictCounts {
        let mut c = VerdictCounts::default();
        for (id, b) in self.blocks.iter().filter(|(_, b)| b.blocks > 0) {
            let v = match self.history.site(*id) {
                Some(h) => analyze::assess(h.times, h.points, Some(b), vcfg).verdict,
                None => analyze::Verdict::Unknown,
            };
            c.count(v);
        }
        c
    }

    /// The report's site `id` (its frames not filled in).
    pub(super) fn site(
        &self,
        at: &mut Attached,
        id: u64,
        held: Held,
        end_ns: u64,
        vcfg: &VerdictConfig,
    ) -> Result<ResourceSite> {
        let age = |t: u64| end_ns.saturating_sub(t) as f64 / 1e9;
        let end = self.blocks.get(&id);
        let (verdict, trend, history) = self.assess(id, end, vcfg);
        let flags = at.collector.stack_flags(held.stack_id)?;
        Ok(ResourceSite {
            kind: held.kind,
            description: held.description,
            outstanding: held.outstanding,
            created: held.created,
            bytes: held.bytes,
            oldest_age_s: held.oldest_ns.map(age),
            median_age_s: end.and_then(SiteBlocks::median_birth_ns).map(age),
            verdict,
            growth_per_s: trend.growth_bytes_per_s,
            stack_captured: held.stack_id != NO_STACK,
            stack_walk: stack_walk(flags),
            truncated: truncated_reason(flags).is_some(),
            frames: Default::default(),
            trend,
            history,
            detail: held.detail,
            stack_id: held.stack_id,
        })
    }

    /// A site's verdict, trend and history.
    fn assess(
        &self,
        id: u64,
        end: Option<&SiteBlocks>,
        vcfg: &VerdictConfig,
    ) -> (analyze::Verdict, analyze::Trend, Vec<HistoryPoint>) {
        let Some(h) = self.history.site(id) else {
            return (analyze::Verdict::Unknown, Default::default(), Vec::new());
        };
        let a = analyze::assess(h.times, h.points, end, vcfg);
        let start = self.history.start_ns();
        let points = h
            .times
            .iter()
            .zip(h.points)
            .map(|(&t, p)| HistoryPoint {
                t_s: t.saturating_sub(start) as f64 / 1e9,
                outstanding: p.blocks,
                bytes: p.bytes,
                oldest_age_s: p.oldest_age_ns.map(|a| a as f64 / 1e9),
            })
            .collect();
        (a.verdict, a.trend, points)
    }
}

/// The one value every item has, if they agree (None for no items).
pub(super) fn common<T: PartialEq>(mut items: impl Iterator<Item = T>) -> Option<T> {
    let first = items.next()?;
    items.all(|i| i == first).then_some(first)
}
