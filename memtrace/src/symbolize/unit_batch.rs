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
use std::num::NonZeroU64;

use super::FrameInfo;
use super::demangle::demangle_lang;
use super::elf::Reader;

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

/// A row of the line table, as addr2line keeps it.
#[derive(Clone, Copy)]
struct Row {
    address: u64,
    file_index: u64,
    line: u32,
}

/// In the layout of addr2line's `LineSequence` (32 bytes): rows `first..first + len`.
struct Sequence {
    start: u64,
    end: u64,
    first: usize,
    len: usize,
}

/// The unit's line table: its rows, and file names rendered when first printed.
struct Lines {
    rows: Vec<Row>,
    sequences: Vec<Sequence>,
    files: Vec<Option<String>>,
}

/// A source location (addr2line's `Location` without the column).
#[derive(Clone, Copy, Default)]
struct Location {
    file: Option<u64>,
    line: Option<u32>,
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
    let mut out = vec![Vec::new(); probes.len()];
    let Some(unit) = load_unit(dwarf, offset) else {
        return out;
    };
    let unit_ref = unit.unit.unit_ref(dwarf);
    let mut lines = None;
    let ranges = match unit.ranges {
        Some(r) => r,
        // No address attributes: the line table's sequences are the unit's ranges.
        None => match parsed_lines(&mut lines, unit_ref) {
            Ok(Some(l)) => l
                .sequences
                .iter()
                .map(|s| gimli::Range {
                    begin: s.start,
                    end: s.end,
                })
                .collect(),
            _ => Vec::new(),
        },
    };
    let is_c = matches!(
        unit.lang,
        Some(
            gimli::DW_LANG_C89
                | gimli::DW_LANG_C
                | gimli::DW_LANG_C99
                | gimli::DW_LANG_C11
                | gimli::DW_LANG_C17
        )
    );
    let mut top_level = None;
    let mut functions = None;
    let mut parsed: HashMap<Offset, Result<Function, Error>> = HashMap::new();
    for (&probe, out) in probes.iter().zip(&mut out) {
        let covered = ranges
            .iter()
            .any(|r| probe < r.end && probe.wrapping_add(1) > r.begin);
        if !covered {
            continue;
        }
        // In C, only a GNU nested function is defined inside another one, and its code
        // is never inside its parent's: a probe in a function found without reading
        // any function's children is in that function. Anywhere else, all of them are read.
        let in_top_level = is_c
            .then(|| {
                top_level
                    .get_or_insert_with(|| parse_functions(unit_ref, true, false))
                    .as_ref()
                    .ok()
                    .and_then(|a| find_function(a, probe))
            })
            .flatten();
        let found = match in_top_level {
            Some(die) => Some(die),
            None => {
                let Ok(addresses) = functions
                    .get_or_insert_with(|| parse_functions(unit_ref, is_c, true))
                    .as_ref()
                else {
                    continue;
                };
                find_function(addresses, probe)
            }
        };
        let function = match found {
            None => None,
            Some(die) => match parsed
                .entry(die)
                .or_insert_with(|| parse_function(unit_ref, die))
            {
                Ok(f) => Some(&*f),
                Err(_) => continue,
            },
        };
        let Ok(mut lines) = parsed_lines(&mut lines, unit_ref) else {
            continue;
        };
        let location = lines.as_ref().and_then(|l| l.find_location(probe));
        let Some(function) = function else {
            if let Some(loc) = location {
                out.push(frame(unit_ref, &mut lines, None, unit.lang, Some(loc)));
            }
            continue;
        };
        let mut loc = location;
        for f in function.find_inlined(probe).into_iter().rev() {
            let here = loc.take();
            out.push(frame(unit_ref, &mut lines, f.name, unit.lang, here));
            loc = Some(Location {
                file: f.call_file,
                line: (f.call_line != 0).then_some(f.call_line),
            });
            if out.len() > 256 {
                break; // as resolve_frames: corrupt inline chains
            }
        }
        if out.len() <= 256 {
            out.push(frame(unit_ref, &mut lines, function.name, unit.lang, loc));
        }
    }
    out
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

/// The unit's line table (addr2line's `Lines::parse`), `None` without one.
fn parse_lines(unit: UnitRef<'_>) -> Result<Option<Lines>, Error> {
    let Some(program) = unit.line_program.clone() else {
        return Ok(None);
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut sequences = Vec::new();
    let mut first = 0;
    let mut program = program.rows();
    while let Some((_, row)) = program.next_row()? {
        if row.end_sequence() {
            let len = rows.len() - first;
            if len > 0 {
                let (start, end) = (rows[first].address, row.address());
                if start < end {
                    sequences.push(Sequence {
                        start,
                        end,
                        first,
                        len,
                    });
                    first = rows.len();
                } else {
                    rows.truncate(first);
                }
            }
            continue;
        }
        let r = Row {
            address: row.address(),
            file_index: row.file_index(),
            line: row.line().map_or(0, NonZeroU64::get) as u32,
        };
        match rows[first..].last_mut() {
            Some(last) if last.address == r.address => *last = r,
            _ => rows.push(r),
        }
    }
    // Rows after the last end of sequence belong to no sequence.
    rows.truncate(first);
    sequences.sort_unstable_by_key(|s| s.start);
    // addr2line renders every file up front and fails the table if one cannot be;
    // here they are only checked, and rendered when printed.
    let header = program.header();
    // Before DWARF 5, file 0 is the unit's own file, and the table's files follow.
    let n = header.file_names().len();
    let count = if header.version() < 5 {
        n + 1
    } else {
        n.max(1)
    };
    for i in 0..count as u64 {
        if let Some(f) = header.file(i) {
            check_file(unit, f, header)?;
        }
    }
    Ok(Some(Lines {
        rows,
        sequences,
        files: vec![None; count],
    }))
}

impl Lines {
    fn find_location(&self, probe: u64) -> Option<Location> {
        let s = self
            .sequences
            .binary_search_by(|s| {
                if probe < s.start {
                    Ordering::Greater
                } else if probe >= s.end {
                    Ordering::Less
                } else {
                    Ordering::Equal
                }
            })
            .ok()?;
        let s = &self.sequences[s];
        let rows = &self.rows[s.first..s.first + s.len];
        let i = match rows.binary_search_by(|r| r.address.cmp(&probe)) {
            Ok(i) => i,
            Err(0) => return None,
            Err(i) => i - 1,
        };
        let row = rows[i];
        Some(Location {
            file: Some(row.file_index),
            line: (row.line != 0).then_some(row.line),
        })
    }

    /// The path of file `index`, as addr2line renders it.
    fn file(&mut self, unit: UnitRef<'_>, index: u64) -> Option<String> {
        let slot = self.files.get_mut(usize::try_from(index).ok()?)?;
        if slot.is_none() {
            let program = unit.line_program.as_ref()?;
            let header = program.header();
            // DWARF 4 and older have no file 0: addr2line names it "".
            *slot = Some(match header.file(index) {
                Some(f) => render_file(unit, f, header).ok()?,
                None => String::new(),
            });
        }
        slot.clone()
    }
}

type FileEntry = gimli::FileEntry<Reader, usize>;
type LineHeader = gimli::LineProgramHeader<Reader, usize>;

fn check_file(unit: UnitRef<'_>, file: &FileEntry, header: &LineHeader) -> Result<(), Error> {
    if file.directory_index() != 0
        && let Some(dir) = file.directory(header)
    {
        unit.attr_string(dir)?;
    }
    unit.attr_string(file.path_name())?;
    Ok(())
}

/// addr2line's `render_file`: the compilation directory, the file's directory (unless it
/// is entry 0, the compilation directory again), the file name; an absolute part
/// replaces what came before.
fn render_file(unit: UnitRef<'_>, file: &FileEntry, header: &LineHeader) -> Result<String, Error> {
    let mut path = match &unit.comp_dir {
        Some(d) => d.to_string_lossy().into_owned(),
        None => String::new(),
    };
    if file.directory_index() != 0
        && let Some(dir) = file.directory(header)
    {
        path_push(&mut path, &unit.attr_string(dir)?.to_string_lossy());
    }
    path_push(
        &mut path,
        &unit.attr_string(file.path_name())?.to_string_lossy(),
    );
    Ok(path)
}

fn path_push(path: &mut String, p: &str) {
    let forward_root = |p: &str| p.starts_with('/') || p.get(1..3) == Some(":/");
    let backward_root = |p: &str| p.starts_with('\\') || p.get(1..3) == Some(":\\");
    if forward_root(p) || backward_root(p) {
        *path = p.to_owned();
        return;
    }
    let sep = if backward_root(path) { '\\' } else { '/' };
    if !path.is_empty() && !path.ends_with(sep) {
        path.push(sep);
    }
    path.push_str(p);
}
