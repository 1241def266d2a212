//! Finding a CPython interpreter in the target and the layout of its
//! structures, from its own binary: no debug info needed.
//!
//! The interpreter is the module that exports `_PyRuntime` (the executable
//! of a static build such as Debian's `/usr/bin/python3.11`, else
//! `libpython3.x.so`); its version is the exported `Py_Version` (3.11+), or
//! 3.10 for a module that exports 3.10's new `PyIter_Send` but not
//! `Py_Version`.
//! The offsets are CPython's `offsetof`s for x86-64 release builds, per
//! minor version (`docs/python.md` says how they were checked).

use memtrace_common::{
    PY_LAYOUT_EVERY_ENTRY, PY_LAYOUT_LASTI, PY_LAYOUT_TID_PTHREAD, PythonLayout,
};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

use crate::process::modules::{MappedModule, ProcessModules};

/// Where the fields of a code object and of strings are (for userspace's
/// resolver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub firstlineno: u64,
    pub filename: u64,
    pub qualname: u64,
    pub linetable: u64,
    /// Bytes of the code object read: every field above is in them.
    pub head: u64,
    /// What a frame's recorded offset is, and the line table's format.
    pub lines: Lines,
    /// The two 4-byte fields of the check (see `python_code_check`).
    pub check: u64,
    /// `sizeof(PyASCIIObject)`: an ASCII string's data.
    pub ascii_data: u64,
    /// `sizeof(PyCompactUnicodeObject)`: a compact non-ASCII string's data.
    pub compact_data: u64,
}

/// How a frame's instruction is recorded and its line found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lines {
    /// 3.11+: the instruction's byte offset from the code object, whose
    /// bytecode (`co_code_adaptive`) starts at this offset; the
    /// `Objects/locations.md` line table.
    Offset { code_adaptive: u64 },
    /// 3.10: `f_lasti`, the last instruction's index in code units (-1 before
    /// the first); the 3.10 line table (`Objects/lnotab_notes.txt`).
    Lasti,
}

/// The layouts of one minor version: BPF's (addresses still 0) and the code
/// object's.
struct VersionLayout {
    bpf: PythonLayout,
    code: CodeLayout,
}

fn version_layout(minor: u8) -> Option<VersionLayout> {
    const NONE: u32 = u32::MAX;
    let (bpf, code) = match minor {
        // PyFrameObject chains (`f_back`); the thread's id is pthread_self().
        10 => (
            PythonLayout {
                interp_head_off: 32,
                interp_threads_off: 8,
                tstate_next_off: 8,
                tstate_tid_off: 176,
                tstate_frame_off: 24,
                cframe_frame_off: NONE,
                frame_code_off: 32,
                frame_previous_off: 24,
                frame_instr_off: 96,
                frame_owner_off: NONE,
                frame_entry_off: NONE,
                code_check_off: 36,
                flags: PY_LAYOUT_TID_PTHREAD | PY_LAYOUT_LASTI | PY_LAYOUT_EVERY_ENTRY,
                ..Default::default()
            },
            // No co_qualname before 3.11: the name (`co_name`) stands for it.
            CodeLayout {
                firstlineno: 40,
                filename: 104,
                qualname: 112,
                linetable: 120,
                head: 128,
                lines: Lines::Lasti,
                check: 36,
                ascii_data: 48,
                compact_data: 72,
            },
        ),
        11 => (
            PythonLayout {
                interp_head_off: 40,
                interp_threads_off: 16,
                tstate_next_off: 8,
                tstate_tid_off: 160,
                tstate_frame_off: 56,
                cframe_frame_off: 8,
                frame_code_off: 32,
                frame_previous_off: 48,
                frame_instr_off: 56,
                frame_owner_off: NONE,
                frame_entry_off: 68,
                code_check_off: 68,
                ..Default::default()
            },
            CodeLayout {
                firstlineno: 72,
                filename: 112,
                qualname: 128,
                linetable: 136,
                head: 184,
                lines: Lines::Offset { code_adaptive: 184 },
                check: 68,
                ascii_data: 48,
                compact_data: 72,
            },
        ),
        12 | 13 => (
            PythonLayout {
                interp_head_off: if minor == 12 { 40 } else { 632 },
                interp_threads_off: if minor == 12 { 72 } else { 7344 },
                tstate_next_off: 8,
                tstate_tid_off: if minor == 12 { 144 } else { 160 },
                tstate_frame_off: if minor == 12 { 56 } else { 72 },
                cframe_frame_off: if minor == 12 { 0 } else { NONE },
                frame_code_off: 0,
                frame_previous_off: 8,
                frame_instr_off: 56,
                frame_owner_off: 70,
                frame_entry_off: NONE,
                code_check_off: 64,
                ..Default::default()
            },
            CodeLayout {
                firstlineno: 68,
                filename: 112,
                qualname: 128,
                linetable: 136,
                head: if minor == 12 { 192 } else { 200 },
                lines: Lines::Offset {
                    code_adaptive: if minor == 12 { 192 } else { 200 },
                },
                check: 64,
                ascii_data: 40,
                compact_data: 56,
            },
        ),
        _ => return None,
    };
    Some(VersionLayout { bpf, code })
}

/// `layout` with threads matched by `pthread_self()` (`PyThreadState.thread_id`)
/// rather than by kernel thread id (`native_thread_id`), for an interpreter
/// in another pid namespace: it records the tid its own namespace gives,
/// which the BPF side, seeing the host's, never matches. `thread_id` is the
/// field just before `native_thread_id` in 3.11 to 3.13 (3.10 keys by it
/// already).
pub fn keyed_by_pthread(layout: PythonLayout) -> PythonLayout {
    if layout.flags & PY_LAYOUT_TID_PTHREAD != 0 {
        return layout;
    }
    PythonLayout {
        tstate_tid_off: layout.tstate_tid_off - 8,
        flags: layout.flags | PY_LAYOUT_TID_PTHREAD,
        ..layout
    }
}

/// Whether a CPython started with this environment (`/proc/PID/environ`:
/// `KEY=value` strings, each ending in a NUL) sends every allocation to
/// `malloc`: `PYTHONMALLOC=malloc` or `malloc_debug`. Otherwise objects of
/// 512 bytes or less come from pymalloc (or 3.13's mimalloc), which is not
/// traced. (An embedder can choose its allocator in code, which this cannot
/// see: such a program is taken to use pymalloc.)
pub fn allocates_with_malloc(environ: &[u8]) -> bool {
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"PYTHONMALLOC="))
        .is_some_and(|v| v == b"malloc" || v == b"malloc_debug")
}

/// Whether the environment turns on CPython's debug hooks on its allocators
/// (`PYTHONMALLOC=debug`, `pymalloc_debug`, ..., or `PYTHONDEVMODE`): the
/// raw allocator is then wrapped too, and a block pymalloc hands to malloc
/// reaches it through the hooks' code, not from pymalloc's.
pub fn has_debug_hooks(environ: &[u8]) -> bool {
    // getenv() finds the first of each.
    let first = |name: &[u8]| {
        environ
            .split(|&b| b == 0)
            .find_map(|kv| kv.strip_prefix(name))
    };
    first(b"PYTHONMALLOC=").is_some_and(|v| v.ends_with(b"debug"))
        || first(b"PYTHONDEVMODE=").is_some_and(|v| !v.is_empty())
}

/// The functions of pymalloc, which memtrace does not trace, as the report
/// lists them among the untraced entry points.
pub const PYMALLOC_ENTRY_POINTS: &[&str] = &["PyObject_Malloc", "PyMem_Malloc"];

/// A CPython interpreter found in the target.
#[derive(Clone, Debug)]
pub struct Interpreter {
    /// The module that holds it (the executable or libpython).
    pub module: String,
    /// `3.12.1`.
    pub version: String,
    /// What the BPF side needs, addresses set.
    pub bpf: PythonLayout,
    pub code: CodeLayout,
    /// `PyCode_Type` in the target: every code object's type.
    pub code_type: u64,
}

/// What came of looking for an interpreter.
#[derive(Debug)]
pub enum Found {
    /// No module exports `_PyRuntime`.
    None,
    /// One does, of a version memtrace cannot read (the message says why).
    Unsupported {
        module: String,
        why: String,
    },
    Python(Box<Interpreter>),
}

/// The interpreter among the target's modules, if any.
pub fn find(modules: &ProcessModules) -> Found {
    for m in modules.modules() {
        let Some(file) = &m.file else {
            continue;
        };
        // SAFETY: read-only private mapping of a file the target maps; a concurrent
        // truncation would crash the target first.
        let Ok(data) = (unsafe { memmap2::Mmap::map(&**file) }) else {
            continue;
        };
        let Ok(elf) = object::File::parse(&*data) else {
            continue;
        };
        if let Some(found) = interpreter_in(m, &elf) {
            return found;
        }
    }
    Found::None
}

/// The interpreter in one module, if it exports `_PyRuntime`.
fn interpreter_in(m: &MappedModule, elf: &object::File<'_>) -> Option<Found> {
    let sym = |name: &str| {
        elf.dynamic_symbols()
            .find(|s| !s.is_undefined() && s.name() == Ok(name))
            .map(|s| (s.address(), s.size()))
    };
    let (runtime, _) = sym("_PyRuntime")?;
    let unsupported = |why: String| {
        Some(Found::Unsupported {
            module: m.path.clone(),
            why,
        })
    };
    let (major, minor, version) = match sym("Py_Version").and_then(|(a, _)| read_u32(elf, a)) {
        Some(hex) => {
            let (major, minor, micro) = ((hex >> 24) as u8, (hex >> 16) as u8, (hex >> 8) as u8);
            (major, minor, format!("{major}.{minor}.{micro}"))
        }
        None if sym("PyIter_Send").is_some() => (3, 10, version_310(elf)),
        None => return unsupported("no Py_Version (CPython before 3.10)".into()),
    };
    let Some(layout) = (major == 3).then(|| version_layout(minor)).flatten() else {
        return unsupported(format!("CPython {version}: memtrace reads 3.10 to 3.13"));
    };
    let needed = ["_PyEval_EvalFrameDefault", "PyCode_Type", "_Py_NoneStruct"];
    let [Some(eval), Some(code_type), Some(none)] = needed.map(sym) else {
        return unsupported(format!("CPython {version} without the symbols {needed:?}"));
    };
    let Some(bias) = load_bias(m, elf) else {
        return unsupported(format!("CPython {version}: its mapping matches no segment"));
    };
    let code = layout.code;
    let bpf = PythonLayout {
        enabled: 1,
        code_qualname_off: code.qualname as u32,
        code_filename_off: code.filename as u32,
        code_linetable_off: code.linetable as u32,
        runtime: runtime.wrapping_add(bias),
        eval_start: eval.0.wrapping_add(bias),
        eval_end: (eval.0 + eval.1.max(1)).wrapping_add(bias),
        none: none.0.wrapping_add(bias),
        ..layout.bpf
    };
    Some(Found::Python(Box::new(Interpreter {
        module: m.path.clone(),
        version,
        bpf,
        code: layout.code,
        code_type: code_type.0.wrapping_add(bias),
    })))
}

/// 3.10's full version: the `PY_VERSION` string in the file ("3.10.13";
/// the linker may have merged it into the end of a longer string, such as
/// the install prefix), if one such micro version is there; else "3.10".
fn version_310(elf: &object::File<'_>) -> String {
    let mut micros = std::collections::BTreeSet::new();
    for section in elf.sections() {
        if section.kind() != object::SectionKind::ReadOnlyString
            && section.kind() != object::SectionKind::ReadOnlyData
        {
            continue;
        }
        let Ok(data) = section.data() else { continue };
        for s in data.split(|&b| b == 0) {
            let Some(at) = s.windows(5).rposition(|w| w == b"3.10.") else {
                continue;
            };
            let tail = &s[at + 5..];
            let boundary = at == 0 || matches!(s[at - 1], b'/' | b'-' | b' ');
            if boundary && !tail.is_empty() && tail.iter().all(u8::is_ascii_digit) {
                micros.insert(String::from_utf8_lossy(tail).into_owned());
            }
        }
    }
    match (micros.len(), micros.first()) {
        (1, Some(micro)) => format!("3.10.{micro}"),
        _ => "3.10".into(),
    }
}

/// What to add to the file's addresses to get the target's: from the
/// segment that holds the mapping's file offset.
fn load_bias(m: &MappedModule, elf: &object::File<'_>) -> Option<u64> {
    elf.segments().find_map(|s| {
        let (off, size) = s.file_range();
        (off <= m.offset && m.offset < off + size)
            .then(|| m.start.wrapping_sub(s.address() + (m.offset - off)))
    })
}

/// The 4 bytes at `vaddr` of the file.
fn read_u32(elf: &object::File<'_>, vaddr: u64) -> Option<u32> {
    elf.segments().find_map(|s| {
        let bytes = s.data_range(vaddr, 4).ok()??;
        Some(u32::from_le_bytes(bytes.try_into().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pymalloc_unless_told_malloc() {
        assert!(!allocates_with_malloc(b""));
        assert!(!allocates_with_malloc(
            b"HOME=/root\0PYTHONMALLOC=pymalloc\0"
        ));
        assert!(!allocates_with_malloc(b"PYTHONMALLOC=mimalloc\0"));
        assert!(!allocates_with_malloc(b"XPYTHONMALLOC=malloc\0"));
        assert!(allocates_with_malloc(b"A=1\0PYTHONMALLOC=malloc\0B=2\0"));
        assert!(allocates_with_malloc(b"PYTHONMALLOC=malloc_debug"));
        // getenv(), which CPython reads it with, finds the first.
        assert!(!allocates_with_malloc(
            b"PYTHONMALLOC=pymalloc\0PYTHONMALLOC=malloc\0"
        ));
    }

    #[test]
    fn debug_hooks_from_the_environment() {
        assert!(!has_debug_hooks(b"PYTHONMALLOC=pymalloc\0"));
        assert!(!has_debug_hooks(b"PYTHONMALLOC=malloc\0PYTHONDEVMODE=\0"));
        assert!(has_debug_hooks(b"A=1\0PYTHONMALLOC=pymalloc_debug\0"));
        assert!(has_debug_hooks(b"PYTHONMALLOC=debug"));
        assert!(has_debug_hooks(b"PYTHONDEVMODE=1\0"));
        assert!(!has_debug_hooks(
            b"PYTHONMALLOC=pymalloc\0PYTHONMALLOC=debug\0"
        ));
    }

    #[test]
    fn layouts_of_the_versions_read() {
        assert!(version_layout(9).is_none());
        assert!(version_layout(14).is_none());
        for minor in 10..=13 {
            let l = version_layout(minor).unwrap();
            // The BPF side reads each frame's fields from PY_FRAME_READ bytes,
            // a 3.11+ frame's from PY_FRAME_READ_MIN if need be.
            let read = if minor >= 11 {
                memtrace_common::PY_FRAME_READ_MIN
            } else {
                memtrace_common::PY_FRAME_READ
            };
            for off in [
                l.bpf.frame_code_off,
                l.bpf.frame_previous_off,
                l.bpf.frame_instr_off,
            ] {
                assert!(off as usize + 8 <= read);
            }
            for off in [l.bpf.frame_owner_off, l.bpf.frame_entry_off] {
                assert!(off == u32::MAX || (off as usize) < read);
            }
            // The check covers co_firstlineno (and the field before it).
            assert_eq!(l.code.check + 4, l.code.firstlineno);
            // The BPF side copies the code object's first PY_COPY_CODE bytes:
            // every field read, and the pointers it follows, are in them.
            for off in [
                l.code.qualname,
                l.code.filename,
                l.code.linetable,
                l.code.check,
            ] {
                assert!(off as usize + 8 <= memtrace_common::PY_COPY_CODE);
            }
            assert!(l.code.head as usize <= memtrace_common::PY_COPY_CODE);
            for off in [l.code.qualname, l.code.filename, l.code.linetable] {
                assert!(off + 8 <= l.code.head);
            }
            if let Lines::Offset { code_adaptive } = l.code.lines {
                assert_eq!(code_adaptive, l.code.head);
            }
            assert_eq!(l.bpf.code_check_off as u64, l.code.check);
        }
    }
}
