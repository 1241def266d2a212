//! Entry points for the fuzz targets in `fuzz/` (`cargo xtask fuzz`, see docs/design.md
//! "Fuzzing"): one function per parser that reads bytes a traced process controls. Each
//! takes arbitrary bytes and must return without panicking, hanging or allocating without
//! bound; parse errors are fine and ignored. Not part of memtrace's interface.
//!
//! - [`eh_frame`]: an ELF file's `.eh_frame`/`.debug_frame` compiled to unwind rows.
//! - [`elf_symbols_and_dwarf`]: an ELF image's symbol tables and DWARF, through both the
//!   addr2line contexts and the batch paths (own line-table parser and DIE walker).
//! - [`report_json`]: a JSON report as `memtrace diff` reads, compares and renders it.
use object::{Object, ObjectSegment, ObjectSymbol};
use serde_json::Value;

use crate::report::diff::{Snapshot, compare};
use crate::symbolize::ElfModule;
use crate::unwind;

/// Compiles the unwind table of `data` (an ELF file) and checks the properties the BPF
/// walker's binary search relies on.
pub fn eh_frame(data: &[u8]) {
    let Ok(table) = unwind::compile(data) else {
        return;
    };
    let rows = &table.rows;
    assert!(
        rows.windows(2).all(|w| w[0].pc < w[1].pc),
        "unwind rows are not strictly increasing"
    );
    if let Some(last) = rows.last() {
        assert_eq!(
            last.cfa(),
            Ok(memtrace_common::CfaRule::None),
            "the last row is not CfaRule::None"
        );
    }
}

/// Most addresses resolved one at a time (each builds or reuses an addr2line context).
const SINGLE_LOOKUPS: usize = 48;

/// Loads `data` as an in-memory ELF image (no separate debug file is searched) and
/// resolves a spread of addresses: symbol starts and middles, and evenly spaced points of
/// the loadable segments. At least 256 of them, so that the batch takes its per-unit path.
pub fn elf_symbols_and_dwarf(data: &[u8]) {
    let Ok(module) = ElfModule::from_image(data.to_vec()) else {
        return;
    };
    let addrs = addresses(data);
    let step = addrs.len().div_ceil(SINGLE_LOOKUPS).max(1);
    for &a in addrs.iter().step_by(step) {
        let frames = module.resolve(a);
        assert!(!frames.is_empty(), "resolve answers at least one frame");
    }
    let batch = module.resolve_sorted(&addrs);
    assert_eq!(batch.len(), addrs.len(), "one answer per address");
    for off in (0..data.len() as u64).step_by(4096).take(64) {
        let _ = module.vaddr_of(off);
    }
}

/// The sorted, distinct addresses [`elf_symbols_and_dwarf`] resolves.
fn addresses(data: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut spans = Vec::new();
    if let Ok(obj) = object::File::parse(data) {
        for s in obj.symbols().chain(obj.dynamic_symbols()).take(512) {
            let (a, n) = (s.address(), s.size());
            out.extend([a, a.wrapping_add(1), a.wrapping_add(n / 2)]);
        }
        spans.extend(obj.segments().map(|s| (s.address(), s.size())).take(16));
    }
    if spans.is_empty() {
        spans.push((0, 0x10000));
    }
    let per = 256usize.div_ceil(spans.len()) as u64;
    for (start, size) in spans {
        let stride = (size / per).max(1);
        out.extend((0..per).map(|i| start.wrapping_add(i.wrapping_mul(stride))));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Reads `data` as `memtrace diff` reads a report, compares it with itself and with an
/// empty report both ways, and renders each comparison as text and JSON.
pub fn report_json(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(snap) = Snapshot::from_json("fuzz.json", &v) else {
        return;
    };
    let empty = serde_json::json!({"schema": crate::report::SCHEMA, "sites": []});
    let empty = Snapshot::from_json("empty.json", &empty).expect("an empty report reads");
    for (old, new) in [(&snap, &snap), (&empty, &snap), (&snap, &empty)] {
        let d = compare(old, new);
        let _ = d.to_text(10);
        let _ = d.to_json();
    }
}

#[cfg(test)]
mod tests {
    /// The entries take anything; the regression inputs live next to their parsers.
    #[test]
    fn entries_take_any_bytes() {
        let inputs: [&[u8]; 5] = [
            b"",
            b"\x7fELF",
            b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x03\0\x3e\0",
            b"{}",
            br#"{"schema":"memtrace-report/1","sites":[{"frames":[{"function":"f"}]}]}"#,
        ];
        for data in inputs {
            super::eh_frame(data);
            super::elf_symbols_and_dwarf(data);
            super::report_json(data);
        }
    }
}
