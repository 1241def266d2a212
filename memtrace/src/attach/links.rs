//! Attaching memtrace's programs to one process's allocator.
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
    Ebpf,
    maps::{Array, MapData},
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    },
};
use memtrace_common::{AllocKind, FreeKind, MAX_ALLOCATOR_FUNCTIONS, SiteCookie, map_names};

use super::allocator::{self, Allocator, Allocators, AttachPoint, Role};
use crate::{
    kernel::{
        maps::TraceMaps,
        multi,
        object::{MultiPrograms, Programs, RETURN_PROGRAM},
    },
    process::maps::MapEntry,
};

/// The allocator's own calls into its probed functions, if they are all known
/// and every one made through a GOT slot reaches the probed function in `pid`:
/// then marks at those calls tell the BPF side which entries are the
/// allocator's own. Else None (logged): it looks at each entry's return address.
fn marked_calls(
    alloc: &Allocator,
    pid: u32,
    maps: &[MapEntry],
) -> Option<Vec<allocator::InternalCall>> {
    let mem = crate::process::mem::TargetMem::open(pid);
    let read_word = |addr: u64| {
        let mut b = [0u8; 8];
        let mem = mem.as_ref().ok()?;
        mem.read_exact_at(&mut b, addr).ok()?;
        Some(u64::from_ne_bytes(b))
    };
    match allocator::check_slots(alloc, maps, read_word) {
        Ok(()) => alloc.internal_calls.clone().ok(),
        Err(e) => {
            log::info!(
                "telling the allocator's own calls by their return address, not by marks \
                 ({}): {e}",
                alloc.module
            );
            None
        }
    }
}

/// The marks of every module (see [`marked_calls`]), or None if one
/// module's are not all known: the mode is the process's.
fn all_marked_calls(
    allocs: &Allocators,
    pid: u32,
    maps: &[MapEntry],
) -> Option<Vec<Vec<allocator::InternalCall>>> {
    if crate::knobs::get().own_calls_by_return_address {
        log::info!(
            "telling the allocator's own calls by their return address (MEMTRACE_OWN_CALLS)"
        );
        return None;
    }
    allocs
        .modules
        .iter()
        .map(|a| marked_calls(a, pid, maps))
        .collect()
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
/// needs nothing at its return but the size (not a realloc, which also
/// retires the old block, nor posix_memalign, which returns through a
/// pointer).
pub fn call_in_cookie(point: &AttachPoint) -> bool {
    match point.role {
        Role::Alloc(kind) => {
            let args = kind.args();
            point.never_jumps_out && args.old_ptr.is_none() && args.out_ptr.is_none()
        }
        Role::Free(_) => false,
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

/// The watch on code the target unmaps (the BPF object's `unmaps`): a program
/// at the entry of each syscall that can unmap or map over code.
const UNMAP_WATCH: [(&str, &str); 3] = [
    ("unmap_munmap", "sys_enter_munmap"),
    ("unmap_mmap", "sys_enter_mmap"),
    ("unmap_mremap", "sys_enter_mremap"),
];

fn entry_program(role: Role) -> &'static str {
    match role {
        Role::Free(_) => "free_enter",
        Role::Alloc(kind) => match kind {
            AllocKind::Malloc => "malloc_enter",
            AllocKind::Calloc => "calloc_enter",
            AllocKind::Realloc => "realloc_enter",
            AllocKind::ReallocArray => "reallocarray_enter",
            AllocKind::Memalign => "memalign_enter",
            AllocKind::PosixMemalign => "posix_memalign_enter",
            AllocKind::Valloc => "valloc_enter",
            AllocKind::Pvalloc => "pvalloc_enter",
            AllocKind::HeapMalloc => "heap_malloc_enter",
            AllocKind::HeapCalloc => "heap_calloc_enter",
            AllocKind::HeapRealloc => "heap_realloc_enter",
            AllocKind::HeapReallocArray => "heap_reallocarray_enter",
            AllocKind::Xallocx => "xallocx_enter",
        },
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

impl Probes {
    /// Probes to be attached with `programs`; `sampled`: --sample-bytes is on.
    pub fn new(programs: Programs, sampled: bool) -> Self {
        let Programs { ebpf, multi } = programs;
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
            sampled,
        }
    }

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
    /// `maps`: the target's mappings, where the allocators' modules are mapped.
    pub fn attach_allocators(
        &mut self,
        allocs: &Allocators,
        pid: u32,
        maps: &[MapEntry],
        trace: &mut TraceMaps,
    ) -> Result<usize> {
        self.marked_calls = None;
        // Told by return address, an unsampled call of a function that may
        // tail-call stays in PENDING, where the inner entry finds it. Classic
        // entries read which ones from CALL_MARK_STATE (sessions: the cookie).
        let tails: Vec<Vec<u64>> = allocs
            .modules
            .iter()
            .map(|a| allocator::tail_callers(&a.points, &a.internal_calls))
            .collect();
        let tail_kinds = allocs
            .modules
            .iter()
            .zip(&tails)
            .flat_map(|(a, tails)| a.points.iter().filter(|p| tails.contains(&p.vaddr)))
            .filter_map(|p| match p.role {
                Role::Alloc(kind) => Some(1u64 << kind as u32),
                Role::Free(_) => None,
            })
            .fold(0, |a, b| a | b);
        trace.set_call_marks(false, tail_kinds)?;
        if self.mechanism == Mechanism::Session {
            // The session program tells a call made by the allocator from a user's
            // call by the ranges in ALLOCATOR_TEXT: every function must have one.
            let text = allocator::all_text_ranges(allocs, maps);
            let needed = allocator::text_ranges_needed(allocs);
            if needed > MAX_ALLOCATOR_FUNCTIONS as usize || text.len() != needed {
                log::info!(
                    "{needed} allocator code ranges, {} known (at most \
                     {MAX_ALLOCATOR_FUNCTIONS} and all are needed for uprobe sessions): using \
                     classic uprobes",
                    text.len()
                );
                self.mechanism = Mechanism::Classic;
            } else {
                let marks = all_marked_calls(allocs, pid, maps);
                trace.set_call_marks(marks.is_some(), tail_kinds)?;
                match self.attach_multi(allocs, pid, maps, marks, &tails) {
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
        let mut n = 0;
        for alloc in &allocs.modules {
            n += self.attach_classic(alloc, pid)?;
        }
        Ok(n)
    }

    /// See `result_sites` in `Probes`.
    pub fn result_sites(&self) -> &[String] {
        &self.result_sites
    }

    /// See `marked_calls` in `Probes`.
    pub fn marked_calls(&self) -> Option<&[String]> {
        self.marked_calls.as_deref()
    }

    /// Per module, one session link for the allocating functions, one
    /// uprobe_multi link for free.
    ///
    /// The cookie of an allocating function's probe is its address in the
    /// process, shifted left by 8, with its `AllocKind` in the low byte: the
    /// session program knows its entry from its return by the instruction
    /// pointer being at the probe.
    fn attach_multi(
        &mut self,
        allocs: &Allocators,
        pid: u32,
        maps: &[MapEntry],
        marks: Option<Vec<Vec<allocator::InternalCall>>>,
        tail_callers: &[Vec<u64>],
    ) -> Result<usize> {
        let progs = self.multi.as_ref().context("no uprobe_multi programs")?;
        // Exact mode only: with sampling, an unsampled call costs one probe
        // already (its session entry skips the return). (Were it extended to
        // sampling, `jump_in` in `marks_left` would have to be closed over
        // chains of tail calls: glibc's reallocarray jumps to realloc, which
        // jumps to malloc; an unsampled reallocarray(NULL, ..) not kept in
        // PENDING is then counted again by malloc's site.)
        let with_results = !self.sampled && progs.result.is_some();
        // Each result site's offset and configuration, in RESULT_SITES order,
        // for all modules.
        let mut result_sites: Vec<(u64, memtrace_common::ResultSite)> = Vec::new();
        let mut room = memtrace_common::MAX_RESULT_SITES as usize;
        let mut planned = Vec::new();
        self.result_sites.clear();
        let mut marked: Option<Vec<String>> = marks.as_ref().map(|_| Vec::new());
        for (k, alloc) in allocs.modules.iter().enumerate() {
            let module_marks = marks.as_ref().map(|m| m[k].clone());
            let result_fns =
                result_functions(alloc, module_marks.as_deref(), with_results, &mut room);
            let (module_marks, jump_in) = marks_left(module_marks, &result_fns);
            let tails = pending_tails(module_marks.as_deref(), jump_in, &tail_callers[k]);
            let (mut sites, mut frees) = (LinkSites::default(), LinkSites::default());
            let first_result = result_sites.len();
            for point in &alloc.points {
                match (point.role, &point.results) {
                    (Role::Alloc(kind), Some(plan)) if result_fns.contains(&point.vaddr) => {
                        let names = add_result_sites(alloc, point, kind, plan, &mut result_sites);
                        self.result_sites.extend(names);
                        // The paths that leave the function: the session's
                        // entry and return probes, from the hand-offs.
                        let cookie = entry_cookie(alloc, maps, point, kind, &tails)?;
                        for (offset, args) in point.handoff_sites() {
                            sites.push(offset, cookie.with_args(args).0);
                        }
                    }
                    (Role::Alloc(kind), _) => {
                        log_probe(alloc, point);
                        let cookie = entry_cookie(alloc, maps, point, kind, &tails)?;
                        for offset in point.probe_offsets() {
                            // Where the cover site finds the arguments.
                            sites.push(offset, cookie.with_args(point.args_at(offset)).0);
                        }
                    }
                    (Role::Free(kind), _) => {
                        log_probe(alloc, point);
                        for offset in point.probe_offsets() {
                            frees.push(offset, SiteCookie::free(kind).0);
                        }
                    }
                }
            }
            let mut results = LinkSites::default();
            for (i, (offset, _)) in result_sites.iter().enumerate().skip(first_result) {
                results.push(*offset, SiteCookie::result(i as u32).0);
            }
            // The allocator's own calls into its probed functions, in free's
            // plain uprobe_multi link, attached before the session: in the
            // session, another process's hit would arm a return probe there,
            // writing its trampoline over [rsp], a live slot in mid-function
            // (docs/probes.md).
            for call in module_marks.iter().flatten() {
                frees.push(call.file_offset, mark_cookie(alloc, maps, call)?);
            }
            if let (Some(all), Some(m)) = (marked.as_mut(), module_marks) {
                all.extend(m.into_iter().map(|c| c.describe));
            }
            planned.push((alloc, results, sites, frees));
        }
        self.fill_result_sites(&result_sites)?;
        let mut n = 0;
        for (alloc, results, sites, frees) in &planned {
            let links = self.create_links(alloc, pid, results, sites, frees)?;
            self.multi_links.extend(links);
            n += results.len() + sites.len() + frees.len();
        }
        self.marked_calls = marked;
        Ok(n)
    }

    /// Writes each result site's configuration at its index in RESULT_SITES.
    fn fill_result_sites(
        &mut self,
        result_sites: &[(u64, memtrace_common::ResultSite)],
    ) -> Result<()> {
        if result_sites.is_empty() {
            return Ok(());
        }
        let ebpf = self.ebpf.as_mut().context("BPF object already dropped")?;
        let mut table: Array<&mut MapData, memtrace_common::ResultSite> = Array::try_from(
            ebpf.map_mut(map_names::RESULT_SITES)
                .context("BPF map RESULT_SITES missing from the object")?,
        )?;
        for (i, (_, conf)) in result_sites.iter().enumerate() {
            table
                .set(i as u32, *conf, 0)
                .context("writing RESULT_SITES")?;
        }
        Ok(())
    }

    /// The uprobe_multi links: free's, the result sites' and the session,
    /// each only if it has a probe. Free's first: a block allocated while
    /// the allocating probes are in must have its free seen, or it would stay
    /// outstanding for good (a free seen without its allocation is only a
    /// free of a block allocated before, as it is).
    fn create_links(
        &self,
        alloc: &Allocator,
        pid: u32,
        results: &LinkSites,
        allocs: &LinkSites,
        frees: &LinkSites,
    ) -> Result<Vec<OwnedFd>> {
        let progs = self.multi.as_ref().context("no uprobe_multi programs")?;
        let mut links = Vec::new();
        if !frees.is_empty() {
            let link = frees
                .attach(&progs.free, multi::BPF_TRACE_UPROBE_MULTI, alloc, pid)
                .with_context(|| format!("a uprobe_multi link for free on {}", alloc.module))?;
            links.push(link);
        }
        if let (false, Some(prog)) = (results.is_empty(), progs.result.as_ref()) {
            let link = results
                .attach(prog, multi::BPF_TRACE_UPROBE_MULTI, alloc, pid)
                .with_context(|| {
                    format!(
                        "a uprobe_multi link for the result sites on {}",
                        alloc.module
                    )
                })?;
            links.push(link);
        }
        if !allocs.is_empty() {
            let link = allocs
                .attach(&progs.session, multi::BPF_TRACE_UPROBE_SESSION, alloc, pid)
                .with_context(|| format!("a uprobe session on {}", alloc.module))?;
            links.push(link);
        }
        Ok(links)
    }

    /// Entry probes on every allocator function, a return probe on each one that
    /// allocates.
    fn attach_classic(&mut self, alloc: &Allocator, pid: u32) -> Result<usize> {
        let before = self.links.len();
        // free first, as in `create_links`.
        let (frees, allocs): (Vec<_>, Vec<_>) = alloc
            .points
            .iter()
            .partition(|p| matches!(p.role, Role::Free(_)));
        // A classic uprobe has no attach cookie: its free program reads the
        // first argument.
        if let Some(p) = frees.iter().find(|p| p.role != Role::Free(FreeKind::Free)) {
            bail!(
                "{}:{} takes its block as a later argument, which classic uprobes \
                 cannot be told (it needs uprobe_multi links)",
                alloc.module,
                p.name()
            );
        }
        for point in frees.into_iter().chain(allocs) {
            let what = || {
                format!(
                    "attaching a uprobe to {}:{}",
                    alloc.module,
                    point.names.join("/")
                )
            };
            let prog = entry_program(point.role);
            // At each site of the entry cover (instructions the kernel emulates,
            // one on each path: see `exits::cover`), both probes see what they would at the function's
            // first instruction: the arguments, and rsp pointing at the return
            // address, which the return probe replaces.
            // Not at a cover site after an argument moved: these programs read
            // the arguments in their own registers.
            log_probe(alloc, point);
            if !point.moved_args.is_empty() {
                log::debug!(
                    "{}: classic probes at its entry, +0: its cover moves an argument",
                    point.name()
                );
            }
            for offset in point.classic_offsets() {
                let link = self
                    .attach_one(prog, &alloc.open_path, offset, pid)
                    .with_context(what)?;
                self.links.push((prog, link));
                if matches!(point.role, Role::Alloc(_)) {
                    let link = self
                        .attach_one(RETURN_PROGRAM, &alloc.open_path, offset, pid)
                        .with_context(what)?;
                    self.links.push((RETURN_PROGRAM, link));
                }
            }
        }
        Ok(self.links.len() - before)
    }

    /// Watches the code the target unmaps (dlclose), so that each stack is
    /// resolved in the mappings of its time. Tracepoints cannot be bound to a
    /// process: these run at every munmap, mmap and mremap on the host, and
    /// return at once unless the caller is the target.
    pub fn attach_unmap_watch(&mut self) -> Result<()> {
        let ebpf = self.ebpf.as_mut().context("probes already detached")?;
        for (name, syscall) in UNMAP_WATCH {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            prog.load().map_err(|e| anyhow!(e)).with_context(|| {
                format!("the kernel refused BPF program {name} (verifier or permissions)")
            })?;
            prog.attach("syscalls", syscall)
                .map_err(|e| anyhow!(e))
                .with_context(|| format!("attaching {name} to syscalls:{syscall}"))?;
        }
        Ok(())
    }

    /// Traces the threads the target creates and ends (see `threads`):
    /// the tracepoints, and the pthread calls in `module` (glibc) bound to
    /// `pid`; returns the probes attached. A pthread function the module
    /// does not have is left out (logged).
    pub fn attach_thread_tracing(&mut self, module: &Path, pid: u32) -> Result<usize> {
        use memtrace_common::threads::PTHREAD_PROBES;
        let mut n = super::threads::attach_tracepoints(
            self.ebpf.as_mut().context("probes already detached")?,
        )?;
        let pid = NonZeroU32::new(pid).context("pid 0")?;
        for (function, entry, with_return) in PTHREAD_PROBES {
            let returns = with_return.then_some("thread_call_return");
            for prog in std::iter::once(entry).chain(returns) {
                let at = UProbeAttachLocation::Symbol(function);
                match self
                    .program(prog)?
                    .attach(at, module, UProbeScope::OneProcess(pid))
                {
                    Ok(link) => {
                        self.links.push((prog, link));
                        n += 1;
                    }
                    Err(e) => {
                        log::info!("{}:{function} not probed ({prog}): {e}", module.display())
                    }
                }
            }
        }
        Ok(n)
    }

    /// Traces the fds the target creates and releases (see `fds`); returns
    /// the tracepoints attached.
    pub fn attach_fd_tracing(&mut self) -> Result<usize> {
        let ebpf = self.ebpf.as_mut().context("probes already detached")?;
        Ok(super::fds::attach(ebpf)? + super::mappings::attach(ebpf)?)
    }

    /// Watches the target's exec and the processes it creates (see `images`).
    pub fn attach_image_watch(&mut self) -> Result<()> {
        super::images::attach(self.ebpf.as_mut().context("probes already detached")?)
    }

    /// `--follow-forks`: stops each new child of the target before it runs
    /// (see `images::attach_fork_stop`).
    pub fn attach_fork_stop(&mut self) -> Result<()> {
        super::images::attach_fork_stop(self.ebpf.as_mut().context("probes already detached")?)
    }

    /// Launch mode: stop the child in the dynamic loader once its libraries are mapped.
    pub fn attach_loader_breakpoint(&mut self, ldso: &Path, offset: u64, pid: u32) -> Result<()> {
        // As for the allocators (`allocator::probeable`): the kernel would
        // read the file from the FUSE server on this thread.
        if crate::process::open::on_served_mount(ldso) {
            bail!(
                "{} is on a FUSE mount: memtrace does not put uprobes in files on FUSE mounts \
                 (the kernel would read it from the FUSE server on memtrace's own thread), so \
                 it cannot stop the program before it runs",
                ldso.display()
            );
        }
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
    /// Removing a uprobe waits for the kernel to quiesce (an RCU grace period
    /// per probe: a tenth of a second or so each). Each link is closed from a
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

/// The probes of one uprobe_multi link: offsets in the allocator's file, and
/// a cookie for each.
#[derive(Default)]
struct LinkSites {
    offsets: Vec<u64>,
    cookies: Vec<u64>,
}

impl LinkSites {
    fn push(&mut self, offset: u64, cookie: u64) {
        self.offsets.push(offset);
        self.cookies.push(cookie);
    }

    fn len(&self) -> usize {
        self.offsets.len()
    }

    fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// A link of `prog` (loaded for `attach_type`) at these sites, bound to
    /// `pid`.
    fn attach(
        &self,
        prog: &OwnedFd,
        attach_type: u32,
        alloc: &Allocator,
        pid: u32,
    ) -> std::io::Result<OwnedFd> {
        multi::attach(
            prog.as_fd(),
            attach_type,
            &alloc.open_path,
            &self.offsets,
            &self.cookies,
            pid,
        )
    }
}

/// The functions probed at their result sites (see `exits`), by address.
///
/// Their probes tell the allocator's calls by return address and by
/// PENDING, not by marks: a mark is taken by its callee's entry probe, and
/// these have none (a mark left to a later site would need every path of
/// the callee, even those to an abort, to take it). So no mark is left for
/// them (`marks_left`), and the functions that jump into them keep even
/// their unsampled calls in PENDING (`pending_tails`).
///
/// Each function's plan must fit in RESULT_SITES with the ones before it
/// (`room` entries are left), and no mark may sit on one of its probes.
/// None unless `with_results`.
fn result_functions(
    alloc: &Allocator,
    marks: Option<&[allocator::InternalCall]>,
    with_results: bool,
    room: &mut usize,
) -> Vec<u64> {
    alloc
        .points
        .iter()
        .filter(|_| with_results)
        .filter(|p| matches!(p.role, Role::Alloc(_)))
        .filter(|p| {
            let Some(plan) = &p.results else {
                return false;
            };
            let offsets: Vec<u64> = plan.offsets().map(|d| p.file_offset + d).collect();
            let handoffs: Vec<u64> = p.handoff_sites().map(|(o, _)| o).collect();
            // (A hand-off is a session entry, which would take a mark into
            // the function, and there are none into these.)
            let marked = marks.iter().copied().flatten().any(|c| {
                offsets.contains(&c.file_offset)
                    || handoffs.contains(&c.file_offset)
                    || (!handoffs.is_empty() && c.callee == p.vaddr)
            });
            if marked || offsets.len() > *room {
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
            *room -= offsets.len();
            true
        })
        .map(|p| p.vaddr)
        .collect()
}

/// The marks left once those into `result_fns` are dropped, and the
/// functions that jump into one of those (the `tail_of` of a dropped jump).
fn marks_left(
    marks: Option<Vec<allocator::InternalCall>>,
    result_fns: &[u64],
) -> (Option<Vec<allocator::InternalCall>>, Vec<u64>) {
    let mut jump_in: Vec<u64> = Vec::new();
    let marks = marks.map(|m| {
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
    (marks, jump_in)
}

/// Functions whose unsampled calls stay in PENDING: with marks, those whose
/// jumps reach a probed function through other code (a jump in a probed
/// function is marked), and those that jump into a function probed at its
/// result sites (`jump_in`); else every tail caller.
fn pending_tails(
    marks: Option<&[allocator::InternalCall]>,
    jump_in: Vec<u64>,
    tail_callers: &[u64],
) -> Vec<u64> {
    match marks {
        Some(marks) => marks
            .iter()
            .filter(|c| c.kind == allocator::MarkKind::Check)
            .flat_map(|c| c.tail_of.iter().copied())
            .chain(jump_in)
            .collect(),
        None => tail_callers.to_vec(),
    }
}

/// Adds the sites and guards of `point`'s plan to `result_sites`; their
/// names, as `malloc+0x157 (jne)`.
fn add_result_sites(
    alloc: &Allocator,
    point: &AttachPoint,
    kind: AllocKind,
    plan: &crate::attach::exits::ExitPlan,
    result_sites: &mut Vec<(u64, memtrace_common::ResultSite)>,
) -> Vec<String> {
    let name = point.name();
    let mut names = Vec::new();
    for s in &plan.sites {
        result_sites.push((point.file_offset + s.delta, s.conf(kind)));
        names.push(format!("{name}+{:#x} ({})", s.delta, s.mnemonic));
    }
    for &g in &plan.guards {
        result_sites.push((
            point.file_offset + g,
            crate::attach::exits::guard_conf(kind),
        ));
        names.push(format!("{name}+{g:#x} (guard)"));
    }
    for h in &plan.handoffs {
        names.push(format!("{name}+{:#x} ({}: hand-off)", h.delta, h.mnemonic));
    }
    log::debug!(
        "{}:{name}: one probe per call, at its result sites{}: {}",
        alloc.module,
        if plan.handoffs.is_empty() {
            ""
        } else {
            " and hand-offs to the session on its slow paths"
        },
        plan.describe()
    );
    names
}

/// The session cookie of an allocating function's entry probe (see
/// `attach_multi`), with the flags that say where its calls are kept.
fn entry_cookie(
    alloc: &Allocator,
    maps: &[MapEntry],
    point: &AttachPoint,
    kind: AllocKind,
    tails: &[u64],
) -> Result<SiteCookie> {
    let at = allocator::vaddr(alloc, maps, point.probe_offset)
        .with_context(|| format!("{} is not mapped", point.probe_site()))?;
    Ok(SiteCookie::entry(
        at,
        kind,
        call_in_cookie(point),
        tails.contains(&point.vaddr),
    ))
}

/// The session cookie of a mark on the allocator's own call: its address in
/// the process and what it says about the callee's entry.
fn mark_cookie(
    alloc: &Allocator,
    maps: &[MapEntry],
    call: &allocator::InternalCall,
) -> Result<u64> {
    let at = allocator::vaddr(alloc, maps, call.file_offset)
        .with_context(|| format!("{} is not mapped", call.describe))?;
    log::debug!("marking the allocator's own call at {}", call.describe);
    Ok(SiteCookie::mark(at, call.kind).0)
}
