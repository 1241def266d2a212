//! Unwind tables for the BPF stack walker: each module's `.eh_frame` (or `.debug_frame`) is
//! compiled into a sorted array of [`UnwindRow`]s, one row per address range with the same
//! rule for the CFA and the caller's rbp. The BPF side binary-searches the row for a pc
//! ([`lookup`] is the reference for that search) and takes one step ([`walk`] is the
//! reference for the whole walk).
//!
//! What is compiled, per FDE (in `.eh_frame` section order, `.eh_frame_hdr` is not used):
//!
//! * each row of the FDE's CFI program, as gimli evaluates it, becomes one [`UnwindRow`]:
//!   - return address (r16) undefined → [`CfaRule::End`] (the outermost frame, e.g.
//!     `_start`);
//!   - CFA = rsp + n / rbp + n → [`CfaRule::Rsp`] / [`CfaRule::Rbp`];
//!   - the `.plt` expression (see `cfi::plt_threshold`) → [`CfaRule::Plt`];
//!   - anything else → [`CfaRule::Unsupported`]: another DWARF expression, a CFA based on another
//!     register, a return address not saved at CFA − 8 (`DW_CFA_register rip, rdi` in
//!     `vfork`), a CIE whose return-address register is not 16, a signal trampoline (CIE
//!     augmentation `S`: the interrupted frame's pc is exact, not a return address, which a
//!     row cannot say), or the part of an FDE after a CFI evaluation error;
//!   - the caller's rbp: not mentioned / same value → [`RbpRule::Same`], saved at CFA + n
//!     (n fits i16) → [`RbpRule::AtCfa`], anything else → [`RbpRule::Unsupported`];
//! * a [`CfaRule::None`] row at the end of each FDE, so a pc in the gap before the next FDE does
//!   not inherit the last rule (the BPF side falls back to frame pointers there);
//! * FDEs outside the module's executable `PT_LOAD` segments are skipped (the linker's
//!   tombstones for discarded functions in `.debug_frame` are 0 or −1), FDEs are sorted by
//!   start address, and overlaps are resolved deterministically: the FDE sorted first (lower
//!   start, then `.eh_frame` before `.debug_frame`, then section order) keeps its range, a
//!   later one only covers what lies past the end of everything before it;
//! * finally consecutive rows with identical rules are merged.
//!
//! Everything here is pure (bytes in, rows out) and never panics on malformed input: a
//! corrupt entry ends the parse of its section with what was compiled so far (reported in
//! [`TableStats::parse_error`]).

mod cfi;
/// The userspace model of the BPF walker, run by the tests against real
/// processes.
#[cfg(test)]
mod walk;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::path::PathBuf;

use memtrace_common::{CfaRule, RbpRule, UnwindRow};
use object::{Object, ObjectSection, ObjectSegment, SectionKind};

#[cfg(test)]
pub use cfi::plt_threshold;
#[cfg(test)]
pub use walk::{EndReason, Regs, walk};

/// Size of one row as the BPF map stores it.
#[cfg(test)]
pub const ROW_BYTES: usize = std::mem::size_of::<UnwindRow>();

/// Which section(s) the rows came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Source {
    /// Neither `.eh_frame` nor `.debug_frame` (or both empty): no rows, the BPF side uses
    /// frame pointers for this module.
    #[default]
    None,
    EhFrame,
    DebugFrame,
    /// Both sections have FDEs (e.g. a `-fno-asynchronous-unwind-tables -g` program whose
    /// crt files still bring `.eh_frame`). Where they overlap, `.eh_frame` wins ties.
    Both,
}

/// Why CFI rows became [`CfaRule::Unsupported`], counted per row of the CFI programs (before
/// merging, so one FDE can count several times).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnsupportedCounts {
    /// `DW_CFA_def_cfa_expression` other than the `.plt` one.
    pub cfa_expression: usize,
    /// CFA = a register other than rsp/rbp + offset.
    pub cfa_register: usize,
    /// CFA offset does not fit i32.
    pub cfa_offset_range: usize,
    /// The CIE's return-address register is not 16 (rip).
    pub ra_register: usize,
    /// The return address is not saved at CFA − 8 (in a register, an expression, …).
    pub ra_rule: usize,
    /// FDEs of a CIE with augmentation `S` (one each, their whole range).
    pub signal_frame: usize,
    /// FDEs whose CFI program failed to evaluate (one each, the rest of their range).
    pub eval_error: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub source: Source,
    /// CIEs parsed.
    pub cies: usize,
    /// FDEs compiled into rows.
    pub fdes: usize,
    /// FDEs not used: empty, or outside every executable `PT_LOAD` segment.
    pub skipped_fdes: usize,
    /// FDEs that could not be parsed (bad CIE pointer, bad encoding…) and were dropped.
    pub fde_errors: usize,
    /// FDEs whose range overlapped one sorted before them (they were clipped).
    pub overlapping_fdes: usize,
    /// FDEs of signal trampolines (CIE augmentation `S`, e.g. glibc's `__restore_rt`).
    pub signal_frames: usize,
    /// Rows of the CFI programs as gimli evaluated them.
    pub cfi_rows: usize,
    /// Rows after clipping and adding the [`CfaRule::None`] end-of-FDE rows, before merging.
    pub rows_before_merge: usize,
    /// Final rows per rule.
    pub unsupported_rows: usize,
    pub plt_rows: usize,
    pub end_rows: usize,
    pub none_rows: usize,
    pub rbp_unsupported_rows: usize,
    /// Why CFI rows were unsupported.
    pub unsupported: UnsupportedCounts,
    /// A section that could not be read (bad header, failed decompression) or whose entries
    /// could not be iterated to the end (a corrupt length): the rows hold everything else.
    pub parse_error: Option<String>,
}

/// A module's compiled table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnwindTable {
    /// Lowest `PT_LOAD` p_vaddr: row pcs are ELF virtual addresses minus this.
    pub base: u64,
    /// Sorted by pc, strictly increasing, consecutive rules differ; the last row (if any) is
    /// [`CFA_NONE`].
    pub rows: Vec<UnwindRow>,
    pub stats: TableStats,
}

impl UnwindTable {
    /// Bytes the rows take in a BPF map.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.rows.len() * ROW_BYTES
    }

    /// The row for an ELF virtual address (see [`lookup`]).
    #[cfg(test)]
    pub fn lookup_vaddr(&self, vaddr: u64) -> Option<&UnwindRow> {
        let rel = u32::try_from(vaddr.checked_sub(self.base)?).ok()?;
        lookup(&self.rows, rel)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("cannot read {}: {source}", path.display())]
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "made by compile_file, which only the tests use")
    )]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a valid ELF file: {0}")]
    Parse(#[from] object::Error),
    #[error("not an ELF file ({0:?})")]
    NotElf(object::BinaryFormat),
    #[error("unsupported architecture {0:?}: only x86-64 tables can be compiled")]
    Architecture(object::Architecture),
    #[error("no PT_LOAD segment: cannot tell the module's base address")]
    NoLoadSegment,
}

/// The row covering `pc` (relative to the table's base): the last row with `row.pc <= pc`,
/// `None` before the first row. The BPF side does the same binary search.
#[cfg(test)]
pub fn lookup(rows: &[UnwindRow], pc: u32) -> Option<&UnwindRow> {
    let i = rows.partition_point(|r| r.pc <= pc);
    if i == 0 { None } else { rows.get(i - 1) }
}

/// Maps the file and compiles it (see [`compile`]).
#[cfg(test)]
pub fn compile_file(path: &std::path::Path) -> Result<UnwindTable, UnwindError> {
    let io = |source| UnwindError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let map = crate::process::mapped::MappedFile::map(&file).map_err(io)?;
    compile(&map)
}

/// Compiles an x86-64 ELF file's `.eh_frame` and `.debug_frame` into sorted rows.
///
/// Only the bytes given are read: for a stripped module whose `.eh_frame` is missing, the
/// caller passes its separate debug file (same virtual addresses, so the same base), whose
/// `.debug_frame` is used (its `.eh_frame` is NOBITS there and ignored). When one file has
/// FDEs in both sections both are used, `.eh_frame` winning ties ([`Source::Both`]).
///
/// Errors only for what makes a table meaningless (not ELF, not x86-64, no `PT_LOAD`); a
/// section that cannot be read or decompressed, or whose entries are corrupt, is recorded in
/// [`TableStats::parse_error`] and the table keeps whatever else was compiled.
pub fn compile(elf_bytes: &[u8]) -> Result<UnwindTable, UnwindError> {
    let obj = object::File::parse(elf_bytes)?;
    if obj.format() != object::BinaryFormat::Elf {
        return Err(UnwindError::NotElf(obj.format()));
    }
    if obj.architecture() != object::Architecture::X86_64 {
        return Err(UnwindError::Architecture(obj.architecture()));
    }
    let layout = Layout::of(&obj)?;
    let mut acc = cfi::Collector::new(&layout);

    let mut used_eh = false;
    match section_data(&obj, ".eh_frame") {
        Ok(Some((addr, data))) => {
            let mut section = gimli::EhFrame::new(&data, gimli::LittleEndian);
            section.set_address_size(8);
            // Pointer encodings: pcrel is relative to the section's own address (the one
            // that matters on x86-64), textrel and datarel to .text and .got.
            let mut bases = gimli::BaseAddresses::default().set_eh_frame(addr);
            if let Some(a) = section_addr(&obj, ".text") {
                bases = bases.set_text(a);
            }
            if let Some(a) = section_addr(&obj, ".got") {
                bases = bases.set_got(a);
            }
            if let Some(a) = section_addr(&obj, ".eh_frame_hdr") {
                bases = bases.set_eh_frame_hdr(a);
            }
            used_eh = acc.add_section(&section, &bases, 0, ".eh_frame") > 0;
        }
        Ok(None) => {}
        Err(e) => acc.stats.parse_error = Some(e),
    }
    let mut used_df = false;
    match section_data(&obj, ".debug_frame") {
        Ok(Some((_, data))) => {
            let mut section = gimli::DebugFrame::new(&data, gimli::LittleEndian);
            section.set_address_size(8);
            let bases = gimli::BaseAddresses::default();
            used_df = acc.add_section(&section, &bases, 1, ".debug_frame") > 0;
        }
        Ok(None) => {}
        Err(e) => acc.stats.parse_error = Some(e),
    }
    let mut stats = acc.stats;
    stats.source = match (used_eh, used_df) {
        (true, true) => Source::Both,
        (true, false) => Source::EhFrame,
        (false, true) => Source::DebugFrame,
        (false, false) => Source::None,
    };
    let rows = assemble(&mut acc.fdes, &acc.rows, layout.base, &mut stats);
    Ok(UnwindTable {
        base: layout.base,
        rows,
        stats,
    })
}

/// The address ranges FDEs may describe.
pub(crate) struct Layout {
    base: u64,
    /// Executable PT_LOAD ranges `[start, end)`, each ending at most 4 GiB past `base`.
    text: Vec<(u64, u64)>,
}

impl Layout {
    fn of(obj: &object::File<'_>) -> Result<Layout, UnwindError> {
        let mut all = Vec::new();
        let mut exec = Vec::new();
        for seg in obj.segments() {
            let start = seg.address();
            let end = start.saturating_add(seg.size());
            all.push((start, end));
            if let object::SegmentFlags::Elf { p_flags, .. } = seg.flags()
                && p_flags.contains(object::elf::PF_X)
            {
                exec.push((start, end));
            }
        }
        let base = all
            .iter()
            .map(|s| s.0)
            .min()
            .ok_or(UnwindError::NoLoadSegment)?;
        let limit = base.saturating_add(u64::from(u32::MAX));
        let mut text = if exec.is_empty() { all } else { exec };
        for r in &mut text {
            r.1 = r.1.min(limit);
        }
        text.retain(|r| r.0 < r.1);
        text.sort_unstable();
        Ok(Layout { base, text })
    }

    /// Clips an FDE's range to the executable segment containing its start.
    fn clip(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        let i = self.text.partition_point(|r| r.0 <= start);
        let seg = self.text.get(i.checked_sub(1)?)?;
        let end = end.min(seg.1);
        (start < end).then_some((start, end))
    }
}

fn section_addr(obj: &object::File<'_>, name: &str) -> Option<u64> {
    obj.section_by_name(name).map(|s| s.address())
}

/// A section's address and (decompressed) bytes.
type SectionData<'a> = (u64, Cow<'a, [u8]>);

/// A section's data; `None` when absent, empty or NOBITS (the `.eh_frame` of a separate
/// debug file).
fn section_data<'a>(
    obj: &object::File<'a>,
    name: &'static str,
) -> Result<Option<SectionData<'a>>, String> {
    let Some(sec) = obj.section_by_name(name) else {
        return Ok(None);
    };
    if sec.kind() == SectionKind::UninitializedData {
        return Ok(None);
    }
    let c = sec.compressed_data().map_err(|e| format!("{name}: {e}"))?;
    if c.format != object::CompressionFormat::None {
        // Refuse absurd headers before allocating: deflate/zstd of CFI never reach 1:2048.
        let limit = (c.data.len() as u64).saturating_mul(2048).max(1 << 20);
        if c.uncompressed_size > limit.min(1 << 32) {
            return Err(format!(
                "{name}: implausible uncompressed size {}",
                c.uncompressed_size
            ));
        }
    }
    let data = c.decompress().map_err(|e| format!("{name}: {e}"))?;
    Ok((!data.is_empty()).then(|| (sec.address(), data)))
}

/// The rule part of a row (everything but the pc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Rule {
    pub cfa_rule: CfaRule,
    pub cfa_offset: i32,
    pub rbp_rule: RbpRule,
    pub rbp_offset: i16,
}

impl Rule {
    pub const NONE: Rule = Rule {
        cfa_rule: CfaRule::None,
        cfa_offset: 0,
        rbp_rule: RbpRule::Same,
        rbp_offset: 0,
    };
    pub const END: Rule = Rule {
        cfa_rule: CfaRule::End,
        ..Rule::NONE
    };
    pub const UNSUPPORTED: Rule = Rule {
        cfa_rule: CfaRule::Unsupported,
        ..Rule::NONE
    };

    fn at(self, pc: u32) -> UnwindRow {
        UnwindRow::new(
            pc,
            self.cfa_rule,
            self.cfa_offset,
            self.rbp_rule,
            self.rbp_offset,
        )
    }
}

/// One FDE's rows: `rows[first..first + len]` of the collector, each covering from its
/// start to the next one's (the last one up to `end`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FdeSpan {
    pub start: u64,
    pub end: u64,
    /// 0 for `.eh_frame`, 1 for `.debug_frame`: the tie-break between equal starts.
    pub priority: u8,
    /// Order of appearance, the last tie-break.
    pub order: usize,
    pub first: usize,
    pub len: usize,
}

/// Sorts the FDEs, clips overlaps, adds the [`CfaRule::None`] end rows, converts to base-relative
/// pcs and merges equal neighbours. Every address is inside [`Layout::text`], so the
/// conversions to u32 are exact.
pub(crate) fn assemble(
    fdes: &mut [FdeSpan],
    rows: &[(u64, Rule)],
    base: u64,
    stats: &mut TableStats,
) -> Vec<UnwindRow> {
    fdes.sort_unstable_by_key(|f| (f.start, f.priority, f.order));
    let rel = |a: u64| u32::try_from(a.saturating_sub(base)).unwrap_or(u32::MAX);
    let mut out: Vec<(u32, Rule)> = Vec::with_capacity(rows.len() + fdes.len());
    // Replaces the previous row when it starts at the same pc: that one covers nothing
    // (only ever an end-of-FDE `CfaRule::None` row followed by the next FDE's first row).
    let push = |out: &mut Vec<(u32, Rule)>, pc: u32, rule: Rule| match out.last_mut() {
        Some(last) if last.0 == pc => *last = (pc, rule),
        _ => out.push((pc, rule)),
    };
    let mut covered = 0u64; // everything below is taken by earlier FDEs
    for f in fdes.iter() {
        if f.start < covered {
            stats.overlapping_fdes += 1;
        }
        let Some(span) = rows.get(f.first..f.first.saturating_add(f.len)) else {
            continue;
        };
        for (i, &(start, rule)) in span.iter().enumerate() {
            let end = span.get(i + 1).map_or(f.end, |n| n.0).min(f.end);
            let lo = start.max(covered).max(f.start);
            if lo < end {
                push(&mut out, rel(lo), rule);
            }
        }
        if f.end > covered {
            push(&mut out, rel(f.end), Rule::NONE);
            covered = f.end;
        }
    }
    stats.rows_before_merge = out.len();
    out.dedup_by(|next, prev| next.1 == prev.1);
    for (_, r) in &out {
        match r.cfa_rule {
            CfaRule::Unsupported => stats.unsupported_rows += 1,
            CfaRule::Plt => stats.plt_rows += 1,
            CfaRule::End => stats.end_rows += 1,
            CfaRule::None => stats.none_rows += 1,
            CfaRule::Rsp | CfaRule::Rbp => {
                if r.rbp_rule == RbpRule::Unsupported {
                    stats.rbp_unsupported_rows += 1;
                }
            }
        }
    }
    debug_assert!(out.windows(2).all(|w| w[0].0 < w[1].0));
    out.into_iter().map(|(pc, r)| r.at(pc)).collect()
}
