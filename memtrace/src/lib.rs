//! memtrace's userspace side. Each folder is one stage of the pipeline, in the
//! order data flows; a stage imports only the stages listed before it (and the
//! leaf utilities `units`, `knobs`, `escape` and `steps`). See docs/design.md.
//!
//! - [`process`]: /proc readers and one snapshot of the target's modules.
//! - [`unwind`]: `.eh_frame` compiled to unwind rows; the userspace model of the walker.
//! - [`symbolize`]: ELF/DWARF symbolization, debug-info search, demangling.
//! - [`kernel`]: the BPF object and its maps: loading, reading, uploading tables.
//! - [`attach`]: allocator discovery, probe placement, result sites, links.
//! - [`analyze`]: history, verdicts, ages, sampling estimates.
//! - [`report`]: the report model and its writers (text, JSON), and diff.
//! - [`session`]: one tracing run: setup → watch → finish.
//! - [`cmd`]: the command line and the entry of each command.
//!
//! Outside the pipeline, `fuzzing` gives the fuzz targets (`fuzz/`) one entry per parser.
mod analyze;
mod attach;
pub mod cmd;
mod escape;
/// Entry points of the fuzz targets (`fuzz/`, `cargo xtask fuzz`); not an interface.
#[doc(hidden)]
pub mod fuzzing;
mod kernel;
mod knobs;
#[cfg(test)]
mod layers;
mod process;
mod report;
mod session;
mod steps;
mod symbolize;
#[cfg(test)]
mod testutil;
mod units;
mod unwind;
