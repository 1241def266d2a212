//! memtrace's userspace side. The data flows one way:
//! probe (load and attach the BPF programs) → collect (read counters, sites,
//! stacks) → symbolize → report. Everything but `probe`, `session` and `launch`
//! is pure and tested without privileges.
pub mod allocator;
pub mod analyze;
pub mod batch;
pub mod blocks;
pub mod cli;
pub mod collect;
pub mod diff;
pub mod exits;
pub mod launch;
pub mod multi;
pub mod placement;
pub mod preflight;
pub mod probe;
pub mod procmaps;
pub mod procstat;
pub mod report;
pub mod sampling;
pub mod session;
pub mod symbolize;
pub mod symbolize_cmd;
pub mod tables;
#[cfg(test)]
mod testutil;
pub mod units;
pub mod unwind;
