//! Choosing the probe sites (steps 3 and 4 of the analysis): one for every
//! crossing into F or Z, then the captures for the sites that record without
//! a size, then each site's locations.
use std::collections::HashMap;

use iced_x86::Instruction;

use super::{
    ExitSite, Outcome,
    flow::{RBP, SIZE, State},
    graph::{Insn, dominators},
    regions::Regions,
};

/// What a site reports: a conditional jump's condition code, evaluated by
/// the BPF side (None: `taken` always applies), and the outcome each way.
#[derive(Clone, Copy)]
pub(super) struct Report {
    cond: Option<u8>,
    taken: Outcome,
    not_taken: Outcome,
}

impl Report {
    /// `o` whenever the site is reached.
    pub(super) fn always(o: Outcome) -> Self {
        Report {
            cond: None,
            taken: o,
            not_taken: Outcome::Nothing,
        }
    }

    fn records(&self) -> bool {
        self.taken == Outcome::Record || self.not_taken == Outcome::Record
    }
}

/// Site (index in the graph) → what it reports.
pub(super) type Sites = HashMap<usize, Report>;

/// What the analysis knows of one function, for choosing its sites.
pub(super) struct Planner<'a> {
    pub(super) code: &'a [u8],
    pub(super) g: &'a [Insn],
    pub(super) r: &'a Regions,
    pub(super) preds: &'a [Vec<usize>],
    pub(super) states: &'a [Option<State>],
}

impl Planner<'_> {
    /// A site for every crossing from a reached instruction outside T.
    pub(super) fn crossing_sites(&self) -> Result<Sites, String> {
        let mut sites = Sites::new();
        for s in 0..self.g.len() {
            if self.r.t(s) || self.states[s].is_none() {
                continue;
            }
            let x = &self.g[s];
            if x.is_jcc && x.bytes_emulated && x.succs.iter().all(|&v| self.r.live_t(v)) {
                // Both edges cross (one to a result, one to NULL): the jump
                // decides the outcome, one probe for both.
                let byte = jcc_cond(self.code, &x.insn);
                sites.insert(
                    s,
                    Report {
                        cond: Some(byte),
                        taken: self.r.outcome(x.succs[0]),
                        not_taken: self.r.outcome(x.succs[1]),
                    },
                );
                continue;
            }
            for (k, &v) in x.succs.iter().enumerate() {
                if self.r.live_t(v) {
                    self.place_crossing(&mut sites, s, k, v)?;
                }
            }
        }
        Ok(sites)
    }

    /// Whether every edge into `v` is a crossing (none from inside T, but
    /// those from what never returns, which no path takes to a ret).
    fn only_crossings(&self, v: usize) -> bool {
        self.preds[v]
            .iter()
            .all(|&p| !self.r.t(p) || self.r.never[p])
    }

    /// A site for the crossing from `s` along its `k`th edge, into `v`: the
    /// cheapest of (a), (b), a probe on a failure's target, then (c) (see the
    /// module docs).
    fn place_crossing(
        &self,
        sites: &mut Sites,
        s: usize,
        k: usize,
        v: usize,
    ) -> Result<(), String> {
        let (g, x, o) = (self.g, &self.g[s], self.r.outcome(v));
        // (a) The target, when every edge into it is a crossing.
        if g[v].bytes_emulated && self.only_crossings(v) {
            sites.insert(v, Report::always(o));
            return Ok(());
        }
        // (b) The first emulated instruction after it, when nothing else
        // leads there.
        if let Some(w) = self.first_emulated_after(s, v) {
            sites.insert(w, Report::always(o));
            return Ok(());
        }
        // A failure path: a probe on its target, single-stepped if need
        // be, costs only the calls that fail; the jump below would cost
        // every call through it (glibc's check for a size above
        // PTRDIFF_MAX is made by every call).
        if o == Outcome::Null && self.only_crossings(v) {
            sites.insert(v, Report::always(Outcome::Null));
            return Ok(());
        }
        // (c) The conditional jump itself, evaluated from the flags.
        if x.is_jcc && x.bytes_emulated {
            let byte = jcc_cond(self.code, &x.insn);
            let e = sites.entry(s).or_insert(Report {
                cond: Some(byte),
                taken: Outcome::Nothing,
                not_taken: Outcome::Nothing,
            });
            if k == 0 {
                e.taken = o;
            } else {
                e.not_taken = o;
            }
            return Ok(());
        }
        Err(format!(
            "the result is known after +{:#x} ({}), and no instruction there can be probed cheaply",
            x.insn.ip(),
            mnemonic_name(&x.insn),
        ))
    }

    /// The first emulated instruction on the straight line from `v` (entered
    /// from `s`) that nothing else leads to, within 16 instructions.
    fn first_emulated_after(&self, s: usize, v: usize) -> Option<usize> {
        let g = self.g;
        let (mut w, mut prev) = (v, s);
        for _ in 0..16 {
            if self.preds[w].iter().any(|&p| p != prev) {
                return None;
            }
            if g[w].bytes_emulated {
                return Some(w);
            }
            if g[w].succs.len() != 1 {
                return None;
            }
            (prev, w) = (w, g[w].succs[0]);
        }
        None
    }

    /// The captures for the sites that record without knowing the size:
    /// for each, its nearest dominator that is emulated and knows it.
    pub(super) fn captures(&self, sites: &Sites) -> Result<Vec<usize>, String> {
        let idom = dominators(self.g, self.preds);
        let knows_size = |c: usize| {
            self.g[c].bytes_emulated
                && self.states[c]
                    .as_ref()
                    .is_some_and(|s| s.sp.is_some() && s.location(SIZE).is_some())
        };
        let mut captures = Vec::new();
        for (&i, report) in sites {
            let st = self.states[i].as_ref().ok_or("unreachable site")?;
            if report.records() && st.location(SIZE).is_none() {
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
                        self.g[i].insn.ip()
                    )
                })?;
                captures.push(c);
            }
        }
        Ok(captures)
    }

    /// The site at `i` as the plan has it.
    pub(super) fn exit_site(
        &self,
        i: usize,
        report: Report,
        capture: bool,
    ) -> Result<ExitSite, String> {
        let x = &self.g[i];
        let st = self.states[i].as_ref().ok_or("unreachable site")?;
        let sp = st
            .sp
            .ok_or_else(|| format!("rsp unknown at +{:#x}", x.insn.ip()))?;
        let rbp = st.location(RBP);
        if rbp.is_none() && report.records() {
            return Err(format!(
                "the caller's rbp is not known at +{:#x}",
                x.insn.ip()
            ));
        }
        Ok(ExitSite {
            delta: x.insn.ip(),
            mnemonic: mnemonic_name(&x.insn),
            cond: report.cond,
            taken: report.taken,
            not_taken: report.not_taken,
            capture,
            size: st.location(SIZE),
            rbp,
            entry_sp_delta: (-sp) as u64,
        })
    }
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
