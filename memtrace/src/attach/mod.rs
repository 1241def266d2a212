//! Where and how the allocator is probed: finding its functions in the
//! target, placing each probe on an instruction the kernel emulates, planning
//! result sites, and attaching the links.
pub mod allocator;
pub mod entries;
pub mod exits;
pub mod fds;
pub mod images;
pub mod links;
pub mod mappings;
pub mod placement;
pub mod pymalloc;
pub mod resolve;
pub mod threads;
