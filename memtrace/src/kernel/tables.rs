//! Loading unwind tables into the kernel for the BPF stack walker.
//!
//! Each module (keyed by file identity, not by process) is compiled once from
//! its `.eh_frame` and its rows appended to `UNWIND_ROWS`; each code page of a
//! process then points at the rows that cover it in `PC_PAGES`. A process not
//! in `PROC_TABLES` is walked with frame pointers.
//!
//! Compiling needs no kernel: at attach it runs on a thread of its own
//! ([`UnwindTables::compile_ahead`]) while the kernel verifies the programs.
//! The rows and pages are written with batch updates, thousands per syscall.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    thread::JoinHandle,
    time::Instant,
};

use anyhow::{Context, Result};
use aya::maps::IterableMap;
use memtrace_common::{MAX_ROWS_PER_PAGE_LOG2, PC_PAGE_SHIFT, PageKey, PageRows, UnwindRow};
use object::{Object, ObjectSegment};

use super::batch::update_batch;
use crate::{
    kernel::maps::TraceMaps,
    process::modules::{MappedModule, ModuleKey, ProcessModules},
    process::{
        mapped::MappedFile,
        maps::{MapEntry, read_maps},
    },
    steps::Steps,
    unwind,
};

/// A module whose rows are in the kernel.
#[derive(Clone, Copy, Debug)]
struct LoadedModule {
    first_row: u32,
    /// Lowest PT_LOAD vaddr: rows are keyed by `vaddr - base`.
    base: u64,
}

/// A module's file identity, `(st_dev, st_ino)`, or `(u64::MAX, start)` for
/// the vdso.
pub type FileKey = (u64, u64);

/// What loading one module file's rows needs, read from the file. Reading it
/// can block (a FUSE file that does not answer), so [`ModuleUnwind::of`] can
/// run on another thread, and [`UnwindTables::load_process`] take the result.
pub struct ModuleUnwind {
    table: Result<unwind::UnwindTable, String>,
    /// The executable PT_LOAD segments: (file offset, file size, vaddr).
    exec_segments: Vec<(u64, u64, u64)>,
}

impl ModuleUnwind {
    /// The table and segments of the ELF file `data`.
    pub fn of(data: &[u8]) -> Self {
        ModuleUnwind {
            table: unwind::compile(data).map_err(|e| e.to_string()),
            exec_segments: exec_segments(data),
        }
    }

    /// The module of a mapping, read from its file (`None` for one without a
    /// file or image).
    pub fn of_module(m: &MappedModule) -> Option<(FileKey, Self)> {
        if m.is_vdso() {
            return Some(((u64::MAX, m.start), Self::of(m.image.as_ref()?)));
        }
        let key = file_key(m)?;
        let map = MappedFile::map(m.file.as_ref()?).ok()?;
        Some((key, Self::of(&map)))
    }
}

/// The identity of a mapping's file, as captured (no syscall: a FUSE file may
/// not answer one).
fn file_key(m: &MappedModule) -> Option<FileKey> {
    match m.key? {
        ModuleKey::File { dev, ino } => Some((dev, ino)),
        ModuleKey::Image { .. } => None,
    }
}

/// The key of a mapping's module: its file's identity, or the vDSO's.
fn module_key(m: &MappedModule) -> Option<FileKey> {
    if m.is_vdso() {
        Some((u64::MAX, m.start))
    } else {
        file_key(m)
    }
}

/// What the tables cost and cover, for the report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TableStats {
    pub modules: usize,
    pub rows: u64,
    /// Kernel memory used by the rows (12 bytes each).
    pub row_bytes: u64,
    pub mappings: usize,
    /// Entries of the page index (PC_PAGES, 32 bytes each with the key).
    pub pages: u64,
    /// Modules without usable unwind information (walked with frame pointers).
    pub modules_without_tables: Vec<String>,
    pub capacity_rows: u32,
}

pub struct UnwindTables {
    modules: HashMap<FileKey, Option<LoadedModule>>,
    /// Each module's executable segments, for the load bias of each mapping.
    segments: HashMap<FileKey, Vec<(u64, u64, u64)>>,
    /// Modules being read and compiled ahead (see `compile_ahead`).
    ahead: Option<JoinHandle<HashMap<FileKey, ModuleUnwind>>>,
    /// Each loaded module's rows, by first row index (to index pages).
    rows: HashMap<u32, Vec<UnwindRow>>,
    /// Mappings already indexed: (start, end, inode).
    indexed: HashSet<(u64, u64, u64)>,
    next_row: u32,
    capacity: u32,
    pub stats: TableStats,
}

impl UnwindTables {
    pub fn new(capacity: u32) -> Self {
        UnwindTables {
            modules: HashMap::new(),
            segments: HashMap::new(),
            ahead: None,
            rows: HashMap::new(),
            indexed: HashSet::new(),
            next_row: 0,
            capacity,
            stats: TableStats {
                capacity_rows: capacity,
                ..Default::default()
            },
        }
    }

    /// Starts reading and compiling the tables of every module of `modules`
    /// on a thread of its own; the next `load_process` takes them from
    /// there. Its time is step `compile_unwind_tables` of `steps`.
    pub fn compile_ahead(&mut self, modules: &ProcessModules, steps: &Arc<Steps>) {
        let mut keys = HashSet::new();
        let mods: Vec<MappedModule> = modules
            .modules()
            .iter()
            .filter(|m| module_key(m).is_some_and(|k| keys.insert(k)))
            .cloned()
            .collect();
        let steps = Arc::clone(steps);
        self.ahead = Some(std::thread::spawn(move || {
            let started = Instant::now();
            let mut read = HashMap::new();
            for m in &mods {
                if let Some((key, u)) = ModuleUnwind::of_module(m) {
                    read.entry(key).or_insert(u);
                }
            }
            steps.record("compile_unwind_tables", started.elapsed());
            read
        }));
    }

    /// Compiles (once per file) and loads the rows of every executable mapping
    /// of `pid`, then indexes its code pages. Mappings already indexed are
    /// skipped. The files in `read` are not read again.
    pub fn load_process(
        &mut self,
        maps: &mut TraceMaps,
        pid: u32,
        modules: &ProcessModules,
        mut read: HashMap<FileKey, ModuleUnwind>,
    ) -> Result<()> {
        if let Some(ahead) = self.ahead.take() {
            match ahead.join() {
                Ok(compiled) => {
                    for (key, u) in compiled {
                        read.entry(key).or_insert(u);
                    }
                }
                Err(_) => log::warn!("compiling the unwind tables ahead panicked"),
            }
        }
        let current = read_maps(pid).map_err(|e| anyhow::anyhow!(e))?;
        self.forget_unmapped(maps, pid, &current);
        for m in modules.modules() {
            // Only what is mapped now: ProcessModules also keeps unmapped modules
            // for symbolization, and their ranges may have been reused.
            let mapped = current
                .iter()
                .any(|e| e.start == m.start && e.end == m.end && e.inode == m.inode);
            if !mapped || !self.indexed.insert((m.start, m.end, m.inode)) {
                continue;
            }
            let Some((loaded, pc_base)) = self.module(maps, m, &mut read) else {
                continue;
            };
            self.index_pages(maps, pid, m.start, m.end, pc_base, loaded)?;
            self.stats.mappings += 1;
        }
        maps.proc_tables
            .insert(pid, 1, 0)
            .context("writing PROC_TABLES")?;
        maps.bump_tables_generation()
    }

    /// Removes the pages of the mappings indexed before and gone now (dlclose):
    /// code mapped there later must not be walked with their rows, and the same
    /// module mapped there again is indexed again. (The BPF side removes them
    /// already when it sees code unmapped; this covers the rest.)
    fn forget_unmapped(&mut self, maps: &mut TraceMaps, pid: u32, current: &[MapEntry]) {
        let gone: Vec<(u64, u64, u64)> = self
            .indexed
            .iter()
            .filter(|&&(start, end, inode)| {
                !current
                    .iter()
                    .any(|e| e.start == start && e.end == end && e.inode == inode)
            })
            .copied()
            .collect();
        for (start, end, inode) in gone {
            self.indexed.remove(&(start, end, inode));
            self.stats.mappings = self.stats.mappings.saturating_sub(1);
            let mut page = start >> PC_PAGE_SHIFT;
            while page << PC_PAGE_SHIFT < end {
                let key = PageKey {
                    tgid: pid,
                    _pad: 0,
                    page,
                };
                if maps.pc_pages.remove(&key).is_ok() {
                    self.stats.pages = self.stats.pages.saturating_sub(1);
                }
                page += 1;
            }
        }
    }

    /// One PC_PAGES entry per page of the mapping: the rows that cover it.
    fn index_pages(
        &mut self,
        maps: &mut TraceMaps,
        pid: u32,
        start: u64,
        end: u64,
        pc_base: u64,
        loaded: LoadedModule,
    ) -> Result<()> {
        let rows = &self.rows[&loaded.first_row];
        let page_size = 1u64 << PC_PAGE_SHIFT;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut page = start >> PC_PAGE_SHIFT;
        while page << PC_PAGE_SHIFT < end {
            let lo = (page << PC_PAGE_SHIFT).max(start).wrapping_sub(pc_base);
            let hi = ((page << PC_PAGE_SHIFT) + page_size)
                .min(end)
                .wrapping_sub(pc_base);
            let (lo, hi) = (lo as u32, hi.min(u32::MAX as u64) as u32);
            let first = rows.partition_point(|r| r.pc <= lo).saturating_sub(1);
            let last = rows.partition_point(|r| r.pc < hi);
            if last > first {
                let n = (last - first) as u32;
                if n > 1 << (MAX_ROWS_PER_PAGE_LOG2 + 1) {
                    log::warn!(
                        "a code page at {:#x} has {n} unwind rows; some pcs in it are not found",
                        page << PC_PAGE_SHIFT
                    );
                }
                keys.push(PageKey {
                    tgid: pid,
                    _pad: 0,
                    page,
                });
                values.push(PageRows {
                    pc_base,
                    first_row: loaded.first_row + first as u32,
                    row_count: n,
                });
            }
            page += 1;
        }
        if !update_batch(maps.pc_pages.map(), &keys, &values).context("writing PC_PAGES")? {
            for (k, v) in keys.iter().zip(&values) {
                maps.pc_pages.insert(k, v, 0).context("writing PC_PAGES")?;
            }
        }
        self.stats.pages += keys.len() as u64;
        Ok(())
    }

    /// The rows of one mapped module (loading them if new) and its pc_base.
    fn module(
        &mut self,
        maps: &mut TraceMaps,
        m: &MappedModule,
        read: &mut HashMap<FileKey, ModuleUnwind>,
    ) -> Option<(LoadedModule, u64)> {
        let key = module_key(m)?;
        if !self.modules.contains_key(&key) {
            let unwind = match read.remove(&key) {
                Some(u) => u,
                None => ModuleUnwind::of_module(m)?.1,
            };
            let l = self.compile_and_load(maps, &m.path, unwind.table);
            self.modules.insert(key, l);
            self.segments.insert(key, unwind.exec_segments);
        }
        let loaded = self.modules.get(&key).copied().flatten()?;
        let pc_base = bias(self.segments.get(&key)?, m.start, m.offset)?.wrapping_add(loaded.base);
        Some((loaded, pc_base))
    }

    fn compile_and_load(
        &mut self,
        maps: &mut TraceMaps,
        path: &str,
        table: Result<unwind::UnwindTable, String>,
    ) -> Option<LoadedModule> {
        let table = match table {
            Ok(t) if !t.rows.is_empty() => t,
            Ok(_) => {
                self.stats.modules_without_tables.push(path.to_string());
                return None;
            }
            Err(e) => {
                log::debug!("{path}: no unwind table: {e}");
                self.stats.modules_without_tables.push(path.to_string());
                return None;
            }
        };
        let n = table.rows.len() as u32;
        if self.next_row.saturating_add(n) > self.capacity {
            log::warn!(
                "unwind table space is full ({} rows): {path} is walked with frame pointers",
                self.capacity
            );
            self.stats.modules_without_tables.push(path.to_string());
            return None;
        }
        let first = self.next_row;
        if let Err(e) = write_rows(maps, first, &table.rows) {
            log::warn!("loading unwind rows of {path}: {e:#}");
            return None;
        }
        self.next_row += n;
        self.rows.insert(first, table.rows);
        self.stats.modules += 1;
        self.stats.rows += n as u64;
        self.stats.row_bytes += n as u64 * std::mem::size_of::<UnwindRow>() as u64;
        Some(LoadedModule {
            first_row: first,
            base: table.base,
        })
    }
}

/// Writes `rows` into UNWIND_ROWS from index `first`.
fn write_rows(maps: &mut TraceMaps, first: u32, rows: &[UnwindRow]) -> Result<()> {
    let indices: Vec<u32> = (first..).take(rows.len()).collect();
    if !update_batch(maps.unwind_rows.map(), &indices, rows)? {
        for (&i, row) in indices.iter().zip(rows) {
            maps.unwind_rows.set(i, row, 0)?;
        }
    }
    Ok(())
}

/// [`bias`] of the ELF file `data`.
#[cfg(test)]
pub fn load_bias(data: &[u8], start: u64, offset: u64) -> Option<u64> {
    bias(&exec_segments(data), start, offset)
}

/// The executable PT_LOAD segments of an ELF file: (file offset, file size, vaddr).
fn exec_segments(data: &[u8]) -> Vec<(u64, u64, u64)> {
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    file.segments()
        .filter(|seg| match seg.flags() {
            object::SegmentFlags::Elf { p_flags, .. } => p_flags.contains(object::elf::PF_X),
            _ => true,
        })
        .map(|seg| {
            let (off, size) = seg.file_range();
            (off, size, seg.address())
        })
        .collect()
}

/// Runtime address minus ELF vaddr for an executable mapping at `start` of
/// file offset `offset`, from the executable PT_LOAD segment that covers that
/// offset. (Mappings start at page boundaries, so the page at `offset` may also
/// hold the end of the segment before: lld puts .text right after .rodata.)
fn bias(segments: &[(u64, u64, u64)], start: u64, offset: u64) -> Option<u64> {
    segments.iter().find_map(|&(off, size, address)| {
        let page_off = off & !0xfff;
        (offset >= page_off && offset < off + size.max(1)).then(|| {
            let vaddr = address.wrapping_sub(off).wrapping_add(offset);
            start.wrapping_sub(vaddr)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_segment_decides_when_segments_share_a_page() {
        // Like lld's layout: R at offset 0 (size 0x12a20), then R+X at offset
        // 0x12a20, vaddr 0x13a20. The r-xp mapping starts at offset 0x12000.
        let tmp = crate::testutil::TempDir::new("bias");
        let dir = tmp.path();
        let src = dir.join("t.c");
        std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
        let exe = dir.join("t");
        let ok = std::process::Command::new("gcc")
            .args(["-fuse-ld=bfd", "-Wl,-z,noseparate-code", "-o"])
            .arg(&exe)
            .arg(&src)
            .status()
            .unwrap()
            .success();
        assert!(ok, "gcc failed");
        let data = std::fs::read(&exe).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let text = file
            .segments()
            .find(|s| matches!(s.flags(), object::SegmentFlags::Elf { p_flags, .. } if p_flags.contains(object::elf::PF_X)))
            .unwrap();
        let (off, _) = text.file_range();
        let page = off & !0xfff;
        let start = 0x5555_0000_0000 + page;
        let bias = load_bias(&data, start, page).unwrap();
        // The byte at `off` is at vaddr text.address(): runtime start + (off - page).
        assert_eq!(start + (off - page) - bias, text.address());
    }

    #[test]
    fn libc_text_is_mapped_at_its_vaddr() {
        let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        // Debian's libc: r-xp at file offset 0x26000 maps vaddr 0x26000.
        let bias = load_bias(&data, 0x7f00_0002_6000, 0x26000).unwrap();
        assert_eq!(bias, 0x7f00_0000_0000);
    }
}
