//! The maps of thread tracing (see `memtrace_common::threads` and the BPF
//! side's `threads`): the threads created while traced and not done, the
//! creations per stack, the counters.
use std::collections::HashMap;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
};
use memtrace_common::threads::{NUM_THREAD_COUNTERS, ThreadCounter, ThreadRec, map_names};

/// The thread maps, taken out of the object.
pub struct ThreadMaps {
    threads: BpfHashMap<MapData, u32, ThreadRec>,
    site_created: BpfHashMap<MapData, u64, u64>,
    counters: PerCpuArray<MapData, u64>,
}

/// The thread counters by `ThreadCounter`, summed over the CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCounters(pub [u64; NUM_THREAD_COUNTERS as usize]);

impl ThreadCounters {
    pub fn get(&self, c: ThreadCounter) -> u64 {
        self.0[c as usize]
    }
}

impl ThreadMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("BPF map {name} missing from the object"))
        };
        Ok(ThreadMaps {
            threads: BpfHashMap::try_from(take(map_names::THREADS)?)?,
            site_created: BpfHashMap::try_from(take(map_names::THREAD_SITE_CREATED)?)?,
            counters: PerCpuArray::try_from(take(map_names::THREAD_COUNTERS)?)?,
        })
    }

    /// The threads created while traced and not done (alive, or exited
    /// with their end not accounted for), by thread id. An entry removed
    /// while the map is walked may be missed or seen: read twice, the
    /// caller keeps what both reads agree on where that matters.
    pub fn threads(&self) -> Vec<(u32, ThreadRec)> {
        self.threads.iter().flatten().collect()
    }

    /// Threads created so far, by creating stack.
    pub fn site_created(&self) -> HashMap<u64, u64> {
        self.site_created.iter().flatten().collect()
    }

    pub fn counters(&self) -> Result<ThreadCounters> {
        let mut out = ThreadCounters::default();
        for (i, slot) in out.0.iter_mut().enumerate() {
            let per_cpu = self
                .counters
                .get(&(i as u32), 0)
                .context("reading THREAD_COUNTERS")?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }
}
