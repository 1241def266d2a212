//! Loading memtrace's BPF programs and attaching them to one process.
//!
//! Every probe is attached bound to the target pid (a perf event with that pid):
//! a global probe filtered in BPF would make every process on the host that
//! maps the same libc pay the uprobe trap.
//!
//! Where the kernel has them (6.12+), the allocating functions get one uprobe
//! session and free one uprobe_multi link ([`multi`]): a call whose return value
//! is not needed pays no return probe, and detaching is one kernel wait per
//! link instead of one per probe. Elsewhere, or with `MEMTRACE_PROBES=classic`,
//! each function gets an entry probe and, if it allocates, a return probe.
use std::{
    num::NonZeroU32,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

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
    AllocBucket, AllocKeys, AllocKind, CALL_MARKS_BY_SITE, CALL_MARKS_BY_SP, CallMarkState, Epoch,
    MAX_ALLOCATOR_FUNCTIONS, NUM_COUNTERS, PageKey, PageRows, PendingCall, PendingKey, SiteKey,
    SiteStats, StackTrace, TextRange, UnwindRow,
};

use crate::{
    allocator::{self, Allocator, AttachPoint, Role},
    blocks::BlockTable,
    multi,
    procmaps::MapEntry,
    sampling,
};

/// The BPF object built by `cargo xtask build`, embedded at compile time.
static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memtrace-ebpf.o"));

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
}

impl TraceMaps {
    /// Tells the BPF walker that the unwind tables changed: the walks it
    /// remembers (by registers and the stack words they read) are stale.
    pub fn bump_tables_generation(&mut self) -> Result<()> {
        let g = self.tables_generation.get(&0, 0).unwrap_or(0);
        self.tables_generation
            .set(0, g.wrapping_add(1), 0)
            .context("writing TABLES_GENERATION")
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
    /// `memtrace_common::CALL_MARKS_BY_SITE`): by the probes on its call
    /// sites, or by return address. Set before the probes are attached.
    ///
    /// `tail_kinds`: see `CallMarkState::tail_kinds`.
    fn set_call_marks(&mut self, by_site: bool, tail_kinds: u64) -> Result<()> {
        let mode = if by_site {
            CALL_MARKS_BY_SITE
        } else {
            CALL_MARKS_BY_SP
        };
        self.call_mark_state
            .set(
                0,
                CallMarkState {
                    mode,
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
        for (i, &(start, end)) in ranges
            .iter()
            .take(MAX_ALLOCATOR_FUNCTIONS as usize)
            .enumerate()
        {
            self.allocator_text
                .set(i as u32, TextRange { start, end }, 0)
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

/// The allocator's own calls into its probed functions, if they are all known
/// and every one made through a GOT slot reaches the probed function in `pid`:
/// then marks at those calls tell the BPF side which entries are the
/// allocator's own. Else None (logged): it looks at each entry's return address.
fn marked_calls(
    alloc: &Allocator,
    pid: u32,
    maps: &[MapEntry],
) -> Option<Vec<allocator::InternalCall>> {
    use std::os::unix::fs::FileExt;
    if std::env::var_os("MEMTRACE_OWN_CALLS").is_some_and(|v| v == "return-address") {
        log::info!(
            "telling the allocator's own calls by their return address (MEMTRACE_OWN_CALLS)"
        );
        return None;
    }
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"));
    let read_word = |addr: u64| {
        let mut b = [0u8; 8];
        let mem = mem.as_ref().ok()?;
        mem.read_exact_at(&mut b, addr).ok()?;
        Some(u64::from_ne_bytes(b))
    };
    let defined_elsewhere = |name: &str| {
        allocator::candidate_modules(maps, None)
            .into_iter()
            .filter(|m| m.path.as_deref() != Some(alloc.module.as_str()))
            .any(|m| allocator::defines(&allocator::open_path(pid, m), name))
    };
    match allocator::check_slots(alloc, maps, read_word, defined_elsewhere) {
        Ok(()) => alloc.internal_calls.clone().ok(),
        Err(e) => {
            log::info!(
                "telling the allocator's own calls by their return address, not by marks: {e}"
            );
            None
        }
    }
}

/// How the allocator is probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// One uprobe session for the allocating functions (return probes only
    /// where needed), one uprobe_multi link for free.
    Session,
    /// An entry uprobe per function and a uretprobe per allocating function.
    Classic,
}

/// Whether the uprobe session keeps the calls of `point` in its per-call
/// cookie instead of PENDING: an allocating function that never jumps out of
/// its code (so it cannot hand a call over to another allocator function) and
/// needs nothing at its return but the size (not realloc, which also retires
/// the old block, nor posix_memalign, which returns through a pointer).
pub fn call_in_cookie(point: &AttachPoint) -> bool {
    match point.role {
        Role::Alloc(kind) => {
            point.never_jumps_out
                && !matches!(
                    kind,
                    AllocKind::Realloc | AllocKind::ReallocArray | AllocKind::PosixMemalign
                )
        }
        Role::Free => false,
    }
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Session => "uprobe-session",
            Mechanism::Classic => "uprobe",
        }
    }
}

/// The programs loaded with the expected attach types of uprobe_multi links.
struct MultiPrograms {
    session: OwnedFd,
    free: OwnedFd,
    /// The result sites' program (None with sampling, or if refused).
    result: Option<OwnedFd>,
}

pub struct Probes {
    ebpf: Option<Ebpf>,
    loader_link: Option<UProbeLinkId>,
    /// Every attached classic probe: (program, link).
    links: Vec<(&'static str, UProbeLinkId)>,
    multi: Option<MultiPrograms>,
    /// uprobe_multi links (closing one detaches all of its probes).
    multi_links: Vec<OwnedFd>,
    mechanism: Mechanism,
    /// The allocator's own calls probed to mark their callees (see
    /// `allocator::internal_calls`), as `realloc+0x40 (jmp malloc)`; None when
    /// the BPF side tells them by return address.
    marked_calls: Option<Vec<String>>,
    /// Result sites attached (see `exits`), as `malloc+0x157 (jne)`.
    result_sites: Vec<String>,
    /// --sample-bytes is on.
    sampled: bool,
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
    "loader_breakpoint",
];

/// The classic return probe, loaded only when classic probes are attached:
/// it holds the stack walk, and the verifier takes seconds over it (as over
/// the session program, which has the same walk).
const RETURN_PROGRAM: &str = "alloc_return";

/// Loads the programs for target `tgid` and returns them with their maps.
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

fn log_probe(alloc: &Allocator, point: &allocator::AttachPoint) {
    log::debug!(
        "probing {}:{} at file offset {:#x} (function at {:#x})",
        alloc.module,
        point.probe_site(),
        point.probe_offset,
        point.file_offset
    );
}

/// `MEMTRACE_PROBES=classic`: never use uprobe sessions (for comparison, and
/// for tests of the fall back).
fn classic_forced() -> bool {
    std::env::var_os("MEMTRACE_PROBES").is_some_and(|v| v == "classic")
}

/// Loads the programs for uprobe_multi links, or says why not.
fn load_multi(ebpf: &Ebpf, sampled: bool) -> Result<MultiPrograms> {
    let raw = multi::RawLoader::new(BPF_OBJECT, ebpf)?;
    Ok(MultiPrograms {
        session: raw.load("alloc_session", multi::BPF_TRACE_UPROBE_SESSION)?,
        free: raw.load("free_enter", multi::BPF_TRACE_UPROBE_MULTI)?,
        // Exact mode only (see `attach_multi`); its verification is
        // another stack walk's.
        result: if sampled {
            None
        } else {
            match raw.load("alloc_result", multi::BPF_TRACE_UPROBE_MULTI) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    log::info!("no result sites: {e:#}");
                    None
                }
            }
        },
    })
}

/// `MEMTRACE_EMPTY_PROGRAMS=1`: the same probes at the same sites, with
/// programs that return at once: what the traps alone cost (`cargo xtask
/// bench`'s floor config). Nothing is recorded.
fn empty_programs() -> bool {
    std::env::var_os("MEMTRACE_EMPTY_PROGRAMS").is_some_and(|v| v == "1")
}

/// Loads the programs for target `tgid`, sampling one allocation every
/// `sample_mean_bytes` bytes on average (0: every allocation).
pub fn load(tgid: u32, sizes: MapSizes, sample_mean_bytes: u64) -> Result<(Probes, TraceMaps)> {
    if BPF_OBJECT.is_empty() {
        bail!(
            "this memtrace binary was built without its BPF programs; build it with \
             `cargo xtask build` (it leaves target/release/memtrace)"
        );
    }
    let empty = empty_programs();
    if empty {
        eprintln!(
            "memtrace: MEMTRACE_EMPTY_PROGRAMS=1: the probes return at once and record \
             nothing (the benchmark's floor)"
        );
    }
    let mut ebpf = EbpfLoader::new()
        .override_global("TARGET_TGID", &tgid, true)
        .override_global("EMPTY_PROGRAMS", &(empty as u32), true)
        .override_global("SAMPLE_MEAN_BYTES", &sample_mean_bytes, true)
        .override_global("ALLOC_BUCKETS", &sizes.block_buckets(), true)
        .map_max_entries("ALLOC_KEYS", sizes.block_buckets())
        .map_max_entries("ALLOCS", sizes.block_buckets())
        .map_max_entries("STACKS", sizes.stacks)
        .map_max_entries("SITES", sizes.site_entries())
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
    let multi = if classic_forced() {
        None
    } else {
        match load_multi(&ebpf, sample_mean_bytes != 0) {
            Ok(m) => Some(m),
            Err(e) => {
                log::info!("uprobe sessions unavailable, using classic uprobes: {e:#}");
                None
            }
        }
    };
    if multi.is_none() {
        // Refused now rather than at attach.
        let prog: &mut UProbe = ebpf
            .program_mut(RETURN_PROGRAM)
            .context("BPF program alloc_return missing from the embedded object")?
            .try_into()?;
        prog.load().map_err(|e| anyhow!(e)).with_context(|| {
            format!("the kernel refused BPF program {RETURN_PROGRAM} (verifier or permissions)")
        })?;
    }
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .with_context(|| format!("BPF map {name} missing from the object"))
    };
    let maps = TraceMaps {
        allocs: BlockTable::new(
            Array::try_from(take("ALLOC_KEYS")?)?,
            Array::try_from(take("ALLOCS")?)?,
        )?,
        sites: HashMap::try_from(take("SITES")?)?,
        epoch: Array::try_from(take("EPOCH")?)?,
        stacks: HashMap::try_from(take("STACKS")?)?,
        pending: HashMap::try_from(take("PENDING")?)?,
        counters: PerCpuArray::try_from(take("COUNTERS")?)?,
        allocator_text: Array::try_from(take("ALLOCATOR_TEXT")?)?,
        allocator_hull: Array::try_from(take("ALLOCATOR_HULL")?)?,
        unwind_rows: Array::try_from(take("UNWIND_ROWS")?)?,
        pc_pages: HashMap::try_from(take("PC_PAGES")?)?,
        proc_tables: HashMap::try_from(take("PROC_TABLES")?)?,
        sample_log2: Array::try_from(take("SAMPLE_LOG2")?)?,
        tables_generation: Array::try_from(take("TABLES_GENERATION")?)?,
        call_mark_state: Array::try_from(take("CALL_MARK_STATE")?)?,
    };
    let mut maps = maps;
    maps.epoch
        .set(
            0,
            Epoch {
                id: 0,
                _pad: 0,
                start_ns: crate::collect::monotonic_ns(),
            },
            0,
        )
        .context("writing EPOCH")?;
    if sample_mean_bytes != 0 {
        for (i, q) in sampling::log2_table().into_iter().enumerate() {
            maps.sample_log2
                .set(i as u32, q, 0)
                .context("writing SAMPLE_LOG2")?;
        }
    }
    Ok((
        Probes {
            ebpf: Some(ebpf),
            loader_link: None,
            links: Vec::new(),
            mechanism: if multi.is_some() {
                Mechanism::Session
            } else {
                Mechanism::Classic
            },
            multi,
            multi_links: Vec::new(),
            marked_calls: None,
            result_sites: Vec::new(),
            sampled: sample_mean_bytes != 0,
        },
        maps,
    ))
}

impl Probes {
    /// The classic program `name`, loaded into the kernel if it is not yet.
    fn program(&mut self, name: &str) -> Result<&mut UProbe> {
        let ebpf = self.ebpf.as_mut().context("probes already detached")?;
        let prog: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| anyhow!(e)).with_context(|| {
                format!("the kernel refused BPF program {name} (verifier or permissions)")
            })?;
        }
        Ok(prog)
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

    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// Probes every allocator function, bound to `pid`: with uprobe_multi links
    /// where the kernel has them, else classic uprobes. Returns the number of
    /// probe sites.
    ///
    ///
    /// `maps`: the target's mappings, where the allocator's module is mapped.
    pub fn attach_allocator(
        &mut self,
        alloc: &Allocator,
        pid: u32,
        maps: &[MapEntry],
        trace: &mut TraceMaps,
    ) -> Result<usize> {
        self.marked_calls = None;
        // Told by return address, an unsampled call of a function that may
        // tail-call stays in PENDING, where the inner entry finds it. Classic
        // entries read which ones from CALL_MARK_STATE (sessions: the cookie).
        let tails = allocator::tail_callers(&alloc.points, &alloc.internal_calls);
        let tail_kinds = alloc
            .points
            .iter()
            .filter(|p| tails.contains(&p.vaddr))
            .filter_map(|p| match p.role {
                Role::Alloc(kind) => Some(1u64 << kind as u32),
                Role::Free => None,
            })
            .fold(0, |a, b| a | b);
        trace.set_call_marks(false, tail_kinds)?;
        if self.mechanism == Mechanism::Session {
            // The session program tells a call made by the allocator from a user's
            // call by the ranges in ALLOCATOR_TEXT: every function must have one.
            let text = allocator::text_ranges(alloc, maps);
            if alloc.points.len() > MAX_ALLOCATOR_FUNCTIONS as usize
                || text.len() != alloc.points.len()
            {
                log::info!(
                    "{} allocator functions, {} with a known extent (at most {MAX_ALLOCATOR_FUNCTIONS} \
                     and all are needed for uprobe sessions): using classic uprobes",
                    alloc.points.len(),
                    text.len()
                );
                self.mechanism = Mechanism::Classic;
            } else {
                let marks = marked_calls(alloc, pid, maps);
                trace.set_call_marks(marks.is_some(), tail_kinds)?;
                match self.attach_multi(alloc, pid, maps, marks, &tails) {
                    Ok(n) => return Ok(n),
                    Err(e) => {
                        log::warn!(
                            "uprobe_multi links refused ({e:#}); falling back to one uprobe per function"
                        );
                        self.multi_links.clear();
                        self.result_sites.clear();
                        self.marked_calls = None;
                        self.mechanism = Mechanism::Classic;
                        trace.set_call_marks(false, tail_kinds)?;
                    }
                }
            }
        }
        self.attach_classic(alloc, pid)
    }

    /// See `result_sites` in `Probes`.
    pub fn result_sites(&self) -> &[String] {
        &self.result_sites
    }

    /// See `marked_calls` in `Probes`.
    pub fn marked_calls(&self) -> Option<&[String]> {
        self.marked_calls.as_deref()
    }

    /// One session link for the allocating functions, one uprobe_multi link
    /// for free.
    ///
    /// The cookie of an allocating function's probe is its address in the
    /// process, shifted left by 8, with its `AllocKind` in the low byte: the
    /// session program knows its entry from its return by the instruction
    /// pointer being at the probe.
    fn attach_multi(
        &mut self,
        alloc: &Allocator,
        pid: u32,
        maps: &[MapEntry],
        marks: Option<Vec<allocator::InternalCall>>,
        tail_callers: &[u64],
    ) -> Result<usize> {
        let progs = self.multi.as_ref().context("no uprobe_multi programs")?;
        // (offsets, cookies) of the allocating functions, then of free.
        let (mut allocs, mut frees) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        // Functions probed at their result sites (see `exits`). Their probes
        // tell the allocator's calls by return address and by PENDING, not
        // by marks: a mark is taken by its callee's entry probe, and these
        // have none (a mark left to a later site would need every path of
        // the callee, even those to an abort, to take it). So no mark is
        // left for them, and the functions that jump into them keep even
        // their unsampled calls in PENDING.
        // Each function's plan must fit in RESULT_SITES with the ones before
        // it, and no mark may sit on one of its probes.
        let mut room = memtrace_common::MAX_RESULT_SITES as usize;
        let result_fns: Vec<u64> = alloc
            .points
            .iter()
            // Exact mode only: with sampling, an unsampled call costs one
            // probe already (its session entry skips the return). (Were it
            // extended to sampling, `jump_in` below would have to be closed
            // over chains of tail calls: glibc's reallocarray jumps to
            // realloc, which jumps to malloc; an unsampled reallocarray(NULL,
            // ..) not kept in PENDING is then counted again by malloc's site.)
            .filter(|_| !self.sampled && progs.result.is_some())
            .filter(|p| matches!(p.role, Role::Alloc(_)))
            .filter(|p| {
                let Some(plan) = &p.results else {
                    return false;
                };
                let offsets: Vec<u64> = plan.offsets().map(|d| p.file_offset + d).collect();
                let marked = marks
                    .iter()
                    .flatten()
                    .any(|c| offsets.contains(&c.file_offset));
                if marked || offsets.len() > room {
                    log::debug!(
                        "{}:{}: result sites left out ({})",
                        alloc.module,
                        p.names.join("/"),
                        if marked {
                            "a mark on one"
                        } else {
                            "no room left"
                        }
                    );
                    return false;
                }
                room -= offsets.len();
                true
            })
            .map(|p| p.vaddr)
            .collect();
        let mut jump_in: Vec<u64> = Vec::new();
        let marks: Option<Vec<allocator::InternalCall>> = marks.map(|m| {
            m.into_iter()
                .filter(|c| {
                    let keep = !result_fns.contains(&c.callee);
                    if !keep && c.kind != allocator::MarkKind::Call {
                        jump_in.extend(c.tail_of.iter().copied());
                    }
                    keep
                })
                .collect()
        });
        // Functions whose unsampled calls stay in PENDING: with marks, those
        // whose jumps reach a probed function through other code (a jump
        // in a probed function is marked); else every tail caller.
        let tails: Vec<u64> = match &marks {
            Some(marks) => marks
                .iter()
                .filter(|c| c.kind == allocator::MarkKind::Check)
                .flat_map(|c| c.tail_of.iter().copied())
                .chain(jump_in)
                .collect(),
            None => tail_callers.to_vec(),
        };
        let mut result_sites: Vec<(u64, memtrace_common::ResultSite)> = Vec::new();
        self.result_sites.clear();
        for point in &alloc.points {
            if let (Role::Alloc(kind), Some(plan), true) = (
                point.role,
                &point.results,
                result_fns.contains(&point.vaddr),
            ) {
                let name = point.names.first().copied().unwrap_or("?");
                for s in &plan.sites {
                    result_sites.push((point.file_offset + s.delta, s.conf(kind)));
                    self.result_sites
                        .push(format!("{name}+{:#x} ({})", s.delta, s.mnemonic));
                }
                for &g in &plan.guards {
                    result_sites.push((point.file_offset + g, crate::exits::guard_conf(kind)));
                    self.result_sites.push(format!("{name}+{g:#x} (guard)"));
                }
                log::debug!(
                    "{}:{name}: one probe per call, at its result sites: {}",
                    alloc.module,
                    plan.describe()
                );
                continue;
            }
            log_probe(alloc, point);
            match point.role {
                Role::Alloc(kind) => {
                    let at = allocator::vaddr(alloc, maps, point.probe_offset)
                        .with_context(|| format!("{} is not mapped", point.probe_site()))?;
                    allocs.0.push(point.probe_offset);
                    allocs.1.push(
                        at << 8
                            | kind as u64
                            | if call_in_cookie(point) {
                                memtrace_common::SITE_CALL_IN_COOKIE
                            } else {
                                0
                            }
                            | if tails.contains(&point.vaddr) {
                                memtrace_common::SITE_UNSAMPLED_PENDING
                            } else {
                                0
                            },
                    );
                }
                Role::Free => {
                    frees.0.push(point.probe_offset);
                    frees.1.push(0);
                }
            }
        }
        if !result_sites.is_empty() {
            let ebpf = self.ebpf.as_mut().context("BPF object already dropped")?;
            let mut table: Array<&mut MapData, memtrace_common::ResultSite> = Array::try_from(
                ebpf.map_mut("RESULT_SITES")
                    .context("BPF map RESULT_SITES missing from the object")?,
            )?;
            for (i, (_, conf)) in result_sites.iter().enumerate() {
                table
                    .set(i as u32, *conf, 0)
                    .context("writing RESULT_SITES")?;
            }
        }
        let results: (Vec<u64>, Vec<u64>) = result_sites
            .iter()
            .enumerate()
            .map(|(i, (offset, _))| (*offset, (i as u64) << 8 | memtrace_common::SITE_RESULT))
            .unzip();
        // The allocator's own calls into its probed functions, in the session
        // link (their entries return at once and skip the return).
        for call in marks.iter().flatten() {
            let at = allocator::vaddr(alloc, maps, call.file_offset)
                .with_context(|| format!("{} is not mapped", call.describe))?;
            let kind = match call.kind {
                allocator::MarkKind::Call => memtrace_common::SITE_MARK_CALL,
                allocator::MarkKind::Jump => memtrace_common::SITE_MARK_JUMP,
                allocator::MarkKind::Check => memtrace_common::SITE_MARK_CHECK,
            };
            log::debug!("marking the allocator's own call at {}", call.describe);
            allocs.0.push(call.file_offset);
            allocs.1.push(at << 8 | kind);
        }
        let mut links = Vec::new();
        if let (false, Some(prog)) = (results.0.is_empty(), progs.result.as_ref()) {
            let link = multi::attach(
                prog.as_fd(),
                multi::BPF_TRACE_UPROBE_MULTI,
                &alloc.open_path,
                &results.0,
                &results.1,
                pid,
            )
            .with_context(|| {
                format!(
                    "a uprobe_multi link for the result sites on {}",
                    alloc.module
                )
            })?;
            links.push(link);
        }
        for (prog, attach_type, (offsets, cookies), what) in [
            (
                &progs.session,
                multi::BPF_TRACE_UPROBE_SESSION,
                &allocs,
                "a uprobe session",
            ),
            (
                &progs.free,
                multi::BPF_TRACE_UPROBE_MULTI,
                &frees,
                "a uprobe_multi link for free",
            ),
        ] {
            if offsets.is_empty() {
                continue;
            }
            let link = multi::attach(
                prog.as_fd(),
                attach_type,
                &alloc.open_path,
                offsets,
                cookies,
                pid,
            )
            .with_context(|| format!("{what} on {}", alloc.module))?;
            links.push(link);
        }
        self.multi_links.extend(links);
        self.marked_calls = marks.map(|m| m.into_iter().map(|c| c.describe).collect());
        Ok(allocs.0.len() + frees.0.len() + results.0.len())
    }

    /// Entry probes on every allocator function, a return probe on each one that
    /// allocates.
    fn attach_classic(&mut self, alloc: &Allocator, pid: u32) -> Result<usize> {
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
            log_probe(alloc, point);
            let link = self
                .attach_one(prog, &alloc.open_path, point.probe_offset, pid)
                .with_context(what)?;
            self.links.push((prog, link));
            if matches!(point.role, Role::Alloc(_)) {
                let link = self
                    .attach_one(RETURN_PROGRAM, &alloc.open_path, point.probe_offset, pid)
                    .with_context(what)?;
                self.links.push((RETURN_PROGRAM, link));
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
    /// still run one after the other. A uprobe_multi link waits once for all
    /// of its probes, which is why they are used where the kernel has them.
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
        let m = self.multi_links.len();
        self.multi_links.clear();
        self.multi = None;
        self.ebpf = None;
        log::debug!(
            "{n} probes and {m} uprobe_multi links detached in {:?}",
            t.elapsed()
        );
        self.loader_link = None;
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
