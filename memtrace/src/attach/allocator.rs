//! The allocators a process really uses, and where to probe them.
//!
//! Symbol lookup order decides which `malloc` (or `operator new`, or
//! `_rjem_sdallocx`) a process calls: the executable first, then the
//! libraries in load order, where an interposed allocator (LD_PRELOAD, or a
//! program linked against jemalloc/tcmalloc/mimalloc) comes before libc.
//! Probing glibc in a process whose allocations all go to jemalloc would
//! report a clean, empty result: `resolve` finds, for every allocator entry
//! point, the definition calls reach, and this module gathers them per
//! module ([`Allocator`]) with what the probes need: where each function is
//! probed, its result sites, and the allocator's own calls into probed
//! functions.
use std::path::{Path, PathBuf};

use memtrace_common::{AllocKind, FreeKind};
use object::{Object, ObjectSegment};
use thiserror::Error;

use crate::{
    attach::{
        placement::{self, Placement, choose_probe_site, probe_args},
        resolve::{self, ModuleFile, UntracedEntry},
    },
    process::{link_map, mapped::MappedFile, maps::MapEntry, namespaces, open::open_regular},
};

/// What a probe at an entry point does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Alloc(AllocKind),
    /// Frees the block in the argument its layout says.
    Free(FreeKind),
}

/// One probe: several exported names can share an address (glibc's memalign and
/// aligned_alloc are one function). Two uprobes at one address would both fire
/// and count the call twice, so there is one point per address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachPoint {
    pub role: Role,
    /// Its names, the one it is reported under first (see `entries::rank`).
    pub names: Vec<String>,
    /// Virtual address of the function in the ELF file.
    pub vaddr: u64,
    /// Offset of the function's first instruction in the file.
    pub file_offset: u64,
    /// Size of the function's code (0 when the symbol table does not say).
    pub size: u64,
    /// The function only ever leaves by returning (`placement::never_jumps_out`).
    pub never_jumps_out: bool,
    /// Offset in the file of the instruction the probes are attached to: the
    /// first one the kernel emulates rather than single-steps, when nothing
    /// before it can change what the probes see (see `placement`); else
    /// `file_offset`.
    pub probe_offset: u64,
    /// That instruction's mnemonic (`je`, `push`, ...), for logs and reports.
    pub probe_insn: String,
    /// The other sites of the function's entry cover, when its calls pass
    /// one of several (`exits::plan_entry_cover`): their file offsets and
    /// mnemonics. Each gets the same probes as `probe_offset`.
    pub more_sites: Vec<(u64, String)>,
    /// The sites among these where the function has moved some argument
    /// out of its own register (file offset, where the arguments are): the
    /// session's probe is told by its cookie. Classic probes are not, and
    /// probe such a function at its entry.
    pub moved_args: Vec<(u64, memtrace_common::ArgRegs)>,
    /// Where the function's outcome can be read inside it, so that a call
    /// costs one probe instead of an entry and a return probe (malloc only,
    /// see `exits`); None when there is no such plan (or not looked for).
    pub results: Option<crate::attach::exits::ExitPlan>,
}

impl AttachPoint {
    /// How far into the function the probes are: `free+3`.
    pub fn probe_delta(&self) -> u64 {
        self.probe_offset - self.file_offset
    }

    /// The name it is reported under.
    pub fn name(&self) -> &str {
        self.names.first().map_or("?", String::as_str)
    }

    /// The probe site as `name+delta (insn)`, e.g. `free+0x3 (je)`; a
    /// cover of several sites as `name+0x10 (je) +0x24 (jne)`.
    pub fn probe_site(&self) -> String {
        let mut s = format!(
            "{}+{:#x} ({})",
            self.name(),
            self.probe_delta(),
            self.probe_insn
        );
        for (offset, insn) in &self.more_sites {
            s += &format!(" +{:#x} ({insn})", offset - self.file_offset);
        }
        s
    }

    /// The file offsets of every entry probe site: `probe_offset`, then the
    /// cover's other sites.
    pub fn probe_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.probe_offset).chain(self.more_sites.iter().map(|(o, _)| *o))
    }

    /// Where the arguments are at the entry probe site at file offset `at`.
    pub fn args_at(&self, at: u64) -> memtrace_common::ArgRegs {
        self.moved_args
            .iter()
            .find(|(o, _)| *o == at)
            .map_or(memtrace_common::ArgRegs::AT_ENTRY, |(_, a)| *a)
    }

    /// The session's entry probes on the paths that leave a function probed
    /// at its result sites (`exits::HandOff`): file offsets, and where the
    /// arguments are there.
    pub fn handoff_sites(&self) -> impl Iterator<Item = (u64, memtrace_common::ArgRegs)> + '_ {
        let size = match self.role {
            Role::Alloc(kind) => placement::ABI_ARGS[kind.args().size as usize],
            Role::Free(_) => iced_x86::Register::RDI,
        };
        self.results
            .iter()
            .flat_map(|plan| &plan.handoffs)
            .map(move |h| {
                let moved = if h.size == size {
                    Vec::new()
                } else {
                    vec![(size, h.size)]
                };
                (self.file_offset + h.delta, arg_regs(&moved))
            })
    }

    /// The file offsets of the classic probes, which read the arguments in
    /// their own registers: the entry cover's, or the entry when the cover
    /// has moved an argument.
    pub fn classic_offsets(&self) -> Vec<u64> {
        if self.moved_args.is_empty() {
            self.probe_offsets().collect()
        } else {
            vec![self.file_offset]
        }
    }
}

/// The probed functions of one module.
#[derive(Debug)]
pub struct Allocator {
    /// The module's path as the target sees it (in /proc/PID/maps).
    pub module: String,
    /// A path through which the kernel can open that very file from here.
    pub open_path: PathBuf,
    pub points: Vec<AttachPoint>,
    /// Its functions that are not probed because they hand their calls to
    /// a probed function, as `realloc -> mi_heap_realloc`.
    pub forwards: Vec<String>,
    /// The probed functions' own calls and jumps into probed functions, or why
    /// they are not all known (see [`internal_calls`]).
    pub internal_calls: Result<Vec<InternalCall>, String>,
    /// Return addresses (in the file) of calls into probed functions made by
    /// code the probed functions branch to (see [`internal_returns`]).
    pub internal_returns: Vec<u64>,
    /// Start of the module's executable mapping in the target (to notice exec).
    pub text_start: u64,
}

/// Every allocator of a process: the modules whose functions memtrace
/// probes, in symbol lookup order, and what it cannot see.
#[derive(Debug)]
pub struct Allocators {
    /// At least one; the module `malloc` resolves to first (the one a
    /// report names as the allocator).
    pub modules: Vec<Allocator>,
    /// Allocator entry points the target may call that memtrace does not
    /// trace (see `resolve`), and those of the modules in `on_fuse`.
    pub untraced: Vec<UntracedEntry>,
    /// Allocator modules not probed: they are on FUSE mounts ([`probeable`]).
    pub on_fuse: Vec<String>,
}

impl Allocators {
    /// The module the process's `malloc` is in.
    pub fn primary(&self) -> &Allocator {
        &self.modules[0]
    }

    /// Every probed function's names, by module.
    pub fn points(&self) -> impl Iterator<Item = (&Allocator, &AttachPoint)> {
        self.modules
            .iter()
            .flat_map(|m| m.points.iter().map(move |p| (m, p)))
    }
}

/// What a mark says about the callee's entry: a probed function's `call`
/// (the allocator's own call), its `jmp` (a tail call, the caller's call), or
/// a jump in code a probed function called or jumped to (the callee's return
/// address says whose call it is). The BPF side reads it from the mark
/// site's attach cookie.
pub use memtrace_common::MarkKind;

/// The GOT slot a call or jump goes through, and the function the slot must
/// hold (checked in the target before marks are relied on: see
/// [`check_slots`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotBinding {
    /// The slot's address in the file.
    pub slot: u64,
    /// The address (in the file) of the function the name resolves to: the
    /// probed function, or a forwarder to it.
    pub holds: u64,
    /// The name the slot is bound by.
    pub name: String,
}

/// A call or jump in a probed function's code to a probed function (glibc's
/// realloc(NULL, n) jumps to malloc, realloc(p, 0) calls free), or a jump to
/// one in code they call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InternalCall {
    /// Offset in the file of the `call` or `jmp` instruction.
    pub file_offset: u64,
    pub kind: MarkKind,
    /// E.g. `realloc+0x40 (jmp malloc)`.
    pub describe: String,
    /// Made through a PLT stub or a GOT slot.
    pub via_slot: Option<SlotBinding>,
    /// Its address in the file's address space.
    pub site_vaddr: u64,
    /// The probed function it reaches (its address in the file).
    pub callee: u64,
    /// The probed functions (their addresses) whose calls go on into the
    /// callee by jumping: for a `Jump`, the function it is in; for a `Check`
    /// site, those that jump out of their code into code that reaches it
    /// (glibc's memalign jumps to `_mid_memalign`, which jumps to malloc).
    /// Their calls are still theirs in the callee.
    pub tail_of: Vec<u64>,
}

/// Where a branch through the GOT slot of a traced name leads, seen from
/// one module (see `resolve`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotTarget {
    /// To this module's probed function at `point`, through its definition
    /// at `holds` (the function itself, or a forwarder to it).
    Point { holds: u64, point: u64 },
    /// To a probed function of this other module.
    Elsewhere(String),
    /// To nothing memtrace probes.
    Nothing,
}

#[derive(Debug, Error)]
pub enum AllocatorError {
    #[error(
        "no allocator found in the target: none of its {modules} executable modules defines both \
         malloc and free{stripped}"
    )]
    NotFound { modules: usize, stripped: String },
    #[error(
        "the target's allocator is on a FUSE mount ({modules}): memtrace does not probe files \
         on FUSE mounts (the kernel would read them from the FUSE server on memtrace's own \
         thread, and a server that never answers would hold memtrace for good)"
    )]
    OnFuse { modules: String },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The point probing the function `name` at `vaddr` (`file_offset` in
/// `data`, `size` bytes, 0 if unknown): its probe site and, for malloc, its
/// result sites.
pub(crate) fn new_point(
    data: &[u8],
    name: &str,
    role: Role,
    vaddr: u64,
    file_offset: u64,
    size: u64,
) -> AttachPoint {
    let code = whole_function(data, file_offset, size);
    let (site, site_moved, more) = probe_sites(data, file_offset, size, role);
    let never_jumps_out = code.is_some_and(placement::never_jumps_out);
    // Result sites are planned for the functions whose only argument read
    // is the size (malloc, operator new, mi_heap_malloc, ...); a path that
    // leaves the function (a tail call to the slow path) is handed over to
    // the session there (`exits::HandOff`).
    let results = match (role, code) {
        (Role::Alloc(kind @ (AllocKind::Malloc | AllocKind::HeapMalloc)), Some(code))
            if !crate::attach::exits::disabled() =>
        {
            let size = placement::ABI_ARGS[kind.args().size as usize];
            result_plan(name, code, size)
        }
        _ => None,
    };
    log::debug!(
        "{name}: probe site +{:#x} ({}, {:?}): {}",
        site.delta,
        site.mnemonic,
        site.emulated,
        site.reason
    );
    let moved_args = std::iter::once(&site_moved)
        .chain(more.iter().map(|c| &c.moved))
        .zip(std::iter::once(site.delta).chain(more.iter().map(|c| c.delta)))
        .filter(|(m, _)| !m.is_empty())
        .map(|(m, delta)| (file_offset + delta, arg_regs(m)))
        .collect();
    let more_sites = more
        .into_iter()
        .map(|c| (file_offset + c.delta, c.mnemonic))
        .collect();
    AttachPoint {
        role,
        names: vec![name.to_string()],
        vaddr,
        file_offset,
        size,
        never_jumps_out,
        probe_offset: file_offset + site.delta,
        probe_insn: site.mnemonic,
        more_sites,
        moved_args,
        results,
    }
}

/// `moved` (an argument's own register, where it is) as the BPF side reads it.
fn arg_regs(moved: &[(iced_x86::Register, iced_x86::Register)]) -> memtrace_common::ArgRegs {
    use memtrace_common::ArgRegs;
    moved.iter().fold(ArgRegs::AT_ENTRY, |a, &(arg, reg)| {
        let n = placement::ABI_ARGS.iter().position(|&r| r == arg);
        match (n, pt_reg(reg)) {
            (Some(n), Some(r)) => a.with(n, r),
            // (The cover analysis only moves arguments between general
            // registers: pt_reg knows every one but rsp, never a holder.)
            _ => unreachable!("argument {arg:?} in {reg:?}"),
        }
    })
}

/// The [`PtReg`] of a full general register.
fn pt_reg(r: iced_x86::Register) -> Option<memtrace_common::PtReg> {
    use iced_x86::Register as R;
    use memtrace_common::PtReg as P;
    Some(match r {
        R::R15 => P::R15,
        R::R14 => P::R14,
        R::R13 => P::R13,
        R::R12 => P::R12,
        R::RBP => P::Rbp,
        R::RBX => P::Rbx,
        R::R11 => P::R11,
        R::R10 => P::R10,
        R::R9 => P::R9,
        R::R8 => P::R8,
        R::RAX => P::Rax,
        R::RCX => P::Rcx,
        R::RDX => P::Rdx,
        R::RSI => P::Rsi,
        R::RDI => P::Rdi,
        _ => return None,
    })
}

/// Where malloc's result can be read (`exits`), logged either way: None
/// when it keeps its entry and return probes.
fn result_plan(
    name: &str,
    code: &[u8],
    size: iced_x86::Register,
) -> Option<crate::attach::exits::ExitPlan> {
    match crate::attach::exits::plan_exits(code, size) {
        Ok(plan) => {
            log::debug!("{name}: result sites {}", plan.describe());
            Some(plan)
        }
        Err(why) => {
            log::debug!("{name}: no result sites ({why}): entry and return probes");
            None
        }
    }
}

/// Every call and jump in the probed functions' code into a probed function,
/// directly, through a PLT stub or through a GOT slot; and every jump into a
/// probed function in the code those functions call or jump to outside
/// themselves, followed through its jumps (glibc's posix_memalign calls
/// `_mid_memalign`, which jumps to malloc: malloc's return address is in
/// posix_memalign). Each gets a probe that marks the callee's coming entry
/// (see `memtrace_common::CallMarks::BySite`), so that no other entry needs
/// to look at its caller.
///
/// Fails unless every such branch is known: a probed function of unknown
/// size, code that does not decode, an indirect branch (its target could be a
/// probed function), a conditional jump into a probed function (a probe on it
/// would fire whether or not it is taken), a branch sitting where a probe
/// already is, or more code to follow than [`MAX_FOLLOWED_INSNS`]. The BPF
/// side then tells the allocator's calls by their return address.
pub fn internal_calls(
    module: &ModuleFile<'_>,
    points: &[AttachPoint],
    forwards: &[(u64, u64)],
    slots: &dyn Fn(&str) -> SlotTarget,
) -> Result<Vec<InternalCall>, String> {
    let finder = CallFinder {
        module,
        points,
        forwards,
        slots,
    };
    let mut out = Vec::new();
    // Code outside the probed functions that they branch to, and the probed
    // function that jumped there (rather than called it).
    let mut outside: Vec<(u64, Option<u64>)> = Vec::new();
    for p in points {
        finder.in_function(p, &mut out, &mut outside)?;
    }
    for (todo, jumped_from) in outside_starts(points, &outside) {
        let found = finder.follow_outside(todo)?;
        match jumped_from {
            // Every site, once.
            None => {
                for (at, entered) in found {
                    finder.mark(
                        &mut out,
                        at,
                        format!("{at:#x}"),
                        MarkKind::Check,
                        entered,
                        Vec::new(),
                    )?;
                }
            }
            // The sites the probed function at `from` reaches by jumping.
            Some(from) => {
                for (at, _) in found {
                    for c in out.iter_mut().filter(|c| c.site_vaddr == at) {
                        c.tail_of.push(from);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The return addresses of the calls that code outside the probed functions,
/// reached from them, makes into a probed function: directly, through the
/// PLT, or into code that jumps to one (mimalloc's `mi_heap_realloc` jumps
/// into its internal realloc, which calls `mi_free` for the old block). Such
/// a call is part of the outer one; with these return addresses among the
/// allocator's text (`ALLOCATOR_TEXT`), an entry tells it by its return
/// address. Marks do not cover them: a module that has any is probed with
/// its own calls told by return address.
///
/// Follows the code the probed functions call or jump to through its jumps
/// (an indirect one is not followed), not into what it calls in turn: code
/// further away is the C library's as much as the allocator's (glibc's
/// malloc can reach stdio through abort), whose calls are users' calls.
/// Up to [`MAX_FOLLOWED_INSNS`] instructions in all (then what was found so
/// far).
pub fn internal_returns(
    module: &ModuleFile<'_>,
    points: &[AttachPoint],
    forwards: &[(u64, u64)],
    slots: &dyn Fn(&str) -> SlotTarget,
) -> Vec<u64> {
    let finder = CallFinder {
        module,
        points,
        forwards,
        slots,
    };
    let inside = |a: u64| points.iter().any(|p| a >= p.vaddr && a < p.vaddr + p.size);
    // Whether a branch to `target` enters a probed function (of any module).
    let enters = |target: u64, mem: bool| !matches!(finder.callee(target, mem), Ok(None));
    let mut starts: Vec<u64> = Vec::new();
    for p in points {
        let Some(code) = whole_function(module.data, p.file_offset, p.size) else {
            continue;
        };
        for (target, mem) in crate::attach::resolve::known_branches(code, p.vaddr) {
            if !mem && !inside(target) && !enters(target, false) {
                starts.push(target);
            }
        }
    }
    let mut seen_starts = std::collections::HashSet::new();
    // Starts that reach a probed function by jumping; calls (return
    // address, what they call: maybe a start, or None for a probed function).
    let mut reaching = std::collections::HashSet::new();
    let mut calls: Vec<(u64, Option<u64>)> = Vec::new();
    let mut budget = MAX_FOLLOWED_INSNS;
    while let Some(start) = starts.pop() {
        if !seen_starts.insert(start) || budget == 0 {
            continue;
        }
        let mut todo = vec![start];
        let mut seen = std::collections::HashSet::new();
        while let Some(mut at) = todo.pop() {
            while budget > 0 && seen.insert(at) {
                budget -= 1;
                let Some(code) = vaddr_to_file_offset(&module.file, at)
                    .and_then(|o| module.data.get(o as usize..))
                else {
                    break;
                };
                let mut decoder =
                    iced_x86::Decoder::with_ip(64, code, at, iced_x86::DecoderOptions::NONE);
                let insn = decoder.decode();
                if insn.is_invalid() {
                    break;
                }
                use iced_x86::FlowControl as F;
                let next = insn.next_ip();
                match insn.flow_control() {
                    F::Next | F::IndirectCall => at = next,
                    F::Call => {
                        let target = insn.near_branch_target();
                        if enters(target, false) {
                            calls.push((next, None));
                        } else if !inside(target) {
                            calls.push((next, Some(target)));
                        }
                        at = next;
                    }
                    F::UnconditionalBranch | F::ConditionalBranch => {
                        let target = insn.near_branch_target();
                        if enters(target, false) {
                            reaching.insert(start);
                        } else if !inside(target) {
                            todo.push(target);
                        }
                        if insn.flow_control() == F::UnconditionalBranch {
                            break;
                        }
                        at = next;
                    }
                    F::IndirectBranch => {
                        if insn.is_ip_rel_memory_operand()
                            && enters(insn.ip_rel_memory_address(), true)
                        {
                            reaching.insert(start);
                        }
                        break;
                    }
                    _ => break,
                }
            }
        }
    }
    if budget == 0 {
        log::debug!(
            "more than {MAX_FOLLOWED_INSNS} instructions of code the allocator calls: not all followed"
        );
    }
    let mut out: Vec<u64> = calls
        .into_iter()
        .filter(|(_, to)| to.is_none_or(|t| reaching.contains(&t)))
        .map(|(ret, _)| ret)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Where to follow the code outside the probed functions from: through its
/// jumps (not into what it calls: a call made there has its return address
/// there, outside the probed functions), once from every start that a
/// probed function called, and once from those each one jumped to (with
/// that function's address).
fn outside_starts(
    points: &[AttachPoint],
    outside: &[(u64, Option<u64>)],
) -> Vec<(Vec<u64>, Option<u64>)> {
    let mut starts: Vec<(Vec<u64>, Option<u64>)> =
        vec![(outside.iter().map(|&(t, _)| t).collect(), None)];
    for p in points {
        let jumped: Vec<u64> = outside
            .iter()
            .filter(|&&(_, from)| from == Some(p.vaddr))
            .map(|&(t, _)| t)
            .collect();
        if !jumped.is_empty() {
            starts.push((jumped, Some(p.vaddr)));
        }
    }
    starts
}

/// What [`internal_calls`] reads of the allocator's file.
struct CallFinder<'a> {
    module: &'a ModuleFile<'a>,
    points: &'a [AttachPoint],
    /// Functions not probed that hand their calls to a probed one: (their
    /// address, the probed function's).
    forwards: &'a [(u64, u64)],
    slots: &'a dyn Fn(&str) -> SlotTarget,
}

impl<'a> CallFinder<'a> {
    /// The probed function at `vaddr`.
    fn point(&self, vaddr: u64) -> Option<&'a AttachPoint> {
        self.points.iter().find(|q| q.vaddr == vaddr)
    }

    /// What a branch to `target` (through memory at `target` if
    /// `through_memory`) enters: a probed function (and the GOT slot it goes
    /// through), Ok(None) for anything else.
    fn callee(&self, target: u64, through_memory: bool) -> Result<Option<Entered<'a>>, String> {
        let Some(slot) = self.module.slot_of(target, through_memory)? else {
            // At its first instruction, or in those its probe site comes
            // after; or a function that hands its calls on to one.
            if let Some(q) = self
                .points
                .iter()
                .find(|q| target >= q.vaddr && target <= q.vaddr + q.probe_delta())
            {
                return Ok(Some((q, None)));
            }
            return Ok(self
                .forwards
                .iter()
                .find(|(at, _)| *at == target)
                .and_then(|&(_, to)| self.point(to))
                .map(|q| (q, None)));
        };
        let Some(name) = self.module.slot_name(slot) else {
            return Ok(None);
        };
        match (self.slots)(&name) {
            SlotTarget::Nothing => Ok(None),
            SlotTarget::Elsewhere(module) => Err(format!(
                "reaches {name} through the GOT, probed in {module}"
            )),
            SlotTarget::Point { holds, point } => {
                let q = self
                    .point(point)
                    .ok_or_else(|| format!("reaches {name}, not probed here"))?;
                Ok(Some((q, Some(SlotBinding { slot, holds, name }))))
            }
        }
    }

    /// Adds the branch at `at` (`here` in messages) into `entered` to `out`;
    /// Err if no probe can go on it.
    fn mark(
        &self,
        out: &mut Vec<InternalCall>,
        at: u64,
        here: String,
        kind: MarkKind,
        (q, via_slot): Entered<'_>,
        tail_of: Vec<u64>,
    ) -> Result<(), String> {
        let file_offset = vaddr_to_file_offset(&self.module.file, at)
            .ok_or_else(|| format!("{here}: not in the file"))?;
        if self
            .points
            .iter()
            .any(|p| p.probe_offsets().any(|o| o == file_offset))
        {
            return Err(format!("{here}: a probe site already"));
        }
        let insn = if kind == MarkKind::Call {
            "call"
        } else {
            "jmp"
        };
        out.push(InternalCall {
            file_offset,
            site_vaddr: at,
            kind,
            describe: format!("{here} ({insn} {})", q.name()),
            callee: q.vaddr,
            via_slot,
            tail_of,
        });
        Ok(())
    }

    /// Marks the branches in `p`'s code into probed functions, and adds
    /// those out of the probed functions' code to `outside`.
    fn in_function(
        &self,
        p: &AttachPoint,
        out: &mut Vec<InternalCall>,
        outside: &mut Vec<(u64, Option<u64>)>,
    ) -> Result<(), String> {
        let code = whole_function(self.module.data, p.file_offset, p.size)
            .ok_or_else(|| format!("the size of {} is unknown", p.name()))?;
        let branches =
            placement::direct_branches(code, p.vaddr).map_err(|e| format!("{}: {e}", p.name()))?;
        for (b, through_memory) in branches {
            let here = || format!("{}+{:#x}", p.name(), b.offset);
            let Some(entered) = self
                .callee(b.target, through_memory)
                .map_err(|e| format!("{}: {e}", here()))?
            else {
                let inside = b.target >= p.vaddr && b.target < p.vaddr + p.size;
                if !through_memory && !inside {
                    let jumped = b.kind != placement::BranchKind::Call;
                    outside.push((b.target, jumped.then_some(p.vaddr)));
                }
                continue;
            };
            let (kind, tail_of) = match b.kind {
                placement::BranchKind::Call => (MarkKind::Call, Vec::new()),
                placement::BranchKind::Jump => (MarkKind::Jump, vec![p.vaddr]),
                placement::BranchKind::ConditionalJump => {
                    return Err(format!(
                        "{}: a conditional jump into {}",
                        here(),
                        entered.0.name()
                    ));
                }
            };
            self.mark(out, p.vaddr + b.offset, here(), kind, entered, tail_of)?;
        }
        Ok(())
    }

    /// The jumps into probed functions in the code reached from `todo`
    /// through jumps, by their addresses.
    fn follow_outside(&self, mut todo: Vec<u64>) -> Result<Vec<(u64, Entered<'a>)>, String> {
        let mut seen = std::collections::HashSet::new();
        let mut decoded = 0;
        let mut found = Vec::new();
        while let Some(start) = todo.pop() {
            let mut at = start;
            loop {
                if !seen.insert(at) {
                    break;
                }
                decoded += 1;
                if decoded > MAX_FOLLOWED_INSNS {
                    return Err(format!(
                        "more than {MAX_FOLLOWED_INSNS} instructions of code the allocator calls"
                    ));
                }
                match self.follow_insn(at, &mut todo, &mut found)? {
                    Some(next) => at = next,
                    None => break,
                }
            }
        }
        Ok(found)
    }

    /// Follows the instruction at `at`: a jump into a probed function goes
    /// to `found`, one elsewhere to `todo`. The next instruction to follow in
    /// line, None where the line ends.
    fn follow_insn(
        &self,
        at: u64,
        todo: &mut Vec<u64>,
        found: &mut Vec<(u64, Entered<'a>)>,
    ) -> Result<Option<u64>, String> {
        use iced_x86::FlowControl as F;
        let here = || format!("{at:#x}");
        let code = vaddr_to_file_offset(&self.module.file, at)
            .and_then(|o| self.module.data.get(o as usize..))
            .ok_or_else(|| format!("{}: code the allocator calls, not in the file", here()))?;
        let mut decoder = iced_x86::Decoder::with_ip(64, code, at, iced_x86::DecoderOptions::NONE);
        let insn = decoder.decode();
        if insn.is_invalid() {
            return Err(format!("{}: undecodable code the allocator calls", here()));
        }
        let next = insn.next_ip();
        match insn.flow_control() {
            F::Next | F::Call | F::IndirectCall => Ok(Some(next)),
            F::Return | F::Interrupt | F::Exception => Ok(None),
            F::UnconditionalBranch | F::ConditionalBranch => {
                let target = insn.near_branch_target();
                let conditional = insn.flow_control() == F::ConditionalBranch;
                match self
                    .callee(target, false)
                    .map_err(|e| format!("{}: {e}", here()))?
                {
                    Some((q, _)) if conditional => {
                        return Err(format!("{}: a conditional jump into {}", here(), q.name()));
                    }
                    Some(entered) => found.push((at, entered)),
                    None => todo.push(target),
                }
                Ok(conditional.then_some(next))
            }
            F::IndirectBranch if insn.is_ip_rel_memory_operand() => {
                // A tail call through a GOT slot.
                let slot = insn.ip_rel_memory_address();
                if let Some(entered) = self
                    .callee(slot, true)
                    .map_err(|e| format!("{}: {e}", here()))?
                {
                    found.push((at, entered));
                }
                Ok(None)
            }
            _ => Err(format!(
                "{}: {:?} in code the allocator calls",
                here(),
                insn.mnemonic()
            )),
        }
    }
}

/// A probed function a branch enters, and the GOT slot it goes through.
type Entered<'a> = (&'a AttachPoint, Option<SlotBinding>);

/// Instructions of code outside the probed functions that [`internal_calls`]
/// follows at most.
pub const MAX_FOLLOWED_INSNS: usize = 200_000;

/// Checks that every GOT slot an internal call goes through reaches the probed
/// function in the target: a slot bound to another module's function would
/// leave a mark no entry takes. `read_word(address)` reads the target's
/// memory. A slot not bound yet (lazy binding: it still points into the
/// module's own PLT) will be bound to the first definition of the name in
/// lookup order, which `resolve` found to be this module's.
pub fn check_slots(
    alloc: &Allocator,
    maps: &[MapEntry],
    read_word: impl Fn(u64) -> Option<u64>,
) -> Result<(), String> {
    let calls = alloc.internal_calls.as_ref().map_err(Clone::clone)?;
    // Every segment of a module is mapped at its address plus one bias.
    let bias = alloc
        .points
        .first()
        .and_then(|p| Some(vaddr(alloc, maps, p.file_offset)?.wrapping_sub(p.vaddr)))
        .ok_or("the allocator is not mapped")?;
    let in_module = |v: u64| {
        maps.iter()
            .any(|m| m.path.as_deref() == Some(alloc.module.as_str()) && v >= m.start && v < m.end)
    };
    for c in calls {
        let Some(b) = &c.via_slot else {
            continue;
        };
        let want = b.holds.wrapping_add(bias);
        match read_word(b.slot.wrapping_add(bias)) {
            Some(v) if v == want || in_module(v) => {}
            Some(v) => {
                return Err(format!(
                    "{}: its GOT slot holds {v:#x}, not the probed function ({want:#x}): \
                     bound to another module's {}",
                    c.describe, b.name
                ));
            }
            None => return Err(format!("{}: its GOT slot cannot be read", c.describe)),
        }
    }
    Ok(())
}

/// The code of a function of known size, if `data` holds all of it.
pub(crate) fn whole_function(data: &[u8], file_offset: u64, size: u64) -> Option<&[u8]> {
    let start = usize::try_from(file_offset).ok()?;
    let end = start.checked_add(usize::try_from(size).ok()?)?;
    (size > 0).then(|| data.get(start..end)).flatten()
}

/// Where to probe the function whose code starts at `file_offset` in `data`
/// (`size` bytes, 0 if unknown): its entry cover when its whole code is
/// known (`exits::plan_entry_cover`: the first site, and the others), else
/// `placement::choose_probe_site`. A function whose cover fails is probed at
/// +0, and the log says why.
fn probe_sites(
    data: &[u8],
    file_offset: u64,
    size: u64,
    role: Role,
) -> (Placement, Moved, Vec<crate::attach::exits::CoverSite>) {
    let Some(code) = whole_function(data, file_offset, size) else {
        return (
            probe_site(data, file_offset, size, role),
            Vec::new(),
            Vec::new(),
        );
    };
    // An allocating function's session probe reads its arguments where its
    // cookie says; free's (a plain uprobe_multi link) in their own registers.
    let may_move = matches!(role, Role::Alloc(_));
    match crate::attach::exits::plan_entry_cover(code, &probe_args(role), may_move) {
        Ok(mut sites) => {
            let first = sites.remove(0);
            let moved = first.moved;
            let site = Placement {
                delta: first.delta,
                mnemonic: first.mnemonic,
                emulated: Some(first.emulated),
                reason: format!(
                    "entry cover of {} site(s), checked on every path",
                    sites.len() + 1
                ),
            };
            (site, moved, sites)
        }
        Err(why) => {
            let first =
                iced_x86::Decoder::with_ip(64, code, 0, iced_x86::DecoderOptions::NONE).decode();
            let site = Placement {
                delta: 0,
                mnemonic: format!("{:?}", first.mnemonic()).to_lowercase(),
                emulated: placement::kernel_emulates(&code[..first.len().min(code.len())]),
                reason: format!("no entry cover ({why}): probed at +0"),
            };
            (site, Vec::new(), Vec::new())
        }
    }
}

/// Arguments moved out of their own registers at a site: (the argument's
/// register at the entry, the register holding it there).
type Moved = Vec<(iced_x86::Register, iced_x86::Register)>;

/// [`choose_probe_site`] on the first bytes at `file_offset` (`size`, 0 if
/// unknown).
fn probe_site(data: &[u8], file_offset: u64, size: u64, role: Role) -> Placement {
    let start = (file_offset as usize).min(data.len());
    let len = if size > 0 {
        (size as usize).min(placement::MAX_BODY_BYTES)
    } else {
        placement::MAX_HEAD_BYTES
    };
    let code = &data[start..start.saturating_add(len).min(data.len())];
    choose_probe_site(code, &probe_args(role))
}

/// Maps a virtual address to its offset in the file through the PT_LOAD segment
/// that contains it.
pub fn vaddr_to_file_offset(file: &object::File<'_>, vaddr: u64) -> Option<u64> {
    file.segments().find_map(|seg| {
        let (off, size) = seg.file_range();
        let start = seg.address();
        (vaddr >= start && vaddr < start + size).then(|| vaddr - start + off)
    })
}

/// Executable file-backed modules of a process, once each: the executable
/// first, libc last, the others in the order of their mappings (the order
/// symbol lookup searches them when the link map cannot be read, see
/// [`lookup_order`]).
pub fn candidate_modules<'a>(maps: &'a [MapEntry], exe: Option<&str>) -> Vec<&'a MapEntry> {
    let mut seen = std::collections::HashSet::new();
    let mut mods: Vec<&MapEntry> = maps
        .iter()
        .filter(|m| m.is_exec() && m.is_file_backed())
        .filter(|m| seen.insert(m.path.clone()))
        .collect();
    let rank = |m: &MapEntry| {
        let path = m.path.as_deref().unwrap_or("");
        if Some(path) == exe {
            0
        } else if link_map::is_libc(path) {
            2
        } else {
            1
        }
    };
    mods.sort_by_key(|m| rank(m));
    mods
}

/// `mods` in the order of `order` (the link map's: symbol lookup order),
/// those it does not name after them in their own order.
pub fn lookup_order<'a>(mods: Vec<&'a MapEntry>, order: &[String]) -> Vec<&'a MapEntry> {
    let pos = |m: &MapEntry| {
        let path = m.path.as_deref().unwrap_or("");
        order.iter().position(|p| p == path).unwrap_or(order.len())
    };
    let mut mods = mods;
    // Stable: the ones the link map does not name keep their order.
    mods.sort_by_key(|m| pos(m));
    mods
}

/// Path through which this process can open (and probe) a file mapped by
/// `pid`: via the target's root (containers), or via `map_files` for a file
/// deleted since (its path may name another file now) and for a chrooted
/// target, whose maps name files as memtrace sees them, not under its root
/// ([`namespaces::maps_paths_in_root`]).
pub fn open_path(pid: u32, m: &MapEntry) -> PathBuf {
    if m.deleted || !namespaces::maps_paths_in_root(pid) {
        PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
    } else {
        let p = m.path.as_deref().unwrap_or("");
        Path::new(&format!("/proc/{pid}/root")).join(p.trim_start_matches('/'))
    }
}

/// Where `file_offset` of the allocator's module is mapped in the process.
pub fn vaddr(alloc: &Allocator, maps: &[MapEntry], file_offset: u64) -> Option<u64> {
    let m = maps.iter().find(|m| {
        m.is_exec()
            && m.path.as_deref() == Some(alloc.module.as_str())
            && file_offset >= m.offset
            && file_offset < m.offset + m.len()
    })?;
    Some(m.start + (file_offset - m.offset))
}

/// The probed functions (their addresses) whose calls may reach another
/// probed function by jumping: glibc's realloc(NULL, n) jumps to malloc,
/// memalign to `_mid_memalign`, which jumps to malloc. Such a tail call is one
/// call, two entries. When calls are told by their return address (no marks),
/// an unsampled call of these functions must stay in PENDING for the inner
/// entry to know it (see `memtrace_common::SITE_UNSAMPLED_PENDING`).
///
/// From the internal calls' `tail_of` when they are known; else every
/// function that jumps out of its code at all (`placement::never_jumps_out`).
pub fn tail_callers(
    points: &[AttachPoint],
    internal_calls: &Result<Vec<InternalCall>, String>,
) -> Vec<u64> {
    let mut out: Vec<u64> = match internal_calls {
        Ok(calls) => calls
            .iter()
            .flat_map(|c| c.tail_of.iter().copied())
            .collect(),
        Err(_) => points
            .iter()
            .filter(|p| !p.never_jumps_out && matches!(p.role, Role::Alloc(_)))
            .map(|p| p.vaddr)
            .collect(),
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// Where the probed functions' code is in the target's address space. An
/// allocator call made from inside one of them is part of the outer call (glibc's
/// realloc(p, 0) calls free; posix_memalign calls malloc), and the BPF side must
/// not count it again.
pub fn text_ranges(alloc: &Allocator, maps: &[MapEntry]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = alloc
        .points
        .iter()
        .filter(|p| p.size > 0)
        .filter_map(|p| {
            let start = vaddr(alloc, maps, p.file_offset)?;
            Some((start, start + p.size))
        })
        .collect();
    out.sort_unstable();
    out
}

/// [`text_ranges`] of every module, and the return address of each of their
/// [`internal_returns`] (a range of one byte), sorted.
pub fn all_text_ranges(allocs: &Allocators, maps: &[MapEntry]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for a in &allocs.modules {
        out.extend(text_ranges(a, maps));
        let bias = a
            .points
            .first()
            .and_then(|p| Some(vaddr(a, maps, p.file_offset)?.wrapping_sub(p.vaddr)));
        if let Some(bias) = bias {
            out.extend(a.internal_returns.iter().map(|&r| {
                let at = r.wrapping_add(bias);
                (at, at + 1)
            }));
        }
    }
    out.sort_unstable();
    out
}

/// How many ranges [`all_text_ranges`] gives: every probed function must have
/// one for uprobe sessions.
pub fn text_ranges_needed(allocs: &Allocators) -> usize {
    allocs
        .modules
        .iter()
        .map(|a| a.points.len() + a.internal_returns.len())
        .sum()
}

/// A module of the target, mapped here for reading.
struct Mapped<'m> {
    entry: &'m MapEntry,
    open_path: PathBuf,
    data: MappedFile,
}

/// Opens and maps the target's executable modules, in symbol lookup order.
fn map_modules<'m>(
    pid: u32,
    maps: &'m [MapEntry],
    exe: Option<&str>,
) -> Result<Vec<Mapped<'m>>, AllocatorError> {
    let mut out = Vec::new();
    for m in candidate_modules(maps, exe) {
        let path = open_path(pid, m);
        let file = open_regular(&path).map_err(|e| AllocatorError::Io {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        // A file the target names: mapped so that a truncation reads as zeros,
        // and so that another tool's uprobe does not show in the code decoded
        // from it.
        match MappedFile::map_unprobed(&file) {
            Ok(data) => out.push(Mapped {
                entry: m,
                open_path: path,
                data,
            }),
            Err(e) => log::debug!("cannot map {}: {e}", path.display()),
        }
    }
    // The link map gives the real order; the executable is read for where
    // the loader wrote its address.
    let order = out
        .iter()
        .find(|m| m.entry.path.as_deref() == exe)
        .and_then(|m| link_map::lookup_order(pid, exe?, &m.data, maps));
    match &order {
        Some(order) => {
            let entries = lookup_order(out.iter().map(|m| m.entry).collect(), order);
            out.sort_by_key(|m| entries.iter().position(|e| std::ptr::eq(*e, m.entry)));
        }
        None => log::debug!(
            "the target's link map cannot be read: modules searched in the order of their mappings"
        ),
    }
    Ok(out)
}

/// Finds the allocators the process uses and their probe points; with
/// `pymalloc`, CPython's object allocator among them (`entries::PYMALLOC_API`).
pub fn find_allocators(
    pid: u32,
    maps: &[MapEntry],
    pymalloc: bool,
) -> Result<Allocators, AllocatorError> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| {
            p.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string()
        });
    let mapped = map_modules(pid, maps, exe.as_deref())?;
    let mut files = Vec::new();
    let mut which = Vec::new();
    for (k, m) in mapped.iter().enumerate() {
        let path = m.entry.path.clone().unwrap_or_default();
        match ModuleFile::parse(&path, &m.data, m.entry.path == exe) {
            Ok(f) => {
                files.push(f);
                which.push(k);
            }
            Err(e) => log::debug!(
                "{}: not an ELF file memtrace can read: {e}",
                m.open_path.display()
            ),
        }
    }
    let resolved = resolve::resolve(&files, pymalloc);
    let mut stripped = Vec::new();
    let mut modules = Vec::new();
    let mut untraced = resolved.untraced;
    let mut on_fuse = Vec::new();
    for (plan, &k) in resolved.modules.into_iter().zip(&which) {
        let m = &mapped[k];
        let path = m.entry.path.clone().unwrap_or_default();
        if plan.no_symbols {
            stripped.push(path.clone());
        }
        if plan.points.is_empty() {
            continue;
        }
        if !probeable(pid, m.entry) {
            untraced.extend(refused_entries(&path, &plan.points));
            on_fuse.push(path);
            continue;
        }
        modules.push(allocator_of(m, plan));
    }
    untraced.sort();
    untraced.dedup();
    if modules.is_empty() {
        if !on_fuse.is_empty() {
            return Err(AllocatorError::OnFuse {
                modules: on_fuse.join(", "),
            });
        }
        let stripped = if stripped.is_empty() {
            String::new()
        } else {
            format!(
                " ({} has no symbol table: is it stripped?)",
                stripped.join(", ")
            )
        };
        return Err(AllocatorError::NotFound {
            modules: mapped.len(),
            stripped,
        });
    }
    // The module whose malloc the process calls comes first.
    if let Some(k) = modules.iter().position(|a| {
        a.points
            .iter()
            .any(|p| p.names.iter().any(|n| n == "malloc"))
    }) {
        modules[..=k].rotate_right(1);
    }
    Ok(Allocators {
        modules,
        untraced,
        on_fuse,
    })
}

/// The probed functions of module `m`, as `plan` has them.
fn allocator_of(m: &Mapped<'_>, plan: resolve::ModulePlan) -> Allocator {
    for f in &plan.forwards {
        log::debug!(
            "{}: {} is not probed: its calls go to {}",
            m.entry.path.as_deref().unwrap_or("?"),
            f.name,
            f.to
        );
    }
    Allocator {
        module: m.entry.path.clone().unwrap_or_default(),
        open_path: m.open_path.clone(),
        points: plan.points,
        forwards: plan
            .forwards
            .iter()
            .map(|f| format!("{} -> {}", f.name, f.to))
            .collect(),
        internal_calls: plan.internal_calls,
        internal_returns: plan.internal_returns,
        text_start: m.entry.start,
    }
}

/// Why a module on a FUSE mount is not probed (see [`probeable`]).
pub const ON_FUSE: &str = "on a FUSE mount: not probed";

/// Whether memtrace may put uprobes in the file `pid` maps at `m`: not if it
/// is on a FUSE mount. Attaching a uprobe makes the kernel read the probed
/// page of the file on memtrace's own thread (and aya reads a file it
/// resolves a symbol in): a server that never answers would hold memtrace
/// for good, unkillable. A copy of the file would not do: a uprobe is
/// attached to the inode the target maps. Told by the mapping's device, so
/// nothing on the mount is asked.
pub fn probeable(pid: u32, m: &MapEntry) -> bool {
    !crate::process::served::device_served(pid, (m.dev_major, m.dev_minor))
}

/// Every entry point of a module that is not probed, with why.
fn refused_entries(module: &str, points: &[AttachPoint]) -> Vec<UntracedEntry> {
    points
        .iter()
        .flat_map(|p| &p.names)
        .map(|name| UntracedEntry {
            name: name.clone(),
            module: module.to_owned(),
            reason: Some(ON_FUSE.to_owned()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// glibc on its own, as a plain C program uses it.
    fn glibc() -> (Vec<u8>, resolve::ModulePlan) {
        let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").expect("glibc");
        let plan = resolve::standalone("/lib/x86_64-linux-gnu/libc.so.6", &data).unwrap();
        (data, plan)
    }

    /// The point named `name`.
    fn named<'a>(points: &'a [AttachPoint], name: &str) -> &'a AttachPoint {
        points
            .iter()
            .find(|p| p.names.iter().any(|n| n == name))
            .unwrap_or_else(|| panic!("no point {name}: {points:#?}"))
    }

    #[test]
    fn glibc_entry_points_are_deduplicated_by_address() {
        let (_, syms) = glibc();
        let names: Vec<_> = syms.points.iter().flat_map(|p| p.names.clone()).collect();
        for n in [
            "malloc",
            "calloc",
            "realloc",
            "reallocarray",
            "free",
            "posix_memalign",
        ] {
            assert!(names.iter().any(|m| m == n), "{n} missing from {names:?}");
        }
        // glibc: memalign and aligned_alloc are one function, and so are
        // free and cfree; each is reported under its C name.
        let memalign = named(&syms.points, "memalign");
        assert_eq!(
            memalign.names,
            ["memalign", "aligned_alloc", "__libc_memalign"],
            "{memalign:?}"
        );
        assert_eq!(
            named(&syms.points, "free").names,
            ["free", "cfree", "__libc_free"]
        );
        assert_eq!(
            named(&syms.points, "malloc").names,
            ["malloc", "__libc_malloc"]
        );
        let mut addrs: Vec<_> = syms.points.iter().map(|p| p.vaddr).collect();
        addrs.dedup();
        assert_eq!(addrs.len(), syms.points.len());
        // libc's text is mapped at its file offset.
        assert!(syms.points.iter().all(|p| p.file_offset == p.vaddr));
    }

    /// Debian 12's glibc: realloc jumps to malloc (realloc(NULL, n)), calls
    /// free (realloc(p, 0)) and malloc (moving an mmapped block), reallocarray
    /// jumps to realloc through its PLT stub, and `_mid_memalign` (called by
    /// posix_memalign, jumped to by memalign, valloc and pvalloc) jumps to
    /// malloc for small alignments. Nothing else in the probed functions, or
    /// in what they call, enters one of them (their other calls go to
    /// `_int_malloc`, locks, `memcpy@plt` and the like).
    #[test]
    fn glibc_internal_calls() {
        let (data, syms) = glibc();
        let calls = syms.internal_calls.clone().expect("every branch known");
        let mut got: Vec<_> = calls
            .iter()
            .map(|c| {
                // The function and the branch, without this build's offsets
                // (code outside the probed functions is named by its address).
                let (func, branch) = match c.describe.split_once('+') {
                    Some((func, rest)) => (func, rest.split_once(' ').unwrap().1),
                    None => ("outside", c.describe.split_once(' ').unwrap().1),
                };
                format!("{func} {branch} {}", c.via_slot.is_some())
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                "outside (jmp malloc) false",
                "realloc (call free) false",
                "realloc (call malloc) false",
                "realloc (call malloc) false",
                "realloc (jmp malloc) false",
                "reallocarray (jmp realloc) true",
            ],
            "{calls:#?}"
        );
        for c in &calls {
            let at = c.file_offset as usize;
            // The probe goes on the call (e8) or jmp (e9/eb) itself.
            assert!(
                matches!(data[at], 0xe8 | 0xe9 | 0xeb),
                "{c:?}: {:x?}",
                &data[at..at + 5]
            );
            let kind = match data[at] {
                0xe8 => MarkKind::Call,
                _ if c.describe.starts_with("0x") => MarkKind::Check,
                _ => MarkKind::Jump,
            };
            assert_eq!(c.kind, kind, "{c:?}");
        }
        // memalign (aligned_alloc), valloc and pvalloc jump to
        // `_mid_memalign`; posix_memalign calls it.
        let check = calls.iter().find(|c| c.kind == MarkKind::Check).unwrap();
        let mut tail_of: Vec<&str> = check
            .tail_of
            .iter()
            .map(|&v| syms.points.iter().find(|p| p.vaddr == v).unwrap().name())
            .collect();
        tail_of.sort();
        assert_eq!(tail_of, ["memalign", "pvalloc", "valloc"], "{check:?}");
        let realloc = named(&syms.points, "realloc");
        let slot = calls.iter().find_map(|c| c.via_slot.clone()).unwrap();
        assert_eq!((slot.holds, slot.name.as_str()), (realloc.vaddr, "realloc"));

        // Told by return address, an unsampled call of these stays in PENDING.
        let names = |vaddrs: Vec<u64>| -> Vec<&str> {
            let mut v: Vec<&str> = vaddrs
                .iter()
                .map(|&v| syms.points.iter().find(|p| p.vaddr == v).unwrap().name())
                .collect();
            v.sort();
            v
        };
        let tails = tail_callers(&syms.points, &Ok(calls.clone()));
        assert_eq!(
            names(tails),
            ["memalign", "pvalloc", "realloc", "reallocarray", "valloc"]
        );
        // Without the internal calls: every allocating function that jumps
        // out of its code (calloc tail-calls memset), never malloc or free.
        let unknown = names(tail_callers(&syms.points, &Err("unknown".into())));
        for name in ["calloc", "memalign", "realloc", "reallocarray", "valloc"] {
            assert!(unknown.contains(&name), "{unknown:?}");
        }
        for name in ["malloc", "free"] {
            assert!(!unknown.contains(&name), "{unknown:?}");
        }
    }

    /// The probe sites chosen in Debian 12's glibc. Each is checked against a
    /// simpler statement of the rules by decoding again; the exact offsets are
    /// those of one glibc build.
    #[test]
    fn glibc_probe_sites() {
        use iced_x86::{Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess};
        const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
        const BUILD_ID: &str = "93ac61ec5a8eb1396f9fbd350e3169a558528a40";
        let (data, syms) = glibc();
        let mut factory = InstructionInfoFactory::new();
        let mut got = BTreeMap::new();
        for p in &syms.points {
            let delta = p.probe_delta();
            got.insert(p.name().to_string(), delta);
            let code = &data[p.file_offset as usize..][..64];
            let mut dec = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
            let args = placement::probe_args(p.role);
            loop {
                let insn = dec.decode();
                assert!(!insn.is_invalid(), "{}: {insn:?}", p.name());
                let bytes = &code[insn.ip() as usize..][..insn.len()];
                if insn.ip() == delta {
                    // Emulated, or the function's first instruction.
                    let emulated = matches!(bytes[0], 0x50..=0x57 | 0x70..=0x7f | 0xe8 | 0xe9 | 0xeb)
                        || matches!(bytes, [0x41, 0x50..=0x57] | [0x0f, 0x80..=0x8f, ..]);
                    assert!(emulated || delta == 0, "{}+{delta}: {bytes:x?}", p.name());
                    assert_eq!(
                        p.probe_insn,
                        format!("{:?}", insn.mnemonic()).to_lowercase()
                    );
                    break;
                }
                assert!(
                    insn.ip() < delta,
                    "{}: +{delta} is not an instruction",
                    p.name()
                );
                assert_eq!(insn.flow_control(), FlowControl::Next, "{}", p.name());
                assert_eq!(insn.stack_pointer_increment(), 0, "{}", p.name());
                let info = factory.info(&insn);
                assert!(
                    info.used_memory()
                        .iter()
                        .all(|m| m.access() == OpAccess::Read),
                    "{}: {insn:?}",
                    p.name()
                );
                for r in info.used_registers() {
                    let full = r.register().full_register();
                    assert_ne!(full, iced_x86::Register::RSP, "{}", p.name());
                    if r.access() != OpAccess::Read {
                        assert!(!args.contains(&full), "{}: writes {full:?}", p.name());
                    }
                }
            }
        }
        let file = object::File::parse(&*data).unwrap();
        let build_id: String = file
            .build_id()
            .unwrap()
            .unwrap_or_default()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            build_id, BUILD_ID,
            "{LIBC} is another build than the one these offsets were read from \
             (objdump -d it and update BUILD_ID and the expected sites); chosen now: {got:?}"
        );
        let want = BTreeMap::from([
            ("free".to_string(), 3),
            ("malloc".to_string(), 0),
            ("calloc".to_string(), 0),
            ("realloc".to_string(), 0),
            ("reallocarray".to_string(), 0),
            ("posix_memalign".to_string(), 7),
            ("memalign".to_string(), 7),
            ("valloc".to_string(), 7),
            ("pvalloc".to_string(), 7),
        ]);
        assert_eq!(got, want);
    }

    #[test]
    fn libc_is_searched_last() {
        let maps = crate::process::maps::parse_maps(
            "55d0c0000000-55d0c0001000 r-xp 00000000 08:01 10 /usr/bin/app\n\
             7f0000000000-7f0000100000 r-xp 00028000 08:01 11 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
             7f0000200000-7f0000300000 r-xp 00010000 08:01 12 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n\
             7f0000400000-7f0000401000 rw-p 00000000 00:00 0 \n",
        )
        .unwrap();
        let order: Vec<_> = candidate_modules(&maps, Some("/usr/bin/app"))
            .iter()
            .map(|m| m.path.clone().unwrap())
            .collect();
        assert_eq!(
            order,
            [
                "/usr/bin/app",
                "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                "/usr/lib/x86_64-linux-gnu/libc.so.6"
            ]
        );
    }
}
