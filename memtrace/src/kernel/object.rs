//! The embedded BPF object: loading its maps and programs for one target.
//!
//! The maps are created first; the programs that need the verifier's long
//! look (the session's, free's and the result sites') are then verified
//! each on a thread of its own, since the kernel verifies distinct programs
//! in parallel, while the caller fills the maps ([`Verifying`]).
use std::{
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Instant,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray, Queue, RingBuf},
    programs::UProbe,
};
use memtrace_common::{Epoch, map_names, resources};

use super::{
    blocks::BlockTable,
    maps::{MapSizes, TraceMaps},
    multi, sampling,
};
use crate::steps::{Running, Steps};

/// The BPF object built by `cargo xtask build`, embedded at compile time.
static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memtrace-ebpf.o"));

/// The programs loaded with the expected attach types of uprobe_multi links.
pub struct MultiPrograms {
    pub session: OwnedFd,
    pub free: OwnedFd,
    /// The result sites' program (None with sampling, or if refused).
    pub result: Option<OwnedFd>,
}

/// The classic return probe, loaded only when classic probes are attached:
/// it holds the stack walk, and the verifier takes seconds over it (as over
/// the session program, which has the same walk).
pub const RETURN_PROGRAM: &str = "alloc_return";

/// The loaded programs: the classic ones in `ebpf`, and those loaded for
/// uprobe_multi links where the kernel has them.
pub struct Programs {
    pub ebpf: Ebpf,
    pub multi: Option<MultiPrograms>,
}

/// `MEMTRACE_PROBES=classic`: never use uprobe sessions (for comparison, and
/// for tests of the fall back).
fn classic_forced() -> bool {
    crate::knobs::get().probes == crate::knobs::Probes::Classic
}

/// A program being verified on a thread of its own.
type Job = JoinHandle<Result<OwnedFd>>;

/// The programs for uprobe_multi links, each being verified.
struct MultiJobs {
    session: Job,
    free: Job,
    result: Option<Job>,
    /// "verifying BPF programs (k/n done)" while any is.
    _shown: Arc<Running>,
}

/// Starts verifying the programs for uprobe_multi links, each on a thread
/// of its own, or says why it cannot.
fn start_multi(
    ebpf: &Ebpf,
    kfuncs: JoinHandle<Result<multi::KernelFunctions>>,
    sampled: bool,
    steps: &Arc<Steps>,
) -> Result<MultiJobs> {
    let raw = Arc::new(
        steps.time("prepare_programs", "preparing BPF programs", || {
            let kfuncs = kfuncs
                .join()
                .unwrap_or_else(|_| Err(anyhow!("reading the kernel's BTF panicked")))?;
            multi::RawLoader::new(BPF_OBJECT, ebpf, kfuncs)
        })?,
    );
    // The result sites are for exact mode only (see `attach_multi`).
    let total = if sampled { 2 } else { 3 };
    let shown = Arc::new(steps.start(
        "verify_programs",
        format!("verifying BPF programs (0/{total} done)"),
    ));
    let done = Arc::new(AtomicUsize::new(0));
    let spawn = |name: &'static str, attach_type: u32| -> Job {
        let (raw, steps, shown, done) = (
            Arc::clone(&raw),
            Arc::clone(steps),
            Arc::clone(&shown),
            Arc::clone(&done),
        );
        std::thread::spawn(move || {
            let started = Instant::now();
            let fd = raw.load(name, attach_type);
            steps.record(&format!("verify_{name}"), started.elapsed());
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            shown.doing(format!("verifying BPF programs ({n}/{total} done)"));
            fd
        })
    };
    Ok(MultiJobs {
        session: spawn("alloc_session", multi::BPF_TRACE_UPROBE_SESSION),
        free: spawn("free_enter", multi::BPF_TRACE_UPROBE_MULTI),
        result: (!sampled).then(|| spawn("alloc_result", multi::BPF_TRACE_UPROBE_MULTI)),
        _shown: shown,
    })
}

/// A program's fd once its verification ended.
fn joined(job: Job) -> Result<OwnedFd> {
    job.join()
        .unwrap_or_else(|_| Err(anyhow!("the thread verifying a BPF program panicked")))
}

impl MultiJobs {
    /// The programs once verified; an error if the session's or free's was
    /// refused (the result sites' are optional).
    fn wait(self) -> Result<MultiPrograms> {
        let (session, free) = (joined(self.session), joined(self.free));
        let result = self
            .result
            .map(joined)
            .and_then(|r| r.map_err(|e| log::info!("no result sites: {e:#}")).ok());
        Ok(MultiPrograms {
            session: session?,
            free: free?,
            result,
        })
    }
}

/// The BPF object with its maps created, its programs being verified.
pub struct Verifying {
    ebpf: Ebpf,
    /// Err: why uprobe sessions are not used (logged at `wait`).
    multi: Result<MultiJobs>,
    steps: Arc<Steps>,
}

impl Verifying {
    /// The programs, once the kernel has verified them: those for
    /// uprobe_multi links where it can, else the classic return probe (the
    /// classic entry programs are loaded when attached).
    pub fn wait(self) -> Result<Programs> {
        let Verifying {
            mut ebpf,
            multi,
            steps,
        } = self;
        let multi = match multi.and_then(MultiJobs::wait) {
            Ok(m) => Some(m),
            Err(e) => {
                log::info!("uprobe sessions unavailable, using classic uprobes: {e:#}");
                None
            }
        };
        if multi.is_none() {
            // Refused now rather than at attach.
            let _step = steps.start(
                &format!("verify_{RETURN_PROGRAM}"),
                "verifying BPF programs",
            );
            load_uprobe(&mut ebpf, RETURN_PROGRAM)?;
        }
        Ok(Programs { ebpf, multi })
    }
}

/// `MEMTRACE_EMPTY_PROGRAMS=1`: the same probes at the same sites, with
/// programs that return at once: what the traps alone cost (`cargo xtask
/// bench`'s floor config). Nothing is recorded.
fn empty_programs() -> bool {
    crate::knobs::get().empty_programs
}

/// Creates the maps for target `tgid`, sampling one allocation every
/// `sample_mean_bytes` bytes on average (0: every allocation), and starts
/// verifying the programs: the caller may fill the maps meanwhile, then
/// waits for the programs ([`Verifying::wait`]).
pub fn load(
    tgid: u32,
    sizes: MapSizes,
    sample_mean_bytes: u64,
    steps: &Arc<Steps>,
) -> Result<(Verifying, TraceMaps)> {
    if BPF_OBJECT.is_empty() {
        bail!(
            "this memtrace binary was built without its BPF programs; build it with \
             `cargo xtask build` (it leaves target/release/memtrace)"
        );
    }
    // The kernel's BTF (for the session's kfuncs) is parsed meanwhile.
    let kfuncs = std::thread::spawn(multi::kernel_functions);
    let mut ebpf = steps.time("create_maps", "creating BPF maps", || {
        load_object(tgid, &sizes, sample_mean_bytes)
    })?;
    let multi = if classic_forced() {
        Err(anyhow!("MEMTRACE_PROBES=classic"))
    } else {
        start_multi(&ebpf, kfuncs, sample_mean_bytes != 0, steps)
    };
    // (After the programs were relocated against every map: taking a map
    // out of `ebpf` hides it from the relocation, not from the kernel.)
    let mut maps = take_maps(&mut ebpf)?;
    init_maps(&mut maps, sample_mean_bytes)?;
    Ok((
        Verifying {
            ebpf,
            multi,
            steps: Arc::clone(steps),
        },
        maps,
    ))
}

/// The embedded object with its globals set and its maps sized and created.
fn load_object(tgid: u32, sizes: &MapSizes, sample_mean_bytes: u64) -> Result<Ebpf> {
    let empty = empty_programs();
    if empty {
        eprintln!(
            "memtrace: MEMTRACE_EMPTY_PROGRAMS=1: the probes return at once and record \
             nothing (the benchmark's floor)"
        );
    }
    let facts = super::btf_facts::get();
    let fd_slots = super::resources::slot_count(crate::process::fds::open_files_limit(tgid));
    EbpfLoader::new()
        // No CO-RE relocations to make: the kernel's BTF, which aya would
        // parse for them, is not needed here.
        .btf(None)
        .override_global("TARGET_TGID", &tgid, true)
        .override_global("VMA_FLAGS_OFFSET", &facts.vma_flags_offset, true)
        .override_global("EMPTY_PROGRAMS", &(empty as u32), true)
        .override_global("SAMPLE_MEAN_BYTES", &sample_mean_bytes, true)
        .override_global("ALLOC_BUCKETS", &sizes.block_buckets(), true)
        .override_global("UPROBE_OFFSETS", &facts.uprobe_offsets, true)
        .map_max_entries(map_names::ALLOC_KEYS, sizes.block_buckets())
        .map_max_entries(map_names::ALLOCS, sizes.block_buckets())
        .map_max_entries(map_names::STACKS, sizes.stacks)
        .map_max_entries(map_names::SITES, sizes.site_entries())
        .override_global("FD_SLOT_COUNT", &fd_slots, true)
        .map_max_entries(resources::map_names::FD_SLOTS, fd_slots)
        .load(BPF_OBJECT)
        .map_err(|e| anyhow!(e))
        .context("loading the BPF maps and programs into the kernel")
}

/// Loads the classic program `name` into the kernel.
fn load_uprobe(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let prog: &mut UProbe = ebpf
        .program_mut(name)
        .with_context(|| format!("BPF program {name} missing from the embedded object"))?
        .try_into()
        .with_context(|| format!("BPF program {name} is not a uprobe"))?;
    let started = std::time::Instant::now();
    prog.load().map_err(|e| anyhow!(e)).with_context(|| {
        format!("the kernel refused BPF program {name} (verifier or permissions)")
    })?;
    if log::log_enabled!(log::Level::Debug) {
        let insns = prog
            .info()
            .ok()
            .and_then(|i| i.verified_instruction_count());
        log::debug!(
            "BPF program {name} verified in {:?}: processed {} insns",
            started.elapsed(),
            insns.map_or_else(|| "?".to_string(), |n| n.to_string())
        );
    }
    Ok(())
}

/// The maps userspace reads and writes, taken out of `ebpf` (the programs
/// keep them).
fn take_maps(ebpf: &mut Ebpf) -> Result<TraceMaps> {
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .with_context(|| format!("BPF map {name} missing from the object"))
    };
    Ok(TraceMaps {
        allocs: BlockTable::new(
            Array::try_from(take(map_names::ALLOC_KEYS)?)?,
            Array::try_from(take(map_names::ALLOCS)?)?,
        )?,
        sites: HashMap::try_from(take(map_names::SITES)?)?,
        epoch: Array::try_from(take(map_names::EPOCH)?)?,
        stacks: HashMap::try_from(take(map_names::STACKS)?)?,
        pending: HashMap::try_from(take(map_names::PENDING)?)?,
        counters: PerCpuArray::try_from(take(map_names::COUNTERS)?)?,
        allocator_text: Array::try_from(take(map_names::ALLOCATOR_TEXT)?)?,
        allocator_hull: Array::try_from(take(map_names::ALLOCATOR_HULL)?)?,
        python_layout: Array::try_from(take(map_names::PYTHON_LAYOUT)?)?,
        python_new_codes: Queue::try_from(take(map_names::PYTHON_NEW_CODES)?)?,
        python_code_copies: RingBuf::try_from(take(map_names::PYTHON_CODE_COPIES)?)?,
        unwind_rows: Array::try_from(take(map_names::UNWIND_ROWS)?)?,
        pc_pages: HashMap::try_from(take(map_names::PC_PAGES)?)?,
        proc_tables: HashMap::try_from(take(map_names::PROC_TABLES)?)?,
        sample_log2: Array::try_from(take(map_names::SAMPLE_LOG2)?)?,
        tables_generation: Array::try_from(take(map_names::TABLES_GENERATION)?)?,
        call_mark_state: Array::try_from(take(map_names::CALL_MARK_STATE)?)?,
        code_state: Array::try_from(take(map_names::CODE_STATE)?)?,
        code_unmap_log: Array::try_from(take(map_names::CODE_UNMAP_LOG)?)?,
        trace_state: Array::try_from(take(map_names::TRACE_STATE)?)?,
        fork_children: HashMap::try_from(take(map_names::FORK_CHILDREN)?)?,
        fds: super::resources::FdMaps::take(ebpf)?,
        threads: super::threads::ThreadMaps::take(ebpf)?,
        mappings: super::mappings::MapMaps::take(ebpf)?,
    })
}

/// The maps' first contents: epoch 0 starting now, and the sampler's
/// log2 table when sampling.
fn init_maps(maps: &mut TraceMaps, sample_mean_bytes: u64) -> Result<()> {
    maps.epoch
        .set(
            0,
            Epoch {
                id: 0,
                _pad: 0,
                start_ns: super::collect::monotonic_ns(),
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The BPF side's `#[map]` statics are named by hand: they must be exactly
    /// the names userspace opens them by (`memtrace_common::map_names`).
    #[test]
    fn the_object_has_exactly_the_shared_map_names() {
        if BPF_OBJECT.is_empty() {
            eprintln!(
                "skipped: no BPF object embedded (a plain `cargo test`; \
                 `cargo xtask test` builds and embeds one)"
            );
            return;
        }
        let obj = aya_obj::Object::parse(BPF_OBJECT).expect("parsing the embedded BPF object");
        let mut found: Vec<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            // Globals are maps of their sections (.rodata, .bss...), not ours.
            .filter(|name| !name.starts_with('.'))
            .collect();
        found.sort_unstable();
        let mut shared = map_names::ALL.to_vec();
        shared.extend(resources::map_names::ALL);
        shared.extend(memtrace_common::threads::map_names::ALL);
        shared.extend(memtrace_common::mappings::map_names::ALL);
        shared.sort_unstable();
        assert_eq!(found, shared);
    }
}
