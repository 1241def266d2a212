//! The reference stack walker: exactly the steps the BPF unwinder takes with the rows, so
//! the two can be compared and the tables tested against real processes.

use memtrace_common::{CfaRule, RbpRule, UnwindRow};

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
    /// A [`CfaRule::End`] row: the outermost frame (`_start`, a thread's start), the stack is
    /// complete.
    Outermost,
    /// `max` frames were collected.
    MaxDepth,
    /// A [`CfaRule::Unsupported`] row (or an unknown rule value).
    Unsupported,
    /// No row for the pc (no module, a gap between FDEs) and rbp is 0: no frame pointer to
    /// fall back on.
    NoFramePointer,
    /// A [`CfaRule::Rbp`] row while rbp is unknown (an earlier frame's rbp rule was unsupported).
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
    /// Frames found by the frame-pointer fallback (no row, or a [`CfaRule::None`] row).
    pub fp_frames: usize,
}

/// Walks a stack. `read(addr)` reads the 8-byte word at `addr`; `find(pc)` returns the rows
/// of the module containing `pc` and the runtime address that row pcs are relative to
/// (the module's load bias plus its table base). The first frame's pc is looked up as is,
/// every later one as `ra - 1`: a return address may be one past the end of a noreturn
/// call's function.
///
/// One step, for the frame at (rip, rsp, rbp):
/// * no row or [`CfaRule::None`]: frame pointers, CFA = rbp + 16, the caller's rbp at
///   CFA − 16 (stops if rbp is 0);
/// * [`CfaRule::Rsp`]: CFA = rsp + off; [`CfaRule::Rbp`]: CFA = rbp + off (stops if rbp is
///   unknown);
/// * [`CfaRule::Plt`]: CFA = rsp + 8 + ((rip & 15) >= off ? 8 : 0);
/// * [`CfaRule::End`]: the walk is complete; [`CfaRule::Unsupported`] or a byte that is no
///   rule stops it as unsupported;
/// * the return address is at CFA − 8 (0 stops the walk); the caller's rsp is the CFA; the
///   caller's rbp is this frame's ([`RbpRule::Same`]), read from CFA + off
///   ([`RbpRule::AtCfa`]) or unknown, 0 ([`RbpRule::Unsupported`] or no rule).
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
        // No row is the frame-pointer fallback, as a `CfaRule::None` row is.
        let rule = row.map_or(Ok(CfaRule::None), UnwindRow::cfa);
        let r = row.copied().unwrap_or_default();
        let off = i64::from(r.cfa_offset);
        let saved = (r.rbp(), r.rbp_offset);
        let (cfa, (rbp_rule, rbp_offset)) = match rule {
            Ok(CfaRule::None) => {
                if rbp == 0 {
                    break EndReason::NoFramePointer;
                }
                fp_frames += 1;
                (rbp.wrapping_add(16), (Ok(RbpRule::AtCfa), -16))
            }
            Ok(CfaRule::Rsp) => (rsp.wrapping_add_signed(off), saved),
            Ok(CfaRule::Rbp) if rbp == 0 => break EndReason::RbpUnknown,
            Ok(CfaRule::Rbp) => (rbp.wrapping_add_signed(off), saved),
            Ok(CfaRule::Plt) => {
                let cfa = rsp.wrapping_add(if (rip & 15) as i64 >= off { 16 } else { 8 });
                (cfa, saved)
            }
            Ok(CfaRule::End) => break EndReason::Outermost,
            Ok(CfaRule::Unsupported) | Err(_) => break EndReason::Unsupported,
        };
        if cfa <= rsp {
            break EndReason::BadCfa;
        }
        let Some(ra) = read(cfa.wrapping_sub(8)) else {
            break EndReason::ReadFailed;
        };
        rbp = match rbp_rule {
            Ok(RbpRule::Same) => rbp,
            Ok(RbpRule::AtCfa) => match read(cfa.wrapping_add_signed(i64::from(rbp_offset))) {
                Some(v) => v,
                None => break EndReason::ReadFailed,
            },
            Ok(RbpRule::Unsupported) | Err(_) => 0,
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
