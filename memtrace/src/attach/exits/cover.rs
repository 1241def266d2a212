//! Entry covers: the probe sites that see each call of a function once, at
//! instructions the kernel emulates, with the arguments where the entry has
//! them.
//!
//! `placement::choose_probe_site` looks at the first few instructions only:
//! jemalloc's `free` computes its thread cache's address in nine
//! instructions (shifts, masks, a `%fs` read) before its first branch, at
//! +0x30, so it was probed at +0, single-stepped. Here the function's whole
//! graph is walked from its entry (the same graph as result sites', with
//! branches out of the function as ends) over instructions that change
//! nothing the probe reads (`placement::passable`: no store, no stack, no
//! call, only caller-saved registers written) and
//! over direct jumps the kernel does not emulate (prefixed ones), where
//! paths split; each path stops at its first instruction the kernel
//! emulates, and those are the sites: one where the first branch is an
//! emulated one, as in every allocator seen so far, several where paths
//! split before. A path that meets anything else first, or leaves the function
//! before any site, leaves the function without a cover.
//!
//! An allocating function's arguments may move on the way: a data flow
//! follows which registers hold each one's value from the entry (a 64-bit
//! register `mov` copies it, any other write ends it), met over every path,
//! and a site reads an argument from a register holding it there
//! (mimalloc's `malloc` copies the size to rsi and loads its heap into rdi
//! before its first branch). An argument left in no one register ends the
//! walk: nothing is guessed.
//!
//! At each site the probe sees what it would at the entry: the arguments
//! (where the data flow says), rsp at the return address (which a return probe
//! replaces), the callee-saved registers untouched for the unwinder, and
//! nothing done yet that another thread could see (a free's block is not
//! back in a cache before its probe fires). The plan is then checked by the
//! independent count (`check::count_reports`): every path from the entry to
//! a `ret` or out of the function passes exactly one site. A jump from later
//! code back into the walked instructions fails it.
use std::collections::HashMap;

use iced_x86::{FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpKind, Register};

use super::{
    check::{Report, count_reports},
    graph::build_graph,
};
use crate::attach::placement::{Emulation, is_write, kernel_emulates, mnemonic_name, passable};

/// At most this many sites in one cover.
pub const MAX_COVER_SITES: usize = 8;

/// One probe site of a cover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoverSite {
    /// Offset of the instruction in the function.
    pub delta: u64,
    pub mnemonic: String,
    /// How the kernel handles it (never single-stepped).
    pub emulated: Emulation,
    /// The arguments no longer in their own registers here, as (the
    /// argument's register at the entry, the register holding it here).
    pub moved: Vec<(Register, Register)>,
}

/// Where each probed argument's value from the entry is, along one path:
/// for each, the full registers holding it (sorted).
type Holders = Vec<Vec<Register>>;

/// The sites of the function whose whole code is `code` and whose entry
/// probe reads `args`, in offset order; Err says why there is no cover.
/// `may_move`: the probe can read an argument from another register (an
/// allocating function's session probe, told by its cookie: see
/// `memtrace_common::ArgRegs`); else no instruction before a site may write
/// an argument's register.
pub fn plan_entry_cover(
    code: &[u8],
    args: &[Register],
    may_move: bool,
) -> Result<Vec<CoverSite>, String> {
    if code.is_empty() || code.len() > crate::attach::placement::MAX_BODY_BYTES {
        return Err(format!("{} bytes of code", code.len()));
    }
    let g = build_graph(code)?;
    let mut factory = InstructionInfoFactory::new();
    let locked: &[Register] = if may_move { &[] } else { args };
    // The holders at each instruction reached, met over every path to it.
    let mut at: Vec<Option<Holders>> = vec![None; g.len()];
    at[0] = Some(args.iter().map(|&r| vec![r]).collect());
    let mut sites = Vec::new();
    let mut work = vec![0usize];
    while let Some(i) = work.pop() {
        let x = &g[i];
        let ip = x.insn.ip();
        let held = at[i].clone().unwrap_or_default();
        if x.bytes_emulated {
            if !sites.contains(&i) {
                sites.push(i);
            }
            continue;
        }
        // A direct jump the kernel does not emulate (one with a prefix, as
        // a branch hint) changes nothing but where the path goes on: the
        // paths split there, and the cover takes a site on each.
        let inner_branch = !x.leaves
            && matches!(
                x.insn.flow_control(),
                FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch
            );
        let held = if inner_branch {
            held
        } else {
            passable(&x.insn, &mut factory, locked).map_err(|why| format!("+{ip:#x}: {why}"))?;
            moves(&x.insn, &mut factory, held, args).map_err(|why| format!("+{ip:#x}: {why}"))?
        };
        if x.succs.is_empty() || x.leaves {
            return Err(format!(
                "a path ends at +{ip:#x} before any emulated instruction"
            ));
        }
        for &s in &x.succs {
            let met = match &at[s] {
                None => held.clone(),
                Some(old) => old
                    .iter()
                    .zip(&held)
                    .map(|(a, b)| a.iter().copied().filter(|r| b.contains(r)).collect())
                    .collect(),
            };
            if at[s].as_ref() != Some(&met) {
                at[s] = Some(met);
                work.push(s);
            }
        }
    }
    if sites.is_empty() {
        return Err("no site".into());
    }
    if sites.len() > MAX_COVER_SITES {
        return Err(format!("{} sites needed", sites.len()));
    }
    sites.sort_unstable();
    let reports: HashMap<u64, Report> = sites
        .iter()
        .map(|&i| (g[i].insn.ip(), Report::EVERY_EDGE))
        .collect();
    count_reports(&g, &reports)?;
    sites
        .into_iter()
        .map(|i| {
            let insn = &g[i].insn;
            let start = insn.ip() as usize;
            let emulated = kernel_emulates(&code[start..start + insn.len()])
                .ok_or_else(|| format!("+{start:#x} is not emulated"))?;
            let held = at[i].as_ref().ok_or("a site never reached")?;
            let mut moved = Vec::new();
            for (&arg, regs) in args.iter().zip(held) {
                // Where every path to the site leaves it; its own register first.
                match regs.first() {
                    _ if regs.contains(&arg) => {}
                    Some(&r) => moved.push((arg, r)),
                    None => {
                        return Err(format!(
                            "+{start:#x}: the argument {arg:?} is not in one register on every path"
                        ));
                    }
                }
            }
            Ok(CoverSite {
                delta: insn.ip(),
                mnemonic: format!("{:?}", insn.mnemonic()).to_lowercase(),
                emulated,
                moved,
            })
        })
        .collect()
}

/// The holders of `args` after `insn` (passable: it writes only scratch
/// registers and flags): a 64-bit `mov` between registers copies what its
/// source holds; any other write ends what the register held. Err when an
/// argument is left in no register.
fn moves(
    insn: &Instruction,
    factory: &mut InstructionInfoFactory,
    mut held: Holders,
    args: &[Register],
) -> Result<Holders, String> {
    let copy = (insn.mnemonic() == Mnemonic::Mov
        && insn.op_count() == 2
        && insn.op0_kind() == OpKind::Register
        && insn.op1_kind() == OpKind::Register
        && insn.op0_register().is_gpr64()
        && insn.op1_register().is_gpr64())
    .then(|| (insn.op0_register(), insn.op1_register()));
    let written: Vec<Register> = factory
        .info(insn)
        .used_registers()
        .iter()
        .filter(|r| is_write(r.access()))
        .map(|r| r.register().full_register())
        .collect();
    for regs in &mut held {
        let from_source = copy.is_some_and(|(_, src)| regs.contains(&src));
        regs.retain(|r| !written.contains(r));
        if let (true, Some((dst, _))) = (from_source, copy) {
            regs.push(dst);
            regs.sort_unstable_by_key(|r| *r as u32);
        }
    }
    if let Some((arg, _)) = args.iter().zip(&held).find(|(_, regs)| regs.is_empty()) {
        return Err(format!(
            "{} overwrites the argument {arg:?}, kept nowhere else",
            mnemonic_name(insn.mnemonic())
        ));
    }
    Ok(held)
}
