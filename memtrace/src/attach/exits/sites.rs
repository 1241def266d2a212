//! Choosing the probe sites (steps 3 and 4 of the analysis): one for every
//! crossing into F or Z, a hand-off for every crossing into O, then the
//! captures for the sites that record without a size, then each site's
//! locations.
use std::collections::{BTreeSet, HashMap};

use iced_x86::{Instruction, Register};

use super::{
    ExitSite, HandOff, Loc, Outcome,
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
    /// The register holding the result where an outcome is `Record`.
    result: Option<Register>,
}

impl Report {
    /// `o` whenever the site is reached.
    pub(super) fn always(o: Outcome) -> Self {
        Report {
            cond: None,
            taken: o,
            not_taken: Outcome::Nothing,
            result: None,
        }
    }

    /// `o`, with the result in `result` when it records.
    fn always_in(o: Outcome, result: Option<Register>) -> Self {
        Report {
            result: result.filter(|_| o == Outcome::Record),
            ..Report::always(o)
        }
    }

    /// Adds what the edge `k` (0: taken) reports, with the result in
    /// `result`; Err if the other edge records from another register.
    fn set_edge(&mut self, k: usize, o: Outcome, result: Option<Register>) -> Result<(), String> {
        if k == 0 {
            self.taken = o;
        } else {
            self.not_taken = o;
        }
        if o == Outcome::Record {
            if self.result.is_some_and(|r| Some(r) != result) {
                return Err("a jump's two edges return results from different registers".into());
            }
            self.result = result;
        }
        Ok(())
    }

    pub(super) fn records(&self) -> bool {
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
    /// A site for every crossing from a reached instruction outside T ∪ O
    /// into T, and the hand-offs: one for every crossing into O.
    pub(super) fn crossing_sites(&self) -> Result<(Sites, BTreeSet<usize>), String> {
        let mut sites = Sites::new();
        let mut handoffs = BTreeSet::new();
        for s in 0..self.g.len() {
            if self.r.t(s) || self.r.out[s] || self.states[s].is_none() {
                continue;
            }
            let x = &self.g[s];
            if x.leaves {
                return Err(format!(
                    "+{:#x} leaves the function where no probe can hand the call over",
                    x.insn.ip()
                ));
            }
            if x.is_jcc && x.bytes_emulated && x.succs.iter().all(|&v| self.r.live_t(v)) {
                // Both edges cross (one to a result, one to NULL): the jump
                // decides the outcome, one probe for both.
                let mut report = Report {
                    cond: Some(jcc_cond(self.code, &x.insn)),
                    ..Report::always(Outcome::Nothing)
                };
                for (k, &v) in x.succs.iter().enumerate() {
                    report.set_edge(k, self.r.outcome(v), self.r.res[v])?;
                }
                sites.insert(s, report);
                continue;
            }
            for (k, &v) in x.succs.iter().enumerate() {
                if self.r.live_t(v) {
                    self.place_crossing(&mut sites, s, k, v)?;
                } else if self.r.live_out(v) {
                    handoffs.insert(self.place_handoff(s, v)?);
                }
            }
        }
        Ok((sites, handoffs))
    }

    /// Whether every edge into `v` is a crossing (none from inside T or O,
    /// but those from what never returns, which no path takes to a ret).
    fn only_crossings(&self, v: usize) -> bool {
        self.preds[v]
            .iter()
            .all(|&p| !(self.r.t(p) || self.r.out[p]) || self.r.never[p] || self.unreached(p))
    }

    /// Whether no path from the entry reaches `i` (the padding before a
    /// label, which falls through into it).
    fn unreached(&self, i: usize) -> bool {
        self.states[i].is_none()
    }

    /// Whether the size is known before instruction `i`.
    fn knows_size(&self, i: usize) -> bool {
        self.states[i]
            .as_ref()
            .is_some_and(|st| st.location(SIZE).is_some())
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
            sites.insert(v, Report::always_in(o, self.r.res[v]));
            return Ok(());
        }
        let at_jump = x.is_jcc && x.bytes_emulated;
        // (b) The first emulated instruction after it, when nothing else
        // leads there; unless the size is lost by then and the jump still
        // has it (a site there needs no capture: one trap, not two).
        let after = self.first_emulated_after(s, v).filter(|&w| {
            o != Outcome::Record || self.knows_size(w) || !(at_jump && self.knows_size(s))
        });
        if let Some(w) = after {
            sites.insert(w, Report::always_in(o, self.r.res[w]));
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
        if at_jump {
            let byte = jcc_cond(self.code, &x.insn);
            let e = sites.entry(s).or_insert(Report {
                cond: Some(byte),
                ..Report::always(Outcome::Nothing)
            });
            return e.set_edge(k, o, self.r.res[v]);
        }
        Err(format!(
            "the result is known after +{:#x} ({}), and no instruction there can be probed cheaply",
            x.insn.ip(),
            mnemonic_name(&x.insn),
        ))
    }

    /// The hand-off for the crossing from `s` into `v` in O (a path that
    /// leaves the function): `v` if the kernel emulates it and only
    /// crossings lead there, else the first emulated instruction after it.
    /// There the session's entry probe sees the call as at the entry: rsp
    /// at the return address (its return probe replaces that word), the
    /// size in a register (its cookie says which).
    fn place_handoff(&self, s: usize, v: usize) -> Result<usize, String> {
        let w = if self.g[v].bytes_emulated && self.only_crossings(v) {
            Some(v)
        } else {
            self.first_emulated_after(s, v)
        };
        let w = w.ok_or_else(|| {
            format!(
                "no emulated instruction hands the call over after +{:#x}",
                self.g[s].insn.ip()
            )
        })?;
        let st = self.states[w].as_ref().ok_or("unreachable hand-off")?;
        let ip = self.g[w].insn.ip();
        if st.sp != Some(0) {
            return Err(format!("rsp is not the entry's at +{ip:#x}"));
        }
        match st.location(SIZE) {
            Some(Loc::Reg(_)) => Ok(w),
            _ => Err(format!("the size is in no register at +{ip:#x}")),
        }
    }

    /// The first emulated instruction on the straight line from `v` (entered
    /// from `s`) that nothing else leads to, within 16 instructions.
    fn first_emulated_after(&self, s: usize, v: usize) -> Option<usize> {
        let g = self.g;
        let (mut w, mut prev) = (v, s);
        for _ in 0..16 {
            if self.preds[w]
                .iter()
                .any(|&p| p != prev && !self.unreached(p))
            {
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
            result: report.result.unwrap_or(Register::RAX),
        })
    }

    /// The hand-off at `i` as the plan has it.
    pub(super) fn handoff(&self, i: usize) -> Result<HandOff, String> {
        let x = &self.g[i];
        match self.states[i].as_ref().and_then(|st| st.location(SIZE)) {
            Some(Loc::Reg(size)) => Ok(HandOff {
                delta: x.insn.ip(),
                mnemonic: mnemonic_name(&x.insn),
                size,
            }),
            _ => Err(format!("the size is in no register at +{:#x}", x.insn.ip())),
        }
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
