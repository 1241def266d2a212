//! What memtrace reads of the target through /proc: its mappings, its
//! resource use, and its executable modules held open.
pub mod maps;
pub mod modules;
pub mod stat;
