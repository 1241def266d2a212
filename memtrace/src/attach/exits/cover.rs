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
//! call, only caller-saved registers other than the probed arguments) and
//! over direct jumps the kernel does not emulate (prefixed ones), where
//! paths split; each path stops at its first instruction the kernel
//! emulates, and those are the sites: one where the first branch is an
//! emulated one, as in every allocator seen so far, several where paths
//! split before. A path that meets anything else first, or leaves the function
//! before any site, leaves the function without a cover.
//!
//! At each site the probe sees what it would at the entry: the arguments
//! in their registers, rsp at the return address (which a return probe
//! replaces), the callee-saved registers untouched for the unwinder, and
//! nothing done yet that another thread could see (a free's block is not
//! back in a cache before its probe fires). The plan is then checked by the
//! independent count (`check::count_reports`): every path from the entry to
//! a `ret` or out of the function passes exactly one site. A jump from later
//! code back into the walked instructions fails it.
use std::collections::HashMap;

use iced_x86::{FlowControl, InstructionInfoFactory, Register};

use super::{
    check::{Report, count_reports},
    graph::{Leaving, build_graph_with},
};
use crate::attach::placement::{Emulation, kernel_emulates, passable};

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
}

/// The sites of the function whose whole code is `code` and whose entry
/// probe reads `args`, in offset order; Err says why there is no cover.
pub fn plan_entry_cover(code: &[u8], args: &[Register]) -> Result<Vec<CoverSite>, String> {
    if code.is_empty() || code.len() > crate::attach::placement::MAX_BODY_BYTES {
        return Err(format!("{} bytes of code", code.len()));
    }
    let g = build_graph_with(code, Leaving::Allowed)?;
    let mut factory = InstructionInfoFactory::new();
    let mut seen = vec![false; g.len()];
    let mut sites = Vec::new();
    let mut work = vec![0usize];
    seen[0] = true;
    while let Some(i) = work.pop() {
        let x = &g[i];
        let ip = x.insn.ip();
        if x.bytes_emulated {
            sites.push(i);
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
        if !inner_branch {
            passable(&x.insn, &mut factory, args).map_err(|why| format!("+{ip:#x}: {why}"))?;
        }
        if x.succs.is_empty() || x.leaves {
            return Err(format!(
                "a path ends at +{ip:#x} before any emulated instruction"
            ));
        }
        for &s in &x.succs {
            if !std::mem::replace(&mut seen[s], true) {
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
        .map(|&i| {
            let every_edge = Report {
                cond: false,
                taken: true,
                not_taken: true,
                capture: false,
                needs_capture: false,
            };
            (g[i].insn.ip(), every_edge)
        })
        .collect();
    count_reports(&g, &reports)?;
    sites
        .into_iter()
        .map(|i| {
            let insn = &g[i].insn;
            let start = insn.ip() as usize;
            let emulated = kernel_emulates(&code[start..start + insn.len()])
                .ok_or_else(|| format!("+{start:#x} is not emulated"))?;
            Ok(CoverSite {
                delta: insn.ip(),
                mnemonic: format!("{:?}", insn.mnemonic()).to_lowercase(),
                emulated,
            })
        })
        .collect()
}
