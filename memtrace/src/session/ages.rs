//! The ages of outstanding blocks: from a scan of every block or from the
//! kernel's per-epoch aggregates, and which of the two a sample can afford.
use anyhow::Result;
// Keyed by stack ids: a fast hasher (SipHash showed in profiles at 10,000 sites).
use rustc_hash::FxHashMap as HashMap;

use super::target::Attached;
use crate::{
    analyze::{BlockGrouper, SiteBlocks},
    kernel::collect::SiteSample,
    report::Sampling,
};

/// At each sample the ages of a site's blocks (oldest, median) are read by
/// scanning every outstanding block: only while there are fewer than this many,
/// and while the scan is expected to take at most [`AGE_SCAN_BUDGET`] of the
/// sampling period, so that sampling never crowds out the interval it samples.
/// Otherwise they come from the kernel's per-site aggregates of the blocks born
/// in each epoch (one epoch per sample), which cost one step per aggregate. The
/// final report scans every block up to [`REPORT_SCAN_MAX_BLOCKS`].
///
/// The limits were set when a block cost 0.5-3 µs to read (the block table was
/// a BPF hash map read in batches); a scan now costs well under a microsecond a
/// block after a fixed cost for the table's keys, so they are conservative.
pub(super) const AGE_SCAN_MAX_BLOCKS: i64 = 200_000;
pub(super) const AGE_SCAN_BUDGET: f64 = 0.1;
pub(super) const REPORT_SCAN_MAX_BLOCKS: i64 = 100_000;
/// Cost of scanning one block, until measured: the slowest ever seen, so the
/// first estimate does not overrun the budget.
pub(super) const AGE_SCAN_NS_PER_BLOCK: f64 = 3000.0;

/// Whether ages come from a scan of every block (else from the per-epoch
/// aggregates): `scan_if` unless `MEMTRACE_AGES=epochs` (or `blocks`) says
/// otherwise, for tests and comparisons.
pub(super) fn scan_every_block(scan_if: bool) -> bool {
    match crate::knobs::get().ages {
        crate::knobs::Ages::Epochs => false,
        crate::knobs::Ages::Blocks => true,
        crate::knobs::Ages::Auto => scan_if,
    }
}

/// The outstanding blocks by site, from a scan of every block (`scan_all`) or
/// from the aggregates the last `Collector::sites` read.
pub(super) fn site_blocks(
    at: &Attached,
    now_ns: u64,
    min_age_ns: u64,
    sampling: Sampling,
    scan_all: bool,
) -> Result<HashMap<u64, SiteBlocks>> {
    let mut g = BlockGrouper::new(now_ns, min_age_ns, sampling);
    if scan_all {
        at.collector
            .for_each_block(|stack_id, birth, size| g.add(stack_id, birth, size))?;
    } else {
        at.collector
            .for_each_epoch_group(now_ns, |stack_id, birth, blocks, bytes| {
                g.add_group(stack_id, birth, blocks, bytes)
            });
    }
    Ok(g.finish())
}

/// The (stack id, bytes, blocks) of each site, as the history records them.
pub(super) fn site_tuples(sites: &[SiteSample]) -> Vec<(u64, i64, i64)> {
    sites
        .iter()
        .map(|s| (s.stack_id, s.outstanding_bytes, s.outstanding_blocks))
        .collect()
}

/// Blocks in the kernel's map, what a scan of every block reads.
pub(super) fn blocks_in_map(sites: &[SiteSample]) -> i64 {
    sites.iter().map(|s| s.outstanding_blocks).sum()
}
