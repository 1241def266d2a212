//! Reads of the target's memory (`/proc/PID/mem`) that never wait on a FUSE
//! server.
//!
//! A read of another process's page that is not in memory faults it in on the
//! reading thread: for a page of a file on a FUSE mount, the kernel asks the
//! server, and a server that never answers (and ignores interrupts) holds
//! that thread for good — memtrace's own, in `D` state, unkillable (see
//! [`super::served`]). The target chooses what memtrace reads (its link map,
//! its Python objects: pointers in its own memory), and it can map a file of
//! such a mount there and evict the pages (`MADV_PAGEOUT`). So while a served
//! mount exists, each page of a read is looked up in `/proc/PID/pagemap`
//! first: a page present in the target (bit 63) or swapped out (bit 62, read
//! from swap, never from the server) is read; any other page of a file
//! mapping on a served mount is refused, counted, and said in the report
//! ([`notes`]). Every other page (anonymous memory, other filesystems) is
//! read as before.
//!
//! The check and the read are two system calls: a target that evicts the
//! page again between them could still make the read wait. Closing that
//! window would need the read made in a process of its own, as files are.
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::maps::{MapEntry, read_maps};
use super::open::open_regular;

const PAGE: u64 = 4096;
/// `/proc/PID/pagemap`: the page is present.
const PM_PRESENT: u64 = 1 << 63;
/// `/proc/PID/pagemap`: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;

static REFUSED: AtomicU64 = AtomicU64::new(0);

/// The target's memory, read by [`TargetMem::read_exact_at`].
pub struct TargetMem {
    pid: u32,
    mem: File,
    pagemap: Option<File>,
}

impl TargetMem {
    /// Opens the memory of `pid` (it needs ptrace rights, as root has).
    pub fn open(pid: u32) -> io::Result<TargetMem> {
        let mem = open_regular(Path::new(&format!("/proc/{pid}/mem")))?;
        let pagemap = open_regular(Path::new(&format!("/proc/{pid}/pagemap"))).ok();
        Ok(TargetMem { pid, mem, pagemap })
    }

    /// Reads `buf.len()` bytes at `addr`, unless a page of them would be read
    /// from a FUSE server: then nothing is read, the refusal is counted, and
    /// the error is `WouldBlock`.
    pub fn read_exact_at(&self, buf: &mut [u8], addr: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.may_wait(addr, buf.len() as u64) {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "a page of a file on a FUSE mount, not in memory: not read",
            ));
        }
        self.mem.read_exact_at(buf, addr)
    }

    /// Whether reading `len` bytes at `addr` could fault in a page from a
    /// served mount.
    fn may_wait(&self, addr: u64, len: u64) -> bool {
        if !super::served::any_served() {
            return false;
        }
        let first = addr / PAGE;
        let last = addr.saturating_add(len - 1) / PAGE;
        let mut maps: Option<Vec<MapEntry>> = None;
        for page in first..=last {
            let entry = self.pagemap_entry(page);
            if entry.is_some_and(|e| e & (PM_PRESENT | PM_SWAPPED) != 0) {
                continue;
            }
            // Not in memory (or pagemap unreadable): whose page is it? The
            // maps are read now, not at open: the target maps files any time.
            let maps = maps.get_or_insert_with(|| read_maps(self.pid).unwrap_or_default());
            if page_may_wait(entry, mapping_of(maps, page * PAGE), |dev| {
                super::served::device_served(self.pid, dev)
            }) {
                return true;
            }
        }
        false
    }

    fn pagemap_entry(&self, page: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.pagemap
            .as_ref()?
            .read_exact_at(&mut b, page * 8)
            .ok()?;
        Some(u64::from_ne_bytes(b))
    }
}

/// The mapping `addr` is in.
fn mapping_of(maps: &[MapEntry], addr: u64) -> Option<&MapEntry> {
    maps.iter().find(|m| addr >= m.start && addr < m.end)
}

/// Whether reading a page with pagemap entry `entry` (None: unknown) in
/// mapping `m` could ask a FUSE server (`served` tells a device's mount):
/// it is not in memory and is a file's on a served mount. An address in no
/// mapping faults without asking anyone.
fn page_may_wait(
    entry: Option<u64>,
    m: Option<&MapEntry>,
    served: impl Fn((u32, u32)) -> bool,
) -> bool {
    if entry.is_some_and(|e| e & (PM_PRESENT | PM_SWAPPED) != 0) {
        return false;
    }
    m.is_some_and(|m| m.inode != 0 && served((m.dev_major, m.dev_minor)))
}

/// Reads of the target's memory refused since memtrace started.
pub fn refused() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// What the report says was cut short by refused reads.
pub fn notes() -> Vec<String> {
    match refused() {
        0 => Vec::new(),
        n => vec![format!(
            "memory: {n} read(s) of the target's memory refused: pages of a file on a FUSE \
             mount not in memory (reading them would wait on the FUSE server); what they \
             hold (the link map's order, Python names) may be missing"
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::maps::parse_maps;

    #[test]
    fn only_absent_pages_of_served_files_may_wait() {
        let maps = parse_maps(
            "7f0000000000-7f0000002000 r--s 00000000 00:32 7 /mnt/fuse/data\n\
             7f0000002000-7f0000003000 rw-p 00000000 00:00 0 \n\
             7f0000003000-7f0000004000 r--p 00000000 08:01 9 /usr/lib/x\n",
        )
        .unwrap();
        let served = |dev: (u32, u32)| dev == (0, 0x32);
        let fuse = mapping_of(&maps, 0x7f00_0000_1000);
        let anon = mapping_of(&maps, 0x7f00_0000_2000);
        let disk = mapping_of(&maps, 0x7f00_0000_3000);
        // Absent, or pagemap unknown: the served file's page may wait.
        assert!(page_may_wait(Some(0), fuse, served));
        assert!(page_may_wait(None, fuse, served));
        // Present, or in swap: read.
        assert!(!page_may_wait(Some(PM_PRESENT | 0x1234), fuse, served));
        assert!(!page_may_wait(Some(PM_SWAPPED), fuse, served));
        // Anonymous memory, another filesystem, no mapping: read.
        assert!(!page_may_wait(Some(0), anon, served));
        assert!(!page_may_wait(Some(0), disk, served));
        assert!(!page_may_wait(Some(0), None, served));
    }

    /// Our own memory reads as it is (no served mount is ours here, or
    /// the page is present).
    #[test]
    fn reads_own_memory() {
        let value = std::hint::black_box(0x1122_3344_5566_7788u64);
        let mem = TargetMem::open(std::process::id()).unwrap();
        let mut b = [0u8; 8];
        mem.read_exact_at(&mut b, &value as *const u64 as u64)
            .unwrap();
        assert_eq!(u64::from_ne_bytes(b), value);
    }
}
