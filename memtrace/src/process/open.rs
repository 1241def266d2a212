//! The one way memtrace opens a file a target can influence: its mapped files,
//! the debug files its ELF names, and the paths under its root.
//!
//! memtrace runs as root next to processes other people own, so a path a target
//! names must not make it block (a FIFO: `open` waits for a writer), open a
//! device (opening one can have side effects), or read a file outside the
//! target's root (an absolute symlink, `..`). Every such open therefore:
//!
//! 1. resolves the path with `O_PATH` — nothing is opened for reading yet, no
//!    driver's `open` runs, a FIFO does not wait — inside a root directory with
//!    `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` (absolute symlinks and
//!    `..` stay inside the root), or follows a path the caller trusts (a
//!    `/proc/PID/map_files` link, a file the user named);
//! 2. `fstat`s that handle and refuses anything but a regular file;
//! 3. only then opens that same inode (through `/proc/self/fd/N`) with
//!    `O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC`, and checks again with `fstat`
//!    that it is the regular file of step 2, before anything reads or maps it.
//!
//! While any FUSE mount is there (ours or a target's), a path is walked one
//! component at a time instead, and the walk stops before it looks anything
//! up on, or opens, a file of such a mount: a helper process copies that file
//! ([`super::served`]), so a server that never answers cannot hold memtrace.
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Why a path was not opened although it exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A FIFO, a device, a directory or a socket: never opened for reading.
    NotRegular(FileKind),
    /// A symbolic link where none is accepted, a `/proc` magic link, or too many
    /// links (`ELOOP`).
    Symlink,
    /// On a FUSE mount and larger than [`super::served::COPY_LIMIT`]: not copied.
    TooLarge,
}

/// What a refused file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    Fifo,
    CharDevice,
    BlockDevice,
    Directory,
    Socket,
    Symlink,
    Other,
}

impl FileKind {
    pub(super) fn of(mode: u32) -> Self {
        match mode & libc::S_IFMT {
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFLNK => FileKind::Symlink,
            _ => FileKind::Other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FileKind::Fifo => "a FIFO",
            FileKind::CharDevice => "a character device",
            FileKind::BlockDevice => "a block device",
            FileKind::Directory => "a directory",
            FileKind::Socket => "a socket",
            FileKind::Symlink => "a symbolic link",
            FileKind::Other => "not a regular file",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotRegular(k) => write!(f, "not a regular file ({}): not opened", k.name()),
            Refusal::Symlink => f.write_str("refused symbolic link: not opened"),
            Refusal::TooLarge => write!(
                f,
                "on a FUSE mount and larger than {} GiB: not read",
                super::served::COPY_LIMIT >> 30
            ),
        }
    }
}

/// A failed open: refused by the rules above, or an error of the system
/// (missing, permission denied, ...).
#[derive(Debug)]
pub enum OpenError {
    Refused(Refusal),
    Io(io::Error),
}

impl OpenError {
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            OpenError::Refused(r) => Some(*r),
            OpenError::Io(_) => None,
        }
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Refused(r) => r.fmt(f),
            OpenError::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for OpenError {}

impl From<OpenError> for io::Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Io(e) => e,
            OpenError::Refused(r) => io::Error::new(io::ErrorKind::InvalidInput, r.to_string()),
        }
    }
}

/// `ELOOP` is what the kernel answers for a refused symlink or magic link.
fn io_or_refused(e: io::Error) -> OpenError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        OpenError::Refused(Refusal::Symlink)
    } else {
        OpenError::Io(e)
    }
}

fn cstr(p: &Path) -> Result<CString, OpenError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| OpenError::Io(io::Error::from(io::ErrorKind::InvalidInput)))
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: fstat writes one `struct stat` into the zeroed buffer given.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Steps 2 and 3 of the module docs, on an `O_PATH` handle.
fn reopen_regular(path_fd: OwnedFd) -> Result<File, OpenError> {
    let st = fstat(path_fd.as_raw_fd()).map_err(OpenError::Io)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(OpenError::Refused(Refusal::NotRegular(FileKind::of(
            st.st_mode,
        ))));
    }
    // Reopening through /proc/self/fd opens the very inode resolved above: the
    // path cannot be swapped for a FIFO in between. memtrace reads /proc for
    // everything it does, so /proc is there.
    let link = cstr(Path::new(&format!("/proc/self/fd/{}", path_fd.as_raw_fd())))?;
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated path and plain flags.
    let fd = owned(unsafe { libc::open(link.as_ptr(), flags) }.into()).map_err(OpenError::Io)?;
    let again = fstat(fd.as_raw_fd()).map_err(OpenError::Io)?;
    if again.st_mode & libc::S_IFMT != libc::S_IFREG
        || (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino)
    {
        return Err(OpenError::Refused(Refusal::NotRegular(FileKind::of(
            again.st_mode,
        ))));
    }
    Ok(File::from(fd))
}

/// Opens `path` as given (symlinks and magic links followed: a
/// `/proc/PID/map_files` entry, `/proc/PID/mem`, a file the user named on the
/// command line), without blocking and only if it is a regular file.
///
/// A path under `/proc/PID/root/` is resolved inside that root
/// ([`Root::open_file`], links followed in it), so that a FUSE mount in the
/// target's tree is never looked into. Otherwise the path is the user's or a
/// `/proc` link, and only its last step can land on a FUSE mount: then the
/// file is copied by the helper.
pub fn open_regular(path: &Path) -> Result<File, OpenError> {
    if let Some((root, rest)) = under_proc_root(path) {
        let root = Root::open(&root, &root).map_err(OpenError::Io)?;
        return root.open_file(&rest, Links::InRoot);
    }
    if let Some(pid) = proc_pid(path) {
        super::served::note_pid(pid);
    }
    let c = cstr(path)?;
    // SAFETY: a NUL-terminated path and plain flags.
    let fd = owned(unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) }.into())
        .map_err(OpenError::Io)?;
    if super::served::any_served()
        && let Some(mount) = super::served::served_mount(fd.as_raw_fd())
    {
        return super::served::copy(None, path, Links::InRoot, mount);
    }
    reopen_regular(fd)
}

/// Whether the file at `path` (a path the user named, or its loader's: not
/// one under a target's root) is on a FUSE mount, told as [`open_regular`]
/// tells it: by the mount of an `O_PATH` handle. A path that cannot be
/// resolved is not.
pub fn on_served_mount(path: &Path) -> bool {
    if !super::served::any_served() {
        return false;
    }
    let Ok(c) = cstr(path) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and plain flags.
    let fd = owned(unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) }.into());
    fd.is_ok_and(|fd| super::served::served_mount(fd.as_raw_fd()).is_some())
}

/// The pid of a `/proc/PID/...` path.
fn proc_pid(path: &Path) -> Option<u32> {
    let mut c = path.components();
    (c.next()? == Component::RootDir && c.next()? == Component::Normal("proc".as_ref()))
        .then_some(())?;
    match c.next()? {
        Component::Normal(n) => n.to_str()?.parse().ok(),
        _ => None,
    }
}

/// `(/proc/PID/root, rest)` of a path under a target's root.
fn under_proc_root(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let pid = proc_pid(path)?;
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let rest = path.strip_prefix(&root).ok()?;
    (!rest.as_os_str().is_empty()).then(|| (root, rest.to_owned()))
}

/// How symbolic links are treated while resolving a path in a [`Root`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// Followed, but never out of the root (absolute ones start at the root).
    InRoot,
    /// Refused: a path in a directory the target may write to, where a link
    /// could point anywhere in its root.
    Refuse,
}

/// A directory that target paths are resolved inside of: `/` for `/proc/PID/root`,
/// so that `..` and absolute symlinks cannot leave it.
#[derive(Debug)]
pub struct Root {
    /// `O_PATH | O_DIRECTORY` handle: stays valid after the target exited.
    dir: OwnedFd,
    /// How paths under it are printed (`/proc/PID/root`, `/`, a debug directory).
    shown: PathBuf,
}

impl Root {
    /// The directory at `path` (symlinks and magic links followed: `/proc/PID/root`
    /// is one), shown as `shown`.
    pub fn open(path: &Path, shown: impl Into<PathBuf>) -> io::Result<Root> {
        if let Some(pid) = proc_pid(path) {
            super::served::note_pid(pid);
        }
        let c = cstr(path).map_err(io::Error::from)?;
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        // SAFETY: a NUL-terminated path and plain flags.
        let dir = owned(unsafe { libc::open(c.as_ptr(), flags) }.into())?;
        Ok(Root {
            dir,
            shown: shown.into(),
        })
    }

    /// Our own `/`.
    pub fn host() -> io::Result<Root> {
        Root::open(Path::new("/"), "/")
    }

    pub fn try_clone(&self) -> io::Result<Root> {
        Ok(Root {
            dir: self.dir.try_clone()?,
            shown: self.shown.clone(),
        })
    }

    /// How the root is printed.
    #[cfg(test)]
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    /// `(st_dev, st_ino)` of the root directory.
    pub fn id(&self) -> Option<(u64, u64)> {
        let st = fstat(self.dir.as_raw_fd()).ok()?;
        Some((st.st_dev, st.st_ino))
    }

    /// Whether this is our own `/`.
    pub fn is_host(&self) -> bool {
        let host = std::fs::metadata("/").ok().map(|m| (m.dev(), m.ino()));
        host.is_some() && self.id() == host
    }

    /// `path` (absolute or not, both from the root) as printed: under [`Self::shown`].
    pub fn display(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        if rel.as_os_str().is_empty() {
            return self.shown.clone();
        }
        self.shown.join(rel)
    }

    /// Opens `path` resolved inside this root, without blocking and only if it is
    /// a regular file (see the module docs).
    pub fn open_file(&self, path: &Path, links: Links) -> Result<File, OpenError> {
        if super::served::any_served() {
            return match resolve_by_hand(self.dir.as_raw_fd(), path, links, true) {
                Ok(Resolved::Here(fd)) => reopen_regular(fd),
                Ok(Resolved::Served(mount)) => {
                    super::served::copy(Some(self.dir.as_raw_fd()), path, links, mount)
                }
                Err(e) => Err(e),
            };
        }
        reopen_regular(self.resolve(path, links)?)
    }

    /// [`Self::open_file`] through the helper, wherever the file is.
    #[cfg(test)]
    pub fn copy_for_test(&self, path: &Path) -> Result<File, OpenError> {
        super::served::copy(Some(self.dir.as_raw_fd()), path, Links::InRoot, 0)
    }

    /// An `O_PATH` handle on `path` resolved inside this root.
    fn resolve(&self, path: &Path, links: Links) -> Result<OwnedFd, OpenError> {
        match openat2(self.dir.as_raw_fd(), path, links) {
            Err(OpenError::Io(e)) if e.raw_os_error() == Some(libc::ENOSYS) => {
                // openat2 is Linux 5.6+; memtrace needs 5.17, but a seccomp filter
                // (a container runtime's) can still hide it. Then the path is walked
                // one component at a time, as RESOLVE_IN_ROOT would.
                match resolve_by_hand(self.dir.as_raw_fd(), path, links, false)? {
                    Resolved::Here(fd) => Ok(fd),
                    Resolved::Served(_) => unreachable!("not guarded"),
                }
            }
            r => r,
        }
    }
}

/// `openat2(dir, path, O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS [| RESOLVE_NO_SYMLINKS])`.
fn openat2(dir: RawFd, path: &Path, links: Links) -> Result<OwnedFd, OpenError> {
    let c = cstr(path)?;
    let mut resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    if links == Links::Refuse {
        resolve |= libc::RESOLVE_NO_SYMLINKS;
    }
    // SAFETY: open_how is plain integers; all zero is its default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    // RESOLVE_IN_ROOT answers EAGAIN when a rename raced with the walk: retry.
    for _ in 0..8 {
        // SAFETY: a NUL-terminated path and an `open_how` of the size given.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        match owned(fd) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            r => return r.map_err(io_or_refused),
        }
    }
    Err(OpenError::Io(io::Error::from_raw_os_error(libc::EAGAIN)))
}

/// Links followed in one resolution before giving up, as the kernel's limit.
const MAX_LINKS: usize = 40;

/// RESOLVE_IN_ROOT without openat2: each component opened with
/// `O_PATH | O_NOFOLLOW` under the previous one; `..` goes back to the parent
/// directory walked through, never above the root; a symlink's target is walked
/// the same way (an absolute one from the root). A link in procfs (a magic
/// link) is refused.
///
/// `guard`: before each lookup, the directory looked into is checked, and the
/// handle reached at the end: if it is on a FUSE mount, the walk stops there
/// ([`Resolved::Served`]) having asked that filesystem nothing.
fn resolve_by_hand(
    root: RawFd,
    path: &Path,
    links: Links,
    guard: bool,
) -> Result<Resolved, OpenError> {
    let served = |fd: &OwnedFd| {
        guard
            .then(|| super::served::served_mount(fd.as_raw_fd()))
            .flatten()
    };
    // SAFETY: duplicating a descriptor we hold.
    let root_dup = owned(unsafe { libc::fcntl(root, libc::F_DUPFD_CLOEXEC, 0) }.into())
        .map_err(OpenError::Io)?;
    // The directories walked through, the root first: `..` pops one.
    let mut stack: Vec<OwnedFd> = vec![root_dup];
    let mut todo: std::collections::VecDeque<std::ffi::OsString> = components(path);
    let mut followed = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let cur = stack.last().expect("the root stays");
        if let Some(mount) = served(cur) {
            return Ok(Resolved::Served(mount));
        }
        let cur = cur.as_raw_fd();
        let c = CString::new(name.as_bytes())
            .map_err(|_| OpenError::Io(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: a NUL-terminated name relative to a directory we hold.
        let fd =
            owned(unsafe { libc::openat(cur, c.as_ptr(), flags) }.into()).map_err(OpenError::Io)?;
        // A FUSE mount's root, reached from outside it: not even stat'ed.
        if let Some(mount) = served(&fd) {
            return Ok(Resolved::Served(mount));
        }
        let st = fstat(fd.as_raw_fd()).map_err(OpenError::Io)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            stack.push(fd);
            continue;
        }
        followed += 1;
        if links == Links::Refuse || followed > MAX_LINKS || is_proc(&fd) {
            return Err(OpenError::Refused(Refusal::Symlink));
        }
        let target = readlink_fd(&fd).map_err(OpenError::Io)?;
        if target.is_absolute() {
            stack.truncate(1);
        }
        for c in components(&target).into_iter().rev() {
            todo.push_front(c);
        }
    }
    let fd = stack.pop().expect("the root stays");
    match served(&fd) {
        Some(mount) => Ok(Resolved::Served(mount)),
        None => Ok(Resolved::Here(fd)),
    }
}

/// Where a guarded walk ended.
enum Resolved {
    /// An `O_PATH` handle on the file, not on a FUSE mount.
    Here(OwnedFd),
    /// At a FUSE mount (its id): the helper must take it from the start.
    Served(u64),
}

/// Whether a link is in procfs: a magic link there (`/proc/PID/root`, an
/// fd) is refused, as `RESOLVE_NO_MAGICLINKS` refuses it. (Only asked of a
/// handle that is not on a FUSE mount: `fstatfs` would ask the server.)
fn is_proc(fd: &OwnedFd) -> bool {
    // SAFETY: fstatfs writes one `struct statfs` into the zeroed buffer given.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        // Compared as i128: f_type and the constant differ in type between libcs.
        libc::fstatfs(fd.as_raw_fd(), &mut st) == 0
            && i128::from(st.f_type) == i128::from(libc::PROC_SUPER_MAGIC)
    }
}

/// The names a path walks through: `..` kept, `.` and `/` dropped.
fn components(p: &Path) -> std::collections::VecDeque<std::ffi::OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// The text of the symlink an `O_PATH | O_NOFOLLOW` handle is on.
fn readlink_fd(fd: &OwnedFd) -> io::Result<PathBuf> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: an empty path reads the link the descriptor itself is (Linux 2.6.39+),
    // into a buffer of the length given.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(std::ffi::OsString::from_vec(buf)))
}

/// Whether `path` is absolute, lies under `dir`, and walks no `..` or `.` (a
/// lexical check of a path a target named, before anything is resolved).
pub fn lexically_under(path: &Path, dir: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && path.starts_with(dir)
        && path != dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::os::unix::fs::symlink;

    fn mkfifo(p: &Path) {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// Runs `f` on a thread and fails if it does not return within 5 s (a FIFO
    /// opened for reading would block forever).
    fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("the open blocked")
    }

    /// A root with `etc/secret`, `lib/real.debug`, and links that try to leave it.
    fn tree() -> (TempDir, TempDir) {
        let outside = TempDir::new("open-out");
        std::fs::write(outside.path().join("secret"), b"outside").unwrap();
        let root = TempDir::new("open-root");
        let r = root.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("lib/sub")).unwrap();
        std::fs::write(r.join("etc/secret"), b"inside").unwrap();
        std::fs::write(r.join("lib/real.debug"), b"debug").unwrap();
        // Absolute: names the outside file, resolves to the root's own.
        let abs = outside.path().join("secret");
        symlink(&abs, r.join("lib/abs")).unwrap();
        symlink("/etc/secret", r.join("lib/etc_secret")).unwrap();
        symlink(
            "../../../../../../../../etc/secret",
            r.join("lib/sub/dotdot"),
        )
        .unwrap();
        symlink("real.debug", r.join("lib/rel")).unwrap();
        symlink("loop", r.join("lib/loop")).unwrap();
        symlink("/proc/self/root/etc/hostname", r.join("lib/proc")).unwrap();
        mkfifo(&r.join("lib/fifo"));
        (root, outside)
    }

    fn read(f: File) -> String {
        std::io::read_to_string(f).unwrap()
    }

    /// Both resolvers, the kernel's and the fallback, give the same answers.
    fn both(root: &Root, path: &str, links: Links) -> Vec<Result<String, String>> {
        let by_kernel = root
            .open_file(Path::new(path), links)
            .map(read)
            .map_err(|e| format!("{e:?}"));
        let by_hand = resolve_by_hand(root.dir.as_raw_fd(), Path::new(path), links, false)
            .and_then(|r| match r {
                Resolved::Here(fd) => reopen_regular(fd),
                Resolved::Served(_) => unreachable!(),
            })
            .map(read)
            .map_err(|e| format!("{e:?}"));
        vec![by_kernel, by_hand]
    }

    #[test]
    fn links_and_dotdot_stay_in_the_root() {
        let (dir, _outside) = tree();
        let root = Root::open(dir.path(), "/proc/1/root").unwrap();
        for (path, want) in [
            ("/lib/real.debug", "debug"),
            ("lib/real.debug", "debug"),
            ("/lib/rel", "debug"),
            ("/lib/abs", "inside_or_missing"),
            ("/lib/etc_secret", "inside"),
            ("/lib/sub/dotdot", "inside"),
            ("/../../../../etc/secret", "inside"),
            ("/lib/../../etc/secret", "inside"),
        ] {
            for got in both(&root, path, Links::InRoot) {
                match want {
                    // The outside file's absolute path does not exist in the root.
                    "inside_or_missing" => {
                        assert!(
                            got.as_ref().is_err_and(|e| e.contains("NotFound")),
                            "{path}: {got:?}"
                        )
                    }
                    _ => assert_eq!(got.as_deref(), Ok(want), "{path}"),
                }
            }
        }
        assert_eq!(
            root.display(Path::new("/lib/x")),
            Path::new("/proc/1/root/lib/x")
        );
    }

    #[test]
    fn links_refused_where_none_is_accepted() {
        let (dir, _outside) = tree();
        let root = Root::open(dir.path(), "/").unwrap();
        for path in ["/lib/rel", "/lib/etc_secret", "/lib/loop"] {
            for got in both(&root, path, Links::Refuse) {
                assert!(
                    got.as_ref().is_err_and(|e| e.contains("Symlink")),
                    "{path}: {got:?}"
                );
            }
        }
        for got in both(&root, "/lib/real.debug", Links::Refuse) {
            assert_eq!(got.as_deref(), Ok("debug"));
        }
        // A loop is refused when following too.
        for got in both(&root, "/lib/loop", Links::InRoot) {
            assert!(
                got.as_ref().is_err_and(|e| e.contains("Symlink")),
                "{got:?}"
            );
        }
    }

    #[test]
    fn magic_links_do_not_leave_the_root() {
        let (dir, _outside) = tree();
        let root = Root::open(dir.path(), "/").unwrap();
        // /proc/self/root is a magic link on the host; in this root there is no
        // /proc at all, so the path does not exist.
        let r = root.open_file(Path::new("/lib/proc"), Links::InRoot);
        assert!(matches!(r, Err(OpenError::Io(_))), "{r:?}");
        // Through the real /proc, the kernel refuses the magic link.
        let host = Root::host().unwrap();
        let r = host.open_file(Path::new("/proc/self/root/etc/hostname"), Links::InRoot);
        assert_eq!(r.err().and_then(|e| e.refusal()), Some(Refusal::Symlink));
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let (dir, _outside) = tree();
        let fifo = dir.path().join("lib/fifo");
        let r = within_5s(move || open_regular(&fifo).err().and_then(|e| e.refusal()));
        assert_eq!(r, Some(Refusal::NotRegular(FileKind::Fifo)));
        let root = Root::open(dir.path(), "/").unwrap();
        let r = within_5s(move || {
            root.open_file(Path::new("/lib/fifo"), Links::InRoot)
                .err()
                .and_then(|e| e.refusal())
        });
        assert_eq!(r, Some(Refusal::NotRegular(FileKind::Fifo)));
    }

    #[test]
    fn devices_and_directories_are_refused() {
        let r = open_regular(Path::new("/dev/null"))
            .err()
            .and_then(|e| e.refusal());
        assert_eq!(r, Some(Refusal::NotRegular(FileKind::CharDevice)));
        let r = open_regular(Path::new("/tmp"))
            .err()
            .and_then(|e| e.refusal());
        assert_eq!(r, Some(Refusal::NotRegular(FileKind::Directory)));
        let host = Root::host().unwrap();
        let r = host
            .open_file(Path::new("/dev/zero"), Links::InRoot)
            .err()
            .and_then(|e| e.refusal());
        assert_eq!(r, Some(Refusal::NotRegular(FileKind::CharDevice)));
        // A regular file opens, non-blocking, read-only.
        let f = open_regular(Path::new("/proc/self/exe")).unwrap();
        // SAFETY: F_GETFL on a descriptor we own.
        let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
        assert_ne!(fl & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn lexical_rule() {
        let d = Path::new("/usr/lib/debug");
        assert!(lexically_under(Path::new("/usr/lib/debug/.dwz/x.debug"), d));
        assert!(!lexically_under(
            Path::new("/usr/lib/debug/../../../etc/shadow"),
            d
        ));
        assert!(!lexically_under(Path::new("/usr/lib/debugger/x"), d));
        assert!(!lexically_under(Path::new("usr/lib/debug/x"), d));
        assert!(!lexically_under(Path::new("/etc/shadow"), d));
        assert!(!lexically_under(Path::new("/usr/lib/debug"), d));
    }
}
