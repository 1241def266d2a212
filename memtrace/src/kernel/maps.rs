//! The maps memtrace reads and writes from userspace, and their sizes.
use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, Queue, RingBuf};
use memtrace_common::{
    AllocBucket, AllocKeys, CallMarkState, CallMarks, CodeState, CodeUnmap, Epoch,
    MAX_ALLOCATOR_FUNCTIONS, NUM_COUNTERS, PageKey, PageRows, PendingCall, PendingKey, PythonCode,
    PythonCodeCopy, PythonLayout, SiteKey, SiteStats, StackTrace, TextRange, TraceState, UnwindRow,
};

use super::blocks::BlockTable;

/// The kernel-side state memtrace reads. Owned apart from the programs so the
/// probes can be detached (the programs dropped) while the maps stay readable
/// for the final report.
pub struct TraceMaps {
    pub allocs: BlockTable,
    pub sites: HashMap<MapData, SiteKey, SiteStats>,
    pub epoch: Array<MapData, Epoch>,
    pub stacks: HashMap<MapData, u64, StackTrace>,
    pub pending: HashMap<MapData, PendingKey, PendingCall>,
    pub counters: PerCpuArray<MapData, u64>,
    pub allocator_text: Array<MapData, TextRange>,
    pub allocator_hull: Array<MapData, TextRange>,
    pub unwind_rows: Array<MapData, UnwindRow>,
    pub pc_pages: HashMap<MapData, PageKey, PageRows>,
    pub proc_tables: HashMap<MapData, u32, u32>,
    pub sample_log2: Array<MapData, u32>,
    /// Bumped after every change to the unwind tables (see `bump_tables_generation`).
    pub tables_generation: Array<MapData, u64>,
    pub call_mark_state: Array<MapData, CallMarkState>,
    /// The code generation (see `memtrace_common::CodeState`).
    pub code_state: Array<MapData, CodeState>,
    /// Code unmapped while traced, by generation (see `unmaps`).
    pub code_unmap_log: Array<MapData, CodeUnmap>,
    pub trace_state: Array<MapData, TraceState>,
    /// `--follow-forks`: the target's new children not yet taken (see
    /// `stopped_children`).
    pub fork_children: HashMap<MapData, u32, u32>,
    /// How the BPF side reads the target's Python frames (see `set_python`).
    pub python_layout: Array<MapData, PythonLayout>,
    /// Code objects the BPF side saw for the first time.
    pub python_new_codes: Queue<MapData, PythonCode>,
    /// Copies of code objects the BPF side saw for the first time.
    pub python_code_copies: RingBuf<MapData>,
    /// The fd maps (see `resources`).
    pub fds: super::resources::FdMaps,
    /// The thread maps (see `threads`).
    pub threads: super::threads::ThreadMaps,
    /// The mapping maps (see `mappings`).
    pub mappings: super::mappings::MapMaps,
}

impl TraceMaps {
    /// Ends tracing: from now on every program returns at once, whatever the
    /// target does while its probes are being removed.
    pub fn end_tracing(&mut self) -> Result<()> {
        let mut st = self.trace_state.get(&0, 0).unwrap_or_default();
        st.ended = 1;
        self.trace_state
            .set(0, st, 0)
            .context("writing TRACE_STATE")
    }

    /// Asks the BPF side to stop the target (SIGSTOP) at its exec, before
    /// the new program runs (see `TraceState::stop_at_exec`).
    pub fn stop_at_exec(&mut self) -> Result<()> {
        let mut st = self.trace_state.get(&0, 0).unwrap_or_default();
        st.stop_at_exec = 1;
        self.trace_state
            .set(0, st, 0)
            .context("writing TRACE_STATE")
    }

    /// `--follow-forks`: asks the BPF side to stop each process the target
    /// creates before it runs, and to list it in `FORK_CHILDREN`.
    pub fn follow_forks(&mut self) -> Result<()> {
        let mut st = self.trace_state.get(&0, 0).unwrap_or_default();
        st.follow_forks = 1;
        self.trace_state
            .set(0, st, 0)
            .context("writing TRACE_STATE")
    }

    /// The target's new children the BPF side stopped (or is stopping: the
    /// SIGSTOP is pending until the child returns to user space), and those
    /// created that have not run yet.
    pub fn fork_children(&self) -> (Vec<u32>, Vec<u32>) {
        let (mut stopped, mut born) = (Vec::new(), Vec::new());
        for (pid, state) in self.fork_children.iter().flatten() {
            if state == memtrace_common::FORK_CHILD_STOPPED {
                stopped.push(pid);
            } else {
                born.push(pid);
            }
        }
        (stopped, born)
    }

    /// Takes a child out of `FORK_CHILDREN` (attached to, or given up).
    pub fn forget_child(&mut self, pid: u32) {
        let _ = self.fork_children.remove(&pid);
    }

    /// When the target called exec (CLOCK_MONOTONIC ns), if it did.
    pub fn exec_seen(&self) -> Option<u64> {
        let st = self.trace_state.get(&0, 0).ok()?;
        (st.exec_seen != 0).then_some(st.exec_ns)
    }

    /// The processes the target created while traced: how many, and the
    /// first pids.
    pub fn forks(&self) -> (u64, Vec<u32>) {
        let st = self.trace_state.get(&0, 0).unwrap_or_default();
        let kept = (st.forks as usize).min(st.fork_pids.len());
        (
            st.forks,
            st.fork_pids[..kept]
                .iter()
                .copied()
                .filter(|&p| p != 0)
                .collect(),
        )
    }

    /// Tells the BPF walker that the unwind tables changed: the walks it
    /// remembers (by registers and the stack words they read) are stale.
    pub fn bump_tables_generation(&mut self) -> Result<()> {
        let g = self.tables_generation.get(&0, 0).unwrap_or(0);
        self.tables_generation
            .set(0, g.wrapping_add(1), 0)
            .context("writing TABLES_GENERATION")
    }

    /// Tells the BPF side how to read the target's Python frames (the
    /// layout of its interpreter), before the probes see any allocation.
    pub fn set_python(&mut self, layout: PythonLayout) -> Result<()> {
        self.python_layout
            .set(0, layout, 0)
            .context("writing PYTHON_LAYOUT")
    }

    /// The code objects the BPF side saw since the last call: (address,
    /// check), each once.
    pub fn new_python_codes(&mut self) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        while let Ok(c) = self.python_new_codes.pop(0) {
            out.push((c.code, c.check as u32));
        }
        out
    }

    /// The copies of code objects the BPF side made since the last call.
    pub fn python_code_copies(&mut self) -> Vec<PythonCodeCopy> {
        let mut out = Vec::new();
        while let Some(item) = self.python_code_copies.next() {
            if item.len() >= std::mem::size_of::<PythonCodeCopy>() {
                // SAFETY: the BPF side writes whole PythonCodeCopy records (checked: long
                // enough), a #[repr(C)] struct of integers, valid for any bytes; read
                // unaligned from the ring's memory.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        out
    }

    /// Sum over CPUs of every counter, indexed by `memtrace_common::Counter`.
    pub fn counters(&self) -> Result<[u64; NUM_COUNTERS as usize]> {
        let mut out = [0u64; NUM_COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self
                .counters
                .get(&(i as u32), 0)
                .context("reading counters")?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// How the BPF side tells the allocator's own calls from users' (see
    /// `memtrace_common::CallMarks`): by the probes on its call
    /// sites, or by return address. Set before the probes are attached.
    ///
    /// `tail_kinds`: see `CallMarkState::tail_kinds`.
    pub fn set_call_marks(&mut self, by_site: bool, tail_kinds: u64) -> Result<()> {
        let mode = if by_site {
            CallMarks::BySite
        } else {
            CallMarks::BySp
        };
        self.call_mark_state
            .set(
                0,
                CallMarkState {
                    mode: mode.into(),
                    in_flight: 0,
                    pending: 0,
                    tail_kinds,
                },
                0,
            )
            .context("writing CALL_MARK_STATE")
    }

    /// Tells the BPF side where the probed allocator functions are (see
    /// `allocator::text_ranges`). Must happen before the probes are attached.
    pub fn set_allocator_text(&mut self, ranges: &[(u64, u64)]) -> Result<()> {
        if ranges.len() > MAX_ALLOCATOR_FUNCTIONS as usize {
            log::warn!(
                "only the first {MAX_ALLOCATOR_FUNCTIONS} allocator functions are told apart from their callers"
            );
        }
        // Sorted, then padded: the BPF side searches every slot.
        let mut sorted: Vec<(u64, u64)> = ranges
            .iter()
            .copied()
            .take(MAX_ALLOCATOR_FUNCTIONS as usize)
            .collect();
        sorted.sort_unstable();
        for i in 0..MAX_ALLOCATOR_FUNCTIONS {
            let range = match sorted.get(i as usize) {
                Some(&(start, end)) => TextRange { start, end },
                None => TextRange::UNUSED,
            };
            self.allocator_text
                .set(i, range, 0)
                .context("writing ALLOCATOR_TEXT")?;
        }
        let kept = &ranges[..ranges.len().min(MAX_ALLOCATOR_FUNCTIONS as usize)];
        let hull = match (
            kept.iter().map(|r| r.0).min(),
            kept.iter().map(|r| r.1).max(),
        ) {
            (Some(start), Some(end)) => TextRange { start, end },
            _ => TextRange { start: 0, end: 0 },
        };
        self.allocator_hull
            .set(0, hull, 0)
            .context("writing ALLOCATOR_HULL")?;
        Ok(())
    }
}

/// Capacities of the kernel maps (entries), from `--max-blocks`/`--max-stacks`.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Outstanding blocks (the block table ALLOC_KEYS/ALLOCS).
    pub blocks: u32,
    /// Distinct stacks, i.e. sites (maps STACKS and SITES).
    pub stacks: u32,
}

impl MapSizes {
    /// Buckets of the block table (ALLOC_KEYS and ALLOCS): room for `blocks`.
    pub fn block_buckets(&self) -> u32 {
        memtrace_common::alloc_buckets(self.blocks)
    }

    /// Kernel memory the two large maps take at load: the block table, and
    /// the hash buckets of SITES (16 bytes each, a power of two of them).
    pub fn kernel_bytes_at_start(&self) -> u64 {
        let bucket = (size_of::<AllocKeys>() + size_of::<AllocBucket>()) as u64;
        let table = self.block_buckets() as u64 * bucket;
        let sites = (self.site_entries() as u64).next_power_of_two() * 16;
        table + sites
    }

    /// Entries of SITES: one per site and birth epoch that holds blocks. There
    /// are never more of those than blocks, and in practice far fewer: room for
    /// half as many aggregates as blocks, or 4 per site, whichever is more (a
    /// power of two at the defaults: the kernel allocates 16 bytes of hash
    /// buckets per entry, rounded up to one, at load). A full map is counted
    /// (`drops.site_map_full`).
    pub fn site_entries(&self) -> u32 {
        (self.blocks / 2)
            .max(self.stacks.saturating_mul(4))
            .max(self.stacks.saturating_add(1))
            .min(1 << 28)
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            blocks: memtrace_common::DEFAULT_MAX_OUTSTANDING,
            stacks: memtrace_common::DEFAULT_MAX_STACKS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MapSizes;

    #[test]
    fn site_map_capacity() {
        // Defaults: half the blocks, a power of two.
        assert_eq!(MapSizes::default().site_entries(), 1 << 19);
        let m = |blocks, stacks| MapSizes { blocks, stacks }.site_entries();
        assert_eq!(m(1000, 1000), 4000, "at least 4 aggregates per stack");
        assert_eq!(m(1, 1), 4);
        assert_eq!(m(1 << 27, 1 << 22), 1 << 26);
        assert_eq!(m(u32::MAX, u32::MAX), 1 << 28);
    }
}
