//! Python frames: the interpreter in the target and its layout
//! ([`layout`]), line tables ([`linetable`]), and the code objects the BPF
//! side recorded, read from the target's memory ([`code`]).
pub mod code;
pub mod layout;
pub mod linetable;

pub use code::PythonResolver;
pub use layout::{
    Found, PYMALLOC_ENTRY_POINTS, allocates_with_malloc, find, has_debug_hooks, keyed_by_pthread,
};
