//! One parsed ELF module: program headers for address translation, function symbols
//! ([`super::symtab`]), and addr2line contexts over its DWARF, from the file itself or a
//! separate debug file ([`super::debug_search`]), its sections loaded by
//! [`super::sections`] and indexed by unit ([`super::unit_index`]).

use std::fs::File;
use std::path::PathBuf;

use crate::process::mapped::MappedFile;
use object::{Object, ObjectSection, ObjectSegment, SectionKind};

use super::debug_search::{find_sup_file, separate_debug_file};
use super::demangle::demangle_lang;
use super::sections::{PARALLEL_THRESHOLD, Sections, load_sections};
use super::stream::StreamedSection;
use super::symtab::{SymbolNames, SymbolTable, read_symbol_tables};
use super::unit_batch;
use super::unit_index::{
    Covered, UnitIndex, abbrev_table_is_self_contained, arange_entries, covered_at, merged_ranges,
};
use super::{FrameInfo, Unresolved};

/// Part of [`ElfModule`]'s interface (its constructors take one).
pub(crate) use super::debug_search::DebugSearch;

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

/// Owner of all bytes the parsed structures borrow.
#[derive(Default)]
pub(super) struct Backing {
    maps: Vec<MappedFile>,
    /// Inflated sections. Left writable: making them read-only (mprotect) cost ~1 ms
    /// on libc's `.debug_info`, at the end of the longest step of loading it.
    anon: Vec<memmap2::MmapMut>,
    /// Decompressed sections and in-memory images. A `Vec<u8>`'s heap buffer does not move
    /// when the outer vector reallocates, so slices into it stay valid.
    owned: Vec<Vec<u8>>,
}

impl Backing {
    pub(super) fn map(&mut self, file: &File) -> Result<&'static [u8], String> {
        // Deleted files are fine (the open file keeps the inode alive); a page of a file
        // truncated while mapped reads as zeros (see `MappedFile`).
        let m = MappedFile::map(file).map_err(|e| format!("mmap: {e}"))?;
        self.maps.push(m);
        let m = self.maps.last().expect("just pushed");
        // SAFETY: the mapping lives until `Backing` is dropped, see `ElfModule`.
        Ok(unsafe { extend(m) })
    }

    pub(super) fn keep_anon(&mut self, m: memmap2::MmapMut) -> &'static [u8] {
        self.anon.push(m);
        let m = self.anon.last().expect("just pushed");
        // SAFETY: the mapping lives until `Backing` is dropped and is never written
        // again, see `ElfModule`.
        unsafe { extend(m) }
    }

    /// Drops the most recent mapping; only valid once nothing derived from it is alive.
    pub(super) fn unmap_last(&mut self) {
        self.maps.pop();
    }

    pub(super) fn own(&mut self, v: Vec<u8>) -> &'static [u8] {
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
    /// GNU build id (pprof mappings name it).
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

pub(super) fn is_debug_info_present(obj: &object::File<'_>) -> bool {
    obj.section_by_name(".debug_info")
        .is_some_and(|s| s.kind() != SectionKind::UninitializedData && s.size() > 0)
}

pub(super) fn parse_elf(data: &'static [u8]) -> Result<object::File<'static>, String> {
    let obj = object::File::parse(data).map_err(|e| format!("not a valid object file: {e}"))?;
    if obj.format() != object::BinaryFormat::Elf {
        return Err(format!("not ELF ({:?})", obj.format()));
    }
    Ok(obj)
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

/// A unit's own context, once asked for.
enum UnitContext {
    Own(Box<Context>),
    /// The unit could refer into other units: the whole-file context answers for it.
    UseFull,
    /// addr2line could not read the unit: symbol tables only.
    Failed,
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
    fn garbage_is_an_error_not_a_panic() {
        assert!(ElfModule::from_image(Vec::new()).is_err());
        assert!(ElfModule::from_image(b"\x7fELF\x02\x01\x01garbage".to_vec()).is_err());
        let mut v = vec![0u8; 4096];
        v[..4].copy_from_slice(b"\x7fELF");
        let _ = ElfModule::from_image(v);
    }
}
