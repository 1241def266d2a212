//! Which unit of `.debug_info` covers which code, from `.debug_aranges`, so that a
//! lookup parses only the unit it needs; and whether a unit can be read on its own.

use super::elf::Reader;
use super::sections::Sections;

/// What `.debug_aranges` says covers an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Covered {
    Nothing,
    Unit(u32),
    /// Several units: only the whole-file context decides as addr2line does.
    Ambiguous,
}

/// Which unit covers which code, from `.debug_aranges` and the unit headers, so that
/// only the units an address needs are parsed.
///
/// addr2line's context parses every unit's header, abbreviations and root DIE up front
/// (libc: 2063 units, ~1 MB of abbreviations, ~40 ms) before the first lookup. A unit
/// without section-relative references to other units (`DW_FORM_ref_addr`, which dwz
/// and LTO produce) means the same on its own, so it gets its own small context over
/// its bytes of `.debug_info`, built when an address first needs it; a unit whose
/// abbreviations allow such references is answered by the whole-file context.
pub(super) struct UnitIndex {
    /// Disjoint, sorted `[begin, end)` ranges.
    pub(super) ranges: Vec<(u64, u64, Covered)>,
    /// Each unit's bytes in `.debug_info`.
    pub(super) units: Vec<IndexedUnit>,
}

#[derive(Clone, Copy)]
pub(super) struct IndexedUnit {
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) abbrev_offset: usize,
}

impl UnitIndex {
    /// `None` when the address ranges do not name units by their offsets: then the
    /// whole-file context is used.
    pub(super) fn build(sections: &Sections) -> Option<UnitIndex> {
        let dwarf = sections.dwarf(None);
        let mut units = Vec::new();
        let mut headers = dwarf.units();
        while let Ok(Some(h)) = headers.next() {
            let start = h.debug_info_offset()?.0;
            units.push(IndexedUnit {
                start,
                end: start + h.length_including_self(),
                abbrev_offset: h.debug_abbrev_offset().0,
            });
        }
        if headers.next().is_err() || units.is_empty() {
            return None;
        }
        let mut listed = vec![false; units.len()];
        let raw = arange_entries(&dwarf, |off| {
            let unit = units.binary_search_by_key(&off, |u| u.start).ok()?;
            listed[unit] = true;
            Some(unit as u32)
        })?;
        // A unit missing from .debug_aranges (clang does not write it, and other tools
        // may skip units) could cover addresses only the whole-file context finds.
        if listed.contains(&false) {
            return None;
        }
        Some(UnitIndex {
            ranges: merged_ranges(raw)?,
            units,
        })
    }

    pub(super) fn lookup(&self, vaddr: u64) -> Covered {
        covered_at(&self.ranges, vaddr)
    }
}

/// What covers `vaddr` in disjoint sorted ranges ([`merged_ranges`]).
pub(super) fn covered_at(ranges: &[(u64, u64, Covered)], vaddr: u64) -> Covered {
    let i = ranges.partition_point(|r| r.0 <= vaddr);
    match i.checked_sub(1).map(|i| ranges[i]) {
        Some((_, end, c)) if vaddr < end => c,
        _ => Covered::Nothing,
    }
}

/// The address ranges of `.debug_aranges`, each with its unit as `unit_of` names it
/// from the unit's offset in `.debug_info`. `None` if a set names no unit (`unit_of`
/// answers `None`) or the section does not parse to its end.
pub(super) fn arange_entries(
    dwarf: &gimli::Dwarf<Reader>,
    mut unit_of: impl FnMut(usize) -> Option<u32>,
) -> Option<Vec<(u64, u64, u32)>> {
    let mut raw = Vec::new();
    let mut aranges = dwarf.debug_aranges.headers();
    while let Ok(Some(h)) = aranges.next() {
        let unit = unit_of(h.debug_info_offset().0)?;
        let mut entries = h.entries();
        while let Some(e) = entries.next().transpose() {
            // As in addr2line: a bad entry is skipped (the iterator ends on errors
            // that cannot be skipped).
            if let Ok(e) = e
                && e.length() != 0
            {
                let r = e.range();
                raw.push((r.begin, r.end, unit));
            }
        }
    }
    if aranges.next().is_err() {
        return None;
    }
    Some(raw)
}

/// Disjoint sorted ranges from possibly overlapping ones: where units overlap, the
/// range is `Ambiguous`. `None` when there is no range at all.
pub(super) fn merged_ranges(mut raw: Vec<(u64, u64, u32)>) -> Option<Vec<(u64, u64, Covered)>> {
    if raw.is_empty() {
        return None;
    }
    raw.sort_unstable();
    let mut ranges: Vec<(u64, u64, Covered)> = Vec::with_capacity(raw.len());
    for (begin, end, unit) in raw {
        if end <= begin {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if begin < last.1 => {
                if last.2 != Covered::Unit(unit) {
                    last.2 = Covered::Ambiguous;
                }
                last.1 = last.1.max(end);
            }
            _ => ranges.push((begin, end, Covered::Unit(unit))),
        }
    }
    Some(ranges)
}

/// Whether no attribute in the abbreviation table at the start of `table` is a reference
/// relative to the whole `.debug_info` (`DW_FORM_ref_addr`). A table that does not parse
/// counts as not self-contained.
pub(super) fn abbrev_table_is_self_contained(table: &[u8]) -> bool {
    fn uleb(b: &[u8], pos: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let byte = *b.get(*pos)?;
            *pos += 1;
            if shift < 64 {
                v |= u64::from(byte & 0x7f) << shift;
            }
            shift += 7;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
    }
    let mut pos = 0;
    let mut scan = || -> Option<bool> {
        loop {
            if uleb(table, &mut pos)? == 0 {
                return Some(true);
            }
            uleb(table, &mut pos)?; // tag
            pos += 1; // children flag
            loop {
                let name = uleb(table, &mut pos)?;
                let form = uleb(table, &mut pos)?;
                if name == 0 && form == 0 {
                    break;
                }
                match gimli::DwForm(form as u16) {
                    gimli::DW_FORM_ref_addr | gimli::DW_FORM_indirect => return Some(false),
                    gimli::DW_FORM_implicit_const => {
                        uleb(table, &mut pos)?; // an SLEB128: same length rules
                    }
                    _ => {}
                }
            }
        }
    };
    scan().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abbreviation_tables_with_cross_unit_references() {
        // code 1, DW_TAG_compile_unit, children; DW_AT_name strp; end; end of table.
        let plain = [1, 0x11, 1, 0x03, 0x0e, 0, 0, 0];
        assert!(abbrev_table_is_self_contained(&plain));
        // code 2, DW_TAG_subprogram, no children; DW_AT_abstract_origin ref_addr.
        let mut cross = plain[..7].to_vec();
        cross.extend_from_slice(&[2, 0x2e, 0, 0x31, 0x10, 0, 0, 0]);
        assert!(!abbrev_table_is_self_contained(&cross));
        // An implicit_const value (here 0x10) is not a form.
        let implicit = [1, 0x11, 0, 0x3a, 0x21, 0x10, 0, 0, 0];
        assert!(abbrev_table_is_self_contained(&implicit));
        assert!(!abbrev_table_is_self_contained(&plain[..4]), "truncated");
    }
}
