//! The F, Z and N regions (step 2 of the analysis, see the module docs).
use super::{Outcome, graph::Insn};

/// Per instruction, whether it is in each region.
pub(super) struct Regions {
    /// Final: every path that returns does so without a call and without
    /// writing rax.
    pub(super) f: Vec<bool>,
    /// Null: every path that returns zeroes rax and goes on in F.
    pub(super) z: Vec<bool>,
    /// Never returns.
    pub(super) never: Vec<bool>,
}

impl Regions {
    /// In T = F ∪ Z ∪ N: the call's outcome is settled from here on.
    pub(super) fn t(&self, i: usize) -> bool {
        self.f[i] || self.z[i] || self.never[i]
    }

    /// In T on a path that returns: an edge into it from outside T is a
    /// crossing.
    pub(super) fn live_t(&self, i: usize) -> bool {
        self.t(i) && !self.never[i]
    }

    /// What a crossing into `i` tells.
    pub(super) fn outcome(&self, i: usize) -> Outcome {
        if self.f[i] {
            Outcome::Record
        } else if self.z[i] {
            Outcome::Null
        } else {
            Outcome::Nothing
        }
    }
}

/// The regions as least fixpoints. N: what never returns (a guarded call, a
/// trap, and what leads only there); F and Z ignore the paths into N, which
/// need no report.
pub(super) fn regions(g: &[Insn]) -> Regions {
    let n = g.len();
    let mut r = Regions {
        f: vec![false; n],
        z: vec![false; n],
        never: vec![false; n],
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
            let never =
                x.guarded || (!x.is_ret && !x.is_call && x.succs.iter().all(|&s| self.never[s]));
            if never {
                self.never[i] = true;
                return true;
            }
        }
        if self.never[i] {
            return false;
        }
        let mut changed = false;
        let live = |s: &usize| !self.never[*s];
        if !self.f[i] && !x.is_call && !x.writes_rax {
            let ok = x.is_ret
                || (x.succs.iter().filter(|s| live(s)).all(|&s| self.f[s])
                    && x.succs.iter().any(live));
            if ok {
                self.f[i] = true;
                changed = true;
            }
        }
        if !self.z[i] && !x.is_call && !x.is_ret && x.succs.iter().any(live) {
            let ok = if x.zeroes_rax {
                x.succs
                    .iter()
                    .filter(|s| live(s))
                    .all(|&s| self.f[s] || self.z[s])
            } else {
                x.succs.iter().filter(|s| live(s)).all(|&s| self.z[s])
            };
            if ok {
                self.z[i] = true;
                changed = true;
            }
        }
        changed
    }
}
