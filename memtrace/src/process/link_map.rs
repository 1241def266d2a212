//! The order in which the dynamic linker searches the target's modules for a
//! symbol: its link map, read from the target's memory.
//!
//! Symbol lookup walks the global scope in load order: the executable, the
//! `LD_PRELOAD`ed libraries, then the executable's needed libraries breadth
//! first, then what those need. That is the order of the loader's list of
//! loaded objects (`struct link_map`, reached through `r_debug`, whose address
//! the loader writes into the executable's `DT_DEBUG` entry). Which module's
//! `malloc` or `operator new` a process calls is decided there; the order of
//! /proc/PID/maps (by address) says nothing about it.
use std::path::Path;

use object::{Object, ObjectSegment, elf, read::elf::ProgramHeader};

use super::maps::MapEntry;

/// Most objects followed in the list: a bound against a corrupt or hostile
/// list (a cycle).
const MAX_OBJECTS: usize = 4096;

/// Offsets in glibc's `struct r_debug` and `struct link_map` (x86-64): the
/// public part both structs start with (`<link.h>`).
const R_DEBUG_MAP: u64 = 8;
const LINK_MAP_LD: u64 = 16;
const LINK_MAP_NEXT: u64 = 24;

/// `.dynamic` tags (`<elf.h>`).
const DT_NULL: u64 = 0;
const DT_DEBUG: u64 = 21;

/// Most `.dynamic` entries read looking for `DT_DEBUG`.
const MAX_DYNAMIC: u64 = 1024;

/// The target's modules in the order symbol lookup searches them (their
/// paths as /proc/PID/maps names them), or None if the link map cannot be
/// read (a static executable has none; a process may hide or corrupt it).
/// `exe_data` is the executable's ELF file, `maps` the target's mappings.
pub fn lookup_order(
    pid: u32,
    exe_path: &str,
    exe_data: &[u8],
    maps: &[MapEntry],
) -> Option<Vec<String>> {
    let mem = super::mem::TargetMem::open(pid).ok()?;
    let read_word = |addr: u64| {
        let mut b = [0u8; 8];
        mem.read_exact_at(&mut b, addr).ok()?;
        Some(u64::from_ne_bytes(b))
    };
    let dynamic = exe_dynamic(exe_path, exe_data, maps)?;
    let r_debug = find_debug(dynamic, &read_word)?;
    let lds = walk(read_word(r_debug + R_DEBUG_MAP)?, &read_word);
    let order = paths_of(&lds, maps);
    (!order.is_empty()).then_some(order)
}

/// Where the executable's `.dynamic` is in the target: its `PT_DYNAMIC`
/// address plus the executable's load bias.
fn exe_dynamic(exe_path: &str, data: &[u8], maps: &[MapEntry]) -> Option<u64> {
    let file = object::read::elf::ElfFile64::<object::Endianness>::parse(data).ok()?;
    let endian = file.endian();
    let dynamic = file
        .elf_program_headers()
        .iter()
        .find(|ph| ph.p_type(endian) == elf::PT_DYNAMIC)?
        .p_vaddr(endian);
    let first_vaddr = file.segments().map(|s| s.address()).min()? & !0xfff;
    let start = maps
        .iter()
        .filter(|m| m.path.as_deref() == Some(exe_path) && m.offset == 0)
        .map(|m| m.start)
        .min()?;
    Some(start.wrapping_sub(first_vaddr).wrapping_add(dynamic))
}

/// The `r_debug` address the loader wrote into the `DT_DEBUG` entry of the
/// `.dynamic` at `dynamic`; None if there is none or it is still 0.
fn find_debug(dynamic: u64, read_word: &impl Fn(u64) -> Option<u64>) -> Option<u64> {
    for i in 0..MAX_DYNAMIC {
        let at = dynamic + i * 16;
        match read_word(at)? {
            DT_NULL => return None,
            DT_DEBUG => {
                return read_word(at + 8).filter(|&v| v != 0);
            }
            _ => {}
        }
    }
    None
}

/// The `l_ld` (address of the object's `.dynamic`) of every object in the
/// list starting at `first`, in list order.
fn walk(first: u64, read_word: &impl Fn(u64) -> Option<u64>) -> Vec<u64> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut at = first;
    while at != 0 && out.len() < MAX_OBJECTS && seen.insert(at) {
        let Some(ld) = read_word(at + LINK_MAP_LD) else {
            break;
        };
        out.push(ld);
        at = read_word(at + LINK_MAP_NEXT).unwrap_or(0);
    }
    out
}

/// The file each `.dynamic` address is mapped from, once each, in order;
/// objects that are no file (the vDSO) are left out.
fn paths_of(lds: &[u64], maps: &[MapEntry]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for &ld in lds {
        let Some(path) = maps
            .iter()
            .find(|m| ld >= m.start && ld < m.end && m.is_file_backed())
            .and_then(|m| m.path.clone())
        else {
            continue;
        };
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// Whether `path` names the C library (searched last when the link map
/// cannot be read: every library depends on it).
pub fn is_libc(path: &str) -> bool {
    let base = Path::new(path)
        .file_name()
        .and_then(|b| b.to_str())
        .unwrap_or(path);
    base.starts_with("libc.so") || (base.starts_with("libc-") && base.ends_with(".so"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::maps::parse_maps;

    #[test]
    fn walks_the_list_in_order_and_names_each_file_once() {
        let maps = parse_maps(
            "555500000000-555500001000 r--p 00000000 08:01 10 /usr/bin/app\n\
             555500003000-555500004000 rw-p 00002000 08:01 10 /usr/bin/app\n\
             7f0000000000-7f0000100000 r-xp 00028000 08:01 11 /usr/lib/libc.so.6\n\
             7f0000100000-7f0000101000 rw-p 00128000 08:01 11 /usr/lib/libc.so.6\n\
             7f0000200000-7f0000300000 r-xp 00010000 08:01 12 /usr/lib/libjemalloc.so.2\n\
             7f0000300000-7f0000301000 rw-p 00110000 08:01 12 /usr/lib/libjemalloc.so.2\n\
             7fff00000000-7fff00002000 r-xp 00000000 00:00 0 [vdso]\n",
        )
        .unwrap();
        // exe -> vdso -> jemalloc -> libc, as a map of address -> word.
        let mem: std::collections::HashMap<u64, u64> = [
            (0x1000 + 16, 0x5555_0000_3100),
            (0x1000 + 24, 0x2000),
            (0x2000 + 16, 0x7fff_0000_1000),
            (0x2000 + 24, 0x3000),
            (0x3000 + 16, 0x7f00_0030_0100),
            (0x3000 + 24, 0x4000),
            (0x4000 + 16, 0x7f00_0010_0100),
            // A cycle back to the second object ends the walk.
            (0x4000 + 24, 0x2000),
        ]
        .into_iter()
        .collect();
        let read = |a: u64| mem.get(&a).copied();
        let lds = walk(0x1000, &read);
        assert_eq!(lds.len(), 4);
        assert_eq!(
            paths_of(&lds, &maps),
            [
                "/usr/bin/app",
                "/usr/lib/libjemalloc.so.2",
                "/usr/lib/libc.so.6"
            ]
        );
        // A list that cannot be read past its start.
        assert_eq!(walk(0x9000, &read), Vec::<u64>::new());
    }

    #[test]
    fn debug_entry_found_in_dynamic() {
        let base = 0x1000u64;
        let mem: std::collections::HashMap<u64, u64> = [
            (base, 1), // DT_NEEDED
            (base + 8, 1),
            (base + 16, DT_DEBUG),
            (base + 24, 0xabc0),
            (base + 32, DT_NULL),
        ]
        .into_iter()
        .collect();
        let read = |a: u64| mem.get(&a).copied();
        assert_eq!(find_debug(base, &read), Some(0xabc0));
        // Not written yet: none.
        let mem2: std::collections::HashMap<u64, u64> =
            [(base, DT_DEBUG), (base + 8, 0)].into_iter().collect();
        assert_eq!(find_debug(base, &|a| mem2.get(&a).copied()), None);
    }

    #[test]
    fn libc_names() {
        assert!(is_libc("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(is_libc("/lib/libc-2.31.so"));
        assert!(!is_libc("/usr/lib/libcrypto.so.3"));
    }

    /// The test process itself: its link map starts with the test binary
    /// and holds libc.
    #[test]
    fn own_link_map() {
        let pid = std::process::id();
        let maps = crate::process::maps::read_maps(pid).unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_str().unwrap();
        let data = std::fs::read(exe).unwrap();
        let order = lookup_order(pid, exe, &data, &maps).expect("our own link map");
        assert_eq!(order[0], exe, "{order:?}");
        assert!(order.iter().any(|p| is_libc(p)), "{order:?}");
    }
}
