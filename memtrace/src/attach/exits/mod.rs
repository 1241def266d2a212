//! Where an allocating function's result can be read without a return probe.
//!
//! An exact trace needs each allocation's size and returned address. The
//! usual way to get both is an entry probe and a return probe: two traps per
//! call, each a round trip through the kernel (the return one dearer: its
//! entry also hijacks the return address; BENCHMARKS.md gives what a trap
//! costs on one machine). But inside the function there are instructions
//! after which the result is already in rax and stays there until `ret`: a
//! probe on one of them that also finds the size somewhere (a callee-saved
//! register the function copied it to, a stack slot) sees the whole call in
//! one trap.
//!
//! # The analysis
//! Over the whole function's code:
//! 1. A control-flow graph of instructions. A call followed by padding
//!    (NOPs nothing jumps to: gcc's layout after a call to an abort or an
//!    assertion) is taken not to return, and its padding gets a guard probe
//!    that counts it if it ever does (`Counter::UnforeseenReturns`). Other
//!    calls are taken to return. A branch out of the function (a tail call
//!    to its slow path) ends its path.
//! 2. Four regions. N: what never returns (those calls, traps, and what
//!    leads only there). F (final): from where every path that returns does
//!    so without a call, returning what one register holds there (computed
//!    backwards from each `ret`, rax there, through the `mov`s into it:
//!    jemalloc's fast path has its result in r11 until the `mov %r11,%rax`
//!    before its `ret`). Z (null): from where every such path zeroes rax
//!    (`xor %eax,%eax`, `mov $0,%eax`) and goes on in F. O (out): from where
//!    every path leaves the function without a call. T = F ∪ Z ∪ N and O
//!    are closed under successors, so a path crosses from outside them into
//!    F, Z or O exactly once: there the call's outcome is known (F: the
//!    register holds the result; Z: it fails with NULL), or it is handed
//!    over to code outside.
//! 3. A probe for every crossing: (a) its target, if the kernel emulates it
//!    (`placement::kernel_emulates`) and every edge into it is a crossing;
//!    (b) else the first emulated instruction after the target that nothing
//!    else leads to; (c) else the conditional jump the crossing leaves from,
//!    which the BPF side evaluates from the flags the probe sees to know
//!    which edge the CPU will take. A jump both of whose edges cross (result
//!    one way, NULL the other) is one site for both. Since (c) fires on every
//!    path through the jump, a crossing to NULL that only (c) could see gets
//!    a probe on its own target instead, single-stepped if need be: only the
//!    calls that fail pay for it. A crossing to a result that none of these
//!    fit leaves the function without a plan: it keeps its entry and return
//!    probes. A crossing into O gets a **hand-off** (`HandOff`): its target,
//!    or the first emulated instruction after it, where rsp is the entry's
//!    and the size in a register; the session's entry and return probes
//!    there see the call as at the entry and at its return.
//! 4. Where the size is: a forward data flow tracks which registers and stack
//!    slots still hold the entry's rdi (the size), and the entry's rbp (the
//!    caller's frame pointer, for the stack walk), through moves, pushes,
//!    pops, spills, reloads and calls (which clobber the caller-saved
//!    registers), along with rsp's offset from the entry. A site that records
//!    but finds no size takes it from a **capture**: the nearest instruction
//!    that dominates it, is emulated and knows the size stores it per thread
//!    (two traps on that path, one on the others).
//! 5. The plan is then checked by an independent count over the graph: on
//!    every path to `ret` or out of the function, exactly one probe (a site
//!    or a hand-off) reports the call.
//!
//! # What is assumed
//! - No other code jumps into the function's middle (as for entry probes).
//! - Stack slots change only through rsp-based stores, pushes and calls below
//!   them: nothing writes the function's own frame through another pointer
//!   unless the function takes rsp's address (then no slot is trusted).
//! - The function is not re-entered on the same thread between a capture and
//!   its use (a signal handler calling malloc); such a call is detected by its
//!   stack pointer and dropped, counted (`drops.pending_map_full`).
//! - A session consumer must not be put on these sites: for a hit in another
//!   process a pid-bound session returns 0, and the kernel then arms a return
//!   probe, writing its trampoline over [rsp], a live slot in mid-function.
//!   The sites get a plain uprobe_multi link of their own.
use iced_x86::Register;

use self::{
    check::check_plan,
    flow::data_flow,
    graph::{build_graph, predecessors},
    regions::regions,
    sites::Planner,
};
pub use self::{
    conf::guard_conf,
    cover::{CoverSite, plan_entry_cover},
};

mod check;
mod conf;
mod cover;
mod flow;
mod graph;
mod regions;
mod sites;

/// The caller-saved general registers: a call clobbers them.
use crate::attach::placement::SCRATCH as CALLER_SAVED;

/// At most this many probe sites in one plan.
pub const MAX_EXIT_SITES: usize = 24;

/// What a probe reports for the edge about to be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing: the call goes on.
    Nothing,
    /// The call returns rax, its result.
    Record,
    /// The call returns NULL.
    Null,
}

/// Where a value is when the probe fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    Reg(Register),
    /// At rsp + this.
    Stack(i64),
}

/// One probe of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitSite {
    /// Offset of the instruction in the function.
    pub delta: u64,
    pub mnemonic: String,
    /// A conditional jump's condition code (the low nibble of its opcode):
    /// `taken` applies when it holds. None: `taken` always applies.
    pub cond: Option<u8>,
    pub taken: Outcome,
    pub not_taken: Outcome,
    /// Stores the size for a later site of the same call.
    pub capture: bool,
    /// Where the size is, when known here.
    pub size: Option<Loc>,
    /// Where the caller's rbp is (known wherever a site records).
    pub rbp: Option<Loc>,
    /// rsp at the function's entry minus rsp here.
    pub entry_sp_delta: u64,
    /// The register holding the result where the site records: rax, or
    /// the one the function moves to rax before its `ret`.
    pub result: Register,
}

/// A probe where a path leaves the function (a tail call to its slow path)
/// and the call is handed over to the session: its entry probe there, as
/// at the function's entry (rsp at the return address), and its return
/// probe then record the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandOff {
    /// Offset of the instruction in the function.
    pub delta: u64,
    pub mnemonic: String,
    /// The register holding the size there.
    pub size: Register,
}

impl ExitSite {
    pub fn records(&self) -> bool {
        self.taken == Outcome::Record || self.not_taken == Outcome::Record
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitPlan {
    pub sites: Vec<ExitSite>,
    /// Offsets of the padding after calls taken not to return: a probe there
    /// fires only if one does, which the plan did not foresee (it is counted).
    pub guards: Vec<u64>,
    /// The session's probes on the paths that leave the function.
    pub handoffs: Vec<HandOff>,
}

impl ExitPlan {
    /// Offsets in the function of every probe of the plan: sites, then guards.
    pub fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.sites
            .iter()
            .map(|s| s.delta)
            .chain(self.guards.iter().copied())
    }

    /// Sites as `+0x157 jne`, for logs.
    pub fn describe(&self) -> String {
        self.sites
            .iter()
            .map(|s| {
                let what = |o: Outcome| match o {
                    Outcome::Nothing => "-",
                    Outcome::Record => "result",
                    Outcome::Null => "null",
                };
                let mut d = format!("+{:#x} {}", s.delta, s.mnemonic);
                match s.cond {
                    Some(_) => {
                        d += &format!(" (taken: {}, not: {})", what(s.taken), what(s.not_taken))
                    }
                    None if s.taken != Outcome::Nothing => d += &format!(" ({})", what(s.taken)),
                    None => {}
                }
                if s.result != Register::RAX && s.records() {
                    d += &format!(" (result in {})", format!("{:?}", s.result).to_lowercase());
                }
                if s.capture {
                    d += " (captures the size)";
                }
                d
            })
            .chain(self.handoffs.iter().map(|h| {
                format!(
                    "+{:#x} {} (hands over to the session, size in {})",
                    h.delta,
                    h.mnemonic,
                    format!("{:?}", h.size).to_lowercase()
                )
            }))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `MEMTRACE_PROBES=entry` (or `classic`): no result sites; every
/// allocating function keeps its entry and return probes (for comparison).
pub fn disabled() -> bool {
    crate::knobs::get().probes != crate::knobs::Probes::Auto
}

/// The plan for an allocating function whose whole code is `code`, whose
/// size argument is `size` at its entry (malloc's rdi) and which returns
/// its result in rax; Err says why there is none.
pub fn plan_exits(code: &[u8], size: Register) -> Result<ExitPlan, String> {
    if code.is_empty() || code.len() > crate::attach::placement::MAX_BODY_BYTES {
        return Err(format!("{} bytes of code", code.len()));
    }
    let g = build_graph(code)?;
    let r = regions(&g);
    if r.t(0) || r.out[0] {
        return Err("the outcome is known at the entry".into());
    }
    let preds = predecessors(&g);
    let states = data_flow(&g, size);
    let planner = Planner {
        code,
        g: &g,
        r: &r,
        preds: &preds,
        states: &states,
    };
    let (mut sites, handoffs) = planner.crossing_sites()?;
    if !sites.values().any(|s| s.records()) {
        return Err("no path returns a block".into());
    }
    let captures = planner.captures(&sites)?;
    for &c in &captures {
        sites
            .entry(c)
            .or_insert(sites::Report::always(Outcome::Nothing));
    }
    if let Some(&h) = handoffs.iter().find(|h| sites.contains_key(h)) {
        return Err(format!(
            "+{:#x} would be both a result site and a hand-off",
            g[h].insn.ip()
        ));
    }
    let mut order: Vec<usize> = sites.keys().copied().collect();
    order.sort();
    if order.len() > MAX_EXIT_SITES || handoffs.len() > MAX_EXIT_SITES {
        return Err(format!(
            "{} probe sites needed",
            order.len() + handoffs.len()
        ));
    }
    let plan = order
        .into_iter()
        .map(|i| planner.exit_site(i, sites[&i], captures.contains(&i)))
        .collect::<Result<Vec<_>, _>>()?;
    let guards = guards(&g);
    if plan.len() + guards.len() > 2 * MAX_EXIT_SITES {
        return Err(format!(
            "{} probe sites and {} guards needed",
            plan.len(),
            guards.len()
        ));
    }
    let plan = ExitPlan {
        sites: plan,
        guards,
        handoffs: handoffs
            .into_iter()
            .map(|i| planner.handoff(i))
            .collect::<Result<_, _>>()?,
    };
    check_plan(&g, &plan)?;
    Ok(plan)
}

/// The offsets of the padding after the calls taken not to return.
fn guards(g: &[graph::Insn]) -> Vec<u64> {
    g.iter()
        .enumerate()
        .filter(|(_, x)| x.guarded)
        .map(|(i, _)| g[i + 1].insn.ip())
        .collect()
}

#[cfg(test)]
mod tests;
