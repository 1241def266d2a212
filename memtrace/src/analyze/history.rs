//! The per-site history, sampled every interval in bounded memory (see the
//! module documentation of [`crate::analyze`]).
use std::time::Duration;

// Keyed by stack ids: a fast hasher (SipHash showed in profiles at 10,000 sites).
use rustc_hash::FxHashMap as HashMap;

use super::blocks::SiteBlocks;
use crate::process::stat::ProcStat;

/// Samples kept in the history (a power of two: see [`History`]).
pub const HISTORY_CAPACITY: usize = 128;

/// One site at one sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Point {
    pub bytes: i64,
    pub blocks: i64,
    /// Age of the oldest / the median outstanding block, when the blocks were scanned.
    pub oldest_age_ns: Option<u64>,
    pub median_age_ns: Option<u64>,
}

#[derive(Clone, Debug, Default)]
struct Series {
    /// Index in the timeline of `points[0]`.
    start: usize,
    points: Vec<Point>,
    /// The most bytes of any sample recorded, kept when compaction drops it.
    peak_bytes: i64,
}

/// The process at one sample, with the traced heap then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessPoint {
    pub t_ns: u64,
    pub stat: ProcStat,
    pub traced_bytes: i64,
}

/// The blocks by site at one sample, and where their ages came from.
#[derive(Clone, Copy, Debug)]
pub enum SampleAges<'a> {
    /// No ages at this sample.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the history's tests record samples without ages")
    )]
    None,
    /// From a scan of every outstanding block.
    Blocks(&'a HashMap<u64, SiteBlocks>),
    /// From the kernel's per-site, per-epoch aggregates.
    Epochs(&'a HashMap<u64, SiteBlocks>),
}

impl<'a> SampleAges<'a> {
    /// `blocks` from a scan of every block (`scanned`) or from the aggregates.
    pub fn of(blocks: &'a HashMap<u64, SiteBlocks>, scanned: bool) -> Self {
        if scanned {
            SampleAges::Blocks(blocks)
        } else {
            SampleAges::Epochs(blocks)
        }
    }

    fn blocks(self) -> Option<&'a HashMap<u64, SiteBlocks>> {
        match self {
            SampleAges::None => None,
            SampleAges::Blocks(b) | SampleAges::Epochs(b) => Some(b),
        }
    }
}

/// Per-site history with bounded memory: see the module documentation.
#[derive(Clone, Debug)]
pub struct History {
    capacity: usize,
    interval_ns: u64,
    start_ns: u64,
    /// Record one interval in `stride`.
    stride: u64,
    ticks: u64,
    times: Vec<u64>,
    /// Whether the blocks were scanned (ages known) at each sample.
    /// Per sample: 0 no ages, 1 ages from every block, 2 from the epoch aggregates.
    aged: Vec<u8>,
    totals: Vec<(i64, i64)>,
    process: Vec<Option<ProcStat>>,
    sites: HashMap<u64, Series>,
}

/// A site's history: sample times (CLOCK_MONOTONIC ns) and points.
#[derive(Clone, Copy, Debug)]
pub struct SiteHistory<'a> {
    pub times: &'a [u64],
    pub points: &'a [Point],
    /// The most bytes at any sample recorded, those compaction dropped too.
    pub peak_bytes: i64,
}

impl History {
    /// `capacity` must be even (it is halved when full); `start_ns` is when
    /// tracing started, `interval` the sampling interval.
    pub fn new(capacity: usize, start_ns: u64, interval: Duration) -> Self {
        assert!(capacity >= 2 && capacity.is_multiple_of(2));
        History {
            capacity,
            interval_ns: interval.as_nanos().max(1) as u64,
            start_ns,
            stride: 1,
            ticks: 0,
            times: Vec::new(),
            aged: Vec::new(),
            totals: Vec::new(),
            process: Vec::new(),
            sites: HashMap::default(),
        }
    }

    /// One interval has passed: returns whether it is to be recorded.
    pub fn tick(&mut self) -> bool {
        self.ticks += 1;
        (self.ticks - 1).is_multiple_of(self.stride)
    }

    pub fn start_ns(&self) -> u64 {
        self.start_ns
    }

    #[cfg(test)]
    pub fn times(&self) -> &[u64] {
        &self.times
    }

    pub fn len(&self) -> usize {
        self.times.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Intervals between two recorded samples now.
    pub fn stride(&self) -> u64 {
        self.stride
    }

    /// Samples taken without scanning the blocks (no ages).
    pub fn samples_without_ages(&self) -> usize {
        self.aged.iter().filter(|a| **a == 0).count()
    }

    /// Samples whose ages came from the kernel's per-epoch aggregates (too many
    /// blocks to read each one): ages at the resolution of the sampling period.
    pub fn samples_with_epoch_ages(&self) -> usize {
        self.aged.iter().filter(|a| **a == 2).count()
    }

    /// Records a sample at `now_ns`: every site's `(stack id, outstanding bytes,
    /// blocks)`, the blocks by site with their ages if there are any, the
    /// process if it could be read.
    pub fn record(
        &mut self,
        now_ns: u64,
        sites: &[(u64, i64, i64)],
        ages: SampleAges,
        process: Option<ProcStat>,
    ) {
        let blocks = ages.blocks();
        if self.times.len() >= self.capacity {
            self.compact();
        }
        let idx = self.times.len();
        self.times.push(now_ns);
        self.aged.push(match ages {
            SampleAges::None => 0,
            SampleAges::Blocks(_) => 1,
            SampleAges::Epochs(_) => 2,
        });
        self.process.push(process);
        let total = sites.iter().fold((0, 0), |(y, b), s| (y + s.1, b + s.2));
        self.totals.push(total);
        for &(id, bytes, nblocks) in sites {
            let series = match self.sites.entry(id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(_) if nblocks <= 0 => continue,
                std::collections::hash_map::Entry::Vacant(e) => e.insert(Series {
                    start: idx,
                    points: Vec::new(),
                    peak_bytes: 0,
                }),
            };
            while series.start + series.points.len() < idx {
                series.points.push(Point::default());
            }
            let (oldest, median) = match blocks {
                Some(b) => b
                    .get(&id)
                    .map(|s| s.ages_at(now_ns))
                    .unwrap_or((None, None)),
                None => (None, None),
            };
            series.peak_bytes = series.peak_bytes.max(bytes);
            series.points.push(Point {
                bytes,
                blocks: nblocks,
                oldest_age_ns: oldest,
                median_age_ns: median,
            });
        }
        // Sites missing from this sample hold nothing.
        for s in self.sites.values_mut() {
            while s.start + s.points.len() <= idx {
                s.points.push(Point::default());
            }
        }
    }

    /// Records the sample at the end of tracing; if the previous sample is less
    /// than a quarter of a sampling period old, this one replaces it.
    pub fn record_final(
        &mut self,
        now_ns: u64,
        sites: &[(u64, i64, i64)],
        ages: SampleAges,
        process: Option<ProcStat>,
    ) {
        let mut process = process;
        if let Some(&last) = self.times.last()
            && now_ns.saturating_sub(last) < self.stride * self.interval_ns / 4
        {
            let n = self.times.len() - 1;
            self.times.pop();
            self.aged.pop();
            self.totals.pop();
            let previous = self.process.pop().flatten();
            process = process.or(previous);
            for s in self.sites.values_mut() {
                if s.start + s.points.len() > n {
                    s.points.pop();
                }
            }
            self.sites
                .retain(|_, s| !(s.points.is_empty() && s.start >= n));
        }
        self.record(now_ns, sites, ages, process);
    }

    /// Drops every other sample (keeping the first) and halves the rate.
    fn compact(&mut self) {
        fn keep_even<T: Copy>(v: &mut Vec<T>, start: usize) {
            let mut i = 0;
            v.retain(|_| {
                let keep = (start + i).is_multiple_of(2);
                i += 1;
                keep
            });
        }
        keep_even(&mut self.times, 0);
        keep_even(&mut self.aged, 0);
        keep_even(&mut self.totals, 0);
        keep_even(&mut self.process, 0);
        for s in self.sites.values_mut() {
            keep_even(&mut s.points, s.start);
            s.start = s.start.div_ceil(2);
        }
        self.stride *= 2;
    }

    pub fn site(&self, stack_id: u64) -> Option<SiteHistory<'_>> {
        let s = self.sites.get(&stack_id)?;
        Some(SiteHistory {
            times: &self.times[s.start..s.start + s.points.len()],
            points: &s.points,
            peak_bytes: s.peak_bytes,
        })
    }

    /// Total outstanding (bytes, blocks) at each sample.
    #[cfg(test)]
    pub fn totals(&self) -> &[(i64, i64)] {
        &self.totals
    }

    /// The samples at which the process could be read.
    pub fn process(&self) -> Vec<ProcessPoint> {
        self.times
            .iter()
            .zip(&self.process)
            .zip(&self.totals)
            .filter_map(|((&t, p), &(bytes, _))| {
                p.map(|stat| ProcessPoint {
                    t_ns: t,
                    stat,
                    traced_bytes: bytes,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{analyze::blocks::group_blocks, kernel::sampling::Sampling};

    #[test]
    fn history_records_sites_from_their_first_block() {
        let ms = 1_000_000;
        let mut h = History::new(8, 0, Duration::from_millis(100));
        assert!(h.tick());
        h.record(100 * ms, &[(1, 10, 1), (2, 0, 0)], SampleAges::None, None);
        assert!(h.site(2).is_none(), "no block yet, no history");
        h.tick();
        h.record(200 * ms, &[(1, 20, 2), (2, 5, 1)], SampleAges::None, None);
        h.tick();
        // Site 1 missing from the sample: it holds nothing.
        h.record(300 * ms, &[(2, 5, 1)], SampleAges::None, None);
        let s1 = h.site(1).unwrap();
        assert_eq!(s1.times, &[100 * ms, 200 * ms, 300 * ms]);
        let bytes: Vec<i64> = s1.points.iter().map(|p| p.bytes).collect();
        assert_eq!(bytes, vec![10, 20, 0]);
        let s2 = h.site(2).unwrap();
        assert_eq!(s2.times, &[200 * ms, 300 * ms]);
        assert_eq!(h.totals(), &[(10, 1), (25, 3), (5, 1)]);
        assert_eq!(h.samples_without_ages(), 3);
        let none = HashMap::default();
        h.record(400 * ms, &[], SampleAges::Epochs(&none), None);
        h.record(500 * ms, &[], SampleAges::Blocks(&none), None);
        assert_eq!(
            (h.samples_without_ages(), h.samples_with_epoch_ages()),
            (3, 1)
        );
    }

    #[test]
    fn history_stays_bounded_and_covers_the_run() {
        let ms = 1_000_000;
        let mut h = History::new(8, 0, Duration::from_millis(100));
        let mut recorded = Vec::new();
        for tick in 1..=40u64 {
            if h.tick() {
                recorded.push(tick);
                let ages = group_blocks([(7, 0, 1)], tick * 100 * ms, 0, Sampling::Exact);
                h.record(
                    tick * 100 * ms,
                    &[(7, tick as i64, 1)],
                    SampleAges::Blocks(&ages),
                    None,
                );
            }
            assert!(h.len() <= 8);
        }
        // Full at 8 samples: halved at ticks 9, 17 and 33 (stride 2, 4, 8); the
        // first sample is always kept and the spacing is even.
        let ticks: Vec<u64> = h.times().iter().map(|t| t / (100 * ms)).collect();
        assert_eq!(h.stride(), 8);
        assert_eq!(ticks, vec![1, 9, 17, 25, 33]);
        let s = h.site(7).unwrap();
        let bytes: Vec<i64> = s.points.iter().map(|p| p.bytes).collect();
        assert_eq!(bytes, vec![1, 9, 17, 25, 33]);
        assert_eq!(s.points[1].oldest_age_ns, Some(900 * ms));
        assert!(recorded.ends_with(&[25, 29, 33]));
        // The final sample is always recorded ...
        h.record_final(4050 * ms, &[(7, 40, 1)], SampleAges::None, None);
        assert_eq!(h.times().last(), Some(&(4050 * ms)));
        assert_eq!(h.len(), 6);
        // ... replacing the previous one if that is very recent.
        let mut h = History::new(8, 0, Duration::from_millis(100));
        h.tick();
        h.record(100 * ms, &[(7, 1, 1)], SampleAges::None, None);
        h.tick();
        h.record(
            200 * ms,
            &[(7, 2, 1), (8, 1, 1)],
            SampleAges::None,
            Some(ProcStat::default()),
        );
        h.record_final(210 * ms, &[(7, 3, 1)], SampleAges::None, None);
        assert_eq!(h.times(), &[100 * ms, 210 * ms]);
        let bytes: Vec<i64> = h.site(7).unwrap().points.iter().map(|p| p.bytes).collect();
        assert_eq!(bytes, vec![1, 3]);
        assert!(
            h.site(8).is_none(),
            "site 8 only existed in the replaced sample"
        );
        assert_eq!(
            h.process().len(),
            1,
            "the process sample of the replaced one is kept"
        );
    }

    #[test]
    fn compaction_of_a_site_that_starts_late() {
        let ms = 1_000_000;
        let mut h = History::new(4, 0, Duration::from_millis(100));
        for tick in 1..=9u64 {
            if h.tick() {
                let sites = if tick >= 4 {
                    vec![(1, tick as i64, 1)]
                } else {
                    vec![]
                };
                h.record(tick * 100 * ms, &sites, SampleAges::None, None);
            }
        }
        let ticks: Vec<u64> = h.times().iter().map(|t| t / (100 * ms)).collect();
        assert_eq!(ticks, vec![1, 5, 9]);
        let s = h.site(1).unwrap();
        let st: Vec<u64> = s.times.iter().map(|t| t / (100 * ms)).collect();
        assert_eq!(st, vec![5, 9]);
        let bytes: Vec<i64> = s.points.iter().map(|p| p.bytes).collect();
        assert_eq!(bytes, vec![5, 9]);
    }
}
