//! The maps of fd tracing (see `memtrace_common::resources` and the BPF
//! side's `resources`): the table of traced fds by number, mapped into
//! memtrace for as long as it traces; the creations per site; the counters.
use std::collections::HashMap;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, IterableMap, MapData, PerCpuArray},
};
use memtrace_common::resources::{
    DEFAULT_FD_SLOTS, FdCounter, FdSiteKey, FdSlot, MAX_FD_SLOTS, NUM_FD_COUNTERS, map_names,
};

use super::blocks::Mapping;

/// One traced fd as the slot table holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracedFd {
    pub fd: u32,
    pub slot: FdSlot,
}

/// The fd maps, taken out of the object.
pub struct FdMaps {
    slots: Array<MapData, FdSlot>,
    site_created: BpfHashMap<MapData, FdSiteKey, u64>,
    counters: PerCpuArray<MapData, u64>,
}

/// The fd counters by `FdCounter`, summed over the CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdCounters(pub [u64; NUM_FD_COUNTERS as usize]);

impl FdCounters {
    pub fn get(&self, c: FdCounter) -> u64 {
        self.0[c as usize]
    }
}

/// Slots for a target allowed `soft`/`hard` open files (RLIMIT_NOFILE):
/// every fd it may open now, and up to 65,536 if it may raise its limit
/// (at 32 bytes a slot); fds beyond are counted, not tracked.
pub fn slot_count(limits: Option<(u64, u64)>) -> u32 {
    let Some((soft, hard)) = limits else {
        return DEFAULT_FD_SLOTS;
    };
    let n = soft.max(hard.min(DEFAULT_FD_SLOTS as u64));
    // A multiple of 128 slots: whole pages, for the mapping.
    (n.clamp(1024, MAX_FD_SLOTS as u64) as u32).next_multiple_of(128)
}

impl FdMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("BPF map {name} missing from the object"))
        };
        Ok(FdMaps {
            slots: Array::try_from(take(map_names::FD_SLOTS)?)?,
            site_created: BpfHashMap::try_from(take(map_names::FD_SITE_CREATED)?)?,
            counters: PerCpuArray::try_from(take(map_names::FD_COUNTERS)?)?,
        })
    }

    /// Slots of the table: fds numbered from here on are not tracked.
    pub fn capacity(&self) -> u32 {
        self.slots.len()
    }

    /// Every traced fd open now. The BPF side writes a slot's `born_ns`
    /// last and clears it first, so a slot is read as `born_ns`, the slot,
    /// `born_ns` again: one that changed meanwhile is left out, as if read
    /// a moment later.
    pub fn open_fds(&self) -> Result<Vec<TracedFd>> {
        let n = self.capacity() as usize;
        let map = Mapping::<FdSlot>::new(self.slots.map(), 0, n).context("mapping FD_SLOTS")?;
        let base = map.ptr.as_ptr();
        let mut out = Vec::new();
        for fd in 0..n {
            // SAFETY: fd < n entries of the mapping, alive for this loop; the kernel writes the
            // slots concurrently, so each field is read volatile.
            let (born, slot, again) = unsafe {
                let p = base.add(fd);
                let born = (&raw const (*p).born_ns).read_volatile();
                if born == 0 {
                    continue;
                }
                let slot = p.read_volatile();
                (born, slot, (&raw const (*p).born_ns).read_volatile())
            };
            if born == again && slot.born_ns == born {
                out.push(TracedFd {
                    fd: fd as u32,
                    slot,
                });
            }
        }
        Ok(out)
    }

    /// fds created so far, by (stack id, origin).
    pub fn site_created(&self) -> HashMap<(u64, u16), u64> {
        self.site_created
            .iter()
            .flatten()
            .map(|(k, v)| ((k.stack_id, k.origin), v))
            .collect()
    }

    pub fn counters(&self) -> Result<FdCounters> {
        let mut out = FdCounters::default();
        for (i, slot) in out.0.iter_mut().enumerate() {
            let per_cpu = self
                .counters
                .get(&(i as u32), 0)
                .context("reading FD_COUNTERS")?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cover_the_limit_the_target_may_reach() {
        assert_eq!(slot_count(None), DEFAULT_FD_SLOTS);
        assert_eq!(slot_count(Some((1024, 4096))), 4096);
        assert_eq!(slot_count(Some((1024, 1 << 20))), 1 << 16);
        assert_eq!(slot_count(Some((1 << 20, 1 << 20))), 1 << 20);
        assert_eq!(slot_count(Some((8, 8))), 1024);
        assert_eq!(slot_count(Some((1000, 1000))), 1024);
        assert_eq!(slot_count(Some((u64::MAX, u64::MAX))), MAX_FD_SLOTS);
    }
}
