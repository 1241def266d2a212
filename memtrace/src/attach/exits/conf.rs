//! The BPF side's configuration of a plan's probes (`memtrace_common::ResultSite`).
use iced_x86::Register;

use super::{ExitSite, Loc, Outcome};

/// The `PT_REGS_*` index of a general register.
fn pt_regs_index(r: Register) -> Option<u8> {
    use memtrace_common::*;
    Some(match r {
        Register::R15 => PT_REGS_R15,
        Register::R14 => PT_REGS_R14,
        Register::R13 => PT_REGS_R13,
        Register::R12 => PT_REGS_R12,
        Register::RBP => PT_REGS_RBP,
        Register::RBX => PT_REGS_RBX,
        Register::R11 => PT_REGS_R11,
        Register::R10 => PT_REGS_R10,
        Register::R9 => PT_REGS_R9,
        Register::R8 => PT_REGS_R8,
        Register::RAX => PT_REGS_RAX,
        Register::RCX => PT_REGS_RCX,
        Register::RDX => PT_REGS_RDX,
        Register::RSI => PT_REGS_RSI,
        Register::RDI => PT_REGS_RDI,
        _ => return None,
    })
}

fn loc_conf(loc: Option<Loc>) -> (u8, u8, i32) {
    use memtrace_common::{LOC_NONE, LOC_REG, LOC_STACK};
    match loc {
        Some(Loc::Reg(r)) => match pt_regs_index(r) {
            Some(i) => (LOC_REG, i, 0),
            None => (LOC_NONE, 0, 0),
        },
        Some(Loc::Stack(off)) => match i32::try_from(off) {
            Ok(off) => (LOC_STACK, 0, off),
            Err(_) => (LOC_NONE, 0, 0),
        },
        None => (LOC_NONE, 0, 0),
    }
}

impl ExitSite {
    /// The BPF side's configuration of this site, for a function of `kind`.
    pub fn conf(&self, kind: memtrace_common::AllocKind) -> memtrace_common::ResultSite {
        use memtrace_common::{RESULT_ALWAYS, RESULT_NOTHING, RESULT_NULL, RESULT_RECORD};
        let o = |o: Outcome| match o {
            Outcome::Nothing => RESULT_NOTHING,
            Outcome::Record => RESULT_RECORD,
            Outcome::Null => RESULT_NULL,
        };
        let (size_loc, size_reg, size_off) = loc_conf(self.size);
        let (rbp_loc, rbp_reg, rbp_off) = loc_conf(self.rbp);
        memtrace_common::ResultSite {
            cond: self.cond.unwrap_or(RESULT_ALWAYS),
            taken: o(self.taken),
            not_taken: o(self.not_taken),
            capture: self.capture as u8,
            size_loc,
            size_reg,
            rbp_loc,
            rbp_reg,
            size_off,
            rbp_off,
            entry_sp_delta: self.entry_sp_delta as u32,
            kind: kind as u32,
        }
    }
}

/// The configuration of a guard (see `ExitPlan::guards`).
pub fn guard_conf(kind: memtrace_common::AllocKind) -> memtrace_common::ResultSite {
    memtrace_common::ResultSite {
        cond: memtrace_common::RESULT_ALWAYS,
        taken: memtrace_common::RESULT_GUARD,
        kind: kind as u32,
        ..Default::default()
    }
}
