//! Reading the kernel-side state: counters, per-site aggregates, stacks, and
//! (for the final report) the outstanding blocks themselves.
// Keyed by stack ids: a fast hasher (SipHash showed in profiles at 10,000 sites).
use rustc_hash::FxHashMap as HashMap;

use anyhow::{Context, Result};
use memtrace_common::{
    CounterValues, EPOCH_TIME_SHIFT, Epoch, NO_STACK, NUM_COUNTERS, SiteKey, SiteStats, map_names,
};

use crate::{kernel::batch, kernel::maps::TraceMaps, kernel::sampling::Sampling};

/// Every counter: the kernel's (`CounterValues`, one field per `Counter`,
/// named as in the report) and the one userspace keeps itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// The kernel's counters, summed over the CPUs.
    pub kernel: CounterValues,
    /// Calls whose return never came: expired from `PENDING`, or still there
    /// when tracing ended.
    pub missed_returns: u64,
}

/// The kernel's counters are read as fields of `Counters` itself
/// (`counters.alloc_calls`), beside `missed_returns`.
impl std::ops::Deref for Counters {
    type Target = CounterValues;

    fn deref(&self) -> &CounterValues {
        &self.kernel
    }
}

impl Counters {
    pub fn from_raw(raw: &[u64; NUM_COUNTERS as usize], missed_returns: u64) -> Self {
        Counters {
            kernel: CounterValues::from_raw(raw),
            missed_returns,
        }
    }

    /// Allocations that happened but are not in the figures. (A return without
    /// its entry is not added: its entry was already counted as dropped, as a
    /// full PENDING map or an expired call.)
    pub fn dropped_events(&self) -> u64 {
        self.alloc_map_full
            + self.pending_map_full
            + self.site_map_full
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
    /// Allocations not recorded: the block table was full (of the sampled
    /// ones, with sampling: not scaled).
    pub dropped_blocks: u64,
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
            dropped_blocks: self.dropped_blocks,
        }
    }
}

/// Calls whose return probe has not come after this long are taken as lost
/// (longjmp out of a signal handler that was inside malloc, a thread killed
/// mid-call): they are removed and counted, so PENDING cannot silt up.
const PENDING_EXPIRY_NS: u64 = 30_000_000_000;

/// One site's blocks born in one epoch, as the kernel aggregates them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochBlocks {
    pub stack_id: u64,
    pub epoch: u32,
    pub blocks: u64,
    pub bytes: u64,
    /// Sum of the blocks' birth offsets in the epoch (2^EPOCH_TIME_SHIFT ns units).
    pub birth_sum: u64,
}

/// A stack as read from STACKS: its native frames (return addresses), its
/// Python frames (two words each), its `STACK_*` flags and code generation.
#[derive(Default)]
struct StoredStack {
    native: Vec<u64>,
    python: Vec<u64>,
    flags: u32,
    /// The code generation it was taken in.
    generation: u64,
}

pub struct Collector {
    pub maps: TraceMaps,
    /// Stacks read: frames, `STACK_*` flags, code generation.
    stacks: HashMap<u64, StoredStack>,
    missed_returns: u64,
    /// Start (CLOCK_MONOTONIC ns) of each birth epoch, by id.
    epoch_starts: Vec<u64>,
    /// Calls, bytes and dropped blocks of the kernel aggregates removed by
    /// `new_epoch` (they held no block any more), by site.
    retired: HashMap<u64, (u64, u64, u64)>,
    /// The aggregates as of the last `sites()`, with blocks.
    epoch_blocks: Vec<EpochBlocks>,
    /// The aggregates of the last `sites()` that held nothing, as read.
    empty: Vec<(SiteKey, SiteStats)>,
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
        let start = maps.epoch.get(&0, 0).map(|e| e.start_ns).unwrap_or(0);
        Collector {
            maps,
            stacks: HashMap::default(),
            missed_returns: 0,
            epoch_starts: vec![start],
            retired: HashMap::default(),
            epoch_blocks: Vec::new(),
            empty: Vec::new(),
        }
    }

    /// Starts a new birth epoch at `now_ns` (at every history sample, so that
    /// "born by sample j" is exact), and removes the aggregates of epochs before
    /// the previous one that held no block at the last `sites()`: no block can
    /// join them any more (a block joins the epoch current at its birth).
    pub fn new_epoch(&mut self, now_ns: u64) -> Result<()> {
        let id = self.epoch_starts.len() as u32;
        self.maps
            .epoch
            .set(
                0,
                Epoch {
                    id,
                    _pad: 0,
                    start_ns: now_ns,
                },
                0,
            )
            .context("writing EPOCH")?;
        self.epoch_starts.push(now_ns);
        let mut removed = 0;
        for (key, v) in std::mem::take(&mut self.empty) {
            // An aggregate of epoch id-2 or before was final when read: blocks
            // join only the epoch current at their birth, and it had none left.
            if key.epoch + 2 > id || self.maps.sites.remove(&key).is_err() {
                continue;
            }
            let r = self.retired.entry(key.stack_id).or_default();
            r.0 += v.alloc_calls;
            r.1 += v.alloc_bytes;
            r.2 += v.dropped_blocks;
            removed += 1;
        }
        log::debug!("epoch {id} began; {removed} empty aggregates of past epochs removed");
        Ok(())
    }

    pub fn counters(&self) -> Result<Counters> {
        Ok(Counters::from_raw(
            &self.maps.counters()?,
            self.missed_returns,
        ))
    }

    /// Every site: its aggregates (one per birth epoch that holds blocks) added
    /// up. Keeps the aggregates for `epoch_ages`.
    pub fn sites(&mut self) -> Result<Vec<SiteSample>> {
        let mut by_site: HashMap<u64, SiteSample> = HashMap::default();
        for (&stack_id, &(calls, bytes, dropped)) in &self.retired {
            let s = by_site.entry(stack_id).or_default();
            s.alloc_calls += calls;
            s.alloc_bytes += bytes;
            s.dropped_blocks += dropped;
        }
        self.epoch_blocks.clear();
        self.empty.clear();
        let (epoch_blocks, empty) = (&mut self.epoch_blocks, &mut self.empty);
        let read = batch::for_each_entry(&self.maps.sites, |key, v| {
            let s = by_site.entry(key.stack_id).or_default();
            s.outstanding_blocks += v.outstanding_blocks;
            s.outstanding_bytes += v.outstanding_bytes;
            s.alloc_calls += v.alloc_calls;
            s.alloc_bytes += v.alloc_bytes;
            s.dropped_blocks += v.dropped_blocks;
            if v.outstanding_blocks > 0 {
                epoch_blocks.push(EpochBlocks {
                    stack_id: key.stack_id,
                    epoch: key.epoch,
                    blocks: v.outstanding_blocks as u64,
                    bytes: v.outstanding_bytes.max(0) as u64,
                    birth_sum: v.birth_sum,
                });
            } else {
                empty.push((*key, *v));
            }
        })
        .context("reading SITES")?;
        log_read(map_names::SITES, &read);
        let mut out: Vec<SiteSample> = by_site
            .into_iter()
            .map(|(stack_id, s)| SiteSample { stack_id, ..s })
            .collect();
        out.sort_unstable_by_key(|s| s.stack_id);
        Ok(out)
    }

    /// The outstanding blocks of the aggregates read by the last `sites()`, as
    /// `(stack id, birth, blocks, bytes)`: each epoch's blocks taken as born at
    /// their mean birth time (never after `now_ns`). One step per aggregate,
    /// however many blocks there are.
    pub fn for_each_epoch_group(&self, now_ns: u64, mut f: impl FnMut(u64, u64, u64, u64)) {
        for e in &self.epoch_blocks {
            let start = self
                .epoch_starts
                .get(e.epoch as usize)
                .copied()
                .unwrap_or(0);
            let birth = mean_birth(start, e.birth_sum, e.blocks).min(now_ns);
            f(e.stack_id, birth, e.blocks, e.bytes);
        }
    }

    /// The frames (return addresses, innermost first) of a stack; cached, since
    /// a stored stack never changes.
    pub fn stack(&mut self, stack_id: u64) -> Result<&[u64]> {
        Ok(&self.stack_entry(stack_id)?.native)
    }

    /// Reads ahead, at most `max` of them, the stacks not read yet among `ids`,
    /// so that the final report does not read every site's stack at once (one
    /// syscall each: at ten thousand sites, tens of milliseconds). Returns the
    /// ids it read.
    pub fn read_ahead_stacks(
        &mut self,
        ids: impl IntoIterator<Item = u64>,
        max: usize,
    ) -> Result<Vec<u64>> {
        let mut read = Vec::new();
        for id in ids {
            if read.len() >= max {
                break;
            }
            if !self.stacks.contains_key(&id) {
                self.stack_entry(id)?;
                read.push(id);
            }
        }
        Ok(read)
    }

    /// How the stack's walk went: `memtrace_common::STACK_*` bits.
    pub fn stack_flags(&mut self, stack_id: u64) -> Result<u32> {
        Ok(self.stack_entry(stack_id)?.flags)
    }

    /// The code generation the stack was taken in: its frames are in the
    /// code mapped then (see `process::modules::ProcessModules::module_at`).
    pub fn stack_generation(&mut self, stack_id: u64) -> Result<u64> {
        Ok(self.stack_entry(stack_id)?.generation)
    }

    /// The Python frames of a stack, innermost first: two words each (see
    /// `memtrace_common::PythonLayout`); empty for a stack without any.
    pub fn python_frames(&mut self, stack_id: u64) -> Result<&[u64]> {
        Ok(&self.stack_entry(stack_id)?.python)
    }

    fn stack_entry(&mut self, stack_id: u64) -> Result<&StoredStack> {
        match self.stacks.entry(stack_id) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let entry = if stack_id == NO_STACK {
                    StoredStack::default()
                } else {
                    let st = self
                        .maps
                        .stacks
                        .get(&stack_id, 0)
                        .context("reading STACKS")?;
                    let len = (st.len as usize).min(st.frames.len());
                    let native = st.native_len();
                    StoredStack {
                        native: st.frames[..native].to_vec(),
                        python: st.frames[native..len].to_vec(),
                        flags: st.flags,
                        generation: st.generation,
                    }
                };
                Ok(e.insert(entry))
            }
        }
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

    /// Every outstanding block as `(stack id, birth, size)`: one map entry per
    /// block, streamed.
    pub fn for_each_block(&self, mut f: impl FnMut(u64, u64, u64)) -> Result<()> {
        let read = self
            .maps
            .allocs
            .for_each(|_addr, a| f(a.stack_id, a.timestamp_ns, a.size))
            .context("reading ALLOCS")?;
        log_read(map_names::ALLOCS, &read);
        Ok(())
    }
}

/// Mean birth time of `blocks` blocks of an epoch that began at `start_ns`,
/// whose birth offsets add up to `birth_sum`.
pub fn mean_birth(start_ns: u64, birth_sum: u64, blocks: u64) -> u64 {
    if blocks == 0 {
        return start_ns;
    }
    let offset = ((birth_sum as u128) << EPOCH_TIME_SHIFT) / blocks as u128;
    start_ns.saturating_add(offset.min(u64::MAX as u128) as u64)
}

/// One debug line per map read: what it cost (tests/it/scale.rs reads these).
fn log_read(map: &str, r: &batch::ReadStats) {
    log::debug!(
        "read {map}: {} entries, {} syscalls ({}), {:.3} ms wall, {:.3} ms cpu",
        r.entries,
        r.calls,
        r.how,
        r.wall.as_secs_f64() * 1e3,
        r.cpu.as_secs_f64() * 1e3,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_birth_of_an_epoch() {
        let unit = 1u64 << EPOCH_TIME_SHIFT;
        assert_eq!(mean_birth(1000, 0, 0), 1000, "no blocks: the epoch's start");
        assert_eq!(mean_birth(1000, 0, 5), 1000);
        // Offsets 1, 2 and 6 units: mean 3 units.
        assert_eq!(mean_birth(1000, 9, 3), 1000 + 3 * unit);
        // A sum beyond 64 bits once shifted still divides right.
        let n = 1u64 << 27;
        let sum = (u32::MAX as u64) * n;
        assert_eq!(mean_birth(0, sum, n), (u32::MAX as u64) << EPOCH_TIME_SHIFT);
        assert_eq!(mean_birth(u64::MAX - 1, sum, n), u64::MAX, "saturates");
    }
}
