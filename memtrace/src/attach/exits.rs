//! Where an allocating function's result can be read without a return probe.
//!
//! An exact trace needs each allocation's size and returned address. The
//! usual way to get both is an entry probe and a return probe: two traps per
//! call (uprobe-cost note: ~0.75 µs each on the development VM, the return one
//! more). But inside the function there are instructions after which the
//! result is already in rax and stays there until `ret`: a probe on one of
//! them that also finds the size somewhere (a callee-saved register the
//! function copied it to, a stack slot) sees the whole call in one trap.
//!
//! # The analysis
//! Over the whole function's code (it must not jump out of itself):
//! 1. A control-flow graph of instructions. A call followed by padding
//!    (NOPs nothing jumps to: gcc's layout after a call to an abort or an
//!    assertion) is taken not to return, and its padding gets a guard probe
//!    that counts it if it ever does (`Counter::UnforeseenReturns`). Other
//!    calls are taken to return.
//! 2. Three regions. N: what never returns (those calls, traps, and what
//!    leads only there). F (final): from where every path that returns does
//!    so without a call and without writing rax. Z (null): from where every
//!    such path zeroes rax (`xor %eax,%eax`, `mov $0,%eax`) and goes on in F.
//!    T = F ∪ Z ∪ N is closed under successors, so a path that returns
//!    crosses from outside T into F or Z exactly once: there the call's
//!    outcome is known (F: rax is the result; Z: it fails with NULL).
//! 3. A probe for every crossing: (a) its target, if the kernel emulates it
//!    (`placement::kernel_emulates`) and every edge into it is a crossing;
//!    (b) else the first emulated instruction after the target that nothing
//!    else leads to; (c) else the conditional jump the crossing leaves from,
//!    which the BPF side evaluates from the flags the probe sees to know
//!    which edge the CPU will take. A jump both of whose edges cross (result
//!    one way, NULL the other) is one site for both. Since (c) fires on every
//!    path through the jump, a crossing to NULL that only (c) could see gets
//!    a probe on its own target instead, single-stepped if need be: only the
//!    calls that fail pay for it. A crossing to a result that none of these
//!    fit leaves the function without a plan: it keeps its entry and return
//!    probes.
//! 4. Where the size is: a forward data flow tracks which registers and stack
//!    slots still hold the entry's rdi (the size), and the entry's rbp (the
//!    caller's frame pointer, for the stack walk), through moves, pushes,
//!    pops, spills, reloads and calls (which clobber the caller-saved
//!    registers), along with rsp's offset from the entry. A site that records
//!    but finds no size takes it from a **capture**: the nearest instruction
//!    that dominates it, is emulated and knows the size stores it per thread
//!    (two traps on that path, one on the others).
//! 5. The plan is then checked by an independent count over the graph: on
//!    every path to `ret`, exactly one probe reports the call.
//!
//! # What is assumed
//! - No other code jumps into the function's middle (as for entry probes).
//! - Stack slots change only through rsp-based stores, pushes and calls below
//!   them: nothing writes the function's own frame through another pointer
//!   unless the function takes rsp's address (then no slot is trusted).
//! - The function is not re-entered on the same thread between a capture and
//!   its use (a signal handler calling malloc); such a call is detected by its
//!   stack pointer and dropped, counted (`drops.pending_map_full`).
//! - A session consumer must not be put on these sites: for a hit in another
//!   process a pid-bound session returns 0, and the kernel then arms a return
//!   probe, writing its trampoline over [rsp], a live slot in mid-function.
//!   The sites get a plain uprobe_multi link of their own.
use std::collections::HashMap;

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpKind,
    Register,
};

use crate::attach::placement::{is_write, kernel_emulates};

/// At most this many probe sites in one plan.
pub const MAX_EXIT_SITES: usize = 24;

/// What a probe reports for the edge about to be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing: the call goes on.
    Nothing,
    /// The call returns rax, its result.
    Record,
    /// The call returns NULL.
    Null,
}

/// Where a value is when the probe fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    Reg(Register),
    /// At rsp + this.
    Stack(i64),
}

/// One probe of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitSite {
    /// Offset of the instruction in the function.
    pub delta: u64,
    pub mnemonic: String,
    /// A conditional jump's condition code (the low nibble of its opcode):
    /// `taken` applies when it holds. None: `taken` always applies.
    pub cond: Option<u8>,
    pub taken: Outcome,
    pub not_taken: Outcome,
    /// Stores the size for a later site of the same call.
    pub capture: bool,
    /// Where the size is, when known here.
    pub size: Option<Loc>,
    /// Where the caller's rbp is (known wherever a site records).
    pub rbp: Option<Loc>,
    /// rsp at the function's entry minus rsp here.
    pub entry_sp_delta: u64,
}

impl ExitSite {
    #[cfg(test)]
    pub fn records(&self) -> bool {
        self.taken == Outcome::Record || self.not_taken == Outcome::Record
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitPlan {
    pub sites: Vec<ExitSite>,
    /// Offsets of the padding after calls taken not to return: a probe there
    /// fires only if one does, which the plan did not foresee (it is counted).
    pub guards: Vec<u64>,
}

impl ExitPlan {
    /// Offsets in the function of every probe of the plan: sites, then guards.
    pub fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.sites
            .iter()
            .map(|s| s.delta)
            .chain(self.guards.iter().copied())
    }

    /// Sites as `+0x157 jne`, for logs.
    pub fn describe(&self) -> String {
        self.sites
            .iter()
            .map(|s| {
                let what = |o: Outcome| match o {
                    Outcome::Nothing => "-",
                    Outcome::Record => "result",
                    Outcome::Null => "null",
                };
                let mut d = format!("+{:#x} {}", s.delta, s.mnemonic);
                match s.cond {
                    Some(_) => {
                        d += &format!(" (taken: {}, not: {})", what(s.taken), what(s.not_taken))
                    }
                    None if s.taken != Outcome::Nothing => d += &format!(" ({})", what(s.taken)),
                    None => {}
                }
                if s.capture {
                    d += " (captures the size)";
                }
                d
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `MEMTRACE_PROBES=entry` (or `classic`): no result sites; every
/// allocating function keeps its entry and return probes (for comparison).
pub fn disabled() -> bool {
    crate::knobs::get().probes != crate::knobs::Probes::Auto
}

/// The `PT_REGS_*` index of a general register.
fn pt_regs_index(r: Register) -> Option<u8> {
    use memtrace_common::*;
    Some(match r {
        Register::R15 => PT_REGS_R15,
        Register::R14 => PT_REGS_R14,
        Register::R13 => PT_REGS_R13,
        Register::R12 => PT_REGS_R12,
        Register::RBP => PT_REGS_RBP,
        Register::RBX => PT_REGS_RBX,
        Register::R11 => PT_REGS_R11,
        Register::R10 => PT_REGS_R10,
        Register::R9 => PT_REGS_R9,
        Register::R8 => PT_REGS_R8,
        Register::RAX => PT_REGS_RAX,
        Register::RCX => PT_REGS_RCX,
        Register::RDX => PT_REGS_RDX,
        Register::RSI => PT_REGS_RSI,
        Register::RDI => PT_REGS_RDI,
        _ => return None,
    })
}

fn loc_conf(loc: Option<Loc>) -> (u8, u8, i32) {
    use memtrace_common::{LOC_NONE, LOC_REG, LOC_STACK};
    match loc {
        Some(Loc::Reg(r)) => match pt_regs_index(r) {
            Some(i) => (LOC_REG, i, 0),
            None => (LOC_NONE, 0, 0),
        },
        Some(Loc::Stack(off)) => match i32::try_from(off) {
            Ok(off) => (LOC_STACK, 0, off),
            Err(_) => (LOC_NONE, 0, 0),
        },
        None => (LOC_NONE, 0, 0),
    }
}

impl ExitSite {
    /// The BPF side's configuration of this site, for a function of `kind`.
    pub fn conf(&self, kind: memtrace_common::AllocKind) -> memtrace_common::ResultSite {
        use memtrace_common::{RESULT_ALWAYS, RESULT_NOTHING, RESULT_NULL, RESULT_RECORD};
        let o = |o: Outcome| match o {
            Outcome::Nothing => RESULT_NOTHING,
            Outcome::Record => RESULT_RECORD,
            Outcome::Null => RESULT_NULL,
        };
        let (size_loc, size_reg, size_off) = loc_conf(self.size);
        let (rbp_loc, rbp_reg, rbp_off) = loc_conf(self.rbp);
        memtrace_common::ResultSite {
            cond: self.cond.unwrap_or(RESULT_ALWAYS),
            taken: o(self.taken),
            not_taken: o(self.not_taken),
            capture: self.capture as u8,
            size_loc,
            size_reg,
            rbp_loc,
            rbp_reg,
            size_off,
            rbp_off,
            entry_sp_delta: self.entry_sp_delta as u32,
            kind: kind as u32,
        }
    }
}

/// The configuration of a guard (see `ExitPlan::guards`).
pub fn guard_conf(kind: memtrace_common::AllocKind) -> memtrace_common::ResultSite {
    memtrace_common::ResultSite {
        cond: memtrace_common::RESULT_ALWAYS,
        taken: memtrace_common::RESULT_GUARD,
        kind: kind as u32,
        ..Default::default()
    }
}

/// The caller-saved general registers: a call clobbers them.
use crate::attach::placement::SCRATCH as CALLER_SAVED;

struct Insn {
    insn: Instruction,
    bytes_emulated: bool,
    /// A conditional jump's are (target, next).
    succs: Vec<usize>,
    is_jcc: bool,
    is_call: bool,
    is_ret: bool,
    writes_rax: bool,
    zeroes_rax: bool,
    /// A call taken not to return: the padding after it gets a guard.
    guarded: bool,
}

/// Decodes `code` (a whole function at offset 0) into a graph; Err if it
/// leaves the function other than by `ret` or holds what cannot be followed.
fn build_graph(code: &[u8]) -> Result<Vec<Insn>, String> {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let mut out = Vec::new();
    let mut at = HashMap::new();
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return Err(format!("undecodable code at +{:#x}", insn.ip()));
        }
        let start = insn.ip() as usize;
        let bytes_emulated = kernel_emulates(&code[start..start + insn.len()]).is_some();
        let info = factory.info(&insn);
        let writes_rax = info
            .used_registers()
            .iter()
            .any(|r| r.register().full_register() == Register::RAX && is_write(r.access()));
        let zeroes_rax = match insn.mnemonic() {
            Mnemonic::Xor => {
                insn.op_count() == 2
                    && insn.op0_kind() == OpKind::Register
                    && insn.op1_kind() == OpKind::Register
                    && insn.op0_register() == insn.op1_register()
                    && matches!(insn.op0_register(), Register::EAX | Register::RAX)
            }
            Mnemonic::Mov => {
                insn.op0_kind() == OpKind::Register
                    && matches!(insn.op0_register(), Register::EAX | Register::RAX)
                    && matches!(
                        insn.op1_kind(),
                        OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64
                    )
                    && insn.immediate(1) == 0
            }
            _ => false,
        };
        at.insert(insn.ip(), out.len());
        out.push(Insn {
            insn,
            bytes_emulated,
            succs: Vec::new(),
            is_jcc: false,
            is_call: false,
            is_ret: false,
            writes_rax,
            zeroes_rax,
            guarded: false,
        });
    }
    let n = out.len();
    let index = |target: u64, from: u64| -> Result<usize, String> {
        at.get(&target).copied().ok_or_else(|| {
            format!("+{from:#x} branches to +{target:#x}, not an instruction of the function")
        })
    };
    for i in 0..n {
        let insn = out[i].insn;
        let next = || {
            if i + 1 < n {
                Ok(i + 1)
            } else {
                Err(format!("+{:#x} runs past the function's end", insn.ip()))
            }
        };
        let (succs, jcc, call, ret) = match insn.flow_control() {
            FlowControl::Next => (vec![next()?], false, false, false),
            FlowControl::Call | FlowControl::IndirectCall => {
                // Padding after a call: the compiler knew it does not return
                // (gcc aligns the next label and fills the gap with NOPs).
                // Taken as such, with a guard probe on the padding.
                let padded = i + 1 < n && out[i + 1].insn.mnemonic() == Mnemonic::Nop;
                if padded {
                    (Vec::new(), false, true, false)
                } else {
                    (vec![next()?], false, true, false)
                }
            }
            FlowControl::ConditionalBranch => {
                let t = index(insn.near_branch_target(), insn.ip())?;
                (vec![t, next()?], true, false, false)
            }
            FlowControl::UnconditionalBranch => (
                vec![index(insn.near_branch_target(), insn.ip())?],
                false,
                false,
                false,
            ),
            FlowControl::Return => (Vec::new(), false, false, true),
            // ud2, int3, hlt and the like: the path ends there.
            FlowControl::Exception | FlowControl::Interrupt => (Vec::new(), false, false, false),
            other => {
                return Err(format!(
                    "+{:#x}: {other:?} ({:?})",
                    insn.ip(),
                    insn.mnemonic()
                ));
            }
        };
        let x = &mut out[i];
        x.succs = succs;
        x.is_jcc = jcc;
        x.is_call = call;
        x.is_ret = ret;
        if ret && x.insn.mnemonic() != Mnemonic::Ret {
            return Err(format!("+{:#x}: {:?}", insn.ip(), insn.mnemonic()));
        }
        if matches!(insn.mnemonic(), Mnemonic::Hlt) {
            x.succs.clear();
        }
    }
    // A NOP that something jumps to is not padding.
    let targets: std::collections::HashSet<usize> =
        out.iter().flat_map(|x| x.succs.iter().copied()).collect();
    for (i, x) in out.iter_mut().enumerate() {
        if x.is_call && x.succs.is_empty() {
            if targets.contains(&(i + 1)) {
                x.succs.push(i + 1);
            } else {
                x.guarded = true;
            }
        }
    }
    Ok(out)
}

/// The F, Z and N regions (see the module docs), as least fixpoints. N:
/// what never returns (a guarded call, a trap, and what leads only there);
/// F and Z ignore the paths into N, which need no report.
fn regions(g: &[Insn]) -> (Vec<bool>, Vec<bool>, Vec<bool>) {
    let n = g.len();
    let (mut f, mut z, mut nr) = (vec![false; n], vec![false; n], vec![false; n]);
    loop {
        let mut changed = false;
        for i in (0..n).rev() {
            let x = &g[i];
            if !nr[i] {
                let never =
                    x.guarded || (!x.is_ret && !x.is_call && x.succs.iter().all(|&s| nr[s]));
                if never {
                    nr[i] = true;
                    changed = true;
                    continue;
                }
            }
            if nr[i] {
                continue;
            }
            let live = |s: &usize| !nr[*s];
            if !f[i] && !x.is_call && !x.writes_rax {
                let ok = x.is_ret
                    || (x.succs.iter().filter(|s| live(s)).all(|&s| f[s])
                        && x.succs.iter().any(live));
                if ok {
                    f[i] = true;
                    changed = true;
                }
            }
            if !z[i] && !x.is_call && !x.is_ret && x.succs.iter().any(live) {
                let ok = if x.zeroes_rax {
                    x.succs.iter().filter(|s| live(s)).all(|&s| f[s] || z[s])
                } else {
                    x.succs.iter().filter(|s| live(s)).all(|&s| z[s])
                };
                if ok {
                    z[i] = true;
                    changed = true;
                }
            }
        }
        if !changed {
            return (f, z, nr);
        }
    }
}

/// What the forward data flow knows at one instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    /// rsp - entry rsp, if known.
    sp: Option<i64>,
    /// Registers holding the entry's rdi (true) or rbp (false).
    regs: HashMap<Register, bool>,
    /// Stack slots (offset from the entry rsp) holding them.
    slots: HashMap<i64, bool>,
    /// rsp's value was copied somewhere: slots may be written through it.
    escaped: bool,
}

const SIZE: bool = true;
const RBP: bool = false;

impl State {
    fn entry() -> Self {
        State {
            sp: Some(0),
            regs: HashMap::from([(Register::RDI, SIZE), (Register::RBP, RBP)]),
            slots: HashMap::new(),
            escaped: false,
        }
    }

    fn meet(&mut self, other: &State) -> bool {
        let before = self.clone();
        if self.sp != other.sp {
            self.sp = None;
        }
        self.regs.retain(|r, v| other.regs.get(r) == Some(v));
        self.slots.retain(|o, v| other.slots.get(o) == Some(v));
        self.escaped |= other.escaped;
        if self.escaped || self.sp.is_none() {
            self.slots.clear();
        }
        *self != before
    }

    fn clobber_slots(&mut self, from: i64, len: i64) {
        self.slots.retain(|&o, _| o + 8 <= from || o >= from + len);
    }

    fn location(&self, what: bool) -> Option<Loc> {
        // A callee-saved register first: the least likely to be a copy that
        // is about to be overwritten (any is right where it is).
        let mut regs: Vec<Register> = self
            .regs
            .iter()
            .filter(|(_, v)| **v == what)
            .map(|(r, _)| *r)
            .collect();
        regs.sort_by_key(|r| (CALLER_SAVED.contains(r), *r as u32));
        if let Some(r) = regs.first() {
            return Some(Loc::Reg(*r));
        }
        let sp = self.sp?;
        let mut slots: Vec<i64> = self
            .slots
            .iter()
            .filter(|(_, v)| **v == what)
            .map(|(o, _)| *o)
            .collect();
        slots.sort();
        slots.first().map(|o| Loc::Stack(o - sp))
    }
}

fn rsp_slot(insn: &Instruction, mem_op: bool) -> Option<i64> {
    (mem_op
        && insn.memory_base() == Register::RSP
        && insn.memory_index() == Register::None
        && insn.segment_prefix() == Register::None)
        .then(|| insn.memory_displacement64() as i64)
}

/// The state after `x` from the state before it.
fn transfer(x: &Insn, factory: &mut InstructionInfoFactory, s: &State) -> State {
    let insn = &x.insn;
    let mut s = s.clone();
    let info = factory.info(insn);
    let op = |i: u32| insn.op_kind(i);
    let reg_val = |s: &State, r: Register| s.regs.get(&r).copied();
    match insn.mnemonic() {
        Mnemonic::Push if op(0) == OpKind::Register && insn.op0_register().is_gpr64() => {
            let v = reg_val(&s, insn.op0_register());
            if let Some(sp) = s.sp.as_mut() {
                *sp -= 8;
                let at = *sp;
                s.clobber_slots(at, 8);
                if let (Some(v), false) = (v, s.escaped) {
                    s.slots.insert(at, v);
                }
            }
            return s;
        }
        Mnemonic::Pop if op(0) == OpKind::Register && insn.op0_register().is_gpr64() => {
            let r = insn.op0_register();
            s.regs.remove(&r);
            if let Some(sp) = s.sp.as_mut() {
                if let Some(v) = s.slots.get(sp).copied() {
                    s.regs.insert(r, v);
                }
                *sp += 8;
            }
            if r == Register::RSP {
                s.sp = None;
            }
            return s;
        }
        Mnemonic::Sub | Mnemonic::Add
            if op(0) == OpKind::Register
                && insn.op0_register() == Register::RSP
                && matches!(
                    op(1),
                    OpKind::Immediate8to64
                        | OpKind::Immediate32to64
                        | OpKind::Immediate8
                        | OpKind::Immediate32
                ) =>
        {
            let imm = insn.immediate(1) as i64;
            let d = if insn.mnemonic() == Mnemonic::Sub {
                -imm
            } else {
                imm
            };
            if let Some(sp) = s.sp.as_mut() {
                *sp += d;
            }
            return s;
        }
        Mnemonic::Lea
            if op(0) == OpKind::Register
                && insn.op0_register() == Register::RSP
                && insn.memory_base() == Register::RSP
                && insn.memory_index() == Register::None =>
        {
            if let Some(sp) = s.sp.as_mut() {
                *sp += insn.memory_displacement64() as i64;
            }
            return s;
        }
        Mnemonic::Mov if insn.op_count() == 2 => match (op(0), op(1)) {
            (OpKind::Register, OpKind::Register)
                if insn.op0_register().is_gpr64() && insn.op1_register().is_gpr64() =>
            {
                let (dst, src) = (insn.op0_register(), insn.op1_register());
                if src == Register::RSP {
                    s.escaped = true;
                    s.slots.clear();
                }
                if dst == Register::RSP {
                    s.sp = None;
                    s.slots.clear();
                }
                match reg_val(&s, src) {
                    Some(v) => {
                        s.regs.insert(dst, v);
                    }
                    None => {
                        s.regs.remove(&dst);
                    }
                }
                return s;
            }
            (OpKind::Memory, OpKind::Register) if insn.op1_register().is_gpr64() => {
                if let (Some(d), Some(sp)) = (rsp_slot(insn, true), s.sp) {
                    let at = sp + d;
                    s.clobber_slots(at, 8);
                    if let (Some(v), false) = (reg_val(&s, insn.op1_register()), s.escaped) {
                        s.slots.insert(at, v);
                    }
                    return s;
                }
            }
            (OpKind::Register, OpKind::Memory) if insn.op0_register().is_gpr64() => {
                let dst = insn.op0_register();
                if let (Some(d), Some(sp)) = (rsp_slot(insn, true), s.sp) {
                    match s.slots.get(&(sp + d)).copied() {
                        Some(v) => {
                            s.regs.insert(dst, v);
                        }
                        None => {
                            s.regs.remove(&dst);
                        }
                    }
                    if dst == Register::RSP {
                        s.sp = None;
                        s.slots.clear();
                    }
                    return s;
                }
            }
            _ => {}
        },
        _ => {}
    }
    // Anything else: what it writes is lost.
    if x.is_call {
        for r in CALLER_SAVED {
            s.regs.remove(&r);
        }
        if let Some(sp) = s.sp {
            // The callee's frame: below the return address it pushes.
            s.slots.retain(|&o, _| o >= sp);
        }
        return s;
    }
    let reads_rsp = info
        .used_registers()
        .iter()
        .any(|r| r.register() == Register::RSP && !is_write(r.access()));
    let mem_rsp_based = info
        .used_memory()
        .iter()
        .any(|m| m.base() == Register::RSP || m.index() == Register::RSP);
    if reads_rsp && !mem_rsp_based && !insn.is_stack_instruction() {
        // lea x(%rsp),%reg, mov %rsp,%reg...: the frame's address escapes.
        s.escaped = true;
        s.slots.clear();
    }
    if insn.mnemonic() == Mnemonic::Lea && insn.memory_base() == Register::RSP {
        s.escaped = true;
        s.slots.clear();
    }
    for m in info.used_memory() {
        if !is_write(m.access()) {
            continue;
        }
        if m.base() == Register::RSP && m.index() == Register::None {
            if let Some(sp) = s.sp {
                let len = (m.memory_size().size() as i64).max(1);
                s.clobber_slots(sp + m.displacement() as i64, len);
            }
        } else if m.base() == Register::RSP || m.index() == Register::RSP {
            s.slots.clear();
        }
    }
    let inc = insn.stack_pointer_increment() as i64;
    let mut rsp_written = false;
    for r in info.used_registers() {
        if !is_write(r.access()) {
            continue;
        }
        let full = r.register().full_register();
        if full == Register::RSP {
            rsp_written = true;
        } else {
            s.regs.remove(&full);
        }
    }
    if rsp_written {
        if inc != 0 && insn.is_stack_instruction() {
            if let Some(sp) = s.sp.as_mut() {
                *sp += inc;
                let at = *sp;
                if inc < 0 {
                    s.clobber_slots(at, -inc);
                }
            }
        } else {
            s.sp = None;
            s.slots.clear();
        }
    }
    s
}

/// The state before every instruction (None: never reached).
fn data_flow(g: &[Insn]) -> Vec<Option<State>> {
    let mut factory = InstructionInfoFactory::new();
    let mut states: Vec<Option<State>> = vec![None; g.len()];
    if g.is_empty() {
        return states;
    }
    states[0] = Some(State::entry());
    let mut work = vec![0usize];
    while let Some(i) = work.pop() {
        let Some(s) = states[i].clone() else { continue };
        let out = transfer(&g[i], &mut factory, &s);
        for &t in &g[i].succs {
            let changed = match &mut states[t] {
                Some(old) => old.meet(&out),
                slot @ None => {
                    *slot = Some(out.clone());
                    true
                }
            };
            if changed {
                work.push(t);
            }
        }
    }
    states
}

/// Every instruction's predecessors in the graph.
fn predecessors(g: &[Insn]) -> Vec<Vec<usize>> {
    let mut preds = vec![Vec::new(); g.len()];
    for (v, x) in g.iter().enumerate() {
        for &t in &x.succs {
            preds[t].push(v);
        }
    }
    preds
}

/// Immediate dominators (Cooper, Harvey and Kennedy), None for the entry and
/// for what is never reached.
fn dominators(g: &[Insn], preds: &[Vec<usize>]) -> Vec<Option<usize>> {
    let n = g.len();
    // Reverse postorder.
    let mut order = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    let mut stack = vec![(0usize, 0usize)];
    if n > 0 {
        seen[0] = true;
    }
    while let Some((v, k)) = stack.pop() {
        if k < g[v].succs.len() {
            stack.push((v, k + 1));
            let t = g[v].succs[k];
            if !seen[t] {
                seen[t] = true;
                stack.push((t, 0));
            }
        } else {
            order.push(v);
        }
    }
    order.reverse();
    let mut rpo = vec![usize::MAX; n];
    for (i, &v) in order.iter().enumerate() {
        rpo[v] = i;
    }
    let mut idom: Vec<Option<usize>> = vec![None; n];
    if n == 0 {
        return idom;
    }
    idom[0] = Some(0);
    let intersect = |idom: &[Option<usize>], mut a: usize, mut b: usize| {
        while a != b {
            while rpo[a] > rpo[b] {
                a = idom[a].unwrap();
            }
            while rpo[b] > rpo[a] {
                b = idom[b].unwrap();
            }
        }
        a
    };
    loop {
        let mut changed = false;
        for &v in order.iter().skip(1) {
            let mut new = None;
            for &p in &preds[v] {
                if idom[p].is_none() {
                    continue;
                }
                new = Some(match new {
                    None => p,
                    Some(q) => intersect(&idom, p, q),
                });
            }
            if new.is_some() && idom[v] != new {
                idom[v] = new;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    idom[0] = None;
    idom
}

/// The condition code of an emulated jcc (`7x rel8` or `0f 8x rel32`): its
/// opcode's low nibble.
fn jcc_cond(code: &[u8], insn: &Instruction) -> u8 {
    let start = insn.ip() as usize;
    let b = &code[start..start + insn.len()];
    (if b[0] == 0x0f { b[1] } else { b[0] }) & 0xf
}

fn mnemonic_name(insn: &Instruction) -> String {
    format!("{:?}", insn.mnemonic()).to_lowercase()
}

/// The plan for an allocating function whose whole code is `code`, whose
/// size argument is rdi (malloc's) and whose result is rax; Err says why
/// there is none.
pub fn plan_exits(code: &[u8]) -> Result<ExitPlan, String> {
    if code.is_empty() || code.len() > crate::attach::placement::MAX_BODY_BYTES {
        return Err(format!("{} bytes of code", code.len()));
    }
    let g = build_graph(code)?;
    let (f, z, never) = regions(&g);
    let t = |i: usize| f[i] || z[i] || never[i];
    if t(0) {
        return Err("the result is known at the entry".into());
    }
    let n = g.len();
    let preds = predecessors(&g);
    let states = data_flow(&g);
    let outcome = |i: usize| {
        if f[i] {
            Outcome::Record
        } else if z[i] {
            Outcome::Null
        } else {
            Outcome::Nothing
        }
    };
    // Whether every edge into v is a crossing (none from inside T, but
    // those from what never returns, which no path takes to a ret).
    let only_crossings = |v: usize| preds[v].iter().all(|&p| !t(p) || never[p]);
    let live_t = |v: usize| t(v) && !never[v];
    // site index in g -> (cond, taken, not_taken)
    let mut sites: HashMap<usize, (Option<u8>, Outcome, Outcome)> = HashMap::new();
    for s in 0..n {
        if t(s) || states[s].is_none() {
            continue;
        }
        let x = &g[s];
        if x.is_jcc && x.bytes_emulated && x.succs.iter().all(|&v| live_t(v)) {
            // Both edges cross (one to a result, one to NULL): the jump
            // decides the outcome, one probe for both.
            let byte = jcc_cond(code, &x.insn);
            sites.insert(s, (Some(byte), outcome(x.succs[0]), outcome(x.succs[1])));
            continue;
        }
        for (k, &v) in x.succs.iter().enumerate() {
            if !live_t(v) {
                continue;
            }
            // (a) The target, when every edge into it is a crossing.
            if g[v].bytes_emulated && only_crossings(v) {
                sites.insert(v, (None, outcome(v), Outcome::Nothing));
                continue;
            }
            // (b) The first emulated instruction after it, when nothing else
            // leads there.
            let (mut w, mut prev, mut found) = (v, s, None);
            for _ in 0..16 {
                if preds[w].iter().any(|&p| p != prev) {
                    break;
                }
                if g[w].bytes_emulated {
                    found = Some(w);
                    break;
                }
                if g[w].succs.len() != 1 {
                    break;
                }
                (prev, w) = (w, g[w].succs[0]);
            }
            if let Some(w) = found {
                sites.insert(w, (None, outcome(v), Outcome::Nothing));
                continue;
            }
            // A failure path: a probe on its target, single-stepped if need
            // be, costs only the calls that fail; the jump below would cost
            // every call through it (glibc's check for a size above
            // PTRDIFF_MAX is made by every call).
            let o = outcome(v);
            if o == Outcome::Null && only_crossings(v) {
                sites.insert(v, (None, Outcome::Null, Outcome::Nothing));
                continue;
            }
            // (c) The conditional jump itself, evaluated from the flags.
            if x.is_jcc && x.bytes_emulated {
                let byte = jcc_cond(code, &x.insn);
                let e = sites
                    .entry(s)
                    .or_insert((Some(byte), Outcome::Nothing, Outcome::Nothing));
                if k == 0 {
                    e.1 = o;
                } else {
                    e.2 = o;
                }
                continue;
            }
            return Err(format!(
                "the result is known after +{:#x} ({}), and no instruction there can be probed cheaply",
                x.insn.ip(),
                mnemonic_name(&x.insn),
            ));
        }
    }
    if sites.is_empty() {
        return Err("no path returns".into());
    }
    // Sizes, and the captures for the sites that record without one.
    let idom = dominators(&g, &preds);
    let knows_size = |c: usize| {
        g[c].bytes_emulated
            && states[c]
                .as_ref()
                .is_some_and(|s| s.sp.is_some() && s.location(SIZE).is_some())
    };
    let mut captures = Vec::new();
    for (&i, &(_, a, b)) in &sites {
        let st = states[i].as_ref().ok_or("unreachable site")?;
        if (a == Outcome::Record || b == Outcome::Record) && st.location(SIZE).is_none() {
            let mut d = idom[i];
            while let Some(c) = d {
                if knows_size(c) {
                    break;
                }
                d = idom[c];
            }
            let c = d.ok_or_else(|| {
                format!(
                    "the size is not known at +{:#x} nor at an instruction before it on every path",
                    g[i].insn.ip()
                )
            })?;
            captures.push(c);
        }
    }
    for &c in &captures {
        sites
            .entry(c)
            .or_insert((None, Outcome::Nothing, Outcome::Nothing));
    }
    let mut order: Vec<usize> = sites.keys().copied().collect();
    order.sort();
    if order.len() > MAX_EXIT_SITES {
        return Err(format!("{} probe sites needed", order.len()));
    }
    let mut plan = Vec::new();
    for i in order {
        let (cond, taken, not_taken) = sites[&i];
        let st = states[i].as_ref().ok_or("unreachable site")?;
        let sp = st
            .sp
            .ok_or_else(|| format!("rsp unknown at +{:#x}", g[i].insn.ip()))?;
        let rbp = st.location(RBP);
        if rbp.is_none() && (taken == Outcome::Record || not_taken == Outcome::Record) {
            return Err(format!(
                "the caller's rbp is not known at +{:#x}",
                g[i].insn.ip()
            ));
        }
        plan.push(ExitSite {
            delta: g[i].insn.ip(),
            mnemonic: mnemonic_name(&g[i].insn),
            cond,
            taken,
            not_taken,
            capture: captures.contains(&i),
            size: st.location(SIZE),
            rbp,
            entry_sp_delta: (-sp) as u64,
        });
    }
    let guards: Vec<u64> = g
        .iter()
        .enumerate()
        .filter(|(_, x)| x.guarded)
        .map(|(i, _)| g[i + 1].insn.ip())
        .collect();
    if plan.len() + guards.len() > 2 * MAX_EXIT_SITES {
        return Err(format!(
            "{} probe sites and {} guards needed",
            plan.len(),
            guards.len()
        ));
    }
    let plan = ExitPlan {
        sites: plan,
        guards,
    };
    check_plan(&g, &plan)?;
    Ok(plan)
}

/// The independent check: on every path from the entry to a `ret`, exactly
/// one site reports the call, and a site that records without a size comes
/// after a capture.
fn check_plan(g: &[Insn], plan: &ExitPlan) -> Result<(), String> {
    let n = g.len();
    let site_at: HashMap<u64, &ExitSite> = plan.sites.iter().map(|s| (s.delta, s)).collect();
    // State: (reports so far: 0, 1 or 2 = more, captured) as a bit set of 6.
    let bit = |reports: usize, captured: bool| 1u8 << (reports.min(2) * 2 + captured as usize);
    let mut at: Vec<u8> = vec![0; n];
    at[0] = bit(0, false);
    let mut work = vec![0usize];
    while let Some(i) = work.pop() {
        let x = &g[i];
        let site = site_at.get(&x.insn.ip());
        for (k, &v) in x.succs.iter().enumerate() {
            let mut out = 0u8;
            for reports in 0..3 {
                for captured in [false, true] {
                    if at[i] & bit(reports, captured) == 0 {
                        continue;
                    }
                    let (mut r, mut c) = (reports, captured);
                    if let Some(s) = site {
                        c |= s.capture;
                        let o = match s.cond {
                            Some(_) if k == 0 => s.taken,
                            Some(_) => s.not_taken,
                            None => s.taken,
                        };
                        if o != Outcome::Nothing {
                            if o == Outcome::Record && s.size.is_none() && !c {
                                return Err(format!(
                                    "check: +{:#x} records with no size captured",
                                    s.delta
                                ));
                            }
                            r += 1;
                        }
                    }
                    out |= bit(r, c);
                }
            }
            if at[v] | out != at[v] {
                at[v] |= out;
                work.push(v);
            }
        }
    }
    for (i, x) in g.iter().enumerate() {
        if x.is_ret && at[i] != 0 {
            let once = bit(1, false) | bit(1, true);
            if at[i] & !once != 0 {
                return Err(format!(
                    "check: a path reaches the ret at +{:#x} reported {} times",
                    x.insn.ip(),
                    if at[i] & (bit(0, false) | bit(0, true)) != 0 {
                        "0"
                    } else {
                        "2 or more"
                    }
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
