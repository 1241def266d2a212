//! `--sample-bytes N`: byte-weighted Poisson sampling of allocations, and the
//! estimates scaled back from the samples.
//!
//! The BPF side keeps, per thread, the bytes left until the next sample point;
//! the points fall at exponentially distributed distances with mean N bytes,
//! so an allocation of `s` bytes is sampled with probability
//! `p(s) = 1 - exp(-s/N)` (a large one almost surely, a small one rarely),
//! independently of what came before. Each sampled block then stands for
//! `1/p(s)` blocks and `s/p(s)` bytes: unbiased estimates of the totals.
//! Everything memtrace measures in the kernel (counts, bytes, ages) is of the
//! sampled blocks; the scaling happens when figures are shown.
use memtrace_common::{SAMPLE_LOG2_ENTRIES, SAMPLE_LOG2_SHIFT};
use serde::Serialize;

/// The table BPF draws exponential gaps with: entry `i` is `log2(1 + i/1024)`
/// in units of 2^-SAMPLE_LOG2_SHIFT.
pub fn log2_table() -> Vec<u32> {
    let n = SAMPLE_LOG2_ENTRIES - 1;
    let scale = f64::from(1u32 << SAMPLE_LOG2_SHIFT);
    (0..=n)
        .map(|i| ((1.0 + f64::from(i) / f64::from(n)).log2() * scale).round() as u32)
        .collect()
}

/// The BPF side's gap draw (memtrace-ebpf `draw_gap`), step for step, from the
/// 32-bit random number `r`: for its tests.
#[cfg(test)]
pub fn draw_gap(table: &[u32], mean: u64, r: u32) -> i64 {
    let r = r | 1;
    let msb = 31 - r.leading_zeros();
    let m = (r as u64) << (31 - msb);
    let idx = ((m >> 21) & 1023) as usize;
    let frac = (m >> 5) & 0xffff;
    let (lo, hi) = (table[idx] as u64, table[idx + 1] as u64);
    let log2_mantissa = lo + ((hi.saturating_sub(lo) * frac) >> 16);
    let neg_log2 = ((((32 - msb) as u64) << SAMPLE_LOG2_SHIFT).saturating_sub(log2_mantissa))
        >> (SAMPLE_LOG2_SHIFT - 16);
    ((((mean * neg_log2) >> 16) * memtrace_common::LN2_Q16) >> 16).max(1) as i64
}

/// How the allocations were recorded; in JSON as the report's `sampling`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Sampling {
    /// Every allocation.
    #[default]
    Exact,
    /// Byte-weighted sampling with a mean of `mean_bytes` between samples.
    Bytes { mean_bytes: u64 },
}

impl Sampling {
    pub fn from_mean(mean_bytes: u64) -> Sampling {
        if mean_bytes == 0 {
            Sampling::Exact
        } else {
            Sampling::Bytes { mean_bytes }
        }
    }

    /// The mean the BPF side is given (0: exact).
    pub fn mean_bytes(self) -> u64 {
        match self {
            Sampling::Exact => 0,
            Sampling::Bytes { mean_bytes } => mean_bytes,
        }
    }

    pub fn is_sampled(self) -> bool {
        self != Sampling::Exact
    }

    /// How many allocations of `size` bytes one sampled block stands for:
    /// 1 / (1 - exp(-size/N)). Exact mode: 1.
    pub fn weight(self, size: u64) -> f64 {
        match self {
            Sampling::Exact => 1.0,
            Sampling::Bytes { mean_bytes } => {
                let r = size.max(1) as f64 / mean_bytes as f64;
                // -expm1(-r) = 1 - e^-r without cancellation for small r.
                1.0 / -(-r).exp_m1()
            }
        }
    }

    /// Estimated (blocks, bytes) that `blocks` sampled blocks of `bytes` bytes
    /// in all stand for, taking them to be of their mean size. Exact for a
    /// site whose blocks all have one size; see `Estimate` for mixed sizes.
    pub fn scale(self, blocks: i64, bytes: i64) -> (i64, i64) {
        if !self.is_sampled() || blocks <= 0 {
            return (blocks, bytes);
        }
        let w = self.weight((bytes.max(0) as u64) / blocks as u64);
        (
            (blocks as f64 * w).round() as i64,
            (bytes as f64 * w).round() as i64,
        )
    }
}

/// A running estimate over individual sampled blocks (each with its own size).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Estimate {
    pub blocks: f64,
    pub bytes: f64,
}

impl Estimate {
    pub fn add(&mut self, sampling: Sampling, size: u64) {
        let w = sampling.weight(size);
        self.blocks += w;
        self.bytes += w * size as f64;
    }

    /// `blocks` sampled blocks of `bytes` in all, each taken at their mean size.
    pub fn add_group(&mut self, sampling: Sampling, blocks: u64, bytes: u64) {
        if blocks == 0 {
            return;
        }
        let w = sampling.weight(bytes / blocks);
        self.blocks += w * blocks as f64;
        self.bytes += w * bytes as f64;
    }

    pub fn blocks(&self) -> u64 {
        self.blocks.round() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::xorshift;

    #[test]
    fn log2_table_and_gaps() {
        let t = log2_table();
        assert_eq!(t.len(), SAMPLE_LOG2_ENTRIES as usize);
        assert_eq!((t[0], t[1024]), (0, 1 << SAMPLE_LOG2_SHIFT));
        assert!(t.windows(2).all(|w| w[0] < w[1]));
        // Gaps for given random numbers: mean · -ln(r / 2^32).
        let mean = 1u64 << 20;
        for r in [
            1u32,
            2,
            3,
            1000,
            123_456_789,
            1 << 31,
            u32::MAX - 1,
            u32::MAX,
        ] {
            let want = -((r | 1) as f64 / 2f64.powi(32)).ln() * mean as f64;
            let got = draw_gap(&t, mean, r) as f64;
            assert!(
                (got - want).abs() <= want * 1e-4 + 16.0,
                "r={r}: {got} vs {want}"
            );
        }
        // The mean gap over many draws, and the median (ln 2 of the mean).
        let mut rng = xorshift(7);
        let mut gaps: Vec<i64> = (0..200_000)
            .map(|_| draw_gap(&t, mean, (rng() >> 32) as u32))
            .collect();
        let avg = gaps.iter().sum::<i64>() as f64 / gaps.len() as f64;
        assert!((avg / mean as f64 - 1.0).abs() < 0.01, "mean gap {avg}");
        gaps.sort_unstable();
        let median = gaps[gaps.len() / 2] as f64 / mean as f64;
        assert!(
            (median - std::f64::consts::LN_2).abs() < 0.01,
            "median {median}"
        );
        // The largest mean stays within 64 bits: -log2 is at most 32.
        let worst = draw_gap(&t, memtrace_common::MAX_SAMPLE_MEAN_BYTES, 1) as f64;
        let want = 32.0 * std::f64::consts::LN_2 * memtrace_common::MAX_SAMPLE_MEAN_BYTES as f64;
        assert!((worst / want - 1.0).abs() < 1e-3, "{worst} vs {want}");
    }

    #[test]
    fn weights() {
        let s = Sampling::from_mean(512 * 1024);
        // Small blocks: about N/s (+1/2).
        let w = s.weight(64);
        assert!((w - (8192.0 + 0.5)).abs() < 0.01, "{w}");
        // A block of N bytes: 1/(1-1/e).
        let w = s.weight(512 * 1024);
        assert!((w - 1.0 / (1.0 - (-1.0f64).exp())).abs() < 1e-12);
        // Huge blocks are always sampled and stand for themselves.
        assert!((s.weight(1 << 40) - 1.0).abs() < 1e-12);
        assert_eq!(Sampling::Exact.weight(10), 1.0);
        assert_eq!(Sampling::Exact.scale(3, 30), (3, 30));
        assert_eq!(s.scale(0, 0), (0, 0));
        let (b, y) = s.scale(2, 2 * 512 * 1024);
        assert_eq!(b, (2.0 * s.weight(512 * 1024)).round() as i64);
        assert_eq!(
            y,
            (2.0 * 512.0 * 1024.0 * s.weight(512 * 1024)).round() as i64
        );
    }

    #[test]
    fn json_form() {
        assert_eq!(
            serde_json::to_string(&Sampling::from_mean(524288)).unwrap(),
            r#"{"mode":"bytes","mean_bytes":524288}"#
        );
        assert_eq!(
            serde_json::to_string(&Sampling::Exact).unwrap(),
            r#"{"mode":"exact"}"#
        );
    }

    /// The BPF sampler, simulated in userspace with the same table and integer
    /// arithmetic: the estimates it gives are unbiased, for small and large
    /// blocks.
    #[test]
    fn simulated_sampler_is_unbiased() {
        let mean = 64 * 1024u64;
        let s = Sampling::from_mean(mean);
        let table = log2_table();
        let mut rng = xorshift(0x5eed);
        let mut draw = || draw_gap(&table, mean, (rng() >> 32) as u32);
        let mut left = draw();
        // Interleaved small and large allocations, like a real program.
        let sizes = [48u64, 48, 200, 48, 32 * 1024, 48, 100 * 1024, 48];
        let mut est = [Estimate::default(); 8];
        let mut total = [0u64; 8];
        for i in 0..8_000_000 {
            let k = i % sizes.len();
            let size = sizes[k];
            total[k] += size;
            if left > size as i64 {
                left -= size as i64;
            } else {
                left = draw();
                est[k].add(s, size);
            }
        }
        // Group by size (indices 0,1,3,5,7 are 48-byte sites).
        for (k, &size) in sizes.iter().enumerate() {
            if size == 48 && k != 0 {
                continue;
            }
            let (e, t) = if size == 48 {
                let e: f64 = [0, 1, 3, 5, 7].iter().map(|&j| est[j].bytes).sum();
                let t: u64 = [0, 1, 3, 5, 7].iter().map(|&j| total[j]).sum();
                (e, t)
            } else {
                (est[k].bytes, total[k])
            };
            let err = (e - t as f64).abs() / t as f64;
            assert!(
                err < 0.06,
                "size {size}: estimated {e:.0} of {t} ({err:.3})"
            );
        }
    }
}
