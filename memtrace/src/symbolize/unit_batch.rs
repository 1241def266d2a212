//! Batch lookups in one unit, straight from gimli, answering exactly what addr2line's
//! context over that unit alone answers (`ElfModule::resolve` uses those contexts).
//!
//! A context keeps everything it parses for later lookups: every function of the unit
//! with its name and inline tree, every line row, every file name rendered as a path.
//! A batch (`memtrace symbolize`) knows all its addresses up front, so it can read each
//! unit once for all of them and keep nothing: only the functions that contain one of
//! the addresses are parsed further, and only the files of the rows and calls printed
//! are rendered. libc (4297 addresses in ~1400 units) spent most of its lookup time in
//! building those contexts and in the page faults of their allocations.
//!
//! Every step mirrors the addr2line code it replaces (0.27: `ResUnits::parse`,
//! `Functions::parse`, `Function::parse`, `Lines::parse`, `FrameIter`), including which
//! errors discard what: the tests compare both on every function of libc. Where
//! addr2line sorts with `sort_unstable` and picks one of several overlapping ranges by
//! binary search, the same algorithm runs on elements of the same size, so it picks the
//! same one.

use std::cmp::Ordering;
use std::collections::HashMap;

use super::FrameInfo;
use super::demangle::demangle_lang;
use super::dies::{Abbrev, Cursor, Table};
use super::elf::Reader;
use super::lines::{Lines, Location, parse_lines};

type Dwarf = gimli::Dwarf<Reader>;
type Unit = gimli::Unit<Reader>;
type UnitRef<'a> = gimli::UnitRef<'a, Reader>;
type Offset = gimli::UnitOffset<usize>;
type Error = gimli::Error;

/// The address attributes of a DIE (addr2line's `RangeAttributes`).
#[derive(Default)]
struct RangeAttrs {
    low_pc: Option<u64>,
    high_pc: Option<u64>,
    size: Option<u64>,
    ranges_offset: Option<gimli::RangeListsOffset<usize>>,
}

impl RangeAttrs {
    /// Takes the attribute if it is one of the address attributes; false otherwise.
    fn take(&mut self, unit: UnitRef<'_>, attr: &gimli::Attribute<Reader>) -> Result<bool, Error> {
        match (attr.name(), attr.value()) {
            (gimli::DW_AT_low_pc, gimli::AttributeValue::Addr(v)) => self.low_pc = Some(v),
            (gimli::DW_AT_low_pc, gimli::AttributeValue::DebugAddrIndex(i)) => {
                self.low_pc = Some(unit.address(i)?)
            }
            (gimli::DW_AT_high_pc, gimli::AttributeValue::Addr(v)) => self.high_pc = Some(v),
            (gimli::DW_AT_high_pc, gimli::AttributeValue::DebugAddrIndex(i)) => {
                self.high_pc = Some(unit.address(i)?)
            }
            (gimli::DW_AT_high_pc, gimli::AttributeValue::Udata(v)) => self.size = Some(v),
            (gimli::DW_AT_ranges, v) => self.ranges_offset = unit.attr_ranges_offset(v)?,
            (gimli::DW_AT_low_pc | gimli::DW_AT_high_pc, _) => {}
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Calls `f` with each non-empty range; whether there was one.
    fn for_each(&self, unit: UnitRef<'_>, mut f: impl FnMut(gimli::Range)) -> Result<bool, Error> {
        let mut any = false;
        let mut add = |r: gimli::Range| {
            if r.begin < r.end {
                f(r);
                any = true;
            }
        };
        if let Some(off) = self.ranges_offset {
            let mut list = unit.ranges(off)?;
            while let Some(r) = list.next()? {
                add(r);
            }
        } else if let (Some(begin), Some(end)) = (self.low_pc, self.high_pc) {
            add(gimli::Range { begin, end });
        } else if let (Some(begin), Some(size)) = (self.low_pc, self.size) {
            // A -1 tombstone wraps around and is ignored.
            add(gimli::Range {
                begin,
                end: begin.wrapping_add(size),
            });
        }
        Ok(any)
    }
}

/// One function's range, in the layout of addr2line's `FunctionAddress` (24 bytes).
#[derive(Clone, Copy)]
struct FunctionAddress {
    range: gimli::Range,
    die: Offset,
}

struct Inlined {
    name: Option<Reader>,
    call_file: Option<u64>,
    call_line: u32,
}

#[derive(Clone, Copy)]
struct InlinedAddress {
    range: gimli::Range,
    call_depth: usize,
    function: usize,
}

/// A function that contains one of the batch's addresses, with its inline tree.
struct Function {
    name: Option<Reader>,
    inlined: Vec<Inlined>,
    /// By call depth, then start (see addr2line's `Function::parse`).
    addresses: Vec<InlinedAddress>,
}

/// Frames for each of `probes` (sorted) from the unit at `offset` of `.debug_info`:
/// innermost first, as `resolve_frames` builds them from addr2line (empty where addr2line
/// finds nothing or fails).
pub(crate) fn unit_frames(dwarf: &Dwarf, offset: usize, probes: &[u64]) -> Vec<Vec<FrameInfo>> {
    match load_unit(dwarf, offset) {
        None => vec![Vec::new(); probes.len()],
        Some(unit) => {
            frames_in(&Gimli, dwarf, unit, probes).expect("only the strict walker gives up")
        }
    }
}

/// What [`unit_frames`] answers, from this module's own abbreviation tables and DIE
/// walker ([`super::dies`]); `None` when the unit is not one it takes or anything fails
/// to parse, and [`unit_frames`] must answer. libc's units all pass.
pub(crate) fn fast_unit_frames(
    dwarf: &Dwarf,
    offset: usize,
    probes: &[u64],
    scratch: &mut Scratch,
) -> Option<Vec<Vec<FrameInfo>>> {
    let unit = fast_load_unit(dwarf, offset, scratch)?;
    frames_in(&Fast(&scratch.table), dwarf, unit, probes)
}

/// Buffers reused from unit to unit by [`fast_unit_frames`].
pub(crate) struct Scratch {
    table: Table,
    attrs: Vec<gimli::Attribute<Reader>>,
    /// The `Unit`s built here have no gimli abbreviations: `Table` is read instead.
    no_abbreviations: std::sync::Arc<gimli::Abbreviations>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            table: Table::default(),
            attrs: Vec::new(),
            no_abbreviations: std::sync::Arc::new(gimli::Abbreviations::default()),
        }
    }
}

/// How a unit's DIEs are read: by gimli (errors are part of the answer, as in
/// addr2line), or by [`super::dies`] (`STRICT`: any error means "ask gimli").
trait Walker {
    const STRICT: bool;
    fn functions(
        &self,
        unit: UnitRef<'_>,
        is_c: bool,
        bodies: bool,
    ) -> Result<Vec<FunctionAddress>, Error>;
    fn function(&self, unit: UnitRef<'_>, die: Offset) -> Result<Function, Error>;
}

struct Gimli;

impl Walker for Gimli {
    const STRICT: bool = false;
    fn functions(
        &self,
        unit: UnitRef<'_>,
        is_c: bool,
        bodies: bool,
    ) -> Result<Vec<FunctionAddress>, Error> {
        parse_functions(unit, is_c, bodies)
    }
    fn function(&self, unit: UnitRef<'_>, die: Offset) -> Result<Function, Error> {
        parse_function(unit, die)
    }
}

struct Fast<'t>(&'t Table);

impl Walker for Fast<'_> {
    const STRICT: bool = true;
    fn functions(
        &self,
        unit: UnitRef<'_>,
        is_c: bool,
        bodies: bool,
    ) -> Result<Vec<FunctionAddress>, Error> {
        fast_parse_functions(unit, self.0, is_c, bodies)
    }
    fn function(&self, unit: UnitRef<'_>, die: Offset) -> Result<Function, Error> {
        fast_parse_function(unit, self.0, die)
    }
}

/// Why a probe gets no frames from [`frames_in`]: `Skip` leaves it without frames (as
/// addr2line does when a DIE fails to parse), `GiveUp` leaves the whole unit to gimli
/// (the strict walker's answer to any error).
enum Miss {
    Skip,
    GiveUp,
}

/// `Skip`, or `GiveUp` from a strict walker.
fn miss<W: Walker>() -> Miss {
    if W::STRICT { Miss::GiveUp } else { Miss::Skip }
}

fn frames_in<W: Walker>(
    walker: &W,
    dwarf: &Dwarf,
    unit: LoadedUnit,
    probes: &[u64],
) -> Option<Vec<Vec<FrameInfo>>> {
    let mut out = vec![Vec::new(); probes.len()];
    let unit_ref = unit.unit.unit_ref(dwarf);
    let mut lines = None;
    let ranges = unit_ranges(unit.ranges, &mut lines, unit_ref);
    let mut functions = FunctionsFound::new(walker, unit_ref, is_c(unit.lang));
    for (&probe, out) in probes.iter().zip(&mut out) {
        let covered = ranges
            .iter()
            .any(|r| probe < r.end && probe.wrapping_add(1) > r.begin);
        if !covered {
            continue;
        }
        let function = match functions.containing(probe) {
            Ok(f) => f,
            Err(Miss::Skip) => continue,
            Err(Miss::GiveUp) => return None,
        };
        let Ok(mut lines) = parsed_lines(&mut lines, unit_ref) else {
            continue;
        };
        push_frames(out, unit_ref, &mut lines, unit.lang, function, probe);
    }
    Some(out)
}

/// The unit's address ranges: its root DIE's, or without address attributes there, the
/// sequences of its line table (parsed into `lines`).
fn unit_ranges(
    root: Option<Vec<gimli::Range>>,
    lines: &mut Option<Result<Option<Lines>, Error>>,
    unit: UnitRef<'_>,
) -> Vec<gimli::Range> {
    if let Some(r) = root {
        return r;
    }
    match parsed_lines(lines, unit) {
        Ok(Some(l)) => l
            .sequences
            .iter()
            .map(|s| gimli::Range {
                begin: s.start,
                end: s.end,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn is_c(lang: Option<gimli::DwLang>) -> bool {
    matches!(
        lang,
        Some(
            gimli::DW_LANG_C89
                | gimli::DW_LANG_C
                | gimli::DW_LANG_C99
                | gimli::DW_LANG_C11
                | gimli::DW_LANG_C17
        )
    )
}

/// The functions of one unit that [`frames_in`] has read so far, shared by its probes:
/// each list of function ranges is read once, each function's inline tree once.
struct FunctionsFound<'a, W> {
    walker: &'a W,
    unit: UnitRef<'a>,
    is_c: bool,
    /// Functions not defined inside another one (C units only).
    top_level: Option<Result<Vec<FunctionAddress>, Error>>,
    /// Every function.
    all: Option<Result<Vec<FunctionAddress>, Error>>,
    parsed: HashMap<Offset, Result<Function, Error>>,
}

impl<'a, W: Walker> FunctionsFound<'a, W> {
    fn new(walker: &'a W, unit: UnitRef<'a>, is_c: bool) -> Self {
        FunctionsFound {
            walker,
            unit,
            is_c,
            top_level: None,
            all: None,
            parsed: HashMap::new(),
        }
    }

    /// The function whose code contains `probe`, with its inline tree; `Ok(None)` when
    /// no function's ranges do.
    fn containing(&mut self, probe: u64) -> Result<Option<&Function>, Miss> {
        let Some(die) = self.die_containing(probe)? else {
            return Ok(None);
        };
        let (walker, unit) = (self.walker, self.unit);
        match self
            .parsed
            .entry(die)
            .or_insert_with(|| walker.function(unit, die))
        {
            Ok(f) => Ok(Some(&*f)),
            Err(_) => Err(miss::<W>()),
        }
    }

    fn die_containing(&mut self, probe: u64) -> Result<Option<Offset>, Miss> {
        let (walker, unit, is_c) = (self.walker, self.unit, self.is_c);
        // In C, only a GNU nested function is defined inside another one, and its code
        // is never inside its parent's: a probe in a function found without reading
        // any function's children is in that function. Anywhere else, all of them are read.
        if is_c {
            match self
                .top_level
                .get_or_insert_with(|| walker.functions(unit, true, false))
            {
                Ok(top) => {
                    if let Some(die) = find_function(top, probe) {
                        return Ok(Some(die));
                    }
                }
                Err(_) if W::STRICT => return Err(Miss::GiveUp),
                Err(_) => {}
            }
        }
        match self
            .all
            .get_or_insert_with(|| walker.functions(unit, is_c, true))
        {
            Ok(all) => Ok(find_function(all, probe)),
            Err(_) => Err(miss::<W>()),
        }
    }
}

/// Appends the frames of `probe` to `out`: the inlined calls containing it innermost
/// first, then `function`; without a function, only the line table's location.
fn push_frames(
    out: &mut Vec<FrameInfo>,
    unit: UnitRef<'_>,
    lines: &mut Option<&mut Lines>,
    lang: Option<gimli::DwLang>,
    function: Option<&Function>,
    probe: u64,
) {
    let location = lines.as_ref().and_then(|l| l.find_location(probe));
    let Some(function) = function else {
        if let Some(loc) = location {
            out.push(frame(unit, lines, None, lang, Some(loc)));
        }
        return;
    };
    let mut loc = location;
    for f in function.find_inlined(probe).into_iter().rev() {
        let here = loc.take();
        out.push(frame(unit, lines, f.name, lang, here));
        loc = Some(Location {
            file: f.call_file,
            line: (f.call_line != 0).then_some(f.call_line),
        });
        if out.len() > 256 {
            break; // as resolve_frames: corrupt inline chains
        }
    }
    if out.len() <= 256 {
        out.push(frame(unit, lines, function.name, lang, loc));
    }
}

/// The unit's line table, parsed on first use (addr2line keeps the error too).
fn parsed_lines<'a>(
    cell: &'a mut Option<Result<Option<Lines>, Error>>,
    unit: UnitRef<'_>,
) -> Result<Option<&'a mut Lines>, Error> {
    match cell.get_or_insert_with(|| parse_lines(unit)) {
        Ok(l) => Ok(l.as_mut()),
        Err(e) => Err(*e),
    }
}

fn frame(
    unit: UnitRef<'_>,
    lines: &mut Option<&mut Lines>,
    name: Option<Reader>,
    lang: Option<gimli::DwLang>,
    loc: Option<Location>,
) -> FrameInfo {
    let function = name.map(|n| demangle_lang(&n.to_string_lossy(), lang).into_owned());
    let loc = loc.unwrap_or_default();
    let file = match (loc.file, lines.as_deref_mut()) {
        (Some(i), Some(l)) => l.file(unit, i),
        _ => None,
    };
    FrameInfo {
        function,
        file,
        line: loc.line.filter(|&l| l != 0),
        inlined: true,
        unresolved: None,
    }
}

/// The unit as addr2line's `ResUnits::parse` reads it: `None` when it skips the unit or
/// fails (no frames either way).
struct LoadedUnit {
    unit: Unit,
    lang: Option<gimli::DwLang>,
    /// From the root DIE; `None` if it has no address attributes.
    ranges: Option<Vec<gimli::Range>>,
}

fn load_unit(dwarf: &Dwarf, offset: usize) -> Option<LoadedUnit> {
    let header = dwarf
        .debug_info
        .header_from_offset(gimli::DebugInfoOffset(offset))
        .ok()?;
    match header.type_() {
        // Type units are never searched, partial units have no addresses.
        gimli::UnitType::Type { .. }
        | gimli::UnitType::SplitType { .. }
        | gimli::UnitType::Partial => return None,
        _ => {}
    }
    let unit = dwarf.unit(header).ok()?;
    let unit_ref = unit.unit_ref(dwarf);
    let mut entries = unit_ref.entries_raw(None).ok()?;
    let abbrev = entries.read_abbreviation().ok()??;
    let mut attrs = RangeAttrs::default();
    let mut lang = None;
    for spec in abbrev.attributes() {
        let attr = entries.read_attribute(*spec).ok()?;
        if !attrs.take(unit_ref, &attr).ok()?
            && let (gimli::DW_AT_language, gimli::AttributeValue::Language(l)) =
                (attr.name(), attr.value())
        {
            lang = Some(l);
        }
    }
    let mut ranges = Vec::new();
    let any = attrs.for_each(unit_ref, |r| ranges.push(r)).ok()?;
    Some(LoadedUnit {
        lang,
        ranges: any.then_some(ranges),
        unit,
    })
}

/// [`load_unit`] with the unit's abbreviations read into `scratch.table`, and a gimli
/// `Unit` built as `Unit::new` builds it but without gimli's abbreviations. `None` if
/// the unit is not a plain compilation unit with a plain table, or anything fails.
fn fast_load_unit(dwarf: &Dwarf, offset: usize, scratch: &mut Scratch) -> Option<LoadedUnit> {
    use gimli::Section as _;
    let header = dwarf
        .debug_info
        .header_from_offset(gimli::DebugInfoOffset(offset))
        .ok()?;
    if header.type_() != gimli::UnitType::Compilation {
        return None;
    }
    let encoding = header.encoding();
    let abbrev = dwarf.debug_abbrev.reader();
    let table = abbrev.slice().get(header.debug_abbrev_offset().0..)?;
    if !scratch.table.parse(table, encoding) {
        return None;
    }
    let file = dwarf.file_type;
    let mut unit = gimli::Unit {
        abbreviations: scratch.no_abbreviations.clone(),
        name: None,
        comp_dir: None,
        low_pc: 0,
        str_offsets_base: gimli::DebugStrOffsetsBase::default_for_encoding_and_file(encoding, file),
        addr_base: gimli::DebugAddrBase(0),
        loclists_base: gimli::DebugLocListsBase::default_for_encoding_and_file(encoding, file),
        rnglists_base: gimli::DebugRngListsBase::default_for_encoding_and_file(encoding, file),
        line_program: None,
        dwo_id: None,
        header,
    };
    // The root DIE, as `Unit::new` reads it.
    let mut entries = Cursor::new(&unit.header, unit.header.root_offset().0).ok()?;
    let root = entries.read_abbrev(&scratch.table).ok()??;
    let attrs = &mut scratch.attrs;
    attrs.clear();
    entries
        .read_attrs(&unit, &scratch.table, root, |a| {
            attrs.push(a);
            Ok(())
        })
        .ok()?;
    let (mut name, mut comp_dir, mut line_offset, mut low_pc) = (None, None, None, None);
    for attr in attrs.iter() {
        use gimli::AttributeValue as V;
        match (attr.name(), attr.value()) {
            (gimli::DW_AT_name, v) => name = Some(v),
            (gimli::DW_AT_comp_dir, v) => comp_dir = Some(v),
            (gimli::DW_AT_low_pc, v) => low_pc = Some(v),
            (gimli::DW_AT_stmt_list, V::DebugLineRef(o)) => line_offset = Some(o),
            (gimli::DW_AT_str_offsets_base, V::DebugStrOffsetsBase(b)) => unit.str_offsets_base = b,
            (gimli::DW_AT_addr_base | gimli::DW_AT_GNU_addr_base, V::DebugAddrBase(b)) => {
                unit.addr_base = b
            }
            (gimli::DW_AT_loclists_base, V::DebugLocListsBase(b)) => unit.loclists_base = b,
            (
                gimli::DW_AT_rnglists_base | gimli::DW_AT_GNU_ranges_base,
                V::DebugRngListsBase(b),
            ) => unit.rnglists_base = b,
            (gimli::DW_AT_GNU_dwo_id, V::DwoId(id)) if unit.dwo_id.is_none() => {
                unit.dwo_id = Some(id)
            }
            _ => {}
        }
    }
    unit.name = name.and_then(|v| dwarf.attr_string(&unit, v).ok());
    unit.comp_dir = comp_dir.and_then(|v| dwarf.attr_string(&unit, v).ok());
    if let Some(o) = line_offset {
        unit.line_program = Some(
            dwarf
                .debug_line
                .program(o, unit.header.address_size(), unit.comp_dir, unit.name)
                .ok()?,
        );
    }
    if let Some(v) = low_pc
        && let Some(addr) = dwarf.attr_address(&unit, v).ok()?
    {
        unit.low_pc = addr;
    }
    // The rest as in `load_unit`.
    let unit_ref = unit.unit_ref(dwarf);
    let mut ranges = RangeAttrs::default();
    let mut lang = None;
    for attr in attrs.iter() {
        if !ranges.take(unit_ref, attr).ok()?
            && let (gimli::DW_AT_language, gimli::AttributeValue::Language(l)) =
                (attr.name(), attr.value())
        {
            lang = Some(l);
        }
    }
    let mut list = Vec::new();
    let any = ranges.for_each(unit_ref, |r| list.push(r)).ok()?;
    Some(LoadedUnit {
        lang,
        ranges: any.then_some(list),
        unit,
    })
}

/// [`parse_functions`] with a [`Cursor`]. A DIE that cannot add a range or jump to a
/// sibling is skipped without reading its attributes: a subprogram without address
/// attributes (a declaration) adds nothing, and reading the others cannot fail where
/// skipping them does not.
fn fast_parse_functions(
    unit: UnitRef<'_>,
    table: &Table,
    is_c: bool,
    bodies: bool,
) -> Result<Vec<FunctionAddress>, Error> {
    let mut addresses = Vec::new();
    let mut entries = Cursor::new(&unit.header, unit.header.root_offset().0)?;
    while !entries.is_empty() {
        let die = gimli::UnitOffset(entries.offset());
        let Some(abbrev) = entries.read_abbrev(table)? else {
            continue;
        };
        let tag = abbrev.tag;
        let skip_children = abbrev.has_children
            && match tag {
                gimli::DW_TAG_structure_type
                | gimli::DW_TAG_union_type
                | gimli::DW_TAG_enumeration_type => is_c,
                gimli::DW_TAG_subprogram => !bodies,
                _ => false,
            };
        let function = tag == gimli::DW_TAG_subprogram && abbrev.has_pc;
        if !(function || skip_children && abbrev.has_sibling) {
            entries.skip(table, abbrev)?;
            continue;
        }
        // A C aggregate: only its sibling is needed, usually at a fixed place.
        if !function && let Some(o) = entries.skip_to_sibling(table, abbrev)? {
            if o > die {
                entries = Cursor::new(&unit.header, o.0)?;
            }
            continue;
        }
        let mut attrs = RangeAttrs::default();
        let mut sibling = None;
        entries.read_attrs(&unit, table, abbrev, |attr| {
            if let (gimli::DW_AT_sibling, gimli::AttributeValue::UnitRef(o)) =
                (attr.name(), attr.value())
            {
                sibling = Some(o);
            } else if tag == gimli::DW_TAG_subprogram {
                attrs.take(unit, &attr)?;
            }
            Ok(())
        })?;
        if tag == gimli::DW_TAG_subprogram {
            attrs.for_each(unit, |range| addresses.push(FunctionAddress { range, die }))?;
        }
        if skip_children && let Some(next) = sibling.filter(|&o| o > die) {
            entries = Cursor::new(&unit.header, next.0)?;
        }
    }
    addresses.sort_unstable_by_key(|a| a.range.begin);
    Ok(addresses)
}

/// [`parse_function`] with a [`Cursor`].
fn fast_parse_function(unit: UnitRef<'_>, table: &Table, die: Offset) -> Result<Function, Error> {
    let mut entries = Cursor::new(&unit.header, die.0)?;
    let depth = entries.depth;
    let abbrev = entries
        .read_abbrev(table)?
        .ok_or(Error::NoEntryAtGivenOffset(die.0 as u64))?;
    let mut name = None;
    entries.read_attrs(&unit, table, abbrev, |attr| {
        fast_take_name(unit, table, &attr, &mut name)
    })?;
    let mut f = Function {
        name,
        inlined: Vec::new(),
        addresses: Vec::new(),
    };
    fast_parse_children(unit, table, &mut entries, &mut f, depth, 0)?;
    f.addresses
        .sort_unstable_by_key(|a| (a.call_depth, a.range.begin));
    Ok(f)
}

/// [`take_name`] with a [`Cursor`].
fn fast_take_name(
    unit: UnitRef<'_>,
    table: &Table,
    attr: &gimli::Attribute<Reader>,
    name: &mut Option<Reader>,
) -> Result<(), Error> {
    match attr.name() {
        gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
            if let Ok(v) = unit.attr_string(attr.value()) {
                *name = Some(v);
            }
        }
        gimli::DW_AT_name if name.is_none() => *name = unit.attr_string(attr.value()).ok(),
        gimli::DW_AT_abstract_origin | gimli::DW_AT_specification if name.is_none() => {
            *name = fast_name_attr(unit, table, attr.value(), 16)?;
        }
        _ => {}
    }
    Ok(())
}

/// [`parse_children`] with a [`Cursor`].
fn fast_parse_children(
    unit: UnitRef<'_>,
    table: &Table,
    entries: &mut Cursor,
    f: &mut Function,
    depth: isize,
    inlined_depth: usize,
) -> Result<(), Error> {
    loop {
        let next_depth = entries.depth;
        if next_depth <= depth {
            return Ok(());
        }
        let Some(abbrev) = entries.read_abbrev(table)? else {
            continue;
        };
        match abbrev.tag {
            gimli::DW_TAG_subprogram => {
                entries.skip(table, abbrev)?;
                while entries.depth > next_depth {
                    if let Some(a) = entries.read_abbrev(table)? {
                        entries.skip(table, a)?;
                    }
                }
            }
            gimli::DW_TAG_inlined_subroutine => {
                fast_parse_inlined(unit, table, entries, f, abbrev, next_depth, inlined_depth)?
            }
            _ => entries.skip(table, abbrev)?,
        }
    }
}

/// [`parse_inlined`] with a [`Cursor`].
fn fast_parse_inlined(
    unit: UnitRef<'_>,
    table: &Table,
    entries: &mut Cursor,
    f: &mut Function,
    abbrev: &Abbrev,
    depth: isize,
    inlined_depth: usize,
) -> Result<(), Error> {
    let mut attrs = RangeAttrs::default();
    let mut name = None;
    let mut call_file = None;
    let mut call_line = 0;
    entries.read_attrs(&unit, table, abbrev, |attr| {
        if attrs.take(unit, &attr)? {
            return Ok(());
        }
        match attr.name() {
            gimli::DW_AT_call_file => {
                if let gimli::AttributeValue::FileIndex(i) = attr.value()
                    && (i > 0 || unit.header.version() >= 5)
                {
                    call_file = Some(i);
                }
            }
            gimli::DW_AT_call_line => call_line = attr.udata_value().unwrap_or(0) as u32,
            _ => fast_take_name(unit, table, &attr, &mut name)?,
        }
        Ok(())
    })?;
    let function = f.inlined.len();
    f.inlined.push(Inlined {
        name,
        call_file,
        call_line,
    });
    attrs.for_each(unit, |range| {
        f.addresses.push(InlinedAddress {
            range,
            call_depth: inlined_depth,
            function,
        })
    })?;
    fast_parse_children(unit, table, entries, f, depth, inlined_depth + 1)
}

/// [`name_attr`] with a [`Cursor`]; reads all attributes of each DIE it visits (an
/// error in one the gimli version would not have reached only means "ask gimli").
fn fast_name_attr(
    unit: UnitRef<'_>,
    table: &Table,
    value: gimli::AttributeValue<Reader>,
    limit: usize,
) -> Result<Option<Reader>, Error> {
    if limit == 0 {
        return Ok(None);
    }
    let offset = match value {
        gimli::AttributeValue::UnitRef(o) => o,
        gimli::AttributeValue::DebugInfoRef(r) => match r.to_unit_offset(&unit.header) {
            Some(o) => o,
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    let mut entries = Cursor::new(&unit.header, offset.0)?;
    let abbrev = entries
        .read_abbrev(table)?
        .ok_or(Error::NoEntryAtGivenOffset(offset.0 as u64))?;
    let mut linkage = None;
    let mut name = None;
    let mut next = None;
    entries.read_attrs(&unit, table, abbrev, |attr| {
        match attr.name() {
            gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                if linkage.is_none()
                    && let Ok(v) = unit.attr_string(attr.value())
                {
                    linkage = Some(v);
                }
            }
            gimli::DW_AT_name if linkage.is_none() => {
                if let Ok(v) = unit.attr_string(attr.value()) {
                    name = Some(v);
                }
            }
            gimli::DW_AT_abstract_origin | gimli::DW_AT_specification if linkage.is_none() => {
                next = Some(attr.value())
            }
            _ => {}
        }
        Ok(())
    })?;
    if linkage.is_some() {
        return Ok(linkage);
    }
    match (name, next) {
        (Some(n), _) => Ok(Some(n)),
        (None, Some(next)) => fast_name_attr(unit, table, next, limit - 1),
        (None, None) => Ok(None),
    }
}

/// Every subprogram with code in the unit, sorted by start (addr2line's `Functions`),
/// or with `bodies` false only those not defined inside another function.
///
/// addr2line reads every DIE of the unit. In C a function cannot be defined inside a
/// structure, union or enumeration, so in C units (`is_c`) their members (most of the
/// type information each glibc unit repeats) are jumped over with `DW_AT_sibling` where
/// the compiler wrote one; without `bodies`, so are the children of every function
/// (parameters, variables, blocks, inlined calls: most of the rest).
fn parse_functions(
    unit: UnitRef<'_>,
    is_c: bool,
    bodies: bool,
) -> Result<Vec<FunctionAddress>, Error> {
    let mut addresses = Vec::new();
    let mut entries = unit.entries_raw(None)?;
    while !entries.is_empty() {
        let die = entries.next_offset();
        let Some(abbrev) = entries.read_abbreviation()? else {
            continue;
        };
        let tag = abbrev.tag();
        let skip_children = abbrev.has_children()
            && match tag {
                gimli::DW_TAG_structure_type
                | gimli::DW_TAG_union_type
                | gimli::DW_TAG_enumeration_type => is_c,
                gimli::DW_TAG_subprogram => !bodies,
                _ => false,
            };
        if tag != gimli::DW_TAG_subprogram && !skip_children {
            entries.skip_attributes(abbrev.attributes())?;
            continue;
        }
        let mut attrs = RangeAttrs::default();
        let mut sibling = None;
        for spec in abbrev.attributes() {
            let attr = entries.read_attribute(*spec)?;
            if let (gimli::DW_AT_sibling, gimli::AttributeValue::UnitRef(o)) =
                (attr.name(), attr.value())
            {
                sibling = Some(o);
            } else if tag == gimli::DW_TAG_subprogram {
                attrs.take(unit, &attr)?;
            }
        }
        if tag == gimli::DW_TAG_subprogram {
            attrs.for_each(unit, |range| addresses.push(FunctionAddress { range, die }))?;
        }
        // Only forward, so that a bad reference cannot loop.
        if skip_children && let Some(next) = sibling.filter(|&o| o > die) {
            entries = unit.entries_raw(Some(next))?;
        }
    }
    addresses.sort_unstable_by_key(|a| a.range.begin);
    Ok(addresses)
}

fn find_function(addresses: &[FunctionAddress], probe: u64) -> Option<Offset> {
    let i = addresses
        .binary_search_by(|a| {
            if probe < a.range.begin {
                Ordering::Greater
            } else if probe >= a.range.end {
                Ordering::Less
            } else {
                Ordering::Equal
            }
        })
        .ok()?;
    Some(addresses[i].die)
}

/// A subprogram's name and the inlined subroutines in it (addr2line's `Function::parse`).
fn parse_function(unit: UnitRef<'_>, die: Offset) -> Result<Function, Error> {
    let mut entries = unit.entries_raw(Some(die))?;
    let depth = entries.next_depth();
    let abbrev = entries
        .read_abbreviation()?
        .ok_or(Error::NoEntryAtGivenOffset(die.0 as u64))?;
    let mut name = None;
    for spec in abbrev.attributes() {
        let attr = entries.read_attribute(*spec)?;
        take_name(unit, &attr, &mut name)?;
    }
    let mut f = Function {
        name,
        inlined: Vec::new(),
        addresses: Vec::new(),
    };
    parse_children(unit, &mut entries, &mut f, depth, 0)?;
    f.addresses
        .sort_unstable_by_key(|a| (a.call_depth, a.range.begin));
    Ok(f)
}

/// Name attributes as addr2line takes them: the linkage name first, then the name, then
/// the name of what an abstract origin or specification refers to.
fn take_name(
    unit: UnitRef<'_>,
    attr: &gimli::Attribute<Reader>,
    name: &mut Option<Reader>,
) -> Result<(), Error> {
    match attr.name() {
        gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
            if let Ok(v) = unit.attr_string(attr.value()) {
                *name = Some(v);
            }
        }
        gimli::DW_AT_name if name.is_none() => *name = unit.attr_string(attr.value()).ok(),
        gimli::DW_AT_abstract_origin | gimli::DW_AT_specification if name.is_none() => {
            *name = name_attr(unit, attr.value(), 16)?;
        }
        _ => {}
    }
    Ok(())
}

fn parse_children(
    unit: UnitRef<'_>,
    entries: &mut gimli::EntriesRaw<'_, Reader>,
    f: &mut Function,
    depth: isize,
    inlined_depth: usize,
) -> Result<(), Error> {
    loop {
        let next_depth = entries.next_depth();
        if next_depth <= depth {
            return Ok(());
        }
        let Some(abbrev) = entries.read_abbreviation()? else {
            continue;
        };
        match abbrev.tag() {
            gimli::DW_TAG_subprogram => {
                // A nested function is looked up on its own.
                entries.skip_attributes(abbrev.attributes())?;
                while entries.next_depth() > next_depth {
                    if let Some(a) = entries.read_abbreviation()? {
                        entries.skip_attributes(a.attributes())?;
                    }
                }
            }
            gimli::DW_TAG_inlined_subroutine => {
                parse_inlined(unit, entries, f, abbrev, next_depth, inlined_depth)?
            }
            _ => entries.skip_attributes(abbrev.attributes())?,
        }
    }
}

fn parse_inlined(
    unit: UnitRef<'_>,
    entries: &mut gimli::EntriesRaw<'_, Reader>,
    f: &mut Function,
    abbrev: &gimli::Abbreviation,
    depth: isize,
    inlined_depth: usize,
) -> Result<(), Error> {
    let mut attrs = RangeAttrs::default();
    let mut name = None;
    let mut call_file = None;
    let mut call_line = 0;
    for spec in abbrev.attributes() {
        let attr = entries.read_attribute(*spec)?;
        if attrs.take(unit, &attr)? {
            continue;
        }
        match attr.name() {
            gimli::DW_AT_call_file => {
                // DWARF 5 numbers files from 0; before, 0 meant no file.
                if let gimli::AttributeValue::FileIndex(i) = attr.value()
                    && (i > 0 || unit.header.version() >= 5)
                {
                    call_file = Some(i);
                }
            }
            gimli::DW_AT_call_line => call_line = attr.udata_value().unwrap_or(0) as u32,
            _ => take_name(unit, &attr, &mut name)?,
        }
    }
    let function = f.inlined.len();
    f.inlined.push(Inlined {
        name,
        call_file,
        call_line,
    });
    attrs.for_each(unit, |range| {
        f.addresses.push(InlinedAddress {
            range,
            call_depth: inlined_depth,
            function,
        })
    })?;
    parse_children(unit, entries, f, depth, inlined_depth + 1)
}

impl Function {
    /// The inlined subroutines containing `probe`, outermost first.
    fn find_inlined(&self, probe: u64) -> Vec<&Inlined> {
        let mut found = Vec::new();
        let mut addresses = &self.addresses[..];
        loop {
            let depth = found.len();
            let search = addresses.binary_search_by(|a| {
                if a.call_depth != depth {
                    a.call_depth.cmp(&depth)
                } else if a.range.begin > probe {
                    Ordering::Greater
                } else if a.range.end <= probe {
                    Ordering::Less
                } else {
                    Ordering::Equal
                }
            });
            let Ok(i) = search else { return found };
            found.push(&self.inlined[addresses[i].function]);
            addresses = &addresses[i + 1..];
        }
    }
}

fn name_attr(
    unit: UnitRef<'_>,
    value: gimli::AttributeValue<Reader>,
    limit: usize,
) -> Result<Option<Reader>, Error> {
    if limit == 0 {
        return Ok(None);
    }
    let offset = match value {
        gimli::AttributeValue::UnitRef(o) => o,
        // Only units without section-relative references get here (see `UnitIndex`);
        // a reference into this very unit would still be found.
        gimli::AttributeValue::DebugInfoRef(r) => match r.to_unit_offset(&unit.header) {
            Some(o) => o,
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    let mut entries = unit.entries_raw(Some(offset))?;
    let abbrev = entries
        .read_abbreviation()?
        .ok_or(Error::NoEntryAtGivenOffset(offset.0 as u64))?;
    let mut name = None;
    let mut next = None;
    for spec in abbrev.attributes() {
        let attr = entries.read_attribute(*spec)?;
        match attr.name() {
            gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                if let Ok(v) = unit.attr_string(attr.value()) {
                    return Ok(Some(v));
                }
            }
            gimli::DW_AT_name => {
                if let Ok(v) = unit.attr_string(attr.value()) {
                    name = Some(v);
                }
            }
            gimli::DW_AT_abstract_origin | gimli::DW_AT_specification => next = Some(attr.value()),
            _ => {}
        }
    }
    match (name, next) {
        (Some(n), _) => Ok(Some(n)),
        (None, Some(next)) => name_attr(unit, next, limit - 1),
        (None, None) => Ok(None),
    }
}

/// How much of a file the fast paths ([`fast_unit_frames`],
/// [`super::lines::fast_parse_lines`])
/// answered in [`compare_fast_with_gimli`].
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct FastCoverage {
    pub units: usize,
    pub fast_units: usize,
    pub line_tables: usize,
    pub fast_line_tables: usize,
    pub probes: usize,
}

/// Checks, unit by unit, that the fast paths answer what gimli's parsing answers: the
/// abbreviation tables, the line tables row for row, and the frames of every row's
/// address and the byte after it.
#[cfg(test)]
pub(crate) fn compare_fast_with_gimli(
    dwarf: &Dwarf,
    offsets: &[usize],
) -> Result<FastCoverage, String> {
    use super::lines::{fast_parse_lines, gimli_parse_lines};
    let mut c = FastCoverage::default();
    let mut scratch = Scratch::default();
    for &off in offsets {
        let Some(unit) = load_unit(dwarf, off) else {
            continue;
        };
        c.units += 1;
        let unit_ref = unit.unit.unit_ref(dwarf);
        // Abbreviations.
        let table = gimli::Section::reader(&dwarf.debug_abbrev)
            .slice()
            .get(unit.unit.header.debug_abbrev_offset().0..)
            .unwrap_or(&[]);
        if scratch.table.parse(table, unit.unit.encoding()) {
            for code in 1..=scratch.table.len() as u64 {
                let (mine, theirs) = (
                    scratch.table.get(code).unwrap(),
                    unit.unit
                        .abbreviations
                        .get(code)
                        .ok_or("code missing in gimli")?,
                );
                if mine.tag != theirs.tag()
                    || mine.has_children != theirs.has_children()
                    || scratch.table.specs(mine) != theirs.attributes()
                {
                    return Err(format!("unit {off:#x}: abbreviation {code} differs"));
                }
            }
        }
        // Line tables.
        let slow = gimli_parse_lines(unit_ref);
        if unit.unit.line_program.is_some() {
            c.line_tables += 1;
        }
        if let Some(fast) = fast_parse_lines(unit_ref) {
            if unit.unit.line_program.is_some() {
                c.fast_line_tables += 1;
            }
            let same = match (&fast, &slow) {
                (Ok(None), Ok(None)) | (Err(_), Err(_)) => true,
                (Ok(Some(a)), Ok(Some(b))) => {
                    a.rows == b.rows && a.sequences == b.sequences && a.files.len() == b.files.len()
                }
                _ => false,
            };
            if !same {
                return Err(format!("unit {off:#x}: line tables differ"));
            }
        }
        // Frames.
        let mut probes: Vec<u64> = match &slow {
            Ok(Some(l)) => l
                .rows
                .iter()
                .flat_map(|r| [r.address, r.address.wrapping_add(1)])
                .collect(),
            _ => Vec::new(),
        };
        probes.sort_unstable();
        probes.dedup();
        c.probes += probes.len();
        if let Some(fast) = fast_unit_frames(dwarf, off, &probes, &mut scratch) {
            c.fast_units += 1;
            let slow = unit_frames(dwarf, off, &probes);
            if let Some(i) = (0..probes.len()).find(|&i| fast[i] != slow[i]) {
                return Err(format!(
                    "unit {off:#x}, {:#x}: fast {:?}\n  gimli {:?}",
                    probes[i], fast[i], slow[i]
                ));
            }
        }
    }
    Ok(c)
}
