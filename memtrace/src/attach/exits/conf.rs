//! The BPF side's configuration of a plan's probes (`memtrace_common::ResultSite`).
use iced_x86::Register;
use memtrace_common::{PtReg, RESULT_ALWAYS, SiteOutcome, ValueLoc};

use super::{ExitSite, Loc, Outcome};

/// The `struct pt_regs` index of a general register.
fn pt_reg(r: Register) -> Option<PtReg> {
    Some(match r {
        Register::R15 => PtReg::R15,
        Register::R14 => PtReg::R14,
        Register::R13 => PtReg::R13,
        Register::R12 => PtReg::R12,
        Register::RBP => PtReg::Rbp,
        Register::RBX => PtReg::Rbx,
        Register::R11 => PtReg::R11,
        Register::R10 => PtReg::R10,
        Register::R9 => PtReg::R9,
        Register::R8 => PtReg::R8,
        Register::RAX => PtReg::Rax,
        Register::RCX => PtReg::Rcx,
        Register::RDX => PtReg::Rdx,
        Register::RSI => PtReg::Rsi,
        Register::RDI => PtReg::Rdi,
        _ => return None,
    })
}

/// A location's (`ValueLoc`, register, stack offset) bytes.
fn loc_conf(loc: Option<Loc>) -> (u8, u8, i32) {
    let (loc, reg, off) = match loc {
        Some(Loc::Reg(r)) => match pt_reg(r) {
            Some(r) => (ValueLoc::Reg, r as u8, 0),
            None => (ValueLoc::None, 0, 0),
        },
        Some(Loc::Stack(off)) => match i32::try_from(off) {
            Ok(off) => (ValueLoc::Stack, 0, off),
            Err(_) => (ValueLoc::None, 0, 0),
        },
        None => (ValueLoc::None, 0, 0),
    };
    (loc.into(), reg, off)
}

impl ExitSite {
    /// The BPF side's configuration of this site, for a function of `kind`.
    pub fn conf(&self, kind: memtrace_common::AllocKind) -> memtrace_common::ResultSite {
        let o = |o: Outcome| {
            u8::from(match o {
                Outcome::Nothing => SiteOutcome::Nothing,
                Outcome::Record => SiteOutcome::Record,
                Outcome::Null => SiteOutcome::Null,
            })
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
            kind: kind as u16,
            // (Every register a site can hold the result in has an index.)
            result_reg: pt_reg(self.result).map_or(PtReg::Rax as u8, |r| r as u8),
            _pad: 0,
        }
    }
}

/// The configuration of a guard (see `ExitPlan::guards`).
pub fn guard_conf(kind: memtrace_common::AllocKind) -> memtrace_common::ResultSite {
    memtrace_common::ResultSite {
        cond: RESULT_ALWAYS,
        taken: SiteOutcome::Guard.into(),
        kind: kind as u16,
        ..Default::default()
    }
}
