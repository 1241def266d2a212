//! The function's control-flow graph, one node per instruction (step 1 of
//! the analysis), with its predecessors and dominators.
use std::collections::{HashMap, HashSet};

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpKind,
    Register,
};

use crate::attach::placement::{is_write, kernel_emulates};

pub(super) struct Insn {
    pub(super) insn: Instruction,
    pub(super) bytes_emulated: bool,
    /// A conditional jump's are (target, next).
    pub(super) succs: Vec<usize>,
    pub(super) is_jcc: bool,
    pub(super) is_call: bool,
    pub(super) is_ret: bool,
    /// The full general registers it writes (rsp aside).
    pub(super) writes: Vec<Register>,
    /// A 64-bit `mov` between general registers: (destination, source).
    pub(super) copy: Option<(Register, Register)>,
    pub(super) zeroes_rax: bool,
    /// A call taken not to return: the padding after it gets a guard.
    pub(super) guarded: bool,
    /// A branch out of the function (a tail call, a jump through a register
    /// or the GOT): for a conditional jump, its taken edge.
    pub(super) leaves: bool,
}

/// Decodes `code` (a whole function at offset 0) into a graph; Err if it
/// holds what cannot be followed. A branch out of the function (a tail call,
/// a jump through a register or the GOT) ends its path there, marked
/// `leaves`: the call goes on elsewhere.
pub(super) fn build_graph(code: &[u8]) -> Result<Vec<Insn>, String> {
    let (mut g, at) = decode(code)?;
    for i in 0..g.len() {
        link(&mut g, i, &at, code.len() as u64)?;
    }
    mark_padding(&mut g);
    Ok(g)
}

/// Every instruction, not linked yet, and the index of each by its offset.
fn decode(code: &[u8]) -> Result<(Vec<Insn>, HashMap<u64, usize>), String> {
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
        at.insert(insn.ip(), out.len());
        out.push(Insn {
            insn,
            bytes_emulated: kernel_emulates(&code[start..start + insn.len()]).is_some(),
            succs: Vec::new(),
            is_jcc: false,
            is_call: false,
            is_ret: false,
            writes: writes(&mut factory, &insn),
            copy: copy(&insn),
            zeroes_rax: zeroes_rax(&insn),
            guarded: false,
            leaves: false,
        });
    }
    Ok((out, at))
}

fn writes(factory: &mut InstructionInfoFactory, insn: &Instruction) -> Vec<Register> {
    let mut w: Vec<Register> = factory
        .info(insn)
        .used_registers()
        .iter()
        .filter(|r| is_write(r.access()))
        .map(|r| r.register().full_register())
        .filter(|r| r.is_gpr64() && *r != Register::RSP)
        .collect();
    w.sort_unstable_by_key(|r| *r as u32);
    w.dedup();
    w
}

/// `mov %src,%dst` between 64-bit general registers, as (dst, src).
fn copy(insn: &Instruction) -> Option<(Register, Register)> {
    (insn.mnemonic() == Mnemonic::Mov
        && insn.op_count() == 2
        && insn.op0_kind() == OpKind::Register
        && insn.op1_kind() == OpKind::Register
        && insn.op0_register().is_gpr64()
        && insn.op1_register().is_gpr64())
    .then(|| (insn.op0_register(), insn.op1_register()))
}

/// `xor %eax,%eax` (or rax), `mov $0,%eax` (or rax): the NULL a failing
/// path returns.
fn zeroes_rax(insn: &Instruction) -> bool {
    match insn.mnemonic() {
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
    }
}

/// Sets the successors and kind of instruction `i` from its flow control;
/// `len`: the function's size.
fn link(g: &mut [Insn], i: usize, at: &HashMap<u64, usize>, len: u64) -> Result<(), String> {
    let n = g.len();
    let insn = g[i].insn;
    let out = match insn.flow_control() {
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
            insn.near_branch_target() >= len
        }
        FlowControl::IndirectBranch => true,
        _ => false,
    };
    // The last instruction falling through (a call to a function that
    // does not return, without padding): the path ends there.
    let past_end = i + 1 == n
        && matches!(
            insn.flow_control(),
            FlowControl::Next | FlowControl::Call | FlowControl::IndirectCall
        );
    if out || past_end {
        g[i].leaves = true;
        if insn.flow_control() == FlowControl::ConditionalBranch {
            g[i].succs = vec![i + 1];
            g[i].is_jcc = true;
            if i + 1 >= n {
                return Err(format!("+{:#x} runs past the function's end", insn.ip()));
            }
        }
        return Ok(());
    }
    let index = |target: u64| -> Result<usize, String> {
        at.get(&target).copied().ok_or_else(|| {
            format!(
                "+{:#x} branches to +{target:#x}, not an instruction of the function",
                insn.ip()
            )
        })
    };
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
            let padded = i + 1 < n && g[i + 1].insn.mnemonic() == Mnemonic::Nop;
            if padded {
                (Vec::new(), false, true, false)
            } else {
                (vec![next()?], false, true, false)
            }
        }
        FlowControl::ConditionalBranch => {
            let t = index(insn.near_branch_target())?;
            (vec![t, next()?], true, false, false)
        }
        FlowControl::UnconditionalBranch => {
            (vec![index(insn.near_branch_target())?], false, false, false)
        }
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
    let x = &mut g[i];
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
    Ok(())
}

/// Guards the calls followed by padding, unless something jumps to that NOP:
/// then it is not padding, and the call is taken to return there.
fn mark_padding(g: &mut [Insn]) {
    let targets: HashSet<usize> = g.iter().flat_map(|x| x.succs.iter().copied()).collect();
    for (i, x) in g.iter_mut().enumerate() {
        if x.is_call && x.succs.is_empty() {
            if targets.contains(&(i + 1)) {
                x.succs.push(i + 1);
            } else {
                x.guarded = true;
            }
        }
    }
}

/// Every instruction's predecessors in the graph.
pub(super) fn predecessors(g: &[Insn]) -> Vec<Vec<usize>> {
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
pub(super) fn dominators(g: &[Insn], preds: &[Vec<usize>]) -> Vec<Option<usize>> {
    let n = g.len();
    let (order, rpo) = reverse_postorder(g);
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

/// The instructions reached from the entry in reverse postorder, and each
/// one's rank in it (`usize::MAX`: never reached).
fn reverse_postorder(g: &[Insn]) -> (Vec<usize>, Vec<usize>) {
    let n = g.len();
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
    (order, rpo)
}
