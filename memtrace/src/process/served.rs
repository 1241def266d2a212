//! Files on mounts that a process serves (FUSE), read by a helper process.
//!
//! A thread in a FUSE request that the server has read waits uninterruptibly
//! until the server answers (`request_wait_answer` in fs/fuse/dev.c): not even
//! SIGKILL ends it, and a process is reaped only when its last thread is gone.
//! A target that serves its own libraries could so keep memtrace from ever
//! ending, and a page fault on a mapped file of such a mount waits the same way.
//! So memtrace itself never looks a name up, opens, reads or maps anything on
//! such a mount: a helper process, outside memtrace's thread group, opens the
//! file by the same rules ([`super::open`]) and copies it, up to
//! [`COPY_LIMIT`], into a memfd that memtrace then reads and maps. A helper
//! that makes no progress for [`STALL`] is left behind (it is not memtrace's
//! child: it was forked twice, so nobody has to reap it), its mount is not
//! asked again, and both are counted for the report ([`notes`]).
//!
//! Which mounts are served is told by `mountinfo` (memtrace's own and the
//! targets' whose `/proc/PID/...` paths were used) and the mount id of a
//! handle by `/proc/self/fdinfo`: neither asks the filesystem anything.
//! NFS, CIFS and the like wait killably: `exit_group` ends those waits, so
//! only FUSE (`fuse`, `fuseblk`, `fuse.*`) is served here. virtiofs speaks
//! FUSE, but its server is the host's, not a process a target controls.
use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::open::{FileKind, Links, OpenError, Refusal};

/// The largest file copied: a 1 TiB file on a served mount must not fill memory.
pub const COPY_LIMIT: u64 = 1 << 30;
/// A helper that copies nothing for this long is abandoned.
pub const STALL: Duration = Duration::from_secs(5);

use super::mounts::{Device, Served, Tables};

struct Mounts {
    /// Targets whose mount namespaces are read too.
    pids: Vec<u32>,
    /// Each namespace's table, read again only when it changed.
    tables: Tables,
    /// The served mounts of every namespace, as of the last [`any_served`].
    served: Served,
    /// Served mounts whose helper was abandoned: not asked again.
    stalled: BTreeSet<u64>,
}

static MOUNTS: Mutex<Mounts> = Mutex::new(Mounts {
    pids: Vec::new(),
    tables: Tables::new(),
    served: Served {
        ids: BTreeSet::new(),
        devices: BTreeSet::new(),
    },
    stalled: BTreeSet::new(),
});

/// Targets remembered: more would be a bug, not a session.
const MAX_PIDS: usize = 64;

fn mounts() -> std::sync::MutexGuard<'static, Mounts> {
    MOUNTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the mount namespace of `pid` too from now on (a path under
/// `/proc/PID/` was used).
pub fn note_pid(pid: u32) {
    let mut m = mounts();
    if !m.pids.contains(&pid) && m.pids.len() < MAX_PIDS {
        m.pids.push(pid);
    }
}

/// Whether any served mount is there now, in our namespace or a target's (a
/// target can mount one any time: each namespace's table is checked at each
/// call, and read again when the kernel says it changed).
pub fn any_served() -> bool {
    let mut m = mounts();
    let mut served = Served::default();
    let pids = m.pids.clone();
    let dirs =
        std::iter::once("/proc/self".to_owned()).chain(pids.iter().map(|p| format!("/proc/{p}")));
    for dir in dirs {
        if let Some(s) = m.tables.served_of(&dir) {
            served.ids.extend(&s.ids);
            served.devices.extend(&s.devices);
        }
    }
    m.served = served;
    !m.served.ids.is_empty()
}

/// Whether a file mapped by `pid` from device `dev` (its `/proc/PID/maps`
/// line) is on a served mount: told from the mount tables alone, without a
/// lookup. The kernel reads a file itself to put a uprobe in it, and a page
/// of such a mapping not in memory is read from the server on whichever
/// thread touches it: memtrace must do neither (see `probeable`).
pub fn device_served(pid: u32, dev: Device) -> bool {
    note_pid(pid);
    any_served() && mounts().served.devices.contains(&dev)
}

/// The mount id of a handle, from `/proc/self/fdinfo` (no filesystem call).
fn mnt_id(fd: RawFd) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The served mount `fd` is on, if any: after [`any_served`], so the table is
/// current. A handle whose mount cannot be told is taken as served.
pub fn served_mount(fd: RawFd) -> Option<u64> {
    let Some(id) = mnt_id(fd) else {
        return Some(u64::MAX);
    };
    mounts().served.ids.contains(&id).then_some(id)
}

static COPIED: AtomicU64 = AtomicU64::new(0);
static COPIED_BYTES: AtomicU64 = AtomicU64::new(0);
static ABANDONED: AtomicU64 = AtomicU64::new(0);
static NOT_ASKED: AtomicU64 = AtomicU64::new(0);
static TOO_LARGE: AtomicU64 = AtomicU64::new(0);

/// What the helpers did since memtrace started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub copied: u64,
    pub copied_bytes: u64,
    /// Helpers left behind, waiting on a server that did not answer.
    pub abandoned: u64,
    /// Files not asked for, on a mount whose helper was abandoned before.
    pub not_asked: u64,
    /// Files larger than [`COPY_LIMIT`], not read.
    pub too_large: u64,
}

pub fn counts() -> Counts {
    Counts {
        copied: COPIED.load(Ordering::Relaxed),
        copied_bytes: COPIED_BYTES.load(Ordering::Relaxed),
        abandoned: ABANDONED.load(Ordering::Relaxed),
        not_asked: NOT_ASKED.load(Ordering::Relaxed),
        too_large: TOO_LARGE.load(Ordering::Relaxed),
    }
}

/// What the report says was cut short by served files.
pub fn notes() -> Vec<String> {
    let c = counts();
    let mut v = Vec::new();
    if c.abandoned > 0 || c.not_asked > 0 {
        v.push(format!(
            "files: reads of {} file(s) on FUSE mounts got no answer in {} s and were \
             abandoned (helper processes left waiting on the server), {} more file(s) \
             on those mounts not read; frames in them may be unresolved",
            c.abandoned,
            STALL.as_secs(),
            c.not_asked
        ));
    }
    if c.too_large > 0 {
        v.push(format!(
            "files: {} file(s) on FUSE mounts larger than {} GiB not read",
            c.too_large,
            COPY_LIMIT >> 30
        ));
    }
    v
}

/// A file's `(st_dev, st_ino)`.
type FileId = (u64, u64);

/// The original file's identity of each copy, by the copy's.
static IDENTITIES: Mutex<Vec<(FileId, FileId)>> = Mutex::new(Vec::new());

/// `(st_dev, st_ino)` of the file `f` holds: of the original file for a copy
/// made here, so that one library is one module however it was read.
pub fn identity(f: &File) -> io::Result<FileId> {
    use std::os::unix::fs::MetadataExt;
    let md = f.metadata()?;
    let own = (md.dev(), md.ino());
    let ids = IDENTITIES.lock().unwrap_or_else(|e| e.into_inner());
    Ok(ids
        .iter()
        .find(|(copy, _)| *copy == own)
        .map_or(own, |(_, original)| *original))
}

/// What the helper writes back: `code` 0 (copied), an errno, or one of the
/// `NOT_REGULAR`/`TOO_LARGE` codes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Status {
    code: i64,
    mode: u64,
    dev: u64,
    ino: u64,
    len: u64,
}

const NOT_REGULAR: i64 = -1;
const TOO_LARGE_CODE: i64 = -2;

/// Copies the regular file at `path` (resolved inside `root` by `links`, or
/// as given when `root` is `None`) on the served mount `mount`, through a
/// helper process, into a sealed memfd.
pub(super) fn copy(
    root: Option<RawFd>,
    path: &Path,
    links: Links,
    mount: u64,
) -> Result<File, OpenError> {
    if mounts().stalled.contains(&mount) {
        NOT_ASKED.fetch_add(1, Ordering::Relaxed);
        return Err(OpenError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            "on a FUSE mount that did not answer before: not read",
        )));
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| OpenError::Io(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let memfd = memfd()?;
    let (status_r, status_w) = pipe()?;
    let job = Job {
        root: root.unwrap_or(-1),
        path: c,
        links,
        memfd: memfd.as_raw_fd(),
        status: status_w.as_raw_fd(),
        buf: vec![0u8; 1 << 16],
    };
    spawn_detached(&job)?;
    drop(status_w);
    let status = match wait_status(&status_r, &memfd) {
        Some(s) => s,
        None => {
            ABANDONED.fetch_add(1, Ordering::Relaxed);
            mounts().stalled.insert(mount);
            return Err(OpenError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "on a FUSE mount, no answer in {} s: abandoned",
                    STALL.as_secs()
                ),
            )));
        }
    };
    match status.code {
        0 => {}
        NOT_REGULAR => {
            return Err(OpenError::Refused(Refusal::NotRegular(FileKind::of(
                status.mode as u32,
            ))));
        }
        TOO_LARGE_CODE => {
            TOO_LARGE.fetch_add(1, Ordering::Relaxed);
            return Err(OpenError::Refused(Refusal::TooLarge));
        }
        e if e == libc::ELOOP as i64 => return Err(OpenError::Refused(Refusal::Symlink)),
        e => return Err(OpenError::Io(io::Error::from_raw_os_error(e as i32))),
    }
    seal(&memfd)?;
    let file = File::from(memfd);
    let own = identity_of_copy(&file)?;
    IDENTITIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((own, (status.dev, status.ino)));
    COPIED.fetch_add(1, Ordering::Relaxed);
    COPIED_BYTES.fetch_add(status.len, Ordering::Relaxed);
    Ok(file)
}

fn identity_of_copy(f: &File) -> Result<FileId, OpenError> {
    use std::os::unix::fs::MetadataExt;
    let md = f.metadata().map_err(OpenError::Io)?;
    Ok((md.dev(), md.ino()))
}

fn owned(fd: libc::c_int) -> Result<OwnedFd, OpenError> {
    if fd < 0 {
        return Err(OpenError::Io(io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn memfd() -> Result<OwnedFd, OpenError> {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: a NUL-terminated name and plain flags.
    owned(unsafe { libc::memfd_create(c"memtrace-served-copy".as_ptr(), flags) })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), OpenError> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the array given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(OpenError::Io(io::Error::last_os_error()));
    }
    Ok((owned(fds[0])?, owned(fds[1])?))
}

/// The copy is read-only from now on: nothing can change or truncate it.
fn seal(memfd: &OwnedFd) -> Result<(), OpenError> {
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: F_ADD_SEALS on a memfd we own.
    if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(OpenError::Io(io::Error::last_os_error()));
    }
    Ok(())
}

/// The helper's status, or `None` when it made no progress (the memfd did not
/// grow) for [`STALL`], or died without one.
fn wait_status(status: &OwnedFd, memfd: &OwnedFd) -> Option<Status> {
    let size = |fd: &OwnedFd| {
        // SAFETY: fstat of a memfd we own into a zeroed buffer.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(fd.as_raw_fd(), &mut st);
            st.st_size
        }
    };
    let mut last = (size(memfd), Instant::now());
    loop {
        let mut p = libc::pollfd {
            fd: status.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, for 100 ms.
        let n = unsafe { libc::poll(&mut p, 1, 100) };
        if n > 0 {
            let mut s = Status::default();
            // SAFETY: reads at most size_of::<Status>() bytes into `s`, plain integers.
            let got = unsafe {
                libc::read(
                    status.as_raw_fd(),
                    (&mut s as *mut Status).cast(),
                    std::mem::size_of::<Status>(),
                )
            };
            // A pipe write this small is atomic: all of it, or the helper died.
            return (got == std::mem::size_of::<Status>() as isize).then_some(s);
        }
        let now = size(memfd);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= STALL {
            return None;
        }
    }
}

/// Everything the helper needs, made before the fork: after it, the helper
/// only makes system calls (no allocation, no lock).
struct Job {
    root: RawFd,
    path: CString,
    links: Links,
    memfd: RawFd,
    status: RawFd,
    buf: Vec<u8>,
}

/// Forks the helper twice, so that it is nobody's child here: memtrace never
/// has to reap it, however long it waits.
fn spawn_detached(job: &Job) -> Result<(), OpenError> {
    // SAFETY: the child only calls async-signal-safe functions (fork, _exit,
    // and the system calls of `helper`) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(OpenError::Io(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: as above; the middle process ends at once.
        unsafe {
            if libc::fork() == 0 {
                helper(job);
            }
            libc::_exit(0);
        }
    }
    let mut st = 0;
    // SAFETY: waits for the middle process, which exits at once.
    while unsafe { libc::waitpid(pid, &mut st, 0) } < 0
        && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
    Ok(())
}

/// The helper: its own session, default signals, only the descriptors it
/// needs (never memtrace's BPF links: the probes must go when memtrace does),
/// then the open and the copy.
///
/// # Safety
/// Called only in a freshly forked child; never returns.
unsafe fn helper(job: &Job) -> ! {
    // SAFETY: system calls on descriptors and memory prepared before the fork.
    unsafe {
        // Named for whoever looks (it has the forking thread's name otherwise).
        libc::prctl(libc::PR_SET_NAME, c"memtrace-copy".as_ptr());
        libc::setsid();
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        // Descriptors moved to 0..=3 (out of the way first), the rest closed.
        let high = |fd: RawFd| {
            if fd < 0 {
                -1
            } else {
                libc::fcntl(fd, libc::F_DUPFD, 1000)
            }
        };
        let (memfd, status, root) = (high(job.memfd), high(job.status), high(job.root));
        libc::dup2(memfd, 0);
        libc::dup2(status, 1);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        libc::dup2(null, 2);
        let root = if root >= 0 {
            libc::dup2(root, 3);
            3
        } else {
            -1
        };
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        let mut s = copy_in_helper(root, job);
        if s.code == 0 && s.len > COPY_LIMIT {
            s.code = TOO_LARGE_CODE;
        }
        libc::write(
            1,
            (&s as *const Status).cast(),
            std::mem::size_of::<Status>(),
        );
        libc::_exit(0)
    }
}

/// Opens as [`super::open`] does (`O_PATH` in the root, a regular file only,
/// reopened through `/proc/self/fd`) and copies to descriptor 0 with `pwrite`
/// (the memfd's offset is shared with memtrace and stays 0).
///
/// # Safety
/// Only in the helper, with descriptors set up by [`helper`].
unsafe fn copy_in_helper(root: RawFd, job: &Job) -> Status {
    let err = |code: i64| Status {
        code,
        ..Status::default()
    };
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO) as i64
    };
    // SAFETY: system calls on a NUL-terminated path and buffers we own.
    unsafe {
        let path_fd = if root >= 0 {
            let mut how: libc::open_how = std::mem::zeroed();
            how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
            how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
            if job.links == Links::Refuse {
                how.resolve |= libc::RESOLVE_NO_SYMLINKS;
            }
            libc::syscall(
                libc::SYS_openat2,
                root,
                job.path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            ) as RawFd
        } else {
            libc::open(job.path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC)
        };
        if path_fd < 0 {
            return err(errno());
        }
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(path_fd, &mut st) != 0 {
            return err(errno());
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Status {
                code: NOT_REGULAR,
                mode: st.st_mode as u64,
                ..Status::default()
            };
        }
        if st.st_size as u64 > COPY_LIMIT {
            return err(TOO_LARGE_CODE);
        }
        let mut link = *b"/proc/self/fd/\0\0\0\0\0\0\0\0\0\0\0";
        write_decimal(&mut link[14..], path_fd as u32);
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        let fd = libc::open(link.as_ptr().cast(), flags);
        if fd < 0 {
            return err(errno());
        }
        let mut again: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut again) != 0
            || again.st_mode & libc::S_IFMT != libc::S_IFREG
            || (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino)
        {
            return Status {
                code: NOT_REGULAR,
                mode: again.st_mode as u64,
                ..Status::default()
            };
        }
        let buf = job.buf.as_ptr() as *mut libc::c_void;
        let mut off: u64 = 0;
        // One byte past the limit tells a file that grew beyond it.
        while off <= COPY_LIMIT {
            let n = libc::pread(fd, buf, job.buf.len(), off as i64);
            if n < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return err(errno());
            }
            if n == 0 {
                break;
            }
            let mut done = 0;
            while done < n {
                let w = libc::pwrite(
                    0,
                    buf.cast::<u8>().add(done as usize).cast(),
                    (n - done) as usize,
                    (off + done as u64) as i64,
                );
                if w <= 0 {
                    return err(errno());
                }
                done += w;
            }
            off += n as u64;
        }
        Status {
            code: 0,
            mode: st.st_mode as u64,
            dev: st.st_dev,
            ino: st.st_ino,
            len: off,
        }
    }
}

/// `n` in decimal into `out`, NUL-terminated (no allocation: in the helper).
fn write_decimal(out: &mut [u8], mut n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        out[i] = digits[len - 1 - i];
    }
    out[len] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal() {
        for (n, want) in [
            (0u32, "0"),
            (7, "7"),
            (1234, "1234"),
            (u32::MAX, "4294967295"),
        ] {
            let mut out = [0xffu8; 11];
            write_decimal(&mut out, n);
            let end = out.iter().position(|&b| b == 0).unwrap();
            assert_eq!(std::str::from_utf8(&out[..end]).unwrap(), want);
        }
    }

    /// The helper copies a regular file, refuses a FIFO, and the copy is sealed
    /// and keeps the original's identity (run on a plain mount: the helper does
    /// not care where the file is).
    #[test]
    fn the_helper_copies_regular_files_only() {
        let tmp = crate::testutil::TempDir::new("served");
        let path = tmp.path().join("lib.so");
        std::fs::write(&path, b"\x7fELF and more").unwrap();
        let f = copy(None, &path, Links::InRoot, 0).unwrap();
        assert_eq!(std::io::read_to_string(&f).unwrap(), "\x7fELF and more");
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(identity(&f).unwrap(), (md.dev(), md.ino()));
        // SAFETY: F_GET_SEALS on a descriptor we own.
        let seals = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_WRITE, 0);
        let fifo = tmp.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let r = copy(None, &fifo, Links::InRoot, 0);
        assert_eq!(
            r.err().and_then(|e| e.refusal()),
            Some(Refusal::NotRegular(FileKind::Fifo))
        );
        let root = crate::process::open::Root::open(tmp.path(), "/").unwrap();
        let f = root.copy_for_test(Path::new("/lib.so")).unwrap();
        assert_eq!(std::io::read_to_string(&f).unwrap(), "\x7fELF and more");
    }

    /// A (sparse) file over the limit is refused before a byte is copied, and
    /// counted.
    #[test]
    fn a_file_over_the_limit_is_not_copied() {
        let tmp = crate::testutil::TempDir::new("served-big");
        let path = tmp.path().join("huge.debug");
        File::create(&path)
            .unwrap()
            .set_len(COPY_LIMIT + 1)
            .unwrap();
        let before = counts().too_large;
        let r = copy(None, &path, Links::InRoot, 0);
        assert_eq!(r.err().and_then(|e| e.refusal()), Some(Refusal::TooLarge));
        assert_eq!(counts().too_large - before, 1);
        assert!(
            notes()
                .iter()
                .any(|n| n.contains("larger than 1 GiB not read"))
        );
    }
}
