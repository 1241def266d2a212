//! A unit's line table as addr2line keeps it (0.27: `Lines::parse`, `render_file`):
//! rows by sequence, for [`super::unit_batch`]. The line program is decoded by a state
//! machine of our own ([`fast_parse_lines`]), the hottest loop of a batch, or by
//! gimli's when ours does not take the program; the tests compare both on every unit
//! of libc.

use std::cmp::Ordering;
use std::num::NonZeroU64;

use super::elf::Reader;

type UnitRef<'a> = gimli::UnitRef<'a, Reader>;
type Error = gimli::Error;

/// A row of the line table, as addr2line keeps it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Row {
    pub(super) address: u64,
    file_index: u64,
    line: u32,
}

/// In the layout of addr2line's `LineSequence` (32 bytes): rows `first..first + len`.
#[derive(Debug, PartialEq)]
pub(super) struct Sequence {
    pub(super) start: u64,
    pub(super) end: u64,
    first: usize,
    len: usize,
}

/// The unit's line table: its rows, and file names rendered when first printed.
pub(super) struct Lines {
    pub(super) rows: Vec<Row>,
    pub(super) sequences: Vec<Sequence>,
    pub(super) files: Vec<Option<String>>,
}

/// A source location (addr2line's `Location` without the column).
#[derive(Clone, Copy, Default)]
pub(super) struct Location {
    pub(super) file: Option<u64>,
    pub(super) line: Option<u32>,
}

/// The unit's line table (addr2line's `Lines::parse`), `None` without one.
pub(super) fn parse_lines(unit: UnitRef<'_>) -> Result<Option<Lines>, Error> {
    match fast_parse_lines(unit) {
        Some(lines) => lines,
        None => gimli_parse_lines(unit),
    }
}

/// The rows of a line program as addr2line keeps them, fed one by one.
#[derive(Default)]
struct LinesBuilder {
    rows: Vec<Row>,
    sequences: Vec<Sequence>,
    first: usize,
}

impl LinesBuilder {
    fn row(&mut self, r: Row) {
        match self.rows[self.first..].last_mut() {
            Some(last) if last.address == r.address => *last = r,
            _ => self.rows.push(r),
        }
    }

    fn end_sequence(&mut self, end: u64) {
        let first = self.first;
        let len = self.rows.len() - first;
        if len > 0 {
            let start = self.rows[first].address;
            if start < end {
                self.sequences.push(Sequence {
                    start,
                    end,
                    first,
                    len,
                });
                self.first = self.rows.len();
            } else {
                self.rows.truncate(first);
            }
        }
    }

    fn finish(mut self, unit: UnitRef<'_>, header: &LineHeader) -> Result<Lines, Error> {
        // Rows after the last end of sequence belong to no sequence.
        self.rows.truncate(self.first);
        self.sequences.sort_unstable_by_key(|s| s.start);
        // addr2line renders every file up front and fails the table if one cannot be;
        // here they are only checked, and rendered when printed.
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
        Ok(Lines {
            rows: self.rows,
            sequences: self.sequences,
            files: vec![None; count],
        })
    }
}

/// [`parse_lines`] with gimli's line program state machine.
pub(super) fn gimli_parse_lines(unit: UnitRef<'_>) -> Result<Option<Lines>, Error> {
    let Some(program) = unit.line_program.clone() else {
        return Ok(None);
    };
    let mut b = LinesBuilder::default();
    let mut program = program.rows();
    while let Some((_, row)) = program.next_row()? {
        if row.end_sequence() {
            b.end_sequence(row.address());
            continue;
        }
        b.row(Row {
            address: row.address(),
            file_index: row.file_index(),
            line: row.line().map_or(0, NonZeroU64::get) as u32,
        });
    }
    b.finish(unit, program.header()).map(Some)
}

type SpecialOpcodes = [(u8, u8); 256];

/// For each special opcode (`opcode_base..=255`), its line advance and operation
/// advance: `(opcode - opcode_base) % line_range` and `/ line_range`. Two divisions per
/// row were most of the time spent decoding libc's line programs; all its units share
/// one `(opcode_base, line_range)`, so the table is kept (per thread) until another
/// pair comes.
fn special_opcodes(opcode_base: u8, line_range: u8) -> SpecialOpcodes {
    use std::cell::Cell;
    thread_local! {
        static LAST: Cell<Option<(u8, u8, SpecialOpcodes)>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        if let Some((b, r, t)) = last.get()
            && (b, r) == (opcode_base, line_range)
        {
            return t;
        }
        let mut t = [(0, 0); 256];
        for (op, e) in t.iter_mut().enumerate().skip(usize::from(opcode_base)) {
            let adjusted = op as u8 - opcode_base;
            *e = (adjusted % line_range, adjusted / line_range);
        }
        last.set(Some((opcode_base, line_range, t)));
        t
    })
}

/// [`gimli_parse_lines`] with the state machine of gimli's `LineRows` written out for
/// the registers addr2line uses (address, file, line; gimli's tombstone rule for
/// `DW_LNE_set_address` included). `None` when gimli must run it instead: a VLIW
/// program (several operations per instruction), a file defined by the program
/// (`DW_LNE_define_file`, DWARF 4 and older), or anything that fails to decode.
pub(super) fn fast_parse_lines(unit: UnitRef<'_>) -> Option<Result<Option<Lines>, Error>> {
    let Some(program) = unit.line_program.as_ref() else {
        return Some(Ok(None));
    };
    let header = program.header();
    let mut b = LinesBuilder::default();
    LineProgram::new(header)?.run(&mut b).ok()?;
    Some(b.finish(unit, header).map(Some))
}

/// Whatever [`fast_parse_lines`] cannot decode, failures included: gimli decodes the
/// program instead, and its answer (errors too) is the one kept.
struct AskGimli;

impl From<gimli::Error> for AskGimli {
    fn from(_: gimli::Error) -> Self {
        AskGimli
    }
}

/// What an instruction adds to the line table, besides setting registers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Emit {
    Nothing,
    Row,
    EndSequence,
}

/// The registers of the line state machine that addr2line uses.
#[derive(Clone, Copy)]
struct Registers {
    address: u64,
    file: u64,
    line: u64,
    /// In a sequence whose `DW_LNE_set_address` was a tombstone: no rows, no advances.
    tombstone: bool,
}

impl Registers {
    /// At the start of each sequence.
    const START: Registers = Registers {
        address: 0,
        file: 1,
        line: 1,
        tombstone: false,
    };

    #[inline]
    fn advance_line(&mut self, by: i64) {
        if by < 0 {
            self.line = self.line.saturating_sub(by.unsigned_abs());
        } else {
            self.line = self.line.wrapping_add(by as u64);
        }
    }

    /// Appends what `emit` says to `b`, and starts a new sequence after its end.
    #[inline]
    fn emit(&mut self, emit: Emit, b: &mut LinesBuilder) {
        let end = emit == Emit::EndSequence;
        if !self.tombstone {
            if end {
                b.end_sequence(self.address);
            } else {
                b.row(Row {
                    address: self.address,
                    file_index: self.file,
                    line: self.line as u32,
                });
            }
        }
        if end {
            *self = Registers::START;
        }
    }
}

/// A line program's header, decoded once for [`LineProgram::run`]. The opcode
/// handlers are `#[inline]`: they run once per instruction of every line table a
/// batch reads, the hottest loop of `memtrace symbolize`, and are meant to compile
/// into that loop as the single function they were split from did.
struct LineProgram<'h> {
    header: &'h LineHeader,
    version: u16,
    address_size: u8,
    /// The bits an address may have: an advance past them is an error, as in gimli.
    mask: u64,
    /// `DW_LNE_set_address` to this or above is a tombstone (-1 or -2).
    min_tombstone: u64,
    opcode_base: u8,
    line_range: u8,
    line_base: i64,
    min_length: u64,
    special: SpecialOpcodes,
}

impl<'h> LineProgram<'h> {
    /// `None` for a program only gimli decodes (VLIW, odd address sizes, no line range).
    fn new(header: &'h LineHeader) -> Option<Self> {
        let enc = header.line_encoding();
        let address_size = header.address_size();
        if enc.maximum_operations_per_instruction != 1
            || enc.line_range == 0
            || !matches!(address_size, 4 | 8)
        {
            return None;
        }
        let mask = if address_size == 8 {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        Some(LineProgram {
            header,
            version: header.version(),
            address_size,
            mask,
            min_tombstone: mask - 1,
            opcode_base: header.opcode_base(),
            line_range: enc.line_range,
            line_base: i64::from(enc.line_base),
            min_length: u64::from(enc.minimum_instruction_length),
            special: special_opcodes(header.opcode_base(), enc.line_range),
        })
    }

    /// Decodes the whole program into `b`.
    fn run(&self, b: &mut LinesBuilder) -> Result<(), AskGimli> {
        use gimli::Reader as _;
        let mut input = self.header.raw_program_buf();
        let mut regs = Registers::START;
        while !input.is_empty() {
            let opcode = input.read_u8()?;
            let emit = if opcode == 0 {
                self.extended(&mut regs, &mut input)?
            } else if opcode >= self.opcode_base {
                self.special(&mut regs, opcode)?
            } else {
                self.standard(&mut regs, opcode, &mut input)?
            };
            if emit != Emit::Nothing {
                regs.emit(emit, b);
            }
        }
        Ok(())
    }

    /// An extended opcode (after its 0 byte): its length, then the opcode.
    #[inline]
    fn extended(&self, regs: &mut Registers, input: &mut Reader) -> Result<Emit, AskGimli> {
        use gimli::Reader as _;
        let len = usize::try_from(input.read_uleb128()?).map_err(|_| AskGimli)?;
        let mut rest = input.split(len)?;
        match gimli::DwLne(rest.read_u8()?) {
            gimli::DW_LNE_end_sequence => return Ok(Emit::EndSequence),
            gimli::DW_LNE_set_address => {
                let a = rest.read_address(self.address_size)?;
                regs.tombstone = a < regs.address || a >= self.min_tombstone;
                if !regs.tombstone {
                    regs.address = a;
                }
            }
            // The file would have to be added to the header's.
            gimli::DW_LNE_define_file if self.version <= 4 => return Err(AskGimli),
            gimli::DW_LNE_set_discriminator => {
                rest.read_uleb128()?;
            }
            _ => {}
        }
        Ok(Emit::Nothing)
    }

    /// A special opcode: advances line and address by the table, and appends a row.
    #[inline]
    fn special(&self, regs: &mut Registers, opcode: u8) -> Result<Emit, AskGimli> {
        let (line_advance, operation_advance) = self.special[usize::from(opcode)];
        regs.advance_line(self.line_base + i64::from(line_advance));
        self.advance_operations(regs, u64::from(operation_advance))?;
        Ok(Emit::Row)
    }

    /// A standard opcode (below `opcode_base`).
    #[inline]
    fn standard(
        &self,
        regs: &mut Registers,
        opcode: u8,
        input: &mut Reader,
    ) -> Result<Emit, AskGimli> {
        use gimli::Reader as _;
        match gimli::DwLns(opcode) {
            gimli::DW_LNS_copy => return Ok(Emit::Row),
            gimli::DW_LNS_advance_pc => {
                let by = input.read_uleb128()?;
                self.advance_operations(regs, by)?;
            }
            gimli::DW_LNS_advance_line => regs.advance_line(input.read_sleb128()?),
            gimli::DW_LNS_set_file => regs.file = input.read_uleb128()?,
            gimli::DW_LNS_set_column | gimli::DW_LNS_set_isa => {
                input.read_uleb128()?;
            }
            gimli::DW_LNS_negate_stmt
            | gimli::DW_LNS_set_basic_block
            | gimli::DW_LNS_set_prologue_end
            | gimli::DW_LNS_set_epilogue_begin => {}
            gimli::DW_LNS_const_add_pc => {
                let by = u64::from((255 - self.opcode_base) / self.line_range);
                self.advance_operations(regs, by)?;
            }
            gimli::DW_LNS_fixed_advance_pc => {
                let by = input.read_u16()?;
                self.advance_address(regs, u64::from(by))?;
            }
            _ => self.skip_operands(opcode, input)?,
        }
        Ok(Emit::Nothing)
    }

    /// An opcode this version does not define: skips the operands the header counts.
    #[cold]
    fn skip_operands(&self, opcode: u8, input: &mut Reader) -> Result<(), AskGimli> {
        use gimli::Reader as _;
        let mut lengths = *self.header.standard_opcode_lengths();
        lengths.skip(usize::from(opcode - 1))?;
        for _ in 0..lengths.read_u8()? {
            input.read_uleb128()?;
        }
        Ok(())
    }

    /// Advances the address by `operations` instructions.
    #[inline]
    fn advance_operations(&self, regs: &mut Registers, operations: u64) -> Result<(), AskGimli> {
        self.advance_address(regs, self.min_length.wrapping_mul(operations))
    }

    /// Advances the address by `by` bytes, except in a tombstoned sequence; past the
    /// address size is an error, as in gimli.
    #[inline]
    fn advance_address(&self, regs: &mut Registers, by: u64) -> Result<(), AskGimli> {
        if regs.tombstone {
            return Ok(());
        }
        match regs.address.checked_add(by) {
            Some(a) if a & !self.mask == 0 => regs.address = a,
            _ => return Err(AskGimli),
        }
        Ok(())
    }
}

impl Lines {
    pub(super) fn find_location(&self, probe: u64) -> Option<Location> {
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
    pub(super) fn file(&mut self, unit: UnitRef<'_>, index: u64) -> Option<String> {
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
