#![no_main]
//! `memtrace::fuzzing::report_json` on each input (see docs/design.md "Fuzzing").
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| memtrace::fuzzing::report_json(data));
