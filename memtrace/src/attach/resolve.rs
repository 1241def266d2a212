//! Which allocator functions a process calls, and which of them memtrace
//! probes: every module's definitions of the entry points `entries` knows,
//! resolved as the dynamic linker resolves them.
//!
//! A process may hold several allocators (a Rust program's static
//! `_rjem_*` jemalloc and glibc's malloc behind libc; jemalloc's `operator
//! new` and glibc's `reallocarray`), and one function may be defined by
//! several modules (libstdc++ and jemalloc both define `operator new`).
//! Symbol lookup decides which one a call reaches: the first module in
//! lookup order that exports the name, or the module's own private (not
//! exported) definition. For each such definition:
//!
//! - a C++ operator whose code branches to a traced function (libstdc++'s
//!   `operator new` calls `malloc`, jemalloc's `operator delete` jumps to
//!   `free`) is a *forwarder*: not probed, its calls are counted where it
//!   hands them on (a probe on both would count them twice);
//! - so is any function that branches, through its GOT, to a traced
//!   function another module defines (glibc's `reallocarray` jumps to
//!   `realloc@plt`, which is jemalloc's where jemalloc is the allocator),
//!   and any that only sets up arguments and jumps to one (mimalloc's
//!   `realloc` to `mi_heap_realloc`, `_Znam` to `_Znwm`);
//! - any other definition in an allocator module (one that defines an
//!   allocating and a freeing function of the C API or an allocator's own
//!   API) is probed, once per address however many names it has;
//! - and a definition in another module that forwards nothing (a program's
//!   own `operator new` over a pool) is not traced, and named as such.
//!
//! The same tables name the functions memtrace does not trace (see
//! [`Resolved::untraced`]).
use std::collections::{BTreeMap, BTreeSet, HashMap};

use iced_x86::{Decoder, DecoderOptions, FlowControl, Register};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

use super::{
    allocator::{
        AttachPoint, InternalCall, Role, internal_calls, new_point, vaddr_to_file_offset,
        whole_function,
    },
    entries::{self, Entry},
    placement, pymalloc,
};
use crate::process::link_map::is_libc;

/// One ELF module of the process, parsed.
pub struct ModuleFile<'a> {
    /// Its path as the target's maps name it.
    pub path: String,
    pub file: object::File<'a>,
    pub data: &'a [u8],
    /// The process's executable.
    pub is_exe: bool,
    /// The PLT sections: (address, contents).
    plt: Vec<(u64, &'a [u8])>,
}

impl<'a> ModuleFile<'a> {
    pub fn parse(path: &str, data: &'a [u8], is_exe: bool) -> Result<Self, object::Error> {
        let file = object::File::parse(data)?;
        let plt = file
            .sections()
            .filter(|s| matches!(s.name(), Ok(".plt" | ".plt.sec" | ".plt.got")))
            .filter_map(|s| Some((s.address(), s.data().ok()?)))
            .collect();
        Ok(ModuleFile {
            path: path.to_string(),
            file,
            data,
            is_exe,
            plt,
        })
    }

    /// The name of the symbol the dynamic linker puts in the GOT slot at
    /// `slot`.
    pub fn slot_name(&self, slot: u64) -> Option<String> {
        use object::{ObjectSymbolTable, RelocationTarget};
        let (_, reloc) = self
            .file
            .dynamic_relocations()?
            .find(|(at, _)| *at == slot)?;
        let RelocationTarget::Symbol(index) = reloc.target() else {
            return None;
        };
        let dynsyms = self.file.dynamic_symbol_table();
        let sym = dynsyms.as_ref()?.symbol_by_index(index).ok()?;
        sym.name().ok().map(str::to_string)
    }

    /// The GOT slot a branch to `target` goes through: `target` itself
    /// when the branch reads its destination from memory there, the slot
    /// of the PLT stub at `target`; None for a branch into code.
    pub fn slot_of(&self, target: u64, through_memory: bool) -> Result<Option<u64>, String> {
        if through_memory {
            return Ok(Some(target));
        }
        let Some((start, bytes)) = self
            .plt
            .iter()
            .find(|(start, bytes)| target >= *start && target < start + bytes.len() as u64)
        else {
            return Ok(None);
        };
        let stub = &bytes[(target - start) as usize..];
        placement::plt_stub_slot(stub, target)
            .map(Some)
            .ok_or_else(|| format!("a PLT stub at {target:#x} it cannot read"))
    }
}

/// A function of a module with an allocator entry point's name.
#[derive(Clone, Debug)]
struct Def {
    entry: Entry,
    vaddr: u64,
    size: u64,
    /// In the dynamic symbol table: other modules may call it, and symbol
    /// lookup may give its name to another module's definition.
    exported: bool,
}

/// What one module defines and imports of the allocator API.
#[derive(Debug, Default)]
struct Scan {
    defs: BTreeMap<String, Def>,
    /// Exported functions memtrace does not know whose name looks like an
    /// allocator's.
    odd: BTreeSet<String>,
    /// Undefined dynamic symbols with a known or allocator-like name.
    imports: BTreeSet<String>,
    /// No symbol table at all (a stripped static binary).
    no_symbols: bool,
}

/// What `name` is: the tables' meaning, and pymalloc's functions' when they
/// are traced.
fn classify(name: &str, prefixes: &[String], pymalloc: bool) -> Option<Entry> {
    entries::classify(name, prefixes)
        .or_else(|| pymalloc.then(|| entries::classify_pymalloc(name)).flatten())
}

fn scan(m: &ModuleFile<'_>, prefixes: &[String], pymalloc: bool) -> Scan {
    let mut out = Scan {
        no_symbols: true,
        ..Scan::default()
    };
    for (sym, exported) in m
        .file
        .dynamic_symbols()
        .map(|s| (s, true))
        .chain(m.file.symbols().map(|s| (s, false)))
    {
        out.no_symbols = false;
        let Ok(name) = sym.name() else { continue };
        let entry = classify(name, prefixes, pymalloc);
        if sym.is_undefined() {
            if exported && (entry.is_some() || entries::looks_like_allocator(name)) {
                out.imports.insert(name.to_string());
            }
            continue;
        }
        if sym.kind() != SymbolKind::Text || sym.address() == 0 {
            continue;
        }
        let Some(entry) = entry else {
            if exported && entries::looks_like_allocator(name) {
                out.odd.insert(name.to_string());
            }
            continue;
        };
        out.defs
            .entry(name.to_string())
            .and_modify(|d| d.exported |= exported)
            .or_insert(Def {
                entry,
                vaddr: sym.address(),
                size: sym.size(),
                exported,
            });
    }
    if pymalloc && !out.defs.contains_key("_PyObject_Malloc") {
        add_pymalloc_from_table(m, &mut out);
    }
    out
}

/// pymalloc's functions of a libpython without `.symtab` (Debian's
/// stripped `libpython3.11.so.1.0`), found from their allocator table: see
/// `pymalloc`. Not on a build that inlines them.
fn add_pymalloc_from_table(m: &ModuleFile<'_>, out: &mut Scan) {
    if !m
        .file
        .dynamic_symbols()
        .any(|s| !s.is_undefined() && s.name() == Ok("PyObject_Malloc"))
    {
        return;
    }
    match pymalloc::find(&m.file) {
        Ok(pymalloc::Found::Functions { functions, table }) => {
            log::debug!(
                "{}: pymalloc's functions from its table at {table:#x}",
                m.path
            );
            for f in functions {
                let Some(entry) = entries::classify_pymalloc(f.name) else {
                    continue;
                };
                out.defs.entry(f.name.to_string()).or_insert(Def {
                    entry,
                    vaddr: f.vaddr,
                    size: f.size,
                    exported: false,
                });
            }
        }
        Ok(pymalloc::Found::Inlined { function }) => log::debug!(
            "{}: pymalloc's _PyObject_Malloc ({function:#x}) is inlined into its callers",
            m.path
        ),
        Err(e) => log::debug!("{}: pymalloc's functions not found: {e}", m.path),
    }
}

/// The jemalloc prefixes the modules reveal (`<prefix>sdallocx` defined).
fn jemalloc_prefixes(modules: &[ModuleFile<'_>]) -> Vec<String> {
    let mut out: Vec<String> = modules
        .iter()
        .flat_map(|m| m.file.dynamic_symbols().chain(m.file.symbols()))
        .filter(|s| !s.is_undefined() && s.kind() == SymbolKind::Text)
        .filter_map(|s| Some(entries::jemalloc_prefix(s.name().ok()?)?.to_string()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What becomes of one definition.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Decision {
    Probe,
    /// Hands its calls to the function `to` (through its GOT when `got`).
    Forward {
        to: String,
        got: bool,
    },
    /// Allocates where memtrace does not look.
    Untraced,
}

/// A function that is not probed because it hands its calls to a probed
/// one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub name: String,
    pub vaddr: u64,
    /// The function its calls reach (a probed one, perhaps through more
    /// forwarders), and that function's module (an index into the input).
    pub to: String,
    pub to_module: usize,
    /// That function's address in its module.
    pub to_vaddr: u64,
}

/// What memtrace probes in one module.
#[derive(Debug)]
pub struct ModulePlan {
    pub points: Vec<AttachPoint>,
    /// Its functions that hand their calls to a probed function.
    pub forwards: Vec<Forward>,
    /// See `Allocator::internal_calls`.
    pub internal_calls: Result<Vec<InternalCall>, String>,
    /// See `Allocator::internal_returns`.
    pub internal_returns: Vec<u64>,
    pub no_symbols: bool,
}

/// An allocator entry point the target may call that memtrace does not
/// trace: `name`, called (imported, or defined in the executable) by the
/// module `module`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UntracedEntry {
    pub name: String,
    pub module: String,
    /// Why it is not traced, when the plan is not the reason (its module is
    /// not probed at all).
    pub reason: Option<String>,
}

/// The allocator entry points of a process.
#[derive(Debug)]
pub struct Resolved {
    /// One per input module, in the same order.
    pub modules: Vec<ModulePlan>,
    /// The entry points the target may call and memtrace does not trace,
    /// sorted.
    pub untraced: Vec<UntracedEntry>,
}

/// The modules of a process, in lookup order, with what they define and
/// where each name resolves.
struct Process<'m, 'a> {
    modules: &'m [ModuleFile<'a>],
    scans: Vec<Scan>,
    prefixes: Vec<String>,
    /// pymalloc's functions are traced (`--python-objects`).
    pymalloc: bool,
    /// name -> the first module that exports it.
    exported: HashMap<String, usize>,
    /// Whether each module is an allocator: it defines an allocating and a
    /// freeing function other than C++ operators.
    allocator: Vec<bool>,
}

impl<'m, 'a> Process<'m, 'a> {
    fn new(modules: &'m [ModuleFile<'a>], pymalloc: bool) -> Self {
        let prefixes = jemalloc_prefixes(modules);
        let scans: Vec<Scan> = modules
            .iter()
            .map(|m| scan(m, &prefixes, pymalloc))
            .collect();
        let mut exported = HashMap::new();
        for (i, s) in scans.iter().enumerate() {
            for (name, d) in &s.defs {
                if d.exported {
                    exported.entry(name.clone()).or_insert(i);
                }
            }
            for name in &s.odd {
                exported.entry(name.clone()).or_insert(i);
            }
        }
        let allocator = scans.iter().map(is_allocator).collect();
        Process {
            modules,
            scans,
            prefixes,
            pymalloc,
            exported,
            allocator,
        }
    }

    /// The module a call of `name` made through the PLT of module `i`
    /// reaches: its own private definition, else the first that exports it.
    fn effective(&self, i: usize, name: &str) -> Option<usize> {
        match self.scans[i].defs.get(name) {
            Some(d) if !d.exported => Some(i),
            _ => self.exported.get(name).copied(),
        }
    }

    fn is_traced(&self, name: &str) -> bool {
        matches!(
            classify(name, &self.prefixes, self.pymalloc),
            Some(Entry::Traced(_))
        )
    }

    /// The traced function a branch at `target` of module `i` enters, by
    /// name, and whether it goes through the GOT.
    fn entered(&self, i: usize, target: u64, through_memory: bool) -> Option<(String, bool)> {
        let m = &self.modules[i];
        match m.slot_of(target, through_memory).ok()? {
            Some(slot) => {
                let name = m.slot_name(slot)?;
                self.is_traced(&name).then_some((name, true))
            }
            None => self.scans[i]
                .defs
                .iter()
                .find(|(n, d)| d.vaddr == target && self.is_traced(n))
                .map(|(n, _)| (n.clone(), false)),
        }
    }

    /// What becomes of module `i`'s definition `name` (see the module docs).
    fn decide(&self, i: usize, name: &str, def: &Def) -> Decision {
        let m = &self.modules[i];
        let code = vaddr_to_file_offset(&m.file, def.vaddr)
            .and_then(|o| whole_function(m.data, o, def.size));
        let entered: Vec<(String, bool)> = code
            .map(|c| known_branches(c, def.vaddr))
            .unwrap_or_default()
            .into_iter()
            .filter(|&(target, mem)| mem || target != def.vaddr)
            .filter_map(|(target, mem)| self.entered(i, target, mem))
            .filter(|(n, _)| n != name)
            .collect();
        if entries::is_cxx_operator(name)
            && let Some((to, got)) = entered.first()
        {
            return Decision::Forward {
                to: to.clone(),
                got: *got,
            };
        }
        if let Some((to, _)) = entered
            .iter()
            .find(|(to, got)| *got && self.effective(i, to).is_some_and(|j| j != i))
        {
            return Decision::Forward {
                to: to.clone(),
                got: true,
            };
        }
        if let Some((to, got)) = self.tail_jump(i, def) {
            return Decision::Forward { to, got };
        }
        if self.allocator[i] {
            Decision::Probe
        } else {
            Decision::Untraced
        }
    }

    /// The traced function `def` jumps to after code that only sets up
    /// its arguments (no branch, no stack): mimalloc's `realloc` loads the
    /// default heap and jumps to `mi_heap_realloc`.
    fn tail_jump(&self, i: usize, def: &Def) -> Option<(String, bool)> {
        let m = &self.modules[i];
        let start = vaddr_to_file_offset(&m.file, def.vaddr)? as usize;
        let code = m.data.get(start..)?;
        let code = &code[..code.len().min(placement::MAX_HEAD_BYTES)];
        let mut decoder = Decoder::with_ip(64, code, def.vaddr, DecoderOptions::NONE);
        for _ in 0..placement::MAX_INSNS * 2 {
            if !decoder.can_decode() {
                return None;
            }
            let insn = decoder.decode();
            if insn.is_invalid() {
                return None;
            }
            match insn.flow_control() {
                FlowControl::Next => {
                    let uses_rsp = (0..insn.op_count())
                        .any(|k| insn.op_register(k).full_register() == Register::RSP)
                        || insn.memory_base() == Register::RSP;
                    if insn.is_stack_instruction()
                        || insn.stack_pointer_increment() != 0
                        || uses_rsp
                    {
                        return None;
                    }
                }
                FlowControl::UnconditionalBranch => {
                    return self.entered(i, insn.near_branch_target(), false);
                }
                FlowControl::IndirectBranch if insn.is_ip_rel_memory_operand() => {
                    return self.entered(i, insn.ip_rel_memory_address(), true);
                }
                _ => return None,
            }
        }
        None
    }

    /// Whether a wrapper (`Entry::Wrapper`) of module `i` calls a traced
    /// function, or a wrapper that does (`mi_reallocf` jumps to
    /// `mi_heap_reallocf`, which calls `mi_heap_realloc` and `mi_free`).
    fn wrapper_calls_traced(&self, i: usize, def: &Def, depth: u32) -> bool {
        let m = &self.modules[i];
        let Some(code) = vaddr_to_file_offset(&m.file, def.vaddr)
            .and_then(|o| whole_function(m.data, o, def.size))
        else {
            return false;
        };
        known_branches(code, def.vaddr)
            .into_iter()
            .any(|(target, mem)| {
                if self.entered(i, target, mem).is_some() {
                    return true;
                }
                // A wrapper it reaches, where symbol lookup finds it.
                let wrapper = match m.slot_of(target, mem) {
                    Ok(Some(slot)) => m.slot_name(slot).and_then(|n| {
                        let j = self.effective(i, &n)?;
                        Some((j, self.scans[j].defs.get(&n)?))
                    }),
                    _ => self.scans[i]
                        .defs
                        .values()
                        .find(|d| d.vaddr == target)
                        .map(|d| (i, d)),
                };
                matches!(wrapper, Some((j, d)) if d.entry == Entry::Wrapper
                && d.vaddr != def.vaddr
                && depth < 4
                && self.wrapper_calls_traced(j, d, depth + 1))
            })
    }
}

/// The destinations of `code`'s calls and jumps (the function at `vaddr`):
/// direct ones, and those through a rip-relative slot (`through_memory`);
/// branches through a register are left out (their target is not in the
/// code).
pub(crate) fn known_branches(code: &[u8], vaddr: u64) -> Vec<(u64, bool)> {
    let mut decoder = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
    let mut insn = iced_x86::Instruction::default();
    let mut out = Vec::new();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            break;
        }
        match insn.flow_control() {
            FlowControl::Call
            | FlowControl::UnconditionalBranch
            | FlowControl::ConditionalBranch => {
                out.push((insn.near_branch_target(), false));
            }
            FlowControl::IndirectCall | FlowControl::IndirectBranch
                if insn.is_ip_rel_memory_operand() =>
            {
                out.push((insn.ip_rel_memory_address(), true));
            }
            _ => {}
        }
    }
    out
}

/// An allocator module defines an allocating and a freeing function of the
/// C API or of an allocator's own API (C++ operators alone make libstdc++,
/// which forwards them to malloc and free).
fn is_allocator(s: &Scan) -> bool {
    let has = |free: bool| {
        s.defs.iter().any(|(n, d)| {
            !entries::is_cxx_operator(n)
                && match d.entry {
                    Entry::Traced(Role::Free(_)) => free,
                    Entry::Traced(Role::Alloc(_)) => !free,
                    _ => false,
                }
        })
    };
    has(true) && has(false)
}

/// Where the calls of every traced definition of the process go, and what
/// memtrace probes: `modules` in symbol lookup order (the executable first);
/// pymalloc's functions too when `pymalloc`.
pub fn resolve(modules: &[ModuleFile<'_>], pymalloc: bool) -> Resolved {
    let p = Process::new(modules, pymalloc);
    // Every definition a call may reach, and what becomes of it.
    let mut decisions: Decisions = HashMap::new();
    for (i, s) in p.scans.iter().enumerate() {
        for (name, def) in &s.defs {
            if matches!(def.entry, Entry::Traced(_)) && p.effective(i, name) == Some(i) {
                decisions.insert((i, name.clone()), p.decide(i, name, def));
            }
        }
    }
    // Names at one address are one function: probed if any of them is (a
    // C++ operator that is also tcmalloc's `tc_new`).
    let probed: BTreeSet<(usize, u64)> = decisions
        .iter()
        .filter(|(_, d)| **d == Decision::Probe)
        .map(|((i, n), _)| (*i, p.scans[*i].defs[n].vaddr))
        .collect();
    for ((i, n), d) in decisions.iter_mut() {
        if probed.contains(&(*i, p.scans[*i].defs[n].vaddr)) {
            *d = Decision::Probe;
        }
    }
    let target_of = |i: usize, name: &str| final_target(&p, &decisions, i, name);
    let mut plans: Vec<ModulePlan> = Vec::new();
    for (i, m) in modules.iter().enumerate() {
        plans.push(module_points(&p, i, m, &decisions));
    }
    // The forwarders of each module, with where their calls end up.
    for ((i, name), d) in &decisions {
        if let Decision::Forward { .. } = d
            && let Some((j, to)) = target_of(*i, name)
        {
            let to_vaddr = p.scans[j].defs[&to].vaddr;
            plans[*i].forwards.push(Forward {
                name: name.clone(),
                vaddr: p.scans[*i].defs[name].vaddr,
                to,
                to_module: j,
                to_vaddr,
            });
        }
    }
    for plan in &mut plans {
        plan.forwards.sort_by(|a, b| a.name.cmp(&b.name));
    }
    // The allocator's own calls, per module, knowing where every GOT slot
    // of a traced name leads.
    for (i, m) in modules.iter().enumerate() {
        if plans[i].points.is_empty() {
            plans[i].internal_calls = Err("no probed function".into());
            continue;
        }
        let slot = |name: &str| -> super::allocator::SlotTarget {
            use super::allocator::SlotTarget;
            if !p.is_traced(name) {
                return SlotTarget::Nothing;
            }
            let Some(j) = p.effective(i, name) else {
                return SlotTarget::Nothing;
            };
            let Some((k, to)) = target_of(j, name) else {
                return SlotTarget::Nothing;
            };
            if j != i || k != i {
                return SlotTarget::Elsewhere(modules[k].path.clone());
            }
            SlotTarget::Point {
                holds: p.scans[i].defs[name].vaddr,
                point: p.scans[i].defs[&to].vaddr,
            }
        };
        let forwards: Vec<(u64, u64)> = plans[i]
            .forwards
            .iter()
            .filter(|f| f.to_module == i)
            .map(|f| (f.vaddr, f.to_vaddr))
            .collect();
        plans[i].internal_calls = internal_calls(m, &plans[i].points, &forwards, &slot);
        plans[i].internal_returns =
            super::allocator::internal_returns(m, &plans[i].points, &forwards, &slot);
        if !plans[i].internal_returns.is_empty() && plans[i].internal_calls.is_ok() {
            plans[i].internal_calls = Err(format!(
                "code the probed functions call calls probed functions ({} sites)",
                plans[i].internal_returns.len()
            ));
        }
    }
    let untraced = untraced_entries(&p, &decisions);
    Resolved {
        modules: plans,
        untraced,
    }
}

/// What becomes of each definition a call may reach: (module, name).
type Decisions = HashMap<(usize, String), Decision>;

/// Where the calls of module `i`'s definition `name` end up: the probed
/// definition (module, name) at the end of its chain of forwarders; None if
/// they reach no probe.
fn final_target(
    p: &Process<'_, '_>,
    decisions: &Decisions,
    i: usize,
    name: &str,
) -> Option<(usize, String)> {
    let (mut j, mut n) = (i, name.to_string());
    for _ in 0..8 {
        match decisions.get(&(j, n.clone()))? {
            Decision::Probe => return Some((j, n)),
            Decision::Untraced => return None,
            Decision::Forward { to, got } => {
                j = if *got { p.effective(j, to)? } else { j };
                n = to.clone();
            }
        }
    }
    None
}

/// Module `i`'s probed functions: one point per address, named by all of
/// its names (the tables' first first).
fn module_points(
    p: &Process<'_, '_>,
    i: usize,
    m: &ModuleFile<'_>,
    decisions: &Decisions,
) -> ModulePlan {
    let scan = &p.scans[i];
    // Addresses any of whose names is probed: the code is one.
    let probed: BTreeSet<u64> = scan
        .defs
        .iter()
        .filter(|(n, _)| decisions.get(&(i, (*n).clone())) == Some(&Decision::Probe))
        .map(|(_, d)| d.vaddr)
        .collect();
    let mut by_addr: BTreeMap<u64, AttachPoint> = BTreeMap::new();
    let mut names: Vec<(&String, &Def)> = scan
        .defs
        .iter()
        .filter(|(n, d)| probed.contains(&d.vaddr) && p.effective(i, n) == Some(i))
        .collect();
    names.sort_by_key(|(n, _)| entries::rank(n, &p.prefixes));
    for (name, d) in names {
        let Entry::Traced(role) = d.entry else {
            continue;
        };
        let Some(file_offset) = vaddr_to_file_offset(&m.file, d.vaddr) else {
            continue;
        };
        match by_addr.get_mut(&d.vaddr) {
            Some(point) => {
                if !point.names.contains(name) {
                    point.names.push(name.clone());
                }
                if point.role != role {
                    log::warn!(
                        "{}: {name} shares its address with {:?} but does something else; \
                         probing it as {:?}",
                        m.path,
                        point.names,
                        point.role
                    );
                }
            }
            None => {
                by_addr.insert(
                    d.vaddr,
                    new_point(m.data, name, role, d.vaddr, file_offset, d.size),
                );
            }
        }
    }
    ModulePlan {
        points: by_addr.into_values().collect(),
        forwards: Vec::new(),
        internal_calls: Ok(Vec::new()),
        internal_returns: Vec::new(),
        no_symbols: scan.no_symbols,
    }
}

/// The allocator entry points the target may call that memtrace does not
/// trace: imported by a module (or defined in the executable, which may
/// call them directly) while their calls reach no probe.
fn untraced_entries(p: &Process<'_, '_>, decisions: &Decisions) -> Vec<UntracedEntry> {
    let target_of = |i: usize, name: &str| final_target(p, decisions, i, name);
    // Whether a call of `name` from module `i` goes unseen.
    let unseen = |i: usize, name: &str| -> bool {
        let Some(j) = p.effective(i, name) else {
            // Defined nowhere (a weak import): no call is made.
            return false;
        };
        match p.scans[j].defs.get(name).map(|d| d.entry) {
            Some(Entry::Traced(_)) => target_of(j, name).is_none(),
            Some(Entry::Wrapper) => !p.wrapper_calls_traced(j, &p.scans[j].defs[name], 0),
            Some(Entry::Untraced) => true,
            Some(Entry::Other) => false,
            // Not defined with a known name: an allocator's function
            // memtrace does not know (not libc's, whose `free`-named
            // functions free what they allocated through malloc).
            None => {
                p.scans[j].odd.contains(name)
                    && p.allocator[j]
                    && !is_libc(&p.modules[j].path)
                    && decisions.keys().any(|(k, _)| *k == j)
            }
        }
    };
    let mut out = BTreeSet::new();
    for (i, s) in p.scans.iter().enumerate() {
        let module = &p.modules[i].path;
        for name in &s.imports {
            if unseen(i, name) {
                out.insert(UntracedEntry {
                    name: name.clone(),
                    module: module.clone(),
                    reason: None,
                });
            }
        }
        if p.modules[i].is_exe {
            for (name, d) in &s.defs {
                let untraced = match d.entry {
                    Entry::Untraced => true,
                    Entry::Wrapper => !p.wrapper_calls_traced(i, d, 0),
                    Entry::Traced(_) => {
                        p.effective(i, name) == Some(i) && target_of(i, name).is_none()
                    }
                    Entry::Other => false,
                };
                if untraced {
                    out.insert(UntracedEntry {
                        name: name.clone(),
                        module: module.clone(),
                        reason: None,
                    });
                }
            }
        }
    }
    // A definition that other modules reach and that forwards nothing.
    for ((i, name), d) in decisions {
        if *d == Decision::Untraced {
            out.insert(UntracedEntry {
                name: name.clone(),
                module: p.modules[*i].path.clone(),
                reason: None,
            });
        }
    }
    out.into_iter().collect()
}

/// The plan for one ELF file on its own, as if it were the whole process
/// (every name it defines resolves to itself).
#[cfg(test)]
pub fn standalone(path: &str, data: &[u8]) -> Result<ModulePlan, object::Error> {
    let m = ModuleFile::parse(path, data, false)?;
    let mut r = resolve(std::slice::from_ref(&m), false);
    Ok(r.modules.remove(0))
}

#[cfg(test)]
mod tests;
