//! Finding the allocator a process really uses, and where to probe it.
//!
//! Symbol lookup order decides which `malloc` a process calls: the executable
//! first (a static binary, or one that defines its own allocator), then the
//! libraries in load order, where an interposed allocator (LD_PRELOAD, or a
//! program linked against jemalloc/tcmalloc/mimalloc) always comes before libc,
//! which every library depends on. Probing glibc in a process whose allocations
//! all go to jemalloc would report a clean, empty result: we pick the first
//! module in that order that defines both `malloc` and `free`.
use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
};

use memtrace_common::AllocKind;
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};
use thiserror::Error;

use crate::{
    placement::{self, Placement, choose_probe_site, probe_args},
    procmaps::MapEntry,
};

/// What a probe at an entry point does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Alloc(AllocKind),
    Free,
}

/// Allocator entry points memtrace probes, by exported name.
pub const ENTRY_POINTS: &[(&str, Role)] = &[
    ("malloc", Role::Alloc(AllocKind::Malloc)),
    ("calloc", Role::Alloc(AllocKind::Calloc)),
    ("realloc", Role::Alloc(AllocKind::Realloc)),
    ("reallocarray", Role::Alloc(AllocKind::ReallocArray)),
    ("posix_memalign", Role::Alloc(AllocKind::PosixMemalign)),
    ("aligned_alloc", Role::Alloc(AllocKind::Memalign)),
    ("memalign", Role::Alloc(AllocKind::Memalign)),
    ("valloc", Role::Alloc(AllocKind::Valloc)),
    ("pvalloc", Role::Alloc(AllocKind::Pvalloc)),
    ("free", Role::Free),
    ("cfree", Role::Free),
];

/// One probe: several exported names can share an address (glibc's memalign and
/// aligned_alloc are one function). Two uprobes at one address would both fire
/// and count the call twice, so there is one point per address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachPoint {
    pub role: Role,
    pub names: Vec<&'static str>,
    /// Virtual address of the function in the ELF file.
    pub vaddr: u64,
    /// Offset of the function's first instruction in the file.
    pub file_offset: u64,
    /// Size of the function's code (0 when the symbol table does not say).
    pub size: u64,
    /// The function only ever leaves by returning (`placement::never_jumps_out`).
    pub never_jumps_out: bool,
    /// Offset in the file of the instruction the probes are attached to: the
    /// first one the kernel emulates rather than single-steps, when nothing
    /// before it can change what the probes see (see `placement`); else
    /// `file_offset`.
    pub probe_offset: u64,
    /// That instruction's mnemonic (`je`, `push`, ...), for logs and reports.
    pub probe_insn: String,
}

impl AttachPoint {
    /// How far into the function the probes are: `free+3`.
    pub fn probe_delta(&self) -> u64 {
        self.probe_offset - self.file_offset
    }

    /// The probe site as `name+delta (insn)`, e.g. `free+0x3 (je)`.
    pub fn probe_site(&self) -> String {
        format!(
            "{}+{:#x} ({})",
            self.names.first().copied().unwrap_or("?"),
            self.probe_delta(),
            self.probe_insn
        )
    }
}

#[derive(Debug)]
pub struct Allocator {
    /// The module's path as the target sees it (in /proc/PID/maps).
    pub module: String,
    /// A path through which the kernel can open that very file from here.
    pub open_path: PathBuf,
    pub points: Vec<AttachPoint>,
    /// Start of the module's executable mapping in the target (to notice exec).
    pub text_start: u64,
}

#[derive(Debug, Error)]
pub enum AllocatorError {
    #[error(
        "no allocator found in the target: none of its {modules} executable modules defines both \
         malloc and free{stripped}"
    )]
    NotFound { modules: usize, stripped: String },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Symbols of one ELF file that matter to memtrace.
#[derive(Debug, Default)]
pub struct EntrySymbols {
    pub points: Vec<AttachPoint>,
    pub has_malloc: bool,
    pub has_free: bool,
    /// The file has no symbol table at all (stripped static binary).
    pub no_symbols: bool,
}

/// Finds the allocator entry points defined (not just imported) in an ELF image.
pub fn entry_symbols(data: &[u8]) -> Result<EntrySymbols, object::Error> {
    let file = object::File::parse(data)?;
    let mut by_addr: BTreeMap<u64, AttachPoint> = BTreeMap::new();
    let mut out = EntrySymbols::default();
    let mut seen_any = false;
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        seen_any = true;
        if sym.is_undefined() || sym.kind() != SymbolKind::Text || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        let Some(&(name, role)) = ENTRY_POINTS.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let vaddr = sym.address();
        let Some(file_offset) = vaddr_to_file_offset(&file, vaddr) else {
            continue;
        };
        match by_addr.get_mut(&vaddr) {
            Some(p) => {
                if !p.names.contains(&name) {
                    p.names.push(name);
                }
                if p.role != role {
                    log::warn!(
                        "{name} shares its address with {:?} but does something else; probing it as {:?}",
                        p.names,
                        p.role
                    );
                }
            }
            None => {
                let site = probe_site(data, file_offset, sym.size(), role);
                log::debug!(
                    "{name}: probe site +{:#x} ({}, {:?}): {}",
                    site.delta,
                    site.mnemonic,
                    site.emulated,
                    site.reason
                );
                by_addr.insert(
                    vaddr,
                    AttachPoint {
                        role,
                        names: vec![name],
                        vaddr,
                        file_offset,
                        size: sym.size(),
                        never_jumps_out: whole_function(data, file_offset, sym.size())
                            .is_some_and(placement::never_jumps_out),
                        probe_offset: file_offset + site.delta,
                        probe_insn: site.mnemonic,
                    },
                );
            }
        }
        match name {
            "malloc" => out.has_malloc = true,
            "free" => out.has_free = true,
            _ => {}
        }
    }
    out.no_symbols = !seen_any;
    out.points = by_addr.into_values().collect();
    Ok(out)
}

/// The code of a function of known size, if `data` holds all of it.
fn whole_function(data: &[u8], file_offset: u64, size: u64) -> Option<&[u8]> {
    let start = usize::try_from(file_offset).ok()?;
    let end = start.checked_add(usize::try_from(size).ok()?)?;
    (size > 0).then(|| data.get(start..end)).flatten()
}

/// Where to probe the function whose code starts at `file_offset` in `data`
/// (`size` bytes, 0 if unknown): see `placement::choose_probe_site`.
fn probe_site(data: &[u8], file_offset: u64, size: u64, role: Role) -> Placement {
    let start = (file_offset as usize).min(data.len());
    let len = if size > 0 {
        (size as usize).min(placement::MAX_BODY_BYTES)
    } else {
        placement::MAX_HEAD_BYTES
    };
    let code = &data[start..start.saturating_add(len).min(data.len())];
    choose_probe_site(code, probe_args(role))
}

/// Maps a virtual address to its offset in the file through the PT_LOAD segment
/// that contains it.
pub fn vaddr_to_file_offset(file: &object::File<'_>, vaddr: u64) -> Option<u64> {
    file.segments().find_map(|seg| {
        let (off, size) = seg.file_range();
        let start = seg.address();
        (vaddr >= start && vaddr < start + size).then(|| vaddr - start + off)
    })
}

/// Executable file-backed modules of a process, in the order symbol lookup
/// would search them for an allocator: the executable, then every other library,
/// then libc last.
pub fn candidate_modules<'a>(maps: &'a [MapEntry], exe: Option<&str>) -> Vec<&'a MapEntry> {
    let mut seen = std::collections::HashSet::new();
    let mut mods: Vec<&MapEntry> = maps
        .iter()
        .filter(|m| m.is_exec() && m.is_file_backed())
        .filter(|m| seen.insert(m.path.clone()))
        .collect();
    let rank = |m: &MapEntry| {
        let path = m.path.as_deref().unwrap_or("");
        if Some(path) == exe {
            0
        } else if is_libc(path) {
            2
        } else {
            1
        }
    };
    mods.sort_by_key(|m| rank(m));
    mods
}

fn is_libc(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.starts_with("libc.so") || (base.starts_with("libc-") && base.ends_with(".so"))
}

/// Path through which this process can open a file mapped by `pid`: via the
/// target's root (containers), or via map_files for a file deleted since.
pub fn open_path(pid: u32, m: &MapEntry) -> PathBuf {
    if m.deleted {
        PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
    } else {
        let p = m.path.as_deref().unwrap_or("");
        Path::new(&format!("/proc/{pid}/root")).join(p.trim_start_matches('/'))
    }
}

/// Where the probed functions' code is in the target's address space. An
/// allocator call made from inside one of them is part of the outer call (glibc's
/// realloc(p, 0) calls free; posix_memalign calls malloc), and the BPF side must
/// not count it again.
/// Where `file_offset` of the allocator's module is mapped in the process.
pub fn vaddr(alloc: &Allocator, maps: &[MapEntry], file_offset: u64) -> Option<u64> {
    let m = maps.iter().find(|m| {
        m.is_exec()
            && m.path.as_deref() == Some(alloc.module.as_str())
            && file_offset >= m.offset
            && file_offset < m.offset + m.len()
    })?;
    Some(m.start + (file_offset - m.offset))
}

pub fn text_ranges(alloc: &Allocator, maps: &[MapEntry]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = alloc
        .points
        .iter()
        .filter(|p| p.size > 0)
        .filter_map(|p| {
            let start = vaddr(alloc, maps, p.file_offset)?;
            Some((start, start + p.size))
        })
        .collect();
    out.sort_unstable();
    out
}

/// Picks the module whose allocator the process uses and its probe points.
pub fn find_allocator(pid: u32, maps: &[MapEntry]) -> Result<Allocator, AllocatorError> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| {
            p.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string()
        });
    let mods = candidate_modules(maps, exe.as_deref());
    let mut stripped = Vec::new();
    for m in &mods {
        let path = open_path(pid, m);
        let file = File::open(&path).map_err(|source| AllocatorError::Io {
            path: path.display().to_string(),
            source,
        })?;
        // SAFETY: read-only private mapping; a concurrent truncation of a mapped
        // library would crash the target before it crashed us.
        let data = match unsafe { memmap2::Mmap::map(&file) } {
            Ok(d) => d,
            Err(e) => {
                log::debug!("cannot map {}: {e}", path.display());
                continue;
            }
        };
        let syms = match entry_symbols(&data) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("{}: not an ELF file memtrace can read: {e}", path.display());
                continue;
            }
        };
        if syms.no_symbols {
            stripped.push(m.path.clone().unwrap_or_default());
        }
        if syms.has_malloc && syms.has_free {
            return Ok(Allocator {
                module: m.path.clone().unwrap_or_default(),
                open_path: path,
                points: syms.points,
                text_start: m.start,
            });
        }
    }
    let stripped = if stripped.is_empty() {
        String::new()
    } else {
        format!(
            " ({} has no symbol table: is it stripped?)",
            stripped.join(", ")
        )
    };
    Err(AllocatorError::NotFound {
        modules: mods.len(),
        stripped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_entry_points_are_deduplicated_by_address() {
        let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").expect("glibc");
        let syms = entry_symbols(&data).unwrap();
        assert!(syms.has_malloc && syms.has_free);
        let names: Vec<_> = syms.points.iter().flat_map(|p| p.names.clone()).collect();
        for n in [
            "malloc",
            "calloc",
            "realloc",
            "reallocarray",
            "free",
            "posix_memalign",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        // glibc: memalign and aligned_alloc are one function, and so are free and cfree.
        let memalign = syms
            .points
            .iter()
            .find(|p| p.names.contains(&"memalign"))
            .unwrap();
        assert!(memalign.names.contains(&"aligned_alloc"), "{memalign:?}");
        let mut addrs: Vec<_> = syms.points.iter().map(|p| p.vaddr).collect();
        addrs.dedup();
        assert_eq!(addrs.len(), syms.points.len());
        // libc's text is mapped at its file offset.
        assert!(syms.points.iter().all(|p| p.file_offset == p.vaddr));
    }

    /// The probe sites chosen in Debian 12's glibc. Each is checked against a
    /// simpler statement of the rules by decoding again; the exact offsets are
    /// those of one glibc build.
    #[test]
    fn glibc_probe_sites() {
        use iced_x86::{Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess};
        const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
        const BUILD_ID: &str = "93ac61ec5a8eb1396f9fbd350e3169a558528a40";
        let data = std::fs::read(LIBC).expect("glibc");
        let syms = entry_symbols(&data).unwrap();
        let mut factory = InstructionInfoFactory::new();
        let mut got = BTreeMap::new();
        for p in &syms.points {
            let delta = p.probe_delta();
            got.insert(p.names[0], delta);
            let code = &data[p.file_offset as usize..][..64];
            let mut dec = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
            let args = placement::probe_args(p.role);
            loop {
                let insn = dec.decode();
                assert!(!insn.is_invalid(), "{}: {insn:?}", p.names[0]);
                let bytes = &code[insn.ip() as usize..][..insn.len()];
                if insn.ip() == delta {
                    // Emulated, or the function's first instruction.
                    let emulated = matches!(bytes[0], 0x50..=0x57 | 0x70..=0x7f | 0xe8 | 0xe9 | 0xeb)
                        || matches!(bytes, [0x41, 0x50..=0x57] | [0x0f, 0x80..=0x8f, ..]);
                    assert!(emulated || delta == 0, "{}+{delta}: {bytes:x?}", p.names[0]);
                    assert_eq!(
                        p.probe_insn,
                        format!("{:?}", insn.mnemonic()).to_lowercase()
                    );
                    break;
                }
                assert!(
                    insn.ip() < delta,
                    "{}: +{delta} is not an instruction",
                    p.names[0]
                );
                assert_eq!(insn.flow_control(), FlowControl::Next, "{}", p.names[0]);
                assert_eq!(insn.stack_pointer_increment(), 0, "{}", p.names[0]);
                let info = factory.info(&insn);
                assert!(
                    info.used_memory()
                        .iter()
                        .all(|m| m.access() == OpAccess::Read),
                    "{}: {insn:?}",
                    p.names[0]
                );
                for r in info.used_registers() {
                    let full = r.register().full_register();
                    assert_ne!(full, iced_x86::Register::RSP, "{}", p.names[0]);
                    if r.access() != OpAccess::Read {
                        assert!(!args.contains(&full), "{}: writes {full:?}", p.names[0]);
                    }
                }
            }
        }
        let file = object::File::parse(&*data).unwrap();
        let build_id: String = file
            .build_id()
            .unwrap()
            .unwrap_or_default()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            build_id, BUILD_ID,
            "{LIBC} is another build than the one these offsets were read from \
             (objdump -d it and update BUILD_ID and the expected sites); chosen now: {got:?}"
        );
        let want = BTreeMap::from([
            ("free", 3),
            ("malloc", 0),
            ("calloc", 0),
            ("realloc", 0),
            ("reallocarray", 0),
            ("posix_memalign", 7),
            ("memalign", 7),
            ("valloc", 7),
            ("pvalloc", 7),
        ]);
        // memalign and aligned_alloc share a point named after whichever comes first.
        let got: BTreeMap<_, _> = got
            .into_iter()
            .map(|(n, d)| (if n == "aligned_alloc" { "memalign" } else { n }, d))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn libc_is_searched_last() {
        let maps = crate::procmaps::parse_maps(
            "55d0c0000000-55d0c0001000 r-xp 00000000 08:01 10 /usr/bin/app\n\
             7f0000000000-7f0000100000 r-xp 00028000 08:01 11 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
             7f0000200000-7f0000300000 r-xp 00010000 08:01 12 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n\
             7f0000400000-7f0000401000 rw-p 00000000 00:00 0 \n",
        )
        .unwrap();
        let order: Vec<_> = candidate_modules(&maps, Some("/usr/bin/app"))
            .iter()
            .map(|m| m.path.clone().unwrap())
            .collect();
        assert_eq!(
            order,
            [
                "/usr/bin/app",
                "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                "/usr/lib/x86_64-linux-gnu/libc.so.6"
            ]
        );
    }
}
