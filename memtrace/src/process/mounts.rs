//! Which mounts a process serves (FUSE), per mount namespace, read from
//! `mountinfo` only when the namespace's mount table changed.
//!
//! Every file open asks whether a served mount exists ([`super::served`]), so
//! the answer must be cheap on a host with thousands of mounts. A
//! `/proc/PID/mountinfo` kept open is the kernel's change signal: `poll`
//! reports `POLLPRI | POLLERR` on it once after each change of its namespace's
//! table (`mounts_poll` in fs/proc_namespace.c compares the namespace's event
//! counter with the one the file saw at its last poll, and takes the new one).
//! So a table is parsed when first met and again only after such a poll; a
//! change between the poll and the read is seen at the next poll, at worst one
//! read too many. Namespaces are told apart by the inode of
//! `/proc/PID/ns/mnt` (a `stat` of nsfs: no filesystem is asked anything).
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// A device as `major:minor` (`mountinfo`'s third field, `/proc/PID/maps`'
/// fourth): what a file mapping tells of its mount without a lookup.
pub type Device = (u32, u32);

/// The served mounts of one `mountinfo` text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// By mount id (unique across namespaces).
    pub ids: BTreeSet<u64>,
    /// Their devices: every file on a FUSE mount has its superblock's device.
    pub devices: BTreeSet<Device>,
}

/// Whether a filesystem type (`mountinfo`'s) is served by a process.
pub fn is_served_fstype(fstype: &str) -> bool {
    fstype == "fuse" || fstype == "fuseblk" || fstype.starts_with("fuse.")
}

/// The served mounts in one `mountinfo` text: "ID PARENT MAJ:MIN ROOT POINT
/// OPTIONS [OPTIONAL...] - FSTYPE SOURCE OPTIONS".
pub fn parse(mountinfo: &str) -> Served {
    let mut out = Served::default();
    for line in mountinfo.lines() {
        let mut fields = line.split(' ');
        let (Some(id), Some(_), Some(dev)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        // The optional fields end at " - ".
        let Some((_, after)) = line.split_once(" - ") else {
            continue;
        };
        if !after.split(' ').next().is_some_and(is_served_fstype) {
            continue;
        }
        if let Ok(id) = id.parse() {
            out.ids.insert(id);
        }
        if let Some((maj, min)) = dev.split_once(':')
            && let (Ok(maj), Ok(min)) = (maj.parse(), min.parse())
        {
            out.devices.insert((maj, min));
        }
    }
    out
}

/// Whether `poll`'s `revents` on a `mountinfo` file say the table changed.
pub fn changed(revents: libc::c_short) -> bool {
    revents & (libc::POLLPRI | libc::POLLERR) != 0
}

/// One namespace's table: its `mountinfo` kept open, as last parsed.
pub struct Table {
    file: File,
    served: Served,
    /// Times the text was read (parsed), for tests and logs.
    reads: u64,
}

impl Table {
    /// Opens and reads `path` (a `/proc/.../mountinfo`). Opened before the
    /// read: a change after the open is signalled at the next poll.
    pub fn open(path: &str) -> io::Result<Table> {
        let file = File::open(path)?;
        let mut t = Table {
            file,
            served: Served::default(),
            reads: 0,
        };
        t.read()?;
        Ok(t)
    }

    fn read(&mut self) -> io::Result<()> {
        let mut text = String::new();
        self.file.rewind()?;
        self.file.read_to_string(&mut text)?;
        self.served = parse(&text);
        self.reads += 1;
        Ok(())
    }

    /// Whether the table changed since the last call (or the open).
    fn poll_changed(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        // SAFETY: one pollfd, a zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        // A failed poll cannot tell: read again.
        n < 0 || changed(p.revents)
    }

    /// The served mounts now: read again only if the table changed.
    pub fn current(&mut self) -> &Served {
        if self.poll_changed()
            && let Err(e) = self.read()
        {
            log::debug!("mountinfo not read again: {e}");
        }
        &self.served
    }

    #[cfg(test)]
    pub fn reads(&self) -> u64 {
        self.reads
    }
}

/// The tables of every namespace met, by the inode of its `ns/mnt`.
#[derive(Default)]
pub struct Tables {
    by_ns: BTreeMap<u64, Table>,
}

/// Namespaces remembered: more would be a bug, not a session.
const MAX_NAMESPACES: usize = 64;

impl Tables {
    pub const fn new() -> Tables {
        Tables {
            by_ns: BTreeMap::new(),
        }
    }

    /// The served mounts of the namespace `proc_dir` (`/proc/self`,
    /// `/proc/PID`) is in; None if it cannot be read (the process is gone).
    pub fn served_of(&mut self, proc_dir: &str) -> Option<&Served> {
        let ns = std::fs::metadata(format!("{proc_dir}/ns/mnt")).ok()?.ino();
        if !self.by_ns.contains_key(&ns) {
            if self.by_ns.len() >= MAX_NAMESPACES {
                return None;
            }
            let t = Table::open(&format!("{proc_dir}/mountinfo")).ok()?;
            self.by_ns.insert(ns, t);
        }
        self.by_ns.get_mut(&ns).map(Table::current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_mounts_are_told_by_fstype_with_their_devices() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:50 / /tmp/mt/mnt rw,nosuid,nodev shared:20 - fuse.stallfs stallfs rw,user_id=0
41 22 259:3 / /mnt/b rw - fuseblk /dev/sdb1 rw
42 22 0:52 / /mnt/c rw - fuse fuse rw
43 22 0:53 / /mnt/v rw - virtiofs tag rw
44 22 0:54 / /mnt/fuse.x rw - nfs4 srv:/ rw
bogus line
";
        let s = parse(info);
        assert_eq!(s.ids.into_iter().collect::<Vec<_>>(), vec![40, 41, 42]);
        assert_eq!(
            s.devices.into_iter().collect::<Vec<_>>(),
            vec![(0, 50), (0, 52), (259, 3)]
        );
    }

    #[test]
    fn only_priority_or_error_events_mean_a_change() {
        assert!(!changed(libc::POLLIN | libc::POLLRDNORM));
        assert!(changed(libc::POLLIN | libc::POLLPRI | libc::POLLERR));
        assert!(changed(libc::POLLERR));
    }

    /// The kernel's signal, for real: in a mount namespace of its own (a
    /// thread may unshare one), a table is not read again until a mount
    /// changes it, then once.
    #[test]
    fn a_table_is_read_again_only_after_a_mount() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let tmp = crate::testutil::TempDir::new("mounts");
        let dir = tmp.path().to_owned();
        std::thread::spawn(move || {
            // SAFETY: plain flags; this thread alone gets the new namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNS) }, 0);
            let c = |s: &str| std::ffi::CString::new(s).unwrap();
            let (root, none, tmpfs) = (c("/"), c("none"), c("tmpfs"));
            let at = c(dir.to_str().unwrap());
            // SAFETY: NUL-terminated strings; private, so no mount of the
            // host's reaches this namespace while the test runs.
            unsafe {
                assert_eq!(
                    libc::mount(
                        none.as_ptr(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null()
                    ),
                    0
                );
            }
            let mut t = Table::open("/proc/thread-self/mountinfo").unwrap();
            t.current();
            t.current();
            assert_eq!(t.reads(), 1);
            // SAFETY: as above.
            unsafe {
                assert_eq!(
                    libc::mount(
                        tmpfs.as_ptr(),
                        at.as_ptr(),
                        tmpfs.as_ptr(),
                        0,
                        std::ptr::null()
                    ),
                    0
                );
            }
            t.current();
            assert_eq!(t.reads(), 2);
            t.current();
            assert_eq!(t.reads(), 2);
            // SAFETY: as above.
            unsafe { libc::umount2(at.as_ptr(), libc::MNT_DETACH) };
        })
        .join()
        .unwrap();
    }
}
