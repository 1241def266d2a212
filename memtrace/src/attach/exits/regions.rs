//! The F, Z, N and O regions (step 2 of the analysis, see the module docs).
use iced_x86::Register;

use super::{Outcome, graph::Insn};

/// Per instruction, whether it is in each region.
pub(super) struct Regions {
    /// Final: every path that returns does so without a call, and returns
    /// (in rax) what this register holds before the instruction: rax where
    /// the function has put its result there, another register where it
    /// moves it to rax later (jemalloc's fast path: r11).
    pub(super) res: Vec<Option<Register>>,
    /// Null: every path that returns zeroes rax and goes on in F.
    pub(super) z: Vec<bool>,
    /// Never returns.
    pub(super) never: Vec<bool>,
    /// Out: every path leaves the function (a tail call to its slow path),
    /// without a call or a `ret` on the way.
    pub(super) out: Vec<bool>,
}

impl Regions {
    pub(super) fn f(&self, i: usize) -> bool {
        self.res[i].is_some()
    }

    /// In T = F ∪ Z ∪ N: the call's outcome is settled from here on.
    pub(super) fn t(&self, i: usize) -> bool {
        self.f(i) || self.z[i] || self.never[i]
    }

    /// In T on a path that returns: an edge into it from outside T is a
    /// crossing.
    pub(super) fn live_t(&self, i: usize) -> bool {
        self.t(i) && !self.never[i]
    }

    /// In O on a path that leaves: an edge into it from outside T ∪ O hands
    /// the call over to code outside the function.
    pub(super) fn live_out(&self, i: usize) -> bool {
        self.out[i] && !self.never[i]
    }

    /// What a crossing into `i` tells.
    pub(super) fn outcome(&self, i: usize) -> Outcome {
        if self.f(i) {
            Outcome::Record
        } else if self.z[i] {
            Outcome::Null
        } else {
            Outcome::Nothing
        }
    }
}

/// The regions as least fixpoints. N: what never returns (a guarded call, a
/// trap, and what leads only there); F, Z and O ignore the paths into N,
/// which need no report.
pub(super) fn regions(g: &[Insn]) -> Regions {
    let n = g.len();
    let mut r = Regions {
        res: vec![None; n],
        z: vec![false; n],
        never: vec![false; n],
        out: vec![false; n],
    };
    loop {
        let mut changed = false;
        for i in (0..n).rev() {
            changed |= r.grow(g, i);
        }
        if !changed {
            return r;
        }
    }
}

impl Regions {
    /// Adds `i` to the regions its successors now put it in; whether any
    /// grew.
    fn grow(&mut self, g: &[Insn], i: usize) -> bool {
        let x = &g[i];
        if !self.never[i] {
            let never = x.guarded
                || (!x.is_ret && !x.is_call && !x.leaves && x.succs.iter().all(|&s| self.never[s]));
            if never {
                self.never[i] = true;
                return true;
            }
        }
        if self.never[i] {
            return false;
        }
        let mut changed = false;
        if self.res[i].is_none() {
            self.res[i] = self.final_reg(x);
            changed |= self.res[i].is_some();
        }
        let live: Vec<usize> = x
            .succs
            .iter()
            .copied()
            .filter(|&s| !self.never[s])
            .collect();
        let plain = !x.is_call && !x.is_ret;
        if !self.z[i] && plain && !x.leaves && !live.is_empty() {
            let ok = if x.zeroes_rax {
                live.iter()
                    .all(|&s| self.res[s] == Some(Register::RAX) || self.z[s])
            } else {
                live.iter().all(|&s| self.z[s])
            };
            if ok {
                self.z[i] = true;
                changed = true;
            }
        }
        if !self.out[i]
            && plain
            && (x.leaves || !live.is_empty())
            && live.iter().all(|&s| self.out[s])
        {
            self.out[i] = true;
            changed = true;
        }
        changed
    }

    /// The register holding, before `x`, what every path from it returns,
    /// if they all return without a call or a branch out: rax at a `ret`;
    /// through a `mov %src,%r` into the register the successors return,
    /// `src`; through any other instruction, the successors' register
    /// unless it writes it.
    fn final_reg(&self, x: &Insn) -> Option<Register> {
        if x.is_call || x.leaves {
            return None;
        }
        if x.is_ret {
            return Some(Register::RAX);
        }
        let mut regs = x
            .succs
            .iter()
            .filter(|&&s| !self.never[s])
            .map(|&s| self.res[s]);
        let first = regs.next()??;
        if !regs.all(|r| r == Some(first)) {
            return None;
        }
        match x.copy {
            Some((dst, src)) if dst == first => (src != Register::RSP).then_some(src),
            _ if x.writes.contains(&first) => None,
            _ => Some(first),
        }
    }
}
