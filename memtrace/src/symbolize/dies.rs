//! A unit's abbreviations and a cursor over its DIEs, for the batch lookups of
//! [`super::unit_batch`]: gimli parses every abbreviation of a unit into its own
//! structure before the first DIE is read (libc: ~1 MB of abbreviations for 2063
//! units), and skips a DIE's attributes one form at a time. Here a table is a flat
//! vector reused from unit to unit, and an abbreviation whose attributes all have a
//! fixed size is skipped in one step. Attribute values are still read by gimli
//! ([`gimli::EntriesRaw::read_attribute`] at the cursor's offset), so they mean exactly
//! what they mean to addr2line.
//!
//! Only plain tables are taken: codes numbered 1, 2, 3, ... in order (what gcc and clang
//! write), no `DW_FORM_indirect`, no `DW_FORM_ref_addr` (a unit that refers into other
//! units is answered by the whole-file context). Anything else, and any error while
//! walking, makes the caller use gimli's own parsing instead, which decides as before.

use gimli::{AttributeSpecification, DwAt, DwForm, DwTag, Reader as _};

use super::elf::Reader;

/// One abbreviation: its attributes are `specs[start..end]` of its table.
#[derive(Clone, Copy)]
pub(crate) struct Abbrev {
    pub tag: DwTag,
    pub has_children: bool,
    start: u32,
    end: u32,
    /// Bytes of all attributes, when every form has a fixed size.
    fixed: Option<u32>,
    /// Has `DW_AT_low_pc`, `DW_AT_high_pc` or `DW_AT_ranges`.
    pub has_pc: bool,
    /// Has `DW_AT_sibling`.
    pub has_sibling: bool,
    /// Where the only `DW_AT_sibling` is when only fixed-size attributes precede it and
    /// its form is `DW_FORM_ref1/2/4/8`: its byte offset in the DIE's attributes, and
    /// its size.
    sibling_at: Option<(u32, u8)>,
}

/// A unit's abbreviation table; code `c` is `abbrevs[c - 1]`.
#[derive(Default)]
pub(crate) struct Table {
    abbrevs: Vec<Abbrev>,
    specs: Vec<AttributeSpecification>,
}

impl Table {
    /// Parses the table at the start of `input` into `self` (emptied first). False if
    /// it is not a plain table (see the module documentation) or does not parse as
    /// gimli would parse it; `self` is then unusable.
    pub fn parse(&mut self, input: &[u8], encoding: gimli::Encoding) -> bool {
        self.abbrevs.clear();
        self.specs.clear();
        let mut pos = 0;
        // Names, forms and tags below 128 (nearly all) are one byte.
        let u16_at = |pos: &mut usize| -> Option<u16> {
            match input.get(*pos) {
                Some(&b) if b < 0x80 => {
                    *pos += 1;
                    Some(u16::from(b))
                }
                _ => u16::try_from(uleb(input, pos)?).ok(),
            }
        };
        loop {
            // gimli also ends a table at the end of the section; the scan that decides
            // whether a unit is self-contained does not.
            let Some(code) = uleb(input, &mut pos) else {
                return false;
            };
            if code == 0 {
                return true;
            }
            if code != self.abbrevs.len() as u64 + 1 {
                return false;
            }
            let Some(tag) = u16_at(&mut pos).filter(|&t| t != 0) else {
                return false;
            };
            let has_children = match input.get(pos) {
                Some(0) => false,
                Some(1) => true,
                _ => return false,
            };
            pos += 1;
            let start = self.specs.len() as u32;
            let mut fixed = Some(0u32);
            let (mut has_pc, mut has_sibling) = (false, false);
            let mut sibling_at = None;
            loop {
                let (Some(name), Some(form)) = (u16_at(&mut pos), u16_at(&mut pos)) else {
                    return false;
                };
                match (name, form) {
                    (0, 0) => break,
                    (0, _) | (_, 0) => return false,
                    _ => {}
                }
                let (name, form) = (DwAt(name), DwForm(form));
                if matches!(form, gimli::DW_FORM_ref_addr | gimli::DW_FORM_indirect) {
                    return false;
                }
                let implicit = if form == gimli::DW_FORM_implicit_const {
                    let Some(v) = sleb(input, &mut pos) else {
                        return false;
                    };
                    Some(v)
                } else {
                    None
                };
                if name == gimli::DW_AT_sibling {
                    let size = match form {
                        gimli::DW_FORM_ref1 => Some(1),
                        gimli::DW_FORM_ref2 => Some(2),
                        gimli::DW_FORM_ref4 => Some(4),
                        gimli::DW_FORM_ref8 => Some(8),
                        _ => None,
                    };
                    sibling_at = match (has_sibling, fixed, size) {
                        (false, Some(at), Some(size)) => Some((at, size)),
                        _ => None,
                    };
                }
                fixed = match (fixed, form_size(form, encoding)) {
                    (Some(a), Some(b)) => Some(a + u32::from(b)),
                    _ => None,
                };
                has_pc |= matches!(
                    name,
                    gimli::DW_AT_low_pc | gimli::DW_AT_high_pc | gimli::DW_AT_ranges
                );
                has_sibling |= name == gimli::DW_AT_sibling;
                self.specs
                    .push(AttributeSpecification::new(name, form, implicit));
            }
            self.abbrevs.push(Abbrev {
                tag: DwTag(tag),
                has_children,
                start,
                end: self.specs.len() as u32,
                fixed,
                has_pc,
                has_sibling,
                sibling_at,
            });
        }
    }

    pub fn get(&self, code: u64) -> Option<&Abbrev> {
        self.abbrevs
            .get(usize::try_from(code.checked_sub(1)?).ok()?)
    }

    pub fn specs(&self, a: &Abbrev) -> &[AttributeSpecification] {
        &self.specs[a.start as usize..a.end as usize]
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.abbrevs.len()
    }
}

/// An unsigned LEB128 at `*pos`; `None` if truncated or above 64 bits.
fn uleb(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = *b.get(*pos)?;
        *pos += 1;
        let low = u64::from(byte & 0x7f);
        if shift == 63 && low > 1 || shift > 63 {
            return None;
        }
        v |= low << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
    }
}

/// A signed LEB128 at `*pos`, as gimli reads it; `None` if truncated or too long.
fn sleb(b: &[u8], pos: &mut usize) -> Option<i64> {
    let mut r = gimli::EndianSlice::new(b.get(*pos..)?, gimli::LittleEndian);
    let before = r.len();
    let v = r.read_sleb128().ok()?;
    *pos += before - r.len();
    Some(v)
}

/// Sizes of the forms up to `DW_FORM_addrx4` as gimli's `get_attribute_size` gives
/// them: bytes, or `ADDR` (the address size), `WORD` (4 or 8 by the unit's format),
/// `VAR` (variable or unknown). A table rather than a `match`: the jump a `match`
/// compiles to is mispredicted on nearly every attribute of a table being parsed.
const ADDR: u8 = 0xfe;
const WORD: u8 = 0xfd;
const VAR: u8 = 0xff;
const FORM_SIZES: [u8; 0x2d] = [
    VAR, ADDR, VAR, VAR, VAR, 2, 4, 8, // 0x00..=0x07: -, addr, -, block2, block4, data2/4/8
    VAR, VAR, VAR, 1, 1, VAR, WORD,
    VAR, // string, block, block1, data1, flag, sdata, strp, udata
    VAR, 1, 2, 4, 8, VAR, VAR,
    WORD, // ref_addr (below), ref1/2/4/8, ref_udata, indirect, sec_offset
    VAR, 0, VAR, VAR, 4, WORD, 16,
    WORD, // exprloc, flag_present, strx, addrx, ref_sup4, strp_sup, data16, line_strp
    8, 0, VAR, VAR, 8, 1, 2,
    3, // ref_sig8, implicit_const, loclistx, rnglistx, ref_sup8, strx1/2/3
    4, 1, 2, 3, 4, // strx4, addrx1/2/3/4
];

/// gimli's size of a form (`AttributeSpecification::size`), without a unit header.
fn form_size(form: DwForm, encoding: gimli::Encoding) -> Option<u8> {
    let size = match FORM_SIZES.get(usize::from(form.0)) {
        Some(&s) => s,
        None => match form {
            gimli::DW_FORM_GNU_ref_alt | gimli::DW_FORM_GNU_strp_alt => WORD,
            _ => VAR,
        },
    };
    match size {
        VAR if form == gimli::DW_FORM_ref_addr => Some(if encoding.version == 2 {
            encoding.address_size
        } else {
            encoding.format.word_size()
        }),
        VAR => None,
        ADDR => Some(encoding.address_size),
        WORD => Some(encoding.format.word_size()),
        n => Some(n),
    }
}

/// A position in a unit's DIEs, with the depth bookkeeping of gimli's `EntriesRaw`:
/// an abbreviation with children goes one level down, a null entry one level up.
pub(crate) struct Cursor {
    input: Reader,
    /// Unit offset just past the unit's last byte.
    end: usize,
    pub depth: isize,
    encoding: gimli::Encoding,
}

impl Cursor {
    /// At `offset` of the unit, as `Unit::entries_raw(Some(offset))` (errors alike).
    pub fn new(header: &gimli::UnitHeader<Reader>, offset: usize) -> gimli::Result<Self> {
        let input = header.range_from(gimli::UnitOffset(offset)..)?;
        Ok(Cursor {
            end: offset + input.len(),
            input,
            depth: 0,
            encoding: header.encoding(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.input.is_empty()
    }

    /// Unit offset of the next byte.
    pub fn offset(&self) -> usize {
        self.end - self.input.len()
    }

    /// The next DIE's abbreviation, `None` for a null entry.
    pub fn read_abbrev<'t>(&mut self, table: &'t Table) -> gimli::Result<Option<&'t Abbrev>> {
        let code = self.input.read_uleb128()?;
        if code == 0 {
            self.depth -= 1;
            return Ok(None);
        }
        let a = table
            .get(code)
            .ok_or(gimli::Error::InvalidAbbreviationCode(code))?;
        if a.has_children {
            self.depth += 1;
        }
        Ok(Some(a))
    }

    /// Skips the attributes of a DIE with abbreviation `a`.
    pub fn skip(&mut self, table: &Table, a: &Abbrev) -> gimli::Result<()> {
        if let Some(n) = a.fixed {
            return self.input.skip(n as usize);
        }
        let mut fixed = 0usize;
        for spec in table.specs(a) {
            if let Some(n) = form_size(spec.form(), self.encoding) {
                fixed += usize::from(n);
                continue;
            }
            if fixed != 0 {
                self.input.skip(fixed)?;
                fixed = 0;
            }
            match spec.form() {
                gimli::DW_FORM_block1 => fixed = usize::from(self.input.read_u8()?),
                gimli::DW_FORM_block2 => fixed = usize::from(self.input.read_u16()?),
                gimli::DW_FORM_block4 => fixed = self.input.read_u32()? as usize,
                gimli::DW_FORM_block | gimli::DW_FORM_exprloc => {
                    fixed = usize::try_from(self.input.read_uleb128()?)
                        .map_err(|_| gimli::Error::BadUnsignedLeb128)?
                }
                gimli::DW_FORM_string => {
                    self.input.read_null_terminated_slice()?;
                }
                gimli::DW_FORM_udata
                | gimli::DW_FORM_sdata
                | gimli::DW_FORM_ref_udata
                | gimli::DW_FORM_strx
                | gimli::DW_FORM_GNU_str_index
                | gimli::DW_FORM_addrx
                | gimli::DW_FORM_GNU_addr_index
                | gimli::DW_FORM_loclistx
                | gimli::DW_FORM_rnglistx => self.input.skip_leb128()?,
                f => return Err(gimli::Error::UnknownForm(f)),
            }
        }
        if fixed != 0 {
            self.input.skip(fixed)?;
        }
        Ok(())
    }

    /// Skips the attributes of a DIE with abbreviation `a`, returning its
    /// `DW_AT_sibling` if `a` has it at a fixed place (see `Abbrev`): the value gimli
    /// reads, without reading the other attributes. `Ok(None)` otherwise, having read
    /// nothing.
    pub fn skip_to_sibling(
        &mut self,
        table: &Table,
        a: &Abbrev,
    ) -> gimli::Result<Option<gimli::UnitOffset<usize>>> {
        let Some((at, size)) = a.sibling_at else {
            return Ok(None);
        };
        let mut r = self.input;
        r.skip(at as usize)?;
        let v = match size {
            1 => u64::from(r.read_u8()?),
            2 => u64::from(r.read_u16()?),
            4 => u64::from(r.read_u32()?),
            _ => r.read_u64()?,
        };
        let v = usize::try_from(v).map_err(|_| gimli::Error::UnsupportedOffset)?;
        self.skip(table, a)?;
        Ok(Some(gimli::UnitOffset(v)))
    }

    /// Reads the attributes of a DIE with abbreviation `a` with gimli, one by one.
    pub fn read_attrs(
        &mut self,
        unit: &gimli::Unit<Reader>,
        table: &Table,
        a: &Abbrev,
        mut f: impl FnMut(gimli::Attribute<Reader>) -> gimli::Result<()>,
    ) -> gimli::Result<()> {
        let mut raw = unit
            .header
            .entries_raw(&unit.abbreviations, Some(gimli::UnitOffset(self.offset())))?;
        for spec in table.specs(a) {
            f(raw.read_attribute(*spec)?)?;
        }
        let consumed = raw.next_offset().0 - self.offset();
        self.input.skip(consumed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_sizes_match_gimli() {
        let forms = (0..0x40u16).chain(0x1f01..0x1f30);
        for version in [2, 4, 5] {
            for address_size in [4, 8] {
                for format in [gimli::Format::Dwarf32, gimli::Format::Dwarf64] {
                    let encoding = gimli::Encoding {
                        format,
                        version,
                        address_size,
                    };
                    let header = gimli::UnitHeader::new(
                        encoding,
                        0,
                        gimli::UnitType::Compilation,
                        gimli::DebugAbbrevOffset(0),
                        gimli::SectionId::DebugInfo,
                        gimli::UnitSectionOffset(0),
                        gimli::EndianSlice::new(&[], gimli::LittleEndian),
                    );
                    for f in forms.clone() {
                        let form = DwForm(f);
                        let implicit = (form == gimli::DW_FORM_implicit_const).then_some(0);
                        let spec = AttributeSpecification::new(gimli::DW_AT_name, form, implicit);
                        assert_eq!(
                            form_size(form, encoding).map(usize::from),
                            spec.size(&header),
                            "{form} in {encoding:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn plain_tables_only() {
        let enc = gimli::Encoding {
            format: gimli::Format::Dwarf32,
            version: 5,
            address_size: 8,
        };
        let mut t = Table::default();
        // 1: compile_unit, children, name strp, low_pc addr; 2: base_type, name string.
        let plain = [
            1, 0x11, 1, 0x03, 0x0e, 0x11, 0x01, 0, 0, 2, 0x24, 0, 0x03, 0x08, 0, 0, 0,
        ];
        assert!(t.parse(&plain, enc));
        assert_eq!(t.len(), 2);
        let a = *t.get(1).unwrap();
        assert!(a.has_children && a.has_pc && a.fixed == Some(12));
        assert_eq!(t.get(2).unwrap().fixed, None, "a string has no fixed size");
        assert!(t.get(3).is_none());
        // Codes out of order, a cross-unit reference, a truncated table, a bad
        // children byte: all left to gimli.
        let mut swapped = plain;
        swapped[0] = 2;
        assert!(!t.parse(&swapped, enc));
        let mut ref_addr = plain;
        ref_addr[6] = 0x10;
        assert!(!t.parse(&ref_addr, enc));
        assert!(!t.parse(&plain[..plain.len() - 1], enc));
        let mut children = plain;
        children[2] = 2;
        assert!(!t.parse(&children, enc));
        // A sibling after fixed-size attributes is found at its offset; after a
        // string, or as DW_FORM_ref_udata, it is read by gimli.
        let sibling = [1, 0x13, 1, 0x0b, 0x0b, 0x01, 0x13, 0x03, 0x08, 0, 0, 0];
        assert!(t.parse(&sibling, enc));
        assert_eq!(t.get(1).unwrap().sibling_at, Some((1, 4)));
        let after_string = [1, 0x13, 1, 0x03, 0x08, 0x01, 0x13, 0, 0, 0];
        assert!(t.parse(&after_string, enc));
        assert_eq!(t.get(1).unwrap().sibling_at, None);
        let udata = [1, 0x13, 1, 0x01, 0x15, 0, 0, 0];
        assert!(t.parse(&udata, enc));
        assert_eq!(t.get(1).unwrap().sibling_at, None);
        // An implicit_const value is read as gimli reads it.
        let implicit = [1, 0x24, 0, 0x3e, 0x21, 0x7f, 0, 0, 0];
        assert!(t.parse(&implicit, enc));
        let spec = t.specs(t.get(1).unwrap())[0];
        assert_eq!(spec.implicit_const_value(), Some(-1));
    }
}
