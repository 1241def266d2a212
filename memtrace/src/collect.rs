//! Reading the kernel-side state: counters, per-site aggregates, stacks, and
//! (for the final report) the outstanding blocks themselves.
use std::collections::HashMap;

use anyhow::{Context, Result};
use memtrace_common::{Counter, NO_STACK, NUM_COUNTERS};
use serde::Serialize;

use crate::{
    analyze::{BlockGrouper, SiteBlocks},
    batch,
    probe::TraceMaps,
    sampling::Sampling,
};

/// Every counter, with names in the user's terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub alloc_calls: u64,
    pub alloc_bytes: u64,
    pub free_calls: u64,
    pub free_unknown: u64,
    pub failed_allocs: u64,
    pub dropped_alloc_map_full: u64,
    pub dropped_pending_map_full: u64,
    pub dropped_site_map_full: u64,
    pub stack_read_errors: u64,
    pub stack_map_full: u64,
    pub stack_hash_collisions: u64,
    pub out_pointer_read_errors: u64,
    pub unmatched_returns: u64,
    pub missed_returns: u64,
    pub address_reused: u64,
    pub internal_calls: u64,
    /// `--sample-bytes`: allocations seen but not sampled (`alloc_calls` counts the sampled).
    pub unsampled_calls: u64,
    /// Frames stepped over with frame pointers (no unwind row covered them).
    pub unwind_fp_fallback: u64,
    /// Stack walks that stopped early, by cause.
    pub unwind_bad_read: u64,
    pub unwind_depth_limit: u64,
    pub unwind_unsupported: u64,
    pub unwind_no_frame_pointer: u64,
}

impl Counters {
    pub fn from_raw(raw: &[u64; NUM_COUNTERS as usize], missed_returns: u64) -> Self {
        let c = |c: Counter| raw[c as usize];
        Counters {
            alloc_calls: c(Counter::AllocCalls),
            alloc_bytes: c(Counter::AllocBytes),
            free_calls: c(Counter::FreeCalls),
            free_unknown: c(Counter::FreeUnknown),
            failed_allocs: c(Counter::FailedAllocs),
            dropped_alloc_map_full: c(Counter::DroppedAllocMapFull),
            dropped_pending_map_full: c(Counter::DroppedPendingFull),
            dropped_site_map_full: c(Counter::DroppedSiteMapFull),
            stack_read_errors: c(Counter::StackReadErrors),
            stack_map_full: c(Counter::StackMapFull),
            stack_hash_collisions: c(Counter::StackHashCollisions),
            out_pointer_read_errors: c(Counter::OutPointerReadErrors),
            unmatched_returns: c(Counter::UnmatchedReturns),
            missed_returns,
            address_reused: c(Counter::AddressReused),
            unwind_fp_fallback: c(Counter::UnwindFpFallback),
            unwind_bad_read: c(Counter::UnwindBadRead),
            unwind_depth_limit: c(Counter::UnwindDepthLimit),
            unwind_unsupported: c(Counter::UnwindUnsupported),
            unwind_no_frame_pointer: c(Counter::UnwindNoFramePointer),
            internal_calls: c(Counter::InternalCalls),
            unsampled_calls: c(Counter::UnsampledCalls),
        }
    }

    /// Allocations that happened but are not in the figures. (A return without
    /// its entry is not added: its entry was already counted as dropped, as a
    /// full PENDING map or an expired call.)
    pub fn dropped_events(&self) -> u64 {
        self.dropped_alloc_map_full
            + self.dropped_pending_map_full
            + self.dropped_site_map_full
            + self.out_pointer_read_errors
            + self.missed_returns
    }

    /// Allocations that are counted, but without their stack.
    pub fn stack_errors(&self) -> u64 {
        self.stack_read_errors + self.stack_map_full + self.stack_hash_collisions
    }
}

/// One site (distinct allocation stack) as read from the kernel. With
/// sampling, of the sampled blocks only (see `estimated`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SiteSample {
    pub stack_id: u64,
    pub outstanding_blocks: i64,
    pub outstanding_bytes: i64,
    pub alloc_calls: u64,
    pub alloc_bytes: u64,
}

impl SiteSample {
    /// The site's figures scaled back from the samples (each block taken at the
    /// site's mean size); unchanged in exact mode.
    pub fn estimated(&self, sampling: Sampling) -> SiteSample {
        let (outstanding_blocks, outstanding_bytes) =
            sampling.scale(self.outstanding_blocks, self.outstanding_bytes);
        let (calls, bytes) = sampling.scale(self.alloc_calls as i64, self.alloc_bytes as i64);
        SiteSample {
            stack_id: self.stack_id,
            outstanding_blocks,
            outstanding_bytes,
            alloc_calls: calls as u64,
            alloc_bytes: bytes as u64,
        }
    }
}

/// Calls whose return probe has not come after this long are taken as lost
/// (longjmp out of a signal handler that was inside malloc, a thread killed
/// mid-call): they are removed and counted, so PENDING cannot silt up.
const PENDING_EXPIRY_NS: u64 = 30_000_000_000;

pub struct Collector {
    pub maps: TraceMaps,
    stacks: HashMap<u64, (Vec<u64>, u32)>,
    missed_returns: u64,
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer. CLOCK_MONOTONIC is bpf_ktime_get_ns's clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Collector {
    pub fn new(maps: TraceMaps) -> Self {
        Collector {
            maps,
            stacks: HashMap::new(),
            missed_returns: 0,
        }
    }

    pub fn counters(&self) -> Result<Counters> {
        Ok(Counters::from_raw(
            &self.maps.counters()?,
            self.missed_returns,
        ))
    }

    /// Every site, one map entry each.
    pub fn sites(&self) -> Result<Vec<SiteSample>> {
        let mut out = Vec::new();
        let read = batch::for_each_entry(&self.maps.sites, |&stack_id, s| {
            out.push(SiteSample {
                stack_id,
                outstanding_blocks: s.outstanding_blocks,
                outstanding_bytes: s.outstanding_bytes,
                alloc_calls: s.alloc_calls,
                alloc_bytes: s.alloc_bytes,
            })
        })
        .context("reading SITES")?;
        log_read("SITES", &read);
        Ok(out)
    }

    /// The frames (return addresses, innermost first) of a stack; cached, since
    /// a stored stack never changes.
    pub fn stack(&mut self, stack_id: u64) -> Result<&[u64]> {
        Ok(&self.stack_entry(stack_id)?.0)
    }

    /// How the stack's walk went: `memtrace_common::STACK_*` bits.
    pub fn stack_flags(&mut self, stack_id: u64) -> Result<u32> {
        Ok(self.stack_entry(stack_id)?.1)
    }

    fn stack_entry(&mut self, stack_id: u64) -> Result<&(Vec<u64>, u32)> {
        if !self.stacks.contains_key(&stack_id) {
            let entry = if stack_id == NO_STACK {
                (Vec::new(), 0)
            } else {
                let st = self
                    .maps
                    .stacks
                    .get(&stack_id, 0)
                    .context("reading STACKS")?;
                let len = (st.len as usize).min(st.frames.len());
                (st.frames[..len].to_vec(), st.flags)
            };
            self.stacks.insert(stack_id, entry);
        }
        Ok(&self.stacks[&stack_id])
    }

    /// Removes calls in flight for too long and counts them as missed returns.
    pub fn expire_pending(&mut self, now_ns: u64) -> Result<()> {
        let mut stale = Vec::new();
        for entry in self.maps.pending.iter() {
            let (k, call) = entry.context("reading PENDING")?;
            if now_ns.saturating_sub(call.timestamp_ns) > PENDING_EXPIRY_NS {
                stale.push(k);
            }
        }
        for k in stale {
            if self.maps.pending.remove(&k).is_ok() {
                self.missed_returns += 1;
            }
        }
        Ok(())
    }

    /// Calls still in flight when tracing stopped: their returns will never be
    /// seen, so they are counted as missed.
    pub fn count_unfinished(&mut self) -> Result<()> {
        let mut n = 0;
        for (key, call) in self.maps.pending.iter().flatten() {
            log::debug!("call in flight at the end: {key:?} {call:?}");
            n += 1;
        }
        self.missed_returns += n;
        Ok(())
    }

    /// Every outstanding block, grouped by site (leak analysis: ages and which
    /// blocks outlive the run, see `analyze`): one map entry per block, streamed.
    pub fn group_blocks(
        &self,
        now_ns: u64,
        min_age_ns: u64,
        sampling: Sampling,
    ) -> Result<HashMap<u64, SiteBlocks>> {
        let mut g = BlockGrouper::new(now_ns, min_age_ns, sampling);
        let read = batch::for_each_entry(&self.maps.allocs, |_addr, a| {
            g.add(a.stack_id, a.timestamp_ns, a.size)
        })
        .context("reading ALLOCS")?;
        log_read("ALLOCS", &read);
        Ok(g.finish())
    }
}

/// One debug line per map read: what it cost (tests/it/scale.rs reads these).
fn log_read(map: &str, r: &batch::ReadStats) {
    log::debug!(
        "read {map}: {} entries, {} syscalls ({}), {:.3} ms wall, {:.3} ms cpu",
        r.entries,
        r.calls,
        if r.batched { "batch" } else { "per entry" },
        r.wall.as_secs_f64() * 1e3,
        r.cpu.as_secs_f64() * 1e3,
    );
}
