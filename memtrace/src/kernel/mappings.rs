//! The maps of mapping tracing (see `memtrace_common::mappings` and the BPF
//! side's `mappings`): the ring buffer of mmap/munmap/mremap events and
//! their counters.
use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use memtrace_common::mappings::{MapCounter, MapEvent, NUM_MAP_COUNTERS, map_names};

/// The mapping maps, taken out of the object.
pub struct MapMaps {
    events: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
}

/// The mapping counters by `MapCounter`, summed over the CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapCounters(pub [u64; NUM_MAP_COUNTERS as usize]);

impl MapCounters {
    pub fn get(&self, c: MapCounter) -> u64 {
        self.0[c as usize]
    }
}

impl MapMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("BPF map {name} missing from the object"))
        };
        Ok(MapMaps {
            events: RingBuf::try_from(take(map_names::MAP_EVENTS)?)?,
            counters: PerCpuArray::try_from(take(map_names::MAP_COUNTERS)?)?,
        })
    }

    /// Every event sent since the last call, oldest first.
    pub fn events(&mut self) -> Vec<MapEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= size_of::<MapEvent>() {
                // SAFETY: the BPF side sends whole MapEvents, plain integers (every bit pattern
                // valid); the ring buffer's bytes are not necessarily aligned for it.
                out.push(unsafe { item.as_ptr().cast::<MapEvent>().read_unaligned() });
            }
        }
        out
    }

    /// Events lost so far (one counter: read every interval).
    pub fn lost(&self) -> Result<u64> {
        let per_cpu = self
            .counters
            .get(&(MapCounter::Lost as u32), 0)
            .context("reading MAP_COUNTERS")?;
        Ok(per_cpu.iter().sum())
    }

    pub fn counters(&self) -> Result<MapCounters> {
        let mut out = MapCounters::default();
        for (i, slot) in out.0.iter_mut().enumerate() {
            let per_cpu = self
                .counters
                .get(&(i as u32), 0)
                .context("reading MAP_COUNTERS")?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }
}
