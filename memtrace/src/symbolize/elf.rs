//! One parsed ELF module: program headers for address translation, function symbols, and
//! an addr2line context over its DWARF (from the file itself or a separate debug file).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SectionKind, SymbolKind};

use super::demangle::demangle_lang;
use super::stream::StreamedSection;
use super::unit_batch;
use super::{FrameInfo, Unresolved};

/// DWARF reader over bytes owned by [`Backing`]; see the safety note on [`ElfModule`].
pub(crate) type Reader = gimli::EndianSlice<'static, gimli::RunTimeEndian>;

/// A `PT_LOAD` program header, reduced to what address translation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub offset: u64,
    pub filesz: u64,
    pub vaddr: u64,
    pub exec: bool,
}

/// Maps a file offset to the ELF virtual address the linker assigned to it (the address
/// space DWARF and symbol tables use). The kernel maps `PT_LOAD` segments page-wise, so a
/// mapping's file offset is what ties a runtime address to a segment; this is identical for
/// ET_EXEC (vaddr absolute, load bias 0) and ET_DYN (PIE / shared objects, any bias) — the
/// bias cancels out because we never use the runtime start as a vaddr.
///
/// Only bytes that are really in the file count (`p_filesz`, not `p_memsz`): code is never in
/// the zero-filled tail. If several segments contain the offset (sloppy layouts where a page
/// is shared), the executable one wins since we translate code addresses.
pub(crate) fn file_offset_to_vaddr(segments: &[Segment], off: u64) -> Option<u64> {
    let mut found: Option<&Segment> = None;
    for s in segments {
        if off >= s.offset && off - s.offset < s.filesz {
            if s.exec {
                found = Some(s);
                break;
            }
            found.get_or_insert(s);
        }
    }
    found.map(|s| s.vaddr.wrapping_add(off - s.offset))
}

/// A function symbol; `name` borrows from [`Backing`].
#[derive(Clone, Copy, Debug)]
struct Sym {
    addr: u64,
    /// Exclusive end: `addr + st_size`, or the end of the containing section for symbols
    /// without a size (hand-written assembly), so they do not swallow unrelated code.
    end: u64,
    name: &'static str,
    /// 0 global, 1 weak, 2 local: with aliases at one address prefer the exported name.
    rank: u8,
}

#[derive(Default)]
struct SymbolTable(Vec<Sym>);

impl SymbolTable {
    fn add_from(&mut self, obj: &object::File<'static>, dynamic: bool) {
        let iter = if dynamic {
            obj.dynamic_symbols()
        } else {
            obj.symbols()
        };
        for s in iter {
            if s.kind() != SymbolKind::Text || !s.is_definition() || s.address() == 0 {
                continue;
            }
            let Ok(name) = s.name() else { continue };
            // Static symbol tables can contain versioned names such as `memcpy@GLIBC_2.2.5`.
            let name = name.split_once('@').map_or(name, |(n, _)| n);
            if name.is_empty() {
                continue;
            }
            let addr = s.address();
            let end = if s.size() > 0 {
                addr.saturating_add(s.size())
            } else {
                s.section_index()
                    .and_then(|i| obj.section_by_index(i).ok())
                    .map(|sec| sec.address().saturating_add(sec.size()))
                    .filter(|&e| e > addr)
                    .unwrap_or(addr.saturating_add(1))
            };
            let rank = if s.is_global() {
                0
            } else if s.is_weak() {
                1
            } else {
                2
            };
            self.0.push(Sym {
                addr,
                end,
                name,
                rank,
            });
        }
    }

    /// Sort and collapse aliases (same address) into one entry: best-ranked name, widest end.
    fn finish(&mut self) {
        let v = &mut self.0;
        v.sort_by(|a, b| {
            (a.addr, a.rank, a.name.len(), a.name).cmp(&(b.addr, b.rank, b.name.len(), b.name))
        });
        let mut out: Vec<Sym> = Vec::with_capacity(v.len());
        for s in v.drain(..) {
            match out.last_mut() {
                Some(last) if last.addr == s.addr => last.end = last.end.max(s.end),
                _ => out.push(s),
            }
        }
        *v = out;
    }

    /// Nearest preceding symbol, only if the address is inside it.
    fn lookup(&self, vaddr: u64) -> Option<&Sym> {
        let i = self.0.partition_point(|s| s.addr <= vaddr);
        let s = self.0.get(i.checked_sub(1)?)?;
        (vaddr < s.end).then_some(s)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Owner of all bytes the parsed structures borrow.
#[derive(Default)]
struct Backing {
    maps: Vec<Mmap>,
    /// Inflated sections. Left writable: making them read-only (mprotect) cost ~1 ms
    /// on libc's `.debug_info`, at the end of the longest step of loading it.
    anon: Vec<memmap2::MmapMut>,
    /// Decompressed sections and in-memory images. A `Vec<u8>`'s heap buffer does not move
    /// when the outer vector reallocates, so slices into it stay valid.
    owned: Vec<Vec<u8>>,
}

impl Backing {
    fn map(&mut self, file: &File) -> Result<&'static [u8], String> {
        // SAFETY (mmap): the file may be modified by someone else while mapped. Deleted files
        // are fine (the open file keeps the inode alive); in-place truncation of a mapped
        // binary would also break the traced process itself, so it is not defended against.
        let m = unsafe { Mmap::map(file) }.map_err(|e| format!("mmap: {e}"))?;
        self.maps.push(m);
        let m = self.maps.last().expect("just pushed");
        // SAFETY: the mapping lives until `Backing` is dropped, see `ElfModule`.
        Ok(unsafe { extend(m) })
    }

    fn keep_anon(&mut self, m: memmap2::MmapMut) -> &'static [u8] {
        self.anon.push(m);
        let m = self.anon.last().expect("just pushed");
        // SAFETY: the mapping lives until `Backing` is dropped and is never written
        // again, see `ElfModule`.
        unsafe { extend(m) }
    }

    /// Drops the most recent mapping; only valid once nothing derived from it is alive.
    fn unmap_last(&mut self) {
        self.maps.pop();
    }

    fn own(&mut self, v: Vec<u8>) -> &'static [u8] {
        self.owned.push(v);
        let v = self.owned.last().expect("just pushed");
        // SAFETY: heap buffer owned by `Backing`, never mutated, see `ElfModule`.
        unsafe { extend(v) }
    }
}

/// # Safety
/// The caller must keep the memory alive (and unmodified) for as long as the returned
/// slice or anything derived from it is used.
unsafe fn extend(b: &[u8]) -> &'static [u8] {
    // SAFETY: forwarded to the caller.
    unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) }
}

/// Where to look for separate debug files of one module.
pub(crate) struct DebugSearch<'a> {
    /// Target's root as seen from here (`/proc/PID/root`, or `/`), used first.
    pub target_root: &'a Path,
    /// How to print paths under `target_root` (`/proc/PID/root` rather than the
    /// `/proc/self/fd/N` actually used).
    pub display_root: &'a Path,
    /// Host debug directory (`/usr/lib/debug`).
    pub debug_root: &'a Path,
    /// Path of the binary as the target sees it (from its maps).
    pub binary_path: &'a str,
    /// `(st_dev, st_ino)` of the binary, to never take the binary itself as its debug file.
    pub binary_id: Option<(u64, u64)>,
}

impl DebugSearch<'_> {
    fn display(&self, p: PathBuf) -> PathBuf {
        if self.target_is_host() {
            return p;
        }
        match p.strip_prefix(self.target_root) {
            Ok(rel) => self.display_root.join(rel),
            Err(_) => p,
        }
    }

    fn in_root(&self, abs: &Path) -> PathBuf {
        let rel = abs.strip_prefix("/").unwrap_or(abs);
        self.target_root.join(rel)
    }

    fn target_is_host(&self) -> bool {
        self.target_root == Path::new("/")
    }

    fn build_id_candidates(&self, id: &[u8], suffix: &str) -> Vec<PathBuf> {
        if id.len() < 2 {
            return Vec::new();
        }
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let rel = format!(".build-id/{}/{}{suffix}", &hex[..2], &hex[2..]);
        let mut v = Vec::new();
        if !self.target_is_host() {
            v.push(self.in_root(Path::new("/usr/lib/debug")).join(&rel));
        }
        v.push(self.debug_root.join(&rel));
        v
    }

    /// GDB's documented search order for `.gnu_debuglink`: next to the binary, in `.debug/`
    /// next to it, then under the global debug directory mirroring the binary's directory.
    fn debuglink_candidates(&self, name: &str) -> Vec<PathBuf> {
        let bin = Path::new(self.binary_path);
        let dir = bin.parent().unwrap_or(Path::new("/"));
        let dir_rel = dir.strip_prefix("/").unwrap_or(dir);
        let mut v = vec![
            self.in_root(dir).join(name),
            self.in_root(dir).join(".debug").join(name),
        ];
        if !self.target_is_host() {
            v.push(
                self.in_root(Path::new("/usr/lib/debug"))
                    .join(dir_rel)
                    .join(name),
            );
        }
        v.push(self.debug_root.join(dir_rel).join(name));
        v
    }
}

/// Standard CRC-32 (IEEE 802.3, reflected), which is what `.gnu_debuglink` stores.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Why a module could not be loaded.
#[derive(Clone, Debug)]
pub(crate) struct LoadError {
    pub reason: Unresolved,
    pub msg: String,
}

impl LoadError {
    fn malformed(msg: String) -> Self {
        LoadError {
            reason: Unresolved::Malformed,
            msg,
        }
    }
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

/// A parsed module.
///
/// Safety of the `'static` borrows: `dwarf` and the symbol tables point into `backing` (mmaps and
/// heap buffers whose addresses never change). Fields drop in declaration order, so everything
/// borrowing is dropped before `backing`, and no `'static` reference escapes this module: all
/// results are copied into owned `String`s.
pub(crate) struct ElfModule {
    /// Set at once, unless `.debug_info` is still being inflated (`pending`).
    dwarf: std::cell::OnceCell<Option<DwarfState>>,
    /// The DWARF sections while `.debug_info` is inflated on its own thread; taken by
    /// the first use that needs all of it ([`ElfModule::dwarf`]).
    pending: std::cell::RefCell<Option<PendingDwarf>>,
    symtab: SymbolTable,
    dynsym: SymbolTable,
    segments: Vec<Segment>,
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "read by Symbolizer::module_summary, for the tests"
        )
    )]
    pub build_id: Option<Vec<u8>>,
    /// Separate debug file in use, if any.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "read by Symbolizer::module_summary, for the tests"
        )
    )]
    pub debug_file: Option<PathBuf>,
    /// Supplementary (dwz) file in use, if any.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "read by Symbolizer::module_summary, for the tests"
        )
    )]
    pub sup_file: Option<PathBuf>,
    /// Why DWARF is unavailable or partial (diagnostics only), as found while loading.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "read by Symbolizer::module_summary, for the tests"
        )
    )]
    dwarf_note: Option<String>,
    /// Why DWARF is unavailable, as found when `.debug_info` finished inflating.
    late_note: std::cell::OnceCell<String>,
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "read by Symbolizer::module_summary, for the tests"
        )
    )]
    backing: Backing,
}

/// A module's DWARF as loading leaves it.
enum Loaded {
    Ready(Option<DwarfState>),
    Pending(PendingDwarf),
}

/// A module's DWARF while `.debug_info` is being inflated: the other sections are ready.
struct PendingDwarf {
    /// Everything but `.debug_info`.
    sections: Sections,
    info: StreamedSection,
}

impl PendingDwarf {
    fn finish(self) -> Result<DwarfState, String> {
        let (info, keep) = self
            .info
            .finish()
            .map_err(|e| format!("{}: {e}", gimli::SectionId::DebugInfo.name()))?;
        let mut sections = self.sections;
        sections.data.insert(gimli::SectionId::DebugInfo, info);
        let mut state = DwarfState::new(sections, None)?;
        state.info_map = Some(keep);
        Ok(state)
    }
}

fn is_debug_info_present(obj: &object::File<'_>) -> bool {
    obj.section_by_name(".debug_info")
        .is_some_and(|s| s.kind() != SectionKind::UninitializedData && s.size() > 0)
}

fn parse_elf(data: &'static [u8]) -> Result<object::File<'static>, String> {
    let obj = object::File::parse(data).map_err(|e| format!("not a valid object file: {e}"))?;
    if obj.format() != object::BinaryFormat::Elf {
        return Err(format!("not ELF ({:?})", obj.format()));
    }
    Ok(obj)
}

/// The sections addr2line reads. Variable locations, macros and name indexes are never
/// used, and not loading them avoids decompressing megabytes of `.debug_loclists` in distro
/// debug files.
const DWARF_SECTIONS: [gimli::SectionId; 11] = {
    use gimli::SectionId::*;
    [
        DebugAbbrev,
        DebugAddr,
        DebugAranges,
        DebugInfo,
        DebugLine,
        DebugLineStr,
        DebugStr,
        DebugStrOffsets,
        DebugTypes,
        DebugRanges,
        DebugRngLists,
    ]
};

/// Decompressing is most of the cost of loading a distro debug file (libc: 8.6 MB from
/// 3.6 MB of zlib); sections are independent streams, so big ones are inflated on their own
/// threads.
const PARALLEL_THRESHOLD: usize = 256 * 1024;

/// Refuse absurd compression headers before allocating: deflate cannot exceed ~1032:1,
/// and a debug section above 4 GiB is not something we can map anyway.
fn plausible_size(c: &object::CompressedData<'_>) -> bool {
    let limit = (c.data.len() as u64).saturating_mul(2048).max(1 << 20);
    c.uncompressed_size <= limit.min(4 << 30)
}

/// A section's bytes after decompression.
enum SectionBytes {
    /// Stored uncompressed: straight from the file's mapping.
    Borrowed(&'static [u8]),
    /// Inflated into an anonymous mapping (zlib, Debian's format).
    Map(memmap2::MmapMut),
    Owned(Vec<u8>),
}

fn decompress(
    id: gimli::SectionId,
    c: object::CompressedData<'static>,
) -> Result<SectionBytes, String> {
    if c.format != object::CompressionFormat::None && !plausible_size(&c) {
        return Err(format!(
            "{}: implausible uncompressed size {}",
            id.name(),
            c.uncompressed_size
        ));
    }
    let t = std::time::Instant::now();
    let r = match c.format {
        object::CompressionFormat::Zlib if c.uncompressed_size > 0 => {
            inflate_zlib(c.data, c.uncompressed_size).map(SectionBytes::Map)
        }
        _ => c
            .decompress()
            .map(|b| match b {
                Cow::Borrowed(b) => SectionBytes::Borrowed(b),
                Cow::Owned(v) => SectionBytes::Owned(v),
            })
            .map_err(|e| e.to_string()),
    };
    log::trace!("{} inflated in {:?}", id.name(), t.elapsed());
    r.map_err(|e| format!("{}: {e}", id.name()))
}

/// Inflates a zlib stream of known size into an anonymous mapping. Not a `Vec`: the kernel
/// can back a mapping with huge pages (a few faults instead of one per 4 KiB page, which
/// was a fifth of the time spent loading libc's debug info), and it is zeroed lazily.
fn inflate_zlib(data: &[u8], size: u64) -> Result<memmap2::MmapMut, String> {
    let size = usize::try_from(size).map_err(|_| "section too large".to_string())?;
    let mut out = memmap2::MmapMut::map_anon(size).map_err(|e| format!("mmap: {e}"))?;
    // Only hints: without transparent huge pages the mapping works the same, and
    // without MADV_POPULATE_WRITE (Linux 5.14) the pages fault in as they are written.
    // Faulting them all in one call saves ~2 ms of page faults on libc's sections.
    let _ = out.advise(memmap2::Advice::HugePage);
    let _ = out.advise(memmap2::Advice::PopulateWrite);
    // libdeflate inflates a whole buffer of known size about twice as fast as a streaming
    // inflater, and inflating .debug_info is the longest single step of loading libc.
    match libdeflater::Decompressor::new().zlib_decompress(data, &mut out) {
        Ok(n) if n == size => {}
        Ok(_) => return Err("zlib data shorter than its header says".into()),
        Err(e) => return Err(format!("invalid zlib compressed data: {e:?}")),
    }
    Ok(out)
}

/// Loads the DWARF sections. With `stream_min`, a zlib-compressed `.debug_info` of at
/// least that many bytes is not inflated here but on its own thread, returned apart
/// (and missing from the sections).
fn load_sections(
    obj: &object::File<'static>,
    backing: &mut Backing,
    stream_min: Option<usize>,
) -> Result<(Sections, Option<StreamedSection>), String> {
    let endian = if obj.is_little_endian() {
        gimli::RunTimeEndian::Little
    } else {
        gimli::RunTimeEndian::Big
    };
    // `compressed_data` understands SHF_COMPRESSED (zlib and zstd: object's "compression"
    // feature brings flate2 and ruzstd) and legacy `.zdebug_*` (section_by_name finds those).
    let mut pending = Vec::new();
    for id in DWARF_SECTIONS {
        if let Some(sec) = obj.section_by_name(id.name()) {
            let c = sec
                .compressed_data()
                .map_err(|e| format!("{}: {e}", id.name()))?;
            pending.push((id, c));
        }
    }
    let mut streamed = None;
    if let Some(min) = stream_min
        && let Some(i) = pending.iter().position(|(id, c)| {
            *id == gimli::SectionId::DebugInfo
                && c.format == object::CompressionFormat::Zlib
                && c.data.len() >= min
                && plausible_size(c)
        })
    {
        let (_, c) = pending.swap_remove(i);
        let size = usize::try_from(c.uncompressed_size).map_err(|_| "section too large")?;
        streamed = Some(StreamedSection::start(c.data, size)?);
    }
    let (big, small): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(_, c)| {
        c.format != object::CompressionFormat::None && c.data.len() >= PARALLEL_THRESHOLD
    });
    type Decompressed = Result<SectionBytes, String>;
    let mut done: Vec<(gimli::SectionId, Decompressed)> = std::thread::scope(|scope| {
        let handles: Vec<_> = big
            .into_iter()
            .map(|(id, c)| (id, scope.spawn(move || decompress(id, c))))
            .collect();
        let mut done: Vec<_> = small
            .into_iter()
            .map(|(id, c)| (id, decompress(id, c)))
            .collect();
        for (id, h) in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(format!("{}: decompressor panicked", id.name())));
            done.push((id, r));
        }
        done
    });
    let mut data: HashMap<gimli::SectionId, &'static [u8]> = HashMap::new();
    for (id, r) in done.drain(..) {
        let bytes = match r? {
            SectionBytes::Borrowed(b) => b,
            SectionBytes::Owned(v) => backing.own(v),
            SectionBytes::Map(m) => backing.keep_anon(m),
        };
        data.insert(id, bytes);
    }
    Ok((Sections { data, endian }, streamed))
}

/// A file's DWARF sections after decompression, to build [`gimli::Dwarf`]s from.
#[derive(Clone)]
struct Sections {
    data: HashMap<gimli::SectionId, &'static [u8]>,
    endian: gimli::RunTimeEndian,
}

impl Sections {
    fn get(&self, id: gimli::SectionId) -> &'static [u8] {
        self.data.get(&id).copied().unwrap_or(&[])
    }

    /// All sections, with `info` as `.debug_info` (a prefix of it while it is inflated).
    fn dwarf_with_info(&self, info: &'static [u8]) -> gimli::Dwarf<Reader> {
        let mut d = self.dwarf(None);
        d.debug_info = gimli::DebugInfo::from(gimli::EndianSlice::new(info, self.endian));
        d
    }

    /// All sections, or with `info` one unit's bytes as `.debug_info` (and no
    /// `.debug_aranges`, whose offsets point into the whole section).
    fn dwarf(&self, info: Option<&'static [u8]>) -> gimli::Dwarf<Reader> {
        let load = |id: gimli::SectionId| -> Result<Reader, ()> {
            let bytes = match (id, info) {
                (gimli::SectionId::DebugInfo, Some(unit)) => unit,
                (gimli::SectionId::DebugAranges, Some(_)) => &[],
                _ => self.get(id),
            };
            Ok(gimli::EndianSlice::new(bytes, self.endian))
        };
        match gimli::Dwarf::load(load) {
            Ok(d) => d,
            Err(()) => unreachable!("the loader does not fail"),
        }
    }
}

/// What `.debug_aranges` says covers an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Covered {
    Nothing,
    Unit(u32),
    /// Several units: only the whole-file context decides as addr2line does.
    Ambiguous,
}

/// Which unit covers which code, from `.debug_aranges` and the unit headers, so that
/// only the units an address needs are parsed.
///
/// addr2line's context parses every unit's header, abbreviations and root DIE up front
/// (libc: 2063 units, ~1 MB of abbreviations, ~40 ms) before the first lookup. A unit
/// without section-relative references to other units (`DW_FORM_ref_addr`, which dwz
/// and LTO produce) means the same on its own, so it gets its own small context over
/// its bytes of `.debug_info`, built when an address first needs it; a unit whose
/// abbreviations allow such references is answered by the whole-file context.
struct UnitIndex {
    /// Disjoint, sorted `[begin, end)` ranges.
    ranges: Vec<(u64, u64, Covered)>,
    /// Each unit's bytes in `.debug_info`.
    units: Vec<IndexedUnit>,
}

#[derive(Clone, Copy)]
struct IndexedUnit {
    start: usize,
    end: usize,
    abbrev_offset: usize,
}

/// A unit's own context, once asked for.
enum UnitContext {
    Own(Box<Context>),
    /// The unit could refer into other units: the whole-file context answers for it.
    UseFull,
    /// addr2line could not read the unit: symbol tables only.
    Failed,
}

impl UnitIndex {
    /// `None` when the address ranges do not name units by their offsets: then the
    /// whole-file context is used.
    fn build(sections: &Sections) -> Option<UnitIndex> {
        let dwarf = sections.dwarf(None);
        let mut units = Vec::new();
        let mut headers = dwarf.units();
        while let Ok(Some(h)) = headers.next() {
            let start = h.debug_info_offset()?.0;
            units.push(IndexedUnit {
                start,
                end: start + h.length_including_self(),
                abbrev_offset: h.debug_abbrev_offset().0,
            });
        }
        if headers.next().is_err() || units.is_empty() {
            return None;
        }
        let mut listed = vec![false; units.len()];
        let raw = arange_entries(&dwarf, |off| {
            let unit = units.binary_search_by_key(&off, |u| u.start).ok()?;
            listed[unit] = true;
            Some(unit as u32)
        })?;
        // A unit missing from .debug_aranges (clang does not write it, and other tools
        // may skip units) could cover addresses only the whole-file context finds.
        if listed.contains(&false) {
            return None;
        }
        Some(UnitIndex {
            ranges: merged_ranges(raw)?,
            units,
        })
    }

    fn lookup(&self, vaddr: u64) -> Covered {
        covered_at(&self.ranges, vaddr)
    }
}

/// What covers `vaddr` in disjoint sorted ranges ([`merged_ranges`]).
fn covered_at(ranges: &[(u64, u64, Covered)], vaddr: u64) -> Covered {
    let i = ranges.partition_point(|r| r.0 <= vaddr);
    match i.checked_sub(1).map(|i| ranges[i]) {
        Some((_, end, c)) if vaddr < end => c,
        _ => Covered::Nothing,
    }
}

/// The address ranges of `.debug_aranges`, each with its unit as `unit_of` names it
/// from the unit's offset in `.debug_info`. `None` if a set names no unit (`unit_of`
/// answers `None`) or the section does not parse to its end.
fn arange_entries(
    dwarf: &gimli::Dwarf<Reader>,
    mut unit_of: impl FnMut(usize) -> Option<u32>,
) -> Option<Vec<(u64, u64, u32)>> {
    let mut raw = Vec::new();
    let mut aranges = dwarf.debug_aranges.headers();
    while let Ok(Some(h)) = aranges.next() {
        let unit = unit_of(h.debug_info_offset().0)?;
        let mut entries = h.entries();
        while let Some(e) = entries.next().transpose() {
            // As in addr2line: a bad entry is skipped (the iterator ends on errors
            // that cannot be skipped).
            if let Ok(e) = e
                && e.length() != 0
            {
                let r = e.range();
                raw.push((r.begin, r.end, unit));
            }
        }
    }
    if aranges.next().is_err() {
        return None;
    }
    Some(raw)
}

/// Disjoint sorted ranges from possibly overlapping ones: where units overlap, the
/// range is `Ambiguous`. `None` when there is no range at all.
fn merged_ranges(mut raw: Vec<(u64, u64, u32)>) -> Option<Vec<(u64, u64, Covered)>> {
    if raw.is_empty() {
        return None;
    }
    raw.sort_unstable();
    let mut ranges: Vec<(u64, u64, Covered)> = Vec::with_capacity(raw.len());
    for (begin, end, unit) in raw {
        if end <= begin {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if begin < last.1 => {
                if last.2 != Covered::Unit(unit) {
                    last.2 = Covered::Ambiguous;
                }
                last.1 = last.1.max(end);
            }
            _ => ranges.push((begin, end, Covered::Unit(unit))),
        }
    }
    Some(ranges)
}

/// Whether no attribute in the abbreviation table at the start of `table` is a reference
/// relative to the whole `.debug_info` (`DW_FORM_ref_addr`). A table that does not parse
/// counts as not self-contained.
fn abbrev_table_is_self_contained(table: &[u8]) -> bool {
    fn uleb(b: &[u8], pos: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let byte = *b.get(*pos)?;
            *pos += 1;
            if shift < 64 {
                v |= u64::from(byte & 0x7f) << shift;
            }
            shift += 7;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
    }
    let mut pos = 0;
    let mut scan = || -> Option<bool> {
        loop {
            if uleb(table, &mut pos)? == 0 {
                return Some(true);
            }
            uleb(table, &mut pos)?; // tag
            pos += 1; // children flag
            loop {
                let name = uleb(table, &mut pos)?;
                let form = uleb(table, &mut pos)?;
                if name == 0 && form == 0 {
                    break;
                }
                match gimli::DwForm(form as u16) {
                    gimli::DW_FORM_ref_addr | gimli::DW_FORM_indirect => return Some(false),
                    gimli::DW_FORM_implicit_const => {
                        uleb(table, &mut pos)?; // an SLEB128: same length rules
                    }
                    _ => {}
                }
            }
        }
    };
    scan().unwrap_or(false)
}

fn open_and_map(path: &Path, backing: &mut Backing) -> Option<(File, &'static [u8])> {
    let f = File::open(path).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let data = backing.map(&f).ok()?;
    Some((f, data))
}

fn file_id(f: &File) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    f.metadata().ok().map(|m| (m.dev(), m.ino()))
}

/// The `PT_LOAD` headers, for [`file_offset_to_vaddr`].
fn load_segments(obj: &object::File<'_>) -> Vec<Segment> {
    obj.segments()
        .map(|s| {
            let (offset, filesz) = s.file_range();
            let exec = match s.flags() {
                object::SegmentFlags::Elf { p_flags, .. } => p_flags.contains(object::elf::PF_X),
                _ => false,
            };
            Segment {
                offset,
                filesz,
                vaddr: s.address(),
                exec,
            }
        })
        .collect()
}

/// The separate debug file of a module without `.debug_info` of its own (its path as
/// printed, and the file), and why DWARF will be missing if it is.
fn separate_debug_file(
    obj: &object::File<'static>,
    build_id: Option<&[u8]>,
    search: Option<&DebugSearch<'_>>,
    backing: &mut Backing,
) -> (Option<(PathBuf, object::File<'static>)>, Option<String>) {
    let Some(search) = search else {
        return (None, Some("no DWARF".into()));
    };
    match find_debug_file(obj, build_id, search, backing) {
        Some((path, dobj)) => {
            let note = (!is_debug_info_present(&dobj))
                .then(|| "debug file has no .debug_info".to_string());
            (Some((path, dobj)), note)
        }
        None => (
            None,
            Some("no DWARF and no separate debug file found".into()),
        ),
    }
}

/// The module's `.symtab` (with the debug file's) and `.dynsym`, sorted for lookups.
fn read_symbol_tables(
    obj: &object::File<'static>,
    debug_obj: Option<&object::File<'static>>,
) -> (SymbolTable, SymbolTable) {
    let mut symtab = SymbolTable::default();
    let mut dynsym = SymbolTable::default();
    symtab.add_from(obj, false);
    dynsym.add_from(obj, true);
    if let Some(dobj) = debug_obj {
        symtab.add_from(dobj, false);
    }
    symtab.finish();
    dynsym.finish();
    (symtab, dynsym)
}

impl ElfModule {
    /// Parse an ELF image held in memory (the vdso).
    pub fn from_image(image: Vec<u8>) -> Result<Self, LoadError> {
        let mut backing = Backing::default();
        let data = backing.own(image);
        Self::build(data, backing, None, None).map_err(LoadError::malformed)
    }

    /// Parse an opened file and locate its debug information, all of it inflated
    /// before this returns (with libdeflate: the fastest way to the whole section).
    pub fn from_file(file: &File, search: &DebugSearch<'_>) -> Result<Self, LoadError> {
        Self::open(file, search, None)
    }

    /// [`Self::from_file`] for a batch known up front ([`Self::resolve_sorted`]): a big
    /// zlib-compressed `.debug_info` is inflated on its own thread by a streaming
    /// inflater (~20% slower than libdeflate), and the batch reads each unit as soon as
    /// its bytes are there. Lookups one address at a time would only wait for it.
    pub fn for_batch(file: &File, search: &DebugSearch<'_>) -> Result<Self, LoadError> {
        Self::open(file, search, Some(PARALLEL_THRESHOLD))
    }

    /// [`Self::for_batch`], streaming `.debug_info` whenever it is zlib-compressed,
    /// however small (tests of the streamed lookups on fixtures).
    #[cfg(test)]
    pub fn from_file_streamed(file: &File, search: &DebugSearch<'_>) -> Result<Self, LoadError> {
        Self::open(file, search, Some(0))
    }

    fn open(
        file: &File,
        search: &DebugSearch<'_>,
        stream_min: Option<usize>,
    ) -> Result<Self, LoadError> {
        let mut backing = Backing::default();
        let data = backing.map(file).map_err(|msg| LoadError {
            reason: Unresolved::FileUnavailable,
            msg,
        })?;
        Self::build(data, backing, Some(search), stream_min).map_err(LoadError::malformed)
    }

    /// `stream_min`: see [`load_sections`].
    fn build(
        data: &'static [u8],
        mut backing: Backing,
        search: Option<&DebugSearch<'_>>,
        stream_min: Option<usize>,
    ) -> Result<Self, String> {
        let obj = parse_elf(data)?;
        let segments = load_segments(&obj);
        let build_id = obj.build_id().ok().flatten().map(<[u8]>::to_vec);
        let dwarf_in_file = is_debug_info_present(&obj);
        let (debug, mut dwarf_note) = if dwarf_in_file {
            (None, None)
        } else {
            separate_debug_file(&obj, build_id.as_deref(), search, &mut backing)
        };
        let (debug_file, debug_obj) = debug.unzip();
        let dwarf_obj = if dwarf_in_file {
            Some(&obj)
        } else {
            debug_obj.as_ref().filter(|d| is_debug_info_present(d))
        };
        let symbol_tables = || read_symbol_tables(&obj, debug_obj.as_ref());
        let (loaded, (symtab, dynsym), sup_file) = match dwarf_obj {
            None => (Loaded::Ready(None), symbol_tables(), None),
            // The symbol tables (libc's debug file: ~3 ms) are read while DWARF is inflated.
            Some(dobj) => std::thread::scope(|scope| {
                let tables = scope.spawn(symbol_tables);
                let mut sup_file = None;
                let dwarf = Self::load_dwarf(
                    dobj,
                    &mut backing,
                    search,
                    stream_min,
                    &mut sup_file,
                    &mut dwarf_note,
                );
                (dwarf, tables.join().unwrap_or_default(), sup_file)
            }),
        };
        let (dwarf, pending) = match loaded {
            Loaded::Ready(d) => (std::cell::OnceCell::from(d), None),
            Loaded::Pending(p) => (std::cell::OnceCell::new(), Some(p)),
        };
        Ok(ElfModule {
            dwarf,
            pending: std::cell::RefCell::new(pending),
            symtab,
            dynsym,
            segments,
            build_id,
            debug_file,
            sup_file,
            dwarf_note,
            late_note: std::cell::OnceCell::new(),
            backing,
        })
    }

    fn load_dwarf(
        dobj: &object::File<'static>,
        backing: &mut Backing,
        search: Option<&DebugSearch<'_>>,
        stream_min: Option<usize>,
        sup_file: &mut Option<PathBuf>,
        dwarf_note: &mut Option<String>,
    ) -> Loaded {
        let t = std::time::Instant::now();
        // With a supplementary file, units are not looked up one by one (`UnitIndex`),
        // so nothing could start before `.debug_info` is complete.
        let stream_min = stream_min.filter(|_| matches!(dobj.gnu_debugaltlink(), Ok(None)));
        let res = load_sections(dobj, backing, stream_min).and_then(|(sections, streamed)| {
            log::debug!("DWARF sections loaded in {:?}", t.elapsed());
            if let Some(info) = streamed {
                return Ok(Loaded::Pending(PendingDwarf { sections, info }));
            }
            let mut sup = None;
            if let Some(search) = search
                && let Ok(Some((alt_path, alt_id))) = dobj.gnu_debugaltlink()
            {
                match find_sup_file(alt_path, alt_id, search, backing) {
                    Some((p, sup_obj)) => {
                        sup = Some(
                            load_sections(&sup_obj, backing, None)
                                .map_err(|e| format!("supplementary file: {e}"))?
                                .0,
                        );
                        *sup_file = Some(p);
                    }
                    None => {
                        *dwarf_note = Some(
                            "supplementary (dwz) debug file not found; some names \
                             may be missing"
                                .into(),
                        )
                    }
                }
            }
            DwarfState::new(sections, sup).map(|d| Loaded::Ready(Some(d)))
        });
        log::debug!("DWARF ready {:?} after loading began", t.elapsed());
        match res {
            Ok(l) => l,
            Err(e) => {
                *dwarf_note = Some(e);
                Loaded::Ready(None)
            }
        }
    }

    /// The module's DWARF, once `.debug_info` is complete (this waits for it).
    fn dwarf(&self) -> Option<&DwarfState> {
        self.dwarf
            .get_or_init(|| {
                let pending = self.pending.borrow_mut().take()?;
                let t = std::time::Instant::now();
                let r = pending.finish();
                log::debug!("waited {:?} for .debug_info", t.elapsed());
                r.map_err(|e| {
                    let _ = self.late_note.set(e);
                })
                .ok()
            })
            .as_ref()
    }

    /// Whether `.debug_info` is still being inflated, or waits for its first use.
    #[cfg(test)]
    pub fn dwarf_pending(&self) -> bool {
        self.pending.borrow().is_some()
    }

    /// [`Self::resolve_sorted`] by the streamed path only: `None` where that path gives
    /// up (nothing pending, or its unit runs were discarded).
    #[cfg(test)]
    pub fn resolve_sorted_streamed(&self, sorted: &[u64]) -> Option<Vec<Vec<FrameInfo>>> {
        self.resolve_streaming(sorted)
    }

    #[cfg(test)]
    pub fn has_dwarf(&self) -> bool {
        self.dwarf().is_some()
    }

    /// Why DWARF is unavailable or partial (diagnostics only).
    #[cfg(test)]
    pub fn dwarf_note(&self) -> Option<String> {
        self.dwarf();
        self.late_note.get().or(self.dwarf_note.as_ref()).cloned()
    }

    /// The whole-file DWARF and the offsets of its units in `.debug_info`.
    #[cfg(test)]
    pub(crate) fn units_for_tests(&self) -> Option<(gimli::Dwarf<Reader>, Vec<usize>)> {
        let d = self.dwarf()?;
        let dwarf = d.sections.dwarf(None);
        let mut offsets = Vec::new();
        let mut headers = dwarf.units();
        while let Ok(Some(h)) = headers.next() {
            offsets.push(h.debug_info_offset()?.0);
        }
        Some((dwarf, offsets))
    }

    #[cfg(test)]
    pub fn symbol_count(&self) -> usize {
        self.symtab.len() + self.dynsym.len()
    }

    #[cfg(test)]
    pub fn mapped_bytes(&self) -> usize {
        self.backing.maps.iter().map(|m| m.len()).sum::<usize>()
            + self.backing.anon.iter().map(|m| m.len()).sum::<usize>()
            + self.backing.owned.iter().map(Vec::len).sum::<usize>()
    }

    pub fn vaddr_of(&self, file_offset: u64) -> Option<u64> {
        file_offset_to_vaddr(&self.segments, file_offset)
    }

    /// Resolve one ELF virtual address: inlined frames first, the real function last.
    /// Always returns at least one frame.
    pub fn resolve(&self, vaddr: u64) -> Vec<FrameInfo> {
        let ctx = self.dwarf().and_then(|d| d.context_for(vaddr));
        resolve_frames(ctx, &mut self.symbol_names(), vaddr)
    }

    fn symbol_names(&self) -> SymbolNames<'_> {
        SymbolNames::new(&self.symtab, &self.dynsym)
    }

    /// Without DWARF, only the symbol tables answer: a large batch is split in two halves
    /// resolved on two threads (demangling C++ names is nearly all the work).
    fn resolve_sorted_symbols(&self, sorted: &[u64]) -> Vec<Vec<FrameInfo>> {
        let (symtab, dynsym) = (&self.symtab, &self.dynsym);
        let resolve = |part: &[u64]| -> Vec<Vec<FrameInfo>> {
            let mut names = SymbolNames::new(symtab, dynsym);
            part.iter()
                .map(|&v| finish_frames(Vec::new(), &mut names, v))
                .collect()
        };
        let (first, second) = sorted.split_at(sorted.len() / 2);
        std::thread::scope(|scope| {
            let other = scope.spawn(|| resolve(second));
            let mut out = resolve(first);
            match other.join() {
                Ok(rest) => out.extend(rest),
                Err(_) => out.extend(resolve(second)),
            }
            out
        })
    }

    /// Resolves sorted addresses, in order. A large batch is resolved on two threads:
    /// the addresses are grouped into runs of one unit each, which the threads take in
    /// turn, reading each unit once for all its addresses (see [`super::unit_batch`]); nothing
    /// is kept for later lookups. While `.debug_info` is still being inflated, the units
    /// are read as they arrive ([`Self::resolve_streaming`]).
    pub fn resolve_sorted(&self, sorted: &[u64]) -> Vec<Vec<FrameInfo>> {
        if sorted.is_empty() {
            return Vec::new();
        }
        if sorted.len() >= PARALLEL_MIN
            && self.dwarf.get().is_none()
            && let Some(out) = self.resolve_streaming(sorted)
        {
            return out;
        }
        let dwarf = self.dwarf();
        let index = dwarf.and_then(|d| Some((d, d.index.as_ref()?)));
        if dwarf.is_none() && sorted.len() >= PARALLEL_MIN {
            return self.resolve_sorted_symbols(sorted);
        }
        let Some((dwarf, index)) = index.filter(|_| sorted.len() >= PARALLEL_MIN) else {
            let mut names = self.symbol_names();
            return sorted
                .iter()
                .map(|&v| {
                    let ctx = dwarf.and_then(|d| d.context_for(v));
                    resolve_frames(ctx, &mut names, v)
                })
                .collect();
        };
        let runs = unit_runs(sorted, |v| index.lookup(v));
        let sections = &dwarf.sections;
        let whole = sections.dwarf(None);
        let abbrev = sections.get(gimli::SectionId::DebugAbbrev);
        let order: Vec<usize> = (0..runs.len()).collect();
        let per_run = self.resolve_runs(&runs, &order, sorted, |covered, probes, scratch| {
            run_frames(index, &whole, abbrev, covered, probes, scratch)
        });
        self.finish_runs(dwarf, &runs, per_run, sorted)
    }

    /// `per_run`'s frames in address order; a run left out is answered by lookups in
    /// `dwarf`'s contexts (the whole-file context for what several units claim).
    fn finish_runs(
        &self,
        dwarf: &DwarfState,
        runs: &[(usize, usize, Covered)],
        per_run: Vec<Option<Vec<Vec<FrameInfo>>>>,
        sorted: &[u64],
    ) -> Vec<Vec<FrameInfo>> {
        let mut out = Vec::with_capacity(sorted.len());
        for (&(start, end, _), frames) in runs.iter().zip(per_run) {
            match frames {
                Some(f) => out.extend(f),
                None => {
                    let mut names = self.symbol_names();
                    out.extend(sorted[start..end].iter().map(|&v| {
                        let ctx = dwarf.context_for(v);
                        resolve_frames(ctx, &mut names, v)
                    }))
                }
            }
        }
        out
    }

    /// Resolves `runs` (taken in the order `order` gives) on two threads with
    /// `frames_of(covered, addresses, scratch)`, then finishes each address's frames
    /// from the symbol tables. A run for which `frames_of` answers `None` is left out.
    fn resolve_runs<F>(
        &self,
        runs: &[(usize, usize, Covered)],
        order: &[usize],
        sorted: &[u64],
        frames_of: F,
    ) -> Vec<Option<Vec<Vec<FrameInfo>>>>
    where
        F: Fn(Covered, &[u64], &mut unit_batch::Scratch) -> Option<Vec<Vec<FrameInfo>>> + Sync,
    {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (symtab, dynsym) = (&self.symtab, &self.dynsym);
        let next = AtomicUsize::new(0);
        let work = || -> Vec<(usize, Vec<Vec<FrameInfo>>)> {
            let mut scratch = unit_batch::Scratch::default();
            let mut done = Vec::new();
            let mut names = SymbolNames::new(symtab, dynsym);
            while let Some(&r) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                let (start, end, covered) = runs[r];
                let probes = &sorted[start..end];
                let Some(frames) = frames_of(covered, probes, &mut scratch) else {
                    continue;
                };
                let frames = frames
                    .into_iter()
                    .zip(probes)
                    .map(|(f, &v)| finish_frames(f, &mut names, v))
                    .collect();
                done.push((r, frames));
            }
            done
        };
        let results = std::thread::scope(|scope| {
            let other = scope.spawn(work);
            let mine = work();
            [Some(mine), other.join().ok()]
        });
        let mut per_run: Vec<Option<Vec<Vec<FrameInfo>>>> = vec![None; runs.len()];
        for (r, frames) in results.into_iter().flatten().flatten() {
            per_run[r] = Some(frames);
        }
        per_run
    }

    /// [`Self::resolve_sorted`] while `.debug_info` is still being inflated: the units
    /// `.debug_aranges` names for the addresses are read as soon as their bytes are
    /// there, in the order of the section. Once it is complete, the unit index is built
    /// as usual, and the runs are kept only if it groups the addresses into the same
    /// units (it always does when `.debug_aranges` lists every unit); otherwise, and for
    /// the runs that need more than one unit's bytes, the usual path answers. `None`
    /// when nothing is pending or `.debug_aranges` is unusable.
    fn resolve_streaming(&self, sorted: &[u64]) -> Option<Vec<Vec<FrameInfo>>> {
        let guard = self.pending.borrow();
        let pending = guard.as_ref()?;
        let sections = &pending.sections;
        let t = std::time::Instant::now();
        // Units named by their offsets in .debug_info.
        let ranges = merged_ranges(arange_entries(&sections.dwarf(None), |off| {
            u32::try_from(off).ok()
        })?)?;
        let runs = unit_runs(sorted, |v| covered_at(&ranges, v));
        // Runs needing no DWARF first, then by where their unit starts.
        let mut order: Vec<usize> = (0..runs.len()).collect();
        order.sort_by_key(|&r| match runs[r].2 {
            Covered::Nothing => 0,
            Covered::Unit(off) => u64::from(off) + 1,
            Covered::Ambiguous => u64::MAX,
        });
        let info = &pending.info;
        let abbrev = sections.get(gimli::SectionId::DebugAbbrev);
        let per_run = self.resolve_runs(&runs, &order, sorted, |covered, probes, scratch| {
            let off = match covered {
                Covered::Nothing => return Some(vec![Vec::new(); probes.len()]),
                Covered::Ambiguous => return None,
                Covered::Unit(off) => off as usize,
            };
            // The unit's length comes first: 4 bytes, or 12 in 64-bit DWARF.
            let head = info.wait_for(off.checked_add(12)?)?;
            let mut r = gimli::EndianSlice::new(head.get(off..)?, sections.endian);
            let (len, format) = gimli::Reader::read_initial_length(&mut r).ok()?;
            let end = off
                .checked_add(usize::from(format.initial_length_size()))?
                .checked_add(len)?;
            let bytes = info.wait_for(end)?;
            // SAFETY: inflated bytes are never written again, and the section outlives
            // this call (`pending` is borrowed until it returns); nothing borrowed from
            // them is kept, the frames own their strings.
            let bytes: &'static [u8] = unsafe { extend(bytes) };
            let prefix = sections.dwarf_with_info(bytes);
            let header = prefix
                .debug_info
                .header_from_offset(gimli::DebugInfoOffset(off))
                .ok()?;
            // A unit that may refer into others needs all of .debug_info.
            if !abbrev
                .get(header.debug_abbrev_offset().0..)
                .is_some_and(abbrev_table_is_self_contained)
            {
                return None;
            }
            unit_batch::fast_unit_frames(&prefix, off, probes, scratch)
                .or_else(|| Some(unit_batch::unit_frames(&prefix, off, probes)))
        });
        log::debug!(
            "{} addresses read while .debug_info inflated: {:?}",
            sorted.len(),
            t.elapsed()
        );
        drop(guard);
        let dwarf = self.dwarf()?;
        let index = dwarf.index.as_ref()?;
        // The same grouping, with units named by their offsets, or nothing is kept.
        let real = unit_runs(sorted, |v| index.lookup(v));
        let same = real.len() == runs.len()
            && real.iter().zip(&runs).all(|(a, b)| {
                (a.0, a.1) == (b.0, b.1)
                    && match (a.2, b.2) {
                        (Covered::Unit(u), Covered::Unit(off)) => {
                            index.units[u as usize].start == off as usize
                        }
                        (x, y) => x == y,
                    }
            });
        if !same {
            log::debug!("unit index disagrees with .debug_aranges: results discarded");
            return None;
        }
        // What was left out is answered as `resolve_sorted` answers it.
        let left: Vec<usize> = (0..real.len()).filter(|&r| per_run[r].is_none()).collect();
        let mut per_run = per_run;
        if !left.is_empty() {
            let whole = dwarf.sections.dwarf(None);
            let abbrev = dwarf.sections.get(gimli::SectionId::DebugAbbrev);
            let more = self.resolve_runs(&real, &left, sorted, |covered, probes, scratch| {
                run_frames(index, &whole, abbrev, covered, probes, scratch)
            });
            for (r, frames) in more.into_iter().enumerate() {
                if frames.is_some() {
                    per_run[r] = frames;
                }
            }
        }
        Some(self.finish_runs(dwarf, &real, per_run, sorted))
    }
}

/// The frames of one run of addresses that `index` says `covered` covers; `None` for
/// a run only the whole-file context can answer.
fn run_frames(
    index: &UnitIndex,
    whole: &gimli::Dwarf<Reader>,
    abbrev: &[u8],
    covered: Covered,
    probes: &[u64],
    scratch: &mut unit_batch::Scratch,
) -> Option<Vec<Vec<FrameInfo>>> {
    match covered {
        Covered::Nothing => Some(vec![Vec::new(); probes.len()]),
        Covered::Ambiguous => None,
        Covered::Unit(u) => {
            let u = index.units[u as usize];
            unit_batch::fast_unit_frames(whole, u.start, probes, scratch).or_else(|| {
                abbrev
                    .get(u.abbrev_offset..)
                    .is_some_and(abbrev_table_is_self_contained)
                    .then(|| unit_batch::unit_frames(whole, u.start, probes))
            })
        }
    }
}

/// Below this many addresses a batch is looked up one address at a time.
const PARALLEL_MIN: usize = 256;

/// Runs of consecutive addresses covered by the same unit (or by nothing).
fn unit_runs(sorted: &[u64], lookup: impl Fn(u64) -> Covered) -> Vec<(usize, usize, Covered)> {
    let mut runs: Vec<(usize, usize, Covered)> = Vec::new();
    for (i, &v) in sorted.iter().enumerate() {
        let c = lookup(v);
        match runs.last_mut() {
            Some(last) if last.2 == c => last.1 = i + 1,
            _ => runs.push((i, i + 1, c)),
        }
    }
    runs
}

type Context = addr2line::Context<Reader>;

/// The DWARF of a module and the addr2line contexts built over it so far.
struct DwarfState {
    /// Per-unit lookup, when the units allow it; otherwise `full` is built at once.
    index: Option<UnitIndex>,
    /// One slot per unit of `index`.
    units: Vec<std::cell::OnceCell<UnitContext>>,
    /// Whole-file context: without an index, or for addresses several units claim.
    full: std::cell::OnceCell<Option<Context>>,
    sections: Sections,
    sup: Option<Sections>,
    /// The mapping of a `.debug_info` inflated on its own thread ([`PendingDwarf`]),
    /// which `sections` borrows: declared last, so dropped last.
    info_map: Option<std::sync::Arc<dyn Send + Sync>>,
}

impl DwarfState {
    fn new(sections: Sections, sup: Option<Sections>) -> Result<Self, String> {
        let t = std::time::Instant::now();
        // A supplementary file's units would be parsed again for each unit's context.
        let index = if sup.is_none() {
            UnitIndex::build(&sections)
        } else {
            None
        };
        log::debug!(
            "unit index: {:?} in {:?}",
            index.as_ref().map(|i| (i.units.len(), i.ranges.len())),
            t.elapsed()
        );
        let state = DwarfState {
            units: (0..index.as_ref().map_or(0, |i| i.units.len()))
                .map(|_| std::cell::OnceCell::new())
                .collect(),
            index,
            full: std::cell::OnceCell::new(),
            sections,
            sup,
            info_map: None,
        };
        if state.index.is_none() {
            let ctx = state.full_context()?;
            let _ = state.full.set(Some(ctx));
        }
        Ok(state)
    }

    fn full_context(&self) -> Result<Context, String> {
        let mut dwarf = self.sections.dwarf(None);
        if let Some(sup) = &self.sup {
            dwarf.set_sup(sup.dwarf(None));
        }
        Context::from_dwarf(dwarf).map_err(|e| format!("DWARF: {e}"))
    }

    fn context_for(&self, vaddr: u64) -> Option<&Context> {
        let full = || self.full.get_or_init(|| self.full_context().ok()).as_ref();
        let Some(index) = &self.index else {
            return full();
        };
        match index.lookup(vaddr) {
            Covered::Nothing => None,
            Covered::Ambiguous => full(),
            Covered::Unit(u) => match self.units[u as usize]
                .get_or_init(|| unit_context(&self.sections, index, u))
            {
                UnitContext::Own(c) => Some(c),
                UnitContext::Failed => None,
                UnitContext::UseFull => full(),
            },
        }
    }
}

/// A context over one unit's bytes of `.debug_info` (see [`UnitIndex`]), unless the unit
/// can refer into other units.
fn unit_context(sections: &Sections, index: &UnitIndex, unit: u32) -> UnitContext {
    let u = index.units[unit as usize];
    let abbrev = sections.get(gimli::SectionId::DebugAbbrev);
    if !abbrev
        .get(u.abbrev_offset..)
        .is_some_and(abbrev_table_is_self_contained)
    {
        return UnitContext::UseFull;
    }
    let Some(info) = sections
        .get(gimli::SectionId::DebugInfo)
        .get(u.start..u.end)
    else {
        return UnitContext::Failed;
    };
    match Context::from_dwarf(sections.dwarf(Some(info))) {
        Ok(c) => UnitContext::Own(Box::new(c)),
        Err(_) => UnitContext::Failed,
    }
}

/// Demangled names from the symbol tables, remembering the last symbol's: sorted
/// addresses often fall in one function one after the other (a function's first byte
/// and its middle), and demangling C++ names is most of the time spent on a module
/// without DWARF.
struct SymbolNames<'a> {
    symtab: &'a SymbolTable,
    dynsym: &'a SymbolTable,
    /// (symbol address, from `.symtab`), and its name.
    last: Option<((u64, bool), Option<String>)>,
}

impl<'a> SymbolNames<'a> {
    fn new(symtab: &'a SymbolTable, dynsym: &'a SymbolTable) -> Self {
        SymbolNames {
            symtab,
            dynsym,
            last: None,
        }
    }

    fn name(&mut self, vaddr: u64) -> Option<String> {
        let (sym, key) = match self.symtab.lookup(vaddr) {
            Some(s) => (s, (s.addr, true)),
            None => {
                let s = self.dynsym.lookup(vaddr)?;
                (s, (s.addr, false))
            }
        };
        match &self.last {
            Some((k, name)) if *k == key => name.clone(),
            _ => {
                let name = Some(demangle_lang(sym.name, None).into_owned());
                self.last = Some((key, name.clone()));
                name
            }
        }
    }
}

/// Frames for one address from `ctx` (if any), the symbol tables naming the outermost
/// function when DWARF does not.
fn resolve_frames(
    ctx: Option<&Context>,
    names: &mut SymbolNames<'_>,
    vaddr: u64,
) -> Vec<FrameInfo> {
    let mut frames: Vec<FrameInfo> = Vec::new();
    if let Some(ctx) = ctx {
        // Split DWARF (.dwo) is not supported: `skip_all_loads` answers with what the
        // main file has (usually the skeleton's line info).
        if let Ok(mut it) = ctx.find_frames(vaddr).skip_all_loads() {
            // A malformed DIE stops the walk; keep what was already decoded.
            while let Ok(Some(f)) = it.next() {
                let function = f.function.as_ref().and_then(|n| {
                    let raw = n.raw_name().ok()?;
                    Some(demangle_lang(&raw, n.language).into_owned())
                });
                let (file, line) = match &f.location {
                    Some(l) => (l.file.map(str::to_owned), l.line.filter(|&l| l != 0)),
                    None => (None, None),
                };
                frames.push(FrameInfo {
                    function,
                    file,
                    line,
                    inlined: true,
                    unresolved: None,
                });
                if frames.len() > 256 {
                    break; // corrupt inline chains must not produce unbounded output
                }
            }
        }
    }
    finish_frames(frames, names, vaddr)
}

/// Completes the DWARF frames of one address (innermost first, maybe none): the last is
/// the real function, named from the symbol tables when DWARF does not name it.
fn finish_frames(
    mut frames: Vec<FrameInfo>,
    names: &mut SymbolNames<'_>,
    vaddr: u64,
) -> Vec<FrameInfo> {
    if frames.is_empty() {
        frames.push(FrameInfo::default());
    }
    let last = frames.last_mut().expect("non-empty");
    last.inlined = false;
    if last.function.is_none() {
        // Assembly functions (libc's memcpy variants) have line info but no DIE; stripped
        // or DWARF-less binaries only have symbol tables.
        last.function = names.name(vaddr);
    }
    for f in &mut frames {
        f.unresolved = if f.function.is_none() {
            Some(Unresolved::NoSymbol)
        } else if f.line.is_none() {
            Some(Unresolved::NoLineInfo)
        } else {
            None
        };
    }
    frames
}

/// Checks that `dobj` belongs to the binary: build ids must match when both have one;
/// otherwise, for debuglink matches, the CRC must match.
fn debug_file_matches(
    bin_build_id: Option<&[u8]>,
    dobj: &object::File<'_>,
    data: &[u8],
    crc: Option<u32>,
) -> bool {
    let dbg_id = dobj.build_id().ok().flatten();
    match (bin_build_id, dbg_id) {
        (Some(a), Some(b)) => a == b,
        _ => match crc {
            Some(crc) => crc32(data) == crc,
            None => true,
        },
    }
}

fn find_debug_file(
    obj: &object::File<'static>,
    build_id: Option<&[u8]>,
    search: &DebugSearch<'_>,
    backing: &mut Backing,
) -> Option<(PathBuf, object::File<'static>)> {
    let mut candidates: Vec<(PathBuf, Option<u32>)> = Vec::new();
    if let Some(id) = build_id {
        for p in search.build_id_candidates(id, ".debug") {
            candidates.push((p, None));
        }
    }
    // A debuglink is a bare file name; refuse anything that walks elsewhere.
    if let Ok(Some((name, crc))) = obj.gnu_debuglink()
        && let Ok(name) = std::str::from_utf8(name)
        && !name.is_empty()
        && !name.contains('/')
    {
        for p in search.debuglink_candidates(name) {
            candidates.push((p, Some(crc)));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (path, crc) in candidates {
        if !seen.insert(path.clone()) {
            continue;
        }
        let Ok(f) = File::open(&path) else { continue };
        if search.binary_id.is_some() && file_id(&f) == search.binary_id {
            continue;
        }
        let Ok(md) = f.metadata() else { continue };
        if !md.is_file() {
            continue;
        }
        let Ok(data) = backing.map(&f) else { continue };
        match parse_elf(data) {
            Ok(dobj) if debug_file_matches(build_id, &dobj, data, crc) => {
                return Some((search.display(path), dobj));
            }
            _ => log::debug!("{}: not a matching debug file", path.display()),
        }
        // Nothing borrows the rejected candidate any more.
        backing.unmap_last();
    }
    None
}

/// `.gnu_debugaltlink` (written by dwz) names a supplementary file holding DWARF shared
/// between several debug files, plus its build id. Debian installs these under
/// `/usr/lib/debug/.dwz/` and also registers them in `.build-id/`.
fn find_sup_file(
    alt_path: &[u8],
    alt_id: &[u8],
    search: &DebugSearch<'_>,
    backing: &mut Backing,
) -> Option<(PathBuf, object::File<'static>)> {
    let mut candidates = search.build_id_candidates(alt_id, ".debug");
    if let Ok(p) = std::str::from_utf8(alt_path) {
        let p = Path::new(p);
        if p.is_absolute() {
            candidates.push(search.in_root(p));
            candidates.push(p.to_path_buf());
        }
    }
    for path in candidates {
        let Some((_, data)) = open_and_map(&path, backing) else {
            continue;
        };
        if let Ok(sobj) = parse_elf(data)
            && sobj.build_id().ok().flatten() == Some(alt_id)
        {
            return Some((search.display(path), sobj));
        }
        backing.unmap_last();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(offset: u64, filesz: u64, vaddr: u64, exec: bool) -> Segment {
        Segment {
            offset,
            filesz,
            vaddr,
            exec,
        }
    }

    #[test]
    fn pie_translation() {
        // Typical gcc PIE: R, R+X, R, RW (data vaddr != offset).
        let s = [
            seg(0, 0x5f8, 0, false),
            seg(0x1000, 0x1cd, 0x1000, true),
            seg(0x2000, 0x114, 0x2000, false),
            seg(0x2db8, 0x260, 0x3db8, false),
        ];
        // maps: 555555555000-555555556000 r-xp 00001000 → addr 0x555555555139
        let (start, map_off, addr) = (0x5555_5555_5000u64, 0x1000u64, 0x5555_5555_5139u64);
        let off = addr - start + map_off;
        assert_eq!(file_offset_to_vaddr(&s, off), Some(0x1139));
        assert_eq!(file_offset_to_vaddr(&s, 0x2dc0), Some(0x3dc0));
        assert_eq!(file_offset_to_vaddr(&s, 0x11cd), None, "past p_filesz");
        assert_eq!(file_offset_to_vaddr(&s, 0x9000), None);
    }

    #[test]
    fn non_pie_translation() {
        // ET_EXEC: vaddrs absolute at 0x400000, maps show the same numbers.
        let s = [
            seg(0, 0x4e8, 0x400000, false),
            seg(0x1000, 0x1a5, 0x401000, true),
        ];
        let off = 0x401136u64 - 0x401000 + 0x1000;
        assert_eq!(file_offset_to_vaddr(&s, off), Some(0x401136));
    }

    #[test]
    fn shared_library_with_unaligned_segment() {
        // libc-like: text segment whose file offset is not the map offset.
        let s = [
            seg(0, 0x25388, 0, false),
            seg(0x26000, 0x1550fc, 0x26000, true),
            seg(0x1cf8d0, 0x4f98, 0x1cf8d0, false),
        ];
        // maps: 7f0000026000-7f000017c000 r-xp 00026000
        let off = 0x7f00_0002_7410u64 - 0x7f00_0002_6000 + 0x26000;
        assert_eq!(file_offset_to_vaddr(&s, off), Some(0x27410));
        // prelinked-style: vaddr unrelated to offset
        let s = [seg(0x800, 0x1000, 0x10_0000, true)];
        assert_eq!(file_offset_to_vaddr(&s, 0x900), Some(0x10_0100));
    }

    #[test]
    fn overlapping_segments_prefer_exec() {
        let s = [
            seg(0, 0x2000, 0x0, false),
            seg(0x1000, 0x1000, 0x5000, true),
        ];
        assert_eq!(file_offset_to_vaddr(&s, 0x1010), Some(0x5010));
        assert_eq!(file_offset_to_vaddr(&s, 0x10), Some(0x10));
    }

    #[test]
    fn crc32_known_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn symbol_table_lookup() {
        let mut t = SymbolTable::default();
        let sym = |addr, end, name, rank| Sym {
            addr,
            end,
            name,
            rank,
        };
        t.0 = vec![
            sym(0x2000, 0x2100, "b", 0),
            sym(0x1000, 0x1010, "__GI_a", 2),
            sym(0x1000, 0x1080, "a", 0),
            sym(0x1000, 0x1020, "a_weak", 1),
        ];
        t.finish();
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(0x1000).map(|s| s.name), Some("a"));
        assert_eq!(t.lookup(0x107f).map(|s| s.name), Some("a"));
        assert!(t.lookup(0x1080).is_none(), "size checked");
        assert!(t.lookup(0xfff).is_none());
        assert_eq!(t.lookup(0x20ff).map(|s| s.name), Some("b"));
        assert!(t.lookup(0x2100).is_none());
    }

    #[test]
    fn remembered_symbol_names_follow_the_symbol() {
        let sym = |addr, end, name| Sym {
            addr,
            end,
            name,
            rank: 0,
        };
        let mut symtab = SymbolTable(vec![
            sym(0x1000, 0x1010, "_ZN1a1fEv"),
            sym(0x1010, 0x1020, "g"),
        ]);
        symtab.finish();
        // Same address as in .symtab, other name: the key tells the tables apart.
        let mut dynsym = SymbolTable(vec![sym(0x1000, 0x1100, "h")]);
        dynsym.finish();
        let mut names = SymbolNames::new(&symtab, &dynsym);
        let got: Vec<Option<String>> = [0x1000, 0x1008, 0x1010, 0x1000, 0x1030, 0x1200]
            .iter()
            .map(|&v| names.name(v))
            .collect();
        let want = [
            Some("a::f()"),
            Some("a::f()"),
            Some("g"),
            Some("a::f()"),
            Some("h"),
            None,
        ];
        assert_eq!(got, want.map(|n| n.map(str::to_owned)));
    }

    #[test]
    fn abbreviation_tables_with_cross_unit_references() {
        // code 1, DW_TAG_compile_unit, children; DW_AT_name strp; end; end of table.
        let plain = [1, 0x11, 1, 0x03, 0x0e, 0, 0, 0];
        assert!(abbrev_table_is_self_contained(&plain));
        // code 2, DW_TAG_subprogram, no children; DW_AT_abstract_origin ref_addr.
        let mut cross = plain[..7].to_vec();
        cross.extend_from_slice(&[2, 0x2e, 0, 0x31, 0x10, 0, 0, 0]);
        assert!(!abbrev_table_is_self_contained(&cross));
        // An implicit_const value (here 0x10) is not a form.
        let implicit = [1, 0x11, 0, 0x3a, 0x21, 0x10, 0, 0, 0];
        assert!(abbrev_table_is_self_contained(&implicit));
        assert!(!abbrev_table_is_self_contained(&plain[..4]), "truncated");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(ElfModule::from_image(Vec::new()).is_err());
        assert!(ElfModule::from_image(b"\x7fELF\x02\x01\x01garbage".to_vec()).is_err());
        let mut v = vec![0u8; 4096];
        v[..4].copy_from_slice(b"\x7fELF");
        let _ = ElfModule::from_image(v);
    }
}
