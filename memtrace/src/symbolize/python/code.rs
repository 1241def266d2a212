//! Python frames to names, files and lines: each code object the BPF side
//! recorded is read from the target's memory once, as soon as its stack is
//! seen, and checked to be the code object the frame ran.
//!
//! Code objects are immutable apart from their bytecode's specialization,
//! which is not read, so no lock of the target is needed. A code object can
//! be freed and its address reused (code made by `exec`, reloaded modules):
//! each frame carries a check of two of its fields taken when it ran, and a
//! code object that does not match it, or is no longer a code object, is
//! never named: it is counted as unresolved.

use std::{collections::HashMap, sync::Arc};

use memtrace_common::{
    PY_COPIED_CODE, PY_COPIED_FILENAME, PY_COPIED_LINETABLE, PY_COPIED_QUALNAME, PY_FRAME_ENTRY,
    PythonCodeCopy, python_code_check,
};

use super::layout::{Interpreter, Lines};
use super::linetable::{CODE_UNIT, addr2line, addr2line_310};
use crate::process::mem::TargetMem;
use crate::symbolize::{Frame, FrameKind};

/// Longest name or file name read; longer ones are cut.
const MAX_STR: u64 = 4096;
/// Largest line table read.
const MAX_LINETABLE: u64 = 1 << 20;

/// What a code object says of itself.
#[derive(Debug)]
struct Code {
    qualname: String,
    filename: String,
    first_line: u32,
    linetable: Vec<u8>,
    /// False when only the start of the line table could be read.
    linetable_whole: bool,
}

/// One recorded Python frame, from its two words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub code: u64,
    /// The instruction's byte offset from the code object's start (3.10:
    /// `f_lasti`, see `Lines::Lasti`).
    pub offset: u32,
    pub check: u32,
    /// C code called into Python at this frame.
    pub entry: bool,
}

/// The Python frames of a stack's words, innermost first.
pub fn raw_frames(words: &[u64]) -> impl Iterator<Item = RawFrame> + '_ {
    words.chunks_exact(2).map(|w| RawFrame {
        code: w[0] & !PY_FRAME_ENTRY,
        offset: w[1] as u32,
        check: (w[1] >> 32) as u32,
        entry: w[0] & PY_FRAME_ENTRY != 0,
    })
}

/// Resolves the target's Python frames; owns its `/proc/PID/mem`.
pub struct PythonResolver {
    interp: Interpreter,
    mem: Option<TargetMem>,
    codes: HashMap<(u64, u32), Option<Arc<Code>>>,
}

impl PythonResolver {
    pub fn new(pid: u32, interp: Interpreter) -> Self {
        // Read from the start: the target may exit before the report.
        let mem = TargetMem::open(pid).ok();
        PythonResolver {
            interp,
            mem,
            codes: HashMap::new(),
        }
    }

    pub fn interpreter(&self) -> &Interpreter {
        &self.interp
    }

    /// Reads the code objects of these frames not read yet.
    pub fn resolve(&mut self, words: &[u64]) {
        for f in raw_frames(words) {
            self.resolve_code(f.code, f.check);
        }
    }

    /// Reads the code object at `code` with this check, unless read.
    pub fn resolve_code(&mut self, code: u64, check: u32) {
        if !self.codes.contains_key(&(code, check)) {
            let read = self.read_code(code, check).map(Arc::new);
            self.codes.insert((code, check), read);
        }
    }

    /// The frames of a stack's Python words, innermost first, and how many
    /// could not be named. Only code objects read by `resolve` are named:
    /// reading one later could find another code object at its address.
    pub fn frames(&self, words: &[u64]) -> (Vec<Frame>, u64) {
        let mut unresolved = 0;
        let frames = raw_frames(words)
            .map(|f| {
                let code = self.codes.get(&(f.code, f.check)).cloned().flatten();
                if code.is_none() {
                    unresolved += 1;
                }
                self.frame(f, code.as_deref())
            })
            .collect();
        (frames, unresolved)
    }

    /// Takes a copy the BPF side made of a code object when it first ran:
    /// names and lines come from it, whatever became of the object since.
    pub fn add_copy(&mut self, copy: &PythonCodeCopy) {
        let key = (copy.code, copy.check);
        if matches!(self.codes.get(&key), Some(Some(_))) {
            return;
        }
        let mut regions: Vec<(u64, &[u8])> = Vec::with_capacity(4);
        let parts = [
            (PY_COPIED_CODE, copy.code, &copy.code_bytes[..]),
            (PY_COPIED_QUALNAME, copy.qualname, &copy.qualname_bytes[..]),
            (PY_COPIED_FILENAME, copy.filename, &copy.filename_bytes[..]),
            (
                PY_COPIED_LINETABLE,
                copy.linetable,
                &copy.linetable_bytes[..],
            ),
        ];
        for (bit, addr, bytes) in parts {
            if copy.copied & bit != 0 {
                regions.push((addr, bytes));
            }
        }
        let src = Source {
            regions: &regions,
            mem: self.mem.as_ref(),
        };
        let code = read_code(&self.interp, &src, copy.code, copy.check).map(Arc::new);
        self.codes.insert(key, code);
    }

    fn frame(&self, f: RawFrame, code: Option<&Code>) -> Frame {
        let line = code.and_then(|c| {
            let found = match self.interp.code.lines {
                Lines::Offset { code_adaptive } => {
                    // An instruction before the bytecode: a frame still starting.
                    let Some(at) = u64::from(f.offset).checked_sub(code_adaptive) else {
                        return Some(c.first_line);
                    };
                    addr2line(&c.linetable, c.first_line, at)
                }
                Lines::Lasti => {
                    // -1: no instruction run yet.
                    let Ok(lasti) = u64::try_from(f.offset as i32) else {
                        return Some(c.first_line);
                    };
                    addr2line_310(&c.linetable, c.first_line, lasti * CODE_UNIT)
                }
            };
            match found {
                Some(line) => Some(line),
                // Past the part of the table that could be read: unknown.
                None if !c.linetable_whole => None,
                // No location (code the compiler made up): the function's line.
                None => Some(c.first_line),
            }
        });
        Frame {
            address: f.code,
            module: None,
            function: code.map(|c| c.qualname.clone()),
            file: code.map(|c| c.filename.clone()),
            line,
            inlined: false,
            kind: FrameKind::Python,
            unresolved: None,
        }
    }

    /// The code object at `addr` in the target's memory, if it is one and
    /// matches the frame's check.
    fn read_code(&self, addr: u64, check: u32) -> Option<Code> {
        let src = Source {
            regions: &[],
            mem: self.mem.as_ref(),
        };
        read_code(&self.interp, &src, addr, check)
    }
}

/// Where a code object's bytes are read from: the parts of a copy, then the
/// target's memory.
struct Source<'a> {
    regions: &'a [(u64, &'a [u8])],
    mem: Option<&'a TargetMem>,
}

impl Source<'_> {
    /// `len` bytes at `addr`: from a copy (taken when the code ran), else
    /// from the target's memory, else as many of them as a copy holds (at
    /// least `min`).
    fn read_upto(&self, addr: u64, len: u64, min: u64) -> Option<Vec<u8>> {
        let in_copy = |min: u64| {
            self.regions.iter().find_map(|&(start, bytes)| {
                let from = addr.checked_sub(start)? as usize;
                let have = bytes.len().checked_sub(from)? as u64;
                (have >= min).then(|| bytes[from..from + have.min(len) as usize].to_vec())
            })
        };
        if let Some(whole) = in_copy(len) {
            return Some(whole);
        }
        if let Some(mem) = self.mem {
            let mut buf = vec![0u8; len as usize];
            if mem.read_exact_at(&mut buf, addr).is_ok() {
                return Some(buf);
            }
        }
        in_copy(min)
    }

    fn read(&self, addr: u64, len: u64) -> Option<Vec<u8>> {
        self.read_upto(addr, len, len)
    }
}

fn u64_at(buf: &[u8], off: u64) -> Option<u64> {
    let off = off as usize;
    Some(u64::from_le_bytes(buf.get(off..off + 8)?.try_into().ok()?))
}

/// The code object at `addr`, if it is one and matches the frame's check.
fn read_code(interp: &Interpreter, src: &Source, addr: u64, check: u32) -> Option<Code> {
    let l = &interp.code;
    let head = src.read(addr, l.head)?;
    if u64_at(&head, 8)? != interp.code_type {
        return None;
    }
    let checked = u64_at(&head, l.check)?;
    if python_code_check(checked) != check {
        return None;
    }
    let (linetable, linetable_whole) = read_bytes(src, u64_at(&head, l.linetable)?)?;
    Some(Code {
        qualname: read_str(interp, src, u64_at(&head, l.qualname)?)?,
        filename: read_str(interp, src, u64_at(&head, l.filename)?)?,
        first_line: (checked >> 32) as u32,
        linetable,
        linetable_whole,
    })
}

/// A `str` object's text (compact strings: every code object's names).
fn read_str(interp: &Interpreter, src: &Source, addr: u64) -> Option<String> {
    let l = &interp.code;
    let head = src.read(addr, l.ascii_data)?;
    let len = u64_at(&head, 16)?.min(MAX_STR);
    // PyASCIIObject.state: interned (2 bits), kind (3), compact, ascii.
    let state = u32::from_le_bytes(head.get(32..36)?.try_into().ok()?);
    let (kind, compact, ascii) = ((state >> 2) & 7, state >> 5 & 1, state >> 6 & 1);
    if compact == 0 {
        return None;
    }
    if ascii == 1 {
        let bytes = src.read(addr + l.ascii_data, len)?;
        return Some(String::from_utf8_lossy(&bytes).into_owned());
    }
    let data = src.read(addr + l.compact_data, len * u64::from(kind))?;
    match kind {
        1 => Some(data.iter().map(|&b| char::from(b)).collect()),
        2 => char::decode_utf16(
            data.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        )
        .map(|c| c.ok())
        .collect(),
        4 => data
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => None,
    }
}

/// A `bytes` object's contents, and whether they are whole (a copy may hold
/// only their start).
fn read_bytes(src: &Source, addr: u64) -> Option<(Vec<u8>, bool)> {
    let head = src.read(addr, 32)?;
    let len = u64_at(&head, 16)?;
    if len > MAX_LINETABLE {
        return None;
    }
    let data = src.read_upto(addr + 32, len, 0)?;
    let whole = data.len() as u64 == len;
    Some((data, whole))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_frames_from_words() {
        let words = [
            0x7f00_0000_1000 | PY_FRAME_ENTRY,
            0xdead_beef_0000_00c4,
            0x7f00_0000_2000,
            0x10,
        ];
        let f: Vec<_> = raw_frames(&words).collect();
        assert_eq!(
            f,
            [
                RawFrame {
                    code: 0x7f00_0000_1000,
                    offset: 0xc4,
                    check: 0xdead_beef,
                    entry: true
                },
                RawFrame {
                    code: 0x7f00_0000_2000,
                    offset: 0x10,
                    check: 0,
                    entry: false
                },
            ]
        );
    }
}
