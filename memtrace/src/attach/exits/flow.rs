//! Where the size and the caller's rbp are (step 4 of the analysis): a
//! forward data flow over registers, stack slots and rsp's offset from the
//! entry.
use std::collections::HashMap;

use iced_x86::{Instruction, InstructionInfo, InstructionInfoFactory, Mnemonic, OpKind, Register};

use super::{CALLER_SAVED, Loc, graph::Insn};
use crate::attach::placement::is_write;

/// What the forward data flow knows at one instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct State {
    /// rsp - entry rsp, if known.
    pub(super) sp: Option<i64>,
    /// Registers holding the entry's rdi (true) or rbp (false).
    regs: HashMap<Register, bool>,
    /// Stack slots (offset from the entry rsp) holding them.
    slots: HashMap<i64, bool>,
    /// rsp's value was copied somewhere: slots may be written through it.
    escaped: bool,
}

/// The value the flow follows: the size argument at the entry...
pub(super) const SIZE: bool = true;
/// ...or the entry's rbp (the caller's frame pointer).
pub(super) const RBP: bool = false;

impl State {
    fn entry(size: Register) -> Self {
        State {
            sp: Some(0),
            regs: HashMap::from([(size, SIZE), (Register::RBP, RBP)]),
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

    pub(super) fn location(&self, what: bool) -> Option<Loc> {
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

    /// `dst` now holds `v` (or neither value).
    fn set_reg(&mut self, dst: Register, v: Option<bool>) {
        match v {
            Some(v) => {
                self.regs.insert(dst, v);
            }
            None => {
                self.regs.remove(&dst);
            }
        }
    }

    /// The slot at `at` now holds `v`, unless the frame's address escaped
    /// (then a write through it could change the slot unseen).
    fn store(&mut self, at: i64, v: Option<bool>) {
        self.clobber_slots(at, 8);
        if let (Some(v), false) = (v, self.escaped) {
            self.slots.insert(at, v);
        }
    }

    /// Nothing is known of rsp, nor so of the slots.
    fn lose_sp(&mut self) {
        self.sp = None;
        self.slots.clear();
    }

    /// rsp's value was copied: the frame may be written through the copy.
    fn escape(&mut self) {
        self.escaped = true;
        self.slots.clear();
    }
}

/// The state before every instruction (None: never reached), for a
/// function whose size argument is in `size` at its entry.
pub(super) fn data_flow(g: &[Insn], size: Register) -> Vec<Option<State>> {
    let mut factory = InstructionInfoFactory::new();
    let mut states: Vec<Option<State>> = vec![None; g.len()];
    if g.is_empty() {
        return states;
    }
    states[0] = Some(State::entry(size));
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

/// The state after `x` from the state before it: the instructions that move
/// the values are followed; any other loses what it writes.
fn transfer(x: &Insn, factory: &mut InstructionInfoFactory, s: &State) -> State {
    let mut s = s.clone();
    if !follow(&x.insn, &mut s) {
        lose_writes(x, factory.info(&x.insn), &mut s);
    }
    s
}

/// Applies `insn` if it moves a value the flow follows or moves rsp by a
/// known amount; false (`s` untouched) for any other instruction.
fn follow(insn: &Instruction, s: &mut State) -> bool {
    let op = |i: u32| insn.op_kind(i);
    match insn.mnemonic() {
        Mnemonic::Push if op(0) == OpKind::Register && insn.op0_register().is_gpr64() => {
            push(s, insn.op0_register());
            true
        }
        Mnemonic::Pop if op(0) == OpKind::Register && insn.op0_register().is_gpr64() => {
            pop(s, insn.op0_register());
            true
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
            true
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
            true
        }
        Mnemonic::Mov if insn.op_count() == 2 => match (op(0), op(1)) {
            (OpKind::Register, OpKind::Register)
                if insn.op0_register().is_gpr64() && insn.op1_register().is_gpr64() =>
            {
                copy(s, insn.op0_register(), insn.op1_register());
                true
            }
            (OpKind::Memory, OpKind::Register) if insn.op1_register().is_gpr64() => spill(insn, s),
            (OpKind::Register, OpKind::Memory) if insn.op0_register().is_gpr64() => reload(insn, s),
            _ => false,
        },
        _ => false,
    }
}

/// `push %r`: a slot below the old rsp takes r's value.
fn push(s: &mut State, r: Register) {
    let v = s.regs.get(&r).copied();
    if let Some(sp) = s.sp.as_mut() {
        *sp -= 8;
        let at = *sp;
        s.store(at, v);
    }
}

/// `pop %r`: r takes the slot's value.
fn pop(s: &mut State, r: Register) {
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
}

/// `mov %src,%dst`.
fn copy(s: &mut State, dst: Register, src: Register) {
    if src == Register::RSP {
        s.escape();
    }
    if dst == Register::RSP {
        s.lose_sp();
    }
    let v = s.regs.get(&src).copied();
    s.set_reg(dst, v);
}

/// The stack slot `insn`'s memory operand is, as an offset from rsp: only
/// rsp-based slots (no index, no segment) are followed.
fn rsp_slot(insn: &Instruction) -> Option<i64> {
    (insn.memory_base() == Register::RSP
        && insn.memory_index() == Register::None
        && insn.segment_prefix() == Register::None)
        .then(|| insn.memory_displacement64() as i64)
}

/// `mov %r,d(%rsp)`, where rsp is known; false for any other store.
fn spill(insn: &Instruction, s: &mut State) -> bool {
    let (Some(d), Some(sp)) = (rsp_slot(insn), s.sp) else {
        return false;
    };
    let v = s.regs.get(&insn.op1_register()).copied();
    s.store(sp + d, v);
    true
}

/// `mov d(%rsp),%r`, where rsp is known; false for any other load.
fn reload(insn: &Instruction, s: &mut State) -> bool {
    let (Some(d), Some(sp)) = (rsp_slot(insn), s.sp) else {
        return false;
    };
    let dst = insn.op0_register();
    let v = s.slots.get(&(sp + d)).copied();
    s.set_reg(dst, v);
    if dst == Register::RSP {
        s.lose_sp();
    }
    true
}

/// What an instruction `follow` does not know writes is lost.
fn lose_writes(x: &Insn, info: &InstructionInfo, s: &mut State) {
    if x.is_call {
        clobber_call(s);
        return;
    }
    if takes_frame_address(&x.insn, info) {
        s.escape();
    }
    lose_memory_writes(info, s);
    lose_register_writes(&x.insn, info, s);
}

/// A call clobbers the caller-saved registers, and the callee's frame the
/// slots below the return address it pushes.
fn clobber_call(s: &mut State) {
    for r in CALLER_SAVED {
        s.regs.remove(&r);
    }
    if let Some(sp) = s.sp {
        s.slots.retain(|&o, _| o >= sp);
    }
}

/// `lea x(%rsp),%reg`, `mov %rsp,%reg` and the like: the frame's address
/// escapes.
fn takes_frame_address(insn: &Instruction, info: &InstructionInfo) -> bool {
    let reads_rsp = info
        .used_registers()
        .iter()
        .any(|r| r.register() == Register::RSP && !is_write(r.access()));
    let mem_rsp_based = info
        .used_memory()
        .iter()
        .any(|m| m.base() == Register::RSP || m.index() == Register::RSP);
    (reads_rsp && !mem_rsp_based && !insn.is_stack_instruction())
        || (insn.mnemonic() == Mnemonic::Lea && insn.memory_base() == Register::RSP)
}

/// A store to a known rsp-based slot loses what was there; one through an
/// rsp-based address of unknown offset, every slot.
fn lose_memory_writes(info: &InstructionInfo, s: &mut State) {
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
}

/// The registers written lose their values; rsp moves by what a stack
/// instruction pushes or pops, and is lost to anything else.
fn lose_register_writes(insn: &Instruction, info: &InstructionInfo, s: &mut State) {
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
    if !rsp_written {
        return;
    }
    if inc != 0 && insn.is_stack_instruction() {
        if let Some(sp) = s.sp.as_mut() {
            *sp += inc;
            let at = *sp;
            if inc < 0 {
                s.clobber_slots(at, -inc);
            }
        }
    } else {
        s.lose_sp();
    }
}
