#![no_main]
//! `memtrace::fuzzing::elf_symbols_and_dwarf` on each input (see docs/design.md "Fuzzing").
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| memtrace::fuzzing::elf_symbols_and_dwarf(data));
