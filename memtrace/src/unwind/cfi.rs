//! From gimli's evaluated CFI rows to [`Rule`]s.

use std::collections::HashMap;

use gimli::{
    BaseAddresses, CieOrFde, CommonInformationEntry, EndianSlice, FrameDescriptionEntry,
    LittleEndian, RegisterRule, UnwindContext, UnwindOffset, UnwindSection, UnwindTableRow, X86_64,
};
use memtrace_common::{CfaRule, RbpRule};

use super::{FdeSpan, Layout, Rule, TableStats, UnsupportedCounts};

type R<'a> = EndianSlice<'a, LittleEndian>;

/// Gathers the rows of every FDE of one or more sections.
pub(crate) struct Collector<'l> {
    layout: &'l Layout,
    pub fdes: Vec<FdeSpan>,
    pub rows: Vec<(u64, Rule)>,
    pub stats: TableStats,
    ctx: UnwindContext<usize>,
}

impl<'l> Collector<'l> {
    pub fn new(layout: &'l Layout) -> Self {
        Collector {
            layout,
            fdes: Vec::new(),
            rows: Vec::new(),
            stats: TableStats::default(),
            ctx: UnwindContext::new(),
        }
    }

    /// Adds every FDE of the section; returns how many were used.
    pub fn add_section<'a, S>(
        &mut self,
        section: &S,
        bases: &BaseAddresses,
        priority: u8,
        name: &str,
    ) -> usize
    where
        S: UnwindSection<R<'a>>,
        S::Offset: UnwindOffset<usize>,
    {
        // CIEs by offset: most modules have a handful for thousands of FDEs.
        let mut cies: HashMap<usize, gimli::Result<CommonInformationEntry<R<'a>>>> = HashMap::new();
        let mut entries = section.entries(bases);
        let mut used = 0;
        loop {
            match entries.next() {
                Ok(None) => break,
                Err(e) => {
                    self.stats.parse_error = Some(format!("{name}: {e}"));
                    break;
                }
                Ok(Some(CieOrFde::Cie(cie))) => {
                    self.stats.cies += 1;
                    cies.insert(cie.offset(), Ok(cie));
                }
                Ok(Some(CieOrFde::Fde(partial))) => {
                    let fde = partial.parse(|s: &S, b, off: S::Offset| {
                        cies.entry(UnwindOffset::into(off))
                            .or_insert_with(|| s.cie_from_offset(b, off))
                            .clone()
                    });
                    match fde {
                        Ok(fde) => {
                            if self.add_fde(section, bases, &fde, priority) {
                                used += 1;
                            }
                        }
                        Err(_) => self.stats.fde_errors += 1,
                    }
                }
            }
        }
        used
    }

    fn add_fde<'a, S: UnwindSection<R<'a>>>(
        &mut self,
        section: &S,
        bases: &BaseAddresses,
        fde: &FrameDescriptionEntry<R<'a>>,
        priority: u8,
    ) -> bool {
        let start = fde.initial_address();
        let range = start
            .checked_add(fde.len())
            .and_then(|end| self.layout.clip(start, end));
        let Some((start, end)) = range else {
            self.stats.skipped_fdes += 1;
            return false;
        };
        self.stats.fdes += 1;
        let first = self.rows.len();
        let why = &mut self.stats.unsupported;
        if fde.is_signal_trampoline() {
            self.stats.signal_frames += 1;
            why.signal_frame += 1;
            self.rows.push((start, Rule::UNSUPPORTED));
        } else if fde.cie().return_address_register() != X86_64::RA {
            why.ra_register += 1;
            self.rows.push((start, Rule::UNSUPPORTED));
        } else {
            let mut next = start;
            let r = eval_fde(
                section,
                bases,
                fde,
                &mut self.ctx,
                end,
                &mut next,
                &mut self.rows,
                &mut self.stats.cfi_rows,
                why,
            );
            if r.is_err() {
                why.eval_error += 1;
                if next < end {
                    self.rows.push((next, Rule::UNSUPPORTED));
                }
            }
        }
        self.fdes.push(FdeSpan {
            start,
            end,
            priority,
            order: self.fdes.len(),
            first,
            len: self.rows.len() - first,
        });
        true
    }
}

/// Runs the FDE's CFI program; `next` is the lowest address its rows do not cover yet.
#[allow(clippy::too_many_arguments)]
fn eval_fde<'a, S: UnwindSection<R<'a>>>(
    section: &S,
    bases: &BaseAddresses,
    fde: &FrameDescriptionEntry<R<'a>>,
    ctx: &mut UnwindContext<usize>,
    end: u64,
    next: &mut u64,
    rows: &mut Vec<(u64, Rule)>,
    cfi_rows: &mut usize,
    why: &mut UnsupportedCounts,
) -> gimli::Result<()> {
    let mut table = fde.rows(section, bases, ctx)?;
    while let Some(row) = table.next_row()? {
        let (s, e) = (row.start_address(), row.end_address());
        if s < *next || e < s {
            return Err(gimli::Error::AddressOverflow);
        }
        if s >= end {
            break;
        }
        if s == e {
            continue;
        }
        *cfi_rows += 1;
        rows.push((s, translate(row, section, why)));
        *next = e;
    }
    Ok(())
}

/// One evaluated CFI row → rule. The CIE's return-address register was checked to be 16.
fn translate<'a, S: UnwindSection<R<'a>>>(
    row: &UnwindTableRow<usize>,
    section: &S,
    why: &mut UnsupportedCounts,
) -> Rule {
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => return Rule::END,
        Some(RegisterRule::Offset(-8)) => {}
        _ => {
            why.ra_rule += 1;
            return Rule::UNSUPPORTED;
        }
    }
    let (cfa_rule, cfa_offset) = match row.cfa() {
        gimli::CfaRule::RegisterAndOffset { register, offset } => {
            let rule = match *register {
                X86_64::RSP => CfaRule::Rsp,
                X86_64::RBP => CfaRule::Rbp,
                _ => {
                    why.cfa_register += 1;
                    return Rule::UNSUPPORTED;
                }
            };
            let Ok(offset) = i32::try_from(*offset) else {
                why.cfa_offset_range += 1;
                return Rule::UNSUPPORTED;
            };
            (rule, offset)
        }
        gimli::CfaRule::Expression(e) => {
            let threshold = e
                .get(section)
                .ok()
                .and_then(|x: gimli::Expression<R<'a>>| plt_threshold(x.0.slice()));
            match threshold {
                Some(t) => (CfaRule::Plt, i32::from(t)),
                None => {
                    why.cfa_expression += 1;
                    return Rule::UNSUPPORTED;
                }
            }
        }
    };
    let (rbp_rule, rbp_offset) = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue) => (RbpRule::Same, 0),
        Some(RegisterRule::Offset(n)) => match i16::try_from(n) {
            Ok(n) => (RbpRule::AtCfa, n),
            Err(_) => (RbpRule::Unsupported, 0),
        },
        Some(_) => (RbpRule::Unsupported, 0),
    };
    Rule {
        cfa_rule,
        cfa_offset,
        rbp_rule,
        rbp_offset,
    }
}

/// The DWARF operations the `.plt` expression is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Breg(u64, i64),
    Lit(u8),
    And,
    Ge,
    Shl,
    Plus,
}

/// Recognizes the CFA expression binutils emits for `.plt` entries and returns its threshold
/// literal (11 for the classic 16-byte lazy PLT, 10 for IBT's):
///
/// `DW_OP_breg7 (rsp) 8; DW_OP_breg16 (rip) 0; DW_OP_lit15; DW_OP_and; DW_OP_lit<t>;
/// DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus`, i.e.
/// CFA = rsp + 8 + ((rip & 15) >= t ? 8 : 0).
///
/// The operations are decoded (LEB128 operands, `DW_OP_bregx` too), so a non-minimal
/// encoding still matches; every other expression, even one more operation, does not. Any
/// literal `t` (0–31) is accepted: [`CfaRule::Plt`]'s formula is exact for all.
pub fn plt_threshold(expr: &[u8]) -> Option<u8> {
    let mut ops = [Op::And; 9];
    let mut n = 0;
    let mut rest = expr;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let decoded = match op {
            0x30..=0x4f => Op::Lit(op - 0x30),
            0x70..=0x8f => Op::Breg(u64::from(op - 0x70), sleb(&mut rest)?),
            0x92 => {
                let reg = uleb(&mut rest)?;
                Op::Breg(reg, sleb(&mut rest)?)
            }
            0x1a => Op::And,
            0x2a => Op::Ge,
            0x24 => Op::Shl,
            0x22 => Op::Plus,
            _ => return None,
        };
        *ops.get_mut(n)? = decoded;
        n += 1;
    }
    match ops {
        [
            Op::Breg(7, 8),
            Op::Breg(16, 0),
            Op::Lit(15),
            Op::And,
            Op::Lit(t),
            Op::Ge,
            Op::Lit(3),
            Op::Shl,
            Op::Plus,
        ] if n == 9 => Some(t),
        _ => None,
    }
}

fn uleb(input: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, tail) = input.split_first()?;
        *input = tail;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn sleb(input: &mut &[u8]) -> Option<i64> {
    let mut v = 0i64;
    for shift in (0..64).step_by(7) {
        let (&b, tail) = input.split_first()?;
        *input = tail;
        v |= i64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            if shift + 7 < 64 && b & 0x40 != 0 {
                v |= -1i64 << (shift + 7);
            }
            return Some(v);
        }
    }
    None
}
