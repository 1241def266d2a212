//! Files a target can influence, mapped into memtrace without letting it kill
//! memtrace.
//!
//! A page of a mapped file that is truncated afterwards (by the target, or
//! anyone who can write it) raises SIGBUS when it is touched, and SIGBUS kills.
//! Every such mapping is registered here, and a SIGBUS handler replaces a
//! faulting page of a registered mapping with a page of zeros: the read then
//! sees zeros, which the parsers treat like any other malformed input (they
//! are fuzzed), and the fault is counted ([`truncated_pages`]) for the report.
//! A SIGBUS anywhere else is handled as it was before this handler came.
use std::{
    fs::File,
    io,
    sync::{
        Once, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

/// A read-only, private mapping of a whole file, guarded against truncation.
pub struct MappedFile {
    map: Map,
    slot: Option<usize>,
}

enum Map {
    ReadOnly(memmap2::Mmap),
    /// Writable so that no uprobe is put in it, never written (see
    /// [`MappedFile::map_unprobed`]).
    Unprobed(memmap2::MmapMut),
}

impl MappedFile {
    /// Maps `file`. Fails when it cannot be mapped, or when every slot of the
    /// registry is taken (then the file is not read at all: unguarded, it could
    /// kill memtrace).
    pub fn map(file: &File) -> io::Result<Self> {
        install_handler();
        // SAFETY: a read-only private mapping. Someone may change or truncate the
        // file while it is mapped: changed bytes are read like any other input,
        // and a truncated page is replaced with zeros by the SIGBUS handler once
        // the mapping is registered below, before any byte is read. (Private:
        // FUSE refuses a shared mapping of a file opened for direct I/O.)
        let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(file) }?;
        Self::guard(Map::ReadOnly(map))
    }

    /// Maps `file` for decoding its code: the bytes of the file, never a
    /// breakpoint another tool's uprobe put there.
    ///
    /// A uprobe belongs to the file, and the kernel writes its `int3` into
    /// every mapping of the file that could run code: each process's private
    /// copy of the page, and that includes a reader's read-only mapping
    /// (`valid_vma` in kernel/events/uprobes.c takes any file mapping that
    /// may be made executable and is not writable). So with another tool's
    /// global uprobe on `malloc`, a read-only mapping shows `int3` at
    /// `malloc+0`, and the plan decoded from it differs (no result sites,
    /// no entry cover). A private mapping that is writable is never given a
    /// breakpoint, and as long as nothing writes it, its pages are the page
    /// cache's, which the kernel never changes for a uprobe (it copies the
    /// page into the probed process): what `pread` reads, without the copy
    /// (checked on Linux 6.18 with a bpftrace uprobe on libc's `malloc`:
    /// read-only mapping `cc`, writable mapping and `pread` `41`). Nothing
    /// writes it: it is only handed out as `&[u8]`. `MAP_NORESERVE`: no
    /// swap is reserved for pages never written.
    pub fn map_unprobed(file: &File) -> io::Result<Self> {
        install_handler();
        // SAFETY: as in `map`; the mapping is writable only so that the kernel
        // leaves uprobes out of it, and is only ever read through `Deref`.
        // (Not made read-only afterwards: a uprobe registered later would
        // then be written into it.)
        let map = unsafe { memmap2::MmapOptions::new().no_reserve_swap().map_copy(file) }?;
        Self::guard(Map::Unprobed(map))
    }

    /// Registers `map` for the SIGBUS handler.
    fn guard(map: Map) -> io::Result<Self> {
        let bytes: &[u8] = match &map {
            Map::ReadOnly(m) => m,
            Map::Unprobed(m) => m,
        };
        let slot = match bytes.len() {
            0 => None,
            len => Some(register(bytes.as_ptr() as usize, len)?),
        };
        Ok(MappedFile { map, slot })
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.map {
            Map::ReadOnly(m) => m,
            Map::Unprobed(m) => m,
        }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // Unregistered while still mapped; the mapping goes right after.
        if let Some(slot) = self.slot {
            SLOTS[slot].len.store(0, Ordering::SeqCst);
            SLOTS[slot].start.store(0, Ordering::SeqCst);
        }
    }
}

/// Pages of mapped files that were gone when read (the file was truncated
/// after it was mapped), read as zeros, since memtrace started.
pub fn truncated_pages() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
}

/// Files mapped at once: a few per module (the file, its debug file, a
/// supplementary file), for the modules of one process.
const SLOTS_LEN: usize = 8192;

static SLOTS: [Slot; SLOTS_LEN] = [const {
    Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
    }
}; SLOTS_LEN];

static FAULTS: AtomicU64 = AtomicU64::new(0);
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS action before ours, put back for a fault that is not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

fn register(start: usize, len: usize) -> io::Result<usize> {
    for (i, s) in SLOTS.iter().enumerate() {
        if s.start
            .compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            s.len.store(len, Ordering::SeqCst);
            return Ok(i);
        }
    }
    Err(io::Error::other(format!(
        "more than {SLOTS_LEN} files mapped at once"
    )))
}

/// Whether `addr` lies in a registered mapping. Async-signal-safe: atomics only.
fn registered(addr: usize) -> bool {
    SLOTS.iter().any(|s| {
        let start = s.start.load(Ordering::SeqCst);
        let len = s.len.load(Ordering::SeqCst);
        start != 0 && addr >= start && addr - start < len
    })
}

fn install_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions; sigaction is given a valid
        // action whose handler only does async-signal-safe work (atomics, mmap,
        // sigaction), and a valid out-pointer for the previous action.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE_SIZE.store(page as usize, Ordering::Relaxed);
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
                let _ = PREVIOUS.set(previous);
            }
        }
    });
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if registered(addr) {
        let page = addr & !(PAGE_SIZE.load(Ordering::Relaxed) - 1);
        // SAFETY: replaces one page of a registered file mapping (it stays
        // registered while mapped) with zeros, in place: MAP_FIXED over memory
        // memtrace owns and only reads.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE_SIZE.load(Ordering::Relaxed),
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            FAULTS.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Not a file of ours: the action from before takes the fault when the
    // access is retried (the default one ends the process, as without us).
    if let Some(previous) = PREVIOUS.get() {
        // SAFETY: `previous` is the action sigaction returned.
        unsafe { libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_truncated_while_mapped_reads_as_zeros() {
        let tmp = crate::testutil::TempDir::new("mapped");
        let path = tmp.path().join("f");
        let page = PAGE_SIZE.load(Ordering::Relaxed).max(4096);
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![0xabu8; 3 * page]).unwrap();
        drop(f);
        let file = File::open(&path).unwrap();
        let map = MappedFile::map(&file).unwrap();
        assert_eq!(map[0], 0xab, "read before the truncation");
        let before = truncated_pages();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(page as u64)
            .unwrap();
        assert_eq!(map[page - 1], 0xab, "the page still in the file");
        assert_eq!(map[page + 10], 0, "a page gone reads as zeros");
        assert_eq!(map[3 * page - 1], 0);
        assert_eq!(truncated_pages() - before, 2);
        drop(map);
        assert!(!registered(page), "unregistered when dropped");
    }

    #[test]
    fn empty_files_map_to_nothing() {
        let tmp = crate::testutil::TempDir::new("mapped-empty");
        let path = tmp.path().join("e");
        File::create(&path).unwrap();
        let map = MappedFile::map(&File::open(&path).unwrap()).unwrap();
        assert!(map.is_empty());
    }
}
