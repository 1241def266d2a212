//! Loading memtrace's BPF programs and attaching them to one process.
//!
//! Every probe is attached bound to the target pid (a perf event with that pid):
//! a global probe filtered in BPF would make every process on the host that
//! maps the same libc pay the uprobe trap.
use std::{num::NonZeroU32, path::Path};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    },
};
use memtrace_common::{
    AllocKind, Allocation, MAX_ALLOCATOR_FUNCTIONS, NUM_COUNTERS, PageKey, PageRows, PendingCall,
    PendingKey, SiteStats, StackTrace, TextRange, UnwindRow,
};

use crate::allocator::{Allocator, Role};

/// The BPF object built by `cargo xtask build`, embedded at compile time.
static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memtrace-ebpf.o"));

/// The kernel-side state memtrace reads. Owned apart from the programs so the
/// probes can be detached (the programs dropped) while the maps stay readable
/// for the final report.
pub struct TraceMaps {
    pub allocs: HashMap<MapData, u64, Allocation>,
    pub sites: HashMap<MapData, u64, SiteStats>,
    pub stacks: HashMap<MapData, u64, StackTrace>,
    pub pending: HashMap<MapData, PendingKey, PendingCall>,
    pub counters: PerCpuArray<MapData, u64>,
    pub allocator_text: Array<MapData, TextRange>,
    pub unwind_rows: Array<MapData, UnwindRow>,
    pub pc_pages: HashMap<MapData, PageKey, PageRows>,
    pub proc_tables: HashMap<MapData, u32, u32>,
}

impl TraceMaps {
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

    /// Tells the BPF side where the probed allocator functions are (see
    /// `allocator::text_ranges`). Must happen before the probes are attached.
    pub fn set_allocator_text(&mut self, ranges: &[(u64, u64)]) -> Result<()> {
        if ranges.len() > MAX_ALLOCATOR_FUNCTIONS as usize {
            log::warn!(
                "only the first {MAX_ALLOCATOR_FUNCTIONS} allocator functions are told apart from their callers"
            );
        }
        for (i, &(start, end)) in ranges
            .iter()
            .take(MAX_ALLOCATOR_FUNCTIONS as usize)
            .enumerate()
        {
            self.allocator_text
                .set(i as u32, TextRange { start, end }, 0)
                .context("writing ALLOCATOR_TEXT")?;
        }
        Ok(())
    }
}

pub struct Probes {
    ebpf: Option<Ebpf>,
    loader_link: Option<UProbeLinkId>,
    /// Every attached probe: (program, link).
    links: Vec<(&'static str, UProbeLinkId)>,
}

fn entry_program(role: Role) -> &'static str {
    match role {
        Role::Free => "free_enter",
        Role::Alloc(kind) => match kind {
            AllocKind::Malloc => "malloc_enter",
            AllocKind::Calloc => "calloc_enter",
            AllocKind::Realloc => "realloc_enter",
            AllocKind::ReallocArray => "reallocarray_enter",
            AllocKind::Memalign => "memalign_enter",
            AllocKind::PosixMemalign => "posix_memalign_enter",
            AllocKind::Valloc => "valloc_enter",
            AllocKind::Pvalloc => "pvalloc_enter",
        },
    }
}

const PROGRAMS: &[&str] = &[
    "malloc_enter",
    "calloc_enter",
    "realloc_enter",
    "reallocarray_enter",
    "memalign_enter",
    "posix_memalign_enter",
    "valloc_enter",
    "pvalloc_enter",
    "free_enter",
    "alloc_return",
    "loader_breakpoint",
];

/// Loads the programs for target `tgid` and returns them with their maps.
/// Capacities of the kernel maps (entries), from `--max-blocks`/`--max-stacks`.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Outstanding blocks (map ALLOCS).
    pub blocks: u32,
    /// Distinct stacks, i.e. sites (maps STACKS and SITES).
    pub stacks: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            blocks: memtrace_common::DEFAULT_MAX_OUTSTANDING,
            stacks: memtrace_common::DEFAULT_MAX_STACKS,
        }
    }
}

pub fn load(tgid: u32, sizes: MapSizes) -> Result<(Probes, TraceMaps)> {
    if BPF_OBJECT.is_empty() {
        bail!(
            "this memtrace binary was built without its BPF programs; build it with \
             `cargo xtask build` (it leaves target/release/memtrace)"
        );
    }
    let mut ebpf = EbpfLoader::new()
        .override_global("TARGET_TGID", &tgid, true)
        .map_max_entries("ALLOCS", sizes.blocks)
        .map_max_entries("STACKS", sizes.stacks)
        // One more site than stacks: the site of allocations whose stack could
        // not be stored (STACKS full) must still fit.
        .map_max_entries("SITES", sizes.stacks.saturating_add(1))
        .load(BPF_OBJECT)
        .map_err(|e| anyhow!(e))
        .context("loading the BPF maps and programs into the kernel")?;
    for name in PROGRAMS {
        let prog: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("BPF program {name} missing from the embedded object"))?
            .try_into()
            .with_context(|| format!("BPF program {name} is not a uprobe"))?;
        prog.load().map_err(|e| anyhow!(e)).with_context(|| {
            format!("the kernel refused BPF program {name} (verifier or permissions)")
        })?;
    }
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .with_context(|| format!("BPF map {name} missing from the object"))
    };
    let maps = TraceMaps {
        allocs: HashMap::try_from(take("ALLOCS")?)?,
        sites: HashMap::try_from(take("SITES")?)?,
        stacks: HashMap::try_from(take("STACKS")?)?,
        pending: HashMap::try_from(take("PENDING")?)?,
        counters: PerCpuArray::try_from(take("COUNTERS")?)?,
        allocator_text: Array::try_from(take("ALLOCATOR_TEXT")?)?,
        unwind_rows: Array::try_from(take("UNWIND_ROWS")?)?,
        pc_pages: HashMap::try_from(take("PC_PAGES")?)?,
        proc_tables: HashMap::try_from(take("PROC_TABLES")?)?,
    };
    Ok((
        Probes {
            ebpf: Some(ebpf),
            loader_link: None,
            links: Vec::new(),
        },
        maps,
    ))
}

impl Probes {
    fn program(&mut self, name: &str) -> Result<&mut UProbe> {
        let ebpf = self.ebpf.as_mut().context("probes already detached")?;
        Ok(ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    fn attach_one(
        &mut self,
        prog: &'static str,
        path: &Path,
        offset: u64,
        pid: u32,
    ) -> Result<UProbeLinkId> {
        let pid = NonZeroU32::new(pid).context("pid 0")?;
        let link = self
            .program(prog)?
            .attach(
                UProbeAttachLocation::AbsoluteOffset(offset),
                path,
                UProbeScope::OneProcess(pid),
            )
            .map_err(|e| anyhow!(e))?;
        Ok(link)
    }

    /// Entry probes on every allocator function, a return probe on each one that
    /// allocates, bound to `pid`. Returns the number of probes attached.
    pub fn attach_allocator(&mut self, alloc: &Allocator, pid: u32) -> Result<usize> {
        let before = self.links.len();
        for point in &alloc.points {
            let what = || {
                format!(
                    "attaching a uprobe to {}:{}",
                    alloc.module,
                    point.names.join("/")
                )
            };
            let prog = entry_program(point.role);
            // At `probe_offset` (the first instruction the kernel emulates, see
            // `placement`), both probes see what they would at the function's
            // first instruction: the arguments, and rsp pointing at the return
            // address, which the return probe replaces.
            log::debug!(
                "probing {}:{} at file offset {:#x} (function at {:#x})",
                alloc.module,
                point.probe_site(),
                point.probe_offset,
                point.file_offset
            );
            let link = self
                .attach_one(prog, &alloc.open_path, point.probe_offset, pid)
                .with_context(what)?;
            self.links.push((prog, link));
            if matches!(point.role, Role::Alloc(_)) {
                let link = self
                    .attach_one("alloc_return", &alloc.open_path, point.probe_offset, pid)
                    .with_context(what)?;
                self.links.push(("alloc_return", link));
            }
        }
        Ok(self.links.len() - before)
    }

    /// Launch mode: stop the child in the dynamic loader once its libraries are mapped.
    pub fn attach_loader_breakpoint(&mut self, ldso: &Path, offset: u64, pid: u32) -> Result<()> {
        let link = self
            .attach_one("loader_breakpoint", ldso, offset, pid)
            .with_context(|| format!("attaching a uprobe to {}:_dl_debug_state", ldso.display()))?;
        self.loader_link = Some(link);
        Ok(())
    }

    pub fn detach_loader_breakpoint(&mut self) -> Result<()> {
        if let Some(link) = self.loader_link.take() {
            self.program("loader_breakpoint")?.detach(link)?;
        }
        Ok(())
    }

    /// Removes every probe from the target. The maps stay readable.
    ///
    /// Removing a uprobe waits for the kernel to quiesce (about 0.1 s per probe
    /// on the development VM, 1.7 s for 17 probes). Each link is closed from a
    /// thread of its own in case the kernel lets the waits overlap; on 6.18 they
    /// still run one after the other. Fewer links (uprobe_multi) is the real fix.
    pub fn detach_all(&mut self) {
        let mut owned = Vec::new();
        for (prog, id) in std::mem::take(&mut self.links) {
            if let Ok(link) = self.program(prog).and_then(|p| Ok(p.take_link(id)?)) {
                owned.push(link);
            }
        }
        let t = std::time::Instant::now();
        let n = owned.len();
        std::thread::scope(|s| {
            for link in owned {
                s.spawn(move || drop(link));
            }
        });
        self.ebpf = None;
        log::debug!("{n} probes detached in {:?}", t.elapsed());
        self.loader_link = None;
    }
}
