#![no_main]
//! `memtrace::fuzzing::eh_frame` on each input (see docs/design.md "Fuzzing").
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| memtrace::fuzzing::eh_frame(data));
