//! The independent check of a plan (step 5 of the analysis): a count over
//! the graph that shares nothing with how the sites were chosen. Result
//! sites and entry covers (`cover`) are both checked by it.
use std::collections::HashMap;

use super::{ExitPlan, Outcome, graph::Insn};

/// What a probe site reports, as the count sees it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Report {
    /// A conditional jump that reports per edge: `taken` on its first edge
    /// (the jump's target), `not_taken` on the other. Else `taken` on all.
    pub(super) cond: bool,
    pub(super) taken: bool,
    pub(super) not_taken: bool,
    /// Stores the size for a later site.
    pub(super) capture: bool,
    /// Reports with a size only a capture before it can give.
    pub(super) needs_capture: bool,
}

impl Report {
    /// A site that reports on whatever edge leaves it: an entry probe, a
    /// hand-off.
    pub(super) const EVERY_EDGE: Report = Report {
        cond: false,
        taken: true,
        not_taken: true,
        capture: false,
        needs_capture: false,
    };
}

/// What a path has seen so far, as a bit set of the 6 (reports so far: 0, 1
/// or 2 = more, captured) pairs.
fn bit(reports: usize, captured: bool) -> u8 {
    1u8 << (reports.min(2) * 2 + captured as usize)
}

/// On every path from the entry to a `ret` or out of the function, exactly
/// one site (a result site or a hand-off) reports the call, and a site that
/// records without a size comes after a capture.
pub(super) fn check_plan(g: &[Insn], plan: &ExitPlan) -> Result<(), String> {
    let mut sites: HashMap<u64, Report> = plan
        .sites
        .iter()
        .map(|s| {
            let r = |o: Outcome| o != Outcome::Nothing;
            let report = Report {
                cond: s.cond.is_some(),
                taken: r(s.taken),
                not_taken: r(if s.cond.is_some() {
                    s.not_taken
                } else {
                    s.taken
                }),
                capture: s.capture,
                needs_capture: s.size.is_none()
                    && (s.taken == Outcome::Record || s.not_taken == Outcome::Record),
            };
            (s.delta, report)
        })
        .collect();
    for h in &plan.handoffs {
        if sites.insert(h.delta, Report::EVERY_EDGE).is_some() {
            return Err(format!("check: two probes at +{:#x}", h.delta));
        }
    }
    count_reports(g, &sites)
}

/// On every path from the entry to a `ret`, or out of the function, exactly
/// one of `sites` (by offset) reports the call.
pub(super) fn count_reports(g: &[Insn], sites: &HashMap<u64, Report>) -> Result<(), String> {
    let n = g.len();
    let mut at: Vec<u8> = vec![0; n];
    // What the paths leaving the function (at each branch out) have seen.
    let mut left: Vec<u8> = vec![0; n];
    if n == 0 {
        return Ok(());
    }
    at[0] = bit(0, false);
    let mut work = vec![0usize];
    while let Some(i) = work.pop() {
        let x = &g[i];
        let site = sites.get(&x.insn.ip());
        // A jump out has no edge in the graph; a conditional one's taken
        // edge is its first.
        let leaving = x.leaves.then_some(usize::MAX);
        let edges = x
            .succs
            .iter()
            .copied()
            .map(Some)
            .chain(leaving.map(|_| None));
        for (k, v) in edges.enumerate() {
            // The taken edge of a conditional jump out is the one leaving.
            let k = if x.leaves && x.is_jcc {
                if v.is_none() { 0 } else { 1 }
            } else {
                k
            };
            let out =
                step(at[i], site, k).map_err(|why| format!("check: +{:#x} {why}", x.insn.ip()))?;
            match v {
                Some(v) => {
                    if at[v] | out != at[v] {
                        at[v] |= out;
                        work.push(v);
                    }
                }
                None => left[i] |= out,
            }
        }
    }
    check_ends(g, &at, &left)
}

/// The set of (reports, captured) after paths in `from` go through `site`
/// (if there is one) along its `k`th edge.
fn step(from: u8, site: Option<&Report>, k: usize) -> Result<u8, String> {
    let mut out = 0u8;
    for reports in 0..3 {
        for captured in [false, true] {
            if from & bit(reports, captured) == 0 {
                continue;
            }
            let (mut r, mut c) = (reports, captured);
            if let Some(s) = site {
                c |= s.capture;
                let reports_here = if s.cond && k != 0 {
                    s.not_taken
                } else {
                    s.taken
                };
                if reports_here {
                    if s.needs_capture && !c {
                        return Err("records with no size captured".into());
                    }
                    r += 1;
                }
            }
            out |= bit(r, c);
        }
    }
    Ok(out)
}

/// Every path that reaches a `ret` or leaves the function was reported
/// exactly once.
fn check_ends(g: &[Insn], at: &[u8], left: &[u8]) -> Result<(), String> {
    let once = bit(1, false) | bit(1, true);
    let times = |seen: u8| {
        if seen & (bit(0, false) | bit(0, true)) != 0 {
            "0"
        } else {
            "2 or more"
        }
    };
    for (i, x) in g.iter().enumerate() {
        if x.is_ret && at[i] != 0 && at[i] & !once != 0 {
            return Err(format!(
                "check: a path reaches the ret at +{:#x} reported {} times",
                x.insn.ip(),
                times(at[i])
            ));
        }
        if left[i] != 0 && left[i] & !once != 0 {
            return Err(format!(
                "check: a path leaves the function at +{:#x} reported {} times",
                x.insn.ip(),
                times(left[i])
            ));
        }
    }
    Ok(())
}
