//! The reference stack walker: exactly the steps the BPF unwinder takes with the rows, so
//! the two can be compared and the tables tested against real processes.

use memtrace_common::{
    CFA_END, CFA_NONE, CFA_PLT, CFA_RBP, CFA_RSP, RBP_AT_CFA, RBP_SAME, UnwindRow,
};

use super::lookup;

/// The registers a walk starts from (the BPF program reads them from `pt_regs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub rip: u64,
    pub rsp: u64,
    /// 0 when unknown.
    pub rbp: u64,
}

/// Why a walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// A [`CFA_END`] row: the outermost frame (`_start`, a thread's start), the stack is
    /// complete.
    Outermost,
    /// `max` frames were collected.
    MaxDepth,
    /// A [`memtrace_common::CFA_UNSUPPORTED`] row (or an unknown rule value).
    Unsupported,
    /// No row for the pc (no module, a gap between FDEs) and rbp is 0: no frame pointer to
    /// fall back on.
    NoFramePointer,
    /// A [`CFA_RBP`] row while rbp is unknown (an earlier frame's rbp rule was unsupported).
    RbpUnknown,
    /// Reading the return address or the saved rbp failed.
    ReadFailed,
    /// The return address is 0 (how frame-pointer chains usually end).
    ZeroReturnAddress,
    /// The CFA is not above the stack pointer: the stack must grow towards the caller, so
    /// this is garbage (or a loop).
    BadCfa,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkResult {
    /// The first frame's pc, then each caller's return address (as read, not minus one).
    pub frames: Vec<u64>,
    pub end_reason: EndReason,
    /// Frames found by the frame-pointer fallback (no row, or a [`CFA_NONE`] row).
    pub fp_frames: usize,
}

/// Walks a stack. `read(addr)` reads the 8-byte word at `addr`; `find(pc)` returns the rows
/// of the module containing `pc` and the runtime address that row pcs are relative to
/// (the module's load bias plus its table base). The first frame's pc is looked up as is,
/// every later one as `ra - 1`: a return address may be one past the end of a noreturn
/// call's function.
///
/// One step, for the frame at (rip, rsp, rbp):
/// * no row or [`CFA_NONE`]: frame pointers, CFA = rbp + 16, the caller's rbp at CFA − 16
///   (stops if rbp is 0);
/// * [`CFA_RSP`]: CFA = rsp + off; [`CFA_RBP`]: CFA = rbp + off (stops if rbp is unknown);
/// * [`CFA_PLT`]: CFA = rsp + 8 + ((rip & 15) >= off ? 8 : 0);
/// * [`CFA_END`]: the walk is complete; anything else stops it as unsupported;
/// * the return address is at CFA − 8 (0 stops the walk); the caller's rsp is the CFA; the
///   caller's rbp is this frame's ([`RBP_SAME`]), read from CFA + off ([`RBP_AT_CFA`]) or
///   unknown, 0 (anything else).
pub fn walk<'t>(
    read: impl Fn(u64) -> Option<u64>,
    regs: Regs,
    find: impl Fn(u64) -> Option<(&'t [UnwindRow], u64)>,
    max: usize,
) -> WalkResult {
    let mut frames = Vec::new();
    let mut fp_frames = 0;
    let Regs {
        mut rip,
        mut rsp,
        mut rbp,
    } = regs;
    let end_reason = loop {
        if frames.len() >= max {
            break EndReason::MaxDepth;
        }
        let first = frames.is_empty();
        frames.push(rip);
        let pc = if first { rip } else { rip.wrapping_sub(1) };
        let row = find(pc).and_then(|(rows, pc_base)| {
            let rel = u32::try_from(pc.checked_sub(pc_base)?).ok()?;
            lookup(rows, rel)
        });
        let (cfa, rbp_rule, rbp_offset) = match row {
            None
            | Some(UnwindRow {
                cfa_rule: CFA_NONE, ..
            }) => {
                if rbp == 0 {
                    break EndReason::NoFramePointer;
                }
                fp_frames += 1;
                (rbp.wrapping_add(16), RBP_AT_CFA, -16)
            }
            Some(r) => {
                let off = i64::from(r.cfa_offset);
                let cfa = match r.cfa_rule {
                    CFA_RSP => rsp.wrapping_add_signed(off),
                    CFA_RBP if rbp == 0 => break EndReason::RbpUnknown,
                    CFA_RBP => rbp.wrapping_add_signed(off),
                    CFA_PLT => rsp.wrapping_add(if (rip & 15) as i64 >= off { 16 } else { 8 }),
                    CFA_END => break EndReason::Outermost,
                    _ => break EndReason::Unsupported,
                };
                (cfa, r.rbp_rule, r.rbp_offset)
            }
        };
        if cfa <= rsp {
            break EndReason::BadCfa;
        }
        let Some(ra) = read(cfa.wrapping_sub(8)) else {
            break EndReason::ReadFailed;
        };
        rbp = match rbp_rule {
            RBP_SAME => rbp,
            RBP_AT_CFA => match read(cfa.wrapping_add_signed(i64::from(rbp_offset))) {
                Some(v) => v,
                None => break EndReason::ReadFailed,
            },
            _ => 0,
        };
        if ra == 0 {
            break EndReason::ZeroReturnAddress;
        }
        rip = ra;
        rsp = cfa;
    };
    WalkResult {
        frames,
        end_reason,
        fp_frames,
    }
}
