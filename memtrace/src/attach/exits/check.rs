//! The independent check of a plan (step 5 of the analysis): a count over
//! the graph that shares nothing with how the sites were chosen.
use std::collections::HashMap;

use super::{ExitPlan, ExitSite, Outcome, graph::Insn};

/// What a path has seen so far, as a bit set of the 6 (reports so far: 0, 1
/// or 2 = more, captured) pairs.
fn bit(reports: usize, captured: bool) -> u8 {
    1u8 << (reports.min(2) * 2 + captured as usize)
}

/// On every path from the entry to a `ret`, exactly one site reports the
/// call, and a site that records without a size comes after a capture.
pub(super) fn check_plan(g: &[Insn], plan: &ExitPlan) -> Result<(), String> {
    let n = g.len();
    let site_at: HashMap<u64, &ExitSite> = plan.sites.iter().map(|s| (s.delta, s)).collect();
    let mut at: Vec<u8> = vec![0; n];
    at[0] = bit(0, false);
    let mut work = vec![0usize];
    while let Some(i) = work.pop() {
        let x = &g[i];
        let site = site_at.get(&x.insn.ip()).copied();
        for (k, &v) in x.succs.iter().enumerate() {
            let mut out = 0u8;
            for reports in 0..3 {
                for captured in [false, true] {
                    if at[i] & bit(reports, captured) != 0 {
                        let (r, c) = take_edge(site, k, reports, captured)?;
                        out |= bit(r, c);
                    }
                }
            }
            if at[v] | out != at[v] {
                at[v] |= out;
                work.push(v);
            }
        }
    }
    check_rets(g, &at)
}

/// A path's (reports, captured) after it leaves `site` (if there is one)
/// along its `k`th edge.
fn take_edge(
    site: Option<&ExitSite>,
    k: usize,
    reports: usize,
    captured: bool,
) -> Result<(usize, bool), String> {
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
    Ok((r, c))
}

/// Every path that reaches a `ret` was reported exactly once.
fn check_rets(g: &[Insn], at: &[u8]) -> Result<(), String> {
    let once = bit(1, false) | bit(1, true);
    for (i, x) in g.iter().enumerate() {
        if x.is_ret && at[i] != 0 && at[i] & !once != 0 {
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
    Ok(())
}
