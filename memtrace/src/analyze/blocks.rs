//! The outstanding blocks of each site at one sample, with when they were
//! born: from a scan of every block or from the kernel's per-epoch aggregates.
// Keyed by stack ids: a fast hasher (SipHash showed in profiles at 10,000 sites).
use rustc_hash::FxHashMap as HashMap;

use crate::kernel::sampling::{Estimate, Sampling};

/// The outstanding blocks of one site: from a scan of every block, or from the
/// kernel's per-epoch aggregates (each epoch's blocks at their mean birth time).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SiteBlocks {
    pub blocks: u64,
    pub bytes: u64,
    /// Blocks and bytes at least `min_age` old.
    pub old_blocks: u64,
    pub old_bytes: u64,
    /// When the blocks were allocated (CLOCK_MONOTONIC ns), oldest first, with
    /// how many were born then: one block each from a scan; one entry per
    /// epoch, at the epoch's mean birth time, from the aggregates.
    pub births: Vec<(u64, u64)>,
    /// What the blocks (all, and those at least `min_age` old) stand for:
    /// themselves in exact mode, an estimate with `--sample-bytes`.
    pub est: Estimate,
    pub est_old: Estimate,
}

impl SiteBlocks {
    pub fn oldest_ns(&self) -> Option<u64> {
        self.births.first().map(|b| b.0)
    }

    /// Birth time of the median block (the mean of the two middle ones).
    pub fn median_birth_ns(&self) -> Option<u64> {
        let n: u64 = self.births.iter().map(|b| b.1).sum();
        if n == 0 {
            return None;
        }
        // The birth of the i-th block (0-based) in birth order.
        let nth = |i: u64| {
            let mut seen = 0;
            for &(t, c) in &self.births {
                seen += c;
                if i < seen {
                    return t;
                }
            }
            self.births.last().map_or(0, |b| b.0)
        };
        let (a, b) = (nth((n - 1) / 2), nth(n / 2));
        Some(a / 2 + b / 2 + (a % 2 + b % 2) / 2)
    }

    /// How many of the blocks were allocated at or before `t_ns`.
    pub fn born_by(&self, t_ns: u64) -> usize {
        let i = self.births.partition_point(|&(b, _)| b <= t_ns);
        self.births[..i].iter().map(|b| b.1).sum::<u64>() as usize
    }

    /// (oldest, median) age at `now_ns`.
    pub fn ages_at(&self, now_ns: u64) -> (Option<u64>, Option<u64>) {
        (
            self.oldest_ns().map(|b| now_ns.saturating_sub(b)),
            self.median_birth_ns().map(|b| now_ns.saturating_sub(b)),
        )
    }
}

pub struct BlockGrouper {
    out: HashMap<u64, SiteBlocks>,
    now_ns: u64,
    min_age_ns: u64,
    sampling: Sampling,
}

impl BlockGrouper {
    pub fn new(now_ns: u64, min_age_ns: u64, sampling: Sampling) -> Self {
        BlockGrouper {
            out: HashMap::default(),
            now_ns,
            min_age_ns,
            sampling,
        }
    }

    /// One block.
    pub fn add(&mut self, stack_id: u64, birth: u64, size: u64) {
        let s = self.out.entry(stack_id).or_default();
        s.blocks += 1;
        s.bytes += size;
        s.est.add(self.sampling, size);
        if self.now_ns.saturating_sub(birth) >= self.min_age_ns {
            s.old_blocks += 1;
            s.old_bytes += size;
            s.est_old.add(self.sampling, size);
        }
        s.births.push((birth, 1));
    }

    /// `blocks` blocks of `bytes` in all, taken as born at `birth` (one
    /// epoch's aggregate: `birth` is their mean birth time).
    pub fn add_group(&mut self, stack_id: u64, birth: u64, blocks: u64, bytes: u64) {
        if blocks == 0 {
            return;
        }
        let s = self.out.entry(stack_id).or_default();
        s.blocks += blocks;
        s.bytes += bytes;
        s.est.add_group(self.sampling, blocks, bytes);
        if self.now_ns.saturating_sub(birth) >= self.min_age_ns {
            s.old_blocks += blocks;
            s.old_bytes += bytes;
            s.est_old.add_group(self.sampling, blocks, bytes);
        }
        s.births.push((birth, blocks));
    }

    pub fn finish(mut self) -> HashMap<u64, SiteBlocks> {
        for s in self.out.values_mut() {
            s.births.sort_unstable();
            s.births.shrink_to_fit();
        }
        self.out
    }
}

/// Groups scanned blocks `(stack id, birth ns, size)` by site.
#[cfg(test)]
pub fn group_blocks(
    blocks: impl IntoIterator<Item = (u64, u64, u64)>,
    now_ns: u64,
    min_age_ns: u64,
    sampling: Sampling,
) -> HashMap<u64, SiteBlocks> {
    let mut g = BlockGrouper::new(now_ns, min_age_ns, sampling);
    for (stack_id, birth, size) in blocks {
        g.add(stack_id, birth, size);
    }
    g.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_by_site() {
        let g = group_blocks(
            [(1, 10, 100), (2, 5, 7), (1, 30, 50), (1, 20, 1)],
            40,
            15,
            Sampling::Exact,
        );
        let a = &g[&1];
        assert_eq!(
            (a.blocks, a.bytes, a.old_blocks, a.old_bytes),
            (3, 151, 2, 101)
        );
        // Exact mode: each block stands for itself.
        assert_eq!((a.est.blocks(), a.est.bytes()), (3, 151));
        assert_eq!((a.est_old.blocks(), a.est_old.bytes()), (2, 101));
        // Sampled: each block is scaled by its own size's weight.
        let s = Sampling::from_mean(100);
        let sg = group_blocks([(1, 10, 100), (1, 30, 50)], 40, 15, s);
        let sa = &sg[&1];
        let want = 100.0 * s.weight(100) + 50.0 * s.weight(50);
        assert!((sa.est.bytes - want).abs() < 1e-6, "{sa:?}");
        assert!((sa.est.blocks - (s.weight(100) + s.weight(50))).abs() < 1e-9);
        assert!((sa.est_old.bytes - 100.0 * s.weight(100)).abs() < 1e-6);
        assert_eq!((sa.blocks, sa.bytes), (2, 150));
        assert_eq!(a.births, vec![(10, 1), (20, 1), (30, 1)]);
        assert_eq!(a.oldest_ns(), Some(10));
        assert_eq!(a.median_birth_ns(), Some(20));
        assert_eq!(a.born_by(20), 2);
        assert_eq!(a.born_by(9), 0);
        assert_eq!(a.ages_at(40), (Some(30), Some(20)));
        let b = SiteBlocks {
            births: vec![(10, 1), (21, 1)],
            ..Default::default()
        };
        assert_eq!(b.median_birth_ns(), Some(15));
        // Aggregates: 3 blocks born (on average) at 10, 1 at 20, 4 at 30.
        let mut g = BlockGrouper::new(40, 15, Sampling::Exact);
        g.add_group(1, 30, 4, 40);
        g.add_group(1, 10, 3, 300);
        g.add_group(1, 20, 1, 5);
        g.add_group(2, 5, 0, 0);
        let g = g.finish();
        assert!(!g.contains_key(&2), "an empty aggregate is no block");
        let c = &g[&1];
        assert_eq!(
            (c.blocks, c.bytes, c.old_blocks, c.old_bytes),
            (8, 345, 4, 305)
        );
        assert_eq!(c.births, vec![(10, 3), (20, 1), (30, 4)]);
        assert_eq!(
            (c.born_by(9), c.born_by(10), c.born_by(29), c.born_by(30)),
            (0, 3, 4, 8)
        );
        // Blocks 3 and 4 (0-based) of 8: born at 20 and 30.
        assert_eq!(c.median_birth_ns(), Some(25));
        assert_eq!(c.ages_at(40), (Some(30), Some(15)));
        // Sampled aggregates: each block at the epoch's mean size.
        let mut g = BlockGrouper::new(40, 15, s);
        g.add_group(1, 10, 2, 150);
        let e = g.finish()[&1].est;
        assert!((e.blocks - 2.0 * s.weight(75)).abs() < 1e-9, "{e:?}");
        assert!((e.bytes - 150.0 * s.weight(75)).abs() < 1e-6, "{e:?}");
    }
}
