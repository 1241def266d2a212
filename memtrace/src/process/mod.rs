//! What memtrace reads of the target through /proc: its mappings, its
//! resource use and open fds by kind, its executable modules held open, the
//! order symbol lookup searches them in, the namespaces it lives in; and the
//! one way any file a target can influence is opened ([`open`]).
pub mod fds;
pub mod link_map;
pub mod mapped;
pub mod maps;
pub mod mem;
pub mod modules;
pub mod mounts;
pub mod namespaces;
pub mod open;
pub mod served;
pub mod stat;
