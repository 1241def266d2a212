//! The BPF object and its maps: loading it, sizing and reading the maps
//! (batched where the kernel allows), the block table, the unwind tables
//! uploaded for the walker, the counters and sites collected from them, and
//! the log of code the target unmapped.
pub mod batch;
pub mod blocks;
pub mod btf_facts;
pub mod collect;
pub mod mappings;
pub mod maps;
pub mod multi;
pub mod object;
pub mod resources;
pub mod sampling;
pub mod tables;
pub mod threads;
pub mod unmaps;
pub mod uprobe_offsets;
